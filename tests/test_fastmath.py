"""fastmath: exp and SwiGLU without MLX's CPU exp, checked against NumPy in float64,
and the gated-MLP swap on a real model (same logits, same LoRA gradients, same saved keys)."""


import pytest
import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from mlx_grpo import fastmath
from mlx_grpo.config import AdapterConfig, ModelConfig
from mlx_grpo.models import attach_adapters, load_model


@pytest.mark.parametrize("compiled", [False, True], ids=["op-by-op", "compiled"])
def test_exp_matches_numpy_over_float32s_range(compiled):
    exp = mx.compile(fastmath.exp) if compiled else fastmath.exp
    assert fastmath.on_cpu()  # the power path (the suite runs on MLX's CPU backend)
    x = np.concatenate([np.linspace(-104, 89, 200_001), [0.0, -0.0, 1e-30, -87.3, 88.7]]).astype(np.float32)
    got = np.array(exp(mx.array(x))).astype(np.float64)
    want = np.exp(x.astype(np.float64))
    normal = (want >= np.finfo(np.float32).tiny) & (want < 2.0**127)
    rel = np.abs(got[normal] - want[normal]) / want[normal]
    # x log2(e) is rounded to float32 first (as MLX's exp does): relative error ~ |x| x 6e-8
    assert np.all(rel < 2e-7 * np.maximum(1.0, np.abs(x[normal])))
    mlx_rel = np.abs(np.array(mx.exp(mx.array(x))).astype(np.float64)[normal] - want[normal]) / want[normal]
    assert rel.max() <= 2 * mlx_rel.max()  # no worse than MLX's own exp
    assert np.all(got[want < np.finfo(np.float32).tiny] <= np.finfo(np.float32).tiny)  # below: 0
    top = (want >= 2.0**127) & (want < np.finfo(np.float32).max)  # the last octave: f up to 1
    np.testing.assert_allclose(got[top], want[top], rtol=5e-6)
    assert np.all(got[want > np.finfo(np.float32).max] == np.inf)
    special = np.array(exp(mx.array([-np.inf, np.inf, np.nan, -1e4, 1e4], dtype=mx.float32)))
    assert special[0] == 0 and special[1] == np.inf and np.isnan(special[2])
    assert special[3] == 0 and special[4] == np.inf


def np_swiglu(g: np.ndarray, x: np.ndarray):
    s = 1 / (1 + np.exp(-g))
    return g * s * x, x * s * (1 + g * (1 - s)), g * s  # value, d/dgate, d/dx


@pytest.mark.parametrize("eager", [False, True], ids=["update", "eager"])
def test_swiglu_values_and_gradients_match_numpy(monkeypatch, eager):
    monkeypatch.setattr(fastmath, "_eager_depth", int(eager))  # the same path either way
    monkeypatch.setattr(fastmath.nn, "silu", None)  # MLX's silu (its slow exp) is not called
    rng = np.random.default_rng(3)
    g = np.concatenate([rng.standard_normal(5000) * 6, [-200.0, -90.0, 0.0, 90.0, 200.0]]).astype(np.float32)
    x = rng.standard_normal(g.size).astype(np.float32)
    c = rng.standard_normal(g.size).astype(np.float32)
    val, dg, dx = np_swiglu(g.astype(np.float64), x.astype(np.float64))
    got = fastmath.swiglu(mx.array(g), mx.array(x))
    np.testing.assert_allclose(np.array(got), val, rtol=2e-6, atol=1e-30)
    grads = mx.grad(lambda a, b: (fastmath.swiglu(a, b) * mx.array(c)).sum(), argnums=(0, 1))(mx.array(g), mx.array(x))
    np.testing.assert_allclose(np.array(grads[0]), c * dg, rtol=2e-5, atol=1e-12)
    np.testing.assert_allclose(np.array(grads[1]), c * dx, rtol=2e-6, atol=1e-30)
    # and what mlx-lm computes, to its own rounding
    monkeypatch.undo()
    stock = nn.silu(mx.array(g)) * mx.array(x)
    assert float(mx.max(mx.abs(got - stock))) <= 1e-6 * float(mx.max(mx.abs(stock)))


