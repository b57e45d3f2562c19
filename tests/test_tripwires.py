"""Tripwires: each one provoked, on records and in real runs; none fires on a healthy run."""

import json

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlx_grpo import tripwires as tw
from mlx_grpo.config import make_config
from mlx_grpo.runs import read_run
from mlx_grpo.runlog import bar_line
from mlx_grpo.trainer import train


# The training rewards of two real runs (SmolLM2-135M-Instruct, docs/real-models.md), as recorded in
# their metrics.jsonl: the recipe's seed 0 (run D, healthy to step 160) and a run with
# skip_zero_advantage that lost its layout at step 34 (run XS).
HEALTHY_D = [
    0.246, 0.402, 0.32, 0.594, 1.027, 1.18, 1.594, 1.32, 1.215, 1.855, 1.812, 1.305, 1.41, 1.391,
    1.656, 1.844, 1.891, 2.008, 2.297, 1.891, 2.039, 2.312, 1.938, 1.844, 2.152, 2.125, 2.219,
    1.938, 2.121, 1.938, 2.199, 1.984, 2.406, 2.125, 2.266, 2.266, 1.703, 1.797, 1.938, 1.891,
    1.418, 1.703, 1.938, 2.125, 2.266, 2.312, 2.203, 2.312, 2.5, 1.75, 2.172, 2.031, 2.078, 2.031,
    2.125, 2.078, 1.984, 2.219, 2.406, 2.391, 2.219, 1.938, 2.266, 1.891, 2.125, 2.406, 1.938,
    2.312, 2.219, 2.219, 2.406, 2.5, 2.453, 2.219, 2.004, 2.359, 2.312, 2.219, 1.984, 2.406, 1.797,
    2.312, 2.172, 2.266, 2.406, 2.125, 2.359, 1.867, 1.965, 1.938, 1.938, 2.312, 2.266, 2.312,
    2.031, 2.359, 2.172, 2.453, 2.172, 2.453, 2.359, 2.406, 2.172, 2.359, 2.5, 2.125, 2.5, 2.312,
    1.984, 2.172, 2.453, 2.406, 2.172, 2.031, 1.984, 2.125, 2.172, 2.406, 1.984, 2.453, 2.266, 1.75,
    2.078, 2.266, 2.312, 2.219, 2.219, 2.312, 1.938, 2.078, 1.891, 1.844, 2.359, 2.5, 1.984, 2.453,
    2.266, 2.5, 2.453, 2.406, 2.312, 2.078, 2.312, 2.5, 2.031, 1.516, 2.453, 2.219, 2.125, 2.172,
    2.266, 2.312, 1.75, 2.219, 2.5, 2.406, 2.453, 2.219, 2.219, 2.5,
]
COLLAPSED_XS = [
    0.324, 0.438, 0.902, 1.328, 1.211, 1.191, 1.703, 1.469, 1.574, 1.891, 1.844, 1.516, 1.609,
    2.078, 1.594, 1.75, 2.172, 1.703, 1.375, 1.75, 1.656, 1.938, 1.375, 1.516, 1.375, 1.375, 1.328,
    1.355, 1.891, 1.375, 1.375, 1.094, 1.176, 0.301, 0.504, 0.637, 0.387, 0.781, 0.469, 0.562,
]


def rec(reward=0.5, flat=0.0, grad=1.0):
    return {"reward_mean": reward, "zero_std_groups": flat, "grad_norm": grad}


def names(found):
    return [w["tripwire"] for w in found]


def test_flat_groups_fire_after_ten_steps_in_a_row_once():
    t = tw.Tripwires()
    fired = {s: t.train(s, rec(flat=0.95 if s != 5 else 0.5)) for s in range(1, 30)}
    # the streak restarts at step 6 (step 5 had spread): 10 in a row ends at step 15, said once
    assert [s for s, w in fired.items() if "flat_groups" in names(w)] == [15]
    w = fired[15][0]
    assert w["kind"] == "warning" and w["step"] == 15
    for advice in ("rollout.group_size", "rollout.temperature", "difficulty"):
        assert advice in w["message"]


def test_a_flat_start_is_said_at_the_third_step_with_the_rewards_that_paid_nothing():
    t = tw.Tripwires()
    r = {**rec(reward=0.0, flat=1.0), "rewards/accuracy": 0.0, "rewards/format": 0.0, "rewards/lenient_accuracy": 0.0}
    fired = {s: t.train(s, dict(r, **({"rewards/lenient_accuracy": 0.0} if s != 2 else {}))) for s in range(1, 8)}
    assert [s for s, w in fired.items() if "flat_start" in names(w)] == [3]
    msg = fired[3][0]["message"]
    assert "first 3 steps" in msg and "accuracy, format, lenient_accuracy paid 0" in msg
    assert "prompt.response_prefix" in msg and "configs/smollm2.yaml" in msg
    # one step with spread among the first three: no flat start (the flat-groups wire stays)
    t = tw.Tripwires()
    fired = {s: t.train(s, rec(reward=0.0, flat=1.0 if s != 2 else 0.5)) for s in range(1, 8)}
    assert not any("flat_start" in names(w) for w in fired.values())
    # a reward that paid at one of the first steps is not named
    t = tw.Tripwires()
    fired = [t.train(s, {**rec(reward=0.0, flat=1.0), "rewards/format": 0.0, "rewards/accuracy": 0.5 * (s == 41)})
             for s in (41, 42, 43)]  # a resumed run: its own first three steps
    assert names(fired[2]) == ["flat_start"] and "learned; format paid 0" in fired[2][0]["message"]


