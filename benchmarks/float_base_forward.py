"""One forward pass of a quantized model on MLX's CPU backend: kept quantized vs its float32 base.

    python benchmarks/float_base_forward.py [--shape qwen2.5-0.5b] [--bits 4] [--rows 1] [--tokens 32]

(it restarts itself with the fast BLAS the CLI uses, as docs/performance.md's "OpenBLAS on
Linux" says). Times are the median of 2 passes after a warm-up; the logits of both
are compared.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import common
import mlx.core as mx
import numpy as np


def timed(model, x, reps: int = 2) -> float:
    mx.eval(model(x))  # warm-up
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        mx.eval(model(x))
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    common.fast_blas()
    ap = argparse.ArgumentParser()
    common.shape_args(ap, bits=4, prompts=..., group=..., max_tokens=..., shape_help="a release's shape (shapes.py)")
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=32)
    a = ap.parse_args()
    from mlx_grpo.config import ModelConfig
    from mlx_grpo.float_base import to_float32
    from mlx_grpo.models import load_model
    from mlx_grpo.shapes import shape_dir

    model, _ = load_model(ModelConfig(path=str(shape_dir(a.shape, a.bits)), float_base=False))
    x = mx.array(np.random.default_rng(0).integers(0, 1000, (a.rows, a.tokens)), dtype=mx.int32)
    quantized = timed(model, x)
    ref = np.array(model(x).astype(mx.float32))
    to_float32(model)
    dense = timed(model, x)
    diff = float(np.abs(np.array(model(x)) - ref).max())
    print(json.dumps({"shape": a.shape, "bits": a.bits, "rows": a.rows, "tokens": a.tokens,
                      "quantized_s": quantized, "float32_base_s": dense, "speedup": quantized / dense,
                      "max_abs_logit_diff": diff}))


if __name__ == "__main__":
    main()