def test_swiglu_keeps_half_precision_dtypes():
    g, x = mx.array([0.5, -2.0], dtype=mx.bfloat16), mx.array([1.0, 3.0], dtype=mx.bfloat16)
    assert fastmath.swiglu(g, x).dtype == mx.bfloat16
    dg, dx = mx.grad(lambda a, b: fastmath.swiglu(a, b).astype(mx.float32).sum(), argnums=(0, 1))(g, x)
    assert dg.dtype == dx.dtype == mx.bfloat16


def test_swiglu_is_mlxs_own_off_the_cpu(monkeypatch):
    rng = np.random.default_rng(4)
    g, x = (mx.array(rng.standard_normal(64).astype(np.float32)) for _ in range(2))
    assert not mx.array_equal(fastmath.swiglu(g, x), nn.silu(g) * x)  # the power's rounding
    monkeypatch.setattr(fastmath, "on_cpu", lambda: False)
    assert mx.array_equal(fastmath.swiglu(g, x), nn.silu(g) * x)
    assert mx.array_equal(fastmath.exp(g), mx.exp(g))


def test_a_gradient_trace_runs_compiled_functions_op_by_op():
    """Why ``exp`` is one primitive rather than a compiled kernel: under a gradient trace MLX runs
    a compiled function op by op, re-running its Python body on every call (a counter shows it)."""
    g = mx.arange(8, dtype=mx.float32)
    traced = []

    @mx.compile
    def double(a):
        traced.append(1)
        return a * 2

    mx.eval(double(g), double(g))
    assert len(traced) == 1  # compiled once, then reused
    for _ in range(3):
        mx.eval(mx.grad(lambda a: double(a).sum())(g))
    assert len(traced) == 4  # every gradient trace ran the Python body again


def _logits_and_lora_grad(model):
    x = mx.array([[1, 5, 9, 2, 7, 3]])
    logits = model(x)
    loss = lambda m: m(x)[..., :50].astype(mx.float32).square().mean()  # noqa: E731
    grads = nn.value_and_grad(model, loss)(model)[1]
    return logits, dict(tree_flatten(grads))


def test_fast_mlps_on_the_embedded_model_same_logits_and_lora_gradients():
    stock, _ = load_model(ModelConfig(fast_mlp=False))
    fast, _ = load_model(ModelConfig())
    n = sum(1 for _, m in fast.named_modules() if getattr(type(m), "_mlx_grpo_fast", False))
    assert n == len(fast.model.layers) and not any(
        getattr(type(m), "_mlx_grpo_fast", False) for _, m in stock.named_modules())
    for m in (stock, fast):
        mx.random.seed(0)
        attach_adapters(m, AdapterConfig())
        # B starts at zero: give it values so the gradient reaches A through every MLP as well
        m.update(tree_unflatten([(k, mx.random.normal(v.shape) * 0.05) for k, v in tree_flatten(m.trainable_parameters())]))
    assert sorted(k for k, _ in tree_flatten(fast.parameters())) == sorted(k for k, _ in tree_flatten(stock.parameters()))
    fast.update(tree_unflatten(tree_flatten(stock.trainable_parameters())))
    (l1, g1), (l2, g2) = _logits_and_lora_grad(stock), _logits_and_lora_grad(fast)
    assert float(mx.max(mx.abs(l1 - l2))) < 1e-4
    assert g1.keys() == g2.keys() and any("mlp" in k for k in g1)
    for k in g1:
        scale = float(mx.max(mx.abs(g1[k]))) + 1e-12
        assert float(mx.max(mx.abs(g1[k]))) > 0, k  # LoRA gradients are not silently zero
        assert float(mx.max(mx.abs(g1[k] - g2[k]))) <= 1e-4 * scale, k


class OtherMLP(nn.Module):
    """gate/up/down named like a gated MLP, with another activation: must be left alone."""

    def __init__(self):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(16, 8)

    def __call__(self, x):
        return self.down_proj(nn.gelu(self.gate_proj(x)) * self.up_proj(x))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.other = OtherMLP()


