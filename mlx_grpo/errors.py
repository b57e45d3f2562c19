"""The two error families every command reports in one line, and the helper that quotes a library.

``UserError``: bad input the user can fix (a config key, a data file, a model path, a reward, an
output directory, a checkpoint); the message names the file, line or key; exit code 2, and
nothing of the user's is lost or half-written. ``RunFault``: a run stopped for a stated reason
(out of memory, non-finite losses, a lost peer process); exit code 1. ``cli.reported`` is the one
guard that turns either into ``error: <message>`` (``--debug``: the traceback).

Each module keeps its own named subclass (``ConfigError``, ``DataError``, ...), which also keeps
its older base (``ValueError``, ``RuntimeError``...) so that existing ``except`` clauses still hold.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input, named in the message: exit code 2."""

    exit_code = 2


class RunFault(Exception):
    """A run stopped for the reason in the message: exit code 1."""

    exit_code = 1


def first_line(e: BaseException) -> str:
    """The first line of ``e``'s message, or its type's name when it has none: what a one-line
    error quotes of a library's exception (MLX, mlx-lm, json, yaml)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
