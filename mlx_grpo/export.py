"""A run's adapters fused into the GGUF model it trained, written back as a GGUF file.

The trained model then runs where GGUF files run: llama.cpp (``llama-cli -m FILE``), Ollama
(``ollama create NAME -f FILE.Modelfile``, written beside the file), LM Studio. The new
file is the source file with its weights replaced: every metadata entry is copied byte for byte
(the tokenizer, the chat template, the architecture's settings, each with its GGUF type), except
``general.file_type``; the weights are the model's with the adapters fused in, under llama.cpp's
tensor names, llama's query and key rows put back in llama.cpp's order (the inverse of the
conversion's), one-dimensional tensors (norms, biases) in F32 as llama.cpp's converter writes
them and the matrices in the chosen type (F16 by default; Q8_0; F32). Tensors that are not
weights of the model (Llama 3's ``rope_freqs``) are copied as they are.

Only a model that came from a GGUF file can be written back this way: its metadata is what a
GGUF reader needs. A Hub model's fused weights are mlx-lm's (``mlx_lm.fuse``), and llama.cpp's
``convert_hf_to_gguf.py`` turns those into GGUF.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from .config import Config
from .errors import UserError
from .gguf_convert import _BLOCK, _TOP
from .gguf_read import GGUFHeader, read_header
from .gguf_write import FILE_TYPES, WRITABLE, kv_u32, raw_kvs, tensor_bytes, write_gguf
from .models import ModelLoadError, gguf_source, load_adapters, load_model
from .rundir import atomic_write
from .tasks.templates import R1_SYSTEM_PROMPT, R1_ZERO_PREAMBLE

_GGUF_TOP = {hf: gg for gg, hf in _TOP.items()}
_GGUF_BLOCK = {hf: gg for gg, hf in _BLOCK.items()}


class ExportError(UserError, ValueError):
    """A run that cannot be written as a GGUF file; the message names why."""


def gguf_name(hf: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``blk.3.attn_q.weight`` (llama.cpp's names)."""
    stem, _, leaf = hf.rpartition(".")
    if stem in _GGUF_TOP:
        return f"{_GGUF_TOP[stem]}.{leaf}"
    parts = stem.split(".")
    if len(parts) >= 4 and parts[:2] == ["model", "layers"] and ".".join(parts[3:]) in _GGUF_BLOCK:
        return f"blk.{parts[2]}.{_GGUF_BLOCK['.'.join(parts[3:])]}.{leaf}"
    raise ExportError(f"the model's tensor {hf} has no llama.cpp name (not a llama or qwen2 weight)")


