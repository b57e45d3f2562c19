"""Checks before the first step, so a run fails in seconds rather than hours in:

- every prompt renders (a chat template the tokenizer lacks is found here) and fits the model's
  context together with the tokens it may generate;
- the configured batch fits in memory: a rough estimate, compared with what the machine has;

and the advice an out-of-memory failure prints: which settings to lower. The commands that only
decode (``eval``, ``generate``, ``reward --model``) make the same two checks before they decode
(``check_rows``, ``check_prompt``, ``check_decode_memory``): a prompt past the context is refused
with its length, and a batch whose KV cache cannot fit is refused naming the option, rather than
decoding for minutes or being killed by the kernel without a word.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import Config, ConfigError
from .fastmath import runs_fast_mlps
from .rollout import encode_prompt
from .logprobs import KEEP_BUDGET, LOGITS_BUDGET
from .tasks import DataError, TaskData
from .tasks.templates import Prompter
from .errors import RunFault, first_line
from .memory import GB, MARGIN, memory_budget



class TooLarge(ConfigError):
    """A batch to decode whose estimated memory exceeds what the machine has; names the option."""


class OutOfMemory(RunFault, RuntimeError):
    """The run ran out of memory; the message says which settings to lower."""


def context_length(model: nn.Module) -> Optional[int]:
    """The longest sequence the model was built for (its config's max_position_embeddings), if known."""
    args = getattr(model, "args", None)
    for name in ("max_position_embeddings", "max_seq_len", "n_positions", "seq_length", "n_ctx"):
        value = getattr(args, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _line_of(path: str, index: int) -> int:
    """The file line of the ``index``-th row of a JSONL file (read_jsonl skips blank lines)."""
    seen = -1
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if line.strip():
                seen += 1
                if seen == index:
                    return n
    return 0  # pragma: no cover - the row came from this file


def _where(cfg: Config, split: str, index: int, n_train: int) -> str:
    """Name a row: file and line for JSONL data, the split and row otherwise."""
    d = cfg.data
    if d.task == "jsonl" and d.path:
        path, i = (d.eval_path, index) if split == "held-out" and d.eval_path else (
            d.path, index + (n_train if split == "held-out" else 0))
        return f"{path}:{_line_of(path, i)}"
    return f"data ({d.task}, {split} row {index})"


def check_prompts(tokenizer: Any, model: nn.Module, data: TaskData, prompter: Prompter, cfg: Config) -> int:
    """Render and tokenize every training and evaluated held-out prompt.

    Raises ``ConfigError`` (chat template missing) or ``DataError`` naming the first prompt that,
    with the tokens it may generate, exceeds the model's context. Returns the longest training
    prompt, in tokens (for the memory estimate).
    """
    eval_rows = data.held_out[: cfg.output.eval_size] if cfg.output.eval_size else data.held_out
    eval_tokens = cfg.output.eval_max_tokens or cfg.rollout.max_tokens
    longest = check_rows(tokenizer, model, prompter, cfg, data.train, "train", len(data.train),
                         cfg.rollout.max_tokens, "rollout.max_tokens")
    check_rows(tokenizer, model, prompter, cfg, eval_rows, "held-out", len(data.train), eval_tokens,
               "output.eval_max_tokens")
    return longest


def check_rows(tokenizer: Any, model: nn.Module, prompter: Prompter, cfg: Config, rows: Sequence[Dict[str, Any]],
               split: str, n_train: int, budget: int, key: str) -> int:
    """Render and tokenize the prompt of each of ``rows`` (the task's ``split``, "train" or
    "held-out", whose train split has ``n_train`` rows); raise ``DataError`` naming the first
    (file and line for JSONL data) that, with ``budget`` more tokens (the setting ``key``), exceeds
    the model's context. Returns the longest prompt, in tokens."""
    limit = context_length(model)
    longest = 0
    with _quiet("transformers"):  # its own long-prompt warning: the error below says it in one line
        for i, row in enumerate(rows):
            n = len(encode_prompt(tokenizer, prompter.render(row["prompt"])))
            longest = max(longest, n)
            if limit is not None and n + budget > limit:
                raise DataError(
                    f"{_where(cfg, split, i, n_train)}: the prompt is {n} tokens; with {key} {budget} it "
                    f"exceeds the model's context of {limit} tokens (shorten the prompt, drop the row or "
                    "lower the setting)"
                )
    return longest


def check_prompt(tokenizer: Any, model: nn.Module, prompt_text: str, budget: int, option: str, key: str) -> int:
    """The tokens of one rendered prompt (given by ``option``, e.g. ``--prompt``); raises
    ``DataError`` when with ``budget`` more tokens (the setting ``key``) it exceeds the model's
    context: a question of 100 KB would otherwise be prefilled and decoded for minutes, past any
    position the model was trained on. The tokenizer's own long-input warning is kept quiet."""
    limit = context_length(model)
    with _quiet("transformers"):
        n = len(encode_prompt(tokenizer, prompt_text))
    if limit is not None and n + budget > limit:
        raise DataError(f"{option}: the prompt is {n} tokens; with {key} {budget} it exceeds the model's "
                        f"context of {limit} tokens (shorten the prompt or lower the setting)")
    return n


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _dims(model: nn.Module) -> Dict[str, int]:
    args = getattr(model, "args", None)
    get = lambda name, default: int(getattr(args, name, None) or default)  # noqa: E731
    hidden = get("hidden_size", 0)
    heads = get("num_attention_heads", 1)
    return {
        "layers": len(getattr(model, "layers", [])),
        "hidden": hidden,
        "ffn": get("intermediate_size", 4 * hidden),
        "heads": heads,
        "kv_heads": get("num_key_value_heads", heads),
        "head_dim": get("head_dim", hidden // max(heads, 1)),
        "vocab": get("vocab_size", 0),
    }


def _activation_bytes(model: nn.Module) -> int:
    """Bytes per activation value: the dtype of the model's unquantized floating weights."""
    for _, v in tree_flatten(model.parameters()):
        if mx.issubdtype(v.dtype, mx.floating):
            return v.dtype.size
    return 2  # pragma: no cover


# Float32 logits alive at once per chunk of the scoring head (logits, their exponentials, the
# log-softmax and the gradients of the backward pass), measured on the Qwen2.5-0.5B shape.
LOGITS_COPIES = 6
# The same for a pass whose head keeps its softmax for the backward pass (logprobs.KEEP_BUDGET):
# logits, their exponentials, the softmax kept, its gradient and the target's update, over all
# positions at once (SmolLM2's update: +0.17 GB at the peak against checkpointed chunks).
KEPT_COPIES = 5
# Fitted to two measured peaks on the Qwen2.5-0.5B shape that load them differently: 2 prompts x
# G 4 x 64 tokens (the body's activations dominate) and 1 x 4 x 1024 tokens (the attention scores,
# quadratic in length, dominate): the scores are kept twice (before and after the softmax), the
# body's per-position values 1.2 x (8 x hidden + 2 x ffn).
BODY = 1.2
SCORE_COPIES = 2
# ``fastmath.swiglu`` (gated MLPs on the CPU backend) keeps the gate, the up projection and the
# sigmoid for its backward pass, one ffn-wide value per position fewer than MLX's ``silu(gate) * x``
# (SmolLM2's update peak: 3.05 -> 2.84 GB when it came in).
FAST_MLP_SAVES = 1


def estimate_memory(model: nn.Module, cfg: Config, prompt_tokens: int) -> Dict[str, float]:
    """An estimate, in bytes, of what one step holds at its peak, by part (``estimate_total``
    adds them up: the rollout's KV cache and the update's activations never coexist).

    weights      every parameter as loaded (quantized weights at their packed size);
    training     4 x the trainable parameters: gradients, their running sum over micro-batches
                 and Adam's two moments;
    kv_cache     the rollout: P*G rows x (prompt + max_tokens) positions x layers x 2 (keys,
                 values) x kv_heads x head_dim at the activation dtype;
    decode_logits  the float32 logits of a decode step (rows x vocab, three times: logits,
                 log-softmax, sampling);
    activations  one update micro-batch of m = ceil(P*G / grad_accumulation_steps) rows, i.e.
                 ceil(m / G) prompts (each runs once, shared by its rows) and m completions:
                 N = prompts x prompt_tokens + m x max_tokens positions. Per layer the
                 backward pass keeps about 8 x hidden + 2 x ffn values per position (norms,
                 projections and their LoRA branches, the MLP; ``BODY`` x that, less
                 ``FAST_MLP_SAVES`` x ffn where ``fastmath.swiglu`` runs the MLPs), 4 copies of each
                 row's keys and values over all T = prompt + max_tokens positions (m x T x
                 kv_heads x head_dim: the prompt's are copied to every row) and
                 ``SCORE_COPIES`` of the m x heads x max_tokens x T attention scores; with grad_checkpoint each layer keeps its input, the keys
                 and values and 2 copies of the scores, plus one layer's full set while it is
                 recomputed. Coefficients measured per layer (by difference between depths) on
                 the Qwen2.5-0.5B shape and on small llamas.
                 And the scoring head: ``LOGITS_COPIES`` x one chunk of float32 logits (at most
                 ``logprobs.LOGITS_BUDGET`` of them), or ``KEPT_COPIES`` x all of them when
                 they fit ``logprobs.KEEP_BUDGET`` (the head keeps its softmax).
    Measured against ``mx.get_peak_memory`` on the Qwen2.5-0.5B shape and the embedded model
    (docs/results/); tested within +-25% on a small model (tests/test_preflight.py).
    """
    d = _dims(model)
    b = _activation_bytes(model)
    G = cfg.rollout.group_size
    rows = cfg.train.prompts_per_step * G
    Tc = cfg.rollout.max_tokens
    T = prompt_tokens + Tc
    kv = d["kv_heads"] * d["head_dim"]
    micro = math.ceil(rows / cfg.train.grad_accumulation_steps)
    positions = math.ceil(micro / G) * prompt_tokens + micro * Tc
    weights = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    trainable = sum(v.nbytes for _, v in tree_flatten(model.trainable_parameters()))
    keys = micro * T * kv  # each row's keys (or values) over the prompt and its completion
    scores = d["heads"] * micro * Tc * T  # attention scores of the completion positions
    ffn_kept = BODY * 2 * d["ffn"] - (FAST_MLP_SAVES * d["ffn"] if runs_fast_mlps(model) else 0)
    per_layer = (positions * (BODY * 8 * d["hidden"] + ffn_kept) + 4 * keys + SCORE_COPIES * scores) * b
    if cfg.train.grad_checkpoint:
        layer_acts = per_layer + d["layers"] * (positions * d["hidden"] + 4 * keys + 2 * scores) * b
    else:
        layer_acts = d["layers"] * per_layer
    n_logits = micro * Tc * d["vocab"]
    logits = (KEPT_COPIES * n_logits if n_logits <= KEEP_BUDGET else LOGITS_COPIES * min(LOGITS_BUDGET, n_logits)) * 4
    return {
        "weights": float(weights),
        "training": float(4 * trainable),
        **decode_memory(model, rows, prompt_tokens, Tc),
        "activations": float(layer_acts + logits),
    }


def decode_memory(model: nn.Module, rows: int, prompt_tokens: int, max_tokens: int) -> Dict[str, float]:
    """Bytes that decoding ``rows`` completions at once adds to the weights (the rollout of a step,
    a batch of ``eval``, ``generate`` or the rewards lab): ``kv_cache``, rows x (prompt_tokens +
    max_tokens) positions x layers x 2 (keys, values) x kv_heads x head_dim at the activation
    dtype, and ``decode_logits``, the float32 logits of a decode step (rows x vocab, three times:
    logits, log-softmax, sampling)."""
    d = _dims(model)
    kv = d["kv_heads"] * d["head_dim"]
    return {
        "kv_cache": float(rows * (prompt_tokens + max_tokens) * d["layers"] * 2 * kv * _activation_bytes(model)),
        "decode_logits": float(3 * rows * d["vocab"] * 4),
    }


def check_decode_memory(model: nn.Module, rows: int, prompt_tokens: int, max_tokens: int, option: str,
                        lower: str) -> None:
    """Raise ``TooLarge`` (naming ``option``, the estimate and the memory available, and what to
    ``lower``) when decoding ``rows`` completions at once, after prompts of ``prompt_tokens``
    tokens, up to ``max_tokens`` each, would not fit in ``MARGIN`` of the memory available, as a
    training run's rollout is refused (``microbatch.choose``). A KV cache cannot be split; past the
    memory the kernel kills the process without a word. Nothing is checked when the memory
    available is unknown."""
    budget = memory_budget()
    if budget is None:
        return
    est = decode_memory(model, rows, prompt_tokens, max_tokens)
    held = mx.get_active_memory()
    need = held + est["kv_cache"] + est["decode_logits"]
    room = MARGIN * budget
    if need > room:
        raise TooLarge(
            f"{option}: {rows} completions decoded at once need ~{need / GB:.2f} GB (their KV cache "
            f"{est['kv_cache'] / GB:.2f} GB for {prompt_tokens + max_tokens} positions each, the logits "
            f"{est['decode_logits'] / GB:.2f} GB, the model {held / GB:.2f} GB), more than {room / GB:.2f} GB "
            f"({MARGIN:.0%} of the {budget / GB:.2f} GB available); {lower}"
        )


def estimate_total(estimate: Dict[str, float]) -> float:
    """A step's estimated peak: weights and training state, plus the larger of the rollout's KV
    cache and the update's activations (the cache is freed before the update)."""
    rollout = estimate["kv_cache"] + estimate.get("decode_logits", 0.0)
    return estimate["weights"] + estimate["training"] + max(rollout, estimate["activations"])


def memory_report(estimate: Dict[str, float], available: Optional[float], cfg: Config) -> List[str]:
    """One line with the estimate, and a warning with what to lower when it exceeds ``available``."""
    total = estimate_total(estimate)
    parts = ", ".join(f"{k.replace('_', ' ')} {v / GB:.2f}" for k, v in estimate.items())
    have = f"{available / GB:.1f} GB available" if available else "available memory unknown"
    lines = [f"memory: ~{total / GB:.2f} GB estimated for one step ({parts}); {have}"]
    if available and total > available and cfg.train.micro_batch != "auto":  # auto fits it (microbatch.py)
        lines.append(f"warning: this batch may not fit in memory; {lower_settings(cfg)}")
    return lines


def lower_settings(cfg: Config) -> str:
    """Which settings shrink a step's memory, with their current values."""
    r, t = cfg.rollout, cfg.train
    return (
        f"lower rollout.group_size ({r.group_size}), train.prompts_per_step ({t.prompts_per_step}) "
        f"or rollout.max_tokens ({r.max_tokens}), or raise train.grad_accumulation_steps "
        f"({t.grad_accumulation_steps})" + ("" if t.grad_checkpoint else " or set train.grad_checkpoint=true")
    )


# Fragments of the messages MLX's allocators raise (Metal, CUDA, CPU) and Python's own.
_OOM_MESSAGES = ("out of memory", "outofmemory", "insufficient memory", "unable to allocate",
                 "failed to allocate", "bad_alloc", "resource limit", "maximum allowed buffer size")


def is_out_of_memory(e: BaseException) -> bool:
    """Whether ``e`` is an allocation failure (MLX raises them as RuntimeError)."""
    if isinstance(e, MemoryError):
        return True
    return isinstance(e, RuntimeError) and any(m in str(e).lower() for m in _OOM_MESSAGES)


def out_of_memory(e: BaseException, cfg: Config, step: int, last_checkpoint: Optional[Path]) -> OutOfMemory:
    """The one-line error for an allocation failure at ``step``."""
    first = first_line(e)
    resume = ""
    if last_checkpoint is not None:
        resume = (f"; to continue from {last_checkpoint.name} with smaller micro-batches: python cli.py "
                  f"train --resume {cfg.output.dir} --set train.grad_accumulation_steps=N")
    return OutOfMemory(f"out of memory in step {step} ({first}): {lower_settings(cfg)}{resume}")
