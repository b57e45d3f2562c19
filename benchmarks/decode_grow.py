"""What growing the decode buffer by blocks buys against one buffer for the whole rollout.

Not part of the test suite. One rollout per setting of ``decode.GROW`` (the default block, then
one block as large as the rollout: the decoder before blocks), alternated, on a release's shape
with random weights (no row stops early), each row its own key; tokens must be identical:

    python benchmarks/decode_grow.py [--shape qwen2.5-0.5b] [--bits 0] [-P 2] [-G 4] [--max-tokens 512] [--reps 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen2.5-0.5b")
    ap.add_argument("--bits", type=int, default=0, choices=[0, 4, 8])
    ap.add_argument("-P", type=int, default=2)
    ap.add_argument("-G", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--reps", type=int, default=1)
    a = ap.parse_args()

    from mlx_grpo import blas

    blas.maybe_reexec(sys.argv, dict(os.environ))
    import mlx.core as mx
    import numpy as np

    from mlx_grpo import decode
    from mlx_grpo.bench_shape import shape_session
    from mlx_grpo.rollout import row_keys, sample_groups

    say = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    sess = shape_session(a.shape, a.bits, a.P, a.G, a.max_tokens, say)
    prompts = sess.prompts[: a.P]
    keys = row_keys(mx.random.key(0), a.P, a.G)
    default = decode.GROW
    times, tokens = {}, {}
    for rep in range(a.reps):
        for grow in (default, 1 << 30):
            decode.GROW = grow
            t = time.perf_counter()
            r = sample_groups(sess.model, sess.tokenizer, prompts, sess.cfg.rollout, keys=keys)
            mx.eval(r.tokens)
            times.setdefault(grow, []).append(time.perf_counter() - t)
            tokens[grow] = np.array(r.tokens)
            say(f"GROW={grow}: {times[grow][-1]:.1f} s")
    decode.GROW = default
    same = bool((tokens[default] == tokens[1 << 30]).all())
    blocks, whole = min(times[default]), min(times[1 << 30])
    print(f"{a.shape} {a.bits or 32}-bit, {a.P * a.G} rows x {a.max_tokens} tokens, {blas.describe(dict(os.environ))}")
    print(f"rollout: blocks of {default} slots {blocks:.1f} s, one buffer {whole:.1f} s: {whole / blocks:.2f}x "
          f"(best of {a.reps}); tokens identical: {same}")


if __name__ == "__main__":
    main()
