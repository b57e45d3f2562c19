"""Models: load through mlx-lm (Hub id or local path), attach adapters, switch them off for the
reference policy, and save/load adapters in mlx-lm's layout.

The KL reference is the policy with its adapters switched off: LoRA/DoRA layers are swapped for
their frozen base layers for the duration of a ``with adapters_disabled(model):`` block, so the
reference costs no extra weight memory. Full fine-tuning has no adapters to switch off, so it keeps
a copy of the trained layers' initial weights (the cost is stated in the README).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from . import hub
from .config import AdapterConfig, ConfigError, ModelConfig
from .errors import RunFault, UserError, first_line
from .fastmath import use_fast_attention, use_fast_mlps
from .float_base import float_base
from .gguf_convert import is_gguf
from .memory import available_memory
from .ollama import is_ollama, model_file as ollama_model_file
from .rundir import ADAPTER_CONFIG, ADAPTERS, atomic_write


class ModelLoadError(UserError, ValueError):
    """A model that cannot be found or read; the message names the path or Hub id."""


class NonFiniteError(RunFault, ArithmeticError):
    """NaN or infinite values where weights are about to be written; nothing was written."""


def check_finite(arrays: Dict[str, mx.array], what: str) -> None:
    """Raise ``NonFiniteError`` naming the first array of ``arrays`` with a NaN or infinity."""
    for name, a in arrays.items():
        if mx.issubdtype(a.dtype, mx.floating) and not mx.isfinite(a).all().item():
            raise NonFiniteError(f"{what}: {name} holds NaN or infinite values; not saved")


def array_kind(a: mx.array) -> str:
    """``float32[8, 512]``: an array's dtype and shape, as error messages name them."""
    return f"{str(a.dtype).removeprefix('mlx.core.')}{list(a.shape)}"


def weights_problem(saved: Any, what: str, expected: Optional[Mapping[str, mx.array]] = None) -> Optional[str]:
    """Why arrays read from a safetensors file (``mx.load``) cannot be loaded, None when they can:
    the one check of every weights file a command loads (``--resume``'s adapters and optimizer
    state, the adapters of ``eval``, ``generate`` and ``reward --adapter``).

    With ``expected`` (a resumed run's own parameters or optimizer state) the file must hold
    exactly its names, with its shapes and dtypes. Without (adapters from anywhere: mlx-lm's
    loader checks their names and shapes against the model) each array must be floating point:
    mlx-lm loads an int32 adapter as it is, and every matmul then casts integers. Every floating
    array must be finite either way: NaN adapters evaluate as noise.
    """
    if not isinstance(saved, dict):
        return f"holds no named arrays (not {what})"
    if expected is not None:
        if set(saved) != set(expected):
            diff = sorted(set(saved) ^ set(expected))
            return f"its {what} do not match this run's layout ({diff[:3]} ...)"
        for k, ref in expected.items():
            if saved[k].shape != ref.shape or saved[k].dtype != ref.dtype:
                return f"{k} is {array_kind(saved[k])}, this run needs {array_kind(ref)}"
    else:
        for k, a in saved.items():
            if not mx.issubdtype(a.dtype, mx.floating):
                return f"{k} is {array_kind(a)}, not floating-point weights"
    for k, a in saved.items():
        if mx.issubdtype(a.dtype, mx.inexact) and not mx.isfinite(a).all().item():
            return f"{k} holds NaN or infinite values"
    return None


def model_dir(cfg: ModelConfig, path: Optional[str] = None, say: Optional[Callable[[str], None]] = None) -> str:
    """What mlx-lm loads for ``path`` (default ``cfg.path``): a Hub id or directory as given; for a
    GGUF file (``*.gguf``, an Ollama model ``ollama:NAME[:TAG]``, or ``cfg.gguf_file`` in the Hub
    repository or folder ``path``) the MLX directory it is converted into once (``gguf_convert.py``).
    Adapter configs name this, so mlx-lm finds the model the adapters were trained on."""
    target = path or cfg.path
    from_hub = cfg.gguf_file and not path  # a separate reference model is never the GGUF repo's file
    if not (from_hub or is_ollama(target) or is_gguf(target)):
        return target
    key = (target, cfg.gguf_file if from_hub else None, cfg.revision, cfg.gguf_cache)
    if key not in _converted:  # once per process: each checkpoint names it, and hashing takes seconds
        from .gguf_convert import converted_dir

        src, name = gguf_source(cfg, path)
        cache = Path(cfg.gguf_cache).expanduser() if cfg.gguf_cache else None
        _converted[key] = str(converted_dir(src, cache, say, name))
    return _converted[key]


_converted: Dict[Tuple[Any, ...], str] = {}


