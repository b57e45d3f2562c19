"""DAPO's dynamic sampling: sample more prompt groups until the step has enough with reward spread.

A group whose G rewards are all equal has zero advantages: it carries no policy gradient, so a
step with many such groups learns from fewer rows. DAPO (arXiv 2503.14476, section 3.2) keeps
drawing batches of prompts, keeps the groups whose rewards differ, and stops when it has the
batch's number of groups. Here the draws are capped (``grpo.dynamic_sampling_max_draws``
batches per step); a step that is still short is filled with flat groups, in the order drawn,
and the shortfall is logged (``dynamic_short``), so a step always has ``prompts_per_step`` groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Sequence, Tuple

import mlx.core as mx
import numpy as np

from .rewards import Rewards
from .rollout import Rollouts


@dataclass
class Drawn:
    """One or more draws of prompt groups: the dataset rows, rendered prompts, rollouts and
    rewards (row r of the rollouts belongs to prompt r // G), and the seconds spent on each."""

    rows: List[Dict[str, Any]]
    prompts: List[str]
    ro: Rollouts
    rw: Rewards
    generate_time: float = 0.0
    reward_time: float = 0.0


def spread_groups(total: np.ndarray, group_size: int) -> np.ndarray:
    """[P] bool: the groups whose rewards are not all equal."""
    groups = np.asarray(total).reshape(-1, group_size)
    return groups.max(axis=1) > groups.min(axis=1)


def _pad_right(a: mx.array, width: int, value: float) -> mx.array:
    if a.shape[1] == width:
        return a
    return mx.concatenate([a, mx.full((a.shape[0], width - a.shape[1]), value, dtype=a.dtype)], axis=1)


def concat_rollouts(parts: Sequence[Rollouts], pad_id: int) -> Rollouts:
    """One Rollouts of several (same G): prompts left-padded to one width, completions right-padded."""
    lp = max(p.prompt_tokens.shape[1] for p in parts)
    lc = max(p.tokens.shape[1] for p in parts)
    prompts, padding = [], []
    for p in parts:
        extra = lp - p.prompt_tokens.shape[1]
        pad = mx.full((p.prompt_tokens.shape[0], extra), pad_id, dtype=p.prompt_tokens.dtype)
        prompts.append(mx.concatenate([pad, p.prompt_tokens], axis=1) if extra else p.prompt_tokens)
        padding += [x + extra for x in p.left_padding]
    return Rollouts(
        prompt_tokens=mx.concatenate(prompts, axis=0),
        left_padding=padding,
        tokens=mx.concatenate([_pad_right(p.tokens, lc, pad_id) for p in parts], axis=0),
        mask=mx.concatenate([_pad_right(p.mask, lc, 0.0) for p in parts], axis=0),
        sample_logprobs=mx.concatenate([_pad_right(p.sample_logprobs, lc, 0.0) for p in parts], axis=0),
        texts=[t for p in parts for t in p.texts],
        truncated=[t for p in parts for t in p.truncated],
        group_size=parts[0].group_size,
    )


def take_groups(d: Drawn, groups: np.ndarray) -> Drawn:
    """The draw restricted to prompt groups ``groups`` (in that order)."""
    G = d.ro.group_size
    rows_idx = (groups[:, None] * G + np.arange(G)[None, :]).reshape(-1)
    g, r = mx.array(groups.astype(np.int32)), mx.array(rows_idx.astype(np.int32))
    ro = d.ro
    width = max(1, int(ro.mask[r].sum(axis=1).max().item()))
    ro = Rollouts(
        prompt_tokens=ro.prompt_tokens[g],
        left_padding=[ro.left_padding[i] for i in groups],
        tokens=ro.tokens[r][:, :width],
        mask=ro.mask[r][:, :width],
        sample_logprobs=ro.sample_logprobs[r][:, :width],
        texts=[ro.texts[i] for i in rows_idx],
        truncated=[ro.truncated[i] for i in rows_idx],
        group_size=G,
    )
    rw = Rewards({k: v[rows_idx] for k, v in d.rw.columns.items()}, d.rw.total[rows_idx])
    return Drawn([d.rows[i] for i in groups], [d.prompts[i] for i in groups], ro, rw,
                 d.generate_time, d.reward_time)


def concat_drawn(parts: Sequence[Drawn], pad_id: int) -> Drawn:
    """One Drawn of several, in order."""
    return Drawn(
        rows=[r for p in parts for r in p.rows],
        prompts=[q for p in parts for q in p.prompts],
        ro=concat_rollouts([p.ro for p in parts], pad_id),
        rw=Rewards({k: np.concatenate([p.rw.columns[k] for p in parts]) for k in parts[0].rw.columns},
                   np.concatenate([p.rw.total for p in parts])),
        generate_time=sum(p.generate_time for p in parts),
        reward_time=sum(p.reward_time for p in parts),
    )


def fill_with_spread(
    first: Drawn, draw: Callable[[int], Drawn], target: int, max_draws: int, pad_id: int
) -> Tuple[Drawn, Dict[str, float]]:
    """DAPO dynamic sampling: ``draw(d)`` for d = 1, 2, ... (after ``first``, draw 0) until
    ``target`` groups have reward spread or ``max_draws`` draws were made.

    Returns the step's ``target`` groups (spread groups first, in draw order, then flat ones if
    short) and the log: draws made, groups sampled, spread groups found, the shortfall, and the
    share of flat groups among all sampled (the ``zero_std_groups`` of what was drawn).
    """
    G = first.ro.group_size
    parts = [first]
    found = int(spread_groups(first.rw.total, G).sum())
    while found < target and len(parts) < max_draws:
        parts.append(draw(len(parts)))
        found += int(spread_groups(parts[-1].rw.total, G).sum())
    every = concat_drawn(parts, pad_id) if len(parts) > 1 else first
    spread = spread_groups(every.rw.total, G)
    order = np.concatenate([np.flatnonzero(spread), np.flatnonzero(~spread)])[:target]
    log = {
        "dynamic_draws": float(len(parts)),
        "dynamic_groups_sampled": float(spread.size),
        "dynamic_spread_groups": float(spread.sum()),
        "dynamic_short": float(max(0, target - int(spread.sum()))),
        "zero_std_groups": float(1.0 - spread.mean()),
    }
    return take_groups(every, order), log