def permute_rows(a: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's reordering of a llama query/key projection's rows for its rotary embedding
    (convert_hf_to_gguf's ``permute``): the inverse of ``gguf_convert._unpermute_rows``."""
    return a.reshape(n_heads, 2, a.shape[0] // n_heads // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)


def fused_weights(model: nn.Module) -> Dict[str, mx.array]:
    """The model's weights with its adapters fused in (LoRA, DoRA: mlx-lm's ``fuse``) and every
    quantized layer dequantized, by Hugging Face name."""
    from mlx_lm.utils import dequantize_model

    fused = [(n, m.fuse(dequantize=True)) for n, m in model.named_modules() if hasattr(m, "fuse")]
    if fused:
        model.update_modules(tree_unflatten(fused))
    model = dequantize_model(model)
    return dict(tree_flatten(model.parameters()))


def gguf_tensors(weights: Dict[str, mx.array], header: GGUFHeader, type_name: str
                 ) -> List[Tuple[str, Tuple[int, ...], str, Callable[[], bytes]]]:
    """The tensors of the file to write, in the source file's order: each weight under its
    llama.cpp name, as (name, shape, ggml type, its bytes when asked: one tensor in memory at a
    time); the source's tensors the model does not hold (``rope_freqs``) as they were."""
    md, arch = header.metadata, header.arch()
    heads = {"attn_q": int(md[f"{arch}.attention.head_count"]),
             "attn_k": int(md.get(f"{arch}.attention.head_count_kv", md[f"{arch}.attention.head_count"]))}
    ours = {gguf_name(k): k for k in weights}

    def weight(name: str) -> Tuple[str, Tuple[int, ...], str, Callable[[], bytes]]:
        hf = ours[name]
        shape = tuple(weights[hf].shape)
        # llama.cpp's converter: vectors in F32; a matrix whose rows are not whole Q8_0 blocks in F16
        kind = "F32" if len(shape) == 1 else type_name
        if kind == "Q8_0" and shape[-1] % 32:
            kind = "F16"

        def data() -> bytes:
            a = np.array(weights[hf].astype(mx.float32))
            part = name.split(".")[2] if name.startswith("blk.") else ""
            if arch == "llama" and part in heads:
                a = permute_rows(a, heads[part])
            return tensor_bytes(a, kind)

        return name, shape, kind, data

    def copied(t) -> Tuple[str, Tuple[int, ...], str, Callable[[], bytes]]:
        def data() -> bytes:
            with open(header.path, "rb") as f:
                f.seek(t.offset)
                return f.read(t.nbytes)

        return t.name, t.shape, t.type_name, data

    out = [weight(t.name) if t.name in ours else copied(t) for t in header.tensors]
    missing = sorted(set(ours) - {t.name for t in header.tensors})
    if missing:  # an adapter on a layer the file does not have (lm_head of tied embeddings)
        raise ExportError(f"the fused model has tensors the GGUF file does not: {', '.join(missing[:3])}")
    return out


def modelfile(cfg: Config, gguf_path: Path, chat_template: str) -> str:
    """An Ollama Modelfile that prompts the exported model as the run's training did: the R1-Zero
    template, or a ChatML chat template with the run's system prompt, each with the response
    opened by ``prompt.response_prefix``; for another chat template, Ollama's own for the file,
    with the run's system prompt."""
    prefix = cfg.prompt.response_prefix or ""
    lines = [f"# mlx-grpo export: {gguf_path.name}, prompted as the run trained it.",
             f"# ollama create NAME -f {modelfile_path(gguf_path).name}, then ollama run NAME \"What is 12 + 7 ?\"",
             f"FROM ./{gguf_path.name}"]
    system = R1_SYSTEM_PROMPT if cfg.prompt.system_prompt is None else cfg.prompt.system_prompt
    if cfg.prompt.kind == "r1":
        lines.append(f'TEMPLATE """{R1_ZERO_PREAMBLE} User: {{{{ .Prompt }}}} Assistant:{prefix}"""')
    elif "<|im_start|>" in chat_template:
        lines.append('TEMPLATE """{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
                     '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
                     f'<|im_start|>assistant\n{prefix}"""')
    elif prefix:
        lines.append(f"# the run opened each response with {json.dumps(prefix)}; this template does not")
    if cfg.prompt.kind == "chat" and system:
        lines.append(f'SYSTEM """{system}"""')
    for stop in cfg.rollout.stop or []:
        lines.append(f"PARAMETER stop {json.dumps(stop)}")
    return "\n".join(lines) + "\n"


def modelfile_path(out: Path) -> Path:
    """The Modelfile written beside the GGUF file ``out``: its name with ``.Modelfile`` (one per
    export, so exports of several types sit side by side)."""
    return out.with_suffix(".Modelfile")


def export_gguf(cfg: Config, adapter_dir: Optional[str], out: Optional[Path], type_name: str = "F16",
                overwrite: bool = False, say: Callable[[str], None] = print, out_dir: Optional[str] = None) -> Path:
    """Write the model of ``cfg`` with the adapters in ``adapter_dir`` fused in as a GGUF file
    (default: ``<out_dir or adapter_dir>/<source stem>-grpo-<type>.gguf``) and an Ollama Modelfile
    beside it; returns the file. Neither replaces an existing file unless ``overwrite``."""
    type_name = type_name.upper()
    if type_name not in WRITABLE:
        raise ExportError(f"--type: {type_name.lower()} is not writable (choose from {', '.join(t.lower() for t in WRITABLE)})")
    try:
        src, name = gguf_source(cfg.model)
    except ModelLoadError:  # not a GGUF model (a failed download or an Ollama name keeps its own line)
        raise ExportError(f"model.path: {cfg.model.path} is not a GGUF file: export writes back GGUF models; for "
                          "another model, mlx_lm.fuse --dequantize, then llama.cpp's convert_hf_to_gguf.py") from None
    header = read_header(src)
    default = f"{name or src.stem}-grpo-{type_name}.gguf"
    if out is None:
        if not (out_dir or adapter_dir):
            raise ExportError("--out: needed when no run or adapter directory is given")
        out = Path(out_dir or adapter_dir) / default
    out = Path(out)
    if out.is_dir():  # a folder: the file goes in it, under its default name
        out = out / default
    if not out.parent.is_dir():
        raise ExportError(f"--out: {out.parent} is not a directory")
    model_file = modelfile_path(out)
    for path in (out, model_file):
        if path.exists() and not overwrite:
            raise ExportError(f"--out: {path} exists (--overwrite replaces it)")
    model, _ = load_model(cfg.model, say=say)
    if adapter_dir:
        load_adapters(model, adapter_dir)
    weights = fused_weights(model)
    tensors = gguf_tensors(weights, header, type_name)
    keep = [span for key, span in header.kv_spans.items() if key != "general.file_type"]
    kvs = raw_kvs(src, keep) + [kv_u32("general.file_type", FILE_TYPES[type_name])]
    alignment = int(header.metadata.get("general.alignment", 32))
    say(f"writing {out} ({type_name}, {len(tensors)} tensors, adapters from {adapter_dir or 'none'})")

    def write(p: Path) -> None:
        with open(p, "wb") as f:
            write_gguf(f, kvs, tensors, alignment)

    atomic_write(out, write)
    text = modelfile(cfg, out, str(header.metadata.get("tokenizer.chat_template", "")))
    atomic_write(model_file, lambda p: p.write_text(text))
    return out
