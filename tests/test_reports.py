"""Seeing what training does: pass@k, eval, generate, plot, runs and the metrics schema."""

from __future__ import annotations

import itertools
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, run_cli
from mlx_grpo.evaluate import pass_at_k, pass_rates


@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (5, 2, 1), (5, 2, 2), (5, 2, 4), (6, 0, 3),
                                   (6, 6, 3), (8, 3, 8), (7, 5, 3)])
def test_pass_at_k_is_the_chance_a_random_k_subset_has_a_correct_one(n, c, k):
    # Closed form by enumeration: of all k-subsets of n samples (c correct), the share with >= 1.
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    exact = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    if k == 1:
        assert pass_at_k(n, c, 1) == pytest.approx(c / n)


def test_pass_at_k_needs_k_samples():
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def numpy_pass_at_k(n: int, c: int, k: int) -> float:
    """Chen et al. (2021)'s numerically stable NumPy form: 1 - prod_{i=n-c+1..n} (1 - k / i)."""
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


@pytest.mark.parametrize("correct,k", [
    ([1, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0], 4),
    ([0] * 8 + [1] * 8 + [1, 0, 1, 0, 0, 0, 0, 0], 8),
    ([1, 0, 1], 3),
])
def test_pass_rates_match_the_unbiased_estimator_in_numpy(correct, k):
    per_prompt = np.array(correct).reshape(-1, k).sum(axis=1)
    got = pass_rates([bool(x) for x in correct], k)
    assert got["pass_at_1"] == pytest.approx(np.mean(per_prompt / k))
    assert got["pass_at_k"] == pytest.approx(np.mean([numpy_pass_at_k(k, int(c), k) for c in per_prompt]))
    for kk in range(1, k + 1):  # the estimator itself, every k, against the NumPy form
        for c in range(k + 1):
            assert pass_at_k(k, c, kk) == pytest.approx(numpy_pass_at_k(k, c, kk), abs=1e-12)


@pytest.fixture(scope="module")
def trained_run(small_model_dir, tmp_path_factory):
    """A short real run with in-training evaluation every 2 steps, pass@k and TensorBoard."""
    out = tmp_path_factory.mktemp("reports") / "runs" / "a"
    r = run_cli("train", "--model", str(small_model_dir), "--output", str(out), "--steps", "4",
                "--batch-size", "2", "-G", "4", "--max-tokens", "8", "--no-progress",
                "--set", "output.eval_size=6", "--set", "output.eval_every=2",
                "--set", "output.eval_samples=3", "--set", "data.max_operand=9",
                "--set", "data.eval_size=20", "--set", "output.log_to=[tensorboard]")
    assert r.returncode == 0, r.stderr
    return out, r


def _documented_keys(table_header: str) -> set:
    """First-column keys of the docs/runs.md table that starts with ``table_header``."""
    text = (ROOT / "docs" / "runs.md").read_text()
    table = text[text.index(table_header):].split("\n\n")[0]
    keys = set()
    for line in table.splitlines()[2:]:
        keys |= set(re.findall(r"`([^`]+)`", line.split("|")[1]))
    return keys


def _matches(key: str, documented: set) -> bool:
    return key in documented or (key.startswith("rewards/") and "rewards/<name>" in documented)


