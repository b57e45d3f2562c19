"""Per-token log-probabilities of sampled completions under a model, in batched forward passes.

Rows that share a prompt share its forward pass: each distinct prompt is run once, and its keys and
values are then gathered for its completions (gradients flow back through the gather), so a group
of G completions costs one prompt pass instead of G. A per-row cache carries the left padding, so
padded rows get the same positions and attention as unpadded ones. Logits are scaled by the
sampling temperature, as in the rollout, so rho and the KL compare the distributions the
completions were drawn from.
"""

from __future__ import annotations

from typing import List, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .models import rows_cache


def completion_logprobs(
    model: nn.Module,
    prompt_tokens: mx.array,
    left_padding: List[int],
    completions: mx.array,
    temperature: float = 1.0,
    row_prompt: Optional[np.ndarray] = None,
    chunk: Optional[int] = None,
) -> mx.array:
    """[B, Lc] log pi(completion token | prompt, earlier completion tokens).

    prompt_tokens: [U, Lp] left-padded distinct prompts with their ``left_padding``;
    completions: [B, Lc]; row_prompt: [B] index of each row's prompt (None: row i has prompt i).
    ``chunk`` bounds the rows whose [rows, Lc, vocab] logits exist at once (for 150k vocabularies).
    """
    B = completions.shape[0]
    if row_prompt is None:
        row_prompt = np.arange(B)
    step = chunk or B
    parts = []
    for start in range(0, B, step):
        rows = np.asarray(row_prompt[start : start + step])
        used, local = np.unique(rows, return_inverse=True)
        parts.append(
            _logprobs(
                model,
                prompt_tokens[mx.array(used)],
                [left_padding[i] for i in used.tolist()],
                mx.array(local.astype(np.int32)),
                completions[start : start + step],
                temperature,
            )
        )
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)


def _logprobs(model, prompt_tokens, left_padding, row_prompt, completions, temperature):
    cache = rows_cache(model, left_padding)
    first = model(prompt_tokens, cache=cache)[:, -1:, :]  # predicts each row's first token
    first = first[row_prompt]
    if completions.shape[1] > 1:
        for c in cache:
            c.take_rows(row_prompt)
        rest = model(completions[:, :-1], cache=cache)
        logits = mx.concatenate([first, rest], axis=1)
    else:
        logits = first
    logits = logits.astype(mx.float32)
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    picked = mx.take_along_axis(logits, completions[..., None], axis=-1)[..., 0]
    return picked - mx.logsumexp(logits, axis=-1)