def test_an_mlp_with_another_activation_is_not_swapped():
    net = Net()
    assert fastmath.use_fast_mlps(net) == 0
    assert type(net.other) is OtherMLP


def test_swap_is_idempotent():
    model, _ = load_model(ModelConfig())
    assert fastmath.use_fast_mlps(model) == 0  # load_model already did it


def np_logsumexp(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = np.max(x, axis=-1, keepdims=True)
    return (np.log(np.sum(np.exp(x - m), axis=-1, keepdims=True)) + m)[..., 0]


@pytest.mark.parametrize("eager", [True, False], ids=["numpy", "power"])
def test_logsumexp_and_its_gradient_match_numpy_in_float64(monkeypatch, eager):
    monkeypatch.setattr(fastmath, "on_cpu", lambda: True)  # the CPU's paths, on any backend
    monkeypatch.setattr(fastmath, "_eager_depth", int(eager))  # eager: NumPy; else fastmath.exp
    monkeypatch.setattr(fastmath, "_np_logsumexp", None if not eager else fastmath._np_logsumexp)
    monkeypatch.setattr(fastmath, "NUMPY_MIN_LOGITS", 0)
    monkeypatch.setattr(fastmath, "_BLOCK", 1000)  # several blocks per call
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(3, 5, 701)) * 8).astype(np.float32)
    x[0, 0, :] = -40.0  # a flat row
    got = np.array(fastmath.logsumexp(mx.array(x)))
    np.testing.assert_allclose(got, np_logsumexp(x), rtol=1e-6, atol=1e-5)
    c = rng.normal(size=(3, 5)).astype(np.float32)
    grad = np.array(mx.grad(lambda a: (fastmath.logsumexp(a) * mx.array(c)).sum())(mx.array(x)))
    soft = np.exp(x.astype(np.float64) - np_logsumexp(x)[..., None])
    np.testing.assert_allclose(grad, soft * c[..., None], rtol=1e-5, atol=1e-7)
    # a strided input (a transposed view) and bfloat16 are read correctly
    t = mx.array(x).transpose(1, 0, 2)
    np.testing.assert_allclose(np.array(fastmath.logsumexp(t)), np_logsumexp(x.transpose(1, 0, 2)), rtol=1e-6, atol=1e-5)
    b = mx.array(x).astype(mx.bfloat16)
    np.testing.assert_allclose(np.array(fastmath.logsumexp(b)),
                               np_logsumexp(np.array(b.astype(mx.float32))), rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("eager", [True, False], ids=["numpy", "power"])
def test_logsumexp_edge_rows_and_checkpoint_agree_with_mlx(monkeypatch, eager):
    monkeypatch.setattr(fastmath, "on_cpu", lambda: True)
    monkeypatch.setattr(fastmath, "_eager_depth", int(eager))
    monkeypatch.setattr(fastmath, "NUMPY_MIN_LOGITS", 0)
    rows = mx.array([[-np.inf] * 4, [0.0, -np.inf, 1.0, 2.0], [0.0, np.inf, 1.0, 2.0], [0.0, np.nan, 1.0, 2.0]])
    got, want = np.array(fastmath.logsumexp(rows)), np.array(mx.logsumexp(rows, axis=-1))
    assert got[0] == -np.inf and got[2] == np.inf and np.isnan(got[3])
    np.testing.assert_allclose(got[1], want[1], rtol=1e-6)
    # under mx.checkpoint (as the scoring head runs it) the gradient is recomputed the same
    x = mx.random.normal((4, 9, 300), key=mx.random.key(1)) * 5
    f = lambda a: (fastmath.logsumexp(a * 2) ** 2).sum()  # noqa: E731
    g = lambda a: (mx.logsumexp(a * 2, axis=-1) ** 2).sum()  # noqa: E731
    np.testing.assert_allclose(np.array(mx.grad(mx.checkpoint(f))(x)), np.array(mx.grad(g)(x)), rtol=1e-4, atol=1e-5)
