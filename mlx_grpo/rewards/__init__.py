"""Step 2 of a GRPO step: score completions with rule-based rewards.

A reward is any callable ``fn(prompts, completions, **columns) -> list[float | None]`` (TRL's reward
signature), where ``columns`` carries the dataset's other fields (e.g. ``answer``) and, in
training, ``completion_ids`` (each completion's token ids, as TRL passes them). ``None`` means
"not applicable": it is left out of that reward's mean and counts 0 in the weighted total.
Built-ins are named in ``BUILTIN`` (their ranges in ``RANGES``); a user reward is named
``path/to/file.py:function`` or ``package.module:function``.

Policy for a broken reward: a reward that raises, returns the wrong number of values, or returns
NaN/inf or a non-number stops the run with a ``RewardError`` naming the reward and the offending
sample. Silently scoring it as zero would train on a wrong signal.

The contract a user reward cannot escape (each case is a ``RewardError``, never an exit or a
traceback): a reward returns a list or tuple, or a 1-D array, of one value per completion, each
``None``, a bool or a real number (Python's or NumPy's); a dict, a string, a scalar, a 0-d or
2-D array is refused. ``sys.exit`` (``SystemExit``) inside a reward, or anything its module raises
at import (``SystemExit`` and ``KeyboardInterrupt`` included) is reported as that reward's error. A
module runs with ``sys.argv = [its file]`` while it is imported, so an argparse call at import
sees no arguments of ours. What user code prints to stdout goes to stderr (``guard.user_code``:
descriptor 1 too, and a forked child that returns ends), so ``--json`` output stays one JSON
object; output printed by a failing import is quoted in the error instead. Any other exception a
reward raises (``GeneratorExit``, its own ``BaseException``) is its error too, and so is an
``os._exit`` or ``os.abort`` call (``guard.ProcessExit``). Each reward gets its own copies of the
prompts, completions and columns, nested lists and dicts included (``_inputs``).
A ``KeyboardInterrupt`` a reward (or its module, at import) raises itself is its error, wherever it
runs: a training step, the held-out evaluations (before the first step, every ``eval_every``
steps, after the last), ``cli.py eval`` and ``cli.py reward``. One raised by a SIGINT that arrived
while it ran (the user's Ctrl-C) is an interrupt, never the reward's error (``guard.CtrlC``).

Rewards work on strings only (no mlx, no model), so reward experiments start instantly.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import importlib.util
import io
import math
from numbers import Real  # not "import numbers": the package's own rewards.numbers module would shadow it
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from ..config import Config, ConfigError, RewardSettings
from ..errors import described
from ..interrupts import Interrupted
from .accuracy import make_accuracy_reward
from .countdown import countdown_reward
from .errors import RewardError
from .format import format_reward, soft_format_reward, tag_count_reward
from .guard import CtrlC, sigint_arrived, user_code
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
    if target.endswith(".py") and not Path(target).is_file():
        raise RewardError(f"rewards.{name}: file {target} not found")
    printed = io.StringIO()
    argv = sys.argv
    try:
        sys.argv = [target]  # an argparse call at import must not parse our command line
        with user_code(stdout=printed, stderr=printed):
            module = _import(target)
    except BaseException as e:  # user code (sys.exit, KeyboardInterrupt, GeneratorExit...), in one line
        if not _own_error(e):  # the user's Ctrl-C during the import
            raise
        said = [line.strip() for line in printed.getvalue().splitlines() if line.strip()]
        quoted = f" (it printed: {_short(said[-1])[1:-1]})" if said else ""
        raise RewardError(
            f"rewards.{name}: cannot import {target}: {type(e).__name__}: {e}{quoted}"
        ) from None
    finally:
        sys.argv = argv
    sys.stderr.write(printed.getvalue())  # what it printed at import, kept off stdout
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise RewardError(f"rewards.{name}: {target} has no function {fn_name!r}")
    return fn


def _import(target: str) -> Any:
    """The module of a user reward: a ``.py`` file or an importable module name."""
    if not target.endswith(".py"):
        return importlib.import_module(target)
    path = Path(target)
    spec = importlib.util.spec_from_file_location(f"mlx_grpo_user_reward_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def load_rewards(names: Sequence[str], settings: Optional[RewardSettings] = None) -> Dict[str, RewardFn]:
    """Resolve every configured reward up front, so a typo fails before any model loads."""
    return {name: load_reward(name, settings) for name in names}


def configured_rewards(cfg: Config) -> Dict[str, RewardFn]:
    """The rewards ``cfg.rewards`` names, built with the run's ``reward_settings`` (what train,
    eval, bench and the rewards lab score with; a bad name fails here, before any model loads)."""
    return load_rewards(list(cfg.rewards), settings_for(cfg))


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
        with user_code():  # a reward's prints (and its subprocesses') never reach --json output
            values = _values(name, _call(name, fn, prompts, completions, columns), n)
        col = np.full(n, np.nan)
        for i, v in enumerate(values):
            if v is None:
                continue
            if not isinstance(v, (Real, np.bool_)):  # not float(v): "1" or a 1-element array
                raise RewardError(
                    f"reward {name} returned {_short(v)} (not a number) for {_sample(i, completions)}"
                )
            try:
                f = float(v)
            except Exception:  # 10**400 (OverflowError), a Real whose __float__ fails
                raise RewardError(f"reward {name} returned {_short(v)} (not a finite number) for "
                                  f"{_sample(i, completions)}") from None
            if not math.isfinite(f):
                raise RewardError(f"reward {name} returned {f} for {_sample(i, completions)}")
            col[i] = f
        cols[name] = col
    total = np.zeros(n)
    for name, col in cols.items():
        total += weights.get(name, 1.0) * np.nan_to_num(col, nan=0.0)
    return Rewards(columns=cols, total=total)


def _values(name: str, values: Any, n: int) -> Sequence[Any]:
    """A reward's result as a sequence of ``n`` values, or a RewardError saying what it was."""
    if hasattr(values, "ndim") and hasattr(values, "tolist"):  # NumPy, MLX (or torch) arrays
        if values.ndim != 1:
            raise RewardError(f"reward {name} returned an array of shape {tuple(values.shape)} for {n} "
                              f"completions (expected one value per completion)")
        values = values.tolist()
    if not isinstance(values, (list, tuple)):  # a dict's keys or a string's characters are no rewards
        kind = "" if values is None or isinstance(values, (int, float)) else f" (a {type(values).__name__})"
        raise RewardError(f"reward {name} returned {_short(values)}{kind} for {n} completions "
                          f"(expected a list of {n} numbers or None)")
    if len(values) != n:
        raise RewardError(f"reward {name} returned {len(values)} values for {n} completions")
    return values


