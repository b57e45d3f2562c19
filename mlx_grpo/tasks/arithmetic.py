"""The built-in offline tasks: addition of two numbers (``arithmetic``) or three (``multistep``),
generated from a seed.

Train and held-out splits are disjoint by construction: every tuple of operands is assigned to
exactly one split by a seeded shuffle, so no held-out question is ever a GRPO prompt.
"""

from __future__ import annotations

import itertools
import random
from typing import Dict, List, Tuple

Row = Dict[str, str]


def question(*operands: int) -> str:
    """The question text for the sum of ``operands`` (numbers and symbols are separate words on
    purpose: the embedded tokenizer is word-level)."""
    return f"What is {' + '.join(str(x) for x in operands)} ?"


def all_pairs(max_operand: int, terms: int = 2) -> List[Tuple[int, ...]]:
    """Every tuple of ``terms`` operands in 0..max_operand, in a fixed (lexicographic) order."""
    return list(itertools.product(range(max_operand + 1), repeat=terms))


def make_splits(
    max_operand: int, eval_size: int, seed: int = 0, terms: int = 2
) -> Tuple[List[Row], List[Row]]:
    """Return (train, held_out) rows of {"prompt", "answer"} with no operand tuple in both.

    The split depends only on ``max_operand``, ``eval_size``, ``seed`` and ``terms`` so that every
    run with the same task settings holds out the same questions.
    """
    pairs = all_pairs(max_operand, terms)
    if not 0 < eval_size < len(pairs):
        raise ValueError(
            f"data.eval_size: must be between 1 and {len(pairs) - 1} for max_operand="
            f"{max_operand} ({len(pairs)} distinct questions), got {eval_size}"
        )
    random.Random(seed).shuffle(pairs)
    rows = [{"prompt": question(*ops), "answer": str(sum(ops))} for ops in pairs]
    return rows[eval_size:], rows[:eval_size]
