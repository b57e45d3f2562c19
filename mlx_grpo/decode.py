"""The per-token decode step of the rollout engine, compiled with ``mx.compile`` where mlx allows.

mlx-lm's batched caches grow their key/value buffers and slice them to the current length, so
every decode step has new shapes and could not reuse a compiled graph. ``StaticKVCache`` instead
holds a buffer of ``GROW``-slot blocks (up to prompt + max_tokens positions); a step writes its keys
at a position held in an array (``mx.slice_update``) and attends over the whole buffer with a mask
that hides the slots not yet written and each row's left padding. Shapes change only when the
buffer grows by a block, so one compiled graph (model forward + temperature-scaled logits) serves
``GROW`` steps; it is traced again then, and when finished rows are compacted away (a new batch
size). Growing by blocks rather than allocating the whole rollout at once matters on the CPU:
every slot costs each step its share of the attention's softmax (measured on the Qwen2.5-0.5B
shape, 8 rows: 280 ms a step over 178 slots, ~400 ms over 1,138, then with the copy below).
The log-softmax runs after the compiled graph, through ``fastmath.logsumexp`` (NumPy's vectorised
exp on the CPU backend, which cannot run inside a compiled graph). That evaluates the step inside
``step()``, so the decoder lets go of its buffers before calling the graph (``_call``): with no
other reference left, ``slice_update`` writes the new slot in place instead of copying every
layer's buffer (8 rows x 512 tokens on that shape: 1.12x).

Prompts are prefilled with ``prefill.py`` (their shared prefix once, each prompt once), and their
keys and values copied into the buffer; the step's mask also hides the padding inside the prompts.

Compaction policy: mlx-lm filters finished rows out every step (cheap when nothing is compiled).
Here each new batch size costs a trace, so finished rows stay in the batch (their outputs are
ignored) until they are a quarter of it; at most a few traces per rollout, and dead rows never cost
more than a third extra compute.
"""

from __future__ import annotations

from typing import Any, Callable, List

import mlx.core as mx
import mlx.nn as nn

from . import fastmath

COMPACT_FRACTION = 0.25  # compact when this fraction of the batch has finished
GROW = 256  # slots the key/value buffers grow by (mlx-lm's KVCache grows in the same steps)


class DecodeSetupError(RuntimeError):
    """Building or tracing the static decode step failed (an architecture it does not fit)."""


class StaticKVCache:
    """One layer's keys/values in a fixed buffer [B, heads, T, dim], written at ``pos``.

    Duck-types mlx-lm's ``BatchKVCache`` as far as the models use it: ``offset`` (per-row RoPE
    positions), ``update_and_fetch`` and ``make_mask``. ``visible`` [B, T] hides padding slots
    (anywhere in the prompt part, see ``prefill.py``); ``shift`` [B] counts them, so a slot's
    RoPE position is its index minus its row's padding.
    """

    def __init__(self, keys: mx.array, values: mx.array, pos: mx.array, visible: mx.array, shift: mx.array):
        self.keys, self.values = keys, values
        self.pos = pos  # [1] int32: the slot this step writes
        self.visible = visible
        self.offset = pos - shift

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        self.keys = mx.slice_update(self.keys, keys.astype(self.keys.dtype), self.pos, axes=(2,))
        self.values = mx.slice_update(self.values, values.astype(self.values.dtype), self.pos, axes=(2,))
        return self.keys, self.values

    def make_mask(self, N: int, return_array: bool = False, window_size=None, **_):
        if N != 1 or window_size is not None:
            raise NotImplementedError("StaticKVCache decodes one token at a time, full attention")
        slots = mx.arange(self.keys.shape[2])
        return ((slots <= self.pos)[None, :] & self.visible)[:, None, None, :]


def scaled_logits(logits: mx.array, inv_temperature: float) -> mx.array:
    """logits / T in float32 (what the compiled step returns)."""
    return logits.astype(mx.float32) * inv_temperature


def log_softmax(scaled: mx.array) -> mx.array:
    """log softmax over the last axis of float32 ``scaled``."""
    return scaled - fastmath.logsumexp(scaled)[..., None]


def normalized_logprobs(logits: mx.array, inv_temperature: float) -> mx.array:
    """log softmax(logits / T) in float32: what the sampler draws from and the rollout records."""
    return log_softmax(scaled_logits(logits, inv_temperature))


