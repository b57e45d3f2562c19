"""The SiLU of gated MLPs, attention's softmax and the vocabulary's log-sum-exp on MLX's CPU
backend without MLX's slow CPU ``exp``.

On x86-64 MLX's CPU backend evaluates ``exp`` and ``sigmoid`` element by element at 13-16 ns
(an add: under 1 ns); every gated MLP pays it in its SiLU (Qwen2.5-0.5B: 116,736 sigmoids per
token) and attention in its softmax. Its ``power`` is the C library's, about 3x faster, so here
``exp(x) = 2^(x log2 e)`` (measured over 4M floats: 4.6 ns per element against ``exp``'s 12.7 and
``sigmoid``'s 15.8; the relative error of rounding x log2 e to float32 first, ~|x| x 6e-8, is the
one MLX's own ``exp`` makes). One primitive and a multiply, so it is as fast inside a gradient
trace (where MLX runs compiled functions op by op, ``mlx/compile.cpp``) as outside one:

- ``swiglu``: ``silu(gate) * x`` of the gated MLPs of mlx-lm's llama, qwen2, qwen3, mistral and
  about fifty more architectures, with its own gradient (SmolLM2's update, 1,472 positions x
  1,536 a layer: forward + backward 66 -> 31 ms);
- ``use_fast_mlps(model)``: gives a loaded model's gated MLPs that ``swiglu`` (each module's
  class swapped for a subclass with the same parameters, after a one-off check that it computes
  what the original does), so the adapters and saved files do not change;
- ``attention``: MLX's attention with the heads that share a key head stacked into one product
  and the softmax through ``exp``; ``use_fast_attention`` routes mlx-lm's
  ``scaled_dot_product_attention`` there on the CPU backend;
- ``logsumexp``: the vocabulary's log-sum-exp where nothing is differentiated (every decode
  step, the reference and old-policy passes: blocks marked ``eager()``) through NumPy, whose
  ``exp`` is vectorised: 78M logits (8 rows x 64 positions x Qwen's 151,936) take 0.26 s
  against MLX's 2.15 s here. It evaluates its input where it is called, so it cannot run inside
  ``mx.compile`` (the decode step calls it after the compiled graph), and not inside a gradient
  trace: there an evaluation keeps every intermediate of the traced graph alive (measured on
  the 0.5B update: 15.7 GB instead of 4.1), so a differentiated pass takes ``exp``. Its
  gradient (softmax x cotangent, NumPy's too) serves callers that differentiate a block marked
  ``eager()``.

A polynomial for 2^f in compiled kernels of multiplies and adds came first; MLX's CPU kernels
run it at ~10 ns per element (the compiled loop is not vectorised) and, under a gradient trace,
op by op at two dozen passes: ``power`` beats it in every pass (docs/performance.md).

Metal and CUDA have fast ``exp`` and attention kernels; there ``swiglu`` and attention are MLX's
own and nothing is swapped.
"""

from __future__ import annotations

import contextlib
import functools
import math
import sys
from typing import Any, Callable, Dict, Iterator, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .float_base import device_kind

LOG2E = math.log2(math.e)


def on_cpu() -> bool:
    """True when MLX computes on its CPU backend (where its ``exp`` is slow)."""
    return device_kind() == "cpu"


def exp(x: mx.array) -> mx.array:
    """e^x in float32; on the CPU backend as 2^(x log2 e) through MLX's ``power`` (~3x faster
    than its ``exp`` there; see the module docstring), elsewhere MLX's ``exp``. e^-inf is 0,
    e^inf is inf, NaN stays NaN."""
    x = x.astype(mx.float32)
    return mx.power(2.0, x * LOG2E) if on_cpu() else mx.exp(x)


# --------------------------------------------------------------------------- SwiGLU


def _sigmoid(g: mx.array) -> mx.array:
    """sigmoid(g) for float32 ``g`` through ``exp`` (0 below about -88, 1 above about 17)."""
    return 1.0 / (1.0 + exp(-g))


