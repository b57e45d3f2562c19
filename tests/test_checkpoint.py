"""Checkpoints on a small real model: a save/load round trip continues bit for bit, saves are
atomic and pruned, non-finite weights are never written, and a run interrupted by a real SIGINT
and resumed gives the same metrics and weights as a run that was never interrupted."""

import json
import signal

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from mlx_grpo.checkpoint import (
    RunState,
    checkpoints,
    latest_checkpoint,
    load_checkpoint,
    resume_config,
    rng_key,
    save_checkpoint,
)
from mlx_grpo.config import ConfigError, make_config
from mlx_grpo.interrupts import Interrupted
from mlx_grpo.models import NonFiniteError, attach_adapters, load_model
from mlx_grpo.trainer import make_schedule, prompt_batches, train


def setup(small_model_dir, tmp_path, seed=0):
    cfg = make_config(None, [("model.path", str(small_model_dir)), ("output.dir", str(tmp_path / "run")),
                             ("output.keep_checkpoints", 2), ("train.lr_schedule", "cosine")])
    model, _ = load_model(cfg.model)
    mx.random.seed(seed)
    attach_adapters(model, cfg.adapter)
    opt = optim.AdamW(learning_rate=make_schedule(cfg.train, 20))
    opt.init(model.trainable_parameters())
    return cfg, model, opt


def fake_grads(model, seed):
    """Gradients of the right shapes, different per seed (the optimizer's path does not care
    where they come from)."""
    k = mx.random.key(seed)
    return tree_map(lambda p: mx.random.normal(p.shape, key=k), model.trainable_parameters())


def params(model):
    return {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}


def test_round_trip_continues_bit_for_bit(small_model_dir, tmp_path):
    cfg, model, opt = setup(small_model_dir, tmp_path)
    for s in range(3):
        opt.update(model, fake_grads(model, s))
    mx.random.uniform(shape=(5,))  # move the global PRNG away from its seed
    path = save_checkpoint(tmp_path / "run", model, opt, cfg, RunState(step=3, batches_drawn=3, rng_key=rng_key()))
    draw_a = mx.random.uniform(shape=(4,))
    opt.update(model, fake_grads(model, 9))
    after_a, lr_a = params(model), opt.learning_rate.item()

    cfg2, model2, opt2 = setup(small_model_dir, tmp_path, seed=123)  # other initial adapters
    state = load_checkpoint(path, model2, opt2)
    assert state.step == 3 and int(opt2.step.item()) == 3
    assert np.array_equal(np.array(mx.random.uniform(shape=(4,))), np.array(draw_a))
    opt2.update(model2, fake_grads(model2, 9))
    after_b = params(model2)
    assert opt2.learning_rate.item() == lr_a  # the schedule continues from the saved step
    for k in after_a:
        assert np.array_equal(after_a[k], after_b[k]), k


def test_saves_are_pruned_and_leftovers_ignored(small_model_dir, tmp_path):
    cfg, model, opt = setup(small_model_dir, tmp_path)
    run = tmp_path / "run"
    for step in (1, 2, 3):
        save_checkpoint(run, model, opt, cfg, RunState(step=step))
    assert [p.name for p in checkpoints(run)] == ["step_000002", "step_000003"]
    # What a save killed half-way leaves: a hidden directory with some of the files.
    killed = run / "checkpoints" / ".tmp-step_000009-1"
    killed.mkdir()
    (killed / "adapters.safetensors").write_bytes(b"\0" * 10)
    assert latest_checkpoint(run).name == "step_000003"
    save_checkpoint(run, model, opt, cfg, RunState(step=4))
    assert not killed.exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000003", "step_000004"]
    save_checkpoint(run, model, opt, cfg, RunState(step=4, batches_drawn=7))  # the same step again
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000003", "step_000004"]
    assert json.loads((run / "checkpoints" / "step_000004" / "state.json").read_text())["batches_drawn"] == 7


def test_non_finite_weights_are_never_written(small_model_dir, tmp_path):
    cfg, model, opt = setup(small_model_dir, tmp_path)
    run = tmp_path / "run"
    good = save_checkpoint(run, model, opt, cfg, RunState(step=1))
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    name, value = next((k, v) for k, v in tree_flatten(model.trainable_parameters()) if k.endswith("lora_b"))
    model.load_weights([(name, mx.full(value.shape, float("nan")))], strict=False)
    with pytest.raises(NonFiniteError, match="lora_b holds NaN"):
        save_checkpoint(run, model, opt, cfg, RunState(step=2))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000001"]
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before


def test_prompt_batches_skip_continues_the_same_order():
    rows = [{"prompt": str(i)} for i in range(7)]
    full = prompt_batches(rows, 3, seed=4)
    whole = [[r["prompt"] for r in next(full)] for _ in range(6)]
    resumed = prompt_batches(rows, 3, seed=4, skip=4)
    assert [[r["prompt"] for r in next(resumed)] for _ in range(2)] == whole[4:]


REWARD = """
import os, signal
calls = 0
def length(prompts, completions, **kw):
    global calls
    calls += 1
    if os.environ.get("TEST_SIGINT_AT_CALL") == str(calls):
        os.kill(os.getpid(), signal.SIGINT)   # a real Ctrl-C, delivered in the middle of a step
    return [min(len(c), 40) / 40 for c in completions]
"""


