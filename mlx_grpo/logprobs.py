"""Per-token log-probabilities of sampled completions under a model, in batched forward passes.

Rows that share a prompt share its forward pass: each distinct prompt is run once, and its keys and
values are then gathered for its completions (gradients flow back through the gather), so a group
of G completions costs one prompt pass instead of G; the prefix common to all prompts (the
template's instruction) runs once for the whole batch (``prefill.py``). A per-row cache carries the left padding, so
padded rows get the same positions and attention as unpadded ones. Logits are scaled by the
sampling temperature, as in the rollout, so rho and the KL compare the distributions the
completions were drawn from.

Hub models have vocabularies of 150k: a float32 [rows, length, vocab] logits tensor for 64 rows of
512 tokens would be 20 GB. So the transformer body runs once, and the output head + log-softmax +
gather run over chunks of positions (``LOGITS_BUDGET`` logits at a time), each chunk under
``mx.checkpoint`` so the backward pass recomputes its logits instead of keeping them all. A
differentiated pass whose probabilities fit ``KEEP_BUDGET`` (SmolLM2's update) instead runs the
head once and keeps its softmax for the backward pass (``kept_logprobs``).
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from . import fastmath
from .fastmath import gather_logprobs, scaled_logits
from .forward import OutputHead, body as body_of, output_head
from .prefill import prefill

# The most float32 logits (rows x positions x vocab) that exist at once while scoring: 2^25 = 128 MB.
LOGITS_BUDGET = 1 << 25
# The most float32 probabilities a differentiated pass keeps from its forward pass for its
# backward pass (``kept_logprobs``): 2^26 = 256 MB.
KEEP_BUDGET = 1 << 26
# A length group must save this share of a pass's completion positions to be worth its own pass.
MIN_GROUP_SAVING = 0.1


def completion_logprobs(
    model: nn.Module,
    prompt_tokens: mx.array,
    left_padding: List[int],
    completions: mx.array,
    temperature: float = 1.0,
    row_prompt: Optional[np.ndarray] = None,
    chunk: Optional[int] = None,
    budget: int = LOGITS_BUDGET,
    lengths: Optional[Sequence[int]] = None,
) -> mx.array:
    """[B, Lc] log pi(completion token | prompt, earlier completion tokens).

    prompt_tokens: [U, Lp] left-padded distinct prompts with their ``left_padding``;
    completions: [B, Lc]; row_prompt: [B] index of each row's prompt (None: row i has prompt i).
    ``chunk`` scores that many rows per forward pass (micro-batches); within a pass at most about
    ``budget`` float32 logits exist at once (``chunked_logprobs``). ``lengths`` [B], each row's
    completion length, lets rows of very different lengths run in length groups
    (``length_groups``); positions past a group's longest row then get logprob 0 (like every
    position past a row's length, they carry no meaning).
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
                local,
                completions[start : start + step],
                temperature,
                budget,
                None if lengths is None else np.asarray(lengths)[start : start + step],
            )
        )
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)


def chunked_logprobs(
    module: nn.Module, head: Callable, hidden: mx.array, targets: mx.array, temperature: float,
    vocab: int, budget: int = LOGITS_BUDGET,
) -> mx.array:
    """``gather_logprobs(head(module, hidden), targets)`` with about ``budget`` logits alive at once.

    hidden: [B, L, H]; targets: [B, L]. Positions are split into chunks of
    ``budget // (B * vocab)``; each chunk is checkpointed, so its logits are recomputed in the
    backward pass instead of stored. Gradients flow to ``hidden`` and to the module's trainable
    parameters, which go into the checkpoint as inputs (it treats closed-over arrays as constants).
    Outside ``fastmath.eager()`` (a pass that may be differentiated) with at most ``KEEP_BUDGET``
    logits in all: ``kept_logprobs``, in one piece.
    """
    B, L = targets.shape
    if B * L * vocab <= KEEP_BUDGET and not fastmath.in_eager():
        return kept_logprobs(module, head, hidden, targets, temperature)
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