def gguf_source(cfg: ModelConfig, path: Optional[str] = None) -> Tuple[Path, Optional[str]]:
    """The local GGUF file that ``path`` (default ``cfg.path``) names, downloaded from the Hub when
    it is a repository's ``cfg.gguf_file``, and the name its conversion takes (None: the file's
    stem). Raises ``ModelLoadError`` when the model is not a GGUF file."""
    target = path or cfg.path
    from_hub = cfg.gguf_file and not path
    local = Path(target).expanduser()
    if is_ollama(target):
        return ollama_model_file(target)
    if from_hub and local.is_dir():  # a folder of GGUF files (a Hub repository cloned, say)
        return local / cfg.gguf_file, None
    if from_hub:
        from .gguf_convert import hub_file

        return hub_file(target, cfg.gguf_file, cfg.revision), None
    if is_gguf(target):
        return local, None
    raise ModelLoadError(f"model.path: {target} is not a GGUF file")


def load_model(cfg: ModelConfig, path: Optional[str] = None,
               say: Optional[Callable[[str], None]] = None) -> Tuple[nn.Module, Any]:
    """Load (model, tokenizer) with mlx-lm's own loader, exactly as for a Hub model.

    ``path`` defaults to ``cfg.path``. A local directory is used as is; a GGUF file is converted
    first (``model_dir``); anything else is treated as a Hub id and downloaded (or taken from the
    Hugging Face cache) by mlx-lm. On MLX's CPU backend
    a quantized or half-precision base becomes float32 when it fits (``float_base.py``; ``say``
    gets the one line about it).
    """
    from mlx_lm.utils import load

    target = model_dir(cfg, path, say)
    local = Path(target).expanduser()
    looks_local = local.exists() or target.startswith((".", "/", "~")) or target.count("/") > 1
    if looks_local and not (local / "config.json").is_file():
        what = "does not exist" if not local.exists() else "has no config.json (not a model directory)"
        raise ModelLoadError(f"model.path: {target} {what}")
    try:
        with contextlib.nullcontext() if looks_local else hub.contacting(target):
            model, tokenizer = load(
                str(local) if looks_local else target,
                revision=cfg.revision,
                trust_remote_code=cfg.trust_remote_code,
            )
    except Exception as e:  # no network, unknown architecture, bad weights: one line, named
        first = hub.unreachable(e) or first_line(e)
        raise ModelLoadError(f"model.path: cannot load {target}: {first}") from None
    float_base(model, cfg.float_base, available_memory(), say or (lambda _: None))
    if cfg.fast_mlp:
        use_fast_mlps(model)
    if cfg.fast_attention:
        use_fast_attention(model)
    return model, tokenizer


def lora_parameters(cfg: AdapterConfig) -> Dict[str, Any]:
    """mlx-lm's ``lora_parameters`` dict for this adapter config."""
    params: Dict[str, Any] = {
        "rank": cfg.rank,
        "scale": cfg.effective_scale(),
        "dropout": cfg.dropout,
    }
    if cfg.keys:
        params["keys"] = list(cfg.keys)
    return params


def num_adapter_layers(model: nn.Module, cfg: AdapterConfig) -> int:
    n = len(model.layers)
    if cfg.num_layers > n:
        raise ConfigError(f"adapter.num_layers: the model has {n} layers, got {cfg.num_layers}")
    return n if cfg.num_layers == -1 else cfg.num_layers


def attach_adapters(model: nn.Module, cfg: AdapterConfig) -> nn.Module:
    """Freeze the base and make only the adapters (or, for ``full``, the last layers) trainable.

    Works on quantized bases too (QLoRA): mlx-lm's LoRA layers wrap QuantizedLinear.
    """
    from mlx_lm.tuner.utils import linear_to_lora_layers

    n = num_adapter_layers(model, cfg)
    model.freeze()
    if cfg.type == "full":
        for layer in model.layers[-n:]:
            layer.unfreeze()
        # Keep the initial weights of the trained layers: the reference policy for the KL term.
        model._mlx_grpo_reference = {  # type: ignore[attr-defined]
            k: mx.array(v) for k, v in tree_flatten(model.trainable_parameters())
        }
    else:
        linear_to_lora_layers(model, n, lora_parameters(cfg), use_dora=cfg.type == "dora")
    n_trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    if n_trainable == 0:
        raise ConfigError(
            f"adapter.keys: no trainable parameters were created (keys={cfg.keys}); "
            "check the module names of this model"
        )
    return model