def test_exactly_the_share_does_not_fire():
    t = tw.Tripwires()
    assert not any(t.train(s, rec(flat=tw.FLAT_SHARE)) for s in range(1, 30))


def test_still_model_fires_on_zero_gradient_or_unmoved_weights():
    t = tw.Tripwires()
    assert names(t.train(1, rec(grad=0.0))) == []  # the first steps are allowed
    assert names(t.train(3, rec(grad=0.0))) == ["not_learning"]
    assert names(t.train(4, rec(grad=0.0))) == []  # said once

    t = tw.Tripwires()
    t.train(1, rec(grad=0.5))
    assert all(t.train(s, rec(grad=0.0)) == [] for s in range(2, 20))  # it learned, then saturated

    layer = nn.Linear(3, 3)
    t = tw.Tripwires(lambda: tw.fingerprint(layer))
    assert names(t.train(3, rec())) == ["not_learning"]  # grad_norm fine, weights the same

    layer = nn.Linear(3, 3)
    t = tw.Tripwires(lambda: tw.fingerprint(layer))
    layer.weight = layer.weight + 1e-3
    assert names(t.train(3, rec())) == [] and t.weights is None  # moved: not read again


def test_reward_hacking_fires_when_reward_rises_while_accuracy_falls():
    t = tw.Tripwires()
    assert t.evaluated(0, {"lenient_accuracy": 0.99}) == []
    for s in range(1, 11):
        t.train(s, rec(reward=0.2))
    assert t.evaluated(10, {"lenient_accuracy": 0.98}) == []  # within noise
    for s in range(11, 21):
        t.train(s, rec(reward=0.9))
    found = t.evaluated(20, {"lenient_accuracy": 0.90})
    assert names(found) == ["reward_hacking"] and "0.990 at step 0 -> 0.900" in found[0]["message"]
    for s in range(21, 31):
        t.train(s, rec(reward=0.95))
    assert t.evaluated(30, {"lenient_accuracy": 0.85}) == []  # still on: said once


def test_learning_the_format_is_not_hacking():
    """The default run's first steps: the answers suffer while the format is learned, and strict
    accuracy (what the reward pays for) rises."""
    t = tw.Tripwires()
    t.evaluated(0, {"lenient_accuracy": 0.995, "accuracy": 0.0})
    for s in range(1, 26):
        t.train(s, rec(reward=0.0 if s < 5 else 0.85))
    assert t.evaluated(25, {"lenient_accuracy": 0.605, "accuracy": 0.598}) == []
    for s in range(26, 51):
        t.train(s, rec(reward=1.0))
    assert t.evaluated(50, {"lenient_accuracy": 0.5, "accuracy": 0.5}) == []  # still above step 0's strict
    assert t.evaluated(75, {"lenient_accuracy": 0.998, "accuracy": 0.99}) == []  # a new best
    for s in range(76, 101):
        t.train(s, rec(reward=1.3))
    assert names(t.evaluated(100, {"lenient_accuracy": 0.9, "accuracy": 0.9})) == ["reward_hacking"]


def test_falling_accuracy_with_a_flat_reward_is_not_hacking():
    t = tw.Tripwires()
    t.evaluated(0, {"lenient_accuracy": 0.99})
    for s in range(1, 21):
        t.train(s, rec(reward=0.5))
    assert t.evaluated(20, {"lenient_accuracy": 0.5}) == []


def test_a_reward_collapse_is_said_once_when_half_the_gain_is_gone():
    t = tw.Tripwires()
    fired = {}
    rewards = [0.2] * 10 + [1.0] * 20 + [0.3] * 15 + [1.0] * 15 + [0.2] * 15
    for s, r in enumerate(rewards, start=1):
        fired[s] = names(t.train(s, rec(reward=r)))
    got = [s for s, w in fired.items() if "reward_collapse" in w]
    # window means: start 0.2, best 1.0 (first at steps 11-20); the line is 0.6, crossed when 6 of the last
    # 10 steps are 0.3 (step 36: 0.58); said again after the reward came back and fell to the
    # line again (step 65: five steps of 1.0 and five of 0.2)
    assert got == [36, 65]
    t = tw.Tripwires()
    out = [t.train(s, rec(reward=r)) for s, r in enumerate(rewards[:36], start=1)][-1]
    assert "from 1.000 (steps 11-20)" in out[0]["message"] and "start (0.200)" in out[0]["message"]
    for advice in ("train.learning_rate", "grpo.beta", "checkpoint of step 20 or earlier"):
        assert advice in out[0]["message"]


