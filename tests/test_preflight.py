"""Checks before the first step: the memory estimate against a real KV cache, the warning, the
machine's memory, the prompt-length check, and what an out-of-memory failure tells the user."""

import json

import mlx.core as mx
import pytest

from mlx_grpo import trainer
from mlx_grpo.config import make_config
from mlx_grpo.forward import batch_cache
from mlx_grpo.memory import available_memory
from mlx_grpo.models import attach_adapters, load_model
from mlx_grpo.preflight import (
    OutOfMemory,
    check_prompts,
    context_length,
    estimate_memory,
    is_out_of_memory,
    memory_report,
)
from mlx_grpo.tasks import DataError, TaskData
from mlx_grpo.tasks.templates import prompter


def loaded(small_model_dir, *overrides):
    cfg = make_config(None, [("model.path", str(small_model_dir)), *overrides])
    model, tok = load_model(cfg.model)
    attach_adapters(model, cfg.adapter)
    return cfg, model, tok


def test_kv_cache_estimate_matches_a_real_cache(small_model_dir):
    cfg, model, _ = loaded(small_model_dir, ("train.prompts_per_step", 3), ("rollout.group_size", 2),
                           ("rollout.max_tokens", 5))
    prompt = 7
    est = estimate_memory(model, cfg, prompt)
    rows, T = 3 * 2, prompt + 5
    cache = batch_cache(model, [0] * rows)
    model(mx.zeros((rows, T), dtype=mx.int32), cache=cache)
    real = sum(c.keys[..., :T, :].nbytes + c.values[..., :T, :].nbytes for c in cache)
    assert est["kv_cache"] == real
    assert est["weights"] == sum(v.nbytes for _, v in __import__("mlx.utils").utils.tree_flatten(model.parameters()))
    assert est["activations"] > 0 and est["training"] > 0
    fewer = estimate_memory(model, make_config(None, [("train.prompts_per_step", 3), ("rollout.group_size", 2),
                            ("rollout.max_tokens", 5), ("train.grad_accumulation_steps", 3)]), prompt)
    assert fewer["activations"] < est["activations"] and fewer["kv_cache"] == est["kv_cache"]


def test_fast_mlps_save_one_ffn_value_per_position_in_the_estimate(embedded_model_dir, monkeypatch):
    from mlx_grpo import fastmath
    from mlx_grpo.config import ModelConfig
    from mlx_grpo.preflight import FAST_MLP_SAVES

    cfg = make_config(None, [("model.path", str(embedded_model_dir)), ("train.prompts_per_step", 2),
                             ("rollout.group_size", 4), ("rollout.max_tokens", 16)])
    fast, _ = load_model(cfg.model)
    stock, _ = load_model(ModelConfig(path=str(embedded_model_dir), fast_mlp=False))
    a = fast.args
    positions = 2 * 30 + 8 * 16  # each prompt once, every completion
    saved = estimate_memory(stock, cfg, 30)["activations"] - estimate_memory(fast, cfg, 30)["activations"]
    want = a.num_hidden_layers * positions * FAST_MLP_SAVES * a.intermediate_size * 4
    assert saved == pytest.approx(want) and want > 0
    monkeypatch.setattr(fastmath, "on_cpu", lambda: False)  # Metal/CUDA: MLX's silu, no saving
    assert estimate_memory(fast, cfg, 30) == estimate_memory(stock, cfg, 30)


def test_memory_warning_names_the_settings_to_lower(small_model_dir):
    cfg, model, _ = loaded(small_model_dir, ("train.micro_batch", "fixed"))  # auto fits it instead
    est = estimate_memory(model, cfg, 50)
    assert len(memory_report(est, 1e12, cfg)) == 1
    assert len(memory_report(est, 1.0, make_config(None, []))) == 1
    lines = memory_report(est, 1.0, cfg)
    assert lines[1].startswith("warning: this batch may not fit in memory")
    assert "rollout.group_size (8)" in lines[1] and "train.grad_accumulation_steps (1)" in lines[1]
    assert available_memory() > 0  # this machine's free memory is known (Linux: /proc/meminfo)


def test_prompt_too_long_names_the_row(small_model_dir):
    cfg, model, tok = loaded(small_model_dir, ("rollout.max_tokens", 10))
    limit = context_length(model)
    assert limit == 512
    ok = [{"prompt": "1 + 1"}]
    long = [{"prompt": " ".join(["1 + 1"] * 200)}]
    assert 0 < check_prompts(tok, model, TaskData(ok, ok), prompter(cfg.prompt, tok), cfg) < 100
    with pytest.raises(DataError, match=r"data \(arithmetic, held-out row 0\): the prompt is \d+ tokens; "
                                        r"with output.eval_max_tokens 10 it exceeds the model's context of 512"):
        check_prompts(tok, model, TaskData(ok, long), prompter(cfg.prompt, tok), cfg)


