"""Steps per second of the same training run with 1 process and with N processes (mlx.launch).

    python benchmarks/distributed_bench.py                 # embedded model, 1 vs 2 processes
    python benchmarks/distributed_bench.py -n 2 --steps 12 --set rollout.max_tokens=40
    python benchmarks/distributed_bench.py --model PATH -- --hostfile hosts.json   # across machines

Both runs use the same config, seed and global batch (train.prompts_per_step), so they do the
same work; the N-process run splits every step's prompts between its processes. A step's time is
``step_time`` from rank 0's metrics.jsonl (rollouts, rewards, scoring, the update and the
exchanges between processes); the first step is a warm-up and is left out. Wall time includes
start-up and the held-out evaluation at the start and end (kept to one prompt). Nothing is
asserted: the numbers depend on the machine and its load, and on one machine the processes share
its cores (each gets cores / N BLAS threads), so N processes are faster only where one process
leaves cores or memory bandwidth idle.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()"]


def run(processes: int, out: Path, args: list, launcher: list) -> dict:
    """One training run; returns its per-step times, tokens and wall time."""
    train = [sys.executable, str(ROOT / "cli.py"), "train", "--output", str(out), "--no-progress", *args]
    if processes > 1:
        cmd = LAUNCH + ["-n", str(processes), "--backend", "ring", *launcher, "--", *train]
    else:
        cmd = train
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    metrics = out / "metrics.jsonl"
    if r.returncode or not metrics.exists() or "error:" in r.stderr:
        sys.exit(f"{processes}-process run failed:\n{r.stderr[-2000:]}")
    lines = [json.loads(x) for x in metrics.read_text().splitlines()]
    steps = [m for m in lines if m["kind"] == "train"]
    # The loop's whole time (every step with its logging, exchanges and the final checkpoint),
    # without the held-out evaluations.
    loop = json.loads((out / "summary.json").read_text())["seconds"] - sum(m["time"] for m in lines if m["kind"] == "eval")
    timed = steps[1:] or steps
    step_time = statistics.median(m["step_time"] for m in timed)
    return {
        "processes": processes,
        "steps": len(steps),
        "step_time_s": step_time,
        "steps_per_s": 1.0 / step_time,
        "loop_steps_per_s": len(steps) / loop,
        "tokens_per_s": statistics.median(m["tokens"] / m["step_time"] for m in timed),
        "wall_s": wall,
        "reward_last": steps[-1]["reward_mean"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--processes", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--model", default=None)
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true", help="Print one JSON object.")
    p.add_argument("launcher", nargs="*", help="after --: extra mlx.launch arguments (e.g. --hostfile)")
    a = p.parse_args()
    args = ["--steps", str(a.steps), "--seed", "0", "--set", "output.eval_size=1", "--set", "output.save_every=0"]
    if a.model:
        args += ["--model", a.model]
    for s in a.sets:
        args += ["--set", s]
    with tempfile.TemporaryDirectory() as tmp:
        one = run(1, Path(tmp) / "one", args, a.launcher)
        many = run(a.processes, Path(tmp) / "many", args, a.launcher)
    result = {"runs": [one, many], "speedup_steps_per_s": many["steps_per_s"] / one["steps_per_s"]}
    if a.json:
        print(json.dumps(result))
        return
    print(f"{'processes':>9} {'steps/s':>8} {'s/step':>7} {'tok/s':>8} {'loop steps/s':>12} {'wall s':>7}")
    for r in result["runs"]:
        print(f"{r['processes']:>9} {r['steps_per_s']:>8.2f} {r['step_time_s']:>7.3f} {r['tokens_per_s']:>8.0f} "
              f"{r['loop_steps_per_s']:>12.2f} {r['wall_s']:>7.1f}")
    print(f"(steps/s, s/step, tok/s: medians over steps 2..{a.steps}; loop steps/s: all steps, evaluation excluded)")
    print(f"{a.processes} processes / 1 process: {result['speedup_steps_per_s']:.2f}x steps/s")


if __name__ == "__main__":
    main()
