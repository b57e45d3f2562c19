"""The forward passes that nothing differentiates, in C on the CPU backend (``csrc/forward.c``), for
the llama-shaped models ``native_decode`` serves: the prompts' prefill (for the C decode step and
for scoring), and the scoring pass -- completion log-probabilities under the KL reference, and
under the sampling policy when a step updates more than once.

Through MLX, SmolLM2's reference pass over a step's 16 completions of 64 tokens took ~2.5 s against
a FLOP bound of ~1 s: its products run at the BLAS's speed, but attention's softmax evaluates e^x one
element at a time, and the norms, RoPE, SiLU and the log-softmax over 49,152 logits are as many
passes over memory. ``forward.c`` makes the same BLAS calls on the model's own weights (no copy; an
adapter's two small products beside each) and does the rest in vectors between them
(docs/performance.md, "Prefill and scoring in C on the CPU").

The prompts' common prefix runs once, as in ``prefill.py``; a scoring pass takes each row's tokens up
to its length only (positions past it get 0, as in ``logprobs.completion_logprobs``'s length
groups). Same results as MLX's passes to float32 rounding (tests/test_native_forward.py).
"""

from __future__ import annotations

import ctypes
import os
from typing import List, NamedTuple, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import native_decode, skinny
from .forward import output_head
from .fastmath import gather_logprobs
from .native_decode import ModelShape, PromptKeys, _host, _layers, _linear_parts, _pointer, _up16
from .prefill import shared_prefix

NATIVE: Optional[bool] = None  # None: the environment decides (OFF); tests and benchmarks set it
OFF = skinny.SCORE_OFF  # set: score through MLX even where this would serve
# The most completion tokens one scoring call takes: its activations are ~5 x width + 3 x FFN floats a
# token (SmolLM2: 31 KB; 130 MB at this size), whatever the batch.
CALL_TOKENS = 4096
PRODUCTS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
            ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))


def library() -> Optional[ctypes.CDLL]:
    """The preloaded kernel library when it holds the forward pass, else None."""
    handle = native_decode.library()
    if handle is None or not hasattr(handle, "mlx_grpo_forward"):
        return None
    handle.mlx_grpo_forward.restype = ctypes.c_int
    return handle


def scores_in_c(model: nn.Module) -> bool:
    """True when ``model``'s scoring passes run in C here: the switch (``NATIVE``,
    ``MLX_GRPO_NO_NATIVE_SCORE``) allows it, the library is loaded, the backend is the CPU and the
    model is one ``decode.c`` serves (``native_decode.unsupported``)."""
    wanted = NATIVE if NATIVE is not None else not os.environ.get(OFF)
    return bool(wanted and library() is not None and native_decode.unsupported(model) is None)


class WeightTable:
    """The pointer table forward.c reads: the model's own float32 weights, in place, and its adapters'
    A^T and scale B^T (small copies), held here while a call runs."""

    def __init__(self, model: nn.Module):
        inner, layers = model.model, _layers(model)
        self.held: List[np.ndarray] = []
        embed = self._hold(inner.embed_tokens.weight)
        head = embed if model.args.tie_word_embeddings else self._hold(_linear_parts(model.lm_head)[0])
        pointers = [embed, head, self._hold(inner.norm.weight)]
        for layer in layers:
            pointers += [self._hold(layer.input_layernorm.weight), self._hold(layer.post_attention_layernorm.weight)]
            for parent, name in PRODUCTS:
                w, bias, lora = _linear_parts(getattr(getattr(layer, parent), name))
                if lora is None:
                    pointers += [self._hold(w), self._hold(bias), 0, 0, 0]
                else:
                    bs, a = lora
                    pointers += [self._hold(w), self._hold(bias), self._hold(a), self._hold(bs), int(a.shape[0])]
        self.pointers = np.array(pointers, dtype=np.uintp)

    def _hold(self, x: Optional[mx.array]) -> int:
        if x is None:
            return 0
        host = _host(x)
        self.held.append(host)
        return host.ctypes.data


class Pass(NamedTuple):
    """What one ``forward`` call gave: each row's own keys and values in decode.c's prompt layout
    (None unless asked for), the final norm's output at each row's last token [B, d], and the
    targets' log-probabilities (flat, each row's in turn; None unless asked for)."""

    keys: Optional[np.ndarray]
    values: Optional[np.ndarray]
    last: np.ndarray
    logp: Optional[np.ndarray]


def forward(lib: ctypes.CDLL, table: WeightTable, shape: ModelShape, rows: List[np.ndarray],
            prefix: Optional[PromptKeys], row_prompt: np.ndarray, row_pos0: np.ndarray,
            targets: Optional[List[np.ndarray]] = None, inv_temperature: float = 1.0,
            keep_keys: bool = False) -> Pass:
    """One ``mlx_grpo_forward`` call: row b feeds the tokens ``rows[b]`` from RoPE position
    ``row_pos0[b]`` on, after prefix row ``row_prompt[b]`` of ``prefix`` (None: no prefix);
    ``targets[b]`` (as long as ``rows[b]``) are scored, and with ``keep_keys`` each row's keys and
    values come back."""
    n = np.array([len(r) for r in rows], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(n)]).astype(np.int32)
    flat = lambda xs: np.ascontiguousarray(np.concatenate([*xs, np.zeros(0)]).astype(np.int32))  # noqa: E731
    tokens = flat(rows)
    L, B, KV, Dh = shape.layers, len(rows), shape.kv_heads, shape.head_dim
    n16 = _up16(int(n.max(initial=0)))
    keys = np.empty((L, B, KV, Dh, n16), np.float32) if keep_keys else None
    values = np.empty((L, B, KV, n16, Dh), np.float32) if keep_keys else None
    last = np.zeros((B, shape.hidden), np.float32)
    want = None if targets is None else flat(targets)
    logp = None if targets is None else np.empty(max(int(starts[-1]), 1), np.float32)
    none = ctypes.c_void_p(None)
    at = lambda a: none if a is None else _pointer(a)  # noqa: E731
    prefix_args = prefix.arguments() if prefix is not None else (none, none, none, ctypes.c_int(0), ctypes.c_int(0))
    dims, fp = shape.dims(), shape.scalars(inv_temperature)
    row_prompt = np.ascontiguousarray(row_prompt, dtype=np.int32)
    row_pos0 = np.ascontiguousarray(row_pos0, dtype=np.int32)
    rc = lib.mlx_grpo_forward(
        _pointer(dims), _pointer(fp), _pointer(table.pointers), ctypes.c_int(B), _pointer(starts), _pointer(tokens),
        *prefix_args, _pointer(row_prompt), _pointer(row_pos0), at(want), at(logp), at(keys), at(values), _pointer(last))
    if rc != 0:
        raise MemoryError("the C forward pass could not allocate its working memory")
    return Pass(keys, values, last, logp)


