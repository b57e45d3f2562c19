"""GRPO learns: a short seeded run of the embedded default raises the reward and the held-out
format rate clearly above where they start (no wall-clock assertion)."""

import json

import numpy as np

from conftest import run_cli


def test_short_default_run_learns(embedded_model_dir, tmp_path):
    out = tmp_path / "learn"
    r = run_cli("train", "--output", str(out), "--steps", "30", "--seed", "0", "--no-progress",
                "--set", "output.eval_size=100")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train = [l for l in lines if l["kind"] == "train"]
    evals = [l for l in lines if l["kind"] == "eval"]
    first = np.mean([s["reward_mean"] for s in train[:5]])
    last = np.mean([s["reward_mean"] for s in train[-5:]])
    assert last > first + 0.3, (first, last)
    assert evals[-1]["format_rate"] > evals[0]["format_rate"] + 0.3, evals
    assert "held-out, before -> after" in r.stdout