def _adapter_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    return [(name, m) for name, m in model.named_modules() if hasattr(m, "lora_a") and hasattr(m, "linear")]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model`` computes the base (reference) policy; restored afterwards."""
    reference = getattr(model, "_mlx_grpo_reference", None)
    if reference is not None:  # full fine-tuning: swap the initial weights in and out
        current = [(k, v) for k, v in tree_flatten(model.trainable_parameters())]
        model.update(tree_unflatten(list(reference.items())))
        try:
            yield model
        finally:
            model.update(tree_unflatten(current))
        return
    wrapped = _adapter_modules(model)
    model.update_modules(tree_unflatten([(name, m.linear) for name, m in wrapped]))
    try:
        yield model
    finally:
        model.update_modules(tree_unflatten(wrapped))


# The folded copies may take at most this share of the memory free when a rollout starts.
FOLD_SHARE = 0.1


def _folded(m: nn.Module) -> nn.Linear:
    """A plain Linear computing what LoRA layer ``m`` computes in eval mode: W + scale (A B)^T.
    Built without ``nn.Linear.__init__``, whose random initial weights would draw from (and
    move) the global PRNG."""
    lin = m.linear
    out = nn.Linear.__new__(nn.Linear)
    nn.Module.__init__(out)
    out.weight = lin.weight + ((m.scale * m.lora_b.T) @ m.lora_a.T).astype(lin.weight.dtype)
    if "bias" in lin:
        out.bias = lin.bias
    return out


def copy_fits(extra: int, budget: Optional[float] = None) -> bool:
    """True when a rollout's copy of the weights (``extra`` bytes) takes at most ``FOLD_SHARE`` of
    ``budget`` (default: the memory free now); False when that is unknown."""
    room = available_memory() if budget is None else budget
    return room is not None and extra <= FOLD_SHARE * room


@contextlib.contextmanager
def adapters_folded(model: nn.Module, budget: Optional[float] = None) -> Iterator[int]:
    """Within the block, every LoRA layer over a float base is one Linear with its adapter folded
    in (what mlx-lm's fuse does), so a decode step runs one product per layer instead of three
    and an add (a SmolLM2 decode step of 16 rows: ~7% faster); the LoRA layers are put back
    afterwards, whatever happens. Only without gradients and in eval mode (dropout off): the
    folded weights are constants. The copies cost the base weights' bytes once more, so nothing is
    folded when they exceed ``FOLD_SHARE`` of ``budget`` (default: the memory free now) or when
    that is unknown. Yields how many layers were folded."""
    from mlx_lm.tuner.lora import LoRALinear

    wrapped = [(n, m) for n, m in _adapter_modules(model) if type(m) is LoRALinear and type(m.linear) is nn.Linear]
    extra = sum(m.linear.weight.nbytes for _, m in wrapped)
    if not wrapped or model.training or not copy_fits(extra, budget):
        yield 0
        return
    model.update_modules(tree_unflatten([(n, _folded(m)) for n, m in wrapped]))
    try:
        yield len(wrapped)
    finally:
        model.update_modules(tree_unflatten(wrapped))


def adapter_config(cfg: AdapterConfig, model_id: str, n_layers: int) -> Dict[str, Any]:
    """The adapter_config.json that mlx-lm's ``load_adapters`` (generate, fuse) reads."""
    return {
        "model": model_id,
        "fine_tune_type": cfg.type,
        "num_layers": n_layers,
        "lora_parameters": lora_parameters(cfg),
        "trainer": "mlx-grpo",
    }


def adapter_weights(model: nn.Module) -> Dict[str, mx.array]:
    """The trainable weights, named as mlx-lm names them."""
    return dict(tree_flatten(model.trainable_parameters()))


def save_adapters(model: nn.Module, out_dir: Path, cfg: AdapterConfig, model_id: str) -> None:
    """Write adapters.safetensors + adapter_config.json into ``out_dir`` (each atomically).

    Raises ``NonFiniteError`` before writing anything when a weight is NaN or infinite.
    """
    weights = adapter_weights(model)
    check_finite(weights, "adapters")  # never write weights that would poison every later load
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(
        out_dir / ADAPTERS,
        lambda p: mx.save_safetensors(str(p), weights, metadata={"format": "mlx"}),
    )
    conf = adapter_config(cfg, model_id, num_adapter_layers(model, cfg))
    atomic_write(out_dir / ADAPTER_CONFIG, lambda p: p.write_text(json.dumps(conf, indent=2) + "\n"))


def load_adapters(model: nn.Module, adapter_dir: str) -> nn.Module:
    """Attach and load adapters saved by ``save_adapters`` (or by mlx-lm) with mlx-lm's loader.

    A missing, truncated or mismatched adapter is a ``ModelLoadError`` naming the file.
    """
    from mlx_lm.tuner.utils import load_adapters as _load

    where = Path(adapter_dir)
    for name in (ADAPTER_CONFIG, ADAPTERS):
        if not (where / name).is_file():
            raise ModelLoadError(f"--adapter: {where / name} not found (not an adapter directory)")
    try:
        json.loads((where / ADAPTER_CONFIG).read_text())
    except RecursionError:  # (100 k nested brackets: json recurses)
        raise ModelLoadError(f"--adapter: {where / ADAPTER_CONFIG}: unreadable (nested too deeply)") from None
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"--adapter: {where / ADAPTER_CONFIG}: unreadable ({first_line(e)})") from None
    try:
        why = weights_problem(mx.load(str(where / ADAPTERS)), "adapters")  # what mlx-lm does not check
    except Exception as e:  # truncated or not safetensors
        why = first_line(e)
    if why:
        raise ModelLoadError(f"--adapter: {where / ADAPTERS}: cannot load adapters ({why})")
    try:
        return _load(model, adapter_dir)
    except Exception as e:  # truncated, edited, or for another model: one line, named
        first = first_line(e)
        raise ModelLoadError(f"--adapter: {where / ADAPTERS}: cannot load adapters ({first})") from None

