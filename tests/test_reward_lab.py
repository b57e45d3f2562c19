"""The rewards lab: statistics checked against plain NumPy, and `cli.py reward` as a user runs it."""

import json

import numpy as np
import pytest

from conftest import run_cli
from mlx_grpo.config import ConfigError, make_config
from mlx_grpo.reward_lab import (column_stats, correlation, parse_reward_list, read_completions, run,
                                 summarize)
from mlx_grpo.rewards import Rewards
from mlx_grpo.tasks import DataError

GOOD = " <think> 2 + 3 = 5 </think> <answer> 5 </answer>"
ROWS = [
    {"prompt": "What is 2 + 3 ?", "completion": GOOD, "answer": "5"},
    {"prompt": "What is 2 + 3 ?", "completion": " <think> hmm </think> <answer> 6 </answer>", "answer": "5"},
    {"prompt": "What is 1 + 1 ?", "completion": " it is 2", "answer": "2"},
    {"prompt": "q", "completion": "<think></think><answer>\\frac{1}{2}</answer>", "answer": "0.5"},
    {"completion": "no answer here", "level": 3},
]


@pytest.fixture
def completions_file(tmp_path):
    p = tmp_path / "completions.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return p


def test_column_stats_and_correlation_match_numpy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=50)
    a[[3, 7]] = 0.0
    a[[5, 11, 13]] = np.nan
    b = 2 * np.nan_to_num(a) + rng.normal(size=50)
    s = column_stats(a, 0.5)
    ok = a[~np.isnan(a)]
    assert s["weight"] == 0.5 and s["n"] == 47
    assert s["mean"] == pytest.approx(ok.mean()) and s["std"] == pytest.approx(ok.std())
    assert (s["min"], s["max"]) == (pytest.approx(ok.min()), pytest.approx(ok.max()))
    assert s["nonzero"] == pytest.approx(45 / 50) and s["none"] == pytest.approx(3 / 50)
    both = ~np.isnan(a)
    assert correlation(a, b) == pytest.approx(np.corrcoef(a[both], b[both])[0, 1])
    assert correlation(a, np.ones(50)) is None  # constant: undefined, not NaN
    empty = column_stats(np.full(4, np.nan))
    assert empty["mean"] is None and empty["none"] == 1.0


def test_summary_worst_best_and_zero_spread_groups():
    rw = Rewards({"r": np.array([0.0, 1.0, 1.0, 0.0, 0.5, np.nan])}, np.array([0.0, 1.0, 1.0, 0.0, 0.5, 0.0]))
    from mlx_grpo.reward_lab import Completions

    data = Completions([""] * 6, list("abcdef"), {"group": [0, 0, 1, 1, 2, 2]}, [{}] * 6)
    s = summarize(rw, {"r": 2.0}, data, top=2)
    assert s["n"] == 6 and s["rewards"]["r"]["weight"] == 2.0
    assert [e["index"] for e in s["worst"]] == [0, 3] and [e["index"] for e in s["best"]] == [1, 2]
    assert s["best"][0]["rewards"] == {"r": 1.0} and s["worst"][0]["completion"] == "a"
    assert s["groups"] == {"count": 3, "zero_std": pytest.approx(0.0)}
    data.columns["group"] = [0, 0, 1, 1, 1, 1]  # group 1: totals 1, 0, 0.5, 0 -> spread
    rw.total[:] = [1, 1, 0, 0, 0, 0]
    assert summarize(rw, {}, data)["groups"] == {"count": 2, "zero_std": 1.0}


def test_run_scores_a_file_and_writes_scores(completions_file, tmp_path):
    out = tmp_path / "scores.jsonl"
    cfg = make_config(None)
    s = run(cfg, {"accuracy": 1.0, "format": 0.5}, str(completions_file), out=str(out))
    acc, fmt = s["rewards"]["accuracy"], s["rewards"]["format"]
    assert acc["n"] == 4 and acc["mean"] == pytest.approx(2 / 4) and acc["none"] == pytest.approx(1 / 5)
    assert fmt["mean"] == pytest.approx(3 / 5)
    assert s["total"]["max"] == pytest.approx(1.5) and s["total"]["min"] == 0.0
    lines = [json.loads(l) for l in out.read_text().splitlines()]
    assert lines[0]["rewards"] == {"accuracy": 1.0, "format": 1.0} and lines[0]["total"] == 1.5
    assert lines[4]["rewards"]["accuracy"] is None and lines[4]["level"] == 3
    # the scores file is itself valid input: its results are not taken for columns
    again = read_completions(str(out))
    assert "rewards" not in again.columns and "total" not in again.columns
    assert again.completions == [r["completion"] for r in ROWS]


