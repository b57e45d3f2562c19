"""Tasks: where prompts and reference answers come from, and which rewards judge them.

A task is chosen by one name (``data.task``) and bundles a dataset (train and held-out rows that
never overlap), the question text of each row, the judge of held-out answers and a reward set
(its ``Task`` entry's ``rewards``: what a config that names no ``rewards`` trains with). Rows are ``{"prompt": str, "answer": str, ...other columns}``; the other columns
travel to the rewards as keyword arguments. The prompt template around the question (R1-Zero or
the tokenizer's chat template) is the ``prompt`` section's business, not the task's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from ..config import DataConfig
from . import arithmetic, countdown, gsm8k
from .judges import Judge, judge_answer, judge_countdown, judge_dataset_row
from .files import (
    DataError,
    Fields,
    dataset_root,
    iter_jsonl,
    read_jsonl,
    read_rows,
    read_split,
)

Row = Dict[str, Any]

__all__ = ["DataError", "TASKS", "Task", "TaskData", "columns", "iter_jsonl", "load_task", "read_jsonl"]


@dataclass
class TaskData:
    train: List[Row]
    held_out: List[Row]


def split_off(rows: List[Row], eval_size: int) -> TaskData:
    """Hold out the last ``eval_size`` rows (at most a fifth of them; none of one row)."""
    n_eval = min(eval_size, len(rows) // 5)
    if n_eval == 0:
        return TaskData(rows, [])
    return TaskData(rows[:-n_eval], rows[-n_eval:])


def load_dataset(
    cfg: DataConfig, path: str, fields: Fields, subset: Optional[str], eval_split: Optional[str]
) -> TaskData:
    """Rows from a file, a Hub-shaped folder or a Hub id; held out: ``cfg.eval_path``, else
    ``eval_split`` (folders and Hub ids), else the last ``eval_size`` rows."""
    root = dataset_root(path, cfg.revision, subset)
    if root is None:
        train = read_rows(path, fields)
    else:
        train = read_split(root, cfg.split, subset, fields, path)
    if cfg.eval_path:
        return TaskData(train, read_rows(cfg.eval_path, fields))
    if root is not None and eval_split:
        return TaskData(train, read_split(root, eval_split, subset, fields, path))
    return split_off(train, cfg.eval_size)


def _arithmetic(cfg: DataConfig) -> TaskData:
    return TaskData(*arithmetic.make_splits(cfg.max_operand, cfg.eval_size, cfg.split_seed))


def _multistep(cfg: DataConfig) -> TaskData:
    return TaskData(*arithmetic.make_splits(cfg.max_operand, cfg.eval_size, cfg.split_seed, terms=3))


def _countdown(cfg: DataConfig) -> TaskData:
    return TaskData(*countdown.make_splits(cfg.countdown, cfg.eval_size, cfg.split_seed))


def _gsm8k(cfg: DataConfig) -> TaskData:
    gsm8k.check_fields(cfg)
    return load_dataset(cfg, cfg.path or gsm8k.HUB_ID, gsm8k.FIELDS, cfg.subset or "main",
                        cfg.eval_split or "test")


def _dataset(cfg: DataConfig) -> TaskData:
    if not cfg.path:
        raise DataError(f"data.path: required when data.task is {cfg.task}")
    fields = Fields(cfg.prompt_field, cfg.answer_field, cfg.answer_delimiter)
    return load_dataset(cfg, cfg.path, fields, cfg.subset, cfg.eval_split)


@dataclass(frozen=True)
class Task:
    """A named task: how its rows are made, how its held-out answers are judged and the rewards
    it is trained with by default."""

    name: str
    load: Callable[[DataConfig], TaskData]
    judge: Judge  # how a held-out answer is judged (tasks/judges.py)
    # Reward name -> weight: what a config that names no ``rewards`` trains with (filled in when
    # the config is built: ``config.make_config``). Built-in rewards only.
    rewards: Dict[str, float]
    summary: str = ""


TASKS: Dict[str, Task] = {
    t.name: t
    for t in [
        Task("arithmetic", _arithmetic, judge_answer, {"accuracy": 1.0, "format": 0.5},
             "a + b with a, b in 0..data.max_operand, generated"),
        Task("multistep", _multistep, judge_answer, {"accuracy": 1.0, "format": 0.5},
             "a + b + c with a, b, c in 0..data.max_operand, generated (two steps of addition)"),
        Task("countdown", _countdown, judge_countdown, {"countdown": 1.0, "format": 0.1},
             "reach a target from given numbers with + - * /, generated (data.countdown)"),
        Task("gsm8k", _gsm8k, judge_answer, {"accuracy": 1.0, "format": 0.2},
             "openai/gsm8k from the Hub, or data.path: a local file or folder of the same shape"),
        Task("dataset", _dataset, judge_dataset_row, {"accuracy": 1.0, "format": 0.5},
             "data.path: a JSONL/Parquet file, a folder of them or a Hub dataset id; fields from data.*"),
        Task("jsonl", _dataset, judge_dataset_row, {"accuracy": 1.0, "format": 0.5},
             "the same as dataset (the older name)"),
    ]
}


def load_task(cfg: DataConfig) -> TaskData:
    """The configured task's train and held-out rows."""
    task = TASKS.get(cfg.task)
    if task is None:
        raise DataError(f"data.task: unknown task {cfg.task!r} (known: {', '.join(TASKS)})")
    try:
        return task.load(cfg)
    except DataError:
        raise
    except ValueError as e:  # a generator's settings that cannot work, named by key
        raise DataError(str(e)) from None


def columns(rows: List[Row]) -> Dict[str, List[Any]]:
    """Column view of rows (minus the prompt) for the rewards' keyword arguments."""
    keys = sorted({k for r in rows for k in r if k != "prompt"})
    return {k: [r.get(k) for r in rows] for k in keys}
