"""One GRPO step with long completions at a release's shape: does it fit, and does decoding stay flat?

Not part of the test suite. On the float32 Qwen2.5-0.5B shape (random
weights, so no completion stops before ``--max-tokens``), P=1 prompt x G=4 completions of 1024
tokens: one GRPO step (beta > 0, so the reference pass is included), with the time of every decode
step of its own rollout recorded. Reports the step's split, decode time per token over the first
and the last tenth of the rollout (the goal: the end within 1.5x of the start, i.e. the cost per
token does not grow with the cache), the peak memory measured two ways and the preflight estimate:

    python benchmarks/long_completions.py [--shape qwen2.5-0.5b] [--bits 0] [-P 1] [-G 4]
        [--max-tokens 1024] [--beta 0.1] [--json] [--out FILE]

Times depend on the machine and its load; the ratios (end / start, estimate / measured) are what
to compare.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List

import common


def measure(shape: str, bits: int, P: int, G: int, max_tokens: int, beta: float) -> Dict[str, Any]:
    from mlx_grpo.bench_shape import decode_clock, per_token, shape_session, step_memory

    say = common.say
    sess = shape_session(shape, bits, P, G, max_tokens, say)
    say(f"one GRPO step, P={P} x G={G} x {max_tokens} tokens, beta {beta} ...")
    times: List[float] = []
    with decode_clock(times):
        step = step_memory(sess, beta)
    step.pop("estimate", None)
    return {"shape": shape, "bits": bits, "P": P, "G": G, "max_tokens": max_tokens, "beta": beta,
            "decode_steps": len(times), "decode_per_token": per_token(times), "step": step}


def table(r: Dict[str, Any]) -> str:
    d, st = r["decode_per_token"], r["step"]
    gb = 1e9
    return "\n".join([
        f"shape {r['shape']} ({'float32' if r['bits'] == 0 else str(r['bits']) + '-bit'} on disk), "
        f"P={r['P']} x G={r['G']}, {r['max_tokens']} new tokens, beta {r['beta']}",
        "",
        "| measurement | value |",
        "|---|---|",
        f"| completion tokens in the step | {st['tokens']} |",
        f"| decode time per token, first / last tenth | {d['start_s'] * 1e3:.1f} / {d['end_s'] * 1e3:.1f} ms "
        f"(**{d['ratio']:.2f}x**) |",
        f"| step: generate / reward / score / update | {st['generate']:.1f} / {st['reward']:.3f} / "
        f"{st['score']:.1f} / {st['update']:.1f} s (total {st['step_time']:.1f} s) |",
        f"| peak memory: mx.get_peak_memory / process / preflight estimate | {st['mlx_peak_bytes'] / gb:.2f} / "
        f"{(st['process_peak_bytes'] or 0) / gb:.2f} / {st['estimate_bytes'] / gb:.2f} GB "
        f"(estimate / MLX peak {st['estimate_over_mlx_peak']:.2f}) |",
    ])


def main() -> None:
    common.fast_blas()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.shape_args(ap, prompts=1, max_tokens=1024)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", help="also write the JSON result here")
    a = ap.parse_args()
    res = measure(a.shape, a.bits, a.P, a.G, a.max_tokens, a.beta)
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res) if a.json else table(res))


if __name__ == "__main__":
    main()