@pytest.mark.parametrize("text,msg", [
    ('{"completion": "a"}\n{"completion": oops}\n', ":2: malformed JSON"),
    ('{"completion": "a"}\n["a"]\n', ":2: expected a JSON object"),
    ('{"prompt": "a"}\n', ":1: missing field 'completion'"),
    ('{"completion": ["a"]}\n', ":1: field 'completion' must be a string, got list"),
    ("\n", "no completions (empty file)"),
])
def test_bad_completion_files_name_file_and_line(tmp_path, text, msg):
    p = tmp_path / "c.jsonl"
    p.write_text(text)
    with pytest.raises(DataError) as e:
        read_completions(str(p))
    assert str(e.value).startswith(str(p)) and msg in str(e.value)


def test_reward_list_parsing():
    assert parse_reward_list("accuracy, format=0.25,x.py:fn=2", {"accuracy": 3.0}) == {
        "accuracy": 3.0, "format": 0.25, "x.py:fn": 2.0}
    with pytest.raises(ConfigError, match="--rewards: bad weight 'abc'"):
        parse_reward_list("format=abc", {})


# ---------------------------------------------------------------- the command, as a subprocess


def test_reward_command_json(completions_file, tmp_path):
    out = tmp_path / "s.jsonl"
    r = run_cli("reward", "--completions", str(completions_file), "--rewards",
                "accuracy,format=0.5,tag_count,length", "--set", "reward_settings.length.unit=words",
                "--set", "rollout.max_tokens=10", "--json", "--out", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["n"] == 5 and set(res["rewards"]) == {"accuracy", "format", "tag_count", "length"}
    for name, s in res["rewards"].items():
        assert {"mean", "std", "min", "max", "nonzero", "none", "weight"} <= set(s), name
    assert res["rewards"]["format"]["weight"] == 0.5 and res["rewards"]["accuracy"]["mean"] == 0.5
    assert res["rewards"]["length"]["min"] == -1.0  # GOOD has 12 words, capped at 10
    assert res["rewards"]["length"]["max"] == -0.1  # row 3 is one word
    totals = [json.loads(l)["total"] for l in out.read_text().splitlines()]
    assert res["total"]["mean"] == pytest.approx(np.mean(totals))
    assert res["best"][0]["index"] == 3 and res["correlation"]["accuracy"]["accuracy"] == 1.0


def test_reward_command_waits_for_every_math_verify_verdict(tmp_path):
    """The lab reports what each reward pays once decided: a shape math-verify's parser has not
    seen (100-300 ms, past a training reward's bounded wait) and a pair queued behind it both
    match, where a training step would have scored them 0 that step."""
    pytest.importorskip("math_verify", reason="math-verify is not installed (pip install -e '.[math]')")
    cold = "\\left(\\sqrt{12\\pi}+\\sqrt{\\sqrt{24}}, \\frac{88}{90}^{2}, 16\\right)"
    ref = "\\left(2\\sqrt{3\\pi}+\\sqrt[4]{24}, \\frac{1936}{2025}, 16\\right)"
    rows = [{"completion": f"<think> t </think> <answer> {cold} </answer>", "answer": ref}] * 2
    rows.append({"completion": "<think> t </think> <answer> \\frac{1}{\\sqrt{2}} </answer>",
                 "answer": "\\frac{\\sqrt{2}}{2}"})
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = run_cli("reward", "--completions", str(path), "--rewards", "accuracy", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["rewards"]["accuracy"]["mean"] == 1.0


def test_reward_command_table_and_task_rewards(completions_file):
    r = run_cli("reward", "--completions", str(completions_file))
    assert r.returncode == 0, r.stderr
    assert "accuracy" in r.stdout and "correlation" in r.stdout and "worst by total" in r.stdout
    cd = run_cli("reward", "--completions", str(completions_file), "--task", "countdown", "--json")
    assert set(json.loads(cd.stdout)["rewards"]) == {"countdown", "format"}
    assert json.loads(cd.stdout)["rewards"]["countdown"]["none"] == 1.0  # no numbers/target columns


@pytest.mark.parametrize("args,msg", [
    (["--completions", "missing.jsonl"], "missing.jsonl: data file not found"),
    (["--completions", "{bad}", "--rewards", "nosuch"], "rewards.nosuch: unknown reward"),
    (["--completions", "{bad}"], "c.jsonl:2: malformed JSON"),
    (["--completions", "{bad}", "--rewards", "overlong"], "reward overlong counts tokens but got no completion_ids"),
    (["--completions", "{bad}", "--set", "reward_settings.overlong.bogus=1"], "reward_settings.overlong.bogus: unknown key"),
    ([], "give either --completions FILE.jsonl or --model M --samples N"),
    (["--model", "x"], "--samples: with --model"),
])
def test_reward_command_bad_input_one_line(tmp_path, args, msg):
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"completion": "a"}\n{oops\n')
    good_first = tmp_path / "ok.jsonl"
    good_first.write_text('{"completion": "a"}\n')
    src = bad if "malformed" in msg else good_first
    r = run_cli("reward", *[str(src) if a == "{bad}" else a for a in args])
    assert r.returncode == 2, r.stdout + r.stderr
    assert msg in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_reward_command_broken_user_reward_stops_with_sample(tmp_path, completions_file):
    f = tmp_path / "mine.py"
    f.write_text("def r(prompts, completions, answer=None, **kw):\n"
                 "    return [1.0 / len(a) for a in answer]\n")
    out = tmp_path / "s.jsonl"
    r = run_cli("reward", "--completions", str(completions_file), "--rewards", f"{f}:r", "--out", str(out))
    assert r.returncode == 2
    assert f"reward {f}:r raised TypeError" in r.stderr and "on sample 4 (completion 'no answer here')" in r.stderr
    assert not out.exists()


def test_reward_command_samples_from_the_embedded_model(embedded_model_dir, tmp_path):
    out = tmp_path / "sampled.jsonl"
    r = run_cli("reward", "--model", str(embedded_model_dir), "--samples", "3", "-G", "2",
                "--rewards", "accuracy,lenient_accuracy,format,overlong", "--json", "--out", str(out))
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["n"] == 6 and res["groups"]["count"] == 3
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert [row["group"] for row in rows] == [0, 0, 1, 1, 2, 2]
    assert all(row["completion"].startswith(" <think>") and row["answer"] for row in rows)
    assert all(1 <= len(row["completion_ids"]) <= 20 for row in rows)  # rollout.max_tokens
    # lenient accuracy: the embedded model knows its sums (about 1 in 100 wrong at temperature 1)
    assert res["rewards"]["lenient_accuracy"]["mean"] >= 0.5
    # the sampled file re-scores to the same numbers without the model
    again = run_cli("reward", "--completions", str(out), "--rewards",
                    "accuracy,lenient_accuracy,format,overlong", "--json")
    assert json.loads(again.stdout)["rewards"] == res["rewards"]


def test_reward_command_samples_with_an_adapter(embedded_model_dir, tmp_path):
    """--adapter is loaded: greedy completions change when the adapter's weights are not zero."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    from mlx_grpo.config import AdapterConfig, ModelConfig
    from mlx_grpo.models import attach_adapters, load_model, save_adapters

    model, _ = load_model(ModelConfig(path=str(embedded_model_dir)))
    attach_adapters(model, AdapterConfig(rank=4))
    mx.random.seed(1)
    noisy = [(k, mx.random.normal(v.shape) * 2.0) for k, v in tree_flatten(model.trainable_parameters())]
    model.update(tree_unflatten(noisy))
    save_adapters(model, tmp_path / "adapter", AdapterConfig(rank=4), str(embedded_model_dir))

    def sampled(*extra):
        out = tmp_path / f"s{len(extra)}.jsonl"
        r = run_cli("reward", "--model", str(embedded_model_dir), "--samples", "4", "--set",
                    "rollout.temperature=0", "--rewards", "format", "--out", str(out), *extra)
        assert r.returncode == 0, r.stderr
        return [json.loads(l)["completion"] for l in out.read_text().splitlines()]

    base = sampled()
    assert sampled("--adapter", str(tmp_path / "adapter")) != base
