"""Per-token log-probabilities of sampled completions under a model, in batched forward passes.

Rows that share a prompt share its forward pass: each distinct prompt is run once, and its keys and
values are then gathered for its completions (gradients flow back through the gather), so a group
of G completions costs one prompt pass instead of G. A per-row cache carries the left padding, so
padded rows get the same positions and attention as unpadded ones. Logits are scaled by the
sampling temperature, as in the rollout, so rho and the KL compare the distributions the
completions were drawn from.

Hub models have vocabularies of 150k: a float32 [rows, length, vocab] logits tensor for 64 rows of
512 tokens would be 20 GB. So the transformer body runs once, and the output head + log-softmax +
gather run over chunks of positions (``LOGITS_BUDGET`` logits at a time), each chunk under
``mx.checkpoint`` so the backward pass recomputes its logits instead of keeping them all.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .models import rows_cache

# The most float32 logits (rows x positions x vocab) that exist at once while scoring: 2^25 = 128 MB.
LOGITS_BUDGET = 1 << 25


def completion_logprobs(
    model: nn.Module,
    prompt_tokens: mx.array,
    left_padding: List[int],
    completions: mx.array,
    temperature: float = 1.0,
    row_prompt: Optional[np.ndarray] = None,
    chunk: Optional[int] = None,
    budget: int = LOGITS_BUDGET,
) -> mx.array:
    """[B, Lc] log pi(completion token | prompt, earlier completion tokens).

    prompt_tokens: [U, Lp] left-padded distinct prompts with their ``left_padding``;
    completions: [B, Lc]; row_prompt: [B] index of each row's prompt (None: row i has prompt i).
    ``chunk`` scores that many rows per forward pass (micro-batches); within a pass at most about
    ``budget`` float32 logits exist at once (``chunked_logprobs``).
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
                budget,
            )
        )
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)


def output_head(model: nn.Module) -> Optional[Tuple[Callable, nn.Module, Callable, int]]:
    """(body, head module, head, vocab) with ``head(module, body(x, cache)) == model(x, cache)``.

    mlx-lm's decoder models keep the transformer in ``model.model`` and end with ``lm_head`` or the
    tied embedding. Models that do more after the head (logit soft-capping, scaling) fail a
    one-off check on a 3-token input and get None: they are scored with whole logits instead.
    """
    verdict = getattr(model, "_mlx_grpo_head", None)
    if verdict is None:
        verdict = False
        if _head_module(model) is not None:
            x = mx.array([[1, 2, 3]])
            try:
                split = _apply_head(model)(_head_module(model), model.model(x))
                verdict = bool(mx.allclose(split, model(x), rtol=1e-4, atol=1e-4).item())
            except Exception:  # an unusual signature: not the standard layout
                verdict = False
        object.__setattr__(model, "_mlx_grpo_head", verdict)  # a plain attribute, not a parameter
    if not verdict:
        return None
    module = _head_module(model)
    return (lambda x, cache: model.model(x, cache=cache)), module, _apply_head(model), int(module.weight.shape[0])


def _head_module(model: nn.Module) -> Optional[nn.Module]:
    # Looked up at call time: adapters_disabled swaps modules (an lm_head may carry an adapter).
    if getattr(model, "model", None) is None:
        return None
    module = getattr(model, "lm_head", None) or getattr(model.model, "embed_tokens", None)
    return module if module is not None and hasattr(module, "weight") else None


def _apply_head(model: nn.Module) -> Callable:
    if getattr(model, "lm_head", None) is not None:
        return lambda module, h: module(h)
    return lambda module, h: module.as_linear(h)


def gather_logprobs(logits: mx.array, targets: mx.array, temperature: float) -> mx.array:
    """log softmax(logits / T)[target] in float32: [..., V], [...] -> [...]."""
    logits = logits.astype(mx.float32)
    if temperature > 0 and temperature != 1.0:
        logits = logits / temperature
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - mx.logsumexp(logits, axis=-1)


def chunked_logprobs(
    module: nn.Module, head: Callable, hidden: mx.array, targets: mx.array, temperature: float,
    vocab: int, budget: int = LOGITS_BUDGET,
) -> mx.array:
    """``gather_logprobs(head(module, hidden), targets)`` with about ``budget`` logits alive at once.

    hidden: [B, L, H]; targets: [B, L]. Positions are split into chunks of
    ``budget // (B * vocab)``; each chunk is checkpointed, so its logits are recomputed in the
    backward pass instead of stored. Gradients flow to ``hidden`` and to the module's trainable
    parameters, which go into the checkpoint as inputs (it treats closed-over arrays as constants).
    """
    B, L = targets.shape
    step = max(1, budget // max(1, B * vocab))
    if step >= L:
        return gather_logprobs(head(module, hidden), targets, temperature)

    def piece(t: mx.array) -> Callable:
        # Targets are closed over, not inputs: checkpoint would differentiate an integer input.
        def run(params, h):
            module.update(params)
            return gather_logprobs(head(module, h), t, temperature)

        return mx.checkpoint(run)

    params = module.trainable_parameters()
    return mx.concatenate(
        [piece(targets[:, s : s + step])(params, hidden[:, s : s + step]) for s in range(0, L, step)],
        axis=1,
    )


def _logprobs(model, prompt_tokens, left_padding, row_prompt, completions, temperature,
              budget: int = LOGITS_BUDGET):
    split = output_head(model)
    body = split[0] if split else (lambda x, cache: model(x, cache=cache))
    cache = rows_cache(model, left_padding)
    first = body(prompt_tokens, cache)[:, -1:, :]  # predicts each row's first token
    first = first[row_prompt]
    if completions.shape[1] > 1:
        for c in cache:
            c.take_rows(row_prompt)
        rest = body(completions[:, :-1], cache)
        out = mx.concatenate([first, rest], axis=1)
    else:
        out = first
    if split is None:  # whole logits (models with extra work after the head)
        return gather_logprobs(out, completions, temperature)
    return chunked_logprobs(split[1], split[2], out, completions, temperature, split[3], budget)