def test_metrics_schema_is_what_the_readme_documents(trained_run):
    out, _ = trained_run
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    for kind, header in (("train", "| train key |"), ("eval", "| eval key |")):
        documented = _documented_keys(header)
        recs = [r for r in records if r["kind"] == kind]
        written = set().union(*recs)
        undocumented = [k for k in written if not _matches(k, documented)]
        assert not undocumented, f"{kind} keys missing from docs/runs.md: {undocumented}"
        missing = [d for d in documented if d != "rewards/<name>" and d not in written]
        assert not missing, f"documented {kind} keys never written: {missing}"
        for r in recs:  # every record is complete, not just the union
            assert all(_matches(k, documented) for k in r) and len(r) == len(recs[0])
    train = [r for r in records if r["kind"] == "train"]
    assert all(r["entropy"] > 0 for r in train)  # sampled at T=1: never a point mass here
    evals = [r for r in records if r["kind"] == "eval"]
    assert [e["step"] for e in evals] == [0, 2, 4]
    for e in evals:
        assert e["k"] == 3 and 0 <= e["pass_at_1"] <= e["pass_at_k"] <= 1
        assert e["n"] == 6 and 0 <= e["accuracy"] <= e["format_rate"] <= 1
    samples = [json.loads(l) for l in (out / "samples.jsonl").read_text().splitlines()]
    assert {"step", "prompt", "completion", "answer", "reward", "rewards", "advantage"} <= set(samples[0])
    assert set(samples[0]["rewards"]) == {"accuracy", "format"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokens"] == sum(r["tokens"] for r in train)
    assert summary["eval_end"]["step"] == 4


def _tensorboard_scalars(logdir: Path) -> dict:
    """{tag: [steps]} from TensorBoard event files (TFRecord framing, tensorboardX's protobufs)."""
    from tensorboardX.proto.event_pb2 import Event

    found: dict = {}
    for f in logdir.glob("events.out.tfevents.*"):
        data, pos = f.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                found.setdefault(v.tag, []).append(event.step)
    return found


def test_tensorboard_events_are_written(trained_run):
    out, _ = trained_run
    tags = _tensorboard_scalars(out / "tensorboard")
    assert tags["train/reward_mean"] == [1, 2, 3, 4]
    assert tags["eval/accuracy"] == [0, 2, 4]
    assert "train/kl" in tags and "eval/pass_at_k" in tags


def test_eval_with_and_without_the_trained_adapter(trained_run, small_model_dir):
    out, _ = trained_run
    base = run_cli("eval", "--model", str(small_model_dir), "--set", "data.max_operand=9",
                   "--set", "data.eval_size=20", "--n", "6", "--max-tokens", "8", "--json")
    assert base.returncode == 0, base.stderr
    b = json.loads(base.stdout.splitlines()[-1])
    r = run_cli("eval", "--run", str(out), "--n", "6", "--samples", "4", "--compare-base", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.splitlines()[-1])
    for key in ("n", "accuracy", "lenient_accuracy", "format_rate", "pass_at_k", "reward_mean", "mean_length"):
        assert key in res, key
    assert res["n"] == 6 and res["k"] == 4 and 0 <= res["pass_at_1"] <= res["pass_at_k"] <= 1
    assert 0 <= res["lenient_pass_at_1"] <= res["lenient_pass_at_k"] <= 1
    # The base half of --compare-base (adapters switched off) is the base model evaluated alone.
    for key in ("accuracy", "lenient_accuracy", "format_rate", "mean_length", "reward_mean"):
        assert res["base"][key] == pytest.approx(b[key]), key
    # The adapter changed the greedy completions: the in-run final eval says what it scores.
    final = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert res["accuracy"] == pytest.approx(final["accuracy"]) and res["mean_length"] == pytest.approx(final["mean_length"])
    table = run_cli("eval", "--run", str(out), "--n", "6", "--compare-base")
    assert table.returncode == 0 and "change" in table.stdout and "accuracy" in table.stdout


def _png_size(path: Path) -> tuple:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_plot_writes_a_png_of_the_expected_size(trained_run, tmp_path):
    from mlx_grpo.plot import DPI, FIGSIZE

    out, _ = trained_run
    r = run_cli("plot", str(out))
    assert r.returncode == 0, r.stderr
    assert _png_size(out / "curves.png") == (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))
    two = tmp_path / "cmp.png"
    r = run_cli("plot", str(out), str(out), "--out", str(two))
    assert r.returncode == 0, r.stderr
    assert _png_size(two) == (1600, 800)
    bad = run_cli("plot", str(tmp_path / "nothing"))
    assert bad.returncode == 2 and "not a run directory" in bad.stderr and "Traceback" not in bad.stderr


def test_runs_lists_key_figures(trained_run, tmp_path):
    out, _ = trained_run
    r = run_cli("runs", str(out.parent), "--json")
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in records if x["kind"] == "eval"]
    assert row["status"] == "done" and row["step"] == 4 and row["steps"] == 4
    assert row["accuracy_start"] == evals[0]["accuracy"] and row["accuracy_end"] == evals[-1]["accuracy"]
    table = run_cli("runs", str(out.parent))
    assert table.returncode == 0 and "done" in table.stdout and "4/4" in table.stdout
    empty = run_cli("runs", str(tmp_path))
    assert empty.returncode == 0 and "no runs" in empty.stdout


