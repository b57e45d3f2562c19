"""How the model is run: KV caches, the output-head split, per-model flags, gradient checkpointing.

Rollouts (``rollout.py``, ``decode.py``) and scoring (``logprobs.py``) both run the transformer over
left-padded rows on top of a prefilled prompt (``prefill.py``); the pieces they share live here:

- ``batch_cache``: mlx-lm's batched decoding caches for left-padded rows;
- ``RowsCache``/``rows_cache``: a differentiable cache for scoring (gradients flow through a
  shared prompt's keys and values) that can hide padding anywhere in a row;
- ``OutputHead``/``output_head``: the model cut before its output head, so the head runs over
  chunks of positions (scoring) or only the last position (prefill);
- ``model_flag``: verdicts about a model computed once and kept on it (cache layout, head split,
  a failed compiled decoder);
- ``enable_grad_checkpoint``: recompute each block in the backward pass, cache-aware.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, List, NamedTuple, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

# Per-model flags are plain attributes with this prefix (not parameters: nn.Module would put an
# array, dict or list value into the parameter tree).
_FLAG_PREFIX = "_mlx_grpo_"


def model_flag(model: nn.Module, name: str, compute: Callable[[], Any]) -> Any:
    """The flag ``name`` of ``model``; computed by ``compute()`` and kept the first time it is asked."""
    value = getattr(model, _FLAG_PREFIX + name, None)
    if value is None:
        value = compute()
        set_model_flag(model, name, value)
    return value


def set_model_flag(model: nn.Module, name: str, value: Any) -> None:
    """Keep ``value`` as the flag ``name`` of ``model`` (a plain attribute, not a parameter)."""
    object.__setattr__(model, _FLAG_PREFIX + name, value)


def batch_cache(model: nn.Module, left_padding: List[int]) -> List[Any]:
    """A per-layer batched KV cache for left-padded rows (each row keeps its own positions)."""
    from mlx_lm.models.cache import (
        BatchKVCache,
        BatchRotatingKVCache,
        KVCache,
        RotatingKVCache,
        make_prompt_cache,
    )

    out: List[Any] = []
    for c in make_prompt_cache(model):
        if type(c) is KVCache:
            out.append(BatchKVCache(list(left_padding)))
        elif isinstance(c, RotatingKVCache):
            out.append(BatchRotatingKVCache(c.max_size, list(left_padding)))
        else:
            raise NotImplementedError(
                f"{type(c).__name__} layers cannot decode in a batch yet (model {type(model).__name__})"
            )
    return out


class RowsCache:
    """A differentiable KV cache for scoring: padded rows, keys kept by concatenation.

    mlx-lm's caches write into preallocated buffers, built for decoding; this one keeps whatever
    the layers produced (so gradients flow through a shared prompt's keys and values), gives each
    row its RoPE positions (real tokens start at 0) and a causal mask that hides the padding, and
    can be expanded from one row per prompt to one row per completion (``take_rows``).

    Padding may sit before any block of slots, not only at the start: ``pad(n)`` declares that the
    next block begins with ``n[b]`` padding slots in row b (hidden from every query, not counted
    as positions). A shared prompt prefix followed by left-padded per-prompt suffixes
    (``prefill.py``) puts padding in the middle of a row.
    """

    def __init__(self, left_padding: mx.array):
        self.offset = mx.zeros_like(left_padding)  # RoPE position of the next slot, per row
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.length = 0
        self.visible: Optional[mx.array] = None  # [B, length] bool; None: every slot visible
        self.pending: Optional[mx.array] = None  # [B] padding slots the next block starts with
        self.pad(left_padding)

    def pad(self, n: mx.array) -> None:
        """The next block starts with ``n[b]`` padding slots in row b."""
        self.pending = n
        self.offset = self.offset - n

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> Tuple[mx.array, mx.array]:
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            self.keys = mx.concatenate([self.keys, keys], axis=2)
            self.values = mx.concatenate([self.values, values], axis=2)
        self.advance(keys.shape[2])
        return self.keys, self.values

    def advance(self, n: int) -> None:
        """Move past ``n`` new positions (after their keys and values were appended)."""
        self.visible = self._visible(n)
        self.pending = None
        self.length += n
        self.offset = self.offset + n

    def _visible(self, n: int) -> Optional[mx.array]:
        """[B, length + n] visibility of every slot once a block of ``n`` slots is added."""
        if self.pending is None:
            if self.visible is None:
                return None
            return mx.concatenate([self.visible, mx.ones((self.visible.shape[0], n), dtype=mx.bool_)], axis=1)
        block = mx.arange(n)[None, :] >= self.pending[:, None]
        if self.length == 0:
            return block
        before = self.visible if self.visible is not None else mx.ones((block.shape[0], self.length), dtype=mx.bool_)
        return mx.concatenate([before, block], axis=1)

    def copy(self) -> "RowsCache":
        c = RowsCache.__new__(RowsCache)
        c.__dict__.update(self.__dict__)
        return c

    def make_mask(self, N: int, return_array: bool = False, window_size: Optional[int] = None, **_):
        from mlx_lm.models.base import create_causal_mask

        mask = create_causal_mask(N, self.length, window_size=window_size)
        visible = self._visible(N)
        return mask if visible is None else mask & visible[:, None, None, :]

    def take_rows(self, index: mx.array) -> None:
        """Keep rows ``index`` (repeats allowed): prompt rows become completion rows."""
        self.offset = self.offset[index]
        for name in ("keys", "values", "visible", "pending"):
            a = getattr(self, name)
            if a is not None:
                setattr(self, name, a[index])


def plain_kv_layers(model: nn.Module) -> bool:
    """True when every layer keeps a plain, full-attention KV cache (no sliding window, no state):
    then prompts can share a prefix (``prefill.py``) and decoding can use a static buffer."""

    def check() -> bool:
        from mlx_lm.models.cache import KVCache, make_prompt_cache

        return all(type(c) is KVCache for c in make_prompt_cache(model))

    return model_flag(model, "plain_kv", check)


def rows_cache(model: nn.Module, left_padding: List[int]) -> List[RowsCache]:
    """One ``RowsCache`` per layer for rows with the given left padding."""
    lp = mx.array(left_padding)
    return [RowsCache(lp) for _ in model.layers]


class OutputHead(NamedTuple):
    """A model cut before its output head: ``head.logits(head.body(x, cache)) == model(x, cache)``.

    body: the transformer without the head, (tokens, cache) -> hidden states;
    module: the head's module (``lm_head`` or the tied embedding), looked up at call time;
    apply: (module, hidden) -> logits (a separate function so a checkpoint can take the module's
        parameters as inputs, ``scoring.chunked_logprobs``);
    vocab: the number of logits per position.
    """

    body: Callable
    module: nn.Module
    apply: Callable
    vocab: int

    def logits(self, hidden: mx.array) -> mx.array:
        return self.apply(self.module, hidden)


def output_head(model: nn.Module) -> Optional[OutputHead]:
    """The model cut before its output head, or None when it cannot be cut.

    mlx-lm's decoder models keep the transformer in ``model.model`` and end with ``lm_head`` or the
    tied embedding. Models that do more after the head (logit soft-capping, scaling) fail a
    one-off check on a 3-token input and get None: they run whole (``body(model, None)``).
    """

    def check() -> bool:
        if _head_module(model) is None:
            return False
        x = mx.array([[1, 2, 3]])
        try:
            split = _apply_head(model)(_head_module(model), model.model(x))
            return bool(mx.allclose(split, model(x), rtol=1e-4, atol=1e-4).item())
        except Exception:  # an unusual signature: not the standard layout
            return False

    if not model_flag(model, "head", check):
        return None
    module = _head_module(model)
    return OutputHead(lambda x, cache: model.model(x, cache=cache), module, _apply_head(model),
                      int(module.weight.shape[0]))


def body(model: nn.Module, head: Optional[OutputHead]) -> Callable:
    """(tokens, cache) -> what comes before the head: hidden states when the model can be cut
    (``head``), else the whole model's logits."""
    return head.body if head is not None else (lambda x, cache: model(x, cache=cache))


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


def enable_grad_checkpoint(model: nn.Module) -> None:
    """Recompute each transformer block in the backward pass instead of storing its activations.

    Like mlx-lm's ``grad_checkpoint``, but a scoring pass hands the blocks a cache they append to,
    and the recomputation must not append twice: the block runs on a fresh copy of the cache
    inside the checkpoint, and the outer cache takes its result. Only this model's blocks change
    (each gets a subclass of its class; parameters and their names stay): mlx-lm patches the
    class itself, which checkpoints every model of that architecture in the process.
    """
    block = type(model.layers[0])
    checkpointed = block if getattr(block, "_mlx_grpo_checkpointed", False) else _checkpointed_class(block)
    for layer in model.layers:
        if type(layer) is block:
            layer.__class__ = checkpointed


@functools.lru_cache(maxsize=None)
def _checkpointed_class(block: type) -> type:
    """``block`` with a ``__call__`` that checkpoints it (one subclass per block class)."""
    original = block.__call__

    def call(self, x, *args, **kwargs):
        args = list(args)
        in_kwargs = "cache" in kwargs
        cache = kwargs.get("cache") if in_kwargs else (args[1] if len(args) > 1 else None)

        def with_cache(c):
            if in_kwargs:
                return args, {**kwargs, "cache": c}
            a = list(args)
            if len(a) > 1:
                a[1] = c
            return a, kwargs

        if cache is not None and not isinstance(cache, RowsCache):
            return original(self, x, *args, **kwargs)  # decoding: no gradient, nothing to save
        if cache is None:
            def plain(params, x):
                self.update(params)
                return original(self, x, *args, **kwargs)

            return mx.checkpoint(plain)(self.trainable_parameters(), x)

        before = cache.copy()  # the state this block starts from, for every (re)computation

        def run(params, x, *kv):
            self.update(params)
            c = before.copy()
            c.keys, c.values = kv if kv else (None, None)
            a, k = with_cache(c)
            return original(self, x, *a, **k), c.keys, c.values

        kv = () if cache.keys is None else (cache.keys, cache.values)
        h, cache.keys, cache.values = mx.checkpoint(run)(self.trainable_parameters(), x, *kv)
        cache.advance(x.shape[1])
        return h

    return type(block.__name__, (block,), {"__call__": call, "_mlx_grpo_checkpointed": True})
