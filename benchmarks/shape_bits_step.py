"""A GRPO step on a release's shape stored in 4 bits against the same shape stored in float32.

Not part of the test suite. On MLX's CPU backend the 4-bit model's frozen base is rebuilt in
float32 at load (``model.float_base``, ``float_base.py``), so its step should cost what the float32
model's does (the goal: within 1.5x). Both run in one process, one model in memory at a
time, each step after a warm-up step, in the order float32, 4-bit, float32 (load drift shows as a
difference between the two float32 figures):

    python benchmarks/shape_bits_step.py [--shape qwen2.5-0.5b] [-P 2] [-G 4] [--max-tokens 64] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json

import common


def step(shape: str, bits: int, P: int, G: int, max_tokens: int) -> dict:
    from mlx_grpo.bench import step_split
    from mlx_grpo.bench_shape import shape_session

    sess = shape_session(shape, bits, P, G, max_tokens, say=common.say)
    out = step_split(sess.grpo_steps(1))
    del sess
    gc.collect()
    return out


def main() -> None:
    common.fast_blas()
    ap = argparse.ArgumentParser()
    common.shape_args(ap, bits=..., shape_help="a release's shape (shapes.py)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    runs = [(bits, step(a.shape, bits, a.P, a.G, a.max_tokens)) for bits in (0, 4, 0)]
    fp32 = min(r["step_time"] for b, r in runs if b == 0)
    res = {"shape": a.shape, "P": a.P, "G": a.G, "max_tokens": a.max_tokens,
           "runs": [{"bits": b, **r} for b, r in runs],
           "ratio_4bit_over_float32": runs[1][1]["step_time"] / fp32}
    if a.json:
        print(json.dumps(res))
        return
    print("| weights on disk | generate / reward / score / update (s) | step (s) |\n|---|---|---|")
    for b, r in runs:
        print(f"| {'float32' if b == 0 else f'{b}-bit'} | {r['generate']:.1f} / {r['reward']:.3f} / "
              f"{r['score']:.1f} / {r['update']:.1f} | {r['step_time']:.1f} |")
    print(f"| **4-bit / float32 (the faster float32 run)** | | **{res['ratio_4bit_over_float32']:.2f}x** |")


if __name__ == "__main__":
    main()
