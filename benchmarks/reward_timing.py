"""Each built-in reward on a 1 MB completion of every degenerate shape (the goal: under 50 ms
each, so that rewards never stall training). Not part of the test suite; the tests check linear
growth instead.

    python benchmarks/reward_timing.py [--size 1000000] [--repeats 3] [--json]

Prints milliseconds per reward and shape (the fastest of ``--repeats`` runs), and each reward's
worst shape.
"""

from __future__ import annotations

import argparse
import json

import common  # noqa: F401  (the repository on sys.path)
from mlx_grpo.rewards import BUILTIN
from mlx_grpo.rewards.adversarial import timings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=1_000_000, help="characters per completion")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    table = timings(BUILTIN, args.size, args.repeats)
    if args.json:
        print(json.dumps({"size": args.size, "ms": {s: {r: round(t * 1e3, 2) for r, t in row.items()}
                                                     for s, row in table.items()}}))
        return
    names = list(BUILTIN)
    print(f"ms per completion of {args.size} chars (fastest of {args.repeats})")
    print(f"{'shape':42}" + "".join(f"{n[:9]:>10}" for n in names))
    for shape, row in table.items():
        print(f"{shape[:41]:42}" + "".join(f"{row[n] * 1e3:10.1f}" for n in names))
    worst = {n: max(table, key=lambda s: table[s][n]) for n in names}
    print(f"{'worst':42}" + "".join(f"{table[worst[n]][n] * 1e3:10.1f}" for n in names))
    for n in names:
        print(f"  {n}: worst shape {worst[n]!r}")


if __name__ == "__main__":
    main()
