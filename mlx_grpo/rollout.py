"""Step 1 of a GRPO step: sample a group of G completions per prompt, all rows decoding together.

Every prompt is prefilled once (and the prefix all prompts share, once: ``prefill.py``); its KV
cache is then repeated for its G rows, so a group shares the prompt's work. All P x G rows decode in one batch with a KV cache; rows that finished (EOS or a stop
string) are dropped from the batch so they stop costing compute. The sampled token ids and their
log-probabilities come out directly: nothing is re-tokenized from decoded text. The per-token
step is compiled (``decode.py``); the bookkeeping per token is a few NumPy operations on the batch.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Set

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import fastmath, native_decode, native_forward
from .config import RolloutConfig
from .decode import COMPACT_FRACTION, DecodeSetupError, EagerDecoder, StaticDecoder, normalized_logprobs
from .forward import batch_cache, body, model_flag, output_head, plain_kv_layers, set_model_flag
from .models import adapters_folded
from .prefill import prefill
from .sampling import Sampler

# Queue each decode step before reading the previous token back (see _decode): None = on a GPU
# only (on this 2-core CPU it measured 0.91-0.99x, the host's bookkeeping and MLX's worker
# thread sharing the cores: benchmarks/decode_pipeline.py); True / False force it.
PIPELINE: Optional[bool] = None

# Draw tokens on the host, in NumPy (sampling.py): None = on the CPU backend, where MLX's exp is
# slow; True / False force it. Host draws evaluate at once, so they never pipeline.
HOST_SAMPLING: Optional[bool] = None

# Decode in C (native_decode.py) where the model and backend allow: None = whenever they do
# (unless MLX_GRPO_NO_NATIVE_DECODE is set); False = always through MLX (the benchmark's A/B).
NATIVE: Optional[bool] = None

# Set on a model whose static decode step failed to build: it decodes with mlx-lm's caches after.
STATIC_FAILED = "static_failed"  # the model flag (forward.model_flag) set when compiled decoding failed


@dataclass
class Rollouts:
    """P prompts x G completions; row r belongs to prompt r // G.

    prompt_tokens: [P, Lp] left-padded prompt ids; left_padding: pad count per prompt.
    tokens: [P*G, Lc] completion ids, right-padded with ``pad_id``; mask: [P*G, Lc] 1.0 on real tokens.
    sample_logprobs: [P*G, Lc] log-prob of each sampled token under the (temperature-scaled)
        sampling distribution; texts: decoded completions (stop string kept, EOS dropped);
    truncated: rows cut at max_tokens without EOS or a stop string.
    """

    prompt_tokens: mx.array
    left_padding: List[int]
    tokens: mx.array
    mask: mx.array
    sample_logprobs: mx.array
    texts: List[str]
    truncated: List[bool]
    group_size: int

    @property
    def lengths(self) -> np.ndarray:
        return np.array(self.mask.sum(axis=1).tolist(), dtype=np.int64)

    def completion_ids(self) -> List[List[int]]:
        """Each row's completion token ids, unpadded (TRL's ``completion_ids`` reward column)."""
        return [t[:n] for t, n in zip(self.tokens.tolist(), self.lengths.tolist())]

    @property
    def row_prompt(self) -> np.ndarray:
        """[P*G]: the index of each row's prompt."""
        return np.arange(self.tokens.shape[0]) // self.group_size


