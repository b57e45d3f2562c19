"""The R1-Zero demo: the second embedded model's corpus and script, and configs/reasoning.yaml
loading and training end to end (the task and lenient pass@k are tested in test_tasks and
test_reports)."""

from __future__ import annotations

import json
import random
import re

import pytest

from conftest import ROOT, run_cli
from mlx_grpo.assets.make_reasoning_model import (BASE_OPERAND, chain_drill, chat_prompt, make, reasoning_document,
                                                  three_term_solution)
from mlx_grpo.config import ModelConfig, make_config
from mlx_grpo.tasks import TASKS

REASONING = ROOT / "configs" / "reasoning.yaml"


def test_careful_and_hasty_solutions_are_judged_as_a_reader_would():
    careful = " <think> " + three_term_solution(3, 4, 5, careful=True)
    hasty = " <think> " + three_term_solution(3, 4, 5, careful=False)
    assert careful == " <think> 3 + 4 = 7 . 7 + 5 = 12 . </think> <answer> 12 </answer>"
    assert TASKS["multistep"].judge(careful, {"answer": "12"}) == {"format": True, "strict": True, "lenient": True}
    assert TASKS["multistep"].judge(hasty, {"answer": "12"}) == {"format": True, "strict": False, "lenient": False}
    assert TASKS["multistep"].judge(" <think> " + three_term_solution(3, 4, 0, careful=False), {"answer": "7"})["strict"]


def test_corpus_prompt_is_what_the_demo_config_renders(embedded_model_dir):
    from mlx_grpo.models import load_model
    from mlx_grpo.tasks.templates import prompt_format, render_prompt

    cfg = make_config(str(REASONING))
    _, tok = load_model(ModelConfig(path=str(embedded_model_dir)))
    assert render_prompt("What is 1 + 2 + 3 ?", prompt_format(cfg.prompt), tok) == chat_prompt("What is 1 + 2 + 3 ?")


def test_reasoning_corpus_is_seeded_and_mixes_both_solutions():
    docs = [reasoning_document(random.Random(0), 14) for _ in range(2)]
    assert docs[0] == docs[1]
    rng = random.Random(1)
    docs = [reasoning_document(rng, 14, careful_rate=0.3) for _ in range(2000)]
    three = [d for d in docs if re.fullmatch(r"User: What is \d+ \+ \d+ \+ \d+ \? Assistant: <think> .*", d)]
    careful = [d for d in three if d.count(" = ") == 2]
    assert 0.75 < len(three) / len(docs) < 0.85
    assert all(re.fullmatch(r"(\d+ \+ \d+ = \d+ \. ?)+", d) for d in docs if d not in three)
    assert 0.25 < len(careful) / len(three) < 0.35
    for d in three:  # the full layout, answering the last value computed (right when careful)
        values = re.findall(r"= (\d+) \.", d)
        assert d.endswith(f" </think> <answer> {values[-1]} </answer>")
        a, b, c = map(int, re.findall(r"\d+", d.split("?")[0]))
        assert (int(values[-1]) == a + b + c) == (d in careful or c == 0)


def _facts(text: str):
    return [tuple(map(int, f)) for f in re.findall(r"(\d+) \+ (\d+) = (\d+) \.", text)]


def test_chain_drills_practise_the_second_step():
    rng = random.Random(2)
    lengths = set()
    for _ in range(500):
        facts = _facts(chain_drill(rng, 9))
        lengths.add(len(facts))
        assert all(a + b == s and b <= 9 and s <= BASE_OPERAND for a, b, s in facts)
        # each fact starts from the previous sum, as the careful second step does
        assert all(nxt[0] == prev[2] for prev, nxt in zip(facts, facts[1:]))
    assert {2, 3, 4} <= lengths
    rng = random.Random(3)
    drills = [d for d in (reasoning_document(rng, 9, chain_share=1.0) for _ in range(300)) if not d.startswith("User:")]
    assert drills and all(nxt[0] == prev[2] for d in drills for prev, nxt in zip(_facts(d), _facts(d)[1:]))
    rng = random.Random(3)
    plain = [d for d in (reasoning_document(rng, 9, chain_share=0.0) for _ in range(300)) if not d.startswith("User:")]
    assert any(nxt[0] != prev[2] for d in plain for prev, nxt in zip(_facts(d), _facts(d)[1:]))


def test_reasoning_config_loads():
    cfg = make_config(str(REASONING))
    assert cfg.data.task == "multistep" and cfg.model.path.endswith("tiny-reason")
    assert (ROOT / cfg.model.path / "model.safetensors").exists()


def test_make_reasoning_model_is_deterministic_and_loadable(small_model_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        make(out, small_model_dir, steps=[2, 1], seed=0, max_operand=4, batch=4, lr=1e-3, log_every=0)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (small_model_dir / "model.safetensors").read_bytes()
    r = run_cli("eval", "--model", str(a), "--task", "multistep", "--set", "data.max_operand=4",
                "--set", "data.eval_size=20", "--n", "3", "--max-tokens", "6", "--samples", "2", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.splitlines()[-1])
    assert res["n"] == 3 and res["k"] == 2
    for key in ("pass_at_1", "pass_at_k", "lenient_pass_at_1", "lenient_pass_at_k"):
        assert 0 <= res[key] <= 1, key
    assert res["pass_at_1"] <= res["pass_at_k"] and res["lenient_pass_at_1"] <= res["lenient_pass_at_k"]


def test_reasoning_config_trains_two_steps(tmp_path):
    out = tmp_path / "run"
    r = run_cli("train", "--config", str(REASONING), "--output", str(out), "--steps", "2",
                "--batch-size", "2", "-G", "4", "--no-progress", "--set", "output.eval_size=4",
                "--set", "output.eval_samples=2")
    assert r.returncode == 0, r.stderr
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]
    evals = [r for r in records if r["kind"] == "eval"]
    assert evals and all(e["n"] == 4 and 0 <= e["lenient_pass_at_1"] <= e["lenient_pass_at_k"] <= 1 for e in evals)