def test_smooth_is_a_trailing_mean():
    from mlx_grpo.plot import smooth

    y = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    np.testing.assert_allclose(smooth(y, 2), [1.0, 1.5, 2.5, 3.5, 4.5])
    np.testing.assert_allclose(smooth(y, 1), y)


def test_generate_streams_one_sample_and_batches_several(small_model_dir):
    one = run_cli("generate", "--model", str(small_model_dir), "--prompt", "What is 3 + 4 ?",
                  "--temperature", "0", "--max-tokens", "8")
    assert one.returncode == 0, one.stderr
    text = one.stdout.splitlines()
    assert text[0].startswith("mlx-grpo") is False and " <think>" in one.stdout
    # Greedy streaming gives what the batched rollout engine gives for the same prompt.
    from mlx_grpo.config import make_config
    from mlx_grpo.generate import generate
    from mlx_grpo.policy import load_policy

    cfg = make_config(None, [("model.path", str(small_model_dir)), ("rollout.max_tokens", 8)])
    policy = load_policy(cfg, training=False)
    (batched,) = generate(policy.model, policy.prompter, "What is 3 + 4 ?", cfg, 1, 0.0)
    assert one.stdout.strip() == batched.strip()
    many = run_cli("generate", "--model", str(small_model_dir), "--prompt", "What is 3 + 4 ?",
                   "--samples", "3", "--max-tokens", "8")
    assert many.returncode == 0, many.stderr
    assert many.stdout.count("--- sample") == 3
    bad = run_cli("generate", "--model", str(small_model_dir / "absent"), "--prompt", "x")
    assert bad.returncode == 2 and "model.path" in bad.stderr and "Traceback" not in bad.stderr


def test_wandb_logging_offline(small_model_dir, tmp_path):
    pytest.importorskip("wandb")  # an optional extra: CI does not install it
    out = tmp_path / "w"
    r = run_cli("train", "--model", str(small_model_dir), "--output", str(out), "--steps", "2",
                "--batch-size", "2", "-G", "2", "--max-tokens", "4", "--no-progress",
                "--set", "output.eval_size=2", "--set", "output.log_to=[wandb]",
                env={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    assert r.returncode == 0, r.stderr
    (run,) = (out / "wandb").glob("offline-run-*")
    assert list(run.glob("run-*.wandb"))


def test_missing_tracker_library_is_a_clear_error(small_model_dir, tmp_path):
    out = tmp_path / "t"
    bad = run_cli("train", "--model", str(small_model_dir), "--output", str(out), "--steps", "1",
                  "--set", "output.log_to=[mlflow]")
    assert bad.returncode == 2 and "output.log_to[0]: must be one of tensorboard, wandb, got 'mlflow'" in bad.stderr


def test_evaluations_wait_for_every_math_verify_verdict(embedded_model_dir, monkeypatch):
    """A held-out evaluation judges with full verdicts even inside a context that waits none (a
    training step's): its figures do not depend on what math-verify's parser has seen."""
    import mlx_grpo.tasks.judges as judges
    from mlx_grpo.config import make_config
    from mlx_grpo.evaluate import evaluate_held_out
    from mlx_grpo.policy import load_policy
    from mlx_grpo.rewards import answers
    from mlx_grpo.tasks import load_task

    cfg = make_config(overrides=[("model.path", str(embedded_model_dir)), ("rollout.max_tokens", 4)])
    policy = load_policy(cfg, training=False)
    rows = load_task(cfg.data).held_out[:2]
    waits = []
    real = answers.answers_match
    monkeypatch.setattr(judges, "answers_match", lambda *a, **k: waits.append(answers._wait.get()) or real(*a, **k))
    token = answers._wait.set(0.0)
    try:
        evaluate_held_out(policy, rows, cfg)
        assert answers._wait.get() == 0.0  # restored after the evaluation
    finally:
        answers._wait.reset(token)
    assert len(waits) >= 2 and all(w is None for w in waits)  # each row's lenient verdict at least
