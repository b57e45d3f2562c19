"""The learner: step 4 of GRPO, on the rows of a step that take part in the update.

    batch = select_rows(rollouts, advantages, keep)     # the rows in the loss, trimmed
    score_batch(model, batch, cfg, micro, ref_model)    # "score": reference / old-policy logprobs
    learn(model, opt, batch, cfg, norm)                 # "update": num_iterations updates (``update``)

The two are separate calls so that the step times them as separate stages (step.py's "score" and
"update").

``update`` accumulates the clipped-surrogate + KL loss (loss.py) over micro-batches of
``micro_size`` rows and applies one AdamW step; ``step_normalizer`` holds the whole step's sizes
over every process, so each process's gradient is its share of the step's (distributed.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from . import distributed, fastmath, lanes, native_forward, native_grad
from .config import Config, TrainConfig
from .loss import Normalizer, grpo_loss
from .models import adapters_disabled
from .rollout import Rollouts
from .logprobs import completion_logprobs


@dataclass
class StepBatch:
    """The rows of one step that take part in the update, with everything the loss needs.

    prompts: [U, Lp] the distinct left-padded prompts; row_prompt: [B] each row's prompt index.
    """

    prompts: mx.array
    left_padding: List[int]
    row_prompt: np.ndarray
    tokens: mx.array
    mask: mx.array
    advantages: mx.array
    ref_logp: Optional[mx.array] = None
    old_logp: Optional[mx.array] = None

    def rows(self, sl: slice) -> "StepBatch":
        pick = lambda a: None if a is None else a[sl]  # noqa: E731
        return StepBatch(
            self.prompts, self.left_padding, self.row_prompt[sl], self.tokens[sl], self.mask[sl],
            self.advantages[sl], pick(self.ref_logp), pick(self.old_logp),
        )

    def lengths(self) -> np.ndarray:
        """[B] each row's completion tokens."""
        return np.array(self.mask.sum(axis=1)).astype(np.int64)

    def logprobs(self, model: nn.Module, temperature: float, chunk: Optional[int] = None) -> mx.array:
        return completion_logprobs(
            model, self.prompts, self.left_padding, self.tokens, temperature, self.row_prompt, chunk,
            lengths=self.lengths(),  # rows scored in length groups
        )


def select_rows(ro: Rollouts, adv: np.ndarray, keep: np.ndarray) -> StepBatch:
    """The kept rows of a rollout, trimmed to their longest completion."""
    idx = mx.array(keep.astype(np.int32))
    mask = ro.mask[idx]
    width = max(1, int(mask.sum(axis=0).astype(mx.bool_).sum().item()))
    return StepBatch(
        prompts=ro.prompt_tokens,
        left_padding=list(ro.left_padding),
        row_prompt=ro.row_prompt[keep],
        tokens=ro.tokens[idx][:, :width],
        mask=mask[:, :width],
        advantages=mx.array(adv[keep]),
    )


def logprobs_of(model: nn.Module, b: StepBatch, temperature: float, micro: int, n_lanes: int = 1) -> mx.array:
    """``b``'s completion logprobs under ``model`` through MLX, as constants (scored ``micro`` rows
    at a time), its rows in ``n_lanes`` lanes (lanes.py)."""
    if n_lanes <= 1:
        with fastmath.eager():  # nothing is differentiated here (see fastmath.logsumexp)
            return mx.stop_gradient(b.logprobs(model, temperature, chunk=micro))
    with fastmath.eager(evaluate=False):  # the lanes run side by side when evaluated together
        parts = [b.rows(rows).logprobs(model, temperature, chunk=micro) for rows in lanes.each(b.row_prompt, n_lanes)]
    return mx.stop_gradient(mx.concatenate(parts, axis=0))


def pass_lanes(cfg: Config, rows: int) -> int:
    """The lanes a scoring pass or an update micro-batch over ``rows`` rows takes
    (``train.cpu_lanes``, where lanes.py allows them)."""
    return lanes.count(rows, cfg.train.cpu_lanes)