@pytest.mark.parametrize("message,oom", [
    ("[metal::malloc] Attempting to allocate 34359738368 bytes which is greater than the maximum allowed "
     "buffer size of 28991029248 bytes.", True),
    ("[METAL] Command buffer execution failed: Insufficient Memory "
     "(00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)", True),
    ("[malloc] Unable to allocate 1073741824 bytes.", True),
    ("[matmul] Last dimension of first input with shape (2,3) must match second to last", False),
])
def test_out_of_memory_is_recognised(message, oom):
    assert is_out_of_memory(RuntimeError(message)) is oom
    assert is_out_of_memory(MemoryError())


def test_out_of_memory_in_a_step_says_what_to_lower(small_model_dir, tmp_path, monkeypatch):
    """MLX's CPU backend on Linux cannot be driven out of memory safely (the kernel kills the
    process), so the allocator's error is raised where MLX raises it: inside a step."""
    real_step = trainer.grpo_step
    calls = []

    def step(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("[metal::malloc] Resource limit (499000) exceeded.")
        return real_step(*a, **k)

    monkeypatch.setattr(trainer, "grpo_step", step)
    cfg = make_config(None, [("model.path", str(small_model_dir)), ("output.dir", str(tmp_path / "r")),
                             ("train.steps", 4), ("train.prompts_per_step", 2), ("rollout.group_size", 2),
                             ("rollout.max_tokens", 4), ("output.save_every", 1), ("output.eval_size", 2),
                             ("data.max_operand", 9), ("data.eval_size", 10), ("output.progress", False)])
    with pytest.raises(OutOfMemory) as e:
        trainer.train(cfg, say=lambda s: None)
    msg = str(e.value)
    assert msg.startswith("out of memory in step 3 ([metal::malloc] Resource limit (499000) exceeded.)")
    assert "lower rollout.group_size (2), train.prompts_per_step (2) or rollout.max_tokens (4)" in msg
    assert f"train --resume {tmp_path / 'r'} --set train.grad_accumulation_steps=N" in msg
    assert "\n" not in msg
    steps = [json.loads(x)["step"] for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2]


@pytest.mark.parametrize("beta,checkpoint,micro_batches,prompts,max_tokens", [
    (0.0, False, 1, 4, 64), (0.1, False, 2, 4, 64), (0.1, True, 1, 4, 64),
    (0.1, False, 1, 1, 512),  # long completions: the attention scores, quadratic in length, dominate
])
def test_estimate_is_within_a_quarter_of_the_measured_peak(embedded_model_dir, beta, checkpoint, micro_batches,
                                                          prompts, max_tokens, monkeypatch):
    """The trainer's real update through MLX (micro-batches, gradient sum, AdamW) on full-length
    completions: mx.get_peak_memory against the preflight estimate of the same step, as a ratio.
    (The update in C keeps its activations outside MLX, fewer of them: tests/test_native_grad.py.)"""
    import mlx.optimizers as optim

    from mlx_grpo import native_grad

    from mlx_grpo.microbatch import dry_batch
    from mlx_grpo.forward import enable_grad_checkpoint
    from mlx_grpo.preflight import estimate_total
    from mlx_grpo.learner import update

    cfg, model, _ = loaded(embedded_model_dir, ("train.prompts_per_step", prompts), ("rollout.group_size", 4),
                           ("rollout.max_tokens", max_tokens), ("grpo.beta", beta), ("train.grad_checkpoint", checkpoint),
                           ("train.grad_accumulation_steps", micro_batches))
    monkeypatch.setattr(native_grad, "NATIVE", False)
    if checkpoint:
        enable_grad_checkpoint(model)
    prompt = 90
    batch = dry_batch(cfg, model.args.vocab_size, prompt, prompts * 4)
    opt = optim.AdamW(learning_rate=1e-4)
    opt.init(model.trainable_parameters())
    mx.eval(opt.state)
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    model.train()
    update(model, opt, batch, cfg)
    measured = mx.get_peak_memory()
    ratio = estimate_total(estimate_memory(model, cfg, prompt)) / measured
    print(f"estimate / measured peak = {ratio:.3f}")
    assert 0.75 <= ratio <= 1.25, f"estimate / measured peak = {ratio:.2f}"
