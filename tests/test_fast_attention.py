"""fastmath.attention: MLX's attention with grouped heads stacked and the softmax through
``fastmath.exp`` (with its own gradient), checked against NumPy in float64 and against MLX's
kernel (values and gradients, every mask kind); and the opt-in on a real model (same logits and
LoRA gradients, another model of the same architecture left on mlx-lm's own)."""

import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from mlx_grpo import fastmath
from mlx_grpo.config import AdapterConfig, ModelConfig
from mlx_grpo.forward import enable_grad_checkpoint
from mlx_grpo.models import attach_adapters, load_model


def np_attention(q, k, v, scale, mask):
    """The formula in float64: softmax(q k^T scale, masked) v, query head h on key head h // rep."""
    q, k, v = (np.asarray(a, dtype=np.float64) for a in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    s = np.einsum("bhld,bhsd->bhls", q, k) * scale
    L, S = s.shape[-2:]
    if isinstance(mask, str):
        mask = (np.arange(L)[:, None] + (S - L)) >= np.arange(S)[None, :]
    if mask is not None:
        mask = np.asarray(mask)
        s = np.where(mask, s, np.finfo(np.float32).min) if mask.dtype == bool else s + mask
    s = s - s.max(axis=-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("bhls,bhsd->bhld", p, v)


SHAPES = [(2, 9, 3, 1, 17, 16), (2, 9, 3, 5, 17, 16), (1, 4, 4, 7, 7, 8), (3, 6, 2, 4, 10, 8)]


def masks(B, H, L, S, key):
    k1, k2, k3, k4 = mx.random.split(key, 4)
    return {
        "none": None,
        "causal": "causal",
        "bool [B,1,L,S]": mx.random.uniform(shape=(B, 1, L, S), key=k1) > 0.3,
        "bool per head": mx.random.uniform(shape=(B, H, L, S), key=k2) > 0.3,
        "bool [L,S]": mx.random.uniform(shape=(L, S), key=k3) > 0.4,
        "every slot hidden": mx.zeros((B, 1, L, S), dtype=mx.bool_),
        "additive": mx.random.normal((B, 1, L, S), key=k4),
    }


@pytest.mark.parametrize("shape", SHAPES)
def test_attention_matches_numpy_and_mlx_for_every_mask(shape):
    B, H, KV, L, S, D = shape
    kq, kk, kv, km = mx.random.split(mx.random.key(sum(shape)), 4)
    q, k, v = mx.random.normal((B, H, L, D), key=kq), mx.random.normal((B, KV, S, D), key=kk), mx.random.normal((B, KV, S, D), key=kv)
    for name, mask in masks(B, H, L, S, km).items():
        got = fastmath.attention(q, k, v, 0.3, mask)
        np_mask = mask if mask is None or isinstance(mask, str) else np.array(mask)
        want = np_attention(np.array(q), np.array(k), np.array(v), 0.3, np_mask)
        np.testing.assert_allclose(np.array(got), want, rtol=1e-5, atol=2e-6, err_msg=name)
        mlx = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask=mask)
        assert float(mx.max(mx.abs(got - mlx))) <= 1e-5, name


def test_attention_gradients_match_mlxs_kernel():
    B, H, KV, L, S, D = 2, 6, 2, 4, 9, 8
    kq, kk, kv, kc, km = mx.random.split(mx.random.key(5), 5)
    q, k, v = mx.random.normal((B, H, L, D), key=kq), mx.random.normal((B, KV, S, D), key=kk), mx.random.normal((B, KV, S, D), key=kv)
    c = mx.random.normal((B, H, L, D), key=kc)
    for mask in ["causal", mx.random.uniform(shape=(B, 1, L, S), key=km) > 0.3, None]:
        def loss(fn):
            return lambda q, k, v: (fn(q, k, v) * c).sum()
        ours = mx.grad(loss(lambda q, k, v: fastmath.attention(q, k, v, 0.4, mask)), argnums=(0, 1, 2))(q, k, v)
        theirs = mx.grad(loss(lambda q, k, v: mx.fast.scaled_dot_product_attention(q, k, v, scale=0.4, mask=mask)),
                         argnums=(0, 1, 2))(q, k, v)
        for a, b in zip(ours, theirs):
            assert float(mx.max(mx.abs(b))) > 0  # not silently zero
            assert float(mx.max(mx.abs(a - b))) <= 1e-5 * (1 + float(mx.max(mx.abs(b))))


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_attention_keeps_half_precision_dtypes_and_hidden_rows(dtype):
    q, k, v = (mx.random.normal(s, key=mx.random.key(i)).astype(dtype)
               for i, s in enumerate([(2, 4, 3, 8), (2, 2, 5, 8), (2, 2, 5, 8)]))
    hidden = mx.array([[True, True, False, True, False]] * 2 + [[False] * 5]).reshape(1, 1, 3, 5)
    for mask in ["causal", hidden]:
        got = fastmath.attention(q, k, v, 0.5, mask)
        want = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.5, mask=mask)
        assert got.dtype == dtype
        assert not bool(mx.any(mx.isnan(got)))  # a row with every slot hidden averages, as MLX's
        assert float(mx.max(mx.abs(got.astype(mx.float32) - want.astype(mx.float32)))) < 2e-2


