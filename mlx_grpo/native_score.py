"""The scoring pass in C on the CPU backend (``csrc/score.c``): completion log-probabilities that
nothing differentiates -- the KL reference's, and the sampling policy's when a step updates more
than once -- for the llama-shaped models ``native_decode`` serves.

Through MLX, SmolLM2's reference pass over a step's 16 completions of 64 tokens took ~2.5 s against
a FLOP bound of ~1 s: its products run at the BLAS's speed, but attention's softmax evaluates e^x one
element at a time, and the norms, RoPE, SiLU and the log-softmax over 49,152 logits are as many
passes over memory. ``score.c`` makes the same BLAS calls on the model's own weights (no copy; an
adapter's two small products beside each) and does the rest in vectors between them
(docs/performance.md, "Scoring in C on the CPU").

The prompts are prefilled by MLX (``prefill.py``), which also gives each row's first completion
token's log-probability; the C pass takes every later token, each row's tokens up to its length
only (positions past a row's length get 0, as in ``logprobs.completion_logprobs``'s length groups).
Same result as ``logprobs.completion_logprobs`` to float32 rounding (tests/test_native_score.py).
"""

from __future__ import annotations

import ctypes
import os
from typing import Any, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import native_decode, skinny
from .forward import body as body_of, output_head
from .logprobs import gather_logprobs
from .native_decode import ModelShape, PromptKeys, _host, _layers, _linear_parts, _pointer
from .prefill import prefill

NATIVE: Optional[bool] = None  # None: the environment decides (OFF); tests and benchmarks set it
OFF = skinny.SCORE_OFF  # set: score through MLX even where this would serve
# The most completion tokens one C call takes: its activations are ~20 floats per token per unit of
# width (SmolLM2: ~45 KB a token, 180 MB at this size), whatever the batch.
CALL_TOKENS = 4096
PRODUCTS = (("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
            ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))


def library() -> Optional[ctypes.CDLL]:
    """The preloaded kernel library when it holds the scoring pass, else None."""
    handle = native_decode.library()
    if handle is None or not hasattr(handle, "mlx_grpo_score"):
        return None
    handle.mlx_grpo_score.restype = ctypes.c_int
    return handle


def scores_in_c(model: nn.Module) -> bool:
    """True when ``model``'s scoring passes run in C here: the switch (``NATIVE``,
    ``MLX_GRPO_NO_NATIVE_SCORE``) allows it, the library is loaded, the backend is the CPU and the
    model is one ``decode.c`` serves (``native_decode.unsupported``)."""
    wanted = NATIVE if NATIVE is not None else not os.environ.get(OFF)
    return bool(wanted and library() is not None and native_decode.unsupported(model) is None)


class WeightTable:
    """The pointer table score.c reads: the model's own float32 weights, in place, and its adapters'
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


def completion_logprobs(
    model: nn.Module, prompt_tokens: mx.array, left_padding: Sequence[int], row_prompt: np.ndarray,
    completions: mx.array, lengths: Sequence[int], temperature: float = 1.0,
) -> mx.array:
    """[B, Lc] log pi(completion token | prompt, earlier completion tokens), 0 past each row's
    length: ``logprobs.completion_logprobs`` computed in C (``scores_in_c(model)`` must hold).

    prompt_tokens: [U, Lp] left-padded distinct prompts; row_prompt: [B] each row's prompt;
    completions: [B, Lc]; lengths: [B] each row's completion tokens."""
    lib = library()
    head = output_head(model)
    body = body_of(model, head)
    first, cache = prefill(model, body, prompt_tokens, left_padding)
    row_prompt = np.asarray(row_prompt, dtype=np.int32)
    rows = mx.array(row_prompt)
    B, width = completions.shape
    lengths = np.minimum(np.asarray(lengths, dtype=np.int64), width)
    out = np.zeros((B, width), dtype=np.float32)
    # The first token from the prompts' last positions (MLX's prefill gave them).
    start = first[rows] if head is None else head.apply(head.module, first[rows])
    out[:, 0] = np.array(gather_logprobs(start, completions[:, :1], temperature))[:, 0]
    out[lengths < 1, 0] = 0.0
    if width > 1 and lengths.max() > 1:
        table, shape = WeightTable(model), ModelShape.of(model)
        prompts = PromptKeys.of(cache)
        tokens = np.array(completions, dtype=np.int32)
        fp = shape.scalars(1.0 / temperature if temperature > 0 else 1.0)
        for part in _calls(np.maximum(lengths - 1, 0)):
            _score_rows(lib, table, shape, fp, prompts, tokens[part], lengths[part], row_prompt[part], out, part)
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


def _score_rows(lib: ctypes.CDLL, table: WeightTable, shape: ModelShape, fp: np.ndarray, prompts: PromptKeys,
                tokens: np.ndarray, lengths: np.ndarray, row_prompt: np.ndarray, out: np.ndarray,
                rows: np.ndarray) -> None:
    """out[rows, 1:length] for one call: each row's tokens 0 .. length-2 fed, 1 .. length-1 scored."""
    n = np.maximum(lengths - 1, 0)
    starts = np.concatenate([[0], np.cumsum(n)]).astype(np.int32)
    inputs = np.concatenate([t[:k] for t, k in zip(tokens, n)] + [np.zeros(0, np.int32)]).astype(np.int32)
    targets = np.concatenate([t[1:k + 1] for t, k in zip(tokens, n)] + [np.zeros(0, np.int32)]).astype(np.int32)
    logp = np.empty(max(int(starts[-1]), 1), dtype=np.float32)
    pos0 = prompts.next_position[row_prompt].astype(np.int32)
    dims = shape.dims()
    rc = lib.mlx_grpo_score(
        _pointer(dims), _pointer(fp), _pointer(table.pointers), ctypes.c_int(len(rows)), _pointer(starts),
        _pointer(inputs), _pointer(targets), *prompts.arguments(), _pointer(row_prompt), _pointer(pos0), _pointer(logp))
    if rc != 0:
        raise MemoryError("the C scoring pass could not allocate its working memory")
    for i, r in enumerate(rows.tolist()):
        out[r, 1:1 + n[i]] = logp[starts[i]:starts[i + 1]]


def describe(model: nn.Module) -> str:
    """One line: where this model's scoring passes run, and why not in C where they could not."""
    if scores_in_c(model):
        return "in C (score.c)"
    why = native_decode.unsupported(model) or ("switched off" if library() is not None else "no kernel library")
    return f"through MLX ({why})"
