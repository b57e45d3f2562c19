"""Reading run directories: their metrics records and the key figures `cli.py runs` lists."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml


@dataclass
class RunRecords:
    """A run's metrics.jsonl split by kind (train, eval, warning), plus its config and summary."""

    path: Path
    train: List[Dict[str, Any]] = field(default_factory=list)
    evals: List[Dict[str, Any]] = field(default_factory=list)
    warnings: List[Dict[str, Any]] = field(default_factory=list)  # the tripwires' (tripwires.py)
    config: Dict[str, Any] = field(default_factory=dict)
    summary: Optional[Dict[str, Any]] = None


def is_run(path: Path) -> bool:
    return (path / "metrics.jsonl").is_file()


def read_run(path: str | Path) -> RunRecords:
    """Load a run directory; a line cut short by a crash (the last one) is ignored. A malformed
    line is a ValueError naming metrics.jsonl and the line."""
    path = Path(path)
    if not is_run(path):
        raise FileNotFoundError(f"{path}: not a run directory (no metrics.jsonl)")
    rec = RunRecords(path)
    where = path / "metrics.jsonl"
    try:
        text = where.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}:{text_line(where, e.start)}: not UTF-8 text") from None
    lines = text.split("\n")  # JSON strings may hold U+2028 and the like: only \n ends a line
    while lines and not lines[-1].strip():
        lines.pop()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines):  # a partial last line from an interrupted write
                break
            raise ValueError(f"{where}:{i}: not valid JSON") from None
        if not isinstance(r, dict) or isinstance(r.get("step"), bool) or not isinstance(r.get("step"), (int, float)):
            raise ValueError(f"{where}:{i}: expected a JSON object with a numeric \"step\"")
        kind = r.get("kind")
        (rec.evals if kind == "eval" else rec.warnings if kind == "warning" else rec.train).append(r)
    if (path / "config.yaml").is_file():
        rec.config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    if (path / "summary.json").is_file():
        rec.summary = json.loads((path / "summary.json").read_text())
    return rec


def text_line(path: Path, offset: int) -> int:
    """The 1-based line of byte ``offset`` in ``path``."""
    return path.read_bytes()[:offset].count(b"\n") + 1


def find_runs(root: str | Path) -> List[Path]:
    """``root`` itself if it is a run, else the runs among its subdirectories (two levels)."""
    root = Path(root)
    if is_run(root):
        return [root]
    found = [p.parent for p in root.glob("*/metrics.jsonl")] + [p.parent for p in root.glob("*/*/metrics.jsonl")]
    return sorted(set(found))


def key_figures(rec: RunRecords) -> Dict[str, Any]:
    """The figures that tell whether a run helped: progress, reward and held-out accuracy."""
    planned = rec.config.get("train", {}).get("steps")
    first_eval = rec.evals[0] if rec.evals else {}
    last_eval = rec.evals[-1] if len(rec.evals) > 1 else {}
    tail = rec.train[-10:]
    return {
        "run": str(rec.path),
        "model": rec.config.get("model", {}).get("path"),
        "status": "done" if rec.summary else "incomplete",
        "step": rec.train[-1]["step"] if rec.train else 0,
        "steps": planned,
        "reward_first": rec.train[0]["reward_mean"] if rec.train else None,
        "reward_last10": sum(r["reward_mean"] for r in tail) / len(tail) if tail else None,
        "accuracy_start": first_eval.get("accuracy"),
        "accuracy_end": last_eval.get("accuracy"),
        "seconds": (rec.summary or {}).get("seconds") or sum(r.get("step_time", 0.0) for r in rec.train),
    }


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