def _logits_and_lora_grad(model, eager: bool):
    x = mx.array([[1, 5, 9, 2, 7, 3, 4, 4]])
    with fastmath.eager() if eager else _nothing():
        logits = model(x)
    loss = lambda m: m(x)[..., :50].astype(mx.float32).square().mean()  # noqa: E731
    grads = nn.value_and_grad(model, loss)(model)[1]
    return logits, dict(tree_flatten(grads))


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _with_adapters(m):
    mx.random.seed(0)
    attach_adapters(m, AdapterConfig())
    # B starts at zero: give it values so the gradient reaches every A as well
    m.update(tree_unflatten([(k, mx.random.normal(v.shape) * 0.05) for k, v in tree_flatten(m.trainable_parameters())]))
    return m


def _count_calls(monkeypatch):
    calls = []
    real = fastmath.attention
    monkeypatch.setattr(fastmath, "attention", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    return calls


def test_fast_attention_on_the_embedded_model_same_logits_and_lora_gradients(monkeypatch):
    fast = _with_adapters(load_model(ModelConfig())[0])
    stock = _with_adapters(load_model(ModelConfig(fast_attention=False))[0])  # after: the module is patched
    assert all(getattr(type(b), "_mlx_grpo_fast_attention", False) for b in fast.layers)
    assert not any(getattr(type(b), "_mlx_grpo_fast_attention", False) for b in stock.layers)
    assert sorted(k for k, _ in tree_flatten(fast.parameters())) == sorted(k for k, _ in tree_flatten(stock.parameters()))
    fast.update(tree_unflatten(tree_flatten(stock.trainable_parameters())))
    calls = _count_calls(monkeypatch)
    for eager in (False, True):
        calls.clear()
        l1, g1 = _logits_and_lora_grad(stock, eager)
        assert not calls  # the model that did not opt in runs mlx-lm's attention, patched module or not
        l2, g2 = _logits_and_lora_grad(fast, eager)
        assert len(calls) == 2 * len(fast.layers)  # the forward, then the gradient's
        assert float(mx.max(mx.abs(l1 - l2))) < 1e-4
        assert g1.keys() == g2.keys() and any("self_attn" in k for k in g1)
        for k in g1:
            scale = float(mx.max(mx.abs(g1[k])))
            assert scale > 0, k  # LoRA gradients are not silently zero
            assert float(mx.max(mx.abs(g1[k] - g2[k]))) <= 1e-4 * scale, k


def test_fast_attention_under_gradient_checkpointing_same_gradients():
    plain = _with_adapters(load_model(ModelConfig())[0])
    ckpt = _with_adapters(load_model(ModelConfig())[0])
    ckpt.update(tree_unflatten(tree_flatten(plain.trainable_parameters())))
    enable_grad_checkpoint(ckpt)
    assert getattr(type(ckpt.layers[0]), "_mlx_grpo_checkpointed", False)
    assert getattr(type(ckpt.layers[0]), "_mlx_grpo_fast_attention", False)  # inherited: still opted in
    (_, g1), (_, g2) = _logits_and_lora_grad(plain, False), _logits_and_lora_grad(ckpt, False)
    for k in g1:
        assert float(mx.max(mx.abs(g1[k] - g2[k]))) <= 1e-5 * float(mx.max(mx.abs(g1[k]))), k


def test_use_fast_attention_is_idempotent_and_cpu_only(monkeypatch):
    model, _ = load_model(ModelConfig())
    cls = type(model.layers[0])
    assert fastmath.use_fast_attention(model) == len(model.layers)  # already done by load_model
    assert type(model.layers[0]) is cls  # not wrapped twice
    monkeypatch.setattr(fastmath, "on_cpu", lambda: False)
    other, _ = load_model(ModelConfig(fast_attention=False))
    assert fastmath.use_fast_attention(other) == 0
    assert not getattr(type(other.layers[0]), "_mlx_grpo_fast_attention", False)


def test_dispatcher_keeps_mlx_lms_own_for_quantized_caches_sinks_and_other_backends(monkeypatch):
    seen = []

    def original(q, k, v, cache=None, scale=1.0, mask=None, sinks=None):
        seen.append("original")
        return q

    calls = _count_calls(monkeypatch)
    sdpa = fastmath._sdpa_with_fast_path(original)
    q, k = mx.zeros((1, 2, 1, 4)), mx.zeros((1, 1, 3, 4))

    class Quantized:
        bits = 4

    sdpa(q, k, k, None, 1.0, None)  # no model opted in is running
    monkeypatch.setattr(fastmath, "_attention_depth", 1)
    sdpa(q, k, k, Quantized(), 1.0, None)
    sdpa(q, k, k, None, 1.0, None, sinks=mx.zeros((2,)))
    assert seen == ["original"] * 3 and not calls
    sdpa(q, k, k, None, 1.0, None)
    assert len(calls) == 1 and len(seen) == 3
    monkeypatch.setattr(fastmath, "on_cpu", lambda: False)
    sdpa(q, k, k, None, 1.0, None)
    assert len(seen) == 4 and len(calls) == 1


def test_a_module_that_does_not_use_mlx_lms_attention_is_not_touched():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def __call__(self, x):
            return self.proj(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = [Block(), Block()]

    net = Net()
    assert fastmath.use_fast_attention(net) == 0
    assert type(net.layers[0]) is Block
    assert not hasattr(sys.modules[__name__], "scaled_dot_product_attention")


def test_stock_attention_runs_mlx_lms_own_within_its_block_and_restores(monkeypatch):
    model, _ = load_model(ModelConfig())
    fast_cls = type(model.layers[0])
    calls = _count_calls(monkeypatch)
    x = mx.array([[1, 5, 9, 2]])
    with fastmath.stock_attention(model):
        assert type(model.layers[0]) is fast_cls._mlx_grpo_stock
        mx.eval(model(x))
    assert not calls
    assert type(model.layers[0]) is fast_cls
    mx.eval(model(x))
    assert len(calls) == len(model.layers)
