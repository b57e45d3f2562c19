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

import reprlib
import unicodedata


class UserError(Exception):
    """Bad input, named in the message: exit code 2."""

    exit_code = 2


class RunFault(Exception):
    """A run stopped for the reason in the message: exit code 1."""

    exit_code = 1


QUOTE_LIMIT = 200  # characters of any one value an error message quotes


def first_line(e: BaseException) -> str:
    """The first line of ``e``'s message (at most QUOTE_LIMIT characters), its type's name when it
    has none, "(its message cannot be shown)" when its ``__str__`` itself raises: what a one-line
    error quotes of a library's or a user's exception (MLX, mlx-lm, json, yaml, a reward)."""
    return _message(e) or type(e).__name__


def described(e: BaseException) -> str:
    """``Type: first line of the message`` (``Type`` alone when it has none): how a one-line error
    names an exception raised by user code (a reward); ``--debug`` shows the whole of it."""
    text = _message(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _message(e: BaseException) -> str:
    """The first line of ``e``'s message, cut to QUOTE_LIMIT; "" when it has none."""
    try:
        text = str(e).strip()
    except Exception:  # a user exception whose __str__ fails must not replace the error it reports
        return "(its message cannot be shown)"
    return _cut(text.splitlines()[0]) if text else ""


def shown(value: object) -> str:
    """``repr(value)`` for an error message, at most QUOTE_LIMIT characters, never raising: a
    config value may be a billion-laughs YAML (shared lists that repr to gigabytes), 100k nested
    lists (repr recurses), an int of 5000 digits (Python refuses to print it) or a user object."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 600:
        return f"an integer of about {int(value.bit_length() * 0.30103)} digits"
    try:
        text = _QUOTER.repr(value)
    except Exception:  # a user object whose __repr__ fails
        text = f"<a {type(value).__name__}>"
    return _cut(text)


def printable(text: str, keep: str = "") -> str:
    """``text`` safe for a terminal and for any encoding's stdout: control characters (terminal
    escapes such as ESC[2J), format characters (bidi overrides), lone surrogates and unassigned
    code points are written as their Python escapes (``\\x1b``, ``\\ud800``); the characters in
    ``keep`` (e.g. newlines in a streamed completion) and spaces of every kind stay as they are.
    What a command prints of a model's or a user's text goes through here."""
    if text.isprintable():  # the usual case: nothing to do
        return text
    return "".join(c if c.isprintable() or c in keep or unicodedata.category(c) == "Zs"
                   else repr(c)[1:-1] for c in text)


def _cut(text: str) -> str:
    return text if len(text) <= QUOTE_LIMIT else text[: QUOTE_LIMIT - 3] + "..."


# reprlib bounds the work itself, not only the text: it stops at 4 levels and 12 items per level.
_QUOTER = reprlib.Repr()
_QUOTER.maxlevel, _QUOTER.maxstring, _QUOTER.maxother, _QUOTER.maxlong = 4, QUOTE_LIMIT, QUOTE_LIMIT, QUOTE_LIMIT
_QUOTER.maxlist = _QUOTER.maxtuple = _QUOTER.maxdict = _QUOTER.maxset = 12