def config(small_model_dir, tmp_path, name, *overrides):
    reward = tmp_path / "rw.py"
    reward.write_text(REWARD)
    return make_config(None, [
        ("model.path", str(small_model_dir)), ("output.dir", str(tmp_path / name)),
        ("train.steps", 4), ("train.prompts_per_step", 4), ("rollout.group_size", 4),
        ("rollout.max_tokens", 8), ("rollout.stop", []), ("data.max_operand", 9),
        ("data.eval_size", 10), ("output.progress", False), ("output.eval_size", 4),
        ("output.save_every", 0), ("rewards", {f"{reward}:length": 1.0}),
        ("train.learning_rate", 1e-2), ("train.lr_schedule", "cosine"), ("train.warmup_steps", 1),
        ("adapter.dropout", 0.1), *overrides])


def lines(run, name="metrics.jsonl"):
    return [json.loads(x) for x in (run / name).read_text().splitlines()]


def test_interrupted_and_resumed_run_equals_uninterrupted(small_model_dir, tmp_path, monkeypatch):
    train(config(small_model_dir, tmp_path, "straight"), say=lambda s: None)

    # Reward calls: 1 = the step-0 evaluation (it reports reward means), 2 = step 1, 3 = step 2.
    monkeypatch.setenv("TEST_SIGINT_AT_CALL", "3")
    # What the run must restore is the handler it found: SIG_IGN under nohup or `cmd &` in a script.
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(Interrupted) as e:
        train(config(small_model_dir, tmp_path, "cut"), say=lambda s: None)
    assert e.value.exit_code == 130 and e.value.checkpoint.name == "step_000002"
    assert "resume with: python cli.py train --resume" in str(e.value)
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored
    monkeypatch.delenv("TEST_SIGINT_AT_CALL")
    train(resume_config(str(tmp_path / "cut"), []), say=lambda s: None, resume=True)

    a, b = lines(tmp_path / "straight"), lines(tmp_path / "cut")
    assert [(x["kind"], x["step"]) for x in b] == [(x["kind"], x["step"]) for x in a]
    assert [x["step"] for x in lines(tmp_path / "cut", "samples.jsonl")] == \
        [x["step"] for x in lines(tmp_path / "straight", "samples.jsonl")]
    train_a = [x for x in a if x["kind"] == "train"]
    train_b = [x for x in b if x["kind"] == "train"]
    assert any(x["rows_updated"] for x in train_a[2:])  # the resumed steps really trained
    assert len({x["loss"] for x in train_a}) > 1
    for x, y in zip(train_a, train_b):
        for key in ("loss", "reward_mean", "kl", "grad_norm", "completion_length", "learning_rate",
                    "rows_updated", "ratio_mean"):
            assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-7), (x["step"], key)
    wa = mx.load(str(tmp_path / "straight" / "adapters.safetensors"))
    wb = mx.load(str(tmp_path / "cut" / "adapters.safetensors"))
    for k in wa:
        assert mx.allclose(wa[k], wb[k], atol=1e-6).item(), k
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert summary["reward_first"] == pytest.approx(train_a[0]["reward_mean"])


def test_resume_refuses_changes_to_what_the_run_learns(small_model_dir, tmp_path):
    cfg = config(small_model_dir, tmp_path, "r", ("train.steps", 1))
    train(cfg, say=lambda s: None)
    with pytest.raises(ConfigError, match=r"^train.learning_rate: --resume continues the run"):
        resume_config(str(tmp_path / "r"), [("train.learning_rate", 0.5)])
    with pytest.raises(ConfigError, match=r"^rewards: --resume"):
        resume_config(str(tmp_path / "r"), [("rewards.format", 1.0)])
    ok = resume_config(str(tmp_path / "r"), [("train.steps", 3), ("train.grad_accumulation_steps", 2),
                                             ("output.save_every", 1)])
    assert ok.train.steps == 3 and ok.output.dir == str(tmp_path / "r")


HUGE = """
calls = 0
def huge(prompts, completions, **kw):
    # Finite for Python (float64), infinite once the advantages become float32: the loss is not finite.
    global calls
    calls += 1
    if calls in ONLY or not ONLY:
        return [1e300 if i % 2 else 0.0 for i in range(len(completions))]
    return [min(len(c), 40) / 40 for c in completions]
"""


def nan_config(small_model_dir, tmp_path, name, only, *overrides):
    reward = tmp_path / f"{name}.py"
    reward.write_text(f"ONLY = {only!r}\n" + HUGE)
    return config(small_model_dir, tmp_path, name, ("rewards", {f"{reward}:huge": 1.0}),
                  ("grpo.scale_rewards", "none"), *overrides)


def test_non_finite_step_is_skipped_counted_and_the_run_goes_on(small_model_dir, tmp_path):
    # Reward call 1 is the step-0 evaluation (it reports reward means); call 3 is step 2.
    summary = train(nan_config(small_model_dir, tmp_path, "once", [3], ("output.save_every", 1)), say=lambda s: None)
    steps = [x for x in lines(tmp_path / "once") if x["kind"] == "train"]
    assert [x["skipped_updates"] for x in steps] == [0, 1, 0, 0]
    assert not np.isfinite(steps[1]["loss"]) or not np.isfinite(steps[1]["grad_norm"])
    assert summary["skipped_updates"] == 1
    for k, v in mx.load(str(tmp_path / "once" / "adapters.safetensors")).items():
        assert mx.isfinite(v).all().item(), k


def test_non_finite_steps_in_a_row_stop_the_run(small_model_dir, tmp_path):
    cfg = nan_config(small_model_dir, tmp_path, "always", [], ("train.max_nonfinite_steps", 2))
    with pytest.raises(NonFiniteError, match=r"stopped at step 2: 2 steps in a row had a non-finite loss"):
        train(cfg, say=lambda s: None)
    steps = [x for x in lines(tmp_path / "always") if x["kind"] == "train"]
    assert [x["skipped_updates"] for x in steps] == [1, 1]