def lane_value_and_grad(
    model: nn.Module, mb: StepBatch, cfg: Config, norm: Normalizer, n_lanes: int
) -> Tuple[mx.array, Dict[str, mx.array], Dict]:
    """(loss, stats, gradient) of the micro-batch ``mb``, its rows in ``n_lanes`` lanes (lanes.py):
    each lane's forward and backward pass built on its own stream, the losses and gradients
    summed (the losses are normalised by the whole step's sizes, and bnpo's by the whole
    micro-batch's tokens, so the lanes' sum is the micro-batch's loss) and the stats, token
    means, weighted by each lane's tokens."""
    if n_lanes > 1 and cfg.grpo.loss_type == "bnpo":
        norm = replace(norm, micro_tokens=max(float(mb.mask.sum().item()), 1.0))
    value_and_grad = nn.value_and_grad(model, batch_loss(cfg, norm))
    if n_lanes <= 1:
        (loss, stats), grads = value_and_grad(model, mb)
        return loss, stats, grads
    losses, weights, stat_parts, grads = [], [], [], None
    for rows in lanes.each(mb.row_prompt, n_lanes):
        sub = mb.rows(rows)
        (loss, stats), g = value_and_grad(model, sub)
        losses.append(loss)
        weights.append(sub.mask.sum())
        stat_parts.append(stats)
        grads = g if grads is None else tree_map(mx.add, grads, g)
    total = mx.maximum(sum(weights), 1.0)
    stats = {k: sum(w * p[k] for w, p in zip(weights, stat_parts)) / total for k in stat_parts[0]}
    return sum(losses), stats, grads


STATS = ("kl", "clip_fraction", "clip_low", "clip_high", "ratio_mean")  # grpo_loss's diagnostics


def micro_size(rows: int, cfg: TrainConfig) -> int:
    """Rows per micro-batch: the step's rows cut into ``grad_accumulation_steps`` parts."""
    return max(1, math.ceil(rows / cfg.grad_accumulation_steps))


def step_normalizer(
    rows_per_process: Sequence[int], tokens: float, cfg: Config, step_rows: Optional[int] = None
) -> Normalizer:
    """The whole step's sizes: the completions counted (``step_rows``, default the rows in the
    update) and their tokens, and micro-batches over all processes (each cuts its rows in the
    update into micro-batches of ``micro_size`` of the step's rows in the update)."""
    n = int(sum(rows_per_process))
    size = micro_size(n, cfg.train)
    n_micro = sum(math.ceil(r / size) for r in rows_per_process)
    counted = n if step_rows is None else step_rows
    return Normalizer(float(counted), float(tokens), cfg.rollout.max_tokens, n_micro, float(n))


def batch_loss(cfg: Config, norm: Normalizer) -> Callable[[nn.Module, StepBatch], Tuple[mx.array, Dict[str, mx.array]]]:
    """The GRPO loss of a micro-batch as a function of the model (for ``nn.value_and_grad``): the
    update's, and the one microbatch.py's dry step measures, so the memory it plans for is the update's."""

    def loss_fn(model: nn.Module, b: StepBatch):
        logp = b.logprobs(model, cfg.rollout.temperature)
        return grpo_loss(logp, b.old_logp, b.ref_logp, b.mask, b.advantages, cfg.grpo, norm)

    return loss_fn


