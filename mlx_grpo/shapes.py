"""Real model shapes with random weights, for ``cli.py bench --shape``.

A shape is a release's exact configuration (layers, hidden size, heads, KV heads, FFN, the full
vocabulary, tied embeddings, RoPE settings), so every matmul, cache and logits tensor has the size
the released model gives it; the weights are random and the tokenizer is the embedded model's
(its ids are a subset of the vocabulary), because the cost sits in the shapes, not in the values.
Built once and cached outside the repository, 4-bit by default like the mlx-community releases,
and converted the way those are: the float weights cast to the release's bfloat16 first, so the
scales, norms and activations are bfloat16 on Metal and CUDA (on the CPU ``float_base.py`` gives
the base float32 weights either way). ``--bits 0`` keeps every weight in float32.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from .cachedir import cache_root
from .errors import UserError
from .config import EMBEDDED_MODEL

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")

# From each release's config.json on the Hub (Qwen/Qwen2.5-0.5B, Qwen/Qwen2.5-1.5B,
# meta-llama/Llama-3.2-1B).
SHAPES: Dict[str, Dict[str, Any]] = {
    "qwen2.5-0.5b": {
        "model_type": "qwen2", "hidden_size": 896, "num_hidden_layers": 24, "intermediate_size": 4864,
        "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936,
        "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    },
    "qwen2.5-1.5b": {
        "model_type": "qwen2", "hidden_size": 1536, "num_hidden_layers": 28, "intermediate_size": 8960,
        "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
        "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True,
    },
    "llama-3.2-1b": {
        "model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 16, "intermediate_size": 8192,
        "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "vocab_size": 128256,
        "max_position_embeddings": 131072, "rope_theta": 500000.0, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": True,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    },
}


class ShapeError(UserError, ValueError):
    """An unknown shape name or bit width; the message lists the known ones."""


def shape_config(name: str, layers: Optional[int] = None, dtype: str = "float32") -> Dict[str, Any]:
    """The HF config.json of shape ``name`` (``layers`` overrides the depth, for measurements)."""
    if name not in SHAPES:
        raise ShapeError(f"--shape: unknown shape {name!r} (known: {', '.join(SHAPES)})")
    config = {**SHAPES[name], "architectures": ["Qwen2ForCausalLM" if name.startswith("qwen") else "LlamaForCausalLM"],
              "bos_token_id": 2, "eos_token_id": 3, "torch_dtype": dtype}
    if layers is not None:
        config["num_hidden_layers"] = layers
    return config


def build(config: Dict[str, Any], seed: int = 0) -> nn.Module:
    """A float32 model of ``config`` with random weights: mlx-lm's initialisation, the residual
    branches' output projections scaled by 1/sqrt(2 x layers) so the residual stream stays of
    order one through the depth (GPT-2's scheme), so logits and softmaxes stay finite."""
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    scale = 1.0 / math.sqrt(2 * config["num_hidden_layers"])
    scaled = [(k, v * scale) for k, v in tree_flatten(model.parameters())
              if k.endswith(("o_proj.weight", "down_proj.weight"))]
    model.update(tree_unflatten(scaled))
    mx.eval(model.parameters())
    return model


def shape_dir(name: str, bits: int = 4, layers: Optional[int] = None, root: Optional[Path] = None) -> Path:
    """Build (once, cached under ~/.cache/mlx-grpo) shape ``name`` with ``bits``-bit weights (0:
    float32; 4 or 8: quantized from bfloat16, with bfloat16 scales and norms, as mlx-lm converts a
    release) in the HF/mlx-lm layout; returns its directory."""
    if bits not in (0, 4, 8):
        raise ShapeError(f"--bits: must be 0 (float32), 4 or 8, got {bits}")
    config = shape_config(name, layers, "bfloat16" if bits else "float32")
    # "-bf16": the directories of earlier versions held 4-bit weights with float32 scales.
    tag = f"{name}-{'fp32' if bits == 0 else f'{bits}bit-bf16'}" + (f"-{layers}layers" if layers else "")
    out = (root or cache_root()) / f"shape-{tag}"
    if (out / "config.json").exists():
        return out
    model = build(config)
    if bits:
        from mlx_lm.utils import quantize_model

        model.set_dtype(mx.bfloat16)
        model, config = quantize_model(model, config, group_size=64, bits=bits)

    def embedded_tokenizer(d: Path) -> None:
        for name_ in TOKENIZER_FILES:
            (d / name_).write_bytes((Path(EMBEDDED_MODEL) / name_).read_bytes())

    return save_model_dir(out, model, config, embedded_tokenizer)


def save_model_dir(out: Path, model: nn.Module, config: Dict[str, Any], tokenizer: Callable[[Path], None]) -> Path:
    """Write ``model`` (safetensors), its ``config`` and the files ``tokenizer(dir)`` writes to
    ``out`` in the HF/mlx-lm layout, atomically: a half-written model is never found there."""
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    tokenizer(tmp)
    mx.save_safetensors(str(tmp / "model.safetensors"), dict(tree_flatten(model.parameters())),
                        metadata={"format": "mlx"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out)
    return out
