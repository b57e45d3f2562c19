"""The countdown task (TinyZero): reach a target from given numbers with + - * /, each number used
exactly once. Generated offline from a seed.

Every puzzle is built from a random expression over its numbers, so each one has a solution (kept
in the ``solution`` column). Puzzles are distinct as (sorted numbers, target), and each one goes to
exactly one split, so no held-out puzzle is ever a GRPO prompt.
"""

from __future__ import annotations

import operator
import random
from fractions import Fraction
from typing import Any, Dict, List, Optional, Tuple

from ..config import CountdownConfig

Row = Dict[str, Any]
_OPS = [("+", operator.add), ("-", operator.sub), ("*", operator.mul), ("/", operator.truediv)]


def question(numbers: List[int], target: int) -> str:
    """The question text: the numbers, the target and the rules."""
    listed = ", ".join(str(n) for n in numbers)
    return (
        f"Using the numbers [{listed}], create an equation that equals {target}. "
        "You can use + - * / and parentheses, and each number exactly once. "
        "Write only the equation in the answer, e.g. (1 + 2) * 3"
    )


def random_solution(rng: random.Random, numbers: List[int]) -> Optional[Tuple[Fraction, str]]:
    """(value, expression) of a random expression that uses each number once; None on a division
    by zero."""
    pool: List[Tuple[Fraction, str]] = [(Fraction(n), str(n)) for n in numbers]
    while len(pool) > 1:
        i, j = rng.sample(range(len(pool)), 2)
        (a, ea), (b, eb) = pool[i], pool[j]
        symbol, op = rng.choice(_OPS)
        if symbol == "/" and b == 0:
            return None
        pool = [p for k, p in enumerate(pool) if k not in (i, j)]
        pool.append((op(a, b), f"({ea} {symbol} {eb})"))
    value, expr = pool[0]
    return value, expr[1:-1] if expr.startswith("(") and len(numbers) > 1 else expr


def make_puzzles(cfg: CountdownConfig, seed: int) -> List[Row]:
    """``cfg.size`` distinct solvable puzzles, in a seeded random order."""
    rng = random.Random(seed)
    seen = set()
    rows: List[Row] = []
    attempts = 0
    while len(rows) < cfg.size:
        attempts += 1
        if attempts > 200 * cfg.size + 10_000:
            raise ValueError(
                f"data.countdown: only {len(rows)} distinct puzzles found for size {cfg.size} "
                f"(numbers {cfg.numbers}, max_number {cfg.max_number}, max_target {cfg.max_target}); "
                "lower size or widen the ranges"
            )
        numbers = [rng.randint(1, cfg.max_number) for _ in range(cfg.numbers)]
        found = random_solution(rng, numbers)
        if found is None:
            continue
        value, expr = found
        if value.denominator != 1 or not 1 <= value <= cfg.max_target:
            continue
        key = (tuple(sorted(numbers)), int(value))
        if key in seen:
            continue
        seen.add(key)
        rows.append({"prompt": question(numbers, int(value)), "numbers": numbers,
                     "target": int(value), "solution": expr})
    return rows


def make_splits(cfg: CountdownConfig, eval_size: int, seed: int = 0) -> Tuple[List[Row], List[Row]]:
    """(train, held_out): the first ``eval_size`` puzzles are held out, the rest train."""
    if not 0 < eval_size < cfg.size:
        raise ValueError(
            f"data.eval_size: must be between 1 and {cfg.size - 1} for data.countdown.size={cfg.size}, "
            f"got {eval_size}"
        )
    rows = make_puzzles(cfg, seed)
    return rows[eval_size:], rows[:eval_size]
