"""One GRPO step, as named stages in the algorithm's order:

    drawn   = draw_groups(policy, ...)  # 1. rollout: G completions per prompt   (roll_out)
                                        # 2. rewards: rule-based, per completion  (reward)
    cols    = gather_columns(drawn)     #    every process's rows, by column name
    sel     = advantages(cols, ...)     # 3. group-relative advantages; the rows in the loss
    score_batch(...)                    # 4. reference and old-policy logprobs      (learner.py)
    learn(...)                          #    clipped surrogate + KL, num_iterations times
    step_metrics(...), step_samples(...)   # 5. what the run log records

A ``StageTimer`` times the stages: "generate" (1), "reward" (2), "score" (the gather, 3 and the
logprobs of 4), "update" (the updates of 4) and "step" (all of it); step_metrics turns them into
step_time and the time_* figures. With ``grpo.dynamic_sampling`` stages 1-2 repeat on more prompts
(dynamic_sampling.py). Under ``mlx.launch`` each process rolls out and learns from its share of
the prompts; the advantages and metrics are computed on every process's rows, gathered
(distributed.py).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, NamedTuple, Optional, Tuple

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from . import distributed
from .advantages import flat_groups, group_advantages
from .config import Config
from .learner import learn, micro_size, score_batch, select_rows, step_normalizer
from .loss import Normalizer, counted_tokens, rows_in_loss
from .policy import Policy
from .rewards import Rewards, score
from .rollout import Rollouts, pad_id, sample_groups
from .sampling import row_keys
from .dynamic_sampling import Drawn, fill_with_spread
from .tasks import columns


class StageTimer(dict[str, float]):
    """Seconds per named stage of one step: ``with timer("score"):`` adds the block's time to
    "score", ``add`` adds seconds measured elsewhere (dynamic sampling's draws), and ``finish``
    records "step", the time since the timer was made."""

    def __init__(self) -> None:
        super().__init__()
        self.started = time.perf_counter()

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.add(stage, time.perf_counter() - t)

    def add(self, stage: str, seconds: float) -> None:
        """Add ``seconds`` to ``stage`` (a stage timed more than once adds up)."""
        self[stage] = self.get(stage, 0.0) + seconds

    def finish(self) -> "StageTimer":
        """Record "step": the seconds since the timer was made; returns the timer."""
        self["step"] = time.perf_counter() - self.started
        return self


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
    policy: Policy, rows: List[Dict[str, Any]], cfg: Config, keys: Optional[mx.array]
) -> Tuple[List[str], Rollouts]:
    """Stage 1: the rendered prompts of ``rows`` and G completions of each from the policy."""
    prompts = policy.prompter.prompts(rows)
    return prompts, sample_groups(policy.model, policy.tokenizer, prompts, cfg.rollout, keys=keys)


def reward(policy: Policy, rows: List[Dict[str, Any]], prompts: List[str], ro: Rollouts, cfg: Config) -> Rewards:
    """Stage 2: every completion scored by the policy's rewards on the whole response (the
    template's response prefix + the completion), with its row's dataset columns."""
    G = cfg.rollout.group_size
    responses = policy.prompter.responses(ro.texts)
    cols = {**columns([r for r in rows for _ in range(G)]), "completion_ids": ro.completion_ids()}
    return score([p for p in prompts for _ in range(G)], responses, cols, policy.reward_fns, cfg.rewards)


def draw_groups(policy: Policy, rows: List[Dict[str, Any]], cfg: Config, keys: Optional[mx.array]) -> Drawn:
    """Stages 1 and 2 for ``rows``, each timed (``Drawn.generate_time``, ``Drawn.reward_time``)."""
    timer = StageTimer()
    with timer("generate"):
        prompts, ro = roll_out(policy, rows, cfg, keys)
    with timer("reward"):
        rw = reward(policy, rows, prompts, ro, cfg)
    return Drawn(list(rows), prompts, ro, rw, timer["generate"], timer["reward"])


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
    policy: Policy,
    opt: optim.Optimizer,
    rows: List[Dict[str, Any]],
    cfg: Config,
    key: Optional[mx.array] = None,
    more_rows: Optional[Callable[[], List[Dict[str, Any]]]] = None,
) -> StepOutput:
    """One GRPO step of ``policy`` on the global batch ``rows``; returns its metrics and samples.

    ``policy`` (policy.py) gives the model trained, its tokenizer, the KL reference (None: the
    model with its adapters switched off), the prompt template and the reward functions; the
    rewards' weights are ``cfg.rewards``.

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
    timer = StageTimer()

    # 1-2. Rollouts from the current policy, and their rewards; DAPO draws more prompts if asked.
    policy.model.eval()
    keys = None if key is None else row_keys(key, len(rows), G)[lo:hi]
    drawn = draw_groups(policy, rows[part], cfg, keys)
    extra: Dict[str, float] = {}
    if cfg.grpo.dynamic_sampling:  # one process (checked at the start of train)
        def draw(d: int) -> Drawn:
            more = more_rows()
            k = None if key is None else row_keys(mx.random.split(key, cfg.grpo.dynamic_sampling_max_draws)[d], len(more), G)
            return draw_groups(policy, more, cfg, k)

        drawn, extra = fill_with_spread(drawn, draw, len(rows), cfg.grpo.dynamic_sampling_max_draws, pad_id(policy.tokenizer))
    hi = lo + len(drawn.rows) * G  # dynamic sampling: the step's groups as drawn
    timer.add("generate", drawn.generate_time)  # every draw's
    timer.add("reward", drawn.reward_time)

    # The "score" stage also holds the gather and the advantages (3): small, but under mlx.launch
    # the gather waits for the slowest process's rollouts.
    with timer("score"):
        # 3. Group-relative advantages, over every process's rows (each one's own come back sliced).
        cols = gather_columns(drawn)
        sel = advantages(cols, cfg, lo, hi)
        # 4. Reference and old-policy logprobs of this process's rows in the loss ...
        batch = select_rows(drawn.ro, sel.adv, sel.keep) if sel.keep.size else None  # None: adds zeros
        if batch is not None:
            score_batch(policy.model, batch, cfg, micro, policy.reference)

    # ... then num_iterations clipped updates, on every process when any process has rows in the loss.
    upd: Dict[str, float] = {}
    with timer("update"):
        if sel.keep_all.size:
            upd = learn(policy.model, opt, batch, cfg, sel.norm)

    # 5. What the run log records.
    metrics = step_metrics(cols, upd, int(sel.keep_all.size), G, timer.finish(), extra)
    return StepOutput(metrics, step_samples(drawn, sel.adv, G))


def step_metrics(
    cols: Columns, upd: Dict[str, float], rows_updated: int, G: int, times: Mapping[str, float],
    extra: Dict[str, float],
) -> Dict[str, Any]:
    """The step's metrics record: rewards and lengths of every process's rows, the update's
    figures (``upd``, empty when no row was in the loss), and the seconds of each stage
    (``times``, a ``StageTimer``'s: "generate", "reward", "score", "update" and "step")."""
    total, lengths, truncated = cols.total, cols.lengths, cols.truncated
    n_tokens = int(lengths.sum())
    generate_time = float(distributed.gather(np.array([times["generate"]])).max())  # the slowest process's
    return {
        "loss": upd.get("loss", 0.0),
        "reward_mean": float(total.mean()),
        "reward_std": float(total.std()),
        **{f"rewards/{k}": v for k, v in Rewards(cols.rewards, total).means().items()},
        # None (null) when no row entered the loss (skip_zero_advantage on a step of flat groups):
        # nothing was measured, and a 0 would read as "the policy sits on the reference".
        "kl": upd.get("kl"),
        "clip_fraction": upd.get("clip_fraction"),
        "clip_low": upd.get("clip_low"),
        "clip_high": upd.get("clip_high"),
        "ratio_mean": upd.get("ratio_mean"),
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
        "step_time": times["step"],
        "time_generate": generate_time,
        "time_reward": times["reward"],
        "time_score": times["score"],
        "time_update": times["update"],
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
