"""What queueing each decode step ahead of reading the last token back buys (``rollout.PIPELINE``).

Not part of the test suite. The embedded model's rollouts (its arithmetic prompts, temperature 1,
each row its own key as in training), with the pipeline on and off, alternated in one process;
the tokens must be identical (per-row keys), the time is what changes:

    python benchmarks/decode_pipeline.py [--rows 16,128] [--max-tokens 32] [--reps 5] [--model PATH]
"""

from __future__ import annotations

import argparse
import statistics
import time

import common


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="16,128", help="P*G rows per rollout (G=8 above 8 rows, else G=rows)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--model", default=None, help="default: the embedded model")
    a = ap.parse_args()

    common.fast_blas()
    import mlx.core as mx
    import numpy as np

    from mlx_grpo import rollout
    from mlx_grpo.bench import BenchSettings, Session, bench_config

    print(common.blas_line(), flush=True)
    for rows in [int(r) for r in a.rows.split(",")]:
        G = 8 if rows > 8 else rows
        cfg = bench_config(None, a.model, BenchSettings(prompts=rows // G, group_size=G, max_tokens=a.max_tokens))
        sess = Session(cfg)
        prompts = sess.prompts[: rows // G]
        keys = mx.random.split(mx.random.key(0), rows)
        times = {True: [], False: []}
        out = {}
        for rep in range(a.reps + 1):
            for on in (True, False):
                rollout.PIPELINE = on
                t = time.perf_counter()
                r = rollout.sample_groups(sess.model, sess.tokenizer, prompts, cfg.rollout, keys=keys)
                mx.eval(r.tokens)
                if rep:  # the first round warms both up
                    times[on].append(time.perf_counter() - t)
                out[on] = np.array(r.tokens)
        rollout.PIPELINE = True
        same = out[True].shape == out[False].shape and bool((out[True] == out[False]).all())
        on, off = statistics.median(times[True]), statistics.median(times[False])
        print(f"{rows} rows x {a.max_tokens} tokens: pipelined {on * 1000:.1f} ms, not {off * 1000:.1f} ms "
              f"per rollout (medians of {a.reps}): {off / on:.2f}x; tokens identical: {same}", flush=True)


if __name__ == "__main__":
    main()
