"""One GRPO step, as named stages in the algorithm's order:

    drawn   = draw_groups(...)        # 1. rollout: G completions per prompt   (roll_out)
                                      # 2. rewards: rule-based, per completion  (reward)
    cols    = gather_columns(drawn)   #    every process's rows, by column name
    sel     = advantages(cols, ...)   # 3. group-relative advantages; the rows in the loss
    learn(...)                        # 4. clipped surrogate + KL, num_iterations times (learner.py)
    step_metrics(...), step_samples(...)   # 5. what the run log records

With ``grpo.dynamic_sampling`` stages 1-2 repeat on more prompts (dynamic_sampling.py). Under
``mlx.launch`` each process rolls out and learns from its share of the prompts; the advantages
and metrics are computed on every process's rows, gathered (distributed.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from . import distributed
from .advantages import flat_groups, group_advantages
from .config import Config
from .learner import learn, micro_size, select_rows, step_normalizer
from .loss import Normalizer, counted_tokens, rows_in_loss
from .rewards import Rewards, score
from .rollout import Rollouts, pad_id, row_keys, sample_groups
from .dynamic_sampling import Drawn, fill_with_spread
from .tasks import columns
from .tasks.templates import Prompter


class StepOutput(NamedTuple):
    """What a step gives the run log: its metrics, and a few of this process's rows as samples."""

    metrics: Dict[str, Any]
    samples: List[Dict[str, Any]]


@dataclass
class Columns:
    """Every process's rows of the step, in the step's row order, each figure a named column."""

    total: np.ndarray  # the weighted reward
    lengths: np.ndarray  # completion tokens
    truncated: np.ndarray  # 1.0 where cut at max_tokens
    entropy: np.ndarray  # -sum of the sampled tokens' logprobs
    rewards: Dict[str, np.ndarray]  # each reward function's own column (NaN: no opinion)


@dataclass
class Selection:
    """Stage 3's result: advantages, the rows in the loss and the step's normaliser."""

    adv_all: np.ndarray  # every process's rows
    keep_all: np.ndarray  # indices (over every process's rows) of the rows in the loss
    adv: np.ndarray  # this process's rows
    keep: np.ndarray  # this process's rows in the loss (its own indices)
    norm: Normalizer


def roll_out(
    model: nn.Module, tokenizer: Any, rows: List[Dict[str, Any]], cfg: Config, prompter: Prompter,
    keys: Optional[mx.array],
) -> Tuple[List[str], Rollouts]:
    """Stage 1: the rendered prompts of ``rows`` and G completions of each from the policy."""
    prompts = prompter.prompts(rows)
    return prompts, sample_groups(model, tokenizer, prompts, cfg.rollout, keys=keys)


def reward(
    rows: List[Dict[str, Any]], prompts: List[str], ro: Rollouts, cfg: Config, prompter: Prompter,
    reward_fns: Dict[str, Callable],
) -> Rewards:
    """Stage 2: every completion scored on the whole response (the template's response prefix +
    the completion), with its row's dataset columns."""
    G = cfg.rollout.group_size
    responses = prompter.responses(ro.texts)
    cols = {**columns([r for r in rows for _ in range(G)]), "completion_ids": ro.completion_ids()}
    return score([p for p in prompts for _ in range(G)], responses, cols, reward_fns, cfg.rewards)


def draw_groups(
    model: nn.Module,
    tokenizer: Any,
    rows: List[Dict[str, Any]],
    cfg: Config,
    prompter: Prompter,
    reward_fns: Dict[str, Callable],
    keys: Optional[mx.array],
) -> Drawn:
    """Stages 1 and 2 for ``rows``, timed."""
    t0 = time.perf_counter()
    prompts, ro = roll_out(model, tokenizer, rows, cfg, prompter, keys)
    t1 = time.perf_counter()
    rw = reward(rows, prompts, ro, cfg, prompter, reward_fns)
    return Drawn(list(rows), prompts, ro, rw, t1 - t0, time.perf_counter() - t1)


