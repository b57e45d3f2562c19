"""Prompt passes that share work: each distinct prompt runs once, and the prefix they all share
runs once.

GRPO prompts come from one template, so they share a long prefix: the R1-Zero instruction is 74 of
the 81 tokens of every arithmetic prompt of the embedded run, and a chat template's system prompt
plays the same part. The longest prefix common to a batch's prompts runs as one row; its keys and
values are then repeated for every prompt (a gather: gradients flow back to the one pass), and
each prompt runs only its own suffix on top. Attention is causal, so the prefix's keys and values
do not depend on what follows them: the result is the full prompt pass, with the prefix computed
once instead of once per prompt.

Layout: suffixes have different lengths, so each is left-padded to the longest one; the padding
then sits between the prefix and the suffix. ``RowsCache.pad`` hides those slots and leaves them
out of the RoPE positions, so each token keeps the position it has in its unpadded prompt.
"""

from __future__ import annotations

from typing import Callable, List, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .forward import RowsCache, plain_kv_layers, rows_cache

# A shorter common prefix is not worth a separate pass (one more round of kernel launches).
MIN_SHARED_PREFIX = 16


def shared_prefix(prompt_tokens: np.ndarray, left_padding: Sequence[int]) -> int:
    """The length of the token prefix every prompt starts with, or 0 when not worth sharing.

    prompt_tokens: [U, Lp] left-padded. Capped so every prompt keeps at least one token of its own
    (its last position predicts the first completion token).
    """
    U, width = prompt_tokens.shape
    pads = np.asarray(left_padding, dtype=np.int64)
    if U < 2:
        return 0
    shortest = width - int(pads.max())
    # Align each row's real tokens at column 0, then find the first column where the rows differ.
    cols = np.arange(shortest)[None, :] + pads[:, None]
    real = np.take_along_axis(prompt_tokens, cols, axis=1)
    differs = (real != real[:1]).any(axis=0)
    n = int(np.argmax(differs)) if differs.any() else shortest
    n = min(n, shortest - 1)
    return n if n >= MIN_SHARED_PREFIX else 0


def prefill(
    model: nn.Module, body: Callable, prompt_tokens: mx.array, left_padding: Sequence[int],
) -> Tuple[mx.array, List[RowsCache]]:
    """Run left-padded prompts [U, Lp] through ``body(x, cache)``, sharing their common prefix.

    Returns (body's output at each prompt's last position [U, 1, ...], per-layer ``RowsCache``
    holding every prompt's keys and values, ready for the completion tokens).
    """
    U = prompt_tokens.shape[0]
    n = shared_prefix(np.array(prompt_tokens), left_padding) if plain_kv_layers(model) else 0
    if n == 0:
        cache = rows_cache(model, list(left_padding))
        return body(prompt_tokens, cache)[:, -1:], cache
    lo = int(min(left_padding))
    first = int(np.argmin(left_padding))  # a row whose real tokens start at column lo
    cache = rows_cache(model, [0])
    body(prompt_tokens[first : first + 1, lo : lo + n], cache)
    pads = mx.array([p - lo for p in left_padding])
    for c in cache:
        c.take_rows(mx.zeros((U,), dtype=mx.int32))
        c.pad(pads)
    return body(prompt_tokens[:, lo + n :], cache)[:, -1:], cache
