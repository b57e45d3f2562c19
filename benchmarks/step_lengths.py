"""GRPO steps whose completion length changes from step to step: does a new length cost more?

Not part of the test suite. In training the completions' length changes every step, so every
shape the score and update passes see is new; a backend that compiles kernels per shape (MLX's
CUDA build compiles with NVRTC on first use) would pay that again and again. One process, one
shape (a release's layer sizes, fewer layers: the kernels are the same in every layer), steps at
the lengths given, each step's split printed as it finishes:

    python benchmarks/step_lengths.py [--shape qwen2.5-0.5b] [--layers 4] [--bits 4]
        [--lengths 64,64,80,80,96,64] [--beta 0.1] [-P 2] [-G 4]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import common


def main() -> None:
    ap = argparse.ArgumentParser()
    common.shape_args(ap, bits=4, max_tokens=..., shape_help="a release's shape (shapes.py)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--lengths", default="64,64,80,80,96,64")
    ap.add_argument("--beta", type=float, default=0.1)
    a = ap.parse_args()
    common.fast_blas()
    from mlx_grpo.bench_shape import shape_session
    from mlx_grpo.shapes import shape_dir

    say = lambda s: print(s, flush=True)  # noqa: E731
    lengths = [int(x) for x in a.lengths.split(",")]
    t = time.perf_counter()
    path = shape_dir(a.shape, a.bits, layers=a.layers)
    sess = shape_session(str(path), a.bits, a.P, a.G, lengths[0], say, beta=a.beta)
    say(f"{a.shape} x {a.layers} layers, {a.bits or 32}-bit, built/loaded in {time.perf_counter() - t:.1f} s; "
        f"P={a.P} x G={a.G}, beta {a.beta}")
    say("| step | new tokens | generate | score | update | total (s) |\n|---|---|---|---|---|---|")
    base = sess.cfg
    for i, n in enumerate(lengths):
        sess.cfg = replace(base, rollout=replace(base.rollout, max_tokens=n))
        m = sess.grpo_steps(1, beta=a.beta, warmup=False)[0]
        say(f"| {i} | {n} | {m['time_generate']:.2f} | {m['time_score']:.2f} | {m['time_update']:.2f} | "
            f"{m['step_time']:.2f} |")


if __name__ == "__main__":
    main()
