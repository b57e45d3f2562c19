"""Tasks: where prompts and reference answers come from.

A task yields rows ``{"prompt": str, "answer": str, ...other columns}`` split into a training set
and a held-out set that never overlap. Other columns travel to the rewards as keyword arguments.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..config import DataConfig
from . import arithmetic

Row = Dict[str, Any]


class DataError(ValueError):
    """Unusable data; the message names the file and line or the missing field."""


@dataclass
class TaskData:
    train: List[Row]
    held_out: List[Row]


def read_jsonl(
    path: str, prompt_field: str, answer_field: str, answer_delimiter: Optional[str] = None
) -> List[Row]:
    """Rows of a JSONL file, renamed to prompt/answer; errors name the file and line.

    With ``answer_delimiter`` (GSM8K's "####"), the reference is the text after its last occurrence.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: data file not found")
    rows: List[Row] = []
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: malformed JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{n}: expected a JSON object")
        if prompt_field not in obj:
            raise DataError(f"{path}:{n}: missing field {prompt_field!r} (data.prompt_field)")
        row = {k: v for k, v in obj.items() if k not in (prompt_field, answer_field)}
        row["prompt"] = str(obj[prompt_field])
        if answer_field in obj:
            answer = obj[answer_field]
            if answer is not None:
                answer = str(answer)
                if answer_delimiter and answer_delimiter in answer:
                    answer = answer.rsplit(answer_delimiter, 1)[1].strip()
            row["answer"] = answer
        rows.append(row)
    if not rows:
        raise DataError(f"{path}: no rows (empty dataset)")
    return rows


def load_task(cfg: DataConfig) -> TaskData:
    """The configured task's train and held-out rows."""
    if cfg.task == "arithmetic":
        train, held = arithmetic.make_splits(cfg.max_operand, cfg.eval_size, cfg.split_seed)
        return TaskData(train, held)
    if cfg.task == "jsonl":
        fields = (cfg.prompt_field, cfg.answer_field, cfg.answer_delimiter)
        rows = read_jsonl(cfg.path, *fields)  # type: ignore[arg-type]
        if cfg.eval_path:
            held = read_jsonl(cfg.eval_path, *fields)
            return TaskData(rows, held)
        n_eval = min(cfg.eval_size, len(rows) // 5)
        if n_eval == 0:
            return TaskData(rows, [])
        return TaskData(rows[:-n_eval], rows[-n_eval:])
    raise DataError(f"data.task: unknown task {cfg.task!r}")


def columns(rows: List[Row]) -> Dict[str, List[Any]]:
    """Column view of rows (minus the prompt) for the rewards' keyword arguments."""
    keys = sorted({k for r in rows for k in r if k != "prompt"})
    return {k: [r.get(k) for r in rows] for k in keys}
