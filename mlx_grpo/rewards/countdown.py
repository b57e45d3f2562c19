"""The countdown reward: an arithmetic expression that uses each given number exactly once and
equals the target (TinyZero's task), read without eval().

The usual ways of writing it are read: ``×``, ``·``, ``\\times``, ``\\cdot`` or an ``x`` between
operands for ``*``, ``÷`` for ``/``, the target on either side of ``=``, trailing punctuation, and an
expression broken over lines. It is then checked in two ways before it is computed: its
characters (digits, spaces, ``+ - * / ( )``), then its syntax tree, node by node, against a
whitelist (numbers, the four operations, unary signs). Values are exact fractions, so
``(6 / 4) * 2`` is 3, not 2.9999.
"""

from __future__ import annotations

import ast
import operator
import re
from fractions import Fraction
from typing import Any, List, Optional, Sequence, Tuple

from .answers import extract_answer, strip_trailing

MAX_EXPRESSION_CHARS = 200
_ALLOWED_CHARS_RE = re.compile(r"[\d\s+\-*/().]*")
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_SYMBOLS = {"\\times": "*", "\\cdot": "*", "\\ast": "*", "\\div": "/", "\\left": "", "\\right": "",
            "×": "*", "·": "*", "⋅": "*", "∙": "*", "∗": "*", "÷": "/", "∕": "/", "−": "-", "–": "-"}
_LETTER_TIMES_RE = re.compile(r"[xX](?<=[\d)\s].)(?=[\s\d(])")  # 3 x 4, (1 + 2)x3


def evaluate_expression(text: str) -> Optional[Tuple[Fraction, List[int]]]:
    """(value, the integers written in it) of an arithmetic expression, or None when it is not one.

    Allowed: non-negative integer literals, ``+ - * /``, unary signs and parentheses. Anything
    else (names, calls, powers, floats, a division by zero, more than 200 characters) is None.
    """
    # One line ("1 +\n2" is not Python). Splitting stops after the most pieces a valid expression
    # can have, so a megabyte of words costs no more than a short answer.
    limit = 8 * MAX_EXPRESSION_CHARS  # generous: every operator may be a LaTeX command
    pieces = text.split(maxsplit=limit)
    if len(pieces) > limit:
        return None
    text = " ".join(pieces)
    if len(text) > limit:
        return None
    for symbol, plain in _SYMBOLS.items():
        text = text.replace(symbol, plain)
    text = _LETTER_TIMES_RE.sub("*", text)
    if not text or len(text) > MAX_EXPRESSION_CHARS or not _ALLOWED_CHARS_RE.fullmatch(text):
        return None
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    used: List[int] = []

    def value(node: ast.AST) -> Fraction:
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return _BINARY[type(node.op)](value(node.left), value(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
            return _UNARY[type(node.op)](value(node.operand))
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        raise ValueError(f"not allowed: {type(node).__name__}")

    try:
        return value(tree.body), used
    except (ValueError, ZeroDivisionError, RecursionError):
        return None


def countdown_correct(answer: Optional[str], numbers: Sequence[Any], target: Any) -> bool:
    """Whether ``answer`` ("expr", "expr = target" or "target = expr") uses every number of ``numbers`` exactly once
    and equals ``target``."""
    if answer is None:
        return False
    try:
        given = sorted(int(n) for n in numbers)
        goal = Fraction(int(target))
    except (TypeError, ValueError):
        return False
    sides = strip_trailing(answer, ".,;:").split("=")  # not "!": 3! is a factorial
    if len(sides) == 1:
        return _solves(sides[0], given, goal)
    if len(sides) != 2:
        return False
    # "expr = 24" or "24 = expr": one side solves it, the other is worth the target.
    return any(_solves(sides[i], given, goal) and _worth(sides[1 - i], goal) for i in (0, 1))


def _solves(expression: str, given: List[int], goal: Fraction) -> bool:
    found = evaluate_expression(expression)
    return found is not None and sorted(found[1]) == given and found[0] == goal


def _worth(expression: str, goal: Fraction) -> bool:
    found = evaluate_expression(expression)
    return found is not None and found[0] == goal


def countdown_reward(
    prompts: List[str],
    completions: List[str],
    numbers: Optional[Sequence[Sequence[Any]]] = None,
    target: Optional[Sequence[Any]] = None,
    nums: Optional[Sequence[Sequence[Any]]] = None,
    **_,
) -> List[Optional[float]]:
    """1.0 when the last <answer> is an expression that uses each of the row's ``numbers`` (or
    TinyZero's ``nums``) exactly once and equals its ``target``, else 0.0; None for rows without
    them. Range [0, 1]."""
    numbers = numbers if numbers is not None else nums
    if numbers is None or target is None:
        return [None] * len(completions)
    return [
        None if ns is None or t is None else float(countdown_correct(extract_answer(c), ns, t))
        for c, ns, t in zip(completions, numbers, target)
    ]