def gather_columns(drawn: Drawn) -> Columns:
    """Every process's rows of the step (``drawn`` is this process's), gathered in one exchange."""
    ro, rw = drawn.ro, drawn.rw
    entropy_terms = -(ro.sample_logprobs * ro.mask).sum(axis=1)
    fixed = [rw.total, ro.lengths, ro.truncated, np.array(entropy_terms.tolist())]
    table = distributed.gather(np.column_stack([*fixed, *rw.columns.values()]))
    n = len(fixed)
    return Columns(table[:, 0], table[:, 1], table[:, 2], table[:, 3],
                   {k: table[:, n + i] for i, k in enumerate(rw.columns)})


def advantages(cols: Columns, cfg: Config, lo: int, hi: int) -> Selection:
    """Stage 3: group-relative advantages over every process's rows, the rows in the loss, and
    the normaliser of the whole step; this process's rows are ``lo:hi`` of the step's."""
    adv_all = group_advantages(cols.total, cfg.rollout.group_size, cfg.grpo.scale_rewards)
    keep_all = np.flatnonzero(rows_in_loss(adv_all, cols.truncated, cfg.grpo))
    keep = keep_all[(keep_all >= lo) & (keep_all < hi)] - lo
    per_process = np.bincount(keep_all // (hi - lo), minlength=distributed.size())
    # Every completion counts in the normaliser, in the update or not (the paper's, TRL's).
    tokens = counted_tokens(cols.lengths, cols.truncated, cfg.grpo)
    norm = step_normalizer(per_process.tolist(), tokens, cfg, adv_all.size)
    return Selection(adv_all, keep_all, adv_all[lo:hi], keep, norm)


def grpo_step(
    model: nn.Module,
    tokenizer: Any,
    opt: optim.Optimizer,
    rows: List[Dict[str, Any]],
    cfg: Config,
    prompter: Prompter,
    reward_fns: Dict[str, Callable],
    ref_model: Optional[nn.Module] = None,
    key: Optional[mx.array] = None,
    more_rows: Optional[Callable[[], List[Dict[str, Any]]]] = None,
) -> StepOutput:
    """One GRPO step on the global batch ``rows``; returns its metrics and samples.

    With ``grpo.dynamic_sampling``, ``more_rows()`` gives the next batch of prompts whenever the
    step needs more groups with reward spread (dynamic_sampling.py); "dynamic_draws" counts the batches.

    This process samples and learns from its share of ``rows`` (all of them when run alone); the
    advantages and metrics are computed on every process's rows, gathered. With ``key`` (see
    ``trainer.sampling_key``) each row samples from its own stream, the same however ``rows`` is split.
    """
    G = cfg.rollout.group_size
    part = distributed.shard(len(rows))
    lo, hi = part.start * G, part.stop * G  # this process's rows in the step's row order
    micro = micro_size(len(rows[part]) * G, cfg.train)
    t0 = time.perf_counter()

    # 1-2. Rollouts from the current policy, and their rewards; DAPO draws more prompts if asked.
    model.eval()
    keys = None if key is None else row_keys(key, len(rows), G)[lo:hi]
    drawn = draw_groups(model, tokenizer, rows[part], cfg, prompter, reward_fns, keys)
    extra: Dict[str, float] = {}
    if cfg.grpo.dynamic_sampling:  # one process (checked at the start of train)
        def draw(d: int) -> Drawn:
            more = more_rows()
            k = None if key is None else row_keys(mx.random.split(key, cfg.grpo.dynamic_sampling_max_draws)[d], len(more), G)
            return draw_groups(model, tokenizer, more, cfg, prompter, reward_fns, k)

        drawn, extra = fill_with_spread(drawn, draw, len(rows), cfg.grpo.dynamic_sampling_max_draws, pad_id(tokenizer))
    hi = lo + len(drawn.rows) * G  # dynamic sampling: the step's groups as drawn
    t1 = t0 + drawn.generate_time
    t2 = t1 + drawn.reward_time

    # 3. Group-relative advantages, over every process's rows (each one's own come back sliced).
    cols = gather_columns(drawn)
    sel = advantages(cols, cfg, lo, hi)

    # 4. Reference and old-policy logprobs, then num_iterations clipped updates.
    upd: Dict[str, float] = {}
    t3 = t4 = time.perf_counter()
    if sel.keep_all.size:
        batch = select_rows(drawn.ro, sel.adv, sel.keep) if sel.keep.size else None  # None: adds zeros
        upd, t3 = learn(model, opt, batch, cfg, sel.norm, micro, ref_model)
        t4 = time.perf_counter()

    # 5. What the run log records.
    metrics = step_metrics(cols, upd, int(sel.keep_all.size), G, (t0, t1, t2, t3, t4), extra)
    return StepOutput(metrics, step_samples(drawn, sel.adv, G))


def step_metrics(
    cols: Columns, upd: Dict[str, float], rows_updated: int, G: int, times: Sequence[float],
    extra: Dict[str, float],
) -> Dict[str, Any]:
    """The step's metrics record: rewards and lengths of every process's rows, the update's
    figures (``upd``, empty when no row was in the loss), and the time of each stage (``times``:
    perf_counter at the start and after stages 1, 2, the logprobs of 4, and 4)."""
    t0, t1, t2, t3, t4 = times
    total, lengths, truncated = cols.total, cols.lengths, cols.truncated
    n_tokens = int(lengths.sum())
    generate_time = float(distributed.gather(np.array([t1 - t0])).max())  # the slowest process's
    return {
        "loss": upd.get("loss", 0.0),
        "reward_mean": float(total.mean()),
        "reward_std": float(total.std()),
        **{f"rewards/{k}": v for k, v in Rewards(cols.rewards, total).means().items()},
        "kl": upd.get("kl", 0.0),
        "clip_fraction": upd.get("clip_fraction", 0.0),
        "clip_low": upd.get("clip_low", 0.0),
        "clip_high": upd.get("clip_high", 0.0),
        "ratio_mean": upd.get("ratio_mean", 1.0),
        "grad_norm": upd.get("grad_norm", 0.0),
        "skipped_updates": upd.get("skipped", 0.0),
        # Mean -log p of the sampled tokens: a Monte-Carlo estimate of the per-token entropy of the
        # (temperature-scaled) policy, free because the rollout kept the logprobs.
        "entropy": float(cols.entropy.sum()) / max(n_tokens, 1),
        "completion_length": float(lengths.mean()),
        "truncated_rate": float(np.mean(truncated)),
        "zero_std_groups": float(np.mean(flat_groups(total, G))),
        "rows_updated": rows_updated,
        "tokens": n_tokens,
        "tokens_per_sec": n_tokens / max(generate_time, 1e-9),
        "step_time": t4 - t0,
        "time_generate": generate_time,
        "time_reward": t2 - t1,
        "time_score": t3 - t2,
        "time_update": t4 - t3,
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
        **extra,  # dynamic sampling's log; its zero_std_groups counts every group it sampled
    }


def step_samples(drawn: Drawn, adv: np.ndarray, G: int) -> List[Dict[str, Any]]:
    """About four of this process's rows, spread over the step, for samples.jsonl."""
    rows, ro, rw = drawn.rows, drawn.ro, drawn.rw
    return [
        {"prompt": rows[i // G]["prompt"], "completion": ro.texts[i], "reward": float(rw.total[i]),
         "rewards": {k: (None if np.isnan(v[i]) else float(v[i])) for k, v in rw.columns.items()},
         "advantage": float(adv[i]), "answer": rows[i // G].get("answer")}
        for i in range(0, len(ro.texts), max(1, len(ro.texts) // 4))
    ]