def prefill(model: nn.Module, prompt_tokens: mx.array, left_padding: Sequence[int],
            table: Optional[WeightTable] = None) -> Tuple[mx.array, PromptKeys]:
    """The prompts' pass in C, the prefix they all share once (``prefill.shared_prefix``): each
    prompt's final hidden state at its last token [U, 1, d] (for the output head) and its keys and
    values, every prompt's real tokens at its first slots (padding after them, hidden)."""
    lib, table, shape = library(), table or WeightTable(model), ModelShape.of(model)
    tokens = np.array(prompt_tokens)
    real = [row[pad:] for row, pad in zip(tokens, left_padding)]
    U = len(real)
    shared = shared_prefix(tokens, left_padding)
    start = np.zeros(U, np.int32)
    prefix = None
    if shared:
        head = forward(lib, table, shape, [real[0][:shared]], None, np.zeros(1), np.zeros(1), keep_keys=True)
        prefix = PromptKeys(head.keys, head.values, (np.arange(head.keys.shape[-1]) < shared)[None].astype(np.uint8),
                            np.array([shared], np.int32))
        start += shared
    own = forward(lib, table, shape, [r[shared:] for r in real], prefix, np.zeros(U), start, keep_keys=True)
    lengths = np.array([len(r) for r in real])
    visible = (np.arange(own.keys.shape[-1])[None] < (lengths - shared)[:, None]).astype(np.uint8)
    keys, values = own.keys, own.values
    if prefix is not None:  # every prompt's slots: the prefix's, then its own
        keys = np.concatenate([np.repeat(prefix.keys, U, axis=1), keys], axis=-1)
        values = np.concatenate([np.repeat(prefix.values, U, axis=1), values], axis=-2)
        visible = np.concatenate([np.repeat(prefix.visible, U, axis=0), visible], axis=1)
    return mx.array(own.last)[:, None, :], PromptKeys(keys, values, visible, lengths.astype(np.int32))


def completion_logprobs(
    model: nn.Module, prompt_tokens: mx.array, left_padding: Sequence[int], row_prompt: np.ndarray,
    completions: mx.array, lengths: Sequence[int], temperature: float = 1.0,
) -> mx.array:
    """[B, Lc] log pi(completion token | prompt, earlier completion tokens), 0 past each row's
    length: ``logprobs.completion_logprobs`` computed in C (``scores_in_c(model)`` must hold).

    prompt_tokens: [U, Lp] left-padded distinct prompts; row_prompt: [B] each row's prompt;
    completions: [B, Lc]; lengths: [B] each row's completion tokens."""
    lib, table, shape = library(), WeightTable(model), ModelShape.of(model)
    first, prompts = prefill(model, prompt_tokens, left_padding, table)
    head = output_head(model)
    row_prompt = np.asarray(row_prompt, dtype=np.int32)
    B, width = completions.shape
    lengths = np.minimum(np.asarray(lengths, dtype=np.int64), width)
    out = np.zeros((B, width), dtype=np.float32)
    # The first token from the prompts' last positions.
    start = head.apply(head.module, first[mx.array(row_prompt)])
    out[:, 0] = np.array(gather_logprobs(start, completions[:, :1], temperature))[:, 0]
    out[lengths < 1, 0] = 0.0
    tokens = np.array(completions, dtype=np.int32)
    inv_t = 1.0 / temperature if temperature > 0 else 1.0
    n = np.maximum(lengths - 1, 0)  # row b feeds tokens 0 .. length-2 and scores 1 .. length-1
    for part in _calls(n):
        got = forward(lib, table, shape, [tokens[b, :n[b]] for b in part], prompts, row_prompt[part],
                      prompts.next_position[row_prompt[part]], [tokens[b, 1:n[b] + 1] for b in part], inv_t)
        at = 0
        for b in part.tolist():
            out[b, 1:1 + n[b]] = got.logp[at:at + n[b]]
            at += n[b]
    return mx.array(out)


def _calls(tokens_per_row: np.ndarray) -> List[np.ndarray]:
    """Consecutive rows cut into calls of at most ``CALL_TOKENS`` tokens (a row never split)."""
    parts, start, count = [], 0, 0
    for i, n in enumerate(tokens_per_row.tolist()):
        if count and count + n > CALL_TOKENS:
            parts.append(np.arange(start, i))
            start, count = i, 0
        count += n
    parts.append(np.arange(start, len(tokens_per_row)))
    return parts