# Compiled per shape for the rollouts' and the reference pass's large arrays (one kernel instead
# of five passes; a new shape costs a trace, not a compilation); a gradient trace runs it op by op.
def _swiglu_and_sigmoid(gate: mx.array, x: mx.array) -> Tuple[mx.array, mx.array]:
    """``silu(gate) * x`` in ``x``'s dtype, and the float32 sigmoid of ``gate`` it used."""
    g = gate.astype(mx.float32)
    s = _sigmoid(g)
    return (g * s * x.astype(mx.float32)).astype(x.dtype), s


@mx.compile
def _swiglu_forward(gate: mx.array, x: mx.array) -> mx.array:
    return _swiglu_and_sigmoid(gate, x)[0]


@mx.compile
def _swiglu_backward(gate: mx.array, x: mx.array, s: mx.array, cotangent: mx.array) -> Tuple[mx.array, mx.array]:
    g = gate.astype(mx.float32)
    c = cotangent.astype(mx.float32)
    d_gate = c * x.astype(mx.float32) * s * (1.0 + g * (1.0 - s))  # d silu / d g = s + g s (1 - s)
    return d_gate.astype(gate.dtype), (c * g * s).astype(x.dtype)


@mx.custom_function
def _swiglu(gate: mx.array, x: mx.array) -> mx.array:
    return _swiglu_forward(gate, x)


@_swiglu.vjp
def _swiglu_vjp(primals, cotangent, output):
    gate, x = primals  # the sigmoid recomputed: the forward pass kept only its output
    return _swiglu_backward(gate, x, _sigmoid(gate.astype(mx.float32)), cotangent)


@mx.custom_function
def _swiglu_kept(gate: mx.array, x: mx.array) -> Tuple[mx.array, mx.array]:
    return _swiglu_and_sigmoid(gate, x)


@_swiglu_kept.vjp
def _swiglu_kept_vjp(primals, cotangents, outputs):
    gate, x = primals
    return _swiglu_backward(gate, x, outputs[1], cotangents[0])


def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """``nn.silu(gate) * x`` (mlx-lm's ``swiglu``); on the CPU backend through ``exp`` in every
    pass, with its own gradient. Inside ``eager()`` blocks (rollouts, scoring) one compiled kernel
    that keeps nothing; elsewhere (a pass that may be differentiated) the forward pass keeps the
    sigmoid for the backward pass, as MLX's ``silu`` does (SmolLM2's update, 1,472 positions x
    1,536 a layer: forward 35 -> 14 ms, forward + backward 66 -> 31 ms)."""
    if not on_cpu():
        return nn.silu(gate) * x
    return _swiglu(gate, x) if in_eager() else _swiglu_kept(gate, x)[0]


def _gated_mlp_call(self, x: mx.array) -> mx.array:
    return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))


@functools.lru_cache(maxsize=None)
def _fast_class(cls: type) -> type:
    """``cls`` with ``_gated_mlp_call`` as its ``__call__`` (one subclass per class)."""
    return type(cls.__name__, (cls,), {"__call__": _gated_mlp_call, "_mlx_grpo_fast": True})


def runs_fast_mlps(model: nn.Module) -> bool:
    """Do ``model``'s gated MLPs run through ``swiglu`` here (swapped by ``use_fast_mlps``, and
    MLX computing on its CPU backend)?"""
    return on_cpu() and any(getattr(type(m), "_mlx_grpo_fast", False) for _, m in model.named_modules())


def _is_gated_mlp(m: nn.Module) -> bool:
    return all(isinstance(getattr(m, k, None), nn.Module) for k in ("gate_proj", "up_proj", "down_proj"))


def use_fast_mlps(model: nn.Module) -> int:
    """On the CPU backend, run the gated MLPs of ``model`` through ``swiglu``; returns how many.

    Each module with ``gate_proj``, ``up_proj`` and ``down_proj`` is checked once per class on a
    random input: only if the swapped module gives the original's output (to float32 rounding)
    is the swap kept, so an MLP that computes something else (another activation, a clamp) is
    left as it is. The module keeps its parameters and their names (adapters attach and save
    exactly as before); do this before the adapters are attached or after, either works.
    """
    if not on_cpu():
        return 0
    verdict: Dict[type, bool] = {}
    swapped = 0
    for _, m in model.named_modules():
        cls = type(m)
        if getattr(cls, "_mlx_grpo_fast", False) or not _is_gated_mlp(m):
            continue
        if cls not in verdict:
            verdict[cls] = _same_output(m, _fast_class(cls))
        if verdict[cls]:
            m.__class__ = _fast_class(cls)
            swapped += 1
    return swapped