def _own_error(e: BaseException) -> bool:
    """Whether ``e``, raised by a reward, is that reward's error: anything (``sys.exit``,
    ``KeyboardInterrupt``, ``GeneratorExit``, a BaseException of its own) but the trainer's
    ``Interrupted`` and the user's Ctrl-C: ``CtrlC``, or whatever the reward raised once a SIGINT
    arrived while it ran (it caught the KeyboardInterrupt and raised something else)."""
    return not isinstance(e, (Interrupted, CtrlC)) and not sigint_arrived()


_ATOMS = frozenset({str, int, float, bool, type(None), bytes})  # values no one can edit in place


def _own_copy(value: Any) -> Any:
    """A copy of ``value`` that a reward may edit freely: lists and dicts copied at every level,
    strings and numbers shared (they cannot be edited), anything else deep-copied."""
    kind = type(value)
    if kind in _ATOMS:
        return value
    if kind is list:  # completion_ids: many lists of ints, so the flat case is the fast one
        return value.copy() if all(type(v) in _ATOMS for v in value) else [_own_copy(v) for v in value]
    if kind is dict:
        return {k: _own_copy(v) for k, v in value.items()}
    return copy.deepcopy(value)


def _inputs(prompts: List[str], completions: List[str], columns: Mapping[str, Sequence[Any]],
            rows: slice = slice(None)) -> Tuple[List[str], List[str], Dict[str, List[Any]]]:
    """A reward's own copies of the ``rows`` of its inputs, nested values included: one that edits
    them in place (``numbers[i].clear()``) changes nothing for the next reward, the dataset or --out."""
    cols = {k: _own_copy(list(v)[rows]) for k, v in columns.items()}
    return _own_copy(prompts[rows]), _own_copy(completions[rows]), cols


def _call(name: str, fn: RewardFn, prompts: List[str], completions: List[str],
          columns: Mapping[str, Sequence[Any]]) -> Any:
    """``fn`` on its own copy of the batch; when it raises, find the first sample that makes it
    raise alone."""
    p, c, cols = _inputs(prompts, completions, columns)
    try:
        return fn(p, c, **cols)
    except RewardError as e:  # already says what is wrong (e.g. a missing column)
        raise RewardError(str(e)) from None
    except BaseException as e:
        if not _own_error(e):  # a second Ctrl-C in training, landing inside the reward
            raise
        error = described(e)  # one line: a multi-line message or a failing __str__ stays out of it
    for i in range(len(completions)):
        p, c, cols = _inputs(prompts, completions, columns, slice(i, i + 1))
        try:
            fn(p, c, **cols)
        except BaseException as e:
            if not _own_error(e):
                raise
            raise RewardError(f"reward {name} raised {described(e)} on {_sample(i, completions)}") from e
    raise RewardError(f"reward {name} raised {error} on the batch of {len(completions)} (each sample alone passes)")


def _short(value: Any, limit: int = 120) -> str:
    try:
        text = repr(value)
    except Exception:  # a user object whose __repr__ fails, an int of over 4300 digits
        text = f"<a {type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _sample(i: int, completions: Sequence[str]) -> str:
    return f"sample {i} (completion {_short(completions[i])})"
