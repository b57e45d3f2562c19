"""How a task judges a held-out answer: the layout, the strict verdict and the lenient one.

A judge takes the whole response (the template's response prefix + the completion) and the row
it answers, and returns ``{"format", "strict", "lenient"}``: format, the strict layout
(``<think>...</think><answer>...</answer>``); strict, that layout with a correct answer inside
``<answer>``; lenient, a correct answer whatever the layout. Each task names its judge
(``tasks.TASKS``), so the evaluation never guesses from a row's columns.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping

from ..rewards.answers import answers_match, extract_answer, last_number
from ..rewards.countdown import countdown_correct
from ..rewards.format import is_strict_format

Verdict = Dict[str, bool]
Judge = Callable[[str, Mapping[str, Any]], Verdict]


def judge_answer(response: str, row: Mapping[str, Any]) -> Verdict:
    """Against the row's reference ``answer``: strict reads the <answer>, lenient the last number."""
    fmt = is_strict_format(response)
    reference = row.get("answer")
    return {
        "format": fmt,
        "strict": fmt and answers_match(extract_answer(response), reference),
        "lenient": answers_match(last_number(response), reference),
    }


def judge_countdown(response: str, row: Mapping[str, Any]) -> Verdict:
    """A countdown puzzle (``numbers``, ``target``): correct when the <answer> is an equation that
    uses each number once and reaches the target; lenient, whatever the layout around it."""
    fmt = is_strict_format(response)
    ok = countdown_correct(extract_answer(response), row["numbers"], row["target"])
    return {"format": fmt, "strict": fmt and ok, "lenient": ok}


def judge_dataset_row(response: str, row: Mapping[str, Any]) -> Verdict:
    """A user's dataset says what it holds by its columns: countdown puzzles (``numbers`` and
    ``target``) are judged as countdown, every other row against its ``answer``."""
    if row.get("numbers") is not None and row.get("target") is not None:
        return judge_countdown(response, row)
    return judge_answer(response, row)
