"""Step 2 of the seed: score completions with rule-based rewards.

A reward is any callable ``fn(prompts, completions, **columns) -> list[float | None]`` (TRL's reward
signature), where ``columns`` carries the dataset's other fields (e.g. ``answer``) and, in
training, ``completion_ids`` (each completion's token ids, as TRL passes them). ``None`` means
"not applicable": it is left out of that reward's mean and counts 0 in the weighted total.
Built-ins are named in ``BUILTIN`` (their ranges in ``RANGES``); a user reward is named
``path/to/file.py:function`` or ``package.module:function``.

Policy for a broken reward: a reward that raises, returns the wrong number of values, or returns
NaN/inf or a non-number stops the run with a ``RewardError`` naming the reward and the offending
sample. Silently scoring it as zero would train on a wrong signal.

Rewards work on strings only (no mlx, no model), so reward experiments start instantly.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..config import Config, ConfigError, RewardSettings
from .accuracy import make_accuracy_reward
from .countdown import countdown_reward
from .errors import RewardError
from .format import format_reward, soft_format_reward, tag_count_reward
from .shaping import make_length_reward, make_overlong_reward, make_repetition_reward

RewardFn = Callable[..., List[Optional[float]]]

# Each built-in from its settings (most have none).
FACTORIES: Dict[str, Callable[[RewardSettings], RewardFn]] = {
    "accuracy": lambda s: make_accuracy_reward(s.accuracy),
    "lenient_accuracy": lambda s: make_accuracy_reward(s.accuracy, extract="last_number"),
    "format": lambda s: format_reward,
    "soft_format": lambda s: soft_format_reward,
    "tag_count": lambda s: tag_count_reward,
    "countdown": lambda s: countdown_reward,
    "overlong": lambda s: make_overlong_reward(s.overlong),
    "length": lambda s: make_length_reward(s.length),
    "repetition": lambda s: make_repetition_reward(s.repetition),
}

# The documented range of each built-in: (lowest, highest) value it can return.
RANGES: Dict[str, Tuple[float, float]] = {
    "accuracy": (0.0, 1.0),
    "lenient_accuracy": (0.0, 1.0),
    "format": (0.0, 1.0),
    "soft_format": (0.0, 1.0),
    "tag_count": (0.0, 1.0),
    "countdown": (0.0, 1.0),
    "overlong": (-1.0, 0.0),
    "length": (-1.0, 0.0),
    "repetition": (-1.0, 0.0),
}


def resolve_settings(settings: RewardSettings, max_tokens: int) -> RewardSettings:
    """``settings`` with the lengths left to the run filled in: max_length = ``max_tokens`` and the
    overlong soft zone = max_length // 5 (DAPO's 4096 of 20480), at least 1 token."""
    over, length = settings.overlong, settings.length
    over_max = over.max_length or max_tokens
    cache = over.cache if over.cache is not None else max(1, over_max // 5)
    if cache > over_max:
        raise ConfigError(
            f"reward_settings.overlong.cache: must be at most max_length ({over_max}), got {cache}"
        )
    return dataclasses.replace(
        settings,
        overlong=dataclasses.replace(over, max_length=over_max, cache=cache),
        length=dataclasses.replace(length, max_length=length.max_length or max_tokens),
    )


def settings_for(cfg: Config) -> RewardSettings:
    """The reward settings of a run, resolved against its rollout length."""
    return resolve_settings(cfg.reward_settings, cfg.rollout.max_tokens)


def load_reward(name: str, settings: Optional[RewardSettings] = None) -> RewardFn:
    """A built-in by name (built with ``settings``, default: the defaults resolved for the
    default rollout length), or a user callable from ``file.py:fn`` or ``module:fn``."""
    if name in FACTORIES:
        return FACTORIES[name](settings or _DEFAULT_SETTINGS)
    if ":" not in name:
        raise RewardError(
            f"rewards.{name}: unknown reward (built-ins: {', '.join(sorted(FACTORIES))}; "
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


def load_rewards(names: Sequence[str], settings: Optional[RewardSettings] = None) -> Dict[str, RewardFn]:
    """Resolve every configured reward up front, so a typo fails before any model loads."""
    return {name: load_reward(name, settings) for name in names}


_DEFAULT_SETTINGS = settings_for(Config())
# The built-ins with default settings, by name.
BUILTIN: Dict[str, RewardFn] = {name: make(_DEFAULT_SETTINGS) for name, make in FACTORIES.items()}


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
    """Run every reward on every completion; total = sum of weight * reward (None counts 0).

    Raises RewardError (naming the reward and the sample) for a reward that raises, returns the
    wrong number of values, or a value that is not a finite number.
    """
    n = len(completions)
    prompts, completions = list(prompts), list(completions)
    cols: Dict[str, np.ndarray] = {}
    for name, fn in reward_fns.items():
        values = _call(name, fn, prompts, completions, columns)
        if values is None or not hasattr(values, "__len__") or len(values) != n:
            got = "None" if values is None else (f"{len(values)} values" if hasattr(values, "__len__") else repr(values))
            raise RewardError(f"reward {name} returned {got} for {n} completions")
        col = np.full(n, np.nan)
        for i, v in enumerate(values):
            if v is None:
                continue
            try:
                f = float(v)
            except (TypeError, ValueError):
                raise RewardError(
                    f"reward {name} returned {_short(v)} (not a number) for {_sample(i, completions)}"
                ) from None
            if not math.isfinite(f):
                raise RewardError(f"reward {name} returned {f} for {_sample(i, completions)}")
            col[i] = f
        cols[name] = col
    total = np.zeros(n)
    for name, col in cols.items():
        total += weights.get(name, 1.0) * np.nan_to_num(col, nan=0.0)
    return Rewards(columns=cols, total=total)


def _call(name: str, fn: RewardFn, prompts: List[str], completions: List[str],
          columns: Mapping[str, Sequence[Any]]) -> Any:
    """``fn`` on the batch; when it raises, find the first sample that makes it raise alone."""
    try:
        return fn(prompts, completions, **{k: list(v) for k, v in columns.items()})
    except RewardError as e:  # already says what is wrong (e.g. a missing column)
        raise RewardError(str(e)) from None
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    for i in range(len(completions)):
        try:
            fn(prompts[i : i + 1], completions[i : i + 1], **{k: list(v)[i : i + 1] for k, v in columns.items()})
        except Exception as e:
            raise RewardError(f"reward {name} raised {type(e).__name__}: {e} on {_sample(i, completions)}") from None
    raise RewardError(f"reward {name} raised {error} on the batch of {len(completions)} (each sample alone passes)")


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _sample(i: int, completions: Sequence[str]) -> str:
    return f"sample {i} (completion {_short(completions[i])})"