def test_no_collapse_without_a_gain_or_on_noise():
    t = tw.Tripwires()
    noisy_flat = [0.5 + 0.03 * ((-1) ** s) for s in range(1, 60)]  # a flat curve's noise is no gain
    assert not any(t.train(s, rec(reward=r)) for s, r in enumerate(noisy_flat, start=1))
    t = tw.Tripwires()
    falling = [1.0 - 0.01 * s for s in range(1, 60)]  # never gained: not this wire's business
    assert not any(t.train(s, rec(reward=r)) for s, r in enumerate(falling, start=1))


def test_recorded_real_runs_collapse_and_health():
    t = tw.Tripwires()
    fired = [s for s, r in enumerate(HEALTHY_D, start=1) if "reward_collapse" in names(t.train(s, rec(reward=r)))]
    assert fired == []
    t = tw.Tripwires()
    fired = [s for s, r in enumerate(COLLAPSED_XS, start=1) if "reward_collapse" in names(t.train(s, rec(reward=r)))]
    assert fired == [32]  # two steps before the layout was gone (training format 0.88 -> 0.00 at 34)


def test_bar_shows_this_steps_training_accuracy_and_format():
    m = {"reward_mean": 1.2, "rewards/accuracy": 0.75, "rewards/format": 0.875, "kl": 0.01,
         "completion_length": 12.0, "tokens_per_sec": 900.0}
    assert bar_line(m).startswith("reward 1.200 acc 0.750 fmt 0.875 kl 0.0100")
    del m["rewards/accuracy"], m["rewards/format"]
    assert "acc" not in bar_line(m)


def run(model_dir, tmp_path, reward_src, *overrides):
    (tmp_path / "rw.py").write_text(reward_src)
    cfg = make_config(None, [
        ("model.path", str(model_dir)), ("output.dir", str(tmp_path / "run")),
        ("train.prompts_per_step", 2), ("rollout.group_size", 2), ("rollout.max_tokens", 4),
        ("rollout.stop", []), ("data.max_operand", 9), ("data.eval_size", 10),
        ("output.progress", False), ("output.eval_size", 4), ("output.save_every", 0),
        ("rewards", {f"{tmp_path / 'rw.py'}:r": 1.0}), *overrides])
    said = []
    train(cfg, say=said.append)
    return read_run(tmp_path / "run"), said


def test_a_run_with_one_reward_for_all_warns_flat_and_still(small_model_dir, tmp_path):
    """Equal rewards and beta 0: no gradient at all, every group flat; the run goes on."""
    rec_, said = run(small_model_dir, tmp_path, "def r(prompts, completions, **kw):\n    return [1.0] * len(completions)\n",
                     ("train.steps", 11), ("grpo.beta", 0.0))
    got = {w["tripwire"]: w["step"] for w in rec_.warnings}
    assert got == {"not_learning": 3, "flat_start": 3, "flat_groups": 10}
    assert len(rec_.train) == 11 and rec_.summary is not None  # warnings never stop the run
    assert any(s.startswith("warning: tripwire flat_groups") for s in said)


def test_a_learning_run_trips_nothing(small_model_dir, tmp_path):
    rec_, _ = run(small_model_dir, tmp_path,
                  "def r(prompts, completions, **kw):\n    return [len(c) / 20 for c in completions]\n",
                  ("train.steps", 4), ("train.learning_rate", 1e-2))
    assert rec_.warnings == [] and len(rec_.train) == 4


def test_a_hacked_reward_trips_the_hacking_wire(embedded_model_dir, tmp_path):
    """The embedded model knows its sums but samples wrong ones at temperature 1; a reward that
    pays for a wrong last number is learned while held-out accuracy falls."""
    src = ("import re\n"
           "def r(prompts, completions, answer, **kw):\n"
           "    last = [re.findall(r'-?\\d+', c)[-1:] for c in completions]\n"
           "    return [float(l != [a]) for l, a in zip(last, answer)]\n")
    rec_, said = run(embedded_model_dir, tmp_path, src, ("train.steps", 24), ("rollout.max_tokens", 20),
                     ("rollout.stop", ["</answer>"]), ("train.prompts_per_step", 8), ("rollout.group_size", 4),
                     ("train.learning_rate", 3e-3), ("grpo.beta", 0.0), ("output.eval_every", 8),
                     ("data.eval_size", 40), ("output.eval_size", 40), ("data.max_operand", 29))
    found = [w["tripwire"] for w in rec_.warnings]
    assert "reward_hacking" in found and "not_learning" not in found, (found, rec_.evals)
    assert rec_.evals[0]["lenient_accuracy"] > 0.9 and rec_.evals[-1]["lenient_accuracy"] < 0.5
    assert any(s.startswith("warning: tripwire reward_hacking") for s in said)
