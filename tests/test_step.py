"""One GRPO step as named stages (step.py): the gathered columns keep their names, the advantages
stage against its NumPy definition, and a real step returns its samples beside its metrics."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_grpo.config import Config, ModelConfig, make_config
from mlx_grpo.policy import Policy
from mlx_grpo.rewards import Rewards, load_rewards, settings_for
from mlx_grpo.rollout import Rollouts
from mlx_grpo.dynamic_sampling import Drawn
from mlx_grpo.runlog import bar_line
from mlx_grpo.step import StageTimer, StepOutput, advantages, gather_columns, grpo_step, step_metrics
from mlx_grpo.tasks.templates import prompter

G = 4


def policy(model, tok, cfg: Config) -> Policy:
    """The policy of ``model`` (no separate KL reference) with the config's prompt and rewards."""
    return Policy(model, tok, None, prompter(cfg.prompt, tok), load_rewards(list(cfg.rewards), settings_for(cfg)),
                  dict(cfg.rewards))


def drawn(total, columns, truncated):
    """A draw of len(total) // G groups with completions of 1..3 tokens and known logprobs."""
    n = len(total)
    lengths = np.array([1 + r % 3 for r in range(n)])
    mask = (np.arange(3)[None, :] < lengths[:, None]).astype(np.float32)
    logp = -np.arange(1, 3 * n + 1, dtype=np.float32).reshape(n, 3) / 10
    ro = Rollouts(prompt_tokens=mx.zeros((n // G, 2), dtype=mx.int32), left_padding=[0] * (n // G),
                  tokens=mx.ones((n, 3), dtype=mx.int32), mask=mx.array(mask), sample_logprobs=mx.array(logp),
                  texts=[str(r) for r in range(n)], truncated=list(truncated), group_size=G)
    rw = Rewards({k: np.array(v, dtype=float) for k, v in columns.items()}, np.array(total, dtype=float))
    return Drawn([{"prompt": f"p{p}"} for p in range(n // G)], [f"p{p}" for p in range(n // G)], ro, rw), lengths, mask, logp


def test_the_gathered_columns_are_the_rows_figures_by_name():
    total = [1.0, 0.0, 2.0, 1.0, 0.5, 0.5, 0.5, 0.5]
    acc = [1.0, 0.0, 1.0, np.nan, 0.0, 0.0, 0.0, 0.0]
    fmt = [0.0, 0.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5]
    truncated = [False, True, False, False, False, False, True, False]
    d, lengths, mask, logp = drawn(total, {"accuracy": acc, "format": fmt}, truncated)
    cols = gather_columns(d)
    assert cols.total.tolist() == total and cols.lengths.tolist() == lengths.tolist()
    assert cols.truncated.tolist() == [float(t) for t in truncated]
    np.testing.assert_allclose(cols.entropy, -(logp * mask).sum(axis=1), rtol=1e-6)
    assert list(cols.rewards) == ["accuracy", "format"]
    np.testing.assert_array_equal(cols.rewards["accuracy"], acc)  # NaN (no opinion) kept
    assert cols.rewards["format"].tolist() == fmt


def reference_advantages(total):
    """(r - group mean) / (group std + 1e-4), exactly 0 for a group of equal rewards."""
    out = []
    for g in np.asarray(total, dtype=np.float64).reshape(-1, G):
        out += [0.0] * G if g.max() == g.min() else list((g - g.mean()) / (g.std() + 1e-4))
    return np.array(out)


def test_advantages_stage_against_its_definition():
    total = [1.0, 0.0, 1.0, 2.0, 0.5, 0.5, 0.5, 0.5, 3.0, 1.0, 1.0, 3.0]
    d, _, _, _ = drawn(total, {"acc": total}, [False] * 12)
    cols = gather_columns(d)
    want = reference_advantages(total)

    sel = advantages(cols, make_config(None, [("rollout.group_size", G)]), 0, 12)
    np.testing.assert_allclose(sel.adv_all, want, rtol=1e-6, atol=1e-7)
    assert sel.keep_all.tolist() == list(range(12))  # every row in the loss by default
    assert sel.norm.num_sequences == 12 and sel.norm.num_tokens == float(cols.lengths.sum())

    skip = make_config(None, [("rollout.group_size", G), ("grpo.skip_zero_advantage", True)])
    sel = advantages(cols, skip, 4, 12)  # this process: rows 4..11 of the step's
    assert sel.keep_all.tolist() == [i for i in range(12) if want[i] != 0]
    np.testing.assert_allclose(sel.adv, want[4:12], rtol=1e-6, atol=1e-7)
    assert sel.keep.tolist() == [i - 4 for i in range(4, 12) if want[i] != 0]
    assert sel.norm.num_sequences == 12  # flat rows still count in the normaliser


def test_a_step_without_rows_in_its_loss_records_no_kl_rather_than_zero():
    """skip_zero_advantage on a step whose groups are all flat: nothing is scored or updated, so the
    KL and the clipping are unmeasured (null), not 0, and the bar says so."""
    d, _, _, _ = drawn([0.5] * 8, {"acc": [0.5] * 8}, [False] * 8)
    cols = gather_columns(d)
    times = {"generate": 1.0, "reward": 0.1, "score": 0.0, "update": 0.0, "step": 1.1}
    m = step_metrics(cols, {}, 0, G, times, {})
    assert m["rows_updated"] == 0 and m["loss"] == 0.0 and m["grad_norm"] == 0.0
    assert all(m[k] is None for k in ("kl", "clip_fraction", "clip_low", "clip_high", "ratio_mean"))
    assert " kl - " in bar_line(m)
    upd = {"loss": 0.1, "kl": 0.02, "clip_fraction": 0.0, "clip_low": 0.0, "clip_high": 0.0, "ratio_mean": 1.0,
           "grad_norm": 0.3}
    m = step_metrics(cols, upd, 8, G, times, {})
    assert m["kl"] == 0.02 and " kl 0.0200 " in bar_line(m)


def test_a_step_returns_its_samples_beside_its_metrics(small_model_dir):
    import mlx.optimizers as optim

    from mlx_grpo.models import attach_adapters, load_model
    from mlx_grpo.tasks import load_task

    cfg = make_config(None, [("model.path", str(small_model_dir)), ("rollout.group_size", G),
                             ("rollout.max_tokens", 6), ("train.prompts_per_step", 4), ("data.max_operand", 9),
                             ("data.eval_size", 10)])
    model, tok = load_model(ModelConfig(path=str(small_model_dir)))
    mx.random.seed(0)
    attach_adapters(model, cfg.adapter)
    rows = load_task(cfg.data).train[:4]
    out = grpo_step(policy(model, tok, cfg), optim.AdamW(learning_rate=1e-3), rows, cfg)
    assert isinstance(out, StepOutput)
    m, samples = out
    assert not any(k.startswith("_") for k in m)  # no samples hidden among the metrics
    assert m["rows_updated"] == 16 and m["tokens"] > 0
    assert len(samples) == 4  # rows 0, 4, 8, 12: one per prompt here
    assert [s["prompt"] for s in samples] == [r["prompt"] for r in rows]
    assert all(set(s) == {"prompt", "completion", "reward", "rewards", "advantage", "answer"} for s in samples)
    stages = [m[k] for k in ("time_generate", "time_reward", "time_score", "time_update")]
    assert min(stages) > 0 and sum(stages) <= m["step_time"]  # the four stages, within the step


def test_the_stage_timer_adds_up_each_stage():
    import time

    timer = StageTimer()
    timer.add("generate", 1.5)
    timer.add("generate", 0.5)  # dynamic sampling's draws add up
    for _ in range(2):
        with timer("score"):
            time.sleep(0.01)
    assert timer["generate"] == 2.0 and timer["score"] >= 0.02
    assert set(timer.finish()) == {"generate", "score", "step"} and timer["step"] >= timer["score"]


@pytest.mark.parametrize("cpu_lanes", [1, 2])
def test_numpy_logsumexp_serves_rollout_and_reference_never_the_traced_update(small_model_dir, monkeypatch, cpu_lanes):
    """fastmath.logsumexp evaluates its input: inside the update's gradient trace that would keep
    every intermediate alive (15.7 GB instead of 4.1 on the 0.5B shape), so only the blocks
    marked eager (rollout, reference pass) may take it; a reference pass in two lanes does not
    either (an evaluation before both lanes are queued would run them one after the other)."""
    from mlx_grpo import lanes
    import mlx.nn as nn
    import mlx.optimizers as optim

    from mlx_grpo import fastmath, learner
    from mlx_grpo.models import attach_adapters, load_model
    from mlx_grpo.tasks import load_task

    monkeypatch.setattr(fastmath, "on_cpu", lambda: True)  # the CPU path on any backend
    monkeypatch.setattr(fastmath, "NUMPY_MIN_LOGITS", 0)  # at every size
    monkeypatch.setattr("mlx_grpo.rollout.NATIVE", False)  # MLX's decode steps (the C step has its own)
    monkeypatch.setattr("mlx_grpo.native_forward.NATIVE", False)  # and MLX's reference pass
    monkeypatch.setattr("mlx_grpo.native_grad.NATIVE", False)  # and MLX's update, the traced pass
    calls = {"eager": 0, "traced": 0}
    real_rows, real_vag = fastmath._lse_rows, nn.value_and_grad
    tracing = [False]

    def spy(x):
        calls["traced" if tracing[0] else "eager"] += 1
        return real_rows(x)

    def traced_value_and_grad(model, fn):
        vag = real_vag(model, fn)

        def run(*a, **k):
            tracing[0] = True
            try:
                return vag(*a, **k)
            finally:
                tracing[0] = False
        return run

    monkeypatch.setattr(fastmath, "_lse_rows", spy)
    monkeypatch.setattr(learner.nn, "value_and_grad", traced_value_and_grad)
    monkeypatch.setattr(lanes, "count", lambda rows, wanted=2: min(rows, wanted))  # on any machine
    cfg = make_config(None, [("model.path", str(small_model_dir)), ("rollout.group_size", G),
                             ("rollout.max_tokens", 4), ("train.prompts_per_step", 2), ("data.max_operand", 9),
                             ("data.eval_size", 10), ("grpo.beta", 0.1), ("grpo.skip_zero_advantage", False),
                             ("train.cpu_lanes", cpu_lanes)])
    model, tok = load_model(ModelConfig(path=str(small_model_dir)))
    attach_adapters(model, cfg.adapter)
    rows = load_task(cfg.data).train[:2]
    m, _ = grpo_step(policy(model, tok, cfg), optim.AdamW(learning_rate=1e-3), rows, cfg)
    assert m["rows_updated"] == 8 and np.isfinite(m["loss"])
    # the rollout's prefill and decode steps (4 new tokens), and the reference pass in one lane
    assert calls["eager"] == 4 + (cpu_lanes == 1)
    assert calls["traced"] == 0