def pad_id(tokenizer: Any) -> int:
    """The id that pads rows: the tokenizer's pad token, else 0 (padding is always masked)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple:
    """Left-pad token lists to one width; returns (array [N, W], padding per row)."""
    width = max(len(s) for s in seqs)
    padding = [width - len(s) for s in seqs]
    return mx.array([[pad_id] * p + list(s) for s, p in zip(seqs, padding)]), padding


def can_repeat(cache: List[Any]) -> bool:
    from mlx_lm.models.cache import BatchKVCache

    return all(type(c) is BatchKVCache for c in cache)


def repeat_cache(cache: List[Any], times: int) -> List[Any]:
    """Repeat every row of a prefilled BatchKVCache ``times`` times (row i -> rows i*times..)."""
    for c in cache:
        c.keys = mx.repeat(c.keys[..., : c._idx, :], times, axis=0)
        c.values = mx.repeat(c.values[..., : c._idx, :], times, axis=0)
        c.offset = mx.repeat(c.offset, times, axis=0)
        c.left_padding = mx.repeat(c.left_padding, times, axis=0)
    return cache


def encode_prompt(tokenizer: Any, text: str) -> List[int]:
    """Token ids of a prompt; no second BOS when a chat template already wrote one."""
    bos = getattr(tokenizer, "bos_token", None)
    return list(tokenizer.encode(text, add_special_tokens=not (bos and text.startswith(bos))))


def stop_token_ids(tokenizer: Any, stops: Sequence[str]) -> tuple:
    """Split stop strings into single-token ids (checked on ids) and the rest (checked on text)."""
    ids: Set[int] = set(int(t) for t in (getattr(tokenizer, "eos_token_ids", None) or []))
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    eos = set(ids)
    text_stops = []
    for s in stops:
        enc = tokenizer.encode(s, add_special_tokens=False)
        if len(enc) == 1 and tokenizer.decode(enc).strip() == s.strip():
            ids.add(enc[0])
        else:
            text_stops.append(s)
    return eos, ids, text_stops


def sample_groups(
    model: nn.Module,
    tokenizer: Any,
    prompts: Sequence[str],
    cfg: RolloutConfig,
    group_size: Optional[int] = None,
    temperature: Optional[float] = None,
    compiled: bool = True,
    keys: Optional[mx.array] = None,
) -> Rollouts:
    """Sample ``group_size`` (default cfg.group_size) completions for each prompt text.

    ``compiled=False`` runs the same static-cache decode step without ``mx.compile`` (same tokens;
    the benchmark measures what compiling buys). Models whose caches don't fit the static buffer
    (sliding windows, recurrent state) decode with mlx-lm's own batch caches; so does a model whose
    static step fails to build or trace, after a one-line warning (once per model). ``keys``
    ([P*G, 2], see ``row_keys``) gives each row its own random stream; without them the rows draw
    from MLX's global PRNG, so a row's sample depends on the rest of the batch.
    """
    # Nothing is differentiated in a rollout (see fastmath.logsumexp), so adapters can be folded:
    # into the C decoder's copy of the weights, else into the model's layers.
    native = compiled and decodes_in_c(model)
    with fastmath.eager(), contextlib.nullcontext() if native else adapters_folded(model):
        return _sample_groups(model, tokenizer, prompts, cfg, group_size, temperature, compiled, keys, native)


def decodes_in_c(model: nn.Module) -> bool:
    """True when this model's compiled rollouts decode in C (``native_decode``) here: the switch
    (``NATIVE``, ``MLX_GRPO_NO_NATIVE_DECODE``) allows it, the backend and model fit, and so does
    the copy of the weights."""
    wanted = NATIVE if NATIVE is not None else not os.environ.get(native_decode.OFF)
    return bool(wanted and plain_kv_layers(model) and native_decode.unsupported(model) is None
                and native_decode.fits_memory(model))


def _sample_groups(model, tokenizer, prompts, cfg, group_size, temperature, compiled, keys, native) -> Rollouts:
    G = cfg.group_size if group_size is None else group_size
    temp = cfg.temperature if temperature is None else temperature
    inv_t = 1.0 / temp if temp > 0 else 1.0
    pad = pad_id(tokenizer)
    prompt_tokens, left_padding = left_pad([encode_prompt(tokenizer, p) for p in prompts], pad)
    if native:
        logits, decoder = _start_native(model, prompt_tokens, left_padding, G, cfg.max_tokens, inv_t)
        return _decode(logits, decoder, tokenizer, prompt_tokens, left_padding, cfg, G, temp, pad, keys)
    if plain_kv_layers(model) and not model_flag(model, STATIC_FAILED, lambda: False):
        try:
            logits, decoder = _start_static(model, prompt_tokens, left_padding, G, cfg.max_tokens, inv_t, compiled)
            return _decode(logits, decoder, tokenizer, prompt_tokens, left_padding, cfg, G, temp, pad, keys)
        except DecodeSetupError as e:
            print(f"warning: compiled decoding does not fit {type(model).__name__} ({e}); "
                  "decoding with mlx-lm's caches, uncompiled, from now on", file=sys.stderr)
            set_model_flag(model, STATIC_FAILED, True)
    logits, decoder = _start_eager(model, prompt_tokens, left_padding, G, inv_t)
    return _decode(logits, decoder, tokenizer, prompt_tokens, left_padding, cfg, G, temp, pad, keys)


def _prefill_prompts(model, prompt_tokens, left_padding):
    """Prefill (shared prefix once, each prompt once): each prompt's next-token logits [U, vocab]
    and its per-layer cache."""
    head = output_head(model)
    last, cache = prefill(model, body(model, head), prompt_tokens, left_padding)
    return (head.logits(last) if head is not None else last)[:, -1, :], cache


def _start_static(model, prompt_tokens, left_padding, G, max_new, inv_t, compiled):
    """Prefill, repeat each prompt's cache for its G rows, and a static-buffer decoder over it."""
    logits, cache = _prefill_prompts(model, prompt_tokens, left_padding)
    rows = mx.repeat(mx.arange(prompt_tokens.shape[0]), G)
    for c in cache:
        c.take_rows(rows)
    return logits[rows], StaticDecoder(model, cache, max_new, inv_t, compiled)


def _start_native(model, prompt_tokens, left_padding, G, max_new, inv_t):
    """Prefill in C, and the C decoder over each prompt's keys and values (shared by its G rows)
    and a copy of the weights with the adapters folded in."""
    last, prompts = native_forward.prefill(model, prompt_tokens, left_padding)
    logits = output_head(model).logits(last)[:, -1, :]
    decoder = native_decode.NativeDecoder(native_decode.NativeWeights(model, native_decode.library()), prompts, G, max_new, inv_t)
    return mx.repeat(logits, G, axis=0), decoder


