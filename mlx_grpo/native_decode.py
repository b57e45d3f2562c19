"""The rollout's decode steps in C on the CPU backend, for llama-shaped models (``csrc/decode.c``).

Through MLX, a SmolLM2 decode step of 16 rows took 75-79 ms on a 2-core CPU, of which the weight
products were ~36: the rest was MLX running ~2,500 small graph nodes on one thread (the second
core waiting) and attention reading each row's own copy of its prompt's keys and values.
``decode.c`` runs the whole step in one call (it shares one library with ``skinny.c``, built and
preloaded by ``skinny.py``): products over weights packed for them, attention and the element-wise
work split over the BLAS's threads, and each prompt's keys and values held once for its whole
group, read by its rows together: 32-33 ms, and any number of rows (docs/performance.md,
"Decoding in C on the CPU").

It serves models whose every layer is llama's (llama, qwen2, mistral: RMSNorm, RoPE as MLX's
``nn.RoPE``, grouped-query attention over a plain KV cache, a gated SiLU MLP) with float32 weights,
in eval mode, when the library is loaded; anything else decodes through MLX as before
(``unsupported`` says why). The prompts are prefilled in C too (``native_forward.prefill``); adapters are folded
into a copy of the weights once per rollout (the bytes ``models.adapters_folded`` would take), in
one NumPy allocation, which Linux backs with huge pages; the embedding is read in place. Same
interface as ``decode.StaticDecoder``: ``step(y)`` returns the next token's log-probabilities
[B, vocab], ``keep(index)`` drops rows.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any, List, NamedTuple, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import fastmath, skinny
from .models import copy_fits

ARCHITECTURES = ("llama", "qwen2", "mistral")
OFF = skinny.DECODE_OFF  # set: decode through MLX even where this would serve


def library() -> Optional[ctypes.CDLL]:
    """The preloaded kernel library when it holds the decode step, else None."""
    handle = skinny._loaded()
    if handle is None or not hasattr(handle, "mlx_grpo_decode_step"):
        return None
    handle.mlx_grpo_decode_step.restype = ctypes.c_int
    handle.mlx_grpo_fold.restype = ctypes.c_int
    return handle


def _linear_parts(m: nn.Module):
    """(base weight, bias, (scale * B^T, A^T) or None) of a plain or LoRA-over-plain Linear."""
    from mlx_lm.tuner.lora import LoRALinear

    if type(m) is LoRALinear and type(m.linear) is nn.Linear:
        lin = m.linear
        return lin.weight, (lin.bias if "bias" in lin else None), (m.scale * m.lora_b.T, m.lora_a.T)
    if type(m) is nn.Linear:
        return m.weight, (m.bias if "bias" in m else None), None
    return None


def _layers(model: nn.Module) -> List[nn.Module]:
    inner = getattr(model, "model", None)
    return list(getattr(inner, "layers", None) or [])


def unsupported(model: nn.Module) -> Optional[str]:
    """Why this model cannot decode in C here, or None when it can."""
    if not fastmath.on_cpu():
        return "not on the CPU backend"
    if library() is None:
        return "mlx-grpo's kernel library is not loaded"
    return model_unsupported(model)


def model_unsupported(model: nn.Module) -> Optional[str]:
    """Why ``decode.c`` cannot run this model (whatever the backend), or None when it can."""
    if getattr(model, "model_type", None) not in ARCHITECTURES:
        return f"model type {getattr(model, 'model_type', None)!r} is not one of {', '.join(ARCHITECTURES)}"
    if model.training:
        return "the model is in training mode"
    inner, layers = model.model, _layers(model)
    if not layers or getattr(inner, "swa_idx", None) is not None:
        return "sliding-window layers"
    embed = getattr(inner, "embed_tokens", None)
    if type(embed) is not nn.Embedding or embed.weight.dtype != mx.float32:
        return "the embedding is not a float32 nn.Embedding"
    if not model.args.tie_word_embeddings and _linear_parts(model.lm_head) is None:
        return "the output head is not a plain Linear"
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        if attn is None or mlp is None or getattr(layer, "use_sliding", False):
            return "a layer that is not llama's"
        if type(getattr(attn, "rope", None)) is not nn.RoPE or any(hasattr(attn, n) for n in ("q_norm", "k_norm")):
            return "a RoPE or attention variant"
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            if type(norm) is not nn.RMSNorm:
                return "a norm that is not RMSNorm"
        names = [(attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        names += [(mlp, n) for n in ("gate_proj", "up_proj", "down_proj")]
        for parent, n in names:
            m = getattr(parent, n, None)
            got = None if m is None else _linear_parts(m)
            if got is None or got[0].dtype != mx.float32:
                return f"{n} is not a float32 Linear (or LoRA over one)"
    return None


@dataclass(frozen=True)
class ModelShape:
    """A llama-shaped model's sizes and scalars, as decode.c and score.c take them (dims[], fp[])."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    rope_dims: int
    rope_traditional: int
    rope_base: float
    rope_scale: float
    attn_scale: float
    eps: float

    @staticmethod
    def of(model: nn.Module) -> "ModelShape":
        layers = _layers(model)
        attn0 = layers[0].self_attn
        vocab, hidden = model.model.embed_tokens.weight.shape
        rope = attn0.rope
        return ModelShape(
            layers=len(layers), hidden=hidden, heads=attn0.n_heads, kv_heads=attn0.n_kv_heads,
            head_dim=_linear_parts(attn0.q_proj)[0].shape[0] // attn0.n_heads,
            ffn=_linear_parts(layers[0].mlp.gate_proj)[0].shape[0], vocab=vocab,
            rope_dims=rope.dims, rope_traditional=int(rope.traditional), rope_base=float(rope.base),
            rope_scale=float(rope.scale), attn_scale=float(attn0.scale), eps=float(layers[0].input_layernorm.eps))

    def dims(self, threads: int = 0) -> np.ndarray:
        """dims[]: the sizes (``threads`` 0: as many as the BLAS uses)."""
        return np.array([self.layers, self.hidden, self.heads, self.kv_heads, self.head_dim, self.ffn, self.vocab,
                         self.rope_dims, self.rope_traditional, threads], dtype=np.int64)

    def scalars(self, inv_temperature: float) -> np.ndarray:
        """fp[]: the norms' epsilon, RoPE's base and scale, attention's scale, 1 / temperature."""
        return np.array([self.eps, self.rope_base, self.rope_scale, self.attn_scale, inv_temperature], dtype=np.float32)


