"""Shared pieces of the one-line error contract (bad input: one line, exit 2)."""

from __future__ import annotations


def first_line(e: BaseException) -> str:
    """The first line of ``e``'s message, or its type's name when it has none: what a one-line
    error quotes of a library's exception (MLX, mlx-lm, json, yaml)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
