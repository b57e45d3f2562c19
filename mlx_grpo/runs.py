"""Reading run directories: their metrics records and the key figures `cli.py runs` lists."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import yaml

from .errors import UserError, first_line
from .rundir import CONFIG, METRICS, SUMMARY


@dataclass
class RunRecords:
    """A run's metrics.jsonl split by kind (train, eval, warning), plus its config and summary."""

    path: Path
    train: List[Dict[str, Any]] = field(default_factory=list)
    evals: List[Dict[str, Any]] = field(default_factory=list)
    warnings: List[Dict[str, Any]] = field(default_factory=list)  # the tripwires' (tripwires.py)
    config: Dict[str, Any] = field(default_factory=dict)
    summary: Optional[Dict[str, Any]] = None



class RunLogError(UserError, ValueError):
    """A run's metrics.jsonl that cannot be read; the message names the file and line."""

def is_run(path: Path) -> bool:
    return (path / METRICS).is_file()


def read_run(path: str | Path, config: bool = True) -> RunRecords:
    """Load a run directory (with ``config``: its config.yaml and summary.json too); a line cut
    short by a crash (the last one) is ignored. A malformed line or file is a RunLogError naming
    the file (and line)."""
    path = Path(path)
    if not is_run(path):
        raise FileNotFoundError(f"{path}: not a run directory (no metrics.jsonl)")
    rec = RunRecords(path)
    where = path / METRICS
    try:
        text = where.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RunLogError(f"{where}:{text_line(where, e.start)}: not UTF-8 text") from None
    lines = text.split("\n")  # JSON strings may hold U+2028 and the like: only \n ends a line
    while lines and not lines[-1].strip():
        lines.pop()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = read_json(line)
        except (json.JSONDecodeError, RecursionError):  # (RecursionError: brackets nested 100 k deep)
            if i == len(lines):  # a partial last line from an interrupted write
                break
            raise RunLogError(f"{where}:{i}: not valid JSON") from None
        if not isinstance(r, dict) or isinstance(r.get("step"), bool) or not isinstance(r.get("step"), (int, float)):
            raise RunLogError(f"{where}:{i}: expected a JSON object with a numeric \"step\"")
        kind = r.get("kind")
        (rec.evals if kind == "eval" else rec.warnings if kind == "warning" else rec.train).append(r)
    if config and (path / CONFIG).is_file():
        rec.config = _read_mapping(path / CONFIG, yaml.safe_load) or {}
    if config and (path / SUMMARY).is_file():
        rec.summary = _read_mapping(path / SUMMARY, read_json)
    return rec


def read_json(text: str) -> Any:
    """``json.loads`` with every number a float can hold: an integer past float's range (10**400,
    hand-edited or damaged) reads as +-inf, as json reads 1e400, so that sums, tables and plots take
    it instead of raising OverflowError (or ValueError past 4300 digits)."""
    return json.loads(text, parse_int=_int)


def _int(digits: str) -> Any:
    return int(digits) if len(digits.lstrip("-")) < 300 else float(digits)


def _read_mapping(where: Path, parse: Callable[[str], Any]) -> Optional[Dict[str, Any]]:
    """The mapping in a run's config.yaml or summary.json (None if empty); anything else is a
    one-line ValueError naming the file (`runs` then skips the run, `plot` stops)."""
    try:
        data = parse(where.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError, yaml.YAMLError) as e:
        first = first_line(e)
        raise RunLogError(f"{where}: unreadable ({first})") from None
    if data is not None and not isinstance(data, dict):
        raise RunLogError(f"{where}: expected a mapping, got {type(data).__name__}")
    return data


def text_line(path: Path, offset: int) -> int:
    """The 1-based line of byte ``offset`` in ``path``."""
    return path.read_bytes()[:offset].count(b"\n") + 1


def find_runs(root: str | Path) -> List[Path]:
    """``root`` itself if it is a run, else the runs among its subdirectories (two levels)."""
    root = Path(root)
    if is_run(root):
        return [root]
    found = [p.parent for p in root.glob(f"*/{METRICS}")] + [p.parent for p in root.glob(f"*/*/{METRICS}")]
    return sorted(set(found))


def key_figures(rec: RunRecords) -> Dict[str, Any]:
    """The figures that tell whether a run helped: progress, reward and held-out accuracy."""
    # Hand-edited files may hold anything: a figure that is not a number shows as missing.
    planned = _number(_section(rec.config, "train").get("steps"))
    first_eval = rec.evals[0] if rec.evals else {}
    last_eval = rec.evals[-1] if len(rec.evals) > 1 else {}
    rewards = [v for v in (_number(r.get("reward_mean")) for r in rec.train) if v is not None]
    tail = rewards[-10:]
    return {
        "run": str(rec.path),
        "model": _section(rec.config, "model").get("path"),
        "status": "done" if rec.summary else "incomplete",
        "step": rec.train[-1]["step"] if rec.train else 0,
        "steps": planned,
        "reward_first": rewards[0] if rewards else None,
        "reward_last10": sum(tail) / len(tail) if tail else None,
        "accuracy_start": _number(first_eval.get("accuracy")),
        "accuracy_end": _number(last_eval.get("accuracy")),
        "seconds": _number((rec.summary or {}).get("seconds"))
        or sum(_number(r.get("step_time")) or 0.0 for r in rec.train),
    }


def _section(config: Dict[str, Any], name: str) -> Dict[str, Any]:
    value = config.get(name)
    return value if isinstance(value, dict) else {}


def _number(v: Any) -> Optional[float]:
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def format_table(rows: List[Dict[str, Any]]) -> str:
    """A fixed-width table of key figures, one run per line."""
    def num(v: Any, fmt: str = "{:.3f}") -> str:
        return "-" if v is None else fmt.format(v)

    head = f"{'run':<32} {'status':<10} {'step':>9} {'reward':>15} {'accuracy':>15} {'time':>8}"
    lines = [head]
    for r in rows:
        steps = f"{r['step']}/{r['steps'] if r['steps'] is not None else '?'}"
        reward = f"{num(r['reward_first'])}->{num(r['reward_last10'])}"
        acc = f"{num(r['accuracy_start'])}->{num(r['accuracy_end'])}"
        lines.append(
            f"{r['run'][-32:]:<32} {r['status']:<10} {steps:>9} {reward:>15} {acc:>15} "
            f"{num(r['seconds'], '{:.0f}s'):>8}"
        )
    return "\n".join(lines)
