"""The built-in offline task: two-number addition, generated from a seed.

Train and held-out splits are disjoint by construction: every (a, b) pair is assigned to exactly
one split by a seeded shuffle, so no held-out question is ever a GRPO prompt.
"""

from __future__ import annotations

import random
from typing import Dict, List, Tuple

Row = Dict[str, str]


def question(a: int, b: int) -> str:
    """The question text for a + b (numbers and symbols are separate words on purpose)."""
    return f"What is {a} + {b} ?"


def all_pairs(max_operand: int) -> List[Tuple[int, int]]:
    """Every (a, b) with 0 <= a, b <= max_operand, in a fixed order."""
    return [(a, b) for a in range(max_operand + 1) for b in range(max_operand + 1)]


def make_splits(
    max_operand: int, eval_size: int, seed: int = 0
) -> Tuple[List[Row], List[Row]]:
    """Return (train, held_out) rows of {"prompt", "answer"} with no pair in both.

    The split depends only on ``max_operand``, ``eval_size`` and ``seed`` so that every run with the
    same task settings holds out the same questions.
    """
    pairs = all_pairs(max_operand)
    if not 0 < eval_size < len(pairs):
        raise ValueError(
            f"data.eval_size: must be between 1 and {len(pairs) - 1} for max_operand="
            f"{max_operand} ({len(pairs)} distinct questions), got {eval_size}"
        )
    random.Random(seed).shuffle(pairs)
    rows = [{"prompt": question(a, b), "answer": str(a + b)} for a, b in pairs]
    return rows[eval_size:], rows[:eval_size]