class NativeWeights:
    """Every weight of the model, adapters folded in, in one float32 NumPy buffer laid out as
    ``decode.c`` reads it (q|k|v and gate|up stacked), and the pointer table into it."""

    def __init__(self, model: nn.Module, lib: ctypes.CDLL):
        inner, layers = model.model, _layers(model)
        self.shape = shape = ModelShape.of(model)
        self.layers, self.vocab = shape.layers, shape.vocab
        self.kv_heads, self.head_dim = shape.kv_heads, shape.head_dim

        # Each slot: (the pieces stacked there, (weight, (scale B^T, A^T) or None) each, and whether
        # it is a product's weight, which decode.c reads packed in panels), or None.
        def linears(*ms):
            return [(w, lora) for w, _, lora in map(_linear_parts, ms)], True

        def biases(*ms):
            got = [_linear_parts(m) for m in ms]
            if all(b is None for _, b, _ in got):
                return None
            return [(b if b is not None else mx.zeros((w.shape[0],)), None) for w, b, _ in got], False

        def flat(w):
            return [(w, None)], False

        embed = inner.embed_tokens.weight
        head = flat(embed)[0] if model.args.tie_word_embeddings else linears(model.lm_head)[0]
        # The embedding is read row by row, in place (MLX's own buffer: a lookup needs no copy).
        self.embedding = _host(embed)
        slots: List[Any] = [None, (head, True), flat(inner.norm.weight)]
        for layer in layers:
            a, f = layer.self_attn, layer.mlp
            slots += [flat(layer.input_layernorm.weight), linears(a.q_proj, a.k_proj, a.v_proj),
                      biases(a.q_proj, a.k_proj, a.v_proj), linears(a.o_proj), biases(a.o_proj),
                      flat(layer.post_attention_layernorm.weight), linears(f.gate_proj, f.up_proj),
                      biases(f.gate_proj, f.up_proj), linears(f.down_proj), biases(f.down_proj)]

        sizes = [0 if s is None else _slot_size(*s) for s in slots]
        self.buffer = np.empty(sum(sizes), dtype=np.float32)
        pointers, at = [], 0
        for s, size in zip(slots, sizes):
            pointers.append(0 if s is None else self.buffer.ctypes.data + 4 * at)
            if s is not None:
                _fill(lib, *s, self.buffer[at: at + size])
            at += size
        pointers[0] = self.embedding.ctypes.data
        self.pointers = np.array(pointers, dtype=np.uintp)
        self.lib = lib
        self.dims = shape.dims()


