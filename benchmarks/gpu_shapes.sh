#!/usr/bin/env bash
# Issue 12 on a lent NVIDIA GPU: the release shapes (4-bit, 256 new tokens, P=2 x G=4), one long
# rollout (1024 tokens) and the step against mlx-lm-lora at the 0.5B shape, with MLX's CUDA build.
# Run on the GPU machine after ../shared/gpu/prepare-mlx-cuda.sh's part1 (and .device/peer, the
# mlx_lm_lora package: pip install --no-deps --target .device/peer mlx-lm-lora==5.10.2) were copied
# to /root/stage; this call carries .device/part2. Everything lands in $OUT (at most 8 files).
set -u
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
log="$OUT/log.txt"
python -c "import mlx.core" 2>/dev/null || bash .device/part2/install.sh > "$OUT/install.log" 2>&1 || { tail -20 "$OUT/install.log"; exit 1; }
rm -f "$OUT/install.log"
{ python -c "import mlx.core as mx, mlx_lm; print('mlx', mx.__version__, 'mlx-lm', mlx_lm.__version__, mx.default_device())"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; git log -1 --format='commit %h %s' 2>/dev/null; } >> "$log" 2>&1
stage() {  # stage NAME SECONDS COMMAND...: one measurement, its output appended to the log
  local name=$1 secs=$2; shift 2
  echo "=== $name ($(date +%T), limit ${secs}s): $*" >> "$log"
  local t0=$SECONDS
  timeout "$secs" "$@" >> "$log" 2>&1; echo "=== $name rc=$? in $((SECONDS - t0)) s" >> "$log"
}
stage qwen0.5b 100 python cli.py bench --shape qwen2.5-0.5b --out "$OUT/shape_qwen0.5b.json"
stage long1024 80 python benchmarks/long_completions.py --bits 4 --out "$OUT/long_qwen0.5b_4bit.json"
stage qwen1.5b 110 python cli.py bench --shape qwen2.5-1.5b --out "$OUT/shape_qwen1.5b.json"
stage llama1b 100 python cli.py bench --shape llama-3.2-1b --out "$OUT/shape_llama1b.json"
stage peer0.5b 140 env PYTHONPATH=/root/stage/peer python benchmarks/peer_mlx_lm_lora.py --shape qwen2.5-0.5b --steps 3
grep '^===' "$log"
