"""DAPO dynamic sampling against its definition, on real rollouts and in a real run."""

import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_grpo.config import make_config
from mlx_grpo.rewards import Rewards
from mlx_grpo.rollout import Rollouts
from mlx_grpo.dynamic_sampling import Drawn, concat_rollouts, fill_with_spread, spread_groups, take_groups
from mlx_grpo.trainer import train

G = 2


def drawn(rewards, tag, width=3, prompt_width=2):
    """A draw of len(rewards) // G prompt groups; token ids encode (tag, row) to follow rows."""
    n = len(rewards)
    P = n // G
    tokens = np.array([[tag * 100 + r] * width for r in range(n)], dtype=np.int32)
    lengths = np.array([1 + r % width for r in range(n)])
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.float32)
    ro = Rollouts(
        prompt_tokens=mx.array(np.full((P, prompt_width), tag, dtype=np.int32)),
        left_padding=[0] * P, tokens=mx.array(tokens), mask=mx.array(mask),
        sample_logprobs=mx.array(-mask), texts=[f"{tag}:{r}" for r in range(n)],
        truncated=[False] * n, group_size=G)
    rw = Rewards({"acc": np.array(rewards, dtype=float)}, np.array(rewards, dtype=float))
    rows = [{"prompt": f"{tag}/{p}"} for p in range(P)]
    return Drawn(rows, [f"{tag}/{p}" for p in range(P)], ro, rw, 1.0, 0.5)


def test_spread_groups():
    assert spread_groups(np.array([1, 1, 0, 1, 0, 0]), 2).tolist() == [False, True, False]


def test_draws_until_enough_groups_have_spread():
    first = drawn([1, 1, 0, 1, 0, 0], tag=0)  # 3 groups, 1 with spread
    more = {1: drawn([1, 0, 1, 1, 0, 1], tag=1, width=5, prompt_width=4),  # 2 with spread
            2: drawn([0, 1, 0, 1, 1, 0], tag=2)}
    calls = []

    def draw(d):
        calls.append(d)
        return more[d]

    out, log = fill_with_spread(first, draw, target=3, max_draws=4, pad_id=-1)
    assert calls == [1]  # 1 + 2 spread groups after the second draw: enough
    assert [r["prompt"] for r in out.rows] == ["0/1", "1/0", "1/2"]
    assert spread_groups(out.rw.total, G).all()
    assert out.ro.texts == ["0:2", "0:3", "1:0", "1:1", "1:4", "1:5"]
    # the rows' tokens and masks follow them; prompts are left-padded to one width
    assert np.array(out.ro.tokens)[:, 0].tolist() == [2, 3, 100, 101, 104, 105]
    assert np.array(out.ro.mask).sum(axis=1).tolist() == [3, 1, 1, 2, 5, 1]
    assert out.ro.prompt_tokens.shape == (3, 4) and out.ro.left_padding == [2, 0, 0]
    assert np.array(out.ro.prompt_tokens)[0].tolist() == [-1, -1, 0, 0]
    assert log == {"dynamic_draws": 2.0, "dynamic_groups_sampled": 6.0, "dynamic_spread_groups": 3.0,
                   "dynamic_short": 0.0, "zero_std_groups": 0.5}
    assert out.generate_time == 2.0 and out.reward_time == 1.0


def test_capped_draws_fill_with_flat_groups_and_log_the_shortfall():
    first = drawn([1, 1, 0, 0, 1, 0], tag=0)  # 1 of 3 with spread
    out, log = fill_with_spread(first, lambda d: drawn([0, 0, 1, 1, 1, 1], tag=d), target=3, max_draws=2, pad_id=0)
    assert [r["prompt"] for r in out.rows] == ["0/2", "0/0", "0/1"]  # spread first, then flat as drawn
    assert log["dynamic_draws"] == 2.0 and log["dynamic_short"] == 2.0 and log["dynamic_spread_groups"] == 1.0


def test_no_extra_draw_when_the_first_is_enough():
    first = drawn([1, 0, 0, 1], tag=0)
    out, log = fill_with_spread(first, lambda d: pytest.fail("drew again"), target=2, max_draws=4, pad_id=0)
    assert out.ro.texts == first.ro.texts and log["dynamic_draws"] == 1.0


def test_dynamic_sampling_run_learns_from_full_steps(small_model_dir, tmp_path):
    """A reward with spread in about half the groups: every step still has prompts_per_step groups
    with spread (or says how many it lacked), and the extra batches are counted."""
    (tmp_path / "rw.py").write_text(
        "def r(prompts, completions, **kw):\n    return [float(len(c) % 3 == 0) for c in completions]\n")
    cfg = make_config(None, [
        ("model.path", str(small_model_dir)), ("output.dir", str(tmp_path / "run")),
        ("train.steps", 3), ("train.prompts_per_step", 4), ("rollout.group_size", 2),
        ("rollout.max_tokens", 6), ("rollout.stop", []), ("data.max_operand", 9), ("data.eval_size", 10),
        ("output.progress", False), ("output.eval_size", 4), ("grpo.dynamic_sampling", True),
        ("rewards", {f"{tmp_path / 'rw.py'}:r": 1.0})])
    train(cfg, say=lambda s: None)
    steps = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if s["kind"] == "train"]
    for s in steps:
        assert s["dynamic_spread_groups"] + s["dynamic_short"] >= 4
        assert s["dynamic_groups_sampled"] == 4 * s["dynamic_draws"]
        assert s["rows_updated"] == 8  # four groups of two, whatever was drawn
    assert any(s["dynamic_draws"] > 1 for s in steps)
    # the data order's position counts every batch drawn, so a resumed run draws what comes next
    (ckpt,) = (tmp_path / "run" / "checkpoints").iterdir()
    state = json.loads((ckpt / "state.json").read_text())
    assert state["batches_drawn"] == sum(s["dynamic_draws"] for s in steps)