def kept_logprobs(module: nn.Module, head: Callable, hidden: mx.array, targets: mx.array,
                  temperature: float) -> mx.array:
    """``gather_logprobs(head(module, hidden), targets)`` for a pass that is differentiated, its
    forward keeping the softmax for the backward pass: d logp / d logits = onehot - softmax, so
    the backward neither recomputes the logits (as a checkpointed chunk does) nor takes another
    ``exp`` over them (as the gradient of ``logsumexp`` does). Its memory, rows x positions x
    vocab floats held from the forward pass to the backward, is what ``KEEP_BUDGET`` bounds.
    Measured on SmolLM2's update head (16 x 64 positions x 49,152, forward + backward): 1.6-2.0 s
    against 2.35 s through checkpointed chunks, on the CPU backend where MLX's ``exp`` costs ~13 ns
    (``fastmath.exp``: ~5).
    Gradients flow to ``hidden`` and to the module's trainable parameters."""
    flat = tree_flatten(module.trainable_parameters())
    names = [k for k, _ in flat]

    def logits_of(h: mx.array, *params: mx.array) -> mx.array:
        module.update(tree_unflatten(list(zip(names, params))))
        return scaled_logits(head(module, h), temperature)

    @mx.custom_function
    def run(h, *params):
        z = logits_of(h, *params)
        m = z.max(axis=-1, keepdims=True)  # the gradient is run_vjp's: nothing to stop
        e = fastmath.exp(z - m)
        s = e.sum(axis=-1, keepdims=True)
        picked = mx.take_along_axis(z, targets[..., None], axis=-1)[..., 0]
        return picked - (m + mx.log(s))[..., 0], e / s

    @run.vjp
    def run_vjp(primals, cotangents, outputs):
        primals = list(primals) if isinstance(primals, (list, tuple)) else [primals]
        c = cotangents[0][..., None]
        at = targets[..., None]
        d = outputs[1] * -c
        d = mx.put_along_axis(d, at, mx.take_along_axis(d, at, axis=-1) + c, axis=-1)
        grads = mx.vjp(logits_of, primals, [d])[1]
        return tuple(grads) if len(grads) > 1 else grads[0]

    return run(hidden, *[v for _, v in flat])[0]


def length_groups(lengths: np.ndarray, min_saving: float = MIN_GROUP_SAVING) -> List[np.ndarray]:
    """Rows split into groups of similar completion length, each group trimmed to its longest row.

    One row that runs to max_tokens while the rest stop early would otherwise make every row pay
    for its length. Rows are sorted by length and a group is cut in two where that saves the most
    positions (rows x width), as long as the cut saves at least ``min_saving`` of the whole
    batch's positions (each group is one more pass of kernel launches); the halves are cut again
    the same way. Returns index arrays into ``lengths``, shortest group first.
    """
    order = np.argsort(lengths, kind="stable")
    sorted_len = np.asarray(lengths)[order]
    threshold = min_saving * len(sorted_len) * max(1, int(sorted_len[-1]))

    def cut(lo: int, hi: int) -> List[Tuple[int, int]]:
        L = sorted_len[lo:hi]
        ks = np.flatnonzero(np.diff(L)) + 1  # cut points between different lengths
        if not ks.size:
            return [(lo, hi)]
        saving = ks * (L[-1] - L[ks - 1])  # rows before the cut no longer pay for L[-1]
        best = int(np.argmax(saving))
        if saving[best] < threshold:
            return [(lo, hi)]
        k = lo + int(ks[best])
        return cut(lo, k) + cut(k, hi)

    return [order[lo:hi] for lo, hi in cut(0, len(sorted_len))]


def _logprobs(model, prompt_tokens, left_padding, row_prompt, completions, temperature,
              budget: int = LOGITS_BUDGET, lengths: Optional[np.ndarray] = None):
    head = output_head(model)
    body = body_of(model, head)
    first, cache = prefill(model, body, prompt_tokens, left_padding)  # predicts each row's first token
    B, width = completions.shape
    groups = [np.arange(B)] if lengths is None else length_groups(lengths)
    if len(groups) == 1:
        return _rows_logprobs(head, body, first, cache, row_prompt, completions, temperature, budget)
    parts = []
    for g in groups:
        w = max(1, int(np.asarray(lengths)[g].max()))
        idx = mx.array(g.astype(np.int32))
        lp = _rows_logprobs(head, body, first, [c.copy() for c in cache], row_prompt[g],
                            completions[idx, :w], temperature, budget)
        parts.append(mx.pad(lp, [(0, 0), (0, width - w)]) if w < width else lp)
    inverse = np.argsort(np.concatenate(groups), kind="stable")
    return mx.concatenate(parts, axis=0)[mx.array(inverse.astype(np.int32))]


def _rows_logprobs(head: Optional[OutputHead], body, first, cache, row_prompt, completions, temperature, budget):
    """Completion logprobs of rows whose prompts were prefilled (``first``: [U, 1, ...] outputs
    at the prompts' last positions, ``cache`` their keys and values); row i has prompt row_prompt[i]."""
    rows = mx.array(np.asarray(row_prompt).astype(np.int32))
    out = first[rows]
    if completions.shape[1] > 1:
        for c in cache:
            c.take_rows(rows)
        rest = body(completions[:, :-1], cache)
        out = mx.concatenate([out, rest], axis=1)
    if head is None:  # whole logits (models with extra work after the head)
        return gather_logprobs(out, completions, temperature)
    return chunked_logprobs(head.module, head.apply, out, completions, temperature, head.vocab, budget)