def _start_eager(model, prompt_tokens, left_padding, G, inv_t):
    """Prefill with mlx-lm's batch caches (each prompt once where the cache can be repeated)."""
    cache = batch_cache(model, left_padding)
    logits = model(prompt_tokens, cache=cache)[:, -1, :]
    if can_repeat(cache):
        cache = repeat_cache(cache, G)
        logits = mx.repeat(logits, G, axis=0)
    else:  # e.g. sliding-window caches: prefill every row instead
        cache = batch_cache(model, [p for p in left_padding for _ in range(G)])
        logits = model(mx.repeat(prompt_tokens, G, axis=0), cache=cache)[:, -1, :]
    return logits, EagerDecoder(model, cache, inv_t)


def _decode(logits, decoder, tokenizer, prompt_tokens, left_padding, cfg, G, temp, pad_id, keys) -> Rollouts:
    """Sample up to ``cfg.max_tokens`` tokens for every row, from the prefilled ``logits``."""
    n_rows = logits.shape[0]
    eos_ids, stop_ids, text_stops = stop_token_ids(tokenizer, cfg.stop)
    # The decoder hands the sampler log-probs already divided by T (what the rollout records).
    host = fastmath.on_cpu() if HOST_SAMPLING is None else HOST_SAMPLING
    sampler = Sampler(cfg, temp, keys, host=host)
    inv_t = 1.0 / temp if temp > 0 else 1.0
    # Eager steps drop finished rows at once; a compiled step traces again for each batch size, and
    # the C step's products read the weights once whatever the rows (dropping rows copies their
    # keys and values): both wait for a quarter of the batch.
    batched = isinstance(decoder, (StaticDecoder, native_decode.NativeDecoder))
    min_dead = max(1, int(COMPACT_FRACTION * n_rows)) if batched else 1

    # Per-row bookkeeping in NumPy arrays, indexed by the batch's row ids: no per-row Python per
    # token (except decoding text for multi-token stop strings).
    stop_arr = np.array(sorted(stop_ids), dtype=np.int64)
    tokens = np.full((n_rows, cfg.max_tokens), pad_id, dtype=np.int32)
    logps = np.zeros((n_rows, cfg.max_tokens), dtype=np.float32)
    lengths = np.zeros(n_rows, dtype=np.int64)
    truncated = np.ones(n_rows, dtype=bool)
    active = np.arange(n_rows)  # row id of each batch slot
    live = np.ones(n_rows, dtype=bool)  # per batch slot: still generating

    # Pipelined like mlx-lm's generate: the next token's step is queued (async_eval) before this
    # token is read back, so the device decodes while the host keeps the books; the rows this
    # token finishes ride along once (their output is dropped; each row's own key keeps the draws
    # the same). Never where the decode step's log-softmax evaluates at once (NumPy's,
    # fastmath.evaluates): nothing would overlap there, and the last step queued would be wasted.
    ahead = ((not fastmath.on_cpu() if PIPELINE is None else PIPELINE) and not fastmath.evaluates(logits.size)
             and not host)
    y, lp = sampler(normalized_logprobs(logits, inv_t))
    for step in range(cfg.max_tokens):
        last = step == cfg.max_tokens - 1
        if ahead and not last:
            y_next, lp_next = sampler(decoder.step(y))
            mx.async_eval(y_next, lp_next)
        mx.eval(y, lp)  # one evaluation for both (each np.array would wait for its own)
        ys, lps = np.array(y, dtype=np.int64), np.array(lp)
        rows = active[live]
        tokens[rows, step] = ys[live]
        logps[rows, step] = lps[live]
        lengths[rows] = step + 1
        done = np.zeros(len(active), dtype=bool)
        done[live] = np.isin(ys[live], stop_arr)
        if text_stops:
            for j in np.flatnonzero(live & ~done):
                r = active[j]
                tail = tokenizer.decode(tokens[r, max(0, step - 15) : step + 1].tolist())
                done[j] = any(st in tail for st in text_stops)
        truncated[active[done]] = False
        live &= ~done
        if not live.any() or last:
            break
        if not ahead:
            y_next, lp_next = y, lp
        if len(live) - live.sum() >= min(min_dead, len(live)):
            kept = np.flatnonzero(live)
            idx = mx.array(kept.astype(np.int32))
            decoder.keep(idx)
            y_next, lp_next = y_next[idx], lp_next[idx]
            active, live = active[kept], live[kept]
            sampler.keep(idx)
        y, lp = (y_next, lp_next) if ahead else sampler(decoder.step(y_next))

    width = max(1, int(lengths.max()))
    tokens, logps = tokens[:, :width], logps[:, :width]
    mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.float32)
    texts = []
    for r in range(n_rows):
        n = int(lengths[r])
        shown = tokens[r, : n - 1] if n and int(tokens[r, n - 1]) in eos_ids else tokens[r, :n]
        texts.append(tokenizer.decode(shown.tolist()))
    return Rollouts(
        prompt_tokens=prompt_tokens,
        left_padding=left_padding,
        tokens=mx.array(tokens),
        mask=mx.array(mask),
        sample_logprobs=mx.array(logps),
        texts=texts,
        truncated=truncated.tolist(),
        group_size=G,
    )
