"""Step 4 of a GRPO step: the clipped GRPO objective with a k3 KL penalty, pure math on mx arrays.

Per token (DeepSeekMath, section 4.1), with rho = pi_theta / pi_old:

    l = -min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A) + beta * KL_k3
    KL_k3 = min(exp(ref - logp) - (ref - logp) - 1, kl_clamp)

rho is taken against the log-probabilities of the policy that generated the rollouts. With one
update per batch (num_iterations = 1) that policy *is* the current one, so rho = 1 numerically and
its gradient is the policy gradient; with num_iterations > 1 the caller passes the logprobs recorded
before the first update and clipping acts. ``importance_sampling="sequence"`` is GSPO: one ratio per
sequence, exp of the mean token log-ratio.

Which rows enter the loss (``rows_in_loss``) and what the normaliser counts follow TRL: every
completion of the step counts in the normaliser, including a row of a flat group (all rewards
equal, advantage 0), which still carries its beta * KL term. ``skip_zero_advantage`` leaves such
rows out of the update to save their forward/backward pass, with the normaliser unchanged, so it
is exact when beta = 0 (its rows then contribute exactly nothing) and drops their KL anchor
otherwise. ``mask_truncated_completions`` (TRL's flag) gives rows cut at ``max_tokens`` a zero
mask: they leave the loss and the token counts but still count as completions (grpo, dr_grpo).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import mlx.core as mx
import numpy as np

from .config import GRPOConfig


@dataclass(frozen=True)
class Normalizer:
    """The sizes of the whole step's batch, so that micro-batched losses add up to the full loss.

    num_sequences: completions in the step, all of them (rows left out of the update count too);
    num_tokens: the completion tokens of the step's rows that are not masked (those of skipped
    zero-advantage rows included); max_len: the configured maximum completion length (Dr. GRPO's
    constant); num_micro: micro-batches (bnpo normalises each micro-batch by its own tokens and
    averages them, as TRL's local batch does); update_rows: the rows that go through the update
    over all processes, which sets the micro-batch size (0: num_sequences); micro_tokens: bnpo's
    denominator where a micro-batch runs in parts (lanes.py): the whole micro-batch's tokens (0:
    the tokens of the rows the loss is given).
    """

    num_sequences: float
    num_tokens: float
    max_len: int
    num_micro: int = 1
    update_rows: float = 0.0
    micro_tokens: float = 0.0

    @staticmethod
    def of(mask: mx.array, max_len: int) -> "Normalizer":
        return Normalizer(float(mask.shape[0]), float(mask.sum().item()), max_len, 1)

    @property
    def rows(self) -> int:
        """Rows in the update over all processes."""
        return int(self.update_rows or self.num_sequences)


def rows_in_loss(advantages: np.ndarray, truncated: np.ndarray, cfg: GRPOConfig) -> np.ndarray:
    """[B] bool: the rows whose terms enter the loss (and so the update).

    Every row, except: a truncated row under ``mask_truncated_completions`` (its mask is zero);
    a zero-advantage row under ``skip_zero_advantage`` (its policy term is zero; with beta > 0
    its KL term is dropped too, which is why skipping is exact only when beta = 0).
    """
    keep = np.ones(len(advantages), dtype=bool)
    if cfg.mask_truncated_completions:
        keep &= ~np.asarray(truncated, dtype=bool)
    if cfg.skip_zero_advantage:
        keep &= np.asarray(advantages) != 0
    return keep


def counted_tokens(lengths: np.ndarray, truncated: np.ndarray, cfg: GRPOConfig) -> float:
    """The step's tokens in the token normalisers (dapo): every row's, but a masked row's."""
    lengths = np.asarray(lengths, dtype=np.float64)
    if cfg.mask_truncated_completions:
        lengths = lengths * ~np.asarray(truncated, dtype=bool)
    return float(lengths.sum())


