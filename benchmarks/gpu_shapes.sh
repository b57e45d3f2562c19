#!/usr/bin/env bash
# Real shapes on a lent NVIDIA GPU: what the decode pipeline buys (rollout.PIPELINE), the release
# shapes (4-bit, 256 new tokens, P=2 x G=4), the step against mlx-lm-lora at the 0.5B shape, one
# long rollout (1024 tokens), with MLX's CUDA build. It runs in the repository root wherever it is
# started from, and reads only git-ignored folders there: .device/part2/install.sh (staged with
# MLX's CUDA build for that machine; run when mlx does not import), .device/peer (the mlx_lm_lora
# package: pip install --no-deps --target .device/peer mlx-lm-lora==5.10.2) and .gpu-cache (if an
# earlier run brought MLX's compiled kernels back: the first step on a bare machine spends minutes
# compiling them). Everything lands in $OUT (default: tmp/gpu-out in the repository, git-ignored;
# at most 8 files); copy $OUT/ptx-cache.tar.gz to .gpu-cache/ for the next run, on the
# same GPU architecture only (MLX names its kernels by kernel and shape, not by the chip they were
# compiled for; the H100 and H200 are both sm_90).
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$root/tmp/gpu-out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$root"
export PYTHONUNBUFFERED=1
log="$OUT/log.txt"
python -c "import mlx.core" 2>/dev/null || bash .device/part2/install.sh > "$OUT/install.log" 2>&1 || { tail -20 "$OUT/install.log"; exit 1; }
rm -f "$OUT/install.log"
ptx=$(python -c "import os, mlx.core as mx; from mlx_grpo import blas; print(blas.cuda_kernel_cache(mx.__version__, dict(os.environ)))")
if [ -f .gpu-cache/ptx-cache.tar.gz ]; then mkdir -p "$ptx" && tar -C "$ptx" -xzf .gpu-cache/ptx-cache.tar.gz; fi
echo "MLX kernel cache: $(ls "$ptx" 2>/dev/null | wc -l) kernels at start" >> "$log"
{ python -c "import mlx.core as mx, mlx_lm; print('mlx', mx.__version__, 'mlx-lm', mlx_lm.__version__, mx.default_device())"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; git log -1 --format='commit %h %s' 2>/dev/null; } >> "$log" 2>&1
stage() {  # stage NAME SECONDS COMMAND...: one measurement, its output appended to the log
  local name=$1 secs=$2; shift 2
  echo "=== $name ($(date +%T), limit ${secs}s): $*" >> "$log"
  local t0=$SECONDS
  timeout "$secs" "$@" >> "$log" 2>&1; echo "=== $name rc=$? in $((SECONDS - t0)) s" >> "$log"
}
stage pipeline 60 python benchmarks/decode_pipeline.py --rows 8,128 --max-tokens 64
# MLX captures CUDA graphs by default; shapes that change every step may make it recapture (a lead, not measured here).
stage pipeline-nographs 60 env MLX_USE_CUDA_GRAPHS=0 python benchmarks/decode_pipeline.py --rows 8,128 --max-tokens 64
stage qwen0.5b 200 python cli.py bench --shape qwen2.5-0.5b --out "$OUT/shape_qwen0.5b.json"
stage peer0.5b 120 env PYTHONPATH="$root/.device/peer" python benchmarks/peer_mlx_lm_lora.py --shape qwen2.5-0.5b --steps 3
stage long1024 80 python benchmarks/long_completions.py --bits 4 --out "$OUT/long_qwen0.5b_4bit.json"
stage llama1b 100 python cli.py bench --shape llama-3.2-1b --out "$OUT/shape_llama1b.json"
stage qwen1.5b 110 python cli.py bench --shape qwen2.5-1.5b --out "$OUT/shape_qwen1.5b.json"
echo "MLX kernel cache: $(ls "$ptx" 2>/dev/null | wc -l) kernels at the end" >> "$log"
tar -C "$ptx" -czf "$OUT/ptx-cache.tar.gz" . 2>/dev/null
grep -E '^===|^MLX kernel' "$log"
