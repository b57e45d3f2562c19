"""What ``fastmath.py`` buys on MLX's CPU backend: per element, and a whole GRPO step at a shape.

Not part of the test suite. First mlx-lm's ``silu(gate) * x`` and its gradient against fastmath's
``swiglu``, per element; then GRPO steps on a release's shape (float32 by default, P=2 x
G=4 x 64 new tokens, beta 0.1, every completion to the limit) with fastmath on and off,
alternating in one process (off = mlx-lm's ``nn.silu``, as the trainer ran before), after a warm-up step of each:

    python benchmarks/fastmath_step.py [--shape qwen2.5-0.5b] [--bits 0] [-P 2] [-G 4]
        [--max-tokens 64] [--pairs 2] [--json]

The ratios (off / on, in one run) are what to read; the machine's load moves the seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@contextlib.contextmanager
def fastmath_off() -> Iterator[None]:
    """Every fastmath function falls back to MLX's own ops (as on Metal and CUDA)."""
    from mlx_grpo import fastmath

    saved = fastmath.on_cpu
    fastmath.on_cpu = lambda: False
    try:
        yield
    finally:
        fastmath.on_cpu = saved


def per_element() -> Dict[str, float]:
    import mlx.core as mx
    import mlx.nn as nn

    from mlx_grpo import fastmath

    def ns(fn: Callable, *args: Any, reps: int = 5) -> float:
        mx.eval(fn(*args))
        out = []
        for _ in range(reps):
            t = time.perf_counter()
            mx.eval(fn(*args))
            out.append(time.perf_counter() - t)
        return statistics.median(out) / args[0].size * 1e9

    g, x = mx.random.normal((512, 4864)) * 3, mx.random.normal((512, 4864))  # one MLP's 512 positions
    grad_stock = mx.grad(lambda a, b: (nn.silu(a) * b).sum(), argnums=(0, 1))
    grad_fast = mx.grad(lambda a, b: fastmath.swiglu(a, b).sum(), argnums=(0, 1))
    return {
        "exp_mlx_ns": ns(mx.exp, g),
        "swiglu_mlx_ns": ns(lambda a, b: nn.silu(a) * b, g, x), "swiglu_fastmath_ns": ns(fastmath.swiglu, g, x),
        "swiglu_grad_mlx_ns": ns(grad_stock, g, x), "swiglu_grad_fastmath_ns": ns(grad_fast, g, x),
    }


def main() -> None:
    import os

    from mlx_grpo import blas

    blas.maybe_reexec([str(Path(__file__).resolve()), *sys.argv[1:]], dict(os.environ))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="qwen2.5-0.5b")
    ap.add_argument("--bits", type=int, default=0, choices=[0, 4, 8])
    ap.add_argument("-P", type=int, default=2)
    ap.add_argument("-G", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--pairs", type=int, default=2, help="off/on step pairs after the warm-ups")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    from mlx_grpo.bench import step_split
    from mlx_grpo.bench_shape import shape_session

    say = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    res: Dict[str, Any] = {"per_element": per_element()}
    say(f"per element: {res['per_element']}")
    sess = shape_session(a.shape, a.bits, a.P, a.G, a.max_tokens, say, beta=a.beta)
    runs: Dict[str, list] = {"off": [], "on": []}
    for i in range(a.pairs + 1):  # the first pair warms both up (traces, kernels, allocator)
        for name in ("off", "on"):
            with fastmath_off() if name == "off" else contextlib.nullcontext():
                m = sess.grpo_steps(1, warmup=False)[0]
            say(f"{'warm-up ' if i == 0 else ''}fastmath {name}: step {m['step_time']:.1f} s "
                f"(generate {m['time_generate']:.1f}, score {m['time_score']:.1f}, update {m['time_update']:.1f})")
            if i:
                runs[name].append(m)
    res["settings"] = {"shape": a.shape, "bits": a.bits, "P": a.P, "G": a.G, "max_tokens": a.max_tokens, "beta": a.beta}
    res["off"], res["on"] = step_split(runs["off"]), step_split(runs["on"])
    res["ratio_off_over_on"] = {k: res["off"][k] / max(res["on"][k], 1e-9)
                                for k in ("generate", "score", "update", "step_time")}
    if a.json:
        print(json.dumps(res))
        return
    pe = res["per_element"]
    print(f"shape {a.shape} ({'float32' if a.bits == 0 else str(a.bits) + '-bit'} on disk), P={a.P} x G={a.G}, "
          f"{a.max_tokens} new tokens, beta {a.beta}; medians of {a.pairs} steps each\n")
    print(f"MLX's exp: {pe['exp_mlx_ns']:.2f} ns per element\n")
    print("| per element (ns) | MLX | fastmath |\n|---|---|---|")
    for k, label in (("swiglu", "silu(gate) * x"), ("swiglu_grad", "its gradient")):
        print(f"| {label} | {pe[k + '_mlx_ns']:.2f} | {pe[k + '_fastmath_ns']:.2f} |")
    print("\n| GRPO step (s) | generate | score | update | step |\n|---|---|---|---|---|")
    for name in ("off", "on"):
        s = res[name]
        print(f"| fastmath {name} | {s['generate']:.1f} | {s['score']:.1f} | {s['update']:.1f} | {s['step_time']:.1f} |")
    r = res["ratio_off_over_on"]
    print(f"| **off / on** | {r['generate']:.2f}x | {r['score']:.2f}x | {r['update']:.2f}x | **{r['step_time']:.2f}x** |")


if __name__ == "__main__":
    main()
