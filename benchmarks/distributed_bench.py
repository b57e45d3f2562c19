"""Steps per second of the same training run with 1 process and with N processes (mlx.launch).

    python cli.py bench --processes 2                    # part of the bench (embedded model)
    python benchmarks/distributed_bench.py -n 2 --steps 12 --set rollout.max_tokens=40
    python benchmarks/distributed_bench.py --model PATH -- --hostfile hosts.json   # across machines

A command-line front end to ``mlx_grpo.bench.distributed_throughput`` for settings the bench does
not expose (steps, any --set, extra mlx.launch arguments such as a hostfile).
"""

from __future__ import annotations

import argparse
import json

import common  # noqa: F401  (the repository on sys.path)
from mlx_grpo.bench import distributed_throughput


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--processes", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--model", default=None)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true", help="Print one JSON object.")
    p.add_argument("launcher", nargs="*", help="after --: extra mlx.launch arguments (e.g. --hostfile)")
    a = p.parse_args()
    extra = [x for s in a.sets for x in ("--set", s)]
    result = distributed_throughput(a.processes, a.steps, a.model, extra, a.launcher)
    if a.json:
        print(json.dumps(result))
        return
    print(f"{'processes':>9} {'steps/s':>8} {'s/step':>7} {'tok/s':>8} {'wall s':>7}")
    for r in result["runs"]:
        print(f"{r['processes']:>9} {r['steps_per_s']:>8.2f} {r['step_time_s']:>7.3f} "
              f"{r['tokens_per_s']:>8.0f} {r['wall_s']:>7.1f}")
    print(f"(medians over steps 2..{a.steps})")
    print(f"{a.processes} processes / 1 process: {result['speedup_steps_per_s']:.2f}x steps/s")


if __name__ == "__main__":
    main()