def _same_output(m: nn.Module, fast: type) -> bool:
    """Does ``m`` compute the same output with ``fast.__call__`` as with its own?"""
    try:
        lin = getattr(m.gate_proj, "linear", m.gate_proj)  # under a LoRA layer: the base layer
        dim = lin.weight.shape[-1] * (32 // getattr(lin, "bits", 32))
        x = mx.random.normal((2, 3, dim), key=mx.random.key(0))
        want = m(x)
        got = fast.__call__(m, x)
        scale = mx.max(mx.abs(want)).item() + 1e-6
        return bool(mx.max(mx.abs(got - want)).item() <= 1e-4 * scale)
    except Exception:  # an unusual signature or layout: keep the original
        return False


# --------------------------------------------------------------------------- attention

@mx.compile
def _softmax_forward(s: mx.array) -> mx.array:
    x = s.astype(mx.float32)  # in float32 whatever the scores' dtype, as MLX's precise softmax
    e = exp(x - mx.max(x, axis=-1, keepdims=True))
    return (e * (1.0 / mx.sum(e, axis=-1, keepdims=True))).astype(s.dtype)


@mx.custom_function
def _softmax(s: mx.array) -> mx.array:
    return _softmax_forward(s)


@_softmax.vjp
def _softmax_vjp(primals, cotangent, output):
    return output * (cotangent - mx.sum(output * cotangent, axis=-1, keepdims=True))


def _mask_scores(scores: mx.array, mask: Any) -> mx.array:
    """``scores`` [B, H, L, S] with ``mask`` applied as MLX's attention applies it: a boolean
    array hides slots, any other array is added, "causal" aligns the queries with the last keys."""
    if mask is None:
        return scores
    if isinstance(mask, str):
        if mask != "causal":
            raise ValueError(f"unknown attention mask {mask!r}")
        L, S = scores.shape[-2:]
        mask = (mx.arange(L)[:, None] + (S - L)) >= mx.arange(S)[None, :]
    if mask.dtype == mx.bool_:
        # The dtype's lowest value, as MLX's attention (not -inf: a row with every slot hidden
        # then averages its values instead of giving NaN).
        return mx.where(mask, scores, mx.array(mx.finfo(scores.dtype).min, scores.dtype))
    return scores + mask.astype(scores.dtype)


def attention(queries: mx.array, keys: mx.array, values: mx.array, scale: float, mask: Any = None) -> mx.array:
    """``mx.fast.scaled_dot_product_attention`` (grouped heads; boolean, additive or "causal"
    masks) as MLX's CPU backend computes it, with two changes: the heads that share a key head
    are stacked as the rows of one product per (batch, key head) instead of a broadcast product
    per head (forward + backward of one SmolLM2 update layer: 43-46 ms against 48-60), and the
    softmax takes ``exp`` with its own gradient (from the softmax kept, as MLX's; 16 x 9 x 64
    queries over 176 keys, forward + backward: 15 ms against MLX's softmax's 24).

    queries [B, H, L, D], keys and values [B, KV, S, D] with KV dividing H (query head h reads
    key head h // (H / KV), as MLX's does). The scores keep the inputs' dtype and the softmax is
    computed in float32, as MLX's attention does.
    """
    B, H, L, D = queries.shape
    KV, S = keys.shape[1], keys.shape[2]
    q = (queries * scale).reshape(B, KV, (H // KV) * L, D)
    scores = _mask_scores((q @ keys.swapaxes(-1, -2)).reshape(B, H, L, S), mask)
    p = _softmax(scores)
    return (p.reshape(B, KV, (H // KV) * L, S) @ values).reshape(B, H, L, values.shape[-1])


_attention_depth = 0  # inside a block of a model that opted in (use_fast_attention)


def _sdpa_with_fast_path(original: Callable) -> Callable:
    """mlx-lm's ``scaled_dot_product_attention`` that takes ``attention`` on the CPU backend
    inside the blocks of a model that opted in (plain caches, no attention sinks) and
    ``original`` everywhere else."""

    def scaled_dot_product_attention(queries, keys, values, cache, scale: float, mask, sinks=None):
        if _attention_depth and sinks is None and not hasattr(cache, "bits") and on_cpu():
            return attention(queries, keys, values, scale, mask)
        return original(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)

    scaled_dot_product_attention._mlx_grpo_fast = True
    return scaled_dot_product_attention


@functools.lru_cache(maxsize=None)
def _attention_class(block: type) -> type:
    """``block`` whose calls take the fast attention path (one subclass per class)."""
    original = block.__call__

    def call(self, *args, **kwargs):
        global _attention_depth
        _attention_depth += 1
        try:
            return original(self, *args, **kwargs)
        finally:
            _attention_depth -= 1

    return type(block.__name__, (block,), {"__call__": call, "_mlx_grpo_fast_attention": True, "_mlx_grpo_stock": block})


def use_fast_attention(model: nn.Module) -> int:
    """On the CPU backend, run the attention of ``model``'s transformer blocks through
    ``attention``; returns how many blocks now do.

    mlx-lm's architectures call ``scaled_dot_product_attention`` from ``mlx_lm.models.base``
    through their own module's global name. That global gets a dispatcher which takes
    ``attention`` only while a block of a model that opted in runs (each block's class swapped
    for a subclass that says so; parameters and their names stay): another model of the same
    architecture in the process, and quantized caches and attention sinks, keep mlx-lm's own.
    """
    if not on_cpu():
        return 0
    try:
        from mlx_lm.models import base
    except ImportError:
        return 0
    patched = False
    for name in {c.__module__ for _, m in model.named_modules() for c in type(m).__mro__}:
        module = sys.modules.get(name)
        current = getattr(module, "scaled_dot_product_attention", None)
        if current is base.scaled_dot_product_attention:
            current = module.scaled_dot_product_attention = _sdpa_with_fast_path(current)
        patched |= getattr(current, "_mlx_grpo_fast", False)
    if not patched:
        return 0
    blocks = list(getattr(model, "layers", None) or [])
    for block in blocks:
        if not getattr(type(block), "_mlx_grpo_fast_attention", False):
            block.__class__ = _attention_class(type(block))
    return len(blocks)


@contextlib.contextmanager
def stock_attention(model: nn.Module) -> Iterator[None]:
    """Within the block, ``model``'s blocks run mlx-lm's own attention (a peer's code timed on
    the same model object computes as its authors wrote it)."""
    swapped = [(b, type(b)) for b in getattr(model, "layers", None) or [] if "_mlx_grpo_stock" in vars(type(b))]
    for block, cls in swapped:
        block.__class__ = cls._mlx_grpo_stock
    try:
        yield
    finally:
        for block, cls in swapped:
            block.__class__ = cls


# --------------------------------------------------------------------------- log-sum-exp

# Logits per NumPy block: its temporaries stay at 16 MB, in cache-friendly pieces.
_BLOCK = 1 << 22


def _blocks(rows: int, width: int):
    step = max(1, _BLOCK // max(1, width))
    return (slice(s, s + step) for s in range(0, rows, step))


def _np_logsumexp(a: np.ndarray) -> np.ndarray:
    """log sum exp over the rows of a 2-D float32 array, as MLX computes it (max subtracted; a
    row of -inf gives -inf, +inf gives +inf, NaN stays NaN)."""
    out = np.empty(a.shape[0], dtype=np.float32)
    for b in _blocks(*a.shape):
        m = a[b].max(axis=1)
        m[~np.isfinite(m)] = 0.0  # -inf rows: log(0) = -inf below; inf and NaN pass through exp
        t = a[b] - m[:, None]
        np.exp(t, out=t)
        with np.errstate(divide="ignore"):
            out[b] = np.log(t.sum(axis=1)) + m
    return out


def _np_softmax_scaled(a: np.ndarray, lse: np.ndarray, c: np.ndarray) -> np.ndarray:
    """softmax(a) * c[:, None] for 2-D ``a`` whose row log-sum-exps are ``lse``."""
    out = np.empty_like(a)
    for b in _blocks(*a.shape):
        np.subtract(a[b], lse[b, None], out=out[b])
        np.exp(out[b], out=out[b])
        out[b] *= c[b, None]
    return out


def _numpy(x: mx.array) -> np.ndarray:
    return np.array(x, copy=False)  # a view of the evaluated MLX buffer


@mx.custom_function
def _lse_rows(x: mx.array) -> mx.array:
    mx.eval(x)
    return mx.array(_np_logsumexp(_numpy(x)))


@_lse_rows.vjp
def _lse_rows_vjp(primals, cotangent, output):
    x = primals[0] if isinstance(primals, (tuple, list)) else primals
    c = cotangent.astype(mx.float32)
    mx.eval(x, c, output)
    return mx.array(_np_softmax_scaled(_numpy(x), _numpy(output), _numpy(c)))


_eager_depth = 0
_lazy_depth = 0


@contextlib.contextmanager
def eager(evaluate: bool = True) -> Iterator[None]:
    """Marks a block where no gradient is traced (rollouts, reference scoring): ``logsumexp``
    may evaluate its input there, and takes the NumPy path on the CPU backend. ``evaluate=False``:
    nothing is evaluated before the caller evaluates the whole graph (lanes.py's halves run side
    by side only when queued together), so ``logsumexp`` stays in MLX."""
    global _eager_depth, _lazy_depth
    _eager_depth += 1
    _lazy_depth += not evaluate
    try:
        yield
    finally:
        _eager_depth -= 1
        _lazy_depth -= not evaluate


def in_eager() -> bool:
    """Inside an ``eager()`` block?"""
    return _eager_depth > 0


# Below this many logits the hand-over (an evaluation that ends MLX's lazy pipelining, a copy
# back) costs more than MLX's exp: the embedded model's decode step (128 rows x 167 logits) ran
# 0.81x as fast through NumPy, a Qwen step (8 x 151,936) 6x faster.
NUMPY_MIN_LOGITS = 1 << 18


def evaluates(n_logits: int) -> bool:
    """Would ``logsumexp`` over ``n_logits`` logits here take the NumPy path, which evaluates its
    input at once (so a caller gains nothing by queueing work ahead of it)?"""
    return bool(in_eager() and not _lazy_depth and n_logits >= NUMPY_MIN_LOGITS and on_cpu())


@mx.custom_function
def _lse_exp(x: mx.array) -> mx.array:
    m = mx.max(x, axis=-1, keepdims=True)
    m = mx.where(mx.isinf(m) | mx.isnan(m), 0.0, m)  # as _np_logsumexp: inf and NaN pass through
    return (mx.log(mx.sum(exp(x - m), axis=-1, keepdims=True)) + m)[..., 0]


@_lse_exp.vjp
def _lse_exp_vjp(primals, cotangent, output):
    x = primals[0] if isinstance(primals, (tuple, list)) else primals
    return exp(x - output[..., None]) * cotangent[..., None].astype(mx.float32)  # softmax x cotangent


def logsumexp(x: mx.array) -> mx.array:
    """``mx.logsumexp(x, axis=-1)`` in float32, with its gradient; on the CPU backend within
    ``eager()`` and from ``NUMPY_MIN_LOGITS`` logits on through NumPy (see the module docstring),
    elsewhere on the CPU through ``exp`` (below ``NUMPY_MIN_LOGITS`` logits MLX's own, one
    kernel where ``exp`` is a handful). Not inside ``mx.compile``."""
    x = x.astype(mx.float32)
    if evaluates(x.size):
        return _lse_rows(x.reshape(-1, x.shape[-1])).reshape(x.shape[:-1])
    if on_cpu() and x.size >= NUMPY_MIN_LOGITS:
        return _lse_exp(x)
    return mx.logsumexp(x, axis=-1)


def scaled_logits(logits: mx.array, temperature: float) -> mx.array:
    """logits / T in float32 (T <= 0, greedy, and T = 1 leave them as they are)."""
    logits = logits.astype(mx.float32)
    return logits / temperature if temperature > 0 and temperature != 1.0 else logits


def gather_logprobs(logits: mx.array, targets: mx.array, temperature: float) -> mx.array:
    """log softmax(logits / T)[target] in float32: [..., V], [...] -> [...]."""
    logits = scaled_logits(logits, temperature)
    picked = mx.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - logsumexp(logits)
