"""GGUF files as mlx-lm model directories: convert once, into a cache keyed by the file's hash.

A GGUF file (llama.cpp's format: one file holding weights, configuration and tokenizer) becomes a
directory mlx-lm loads like any Hub download: ``model.safetensors`` with Hugging Face's tensor
names, ``config.json`` and the tokenizer (``gguf_tokenizer.py``). Quantized tensors stay quantized
(``gguf_read.py``); llama's query and key rows, which llama.cpp's converter reorders for its own
rotary embedding, are put back in Hugging Face's order, so the model computes what the original
does and adapters trained on the conversion also fit the original release.

The directory lives under ``<cache>/gguf/<file stem>-<sha256 prefix>`` and is written atomically:
the second run, or a run that finds another process's conversion, reuses it. Its path is what
a run's adapter_config.json names, so ``mlx_lm.generate --model DIR --adapter-path RUN`` works.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import mlx.core as mx
import numpy as np

from . import hub
from .errors import first_line
from .gguf_read import GGUFError, GGUFHeader, load_tensors, read_header
from .gguf_tokenizer import write_tokenizer
from .cachedir import cache_root

# Bump when the conversion's output changes: old cached directories are then not reused.
CONVERTER_VERSION = 1
SUPPORTED = ("llama", "qwen2")
_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
# Llama 3.x's rope scaling: GGUF stores only its per-frequency factors (rope_freqs.weight); these
# are the published settings they come from (3.1: factor 8, 3.2: factor 32).
_LLAMA3_ROPE = [{"rope_type": "llama3", "factor": f, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                 "original_max_position_embeddings": 8192} for f in (8.0, 32.0, 16.0, 4.0)]


def is_gguf(path: str) -> bool:
    """Whether a model path names a GGUF file: by its suffix, as llama.cpp and the Hub name them,
    or, for a file without it (Ollama's blobs), by the format's first four bytes."""
    if path.lower().endswith(".gguf"):
        return True
    try:
        with open(Path(path).expanduser(), "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:  # a Hub id, a directory, nothing there
        return False


def default_cache() -> Path:
    return cache_root() / "gguf"


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _meta(md: Dict[str, Any], key: str, where: Path, default: Any = None) -> Any:
    if key in md:
        return md[key]
    if default is None:
        raise GGUFError(f"{where}: metadata key {key} is missing")
    return default


def _hf_name(name: str, where: Path) -> Optional[str]:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``; None for tensors
    that are not weights (``rope_freqs``)."""
    stem, _, leaf = name.rpartition(".")
    if stem == "rope_freqs":
        return None
    if stem in _TOP:
        return f"{_TOP[stem]}.{leaf}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK:
        return f"model.layers.{parts[1]}.{_BLOCK[parts[2]]}.{leaf}"
    raise GGUFError(f"{where}: tensor {name} is not part of a llama or qwen2 model")


def _unpermute_rows(a: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's reordering of a query/key projection's rows (its convert_hf_to_gguf
    ``permute``: per head, the two rotary halves interleaved); works on packed quantized rows,
    their scales and biases alike, since quantization groups run along a row."""
    rows = a.shape[0]
    half = rows // n_heads // 2
    idx = np.arange(rows).reshape(n_heads, half, 2).swapaxes(1, 2).reshape(-1)
    return a[mx.array(idx)]


def _llama3_factors(cfg: Dict[str, Any], base: float, dims: int) -> np.ndarray:
    """The rope_freqs factors llama.cpp's converter writes for Llama 3's rope scaling ``cfg``."""
    freqs = 1.0 / base ** (np.arange(0, dims, 2, dtype=np.float64) / dims)
    low_wl = cfg["original_max_position_embeddings"] / cfg["low_freq_factor"]
    high_wl = cfg["original_max_position_embeddings"] / cfg["high_freq_factor"]
    out = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < high_wl:
            out.append(1.0)
        elif wl > low_wl:
            out.append(cfg["factor"])
        else:
            smooth = (cfg["original_max_position_embeddings"] / wl - cfg["low_freq_factor"]) / (
                cfg["high_freq_factor"] - cfg["low_freq_factor"])
            out.append(1 / ((1 - smooth) / cfg["factor"] + smooth))
    return np.array(out)


def _rope_scaling(header: GGUFHeader, arrays: Dict[str, mx.array], base: float, dims: int) -> Optional[dict]:
    md, arch, where = header.metadata, header.arch(), header.path
    kind = md.get(f"{arch}.rope.scaling.type", "none")
    if kind == "linear":
        return {"type": "linear", "factor": float(_meta(md, f"{arch}.rope.scaling.factor", where))}
    if kind not in ("none", None):
        raise GGUFError(f"{where}: rope scaling {kind!r} is not supported (none, linear, Llama 3's)")
    if "rope_freqs.weight" not in arrays:
        return None
    factors = np.array(arrays["rope_freqs.weight"].astype(mx.float32))
    for cand in _LLAMA3_ROPE:
        ref = _llama3_factors(cand, base, dims)
        if ref.shape == factors.shape and np.allclose(ref, factors, rtol=1e-3):
            return dict(cand)
    raise GGUFError(f"{where}: rope_freqs.weight matches none of Llama 3's rope scalings")


def model_config(header: GGUFHeader, arrays: Dict[str, mx.array], quant: Dict[str, Tuple[int, int]]) -> Dict[str, Any]:
    """The Hugging Face config.json of the model in ``header``."""
    md, arch, where = header.metadata, header.arch(), header.path
    heads = int(_meta(md, f"{arch}.attention.head_count", where))
    hidden = int(_meta(md, f"{arch}.embedding_length", where))
    head_dim = int(md.get(f"{arch}.attention.key_length", hidden // heads))
    base = float(md.get(f"{arch}.rope.freq_base", 10000.0 if arch == "llama" else 1000000.0))
    embed = arrays.get("token_embd.weight")
    if embed is None:
        raise GGUFError(f"{where}: tensor token_embd.weight is missing")
    cfg: Dict[str, Any] = {
        "model_type": arch,
        "architectures": [_ARCHITECTURES[arch]],
        "hidden_size": hidden,
        "num_hidden_layers": int(_meta(md, f"{arch}.block_count", where)),
        "intermediate_size": int(_meta(md, f"{arch}.feed_forward_length", where)),
        "num_attention_heads": heads,
        "num_key_value_heads": int(md.get(f"{arch}.attention.head_count_kv", heads)),
        "rms_norm_eps": float(_meta(md, f"{arch}.attention.layer_norm_rms_epsilon", where)),
        "vocab_size": int(embed.shape[0]),
        "max_position_embeddings": int(md.get(f"{arch}.context_length", 4096)),
        "rope_theta": base,
        "rope_traditional": False,
        "tie_word_embeddings": "output.weight" not in arrays,
        "torch_dtype": {mx.float16: "float16", mx.bfloat16: "bfloat16"}.get(
            arrays.get("output_norm.weight", embed).dtype, "float32"),
    }
    if arch == "llama":
        cfg["head_dim"] = head_dim
        cfg["attention_bias"] = "blk.0.attn_q.bias" in arrays
        cfg["mlp_bias"] = "blk.0.ffn_up.bias" in arrays
    scaling = _rope_scaling(header, arrays, base, head_dim)
    if scaling:
        cfg["rope_scaling"] = scaling
    if quant:
        counts: Dict[Tuple[int, int], int] = {}
        for gb in quant.values():
            counts[gb] = counts.get(gb, 0) + 1
        group, bits = max(counts, key=counts.__getitem__)
        per_layer = {}
        for stem, (g, b) in quant.items():
            name = _hf_name(stem + ".weight", where)
            if name:
                per_layer[name[: -len(".weight")]] = {"group_size": g, "bits": b}
        cfg["quantization"] = {"group_size": group, "bits": bits, **per_layer}
        cfg["quantization_config"] = cfg["quantization"]
    return cfg


def convert(header: GGUFHeader, out: Path) -> None:
    """Write the mlx-lm model directory of the GGUF file ``header`` describes into ``out``."""
    arch, where = header.arch(), header.path
    if arch not in SUPPORTED:
        raise GGUFError(f"{where}: architecture {arch or '(none)'!r} is not supported (supported: {', '.join(SUPPORTED)})")
    out.mkdir(parents=True, exist_ok=True)
    ids = write_tokenizer(header.metadata, out, str(where))  # the cheap checks before the weights
    arrays, quant = load_tensors(header)
    config = model_config(header, arrays, quant)
    config.update({k: v for k, v in ids.items() if v is not None})
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    weights = {}
    for name, a in arrays.items():
        hf = _hf_name(name, where)
        if hf is None:
            continue
        kind = name.split(".")[2] if name.startswith("blk.") else ""
        if arch == "llama" and kind in heads:
            a = _unpermute_rows(a, heads[kind])
        weights[hf] = a
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    source = {"gguf": str(where), "converter_version": CONVERTER_VERSION,
              "tensor_types": sorted(set(header.types().values())), "general.name": header.metadata.get("general.name")}
    (out / "mlx_grpo_gguf.json").write_text(json.dumps(source, indent=2) + "\n")


def converted_dir(src: Path, cache: Optional[Path] = None, say: Optional[Callable[[str], None]] = None,
                  name: Optional[str] = None) -> Path:
    """The mlx-lm directory of the GGUF file ``src``: converted on first use, reused after.

    The conversion is announced through ``say`` (default: standard error), whatever the command:
    it takes seconds to minutes and writes outside the run directory. ``name`` starts the
    directory's name in place of the file's stem (an Ollama blob's stem is its digest)."""
    src = Path(src).expanduser()
    if not src.is_file():
        raise GGUFError(f"model.path: {src} {'is not a file' if src.exists() else 'does not exist'}")
    header = read_header(src)  # a damaged file is refused before it is hashed
    root = Path(cache) if cache else default_cache()
    out = root / f"{name or src.stem}-{file_digest(src)[:16]}-v{CONVERTER_VERSION}"
    if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
        return out
    (say or (lambda m: print(m, file=sys.stderr, flush=True)))(f"converting {src} (GGUF) into an MLX model directory, once: {out}")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GGUFError(f"model.gguf_cache: cannot create {root} ({e.strerror or first_line(e)})") from None
    tmp = root / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        convert(header, tmp)
        try:
            os.rename(tmp, out)
        except OSError:
            if not (out / "config.json").is_file():  # not another process's finished conversion
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def hub_file(repo: str, filename: str, revision: Optional[str]) -> Path:
    """Download (or take from the Hugging Face cache) the GGUF file ``filename`` of Hub repo ``repo``."""
    try:
        return hub.hub_file(repo, filename, revision)
    except Exception as e:  # no network, no answer, no such repo or file: one line, named
        reason = hub.unreachable(e) or first_line(e)
        raise GGUFError(f"model.gguf_file: cannot get {filename} from {repo}: {reason}") from None
