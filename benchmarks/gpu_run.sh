#!/usr/bin/env bash
# The GPU check of `cli.py bench` (first run on an H100), on a lent NVIDIA GPU machine with no
# package index: when mlx does not import there, .device/part2/install.sh (git-ignored, staged with
# MLX's CUDA build for that machine) installs it. It runs in the repository root wherever it is
# started from. Everything it measures lands in $OUT (default: tmp/gpu-out in the repository,
# git-ignored). QUICK=1: tiny bench and tests only.
set -u
root=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$root/tmp/gpu-out}; mkdir -p "$OUT"; OUT=$(cd "$OUT" && pwd)
cd "$root"
# No package index there: run from the checkout (cli.py imports mlx_grpo from here), no pip install -e.
python -c "import mlx.core" 2>/dev/null || bash .device/part2/install.sh > "$OUT/install.log" 2>&1 || { tail -20 "$OUT/install.log"; exit 1; }
python -c "import mlx.core as mx, mlx_lm; print('mlx', mx.__version__, 'mlx-lm', mlx_lm.__version__, mx.default_device())" | tee "$OUT/device.txt"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >> "$OUT/device.txt" 2>&1
timeout 150 python cli.py bench --out "$OUT/bench_tiny.json" > "$OUT/bench_tiny.txt" 2>&1; echo "bench tiny rc=$?"
[ -n "${QUICK:-}" ] || timeout 200 python cli.py bench --large --out "$OUT/bench_large.json" > "$OUT/bench_large.txt" 2>&1; echo "bench large rc=$?"
timeout 120 python -m pytest -q -p no:cacheprovider tests/test_rollout.py tests/test_logprobs.py tests/test_prefill.py tests/test_trainer.py > "$OUT/pytest.txt" 2>&1; echo "pytest rc=$?"
[ -n "${QUICK:-}" ] || timeout 90 python cli.py train --steps 40 --no-progress --output "$(mktemp -d)/r40" > "$OUT/train40.txt" 2>&1; echo "train rc=$?"
tail -3 "$OUT/pytest.txt"; tail -25 "$OUT/bench_tiny.txt"; tail -25 "$OUT/bench_large.txt" "$OUT/train40.txt" 2>/dev/null
