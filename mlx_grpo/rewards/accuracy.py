"""Accuracy rewards: the answer, read from the completion, compared with the reference by value."""

from __future__ import annotations

from typing import List, Optional, Sequence

from .answers import answers_match, extract_answer, last_number


def accuracy_reward(
    prompts: List[str], completions: List[str], answer: Optional[Sequence[str]] = None, **_
) -> List[Optional[float]]:
    """1.0 when the last <answer> block equals the reference ``answer`` column, else 0.0.

    Rows without a reference answer get None (not applicable). Range [0, 1].
    """
    if answer is None:
        return [None] * len(completions)
    return [
        None if ref is None else float(answers_match(extract_answer(c), ref))
        for c, ref in zip(completions, answer)
    ]


def lenient_accuracy_reward(
    prompts: List[str], completions: List[str], answer: Optional[Sequence[str]] = None, **_
) -> List[Optional[float]]:
    """1.0 when the last number anywhere in the completion equals the reference. Range [0, 1]."""
    if answer is None:
        return [None] * len(completions)
    return [
        None if ref is None else float(answers_match(last_number(c), ref))
        for c, ref in zip(completions, answer)
    ]
