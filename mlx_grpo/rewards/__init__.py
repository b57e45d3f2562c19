"""Step 2 of the seed: score completions with rule-based rewards.

A reward is any callable ``fn(prompts, completions, **columns) -> list[float | None]`` (TRL's reward
signature), where ``columns`` carries the dataset's other fields (e.g. ``answer``). ``None`` means
"not applicable": it is left out of that reward's mean and counts 0 in the total. Built-ins are
named in ``BUILTIN``; a user reward is named ``path/to/file.py:function`` or ``package.module:fn``.

Policy for a broken reward: a reward that raises, returns the wrong number of values, or returns
NaN/inf stops the run with a ``RewardError`` naming the reward and the offending sample. Silently
scoring it as zero would train on a wrong signal.

Rewards work on strings only (no mlx, no model), so reward experiments start instantly.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

from .accuracy import accuracy_reward, lenient_accuracy_reward
from .format import format_reward, soft_format_reward, tag_count_reward

RewardFn = Callable[..., List[Optional[float]]]

BUILTIN: Dict[str, RewardFn] = {
    "accuracy": accuracy_reward,
    "lenient_accuracy": lenient_accuracy_reward,
    "format": format_reward,
    "soft_format": soft_format_reward,
    "tag_count": tag_count_reward,
}


class RewardError(ValueError):
    """A reward that cannot be loaded or returned something unusable; the message names it."""


def load_reward(name: str) -> RewardFn:
    """A built-in by name, or a user callable from ``file.py:fn`` or ``module:fn``."""
    if name in BUILTIN:
        return BUILTIN[name]
    if ":" not in name:
        raise RewardError(
            f"rewards.{name}: unknown reward (built-ins: {', '.join(sorted(BUILTIN))}; "
            "user rewards are named path/to/file.py:function or package.module:function)"
        )
    target, fn_name = name.rsplit(":", 1)
    try:
        if target.endswith(".py"):
            path = Path(target)
            if not path.is_file():
                raise RewardError(f"rewards.{name}: file {target} not found")
            spec = importlib.util.spec_from_file_location(f"mlx_grpo_user_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            module = importlib.import_module(target)
    except RewardError:
        raise
    except Exception as e:  # an import error in user code, reported in one line
        raise RewardError(f"rewards.{name}: cannot import {target}: {type(e).__name__}: {e}") from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise RewardError(f"rewards.{name}: {target} has no function {fn_name!r}")
    return fn


def load_rewards(names: Sequence[str]) -> Dict[str, RewardFn]:
    """Resolve every configured reward up front, so a typo fails before any model loads."""
    return {name: load_reward(name) for name in names}


@dataclass
class Rewards:
    """Per-reward columns (NaN where not applicable) and the weighted total per completion."""

    columns: Dict[str, np.ndarray]
    total: np.ndarray

    def means(self) -> Dict[str, float]:
        """Each reward's mean over the completions where it applies (NaN if none)."""
        out = {}
        for k, v in self.columns.items():
            ok = ~np.isnan(v)
            out[k] = float(v[ok].mean()) if ok.any() else float("nan")
        return out


def score(
    prompts: Sequence[str],
    completions: Sequence[str],
    columns: Mapping[str, Sequence[Any]],
    reward_fns: Mapping[str, RewardFn],
    weights: Mapping[str, float],
) -> Rewards:
    """Run every reward on every completion; total = sum of weight * reward (None counts 0)."""
    n = len(completions)
    cols: Dict[str, np.ndarray] = {}
    for name, fn in reward_fns.items():
        try:
            values = fn(list(prompts), list(completions), **{k: list(v) for k, v in columns.items()})
        except Exception as e:
            raise RewardError(
                f"reward {name} raised {type(e).__name__}: {e} (first completion: {completions[0]!r})"
            ) from e
        if values is None or len(values) != n:
            got = "None" if values is None else f"{len(values)} values"
            raise RewardError(f"reward {name} returned {got} for {n} completions")
        col = np.full(n, np.nan)
        for i, v in enumerate(values):
            if v is None:
                continue
            try:
                f = float(v)
            except (TypeError, ValueError):
                raise RewardError(
                    f"reward {name} returned {v!r} (not a number) for completion {i}: {completions[i]!r}"
                ) from None
            if not math.isfinite(f):
                raise RewardError(f"reward {name} returned {f} for completion {i}: {completions[i]!r}")
            col[i] = f
        cols[name] = col
    total = np.zeros(n)
    for name, col in cols.items():
        total += weights.get(name, 1.0) * np.nan_to_num(col, nan=0.0)
    return Rewards(columns=cols, total=total)
