"""A float32 frozen base on MLX's CPU backend.

MLX's CPU kernels for quantized and half-precision matmuls are far slower than its float32 path
(which calls the BLAS): measured on a 2-core x86-64 with OpenBLAS, one 256 x 896 x 4864 projection
takes 13 ms in float32, 405 ms in bfloat16 and 984 ms as a 4-bit ``QuantizedLinear``. Most MLX
models on the Hub are 4-bit or bf16, so on the CPU the frozen base is rebuilt in float32 at load
(quantized layers dequantized, half-precision weights cast) when it fits in memory.

The adapters stay valid for the original model: a LoRA/DoRA layer has the same input and output
sizes on a ``Linear`` and on the ``QuantizedLinear`` it came from (mlx-lm derives the input size
from the packed width), and the frozen weights are never saved, so mlx-lm loads the saved
adapters onto the quantized base unchanged. Metal and CUDA keep their fast quantized kernels.
"""

from __future__ import annotations

from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

GB = 1e9

# Per-matmul slowdown against float32 on the CPU backend (the module docstring's measurement).
CPU_SLOWDOWN = {"quantized": 984 / 13, "half": 405 / 13}

# The float32 base may take at most this share of the memory the run can use: the rest is for
# the rollout's KV cache, activations and the OS.
MAX_SHARE = 0.5


def device_kind() -> str:
    """cpu | metal | cuda: where MLX computes by default."""
    if mx.default_device() == mx.cpu:
        return "cpu"
    if getattr(mx, "cuda", None) is not None and mx.cuda.is_available():
        return "cuda"
    if mx.metal.is_available():
        return "metal"
    return str(mx.default_device())


def _quantized(m: nn.Module) -> bool:
    return isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) or type(m).__name__ == "QuantizedSwitchLinear"


def float32_bytes(model: nn.Module) -> float:
    """Bytes the model's weights take once every quantized layer is dequantized and every floating
    weight is float32."""
    total = 0.0
    quantized = set()
    for name, m in model.named_modules():
        if _quantized(m):
            quantized.add(name)
            rows, packed = m.weight.shape[-2:]
            lead = m.weight.size // (rows * packed)
            total += 4.0 * lead * rows * packed * 32 // m.bits
            if "bias" in m:
                total += 4.0 * m.bias.size
    for name, v in tree_flatten(model.parameters()):
        owner = name.rsplit(".", 1)[0]
        if owner not in quantized:
            total += 4.0 * v.size if mx.issubdtype(v.dtype, mx.floating) else v.nbytes
    return total


def base_kind(model: nn.Module) -> Optional[str]:
    """'quantized' when any layer is quantized, 'half' when any floating weight is bf16/fp16, None
    when the model is already float32 throughout."""
    if any(_quantized(m) for _, m in model.named_modules()):
        return "quantized"
    if any(v.dtype in (mx.bfloat16, mx.float16) for _, v in tree_flatten(model.parameters())):
        return "half"
    return None


def _describe(model: nn.Module, kind: str) -> str:
    """'4-bit', '4/8-bit' or 'bf16/fp16': what the base is, for the one line."""
    if kind == "half":
        return "bf16/fp16"
    bits = sorted({m.bits for _, m in model.named_modules() if _quantized(m)})
    return "/".join(str(b) for b in bits) + "-bit"


def to_float32(model: nn.Module) -> nn.Module:
    """Dequantize every quantized layer (mlx-lm's ``dequantize_model``) and cast every floating
    weight to float32, in place; the weights are evaluated here, not at the first forward."""
    from mlx_lm.utils import dequantize_model

    dequantize_model(model)
    cast = lambda v: v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v  # noqa: E731
    model.update(tree_map(cast, model.parameters()))
    mx.eval(model.parameters())
    return model


def float_base(model: nn.Module, enabled: bool, available: Optional[float],
               say: Callable[[str], None] = lambda _: None) -> bool:
    """On the CPU backend, give ``model`` a float32 base when it fits; returns whether it did.

    ``available``: bytes the run may use (None: unknown, assumed to fit). Says one line either way
    when the model is quantized or half precision; silent on Metal/CUDA and for float32 models.
    """
    kind = base_kind(model)
    if kind is None or device_kind() != "cpu":
        return False
    what = _describe(model, kind)
    slower = CPU_SLOWDOWN[kind]
    if not enabled:
        say(f"model: keeping the {what} weights on the CPU backend (model.float_base=false); its "
            f"CPU matmuls run about {slower:.0f}x slower than float32")
        return False
    need = float32_bytes(model)
    if available is not None and need > MAX_SHARE * available:
        say(f"warning: model: a float32 base ({need / GB:.2f} GB) does not fit in half of the "
            f"{available / GB:.1f} GB available; keeping the {what} weights, whose CPU matmuls run "
            f"about {slower:.0f}x slower than float32")
        return False
    to_float32(model)
    say(f"model: {what} base weights converted to float32 for MLX's CPU backend ({need / GB:.2f} GB; "
        f"its {what} matmuls are ~{slower:.0f}x slower); adapters stay valid for the original "
        "model (model.float_base=false keeps it as loaded)")
    return True