def k3_kl(logp: mx.array, ref_logp: mx.array, clamp: Optional[float] = None) -> mx.array:
    """Per-token unbiased, non-negative estimate of KL(pi_theta || pi_ref) (Schulman's k3),
    at most ``clamp`` when given (verl's low-variance KL: beyond the bound a token's KL term is
    constant, so it adds no gradient and cannot swamp the step)."""
    d = ref_logp - logp
    kl = mx.exp(d) - d - 1.0
    return kl if clamp is None else mx.minimum(kl, clamp)


def reduce_loss(per_token: mx.array, mask: mx.array, loss_type: str, norm: Normalizer) -> mx.array:
    """Turn [B, T] per-token losses into the scalar of the chosen normalisation."""
    masked = per_token * mask
    if loss_type == "grpo":  # mean over each sequence's tokens, then over sequences
        per_seq = masked.sum(axis=1) / mx.maximum(mask.sum(axis=1), 1.0)
        return per_seq.sum() / norm.num_sequences
    if loss_type == "bnpo":  # token-level over the local (micro-)batch
        tokens = norm.micro_tokens if norm.micro_tokens > 0 else mx.maximum(mask.sum(), 1.0)
        return masked.sum() / tokens / norm.num_micro
    if loss_type == "dr_grpo":  # constant normaliser G * L_max
        return masked.sum() / (norm.num_sequences * norm.max_len)
    if loss_type == "dapo":  # token-level over the whole step's batch
        return masked.sum() / max(norm.num_tokens, 1.0)
    raise ValueError(f"unknown loss_type {loss_type!r}")


def grpo_loss(
    logp: mx.array,
    old_logp: Optional[mx.array],
    ref_logp: Optional[mx.array],
    mask: mx.array,
    advantages: mx.array,
    cfg: GRPOConfig,
    norm: Normalizer,
) -> Tuple[mx.array, Dict[str, mx.array]]:
    """The GRPO loss and its diagnostics.

    logp, old_logp, ref_logp, mask: [B, T] per completion token; advantages: [B].
    old_logp None means "generated by the current policy" (rho = 1 with the policy gradient).
    Returns (loss, stats) where stats hold token means of kl, the clip fractions and the ratio.
    """
    held = mx.stop_gradient(logp)
    # Past a row's length the positions mean nothing, and a scorer may leave them 0 (logprobs.py's
    # length groups, native_forward.py): the policy's own values stand in there, so that exp() of a
    # wide gap cannot overflow into inf * 0 = NaN under the mask.
    old_logp = held if old_logp is None else mx.where(mask > 0, old_logp, held)
    if ref_logp is not None:
        ref_logp = mx.where(mask > 0, ref_logp, held)
    log_ratio = logp - old_logp
    if cfg.importance_sampling == "sequence":
        seq = (log_ratio * mask).sum(axis=1, keepdims=True) / mx.maximum(
            mask.sum(axis=1, keepdims=True), 1.0
        )
        log_ratio = mx.broadcast_to(seq, logp.shape)
    ratio = mx.exp(log_ratio)
    eps_low, eps_high = cfg.clip_range()
    adv = advantages[:, None]
    unclipped = ratio * adv
    clipped = mx.clip(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv
    per_token = -mx.minimum(unclipped, clipped)
    kl = None
    if ref_logp is not None and cfg.beta > 0:
        kl = k3_kl(logp, ref_logp, cfg.kl_clamp)
        per_token = per_token + cfg.beta * kl
    loss = reduce_loss(per_token, mask, cfg.loss_type, norm)

    # Diagnostics (no gradient): the share of tokens where the clip removed the gradient.
    r = mx.stop_gradient(ratio)
    ntok = mx.maximum(mask.sum(), 1.0)
    low = ((r < 1.0 - eps_low) & (adv < 0)).astype(mx.float32) * mask
    high = ((r > 1.0 + eps_high) & (adv > 0)).astype(mx.float32) * mask
    stats = {
        "clip_low": low.sum() / ntok,
        "clip_high": high.sum() / ntok,
        "clip_fraction": (low + high).sum() / ntok,
        "ratio_mean": (r * mask).sum() / ntok,
        "kl": (mx.stop_gradient(kl) * mask).sum() / ntok if kl is not None else mx.array(0.0),
    }
    return loss, stats
