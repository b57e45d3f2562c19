"""Per-token log-probabilities of sampled completions under a model, in batched forward passes.

Rows are [left-padded prompt | right-padded completion]. A batched KV cache carries each row's
left padding, so padded rows get the same positions and attention as unpadded ones. The logits are
scaled by the sampling temperature, as in the rollout, so rho and the KL compare the distributions
the completions were drawn from.
"""

from __future__ import annotations

from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn

from .models import padded_rows_cache


def completion_logprobs(
    model: nn.Module,
    prompt_tokens: mx.array,
    left_padding: List[int],
    completions: mx.array,
    temperature: float = 1.0,
    chunk: Optional[int] = None,
) -> mx.array:
    """[B, Lc] log pi(completion token | prompt, earlier completion tokens).

    prompt_tokens: [B, Lp] left-padded; completions: [B, Lc]. ``chunk`` bounds the rows whose
    [rows, Lc, vocab] logits exist at once (for 150k-token vocabularies).
    """
    B = completions.shape[0]
    step = chunk or B
    parts = []
    for start in range(0, B, step):
        sl = slice(start, start + step)
        parts.append(
            _logprobs(model, prompt_tokens[sl], left_padding[sl], completions[sl], temperature)
        )
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)


def _logprobs(model, prompt_tokens, left_padding, completions, temperature):
    Lp = prompt_tokens.shape[1]
    inputs = mx.concatenate([prompt_tokens, completions[:, :-1]], axis=1)
    cache = padded_rows_cache(model, list(left_padding))
    logits = model(inputs, cache=cache)[:, Lp - 1 :, :].astype(mx.float32)
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    picked = mx.take_along_axis(logits, completions[..., None], axis=-1)[..., 0]
    return picked - mx.logsumexp(logits, axis=-1)
