"""The update's forward and backward passes in C on the CPU backend (``csrc/grad.c``): the GRPO loss's
gradient with respect to every LoRA adapter of a llama-shaped model on a frozen float32 base.

Through MLX, SmolLM2's update over a step's 16 completions of 64 tokens took ~3x its FLOP bound:
the products run at the BLAS's speed, but the differentiated graph's element-wise work runs one
element at a time. ``grad.c`` makes the same products (the backward reads each frozen weight the
other way: dx = dy W; the base gets no gradient) and the rest in vectors between them.

The loss stays ``loss.grpo_loss`` in MLX: the C forward gives the completions' log-probabilities,
MLX differentiates the loss with respect to them (every loss type, the KL and the clipping as
they are), and the C backward carries that gradient down to the adapters. Each prompt runs once
for its group and the prompts' common prefix once (as ``prefill.py`` shares them), gradients flowing
back through every key and value the completions read. Same gradients as MLX's to float32 rounding
(tests/test_native_grad.py).
"""

from __future__ import annotations

import ctypes
import os
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_map_with_path

from . import native_decode, skinny
from .config import Config
from .loss import Normalizer, grpo_loss
from .native_decode import ModelShape, _layers, _pointer
from .native_forward import PRODUCTS, WeightTable
from .prefill import shared_prefix

NATIVE: Optional[bool] = None  # None: the environment decides (OFF); tests and benchmarks set it
OFF = skinny.GRAD_OFF  # set: updates run through MLX even where this would serve


def library() -> Optional[ctypes.CDLL]:
    """The preloaded kernel library when it holds the update's passes, else None."""
    handle = native_decode.library()
    if handle is None or not hasattr(handle, "mlx_grpo_grad_forward"):
        return None
    for name in ("mlx_grpo_grad_forward", "mlx_grpo_grad_backward"):
        getattr(handle, name).restype = ctypes.c_int
    handle.mlx_grpo_grad_saved_floats.restype = ctypes.c_int64
    return handle


def unsupported(model: nn.Module, cfg: Config) -> Optional[str]:
    """Why the update of ``model`` under ``cfg`` cannot run in C here, or None when it can: the
    switch, the library and the backend, a model ``decode.c`` serves, LoRA adapters (no dropout)
    as the only trainable parameters, and no ``train.grad_checkpoint`` (the C pass keeps every
    layer's activations, fewer than MLX's graph without checkpoints but more than with them)."""
    wanted = NATIVE if NATIVE is not None else not os.environ.get(OFF)
    if not wanted:
        return "switched off"
    if cfg.adapter.type != "lora" or cfg.adapter.dropout > 0:
        return "only LoRA adapters without dropout"
    if cfg.train.grad_checkpoint:  # the user asked to hold less: MLX's checkpointed graph does
        return "train.grad_checkpoint recomputes each layer in MLX's backward"
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    if not trainable or trainable - set(_adapter_names(model)):
        return "a trainable parameter that is not a LoRA adapter on a plain Linear of a llama-shaped layer"
    if library() is None:
        return "mlx-grpo's kernel library is not loaded"
    training = model.training
    model.eval()  # decode.c's checks ask for eval mode, which only matters for dropout
    try:
        return native_decode.unsupported(model)
    finally:
        model.train(training)


def _products(model: nn.Module) -> Iterator[Tuple[str, Optional[nn.Module]]]:
    """Each layer's products in the weight table's order: the prefix of their parameters' names
    (``model.layers.3.self_attn.q_proj.``) and the module when it is a LoRA adapter on a plain
    Linear (``WeightTable`` points at its A and B), else None."""
    for i, layer in enumerate(_layers(model)):
        for parent, name in PRODUCTS:
            m = getattr(getattr(layer, parent, None), name, None)
            parts = None if m is None else native_decode._linear_parts(m)
            yield f"model.layers.{i}.{parent}.{name}.", (m if parts is not None and parts[2] is not None else None)


def _adapter_names(model: nn.Module) -> List[str]:
    """The names of every adapter's ``lora_a`` and ``lora_b`` the weight table points at, in its order."""
    return [prefix + f"lora_{ab}" for prefix, m in _products(model) if m is not None for ab in "ab"]


def kept_bytes(model: nn.Module, tokens: int) -> int:
    """Bytes of the activations the C forward keeps for the backward over ``tokens`` flat tokens
    (the prompts once each, and every row's completion)."""
    shape = ModelShape.of(model)
    floats = library().mlx_grpo_grad_saved_floats(_pointer(shape.dims()), _pointer(shape.scalars(1.0)),
                                                  ctypes.c_int64(tokens))
    return 4 * int(floats)


_KEPT: List[np.ndarray] = []


def _scratch(floats: int) -> np.ndarray:
    """A buffer of ``floats`` for the activations the forward keeps, the same one update after
    update while it is large enough: a fresh one of ~1 GB would be faulted in, page by page, every
    time."""
    if not _KEPT or _KEPT[0].size < floats:
        _KEPT[:] = [np.empty(floats, np.float32)]
    return _KEPT[0][:floats]


class Layout(NamedTuple):
    """The micro-batch flat, as grad.c takes it: tokens, targets (-1: not scored), segments
    [S, 4] (start, length, parent, first position), and each row's first flat position (its
    completion's scored positions follow, one per completion token)."""

    tokens: np.ndarray
    targets: np.ndarray
    segments: np.ndarray
    row_start: np.ndarray


