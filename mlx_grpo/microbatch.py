"""``train.micro_batch: auto``: fit a step to memory, measured, before the first step.

The update's activations are most of a step's memory, and they scale with the rows of one
micro-batch. Before the first step a dry update micro-batch (forward and backward, no optimizer
update) runs on the longest prompt with completions of ``rollout.max_tokens`` (the worst case: a
random or untrained policy often runs to the limit), and its peak memory (``mx.get_peak_memory``,
which counts the weights and the optimizer state already held) is compared with the memory the
run can use, less a margin. The first of ``grad_accumulation_steps`` = configured, then each larger
divisor of ``train.prompts_per_step``, that fits is kept; when none does, ``grad_checkpoint`` is
switched on and the divisors are tried again. Micro-batching leaves the gradient as it is (the
loss is normalised over the whole step), so only memory and speed change.

The rollout's KV cache cannot be micro-batched: when it does not fit, the run stops too. When the
preflight estimate is under half the room, the configured micro-batching is kept without a dry step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, List

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from . import lanes
from .checkpoint import restore_rng_key, rng_key
from .config import Config, ConfigError
from .forward import enable_grad_checkpoint
from .learner import StepBatch, lane_value_and_grad, pass_lanes
from .loss import Normalizer
from .memory import GB, MARGIN, memory_budget
from .preflight import estimate_memory, estimate_total, lower_settings

# The dry step runs only when the preflight estimate (within +-25% of the measured peak) exceeds
# this share of the room: below it the configured micro-batching fits whatever the estimate's error.
SURE = 0.5


class DoesNotFit(ConfigError):
    """Even the smallest micro-batch (with grad_checkpoint) does not fit; names what to lower."""


@dataclass
class Fit:
    grad_accumulation_steps: int
    grad_checkpoint: bool
    peak: float  # measured peak of the dry micro-batch, bytes (with the accumulated gradients)
    rollout: float  # estimated peak of the rollout, bytes
    budget: float  # bytes the step may use (MARGIN x what is available)
    tried: List[str]  # "N (M rows): X GB" per measured candidate

    def line(self, configured: int) -> str:
        what = ("kept" if self.grad_accumulation_steps == configured else "chose") + \
            f" grad_accumulation_steps={self.grad_accumulation_steps}"
        if self.grad_checkpoint:
            what += " and grad_checkpoint=true"
        return (f"micro_batch auto: {what}: an update micro-batch peaks at {self.peak / GB:.2f} GB, "
                f"the rollout at ~{self.rollout / GB:.2f} GB, within {self.budget / GB:.2f} GB "
                f"({MARGIN:.0%} of the memory available; measured: {', '.join(self.tried)})")


def divisors_from(n: int, start: int) -> List[int]:
    """The divisors of ``n`` that are at least ``start``, ascending."""
    return [d for d in range(start, n + 1) if n % d == 0]


def dry_batch(cfg: Config, vocab: int, prompt_tokens: int, rows: int):
    """A worst-case update micro-batch: ``rows`` rows of ceil(rows / G) distinct prompts of
    ``prompt_tokens`` tokens (no shared prefix), each completion ``max_tokens`` tokens long."""
    G = cfg.rollout.group_size
    U = math.ceil(rows / G)
    rng = np.random.default_rng(0)  # token values don't change memory; NumPy keeps MLX's PRNG as it is
    prompts = mx.array(rng.integers(0, vocab, (U, max(prompt_tokens, 1))), dtype=mx.int32)
    T = cfg.rollout.max_tokens
    tokens = mx.array(rng.integers(0, vocab, (rows, T)), dtype=mx.int32)
    zeros = mx.zeros((rows, T))
    return StepBatch(
        prompts=prompts, left_padding=[0] * U, row_prompt=np.arange(rows) // G, tokens=tokens,
        mask=mx.ones((rows, T)), advantages=mx.ones((rows,)),
        ref_logp=zeros if cfg.grpo.beta > 0 else None,
        old_logp=zeros if cfg.grpo.num_iterations > 1 else None,
    )


def dry_step_peak(model: nn.Module, cfg: Config, prompt_tokens: int, rows: int) -> float:
    """Peak bytes of one update micro-batch of ``rows`` rows (forward + backward, gradients kept,
    plus one more copy of them: the sum being accumulated). Leaves the weights and MLX's PRNG
    as they were."""
    b = dry_batch(cfg, max(_vocab(model), 2), prompt_tokens, rows)
    norm = Normalizer(float(rows), float(rows * cfg.rollout.max_tokens), cfg.rollout.max_tokens, 1)

    key = rng_key()
    training = model.training
    model.train()
    try:
        mx.synchronize()
        mx.clear_cache()
        mx.reset_peak_memory()
        n_lanes = pass_lanes(cfg, rows)  # as the update runs it: lanes hold both halves at once
        with lanes.single_blas(n_lanes > 1):
            loss, _, grads = lane_value_and_grad(model, b, cfg, norm, n_lanes)
            mx.eval(loss, grads)
        peak = mx.get_peak_memory() + sum(g.nbytes for _, g in tree_flatten(grads))
    finally:
        model.train(training)
        restore_rng_key(key)
    del grads, loss
    mx.clear_cache()
    return float(peak)


def choose(model: nn.Module, cfg: Config, prompt_tokens: int, budget: float) -> Fit:
    """The first (grad_accumulation_steps, grad_checkpoint) whose dry micro-batch fits in
    ``MARGIN x budget``; raises ``DoesNotFit`` naming the settings to lower when none does.
    Trying grad_checkpoint switches it on in ``model`` (``forward.enable_grad_checkpoint``)."""
    t = cfg.train
    rows = t.prompts_per_step * cfg.rollout.group_size
    room = MARGIN * budget
    est = estimate_memory(model, cfg, prompt_tokens)
    rollout = mx.get_active_memory() + est["kv_cache"] + est["decode_logits"]
    if rollout > room:
        raise DoesNotFit(
            f"train.micro_batch: the rollout alone needs ~{rollout / GB:.2f} GB (its KV cache "
            f"{est['kv_cache'] / GB:.2f} GB) of {room / GB:.2f} GB; {lower_settings(cfg)}")
    tried: List[str] = []
    peak = 0.0
    for ckpt in ([t.grad_checkpoint] if t.grad_checkpoint else [False, True]):
        if ckpt:
            enable_grad_checkpoint(model)
        for n in divisors_from(t.prompts_per_step, t.grad_accumulation_steps):
            m = math.ceil(rows / n)
            peak = dry_step_peak(model, cfg, prompt_tokens, m)
            tried.append(f"{n} ({m} rows{', checkpointed' if ckpt else ''}): {peak / GB:.2f} GB")
            if peak <= room:
                return Fit(n, ckpt, peak, rollout, room, tried)
    smallest = math.ceil(rows / t.prompts_per_step)
    raise DoesNotFit(
        f"train.micro_batch: one update micro-batch of {smallest} rows (grad_checkpoint on) peaks "
        f"at {peak / GB:.2f} GB, more than {room / GB:.2f} GB ({MARGIN:.0%} of the memory "
        f"available); lower rollout.group_size ({cfg.rollout.group_size}) or rollout.max_tokens "
        f"({cfg.rollout.max_tokens})")


def _vocab(model: nn.Module) -> int:
    return int(getattr(getattr(model, "args", None), "vocab_size", 0) or 0)


def fit_micro_batch(model: nn.Module, cfg: Config, prompt_tokens: int,
                    say: Callable[[str], None] = lambda _: None) -> Config:
    """``cfg`` with the micro-batching ``choose`` picks (said in one line); unchanged when
    ``train.micro_batch`` is fixed or the memory available is unknown."""
    if cfg.train.micro_batch != "auto":
        return cfg
    budget = memory_budget()
    if budget is None:
        say("micro_batch auto: the memory available is unknown; keeping the configured micro-batches")
        return cfg
    estimate = estimate_total(estimate_memory(model, cfg, prompt_tokens))
    if estimate <= SURE * MARGIN * budget:  # far from the limit: not worth a dry step
        say(f"micro_batch auto: kept grad_accumulation_steps={cfg.train.grad_accumulation_steps}: "
            f"the step's estimate, {estimate / GB:.2f} GB, is well within {MARGIN * budget / GB:.2f} GB")
        return cfg
    fit = choose(model, cfg, prompt_tokens, budget)
    say(fit.line(cfg.train.grad_accumulation_steps))
    return replace(cfg, train=replace(cfg.train, grad_accumulation_steps=fit.grad_accumulation_steps,
                                      grad_checkpoint=fit.grad_checkpoint))