class StaticDecoder:
    """Decode steps over prefilled prompts (``RowsCache`` per layer), through one compiled graph.

    ``step(y)`` feeds tokens [B] and returns [B, vocab] log-probabilities for the next token;
    ``keep(index)`` drops rows (a new batch size: the next step traces again). ``compiled=False``
    runs the same step without ``mx.compile`` (what compiling buys, in the benchmark). An error
    while building or first running the step is raised as ``DecodeSetupError``, so the caller can
    fall back to mlx-lm's own caches.
    """

    def __init__(self, model: nn.Module, cache: List[Any], max_new: int, inv_temperature: float,
                 compiled: bool = True):
        try:
            length = cache[0].length
            self.pos = length
            B = cache[0].keys.shape[0]
            visible = cache[0].visible if cache[0].visible is not None else mx.ones((B, length), dtype=mx.bool_)
            self.shift = length - cache[0].offset  # padding slots per row
            self.total = length + max_new
            self.full_visible = mx.concatenate([visible, mx.ones((B, max_new), dtype=mx.bool_)], axis=1)
            self.kv: List[mx.array] = [a for c in cache for a in (c.keys, c.values)]
            self.slots = length
            self._grow()
        except Exception as e:  # a cache layout this decoder does not know
            raise DecodeSetupError(f"{type(e).__name__}: {e}") from e
        n_layers = len(cache)

        def step(y, pos, visible, shift, *kv):
            caches = [StaticKVCache(kv[2 * i], kv[2 * i + 1], pos, visible, shift) for i in range(n_layers)]
            logits = model(y[:, None], cache=caches)[:, -1, :]
            out = [a for c in caches for a in (c.keys, c.values)]
            return (scaled_logits(logits, inv_temperature), *out)

        # A fresh closure per rollout: the model's current weights are traced in as constants.
        self._step: Callable = mx.compile(step) if compiled else step
        self._checked = False

    def _grow(self) -> None:
        """Give the buffers room for the slot this step writes: up to the next multiple of ``GROW``
        slots (at most prompt + max_tokens), zeros after what is written."""
        if self.pos < self.slots:
            return
        new = min(self.total, (self.pos // GROW + 1) * GROW)
        self.kv = [mx.concatenate([a, mx.zeros((*a.shape[:2], new - a.shape[2], a.shape[3]), dtype=a.dtype)], axis=2)
                   for a in self.kv]
        self.slots = new
        self.visible = self.full_visible[:, :new]

    def step(self, y: mx.array) -> mx.array:
        self._grow()
        out = self._call(y, mx.array([self.pos], dtype=mx.int32))
        self.kv = list(out[1:])
        self.pos += 1
        return log_softmax(out[0])

    def _call(self, y: mx.array, pos: mx.array) -> tuple:
        """The compiled step on the buffers, which the decoder lets go of first: no reference but
        the graph's is left to them, so ``slice_update`` writes into them in place (MLX donates an
        input nobody else holds) instead of copying every layer's buffer each step, which it did
        where the log-softmax evaluates inside ``step()`` (float32 Qwen2.5-0.5B shape, 8 rows x
        512 tokens: 1.12x, docs/results/real-shapes-cpu.md). The caller puts the
        step's output buffers back."""
        args = (y, pos, self.visible, self.shift, *self.kv)
        self.kv = []
        if self._checked:
            return self._step(*args)
        try:  # the first call traces and compiles: an error here means this model doesn't fit
            out = self._step(*args)
            del args
            mx.eval(out)
        except Exception as e:
            raise DecodeSetupError(f"{type(e).__name__}: {e}") from e
        self._checked = True
        return out

    def keep(self, index: mx.array) -> None:
        self.kv = [a[index] for a in self.kv]
        self.full_visible, self.visible = self.full_visible[index], self.visible[index]
        self.shift = self.shift[index]


class EagerDecoder:
    """The same interface over any mlx-lm batch cache, uncompiled (e.g. sliding-window layers)."""

    def __init__(self, model: nn.Module, cache: List[Any], inv_temperature: float):
        self.model, self.cache, self.inv_t = model, cache, inv_temperature

    def step(self, y: mx.array) -> mx.array:
        return normalized_logprobs(self.model(y[:, None], cache=self.cache)[:, -1, :], self.inv_t)

    def keep(self, index: mx.array) -> None:
        for c in self.cache:
            c.filter(index)