def _up16(n: int) -> int:
    """n rounded up to a multiple of 16: decode.c's slots for n keys, and rows for n in panels."""
    return -(-n // 16) * 16


def _host(x: mx.array) -> np.ndarray:
    """x as a C-contiguous float32 NumPy array (a view of MLX's buffer where it already is one)."""
    return np.ascontiguousarray(np.asarray(x if x.dtype == mx.float32 else x.astype(mx.float32)))


def _slot_size(pieces: List[Tuple[mx.array, Any]], packed: bool) -> int:
    """Floats a slot takes: its pieces stacked, a product's rows rounded up to whole panels (16
    rows each)."""
    if not packed:
        return sum(int(w.size) for w, _ in pieces)
    return _up16(sum(int(w.shape[0]) for w, _ in pieces)) * int(pieces[0][0].shape[1])


def _fill(lib: ctypes.CDLL, pieces: List[Tuple[mx.array, Any]], packed: bool, out: np.ndarray) -> None:
    """out (flat, float32) = the pieces stacked by rows: copied as they are, or for a product each
    w + (scale B^T) @ A^T where it has an adapter, packed in panels, in one pass over each piece
    (``mlx_grpo_fold``)."""
    if not packed:
        out[:] = np.concatenate([_host(w).reshape(-1) for w, _ in pieces])
        return
    ws = [_host(w) for w, _ in pieces]
    # (scale B^T, A^T, rank) each; a piece with no adapter has rank 0 and passes its weight, unread
    adapters = [(w, w, 0) if lora is None else (_host(lora[0]), _host(lora[1]), lora[1].shape[0])
                for w, (_, lora) in zip(ws, pieces)]
    rows = np.array([w.shape[0] for w in ws], dtype=np.int32)
    ranks = np.array([r for _, _, r in adapters], dtype=np.int32)
    # named, not passed as temporaries: a pointer does not keep its array alive through the call
    w_at, bs_at, a_at = (_addresses(xs) for xs in (ws, [b for b, _, _ in adapters], [a for _, a, _ in adapters]))
    rc = lib.mlx_grpo_fold(ctypes.c_int(int(rows.sum())), ctypes.c_int(ws[0].shape[1]), ctypes.c_int(len(ws)),
                           _pointer(rows), _pointer(ranks), _pointer(w_at), _pointer(bs_at), _pointer(a_at),
                           _pointer(out))
    if rc != 0:
        raise MemoryError("folding the adapters for the C decode step ran out of memory")


def _addresses(arrays: List[np.ndarray]) -> np.ndarray:
    """The arrays' data pointers, as a C array of them."""
    return np.array([_pointer(a).value for a in arrays], dtype=np.uintp)


def weight_bytes(model: nn.Module) -> int:
    """The bytes of ``NativeWeights``'s copy, as the base's parameters in float32: within a few
    16-row panels of it for a tied head; an untied model's embedding is read in place, not copied."""
    from mlx.utils import tree_flatten

    return 4 * sum(int(v.size) for k, v in tree_flatten(model.parameters()) if "lora_" not in k)


def fits_memory(model: nn.Module) -> bool:
    """True when the copy of the weights fits the rule ``models.adapters_folded`` applies to its
    own copies (``models.copy_fits``)."""
    return copy_fits(weight_bytes(model))


def _pointer(a: np.ndarray) -> ctypes.c_void_p:
    """a's data for decode.c, which reads every buffer as C-contiguous."""
    assert a.flags.c_contiguous, "a buffer for decode.c is not C-contiguous"
    return ctypes.c_void_p(a.ctypes.data)


class PromptKeys(NamedTuple):
    """Prompts' keys and values as decode.c and forward.c read them (``native_forward.prefill``
    makes them): slots padded to a multiple of 16, keys transposed [L][U][KV][Dh][slots], values
    [L][U][KV][slots][Dh]; which slots attention sees [U][slots] (padding hidden); and each prompt's
    RoPE position of its first completion token [U]."""

    keys: np.ndarray
    values: np.ndarray
    visible: np.ndarray
    next_position: np.ndarray

    def arguments(self) -> Tuple[Any, ...]:
        """The C entry points' (keys, values, visible, U, Tp) arguments."""
        U, Tp = self.visible.shape
        return (_pointer(self.keys), _pointer(self.values), _pointer(self.visible), ctypes.c_int(U), ctypes.c_int(Tp))


class NativeDecoder:
    """Decode steps in C over prefilled prompts (``native_forward.prefill``: a prompt's keys and
    values once), each prompt's keys and values shared by its ``G`` rows."""

    def __init__(self, weights: NativeWeights, prompts: PromptKeys, group_size: int, max_new: int,
                 inv_temperature: float):
        self.lib = weights.lib
        self.w = weights
        self.prompts = prompts
        U = prompts.visible.shape[0]
        self.Tc = max_new
        self.row_prompt = np.repeat(np.arange(U, dtype=np.int32), group_size)
        self.row_pos0 = np.repeat(prompts.next_position, group_size)
        B = U * group_size
        shape = (weights.layers, B, weights.kv_heads, _up16(max_new), weights.head_dim)
        self.keys, self.values = np.zeros(shape, dtype=np.float32), np.zeros(shape, dtype=np.float32)
        self.fp = weights.shape.scalars(inv_temperature)
        self.s = 0

    def step(self, y: mx.array) -> mx.array:
        tokens = np.ascontiguousarray(np.array(y, dtype=np.int32).reshape(-1))
        B = tokens.shape[0]
        if self.s >= self.Tc:
            raise ValueError(f"decoded past the {self.Tc} slots this decoder was made for")
        logprobs = np.empty((B, self.w.vocab), dtype=np.float32)
        p = _pointer
        rc = self.lib.mlx_grpo_decode_step(
            p(self.w.dims), p(self.fp), p(self.w.pointers), ctypes.c_int(B), p(tokens),
            *self.prompts.arguments(),
            p(self.keys), p(self.values), ctypes.c_int(self.Tc), ctypes.c_int(self.s),
            p(self.row_prompt), p(self.row_pos0), p(logprobs))
        if rc != 0:
            raise MemoryError("the C decode step could not allocate its scratch memory")
        self.s += 1
        return mx.array(logprobs)

    def keep(self, index: mx.array) -> None:
        idx = np.array(index, dtype=np.int64)
        # np.take, not keys[:, idx]: fancy indexing on a later axis may hand back a strided view
        self.keys, self.values = np.take(self.keys, idx, axis=1), np.take(self.values, idx, axis=1)
        self.row_prompt, self.row_pos0 = self.row_prompt[idx], self.row_pos0[idx]
