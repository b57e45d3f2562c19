"""Adapters: gradients flow, only adapters move, the reference is the untouched base, and saved
adapters load back through mlx-lm with the same logits."""

import json
import subprocess
import sys

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_grpo.config import AdapterConfig, Config, ModelConfig, make_config
from mlx_grpo.models import adapters_disabled, attach_adapters, load_model, save_adapters
from mlx_grpo.rollout import sample_groups
from mlx_grpo.logprobs import completion_logprobs
from mlx_grpo.learner import StepBatch, select_rows, update


def rollout_batch(model, tok, cfg):
    mx.random.seed(0)
    ro = sample_groups(model, tok, ["What is 3 + 4 ?", "5 + 5 = 10 . What is 2 + 2 ?"], cfg.rollout)
    adv = np.array([1.0, -1.0, 0.5, -0.5] * (len(ro.texts) // 4), dtype=np.float32)
    return select_rows(ro, adv, np.arange(len(ro.texts)))


def make(model_dir, float_base=True, **adapter):
    cfg = make_config(None, [("rollout.group_size", 4), ("rollout.max_tokens", 8), ("rollout.stop", [])]
                      + [(f"adapter.{k}", v) for k, v in adapter.items()])
    model, tok = load_model(ModelConfig(path=str(model_dir), float_base=float_base))
    attach_adapters(model, cfg.adapter)
    return model, tok, cfg


def logprobs(model, b: StepBatch):
    return b.logprobs(model, 1.0)


@pytest.mark.parametrize("kind", ["lora", "dora", "full"])
def test_one_update_moves_only_trainable_weights_and_reference_stays_base(small_model_dir, kind):
    model, tok, cfg = make(small_model_dir, type=kind, scale=4.0)
    base, _ = load_model(ModelConfig(path=str(small_model_dir)))
    b = rollout_batch(model, tok, cfg)
    before = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    if kind != "full":
        assert trainable and all(k.rsplit(".", 1)[-1] in ("lora_a", "lora_b", "m") for k in trainable)
    opt = optim.Adam(learning_rate=1e-2)
    for _ in range(2):
        update(model, opt, b, cfg)
    after = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    moved = {k for k in before if not np.array_equal(before[k], after[k])}
    assert moved, "no parameter moved"
    assert moved <= trainable, f"frozen weights moved: {sorted(moved - trainable)[:3]}"
    # The policy moved; the reference (adapters off) is exactly the base model.
    base_lp = logprobs(base, b)
    assert mx.abs(logprobs(model, b) - base_lp).max().item() > 1e-4
    with adapters_disabled(model):
        ref_lp = logprobs(model, b)
    assert mx.abs(ref_lp - base_lp).max().item() < 1e-5
    # ...and switching them back on restores the trained policy.
    assert mx.abs(logprobs(model, b) - base_lp).max().item() > 1e-4


def test_lora_gradients_are_nonzero_on_every_adapter(small_model_dir):
    import mlx.nn as nn

    from mlx_grpo.loss import Normalizer, grpo_loss

    model, tok, cfg = make(small_model_dir)
    b = rollout_batch(model, tok, cfg)
    opt = optim.Adam(learning_rate=1e-2)
    update(model, opt, b, cfg)  # lora_b starts at zero, so lora_a's gradient needs one step

    def loss_fn(model):
        lp = b.logprobs(model, 1.0)
        return grpo_loss(lp, None, None, b.mask, b.advantages, cfg.grpo, Normalizer.of(b.mask, 8))[0]

    _, grads = nn.value_and_grad(model, loss_fn)(model)
    flat = dict(tree_flatten(grads))
    assert len(flat) == 2 * 7 * 2  # lora_a and lora_b on 7 linears in each of 2 layers
    for name, g in flat.items():
        assert mx.abs(g).max().item() > 0, f"zero gradient for {name}"


def test_saved_adapters_load_in_mlx_lm_with_same_logits(small_model_dir, tmp_path):
    from mlx_lm import load

    model, tok, cfg = make(small_model_dir, rank=4, scale=8.0)
    b = rollout_batch(model, tok, cfg)
    update(model, optim.Adam(learning_rate=1e-2), b, cfg)
    save_adapters(model, tmp_path, cfg.adapter, str(small_model_dir))
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert conf["model"] == str(small_model_dir) and conf["fine_tune_type"] == "lora"
    assert conf["lora_parameters"]["rank"] == 4
    loaded, _ = load(str(small_model_dir), adapter_path=str(tmp_path))
    x = mx.array([tok.encode("What is 3 + 4 ? <think>")])
    assert mx.allclose(loaded(x), model(x), atol=1e-5).item()


def test_qlora_on_a_quantized_base(small_model_dir, tmp_path):
    """Adapters on a 4-bit model saved in the layout of mlx-community's quantized models."""
    q = tmp_path / "q4"
    subprocess.run([sys.executable, "-m", "mlx_lm", "convert", "--hf-path", str(small_model_dir),
                    "--mlx-path", str(q), "-q", "--q-bits", "4", "--q-group-size", "32"],
                   check=True, capture_output=True)
    assert "quantization" in json.loads((q / "config.json").read_text())
    model, tok, cfg = make(q, float_base=False)  # the quantized kernels (Metal, CUDA)
    assert any(type(m).__name__ == "QuantizedLinear" for _, m in model.named_modules())
    b = rollout_batch(model, tok, cfg)
    before = logprobs(model, b)
    update(model, optim.Adam(learning_rate=1e-2), b, cfg)
    update(model, optim.Adam(learning_rate=1e-2), b, cfg)
    assert mx.abs(logprobs(model, b) - before).max().item() > 1e-4
    with adapters_disabled(model):
        assert mx.abs(logprobs(model, b) - before).max().item() < 1e-5


def test_adapter_keys_and_num_layers(small_model_dir):
    model, _, _ = make(small_model_dir, keys=["self_attn.q_proj", "self_attn.v_proj"], num_layers=1)
    names = [k for k, _ in tree_flatten(model.trainable_parameters())]
    assert sorted(names) == sorted(
        f"model.layers.1.self_attn.{p}.lora_{ab}" for p in ("q_proj", "v_proj") for ab in "ab"
    )


def test_loading_a_model_imports_none_of_the_step():
    """models.py sizes the float base by the machine's free memory; that probe lives in the bottom
    floor, so loading a model (eval, generate, mlx-lm users of our loader) does not pull in the
    rollout engine, the scorer, the preflight checks or the tasks."""
    import subprocess
    import sys

    code = ("import sys, mlx_grpo.models; "
            "print(sorted(m for m in sys.modules if m.split('.')[:2][-1] in "
            "('rollout', 'logprobs', 'preflight', 'tasks', 'step', 'learner', 'trainer')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout
