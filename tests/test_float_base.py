"""The float32 base on the CPU backend: a 4-bit (or bf16) model quantized here with mlx-lm loads
as float32 layers holding exactly the dequantized weights, computes the same logits as the
quantized model, and the adapters trained on it load with mlx-lm onto the 4-bit base."""

from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from mlx_grpo.config import ModelConfig, make_config
from mlx_grpo.float_base import device_kind, float32_bytes
from mlx_grpo.models import attach_adapters, load_model, save_adapters

pytestmark = pytest.mark.skipif(device_kind() != "cpu", reason="the float32 base applies to MLX's CPU backend")


def convert(src: Path, out: Path, **kw) -> Path:
    from mlx_lm.convert import convert as mlx_lm_convert

    mlx_lm_convert(str(src), str(out), **kw)
    return out


@pytest.fixture(scope="module")
def q4_dir(embedded_model_dir, tmp_path_factory) -> Path:
    return convert(embedded_model_dir, tmp_path_factory.mktemp("q") / "q4", quantize=True, q_bits=4, q_group_size=64)


def quantized_layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}


def logits(model, ids):
    return model(mx.array([ids]))[0].astype(mx.float32)


IDS = list(range(3, 40))


def test_quantized_layers_become_float32_with_the_dequantized_weights(q4_dir):
    keep, _ = load_model(ModelConfig(path=str(q4_dir), float_base=False))
    lines = []
    model, _ = load_model(ModelConfig(path=str(q4_dir)), say=lines.append)
    q = quantized_layers(keep)
    assert q and not quantized_layers(model)
    assert len(lines) == 1 and "converted to float32" in lines[0]
    modules = dict(model.named_modules())
    for name, m in q.items():
        want = mx.dequantize(m.weight, m.scales, m.biases, m.group_size, m.bits)
        got = modules[name].weight
        assert got.dtype == mx.float32
        np.testing.assert_array_equal(np.array(got), np.array(want.astype(mx.float32)))
    assert all(v.dtype == mx.float32 for _, v in tree_flatten(model.parameters()))
    assert float32_bytes(keep) == sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    # Same function: the quantized kernels and the float32 matmuls agree to float rounding.
    a, b = np.array(logits(keep, IDS)), np.array(logits(model, IDS))
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-4)


def test_half_precision_weights_are_cast(embedded_model_dir, tmp_path):
    bf16 = convert(embedded_model_dir, tmp_path / "bf16", dtype="bfloat16")
    keep, _ = load_model(ModelConfig(path=str(bf16), float_base=False))
    assert any(v.dtype == mx.bfloat16 for _, v in tree_flatten(keep.parameters()))
    model, _ = load_model(ModelConfig(path=str(bf16)))
    assert all(v.dtype == mx.float32 for _, v in tree_flatten(model.parameters()))
    for (k, a), (_, b) in zip(tree_flatten(keep.parameters()), tree_flatten(model.parameters())):
        np.testing.assert_array_equal(np.array(a.astype(mx.float32)), np.array(b), err_msg=k)


def test_no_room_keeps_the_quantized_weights_and_warns(q4_dir, monkeypatch):
    monkeypatch.setenv("MLX_GRPO_MEMORY_LIMIT", "1000")  # bytes: nothing fits
    lines = []
    model, _ = load_model(ModelConfig(path=str(q4_dir)), say=lines.append)
    assert quantized_layers(model)
    assert len(lines) == 1 and lines[0].startswith("warning: model: a float32 base") and "slower" in lines[0]


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_adapters_trained_on_the_float32_base_load_onto_the_4bit_base(q4_dir, tmp_path, kind):
    from mlx_lm.utils import load as mlx_lm_load

    cfg = make_config(None, [("model.path", str(q4_dir)), ("adapter.type", kind)])
    model, _ = load_model(cfg.model)
    mx.random.seed(1)
    attach_adapters(model, cfg.adapter)
    # Stand-in for training: every adapter weight moved, so the adapters change the output.
    moved = [(k, v + 0.05 * mx.random.normal(v.shape)) for k, v in tree_flatten(model.trainable_parameters())]
    model.update(tree_unflatten(moved))
    save_adapters(model, tmp_path, cfg.adapter, str(q4_dir))
    ours = np.array(logits(model, IDS))
    theirs, _ = mlx_lm_load(str(q4_dir), adapter_path=str(tmp_path))  # mlx-lm on the 4-bit base
    assert quantized_layers(theirs)
    base, _ = load_model(ModelConfig(path=str(q4_dir), float_base=False))
    assert np.abs(ours - np.array(logits(base, IDS))).max() > 1e-2  # the adapters matter
    np.testing.assert_allclose(np.array(logits(theirs, IDS)), ours, rtol=1e-4, atol=1e-4)
