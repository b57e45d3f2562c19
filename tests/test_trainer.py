"""The training loop on a small real model: clipping acts only when rollouts are reused,
micro-batching matches one batch, and gradient checkpointing changes nothing numerically."""

import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_grpo.config import make_config
from mlx_grpo.trainer import make_schedule, prompt_batches, train

from conftest import off_reference_rollouts, tol


def run(small_model_dir, tmp_path, name, *overrides, reward="length"):
    reward_file = tmp_path / "rw.py"
    reward_file.write_text(
        "def length(prompts, completions, **kw):\n    return [min(len(c), 40) / 40 for c in completions]\n")
    cfg = make_config(None, [
        ("model.path", str(small_model_dir)), ("output.dir", str(tmp_path / name)),
        ("train.steps", 3), ("train.prompts_per_step", 4), ("rollout.group_size", 4),
        ("rollout.max_tokens", 8), ("rollout.stop", []), ("data.max_operand", 9),
        ("data.eval_size", 10), ("output.progress", False), ("output.eval_size", 4),
        ("rewards", {f"{reward_file}:length": 1.0}), ("train.learning_rate", 1e-2), *overrides])
    train(cfg, say=lambda s: None)
    out = tmp_path / name
    steps = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return [s for s in steps if s["kind"] == "train"], mx.load(str(out / "adapters.safetensors"))


def test_single_update_ratio_is_one_and_never_clips(small_model_dir, tmp_path):
    steps, _ = run(small_model_dir, tmp_path, "mu1")
    assert all(s["ratio_mean"] == 1.0 and s["clip_fraction"] == 0.0 for s in steps)
    assert any(s["rows_updated"] > 0 for s in steps)


def test_reused_rollouts_move_the_ratio_and_clipping_acts(small_model_dir, tmp_path):
    steps, _ = run(small_model_dir, tmp_path, "mu4", ("grpo.num_iterations", 4), ("grpo.epsilon", 0.05))
    assert any(s["ratio_mean"] != 1.0 for s in steps)
    assert max(s["clip_fraction"] for s in steps) > 0


def test_grad_accumulation_equals_one_batch(small_model_dir):
    """Four micro-batches give the same gradient as one batch (SGD with lr 1 applies it as is;
    Adam would turn rounding noise in near-zero gradients into full-size steps)."""
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten

    from mlx_grpo.config import ModelConfig
    from mlx_grpo.models import adapters_disabled, attach_adapters, load_model
    from mlx_grpo.rollout import sample_groups
    from mlx_grpo.learner import logprobs_of, select_rows, update

    results = []
    for micro in (1, 4):
        cfg = make_config(None, [("rollout.group_size", 4), ("rollout.max_tokens", 8), ("rollout.stop", []),
                                 ("train.prompts_per_step", 4), ("train.grad_accumulation_steps", micro),
                                 ("train.max_grad_norm", 0.0), ("grpo.beta", 0.1)])
        model, tok = load_model(ModelConfig(path=str(small_model_dir)))
        mx.random.seed(0)
        attach_adapters(model, cfg.adapter)
        ro = sample_groups(model, tok, ["What is 1 + 2 ?", "3 + 4 =", "What is 5 + 5 ?", "2 +"], cfg.rollout)
        adv = np.tile(np.array([1.0, -1.0, 0.5, -0.5], dtype=np.float32), 4)
        batch = select_rows(ro, adv, np.arange(16))
        with adapters_disabled(model):
            batch.ref_logp = logprobs_of(model, batch, 1.0, 16)
        before = {k: mx.array(v) for k, v in tree_flatten(model.trainable_parameters())}
        update(model, optim.SGD(learning_rate=1.0), batch, cfg)
        after = dict(tree_flatten(model.trainable_parameters()))
        results.append({k: after[k] - before[k] for k in after})
    for k in results[0]:
        g1, g4 = results[0][k], results[1][k]
        if k.endswith("lora_b"):  # lora_a's gradient is zero while lora_b is (LoRA's init)
            assert mx.abs(g1).max().item() > 0, k
        assert mx.allclose(g1, g4, rtol=tol(1e-4, 1e-2), atol=tol(1e-7, 1e-5)).item(), k


