"""Checkpoints: everything a run needs to continue exactly where it stopped, written atomically.

A checkpoint is a directory ``RUN/checkpoints/step_NNNNNN/`` holding

    adapters.safetensors, adapter_config.json   the trained weights (mlx-lm's layout)
    optimizer.safetensors                       the optimizer's state tree (Adam moments, step count;
                                                the learning-rate schedule position is the step count)
    config.yaml                                 the resolved config of the run
    state.json                                  the loop's position: step, prompt batches drawn, the
                                                MLX random key, the counters and metrics the summary
                                                needs, and the sizes of metrics.jsonl/samples.jsonl

Atomicity: the files are written (and fsynced) into a hidden ``.tmp-step_N-PID`` directory, which
is renamed to ``step_N`` only when complete. A rename is atomic, so every ``step_N`` directory is
a whole checkpoint and the newest one is the one to resume from: no pointer file that could
disagree with the directories. A process killed at any moment leaves at worst a hidden temporary
directory, which loading ignores and the next save removes. Old checkpoints are retired the same
way (renamed to a hidden name, then deleted), so the previous checkpoint stays valid until the
new one is in place.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_map_with_path

from .config import Config, ConfigError, make_config, save_config
from .errors import UserError, first_line
from .models import check_finite, model_dir, save_adapters, weights_problem
from .rundir import (ADAPTERS, CHECKPOINTS, CONFIG, LOGS, STEP_DIR as _STEP_DIR, check_log_sizes, check_own_directory,
                     check_path_length, check_writable_dir)

# Keys a resumed run may change: they decide how long it runs and how it reports and saves,
# or how an update is computed (micro-batches and recomputation give the same gradient), never
# what it learns. Everything else must match the checkpoint's config.
RESUMABLE_KEYS = (
    "train.steps",
    "train.grad_accumulation_steps",
    "train.grad_checkpoint",
    "train.max_nonfinite_steps",
    "output.",
)


class CheckpointError(UserError, ValueError):
    """No usable checkpoint, or one that does not fit this run; the message names the directory."""


@dataclass
class RunState:
    """The training loop's position and running totals: what a resumed loop starts from."""

    step: int = 0  # steps completed
    batches_drawn: int = 0  # prompt batches taken from prompt_batches (the data-order position)
    rng_key: Optional[List[int]] = None  # MLX's global PRNG key after the step
    nonfinite_streak: int = 0  # steps in a row whose every update was skipped
    skipped_updates: int = 0  # all updates skipped so far (non-finite loss or gradient)
    seconds: float = 0.0  # training time before this process
    tokens: int = 0  # completion tokens generated so far
    reward_first: Optional[float] = None
    reward_last: Optional[float] = None
    eval_start: Optional[Dict[str, Any]] = None
    eval_end: Optional[Dict[str, Any]] = None
    log_sizes: Dict[str, int] = field(default_factory=dict)  # bytes of each log at the checkpoint


def rng_key() -> List[int]:
    """MLX's global PRNG key, as plain ints."""
    key = mx.random.state[0]
    mx.eval(key)
    return [int(v) for v in key.tolist()]


def restore_rng_key(key: Sequence[int]) -> None:
    """Make MLX's global PRNG continue from ``key``.

    ``mx.random.state`` has no setter, but its key is an ordinary array: assigning into it in place
    changes the key the next draw splits.
    """
    state = mx.random.state[0]
    state[...] = mx.array(list(key), dtype=state.dtype)
    mx.eval(state)


def step_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:06d}"


