"""The GRPO loss against a plain NumPy implementation of the formulas (REFERENCE.md)."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_grpo.config import GRPOConfig
from mlx_grpo.loss import Normalizer, grpo_loss, k3_kl, reduce_loss


def np_loss(logp, old, ref, mask, adv, beta, eps_low, eps_high, loss_type, max_len, seq=False):
    log_ratio = logp - old
    if seq:
        s = (log_ratio * mask).sum(1, keepdims=True) / mask.sum(1, keepdims=True)
        log_ratio = np.broadcast_to(s, logp.shape)
    ratio = np.exp(log_ratio)
    a = adv[:, None]
    per = -np.minimum(ratio * a, np.clip(ratio, 1 - eps_low, 1 + eps_high) * a)
    kl = np.exp(ref - logp) - (ref - logp) - 1
    per = per + beta * kl
    m = per * mask
    if loss_type == "grpo":
        loss = np.mean(m.sum(1) / mask.sum(1))
    elif loss_type in ("bnpo", "dapo"):
        loss = m.sum() / mask.sum()
    else:
        loss = m.sum() / (logp.shape[0] * max_len)
    low = (ratio < 1 - eps_low) & (a < 0)
    high = (ratio > 1 + eps_high) & (a > 0)
    clip = ((low | high) * mask).sum() / mask.sum()
    return loss, (kl * mask).sum() / mask.sum(), clip


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    B, T = 6, 9
    logp = rng.normal(-2, 0.5, (B, T))
    old = logp + rng.normal(0, 0.3, (B, T))  # a moved policy: ratios far from 1
    ref = logp + rng.normal(0, 0.2, (B, T))
    mask = np.zeros((B, T))
    for i, n in enumerate([9, 3, 5, 1, 7, 9]):
        mask[i, :n] = 1
    adv = rng.normal(size=B)
    return [x.astype(np.float32) for x in (logp, old, ref, mask, adv)]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("seq", [False, True])
def test_loss_matches_numpy(batch, loss_type, seq):
    logp, old, ref, mask, adv = batch
    cfg = GRPOConfig(beta=0.04, epsilon=0.2, epsilon_high=0.28, loss_type=loss_type,
                     importance_sampling="sequence" if seq else "token")
    norm = Normalizer.of(mx.array(mask), max_len=12)
    loss, stats = grpo_loss(*(mx.array(x) for x in (logp, old, ref, mask, adv)), cfg, norm)
    want, kl, clip = np_loss(logp, old, ref, mask, adv, 0.04, 0.2, 0.28, loss_type, 12, seq)
    assert loss.item() == pytest.approx(want, rel=1e-5, abs=1e-6)
    assert stats["kl"].item() == pytest.approx(kl, rel=1e-5)
    assert stats["clip_fraction"].item() == pytest.approx(clip, abs=1e-6)
    if not seq:
        assert stats["clip_fraction"].item() > 0  # the policy moved, so clipping acts


def test_k3_kl_is_nonnegative_and_zero_at_equality():
    x = mx.array(np.linspace(-5, 0, 50).astype(np.float32))
    y = mx.array(np.random.default_rng(1).normal(-2, 1, 50).astype(np.float32))
    assert mx.all(k3_kl(x, y) >= 0).item()
    assert mx.abs(k3_kl(x, x)).max().item() == 0.0


def test_ratio_one_gives_policy_gradient():
    """With old_logp=None (mu=1) the ratio is exactly 1 and the gradient is -A * grad logp / |o|."""
    logp = mx.array([[-1.0, -2.0, -0.5], [-0.3, -1.2, -2.2]])
    mask = mx.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    adv = mx.array([1.5, -0.5])
    cfg = GRPOConfig(beta=0.0, loss_type="grpo")
    norm = Normalizer.of(mask, 3)

    def f(lp):
        return grpo_loss(lp, None, None, mask, adv, cfg, norm)[0]

    g = mx.grad(f)(logp)
    want = -(adv[:, None] * mask) / mask.sum(axis=1, keepdims=True) / 2
    assert mx.allclose(g, want, atol=1e-6).item()
    _, stats = grpo_loss(logp, None, None, mask, adv, cfg, norm)
    assert stats["ratio_mean"].item() == 1.0 and stats["clip_fraction"].item() == 0.0


def test_clipping_removes_gradient_outside_range():
    """A token whose ratio is above 1+eps with A>0 gets no gradient; inside the range it does."""
    old = mx.array([[0.0, 0.0]])
    logp = mx.array([[0.5, 0.05]])  # ratios e^0.5 = 1.65 (clipped), e^0.05 = 1.05 (inside)
    cfg = GRPOConfig(beta=0.0, epsilon=0.2, loss_type="bnpo")
    mask = mx.ones((1, 2))
    g = mx.grad(lambda lp: grpo_loss(lp, old, None, mask, mx.array([1.0]), cfg, Normalizer.of(mask, 2))[0])(logp)
    assert g[0, 0].item() == 0.0
    assert g[0, 1].item() < 0.0


def test_micro_batches_add_up_to_full_batch(batch):
    """Losses of row slices with the global normaliser sum to the full loss (grpo, dr_grpo, dapo)."""
    logp, old, ref, mask, adv = (mx.array(x) for x in batch)
    for lt in ("grpo", "dr_grpo", "dapo"):
        cfg = GRPOConfig(beta=0.1, loss_type=lt)
        full = Normalizer.of(mask, 12)
        whole = grpo_loss(logp, old, ref, mask, adv, cfg, full)[0].item()
        parts = sum(
            grpo_loss(logp[s], old[s], ref[s], mask[s], adv[s], cfg, full)[0].item()
            for s in (slice(0, 2), slice(2, 6))
        )
        assert parts == pytest.approx(whole, rel=1e-5)


def test_reduce_rejects_unknown_type():
    with pytest.raises(ValueError):
        reduce_loss(mx.ones((1, 1)), mx.ones((1, 1)), "nope", Normalizer(1, 1, 1))


def test_k3_kl_bound_is_the_formula_inside_and_the_bound_outside():
    rng = np.random.default_rng(3)
    logp = rng.normal(-3, 1, 400).astype(np.float32)
    d = np.concatenate([rng.normal(0, 1, 200), rng.uniform(3, 12, 200)]).astype(np.float32)
    ref = logp + d
    raw = np.exp(d) - d - 1  # up to ~160,000: a token the reference gives far more mass than the policy
    got = np.array(k3_kl(mx.array(logp), mx.array(ref), 10.0))
    inside = raw <= 10.0
    assert inside.any() and (~inside).any()
    np.testing.assert_allclose(got[inside], raw[inside], rtol=1e-5, atol=1e-6)
    assert (got[~inside] == 10.0).all()
    np.testing.assert_allclose(np.array(k3_kl(mx.array(logp), mx.array(ref))), raw, rtol=1e-5, atol=1e-5)


def test_the_bounded_kl_adds_no_gradient_beyond_the_bound_and_the_formulas_within():
    logp = mx.array([[-1.0, -9.0]])
    ref = mx.array([[-1.5, -1.0]])  # token 2: log-ratio 8, k3 = e^8 - 9, far past 10
    mask, adv = mx.ones((1, 2)), mx.zeros((1,))
    norm = Normalizer.of(mask, 2)

    def grad(clamp):
        cfg = GRPOConfig(beta=1.0, loss_type="dapo", kl_clamp=clamp)
        return np.array(mx.grad(lambda lp: grpo_loss(lp, None, ref, mask, adv, cfg, norm)[0])(logp))

    bounded, unbounded = grad(10.0), grad(None)
    d = np.array([-0.5, 8.0])
    want = -(np.exp(d) - 1) / 2  # d/dlogp of (e^d - d - 1), over 2 tokens
    np.testing.assert_allclose(unbounded[0], want, rtol=1e-5)
    np.testing.assert_allclose(bounded[0, 0], want[0], rtol=1e-5)
    assert bounded[0, 1] == 0.0
    cfg = GRPOConfig(beta=1.0, loss_type="dapo")
    _, stats = grpo_loss(logp, None, ref, mask, adv, cfg, norm)
    assert stats["kl"].item() == pytest.approx((np.exp(-0.5) + 0.5 - 1 + 10.0) / 2, rel=1e-5)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_what_a_scorer_leaves_past_a_rows_length_changes_nothing(batch, loss_type):
    # Past a row's length a scorer may leave 0 (length groups; the scoring pass in C) while the
    # policy's log-prob of a pad token is far below: exp(0 - (-200)) is inf in float32, and inf * 0
    # under the mask would be NaN. The loss, its stats and its gradient are the same as with
    # every position filled.
    logp, old, ref, mask, adv = batch
    cfg = GRPOConfig(beta=0.04, epsilon=0.2, epsilon_high=0.28, loss_type=loss_type)
    norm = Normalizer.of(mx.array(mask), max_len=12)
    far = np.where(mask > 0, logp, -200.0).astype(np.float32)
    zeros = lambda a: np.where(mask > 0, a, 0.0).astype(np.float32)  # noqa: E731

    def run(o, r):
        def f(lp):
            return grpo_loss(lp, mx.array(o), mx.array(r), mx.array(mask), mx.array(adv), cfg, norm)
        loss, stats = f(mx.array(far))
        return loss, stats, mx.grad(lambda lp: f(lp)[0])(mx.array(far))

    loss, stats, grad = run(zeros(old), zeros(ref))
    want_loss, want_stats, want_grad = run(np.where(mask > 0, old, far), np.where(mask > 0, ref, far))
    assert np.isfinite(loss.item()) and np.isfinite(np.array(grad)).all()
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-6)
    assert stats["kl"].item() == pytest.approx(want_stats["kl"].item(), rel=1e-6)
    assert np.allclose(np.array(grad), np.array(want_grad), atol=1e-7)