def update(
    model: nn.Module,
    opt: optim.Optimizer,
    batch: Optional[StepBatch],
    cfg: Config,
    norm: Optional[Normalizer] = None,
) -> Dict[str, float]:
    """One optimizer update on ``batch``, accumulated over micro-batches; returns loss and stats.

    ``norm`` holds the sizes of the whole step over all processes (default: ``batch``'s own);
    losses are normalised by them, so every process's gradient is its share of the step's
    gradient and their sum is the update applied on every process. A process with no rows
    (``batch`` None) adds zeros.
    """
    if norm is None:
        norm = step_normalizer([batch.tokens.shape[0]], batch.mask.sum().item(), cfg)
    n = 0 if batch is None else batch.tokens.shape[0]
    size = micro_size(norm.rows, cfg.train)
    in_c = n > 0 and native_grad.unsupported(model, cfg) is None  # it splits its work over the BLAS's threads
    n_lanes = 1 if in_c else pass_lanes(cfg, min(size, n))
    grads = None
    loss_total = 0.0
    tokens = 0.0
    stats_sum: Dict[str, float] = {}
    with lanes.single_blas(n_lanes > 1):
        for start in range(0, n, size):
            mb = batch.rows(slice(start, start + size))
            if in_c:
                loss, stats, g = native_grad.value_and_grad(model, mb, cfg, norm)
            else:
                loss, stats, g = lane_value_and_grad(model, mb, cfg, norm, n_lanes)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            mx.eval(loss, grads, stats)
            loss_total += loss.item()
            # The stats are token means of a micro-batch: weighted by its tokens and divided by
            # the tokens of every row in the update (not the step's normaliser, which under
            # skip_zero_advantage also counts rows nobody scored), they are the update's token means.
            w = mb.mask.sum().item()
            tokens += w
            for k, v in stats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + w * v.item()
    if grads is None:
        grads = tree_map(mx.zeros_like, model.trainable_parameters())
    grads = distributed.sum_gradients(grads)
    loss_total, tokens, *values = distributed.sum_values([loss_total, tokens] + [stats_sum.get(k, 0.0) for k in STATS])
    stats_sum = {k: v / max(tokens, 1.0) for k, v in zip(STATS, values)}
    grad_norm = math.sqrt(sum((g.astype(mx.float32) ** 2).sum().item() for _, g in tree_flatten(grads)))
    if not (math.isfinite(loss_total) and math.isfinite(grad_norm)):
        return {"loss": loss_total, "grad_norm": grad_norm, "skipped": 1.0, **stats_sum}
    if cfg.train.max_grad_norm > 0:
        grads, _ = optim.clip_grad_norm(grads, cfg.train.max_grad_norm)
    opt.update(model, grads)
    mx.eval(model.trainable_parameters(), opt.state)
    return {"loss": loss_total, "grad_norm": grad_norm, "skipped": 0.0, **stats_sum}


def score_batch(
    model: nn.Module, batch: StepBatch, cfg: Config, micro: int, ref_model: Optional[nn.Module] = None
) -> None:
    """The logprobs the updates hold fixed, stored in ``batch``: the KL reference's (``ref_logp``,
    when ``grpo.beta`` > 0) and the sampling policy's (``old_logp``, when ``num_iterations`` > 1),
    in C where ``native_forward`` serves the model, else through MLX ``micro`` rows at a time. The
    KL reference is ``ref_model``, or else the policy with its adapters switched off."""
    temperature = cfg.rollout.temperature

    def scored(m: nn.Module) -> mx.array:
        if native_forward.scores_in_c(m):  # it splits its work over the BLAS's threads: no lanes
            with fastmath.eager():
                lp = native_forward.completion_logprobs(m, batch.prompts, batch.left_padding, batch.row_prompt,
                                                        batch.tokens, batch.lengths(), temperature)
        else:
            n_lanes = pass_lanes(cfg, batch.tokens.shape[0])
            with lanes.single_blas(n_lanes > 1):
                lp = logprobs_of(m, batch, temperature, micro, n_lanes)
        mx.eval(lp)
        return lp

    if cfg.grpo.beta > 0:
        if ref_model is not None:
            batch.ref_logp = scored(ref_model)
        else:
            with adapters_disabled(model):
                batch.ref_logp = scored(model)
    if cfg.grpo.num_iterations > 1:
        batch.old_logp = scored(model)


def learn(
    model: nn.Module,
    opt: optim.Optimizer,
    batch: Optional[StepBatch],
    cfg: Config,
    norm: Normalizer,
) -> Dict[str, float]:
    """``num_iterations`` updates on ``batch`` (scored first by ``score_batch``); returns their
    figures (means over the iterations; "skipped" summed).

    ``batch`` None: this process has no rows in the update and adds zeros to every update.
    """
    model.train()
    per_iter: List[Dict[str, float]] = [update(model, opt, batch, cfg, norm) for _ in range(cfg.grpo.num_iterations)]
    model.eval()
    upd = {k: float(np.mean([p[k] for p in per_iter])) for k in per_iter[0]}
    upd["skipped"] = float(sum(p["skipped"] for p in per_iter))
    return upd