def checkpoints(run_dir: Path) -> List[Path]:
    """The complete checkpoints of a run, oldest first (hidden temporary directories ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest complete checkpoint of a run, or None."""
    found = checkpoints(run_dir)
    return found[-1] if found else None


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _retire(path: Path) -> None:
    """Remove a directory so that no half-deleted copy is ever visible under its name."""
    hidden = path.with_name(f".old-{path.name}-{os.getpid()}")
    os.rename(path, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def save_checkpoint(
    run_dir: Path, model: nn.Module, opt: optim.Optimizer, cfg: Config, state: RunState
) -> Path:
    """Write the checkpoint for ``state.step`` atomically; keep the newest ``output.keep_checkpoints``.

    Raises ``NonFiniteError`` (writing nothing) when a weight or optimizer value is NaN or infinite.
    """
    opt_state = dict(tree_flatten(opt.state))
    check_finite(opt_state, "optimizer state")  # the adapters are checked by save_adapters
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(run_dir, state.step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        save_adapters(model, tmp, cfg.adapter, model_dir(cfg.model))
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), opt_state)
        save_config(cfg, tmp / CONFIG)
        (tmp / "state.json").write_text(json.dumps(asdict(state), indent=1) + "\n")
        for f in tmp.iterdir():
            _fsync(f)
        if final.exists():  # the same step saved again (a resumed run): replace it whole
            _retire(final)
        os.rename(tmp, final)
        _fsync(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    prune(run_dir, cfg.output.keep_checkpoints)
    return final


def prune(run_dir: Path, keep: int) -> None:
    """Keep the newest ``keep`` checkpoints; remove leftovers of saves that were killed."""
    for old in checkpoints(run_dir)[:-keep]:
        _retire(old)
    for p in (Path(run_dir) / CHECKPOINTS).iterdir():
        if p.name.startswith((".tmp-", ".old-")) and not p.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(p, ignore_errors=True)


def read_state(ckpt: Path) -> RunState:
    """The loop state stored in a checkpoint directory, every field checked: a resumed run must
    fail here, before it truncates a log or deletes a summary, not after."""
    where = Path(ckpt) / "state.json"
    try:
        data = json.loads(where.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # (RecursionError: 100 k nested brackets)
        raise CheckpointError(f"{where}: unreadable checkpoint state ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{where}: expected a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - {f.name for f in fields(RunState)})
    if unknown:
        raise CheckpointError(f"{where}: unknown key {unknown[0]!r}")
    for key, value in data.items():
        why = _bad_state_value(key, value)
        if why:
            raise CheckpointError(f"{where}: {key}: {why}, got {_short(value)}")
    state = RunState(**data)
    m = _STEP_DIR.match(Path(ckpt).name)
    if m and int(m.group(1)) != state.step:
        raise CheckpointError(f"{where}: step: {state.step} in a checkpoint of step {int(m.group(1))}")
    return state


def check_data_position(state: RunState, ckpt: Path, draws_per_step: int) -> None:
    """A CheckpointError unless ``batches_drawn`` is a position ``state.step`` steps can reach:
    resume replays that many prompt batches, so an edited 10**12 would stall it for hours."""
    most = state.step * draws_per_step
    if state.batches_drawn > most:
        raise CheckpointError(
            f"{Path(ckpt) / 'state.json'}: batches_drawn: {state.batches_drawn} is more than "
            f"{state.step} steps draw (at most {most})"
        )


EVAL_KEYS = ("n", "accuracy", "format_rate", "lenient_accuracy")


def _count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _bad_state_value(key: str, v: Any) -> Optional[str]:
    """Why ``v`` cannot be RunState's ``key`` (None when it can)."""
    if key in ("step", "batches_drawn", "nonfinite_streak", "skipped_updates", "tokens"):
        return None if _count(v) else "expected an integer >= 0"
    if key == "seconds":
        return None if _number(v) and v >= 0 else "expected a finite number >= 0"
    if key in ("reward_first", "reward_last"):
        return None if v is None or _number(v) else "expected a finite number or null"
    if key in ("eval_start", "eval_end"):  # the end-of-run summary line reads these keys
        ok = v is None or (isinstance(v, dict) and all(_number(v.get(k)) for k in EVAL_KEYS))
        return None if ok else f"expected null or an object with numbers {', '.join(EVAL_KEYS)}"
    if key == "log_sizes":
        ok = isinstance(v, dict) and all(k in LOGS and _count(n) for k, n in v.items())
        return None if ok else f"expected {{name: bytes}} for {', '.join(LOGS)}"
    if key == "rng_key":  # MLX's key: a fixed number of uint32 words
        size = mx.random.state[0].size
        ok = v is None or (isinstance(v, list) and len(v) == size and all(_count(x) and x < 2**32 for x in v))
        return None if ok else f"expected null or {size} integers in [0, 2**32)"
    return None


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _load_arrays(path: Path, expected: Dict[str, mx.array], what: str) -> Dict[str, mx.array]:
    """The arrays of a checkpoint file, which must hold exactly ``expected``'s names with their
    shapes and dtypes, all finite (``models.weights_problem``, the check every adapter load
    makes); anything else (truncated, edited, another layout) is a CheckpointError naming the file."""
    try:
        saved = mx.load(str(path))
    except Exception as e:  # truncated or not safetensors: MLX's message, on one line
        first = first_line(e)
        raise CheckpointError(f"{path}: unreadable {what} ({first})") from None
    why = weights_problem(saved, what, expected)
    if why:
        raise CheckpointError(f"{path}: {why}")
    return saved


def load_checkpoint(ckpt: Path, model: nn.Module, opt: optim.Optimizer) -> RunState:
    """Load adapters, optimizer state and the PRNG key into a freshly set-up run; returns its state.

    ``model`` must carry the run's adapters already (attach_adapters) and ``opt`` be the run's
    optimizer, new: its state tree is built for the model's trainable parameters and each leaf is
    taken from the checkpoint, so a checkpoint of another adapter layout is an error, not a
    silent partial load.
    """
    state = read_state(ckpt)
    ours = dict(tree_flatten(model.trainable_parameters()))
    weights = _load_arrays(ckpt / ADAPTERS, ours, "adapters")
    opt.init(model.trainable_parameters())
    saved = _load_arrays(ckpt / "optimizer.safetensors", dict(tree_flatten(opt.state)), "optimizer state")
    # Both files checked before either is used: a bad optimizer file leaves the model as it was.
    model.load_weights(list(weights.items()), strict=False)
    opt.state = tree_map_with_path(lambda path, _: saved[path], opt.state)
    if state.rng_key is not None:
        restore_rng_key(state.rng_key)
    mx.eval(model.parameters(), opt.state)
    return state


def _changed(key: str, resumable: Sequence[str]) -> bool:
    return not any(key == k or (k.endswith(".") and key.startswith(k)) for k in resumable)


def resume_config(run_dir: str, overrides: List[tuple]) -> Config:
    """The config of a run to resume: its latest checkpoint's, with the overrides that may change.

    An override that would change what the run learns (the model, data, rewards, any GRPO or
    optimizer setting) is a ``ConfigError`` naming the key: a resumed run is the same run.
    A state.json that disagrees with the run's logs is a ``RunDirError`` (``check_log_sizes``).
    """
    check_path_length(run_dir, "--resume")
    ckpt = latest_checkpoint(Path(run_dir))
    if ckpt is None:
        where = Path(run_dir)
        what = "does not exist" if not where.exists() else "has no complete checkpoint"
        raise CheckpointError(f"--resume: {run_dir} {what} (checkpoints/step_N/ is written every "
                              "output.save_every steps, at the end and on Ctrl-C)")
    check_writable_dir(run_dir, "--resume")  # its logs are cut and appended to: not on a read-only disk
    check_own_directory(run_dir, "--resume")  # a run written into / or ~ before that was refused
    base = make_config(str(ckpt / CONFIG))
    cfg = make_config(str(ckpt / CONFIG), [*overrides, ("output.dir", str(run_dir))])
    old, new = dict(_flat(base.to_dict())), dict(_flat(cfg.to_dict()))
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key) and _changed(key, RESUMABLE_KEYS):
            raise ConfigError(
                f"{key}: --resume continues the run as configured ({old.get(key)!r}); "
                f"got {new.get(key)!r} (a resumed run may change only train.steps, "
                "train.grad_accumulation_steps, train.grad_checkpoint, train.max_nonfinite_steps, output.*)"
            )
    state = read_state(ckpt)
    if cfg.train.steps < state.step:
        raise ConfigError(f"train.steps: the run already completed {state.step} steps, got {cfg.train.steps}")
    # Here, before any model loads: a state that disagrees with the logs is refused in a second.
    check_log_sizes(Path(run_dir), state.log_sizes, state.step, ckpt / "state.json")
    return cfg


def _flat(tree: Dict[str, Any], prefix: str = "") -> List[tuple]:
    out: List[tuple] = []
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and k != "rewards":
            out += _flat(v, key + ".")
        else:
            out.append((key, v))
    return out
