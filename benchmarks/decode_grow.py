"""What the decoder's handling of its key/value buffers buys, rollout against rollout.

Not part of the test suite. One rollout per variant, alternated, on a release's shape with random
weights (no row stops early), each row its own key; tokens must be identical:

- ``--compare grow`` (default): buffers grown by ``decode.GROW``-slot blocks against one buffer as
  large as the rollout (the decoder before blocks);
- ``--compare in-place``: the step writing its slot into the buffers in place against the same step
  while something else still holds the old buffers (the decoder before it let go of them: MLX
  then copies every layer's buffer each step).

    python benchmarks/decode_grow.py [--compare grow|in-place] [--shape qwen2.5-0.5b] [--bits 0]
        [-P 2] [-G 4] [--max-tokens 512] [--reps 1]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
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
    ap.add_argument("--compare", choices=("grow", "in-place"), default="grow")
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
    default, step = decode.GROW, decode.StaticDecoder.step

    def holding(self, y):  # the old buffers stay referenced while the step evaluates
        held = list(self.kv)  # noqa: F841
        return step(self, y)

    if a.compare == "grow":
        names = (f"blocks of {default} slots", "one buffer")
        setups = (lambda: setattr(decode, "GROW", default), lambda: setattr(decode, "GROW", 1 << 30))
    else:
        names = ("in place", "copied each step")
        setups = (lambda: setattr(decode.StaticDecoder, "step", step),
                  lambda: setattr(decode.StaticDecoder, "step", holding))
    warm = replace(sess.cfg.rollout, max_tokens=8)  # first touches of the weights, untimed
    mx.eval(sample_groups(sess.model, sess.tokenizer, prompts, warm, keys=keys).tokens)
    times, tokens = {}, {}
    for rep in range(a.reps):
        for name, setup in zip(names, setups):
            setup()
            t = time.perf_counter()
            r = sample_groups(sess.model, sess.tokenizer, prompts, sess.cfg.rollout, keys=keys)
            mx.eval(r.tokens)
            times.setdefault(name, []).append(time.perf_counter() - t)
            tokens[name] = np.array(r.tokens)
            say(f"{name}: {times[name][-1]:.1f} s")
    setups[0]()
    new, old = names
    same = bool((tokens[new] == tokens[old]).all())
    print(f"{a.shape} {a.bits or 32}-bit, {a.P * a.G} rows x {a.max_tokens} tokens, {blas.describe(dict(os.environ))}")
    print(f"rollout: {new} {min(times[new]):.1f} s, {old} {min(times[old]):.1f} s: "
          f"{min(times[old]) / min(times[new]):.2f}x (best of {a.reps}); tokens identical: {same}")


if __name__ == "__main__":
    main()