@pytest.mark.parametrize("micro", [1, 2])
def test_update_reports_the_kl_of_the_rows_it_updated(small_model_dir, micro):
    """skip_zero_advantage: the loss is normalised by the whole step (flat rows count), but the KL
    the update reports is the token mean over the rows it scored, against NumPy's k3 on them, with
    any number of micro-batches; not diluted by the rows left out."""
    import mlx.optimizers as optim

    from mlx_grpo.learner import logprobs_of, select_rows, step_normalizer, update
    from mlx_grpo.models import adapters_disabled

    cfg = make_config(None, [("rollout.group_size", 4), ("rollout.max_tokens", 8), ("rollout.stop", []),
                             ("train.prompts_per_step", 4), ("train.grad_accumulation_steps", micro),
                             ("grpo.beta", 0.1), ("grpo.kl_clamp", None), ("grpo.skip_zero_advantage", True)])
    model, ro = off_reference_rollouts(small_model_dir, cfg)
    adv = np.concatenate([np.zeros(8), np.tile([1.0, -1.0, 0.5, -0.5], 2)]).astype(np.float32)  # 2 flat groups
    keep = np.arange(8, 16)
    batch = select_rows(ro, adv, keep)
    with adapters_disabled(model):
        batch.ref_logp = logprobs_of(model, batch, 1.0, 16)
    logp = np.array(logprobs_of(model, batch, 1.0, 16))
    mask = np.array(batch.mask)
    d = np.array(batch.ref_logp) - logp
    want = float(((np.exp(d) - d - 1) * mask).sum() / mask.sum())
    assert want > 1e-4
    all_tokens = float(np.array(select_rows(ro, adv, np.arange(16)).mask).sum())
    norm = step_normalizer([keep.size], all_tokens, cfg, 16)  # as the step sizes it: every row counted
    stats = update(model, optim.SGD(learning_rate=0.0), batch, cfg, norm)
    assert stats["kl"] == pytest.approx(want, rel=tol(1e-4, 1e-2))
    assert stats["ratio_mean"] == pytest.approx(1.0, rel=1e-5)


def test_grad_checkpoint_gives_same_result(small_model_dir, tmp_path):
    import os
    import subprocess
    import sys

    from mlx_grpo import native_grad

    # Checkpointing patches the layer class, so each variant runs in its own process.
    outs = []
    for flag in ("false", "true"):
        out = tmp_path / f"ckpt-{flag}"
        r = subprocess.run([sys.executable, "cli.py", "train", "--model", str(small_model_dir),
                            "--output", str(out), "--steps", "2", "--batch-size", "2", "-G", "4",
                            "--max-tokens", "8", "--no-progress", "--set", "data.max_operand=9",
                            "--set", "data.eval_size=10", "--set", "output.eval_size=4",
                            "--set", "rewards.tag_count=1", "--set", "rewards.soft_format=1",
                            "--set", f"train.grad_checkpoint={flag}"],
                           capture_output=True, text=True, cwd=str(__import__("conftest").ROOT),
                           env={**os.environ, native_grad.OFF: "1"})  # both runs through MLX's graph (the
        # update in C keeps no checkpoints and serves only the other run; tests/test_native_grad.py)
        assert r.returncode == 0, r.stderr
        outs.append(mx.load(str(out / "adapters.safetensors")))
    for k in outs[0]:
        assert mx.allclose(outs[0][k], outs[1][k], atol=1e-6).item(), k


def test_schedule_warmup_then_decay():
    cfg = make_config(None, [("train.learning_rate", 1.0), ("train.warmup_steps", 4),
                             ("train.lr_schedule", "cosine")]).train
    s = make_schedule(cfg, 20)
    lrs = [float(s(mx.array(i)).item()) for i in range(20)]
    assert lrs[0] == pytest.approx(0.25) and lrs[3] == pytest.approx(1.0)
    assert lrs[4] == pytest.approx(1.0) and lrs[-1] < 0.05
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))


def test_prompt_batches_cover_each_epoch_once():
    rows = [{"prompt": str(i)} for i in range(10)]
    it = prompt_batches(rows, 5, seed=1)
    first_epoch = [r["prompt"] for _ in range(2) for r in next(it)]
    assert sorted(first_epoch) == sorted(r["prompt"] for r in rows)


def test_explicit_reference_model_matches_adapters_off(small_model_dir, tmp_path):
    """Loading the base again as an explicit reference gives the same KL as switching adapters off."""
    a, wa = run(small_model_dir, tmp_path, "ref-off", ("grpo.beta", 0.5))
    b, wb = run(small_model_dir, tmp_path, "ref-explicit", ("grpo.beta", 0.5),
                ("model.reference", str(small_model_dir)))
    assert [s["kl"] for s in a] == pytest.approx([s["kl"] for s in b], rel=tol(1e-5, 1e-2), abs=1e-8)
    assert max(s["kl"] for s in a) > 0
    for k in wa:
        assert mx.allclose(wa[k], wb[k], atol=tol(1e-6, 1e-4)).item(), k