def layout(prompts: np.ndarray, left_padding: Sequence[int], row_prompt: np.ndarray, completions: np.ndarray,
           lengths: np.ndarray) -> Layout:
    """Segments for rows continuing left-padded prompts: the prompts' common prefix (when worth
    sharing), each prompt used but its last token, and each row: its prompt's last token then
    its completion but the last, each position scoring the completion's next token."""
    used = sorted({int(u) for u in row_prompt})
    real = {u: prompts[u, left_padding[u]:] for u in used}
    pick = np.array(used, dtype=np.int64)
    shared = shared_prefix(prompts[pick], [left_padding[u] for u in used]) if len(used) > 1 else 0
    tokens: List[np.ndarray] = []
    targets: List[np.ndarray] = []
    segments: List[Tuple[int, int, int, int]] = []
    at = 0

    def add(toks: np.ndarray, scored: np.ndarray, parent: int, pos0: int) -> int:
        nonlocal at
        tokens.append(toks)
        targets.append(scored)
        segments.append((at, len(toks), parent, pos0))
        at += len(toks)
        return len(segments) - 1

    root = add(real[used[0]][:shared], np.full(shared, -1), -1, 0) if shared else -1
    seg_of = {}
    for u in used:
        own = real[u][shared:-1]
        seg_of[u] = add(own, np.full(len(own), -1), root, shared)
    row_start = np.zeros(len(row_prompt), dtype=np.int64)
    for b, (u, n) in enumerate(zip(row_prompt.tolist(), lengths.tolist())):
        row_start[b] = at
        if n > 0:
            fed = np.concatenate([real[u][-1:], completions[b, :n - 1]])
            add(fed, completions[b, :n], seg_of[u], len(real[u]) - 1)
    cat = lambda xs: np.ascontiguousarray(np.concatenate([*xs, np.zeros(0)]).astype(np.int32))  # noqa: E731
    return Layout(cat(tokens), cat(targets), np.ascontiguousarray(np.array(segments, dtype=np.int32).reshape(-1, 4)),
                  row_start)


def value_and_grad(model: nn.Module, batch, cfg: Config, norm: Normalizer) -> Tuple[mx.array, Dict[str, mx.array], Dict]:
    """(loss, stats, gradient) of the micro-batch ``batch`` (a ``learner.StepBatch``), as
    ``nn.value_and_grad(model, learner.batch_loss(cfg, norm))`` gives them: the passes in C, the loss
    (and its gradient with respect to each log-probability) through MLX."""
    lib, table, shape = library(), WeightTable(model), ModelShape.of(model)
    lengths = batch.lengths()
    width = batch.tokens.shape[1]
    lay = layout(np.array(batch.prompts), batch.left_padding, np.asarray(batch.row_prompt), np.array(batch.tokens), lengths)
    temperature = cfg.rollout.temperature
    dims, fp = shape.dims(), shape.scalars(1.0 / temperature if temperature > 0 else 1.0)
    M, S = len(lay.tokens), len(lay.segments)
    saved = _scratch(int(lib.mlx_grpo_grad_saved_floats(_pointer(dims), _pointer(fp), ctypes.c_int64(M))))
    flat_logp = np.empty(max(M, 1), np.float32)
    common = (_pointer(dims), _pointer(fp), _pointer(table.pointers), ctypes.c_int(M), ctypes.c_int(S),
              _pointer(lay.segments))
    if lib.mlx_grpo_grad_forward(*common, _pointer(lay.tokens), _pointer(lay.targets), _pointer(flat_logp), _pointer(saved)):
        raise MemoryError("the C update pass could not allocate its working memory")
    # Each row's scored positions, flat, into [B, width] (0 past its length).
    cols = np.arange(width)[None, :]
    valid = cols < lengths[:, None]
    where = np.where(valid, lay.row_start[:, None] + cols, 0)
    logp = mx.array(np.where(valid, flat_logp[where], 0.0).astype(np.float32))

    def loss_of(lp: mx.array):
        return grpo_loss(lp, batch.old_logp, batch.ref_logp, batch.mask, batch.advantages, cfg.grpo, norm)

    (loss, stats), dlogp = mx.value_and_grad(loss_of)(logp)
    flat_dlogp = np.zeros(max(M, 1), np.float32)
    flat_dlogp[where[valid]] = np.array(dlogp)[valid]

    # grad.c writes A^T's gradient [r, K] and B's divided by the scale [r, N]: turned into the
    # parameters' own below
    out: Dict[str, Tuple[np.ndarray, Callable[[np.ndarray], np.ndarray]]] = {}
    pointers: List[int] = []
    for prefix, m in _products(model):
        if m is None:
            pointers += [0, 0]
            continue
        r, (K, N) = m.lora_a.shape[1], m.linear.weight.shape[::-1]
        out[prefix + "lora_a"] = (np.empty((r, K), np.float32), np.transpose)
        out[prefix + "lora_b"] = (np.empty((r, N), np.float32), lambda g, scale=m.scale: g * scale)
        pointers += [out[prefix + "lora_a"][0].ctypes.data, out[prefix + "lora_b"][0].ctypes.data]
    table_g = np.array(pointers, dtype=np.uintp)
    if lib.mlx_grpo_grad_backward(*common, _pointer(lay.targets), _pointer(flat_dlogp), _pointer(saved), _pointer(table_g)):
        raise MemoryError("the C update pass could not allocate its working memory")

    def grad_of(key: str, param: mx.array) -> mx.array:
        g, finish = out[key]
        return mx.array(finish(g)).astype(param.dtype)

    return loss, stats, tree_map_with_path(grad_of, model.trainable_parameters())
