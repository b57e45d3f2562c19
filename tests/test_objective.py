"""The step's objective, rows and normaliser included, against a plain NumPy DeepSeekMath/TRL loss.

The reference knows nothing of row selection: every completion of the step is in it, a flat
group's rows (advantage 0) contribute only beta * KL, and every row counts in the normaliser. The
trainer's path (``rows_in_loss`` picks the rows that go through the update, ``step_normalizer``
sizes the whole step) must give the same loss and the same gradient.
"""

import mlx.core as mx
import numpy as np
import pytest

from mlx_grpo.advantages import group_advantages
from mlx_grpo.config import Config, GRPOConfig
from mlx_grpo.loss import counted_tokens, grpo_loss, rows_in_loss
from mlx_grpo.learner import step_normalizer

G = 4
MAX_LEN = 10


def np_reference(logp, old, ref, mask, adv, beta, eps, loss_type):
    """TRL's per-token GRPO loss over every row, and its gradient with respect to logp."""
    ratio = np.exp(logp - old)
    a = adv[:, None]
    unclipped, clipped = ratio * a, np.clip(ratio, 1 - eps, 1 + eps) * a
    per = -np.minimum(unclipped, clipped) + beta * (np.exp(ref - logp) - (ref - logp) - 1)
    # d/dlogp: the unclipped branch gives -ratio * A where it is the minimum; the clipped one is
    # constant in logp (its gradient is zero outside the range, the clip's purpose).
    active = unclipped <= clipped
    inside = (ratio > 1 - eps) & (ratio < 1 + eps)
    d_per = -np.where(active | inside, ratio * a, 0.0) + beta * (1 - np.exp(ref - logp))
    B = logp.shape[0]
    if loss_type == "grpo":
        w = mask / mask.sum(1, keepdims=True).clip(min=1) / B
    elif loss_type == "dapo":
        w = mask / mask.sum()
    else:  # dr_grpo
        w = mask / (B * MAX_LEN)
    return float((per * w).sum()), d_per * w


@pytest.fixture
def step():
    """3 groups of G: the first flat (all correct), the others with spread; varied lengths."""
    rng = np.random.default_rng(3)
    B, T = 3 * G, 8
    rewards = np.array([1.5] * G + [1.5, 0.0, 1.0, 0.0] + [0.0, 0.0, 1.5, 1.0])
    lengths = rng.integers(2, T + 1, B)
    lengths[5] = T  # a completion cut at the limit
    truncated = np.zeros(B, dtype=bool)
    truncated[5] = True
    mask = (np.arange(T)[None, :] < lengths[:, None]).astype(np.float32)
    logp = rng.normal(-1.5, 0.4, (B, T)).astype(np.float32)
    old = (logp + rng.normal(0, 0.15, (B, T))).astype(np.float32)
    ref = (logp + rng.normal(0, 0.3, (B, T))).astype(np.float32)
    adv = group_advantages(rewards, G)
    assert (adv[:G] == 0).all() and (adv[G:] != 0).all()
    return logp, old, ref, mask, adv, lengths, truncated


def trainer_path(logp, old, ref, mask, adv, lengths, truncated, cfg: GRPOConfig):
    """Loss and d loss / d logp the way grpo_step and update compute them (one process)."""
    c = Config(grpo=cfg)
    c.rollout.max_tokens = MAX_LEN
    keep = np.flatnonzero(rows_in_loss(adv, truncated, cfg))
    norm = step_normalizer([keep.size], counted_tokens(lengths, truncated, cfg), c, adv.size)
    idx = mx.array(keep.astype(np.int32))
    o, r, m, a = (mx.array(x)[idx] for x in (old, ref, mask, adv))

    def f(lp):
        return grpo_loss(lp[idx], o, r, m, a, cfg, norm)[0]

    loss, grad = mx.value_and_grad(f)(mx.array(logp))
    return loss.item(), np.array(grad)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_every_row_objective_matches_reference_with_a_flat_group(step, loss_type):
    logp, old, ref, mask, adv, lengths, truncated = step
    cfg = GRPOConfig(beta=0.1, epsilon=0.2, loss_type=loss_type)  # the default: skip off
    loss, grad = trainer_path(logp, old, ref, mask, adv, lengths, truncated, cfg)
    want, want_grad = np_reference(logp, old, ref, mask, adv, 0.1, 0.2, loss_type)
    assert loss == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7)
    assert np.abs(grad[:G]).sum() > 0  # the flat group's rows are anchored by their KL term


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo"])
def test_skipping_is_exact_with_beta_zero_and_drops_the_kl_anchor_otherwise(step, loss_type):
    logp, old, ref, mask, adv, lengths, truncated = step
    skip0 = GRPOConfig(beta=0.0, loss_type=loss_type, skip_zero_advantage=True)
    loss, grad = trainer_path(logp, old, ref, mask, adv, lengths, truncated, skip0)
    want, want_grad = np_reference(logp, old, ref, mask, adv, 0.0, 0.2, loss_type)
    assert loss == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7)

    skip = GRPOConfig(beta=0.1, loss_type=loss_type, skip_zero_advantage=True)
    _, grad = trainer_path(logp, old, ref, mask, adv, lengths, truncated, skip)
    _, want_grad = np_reference(logp, old, ref, mask, adv, 0.1, 0.2, loss_type)
    assert np.abs(grad[:G]).sum() == 0.0  # the flat rows left the update, KL term and all
    np.testing.assert_allclose(grad[G:], want_grad[G:], rtol=1e-4, atol=1e-7)  # the rest as the paper's


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "dapo", "bnpo"])
def test_mask_truncated_completions_matches_trl(step, loss_type):
    """TRL: completion_mask *= ~is_truncated; advantages from every reward; grpo and dr_grpo still
    count the masked row in B, the token normalisers do not count its tokens."""
    logp, old, ref, mask, adv, lengths, truncated = step
    cfg = GRPOConfig(beta=0.1, loss_type=loss_type, mask_truncated_completions=True)
    loss, grad = trainer_path(logp, old, ref, mask, adv, lengths, truncated, cfg)
    masked = mask * ~truncated[:, None]
    ref_type = "dapo" if loss_type == "bnpo" else loss_type  # one micro-batch: bnpo's tokens are the step's
    want, want_grad = np_reference(logp, old, ref, masked, adv, 0.1, 0.2, ref_type)
    assert loss == pytest.approx(want, rel=1e-5)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-7)
    assert np.abs(grad[5]).sum() == 0.0 and adv[5] != 0  # a truncated row with a signal: out


def test_rows_in_loss_by_definition():
    adv = np.array([0.0, 1.0, -1.0, 0.0], dtype=np.float32)
    cut = np.array([False, True, False, True])
    assert rows_in_loss(adv, cut, GRPOConfig()).tolist() == [True] * 4
    assert rows_in_loss(adv, cut, GRPOConfig(skip_zero_advantage=True)).tolist() == [False, True, True, False]
    assert rows_in_loss(adv, cut, GRPOConfig(mask_truncated_completions=True)).tolist() == [True, False, True, False]
    assert counted_tokens(np.array([3, 5, 2, 7]), cut, GRPOConfig(mask_truncated_completions=True)) == 5.0
    assert counted_tokens(np.array([3, 5, 2, 7]), cut, GRPOConfig()) == 17.0
