"""What user reward code may not do to the process that calls it.

While user code runs (a reward, or its module's import), stdout is stderr at both levels: Python's
``sys.stdout`` and file descriptor 1, so neither a ``print`` nor a subprocess (``os.system``) nor
a C extension writes into ``--json`` output. The streams it sees cannot be closed for us:
``sys.stdout.close()`` closes nothing, and descriptors 1 and 2 are put back afterwards even if it
closed them (``os.close(1)``). A child it forks that returns into our code ends there, silently,
so one process trains and writes the run, not two. ``os._exit(n)`` and ``os.abort()`` called by it
in our process raise ``ProcessExit`` instead (its error, like ``sys.exit``): a run that ends inside
a reward must never look like success to a shell. What no Python code can catch (SIGKILL, an
abort or a crash inside C code) still ends the process.

A ``KeyboardInterrupt`` user code raises itself is its error; one that a SIGINT raised (the user's
Ctrl-C) is not. Python's default SIGINT handler raises the same exception for both, so while user
code runs that handler is replaced by one that raises ``CtrlC`` (a KeyboardInterrupt) and records
the signal (``sigint_arrived``): the rule is then the same wherever user code runs (a training
step, every evaluation, ``eval``, ``reward``), whatever SIGINT handler is in force around it.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import sys
import threading
from typing import Any, Iterator, Optional, TextIO

_REAL_EXIT, _REAL_ABORT = os._exit, os.abort
_guarded_pid: Optional[int] = None  # the process whose user code runs now (None: none runs)
_sigint_seen = False  # a SIGINT arrived during the latest user-code block (or the one running)


class ProcessExit(BaseException):
    """``os._exit(n)`` or ``os.abort()`` called by user code: raised in their place, so the call
    ends the reward (as its error), not the process. A BaseException, as SystemExit is: user code's
    ``except Exception`` does not swallow it."""


def _exit(code: int) -> None:
    """``os._exit`` while user code runs: its error in our process; a forked child still exits."""
    if os.getpid() == _guarded_pid:
        raise ProcessExit(f"os._exit({code})")
    _REAL_EXIT(code)


def _abort() -> None:
    """``os.abort`` while user code runs: its error in our process; a forked child still aborts."""
    if os.getpid() == _guarded_pid:
        raise ProcessExit("os.abort()")
    _REAL_ABORT()


@contextlib.contextmanager
def _exits_intercepted() -> Iterator[None]:
    """Within the block, ``os._exit`` and ``os.abort`` (also as ``posix._exit``...) raise
    ProcessExit in this process; restored afterwards (nested blocks restore what they found)."""
    global _guarded_pid
    modules = [m for m in (os, sys.modules.get("posix")) if m is not None]
    saved = [(m, m._exit, m.abort) for m in modules]
    previous, _guarded_pid = _guarded_pid, os.getpid()
    for m in modules:
        m._exit, m.abort = _exit, _abort
    try:
        yield
    finally:
        _guarded_pid = previous
        for m, exit_, abort in saved:
            m._exit, m.abort = exit_, abort


class CtrlC(KeyboardInterrupt):
    """A SIGINT that arrived while user code ran: the user's Ctrl-C, never the code's own error."""


def sigint_arrived() -> bool:
    """Whether a SIGINT arrived while the user code now running (or the latest to run) ran."""
    return _sigint_seen


def _on_sigint(signum: int, frame: Any) -> None:
    global _sigint_seen
    _sigint_seen = True
    raise CtrlC()


@contextlib.contextmanager
def _sigint_told_apart() -> Iterator[None]:
    """Within the block, a SIGINT under Python's default handler raises ``CtrlC`` and is recorded
    for ``sigint_arrived``; any other handler (training's, which only sets a flag) stays, since a
    KeyboardInterrupt cannot come from it. Outside the main thread no signal handler runs at all."""
    global _sigint_seen
    previous_seen, _sigint_seen = _sigint_seen, False
    mine = (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
    previous = signal.signal(signal.SIGINT, _on_sigint) if mine else None
    try:
        yield
        if _sigint_seen:  # the code caught the Ctrl-C and went on: the user still asked to stop
            raise CtrlC()
    except BaseException as e:  # whatever the code raised after a real Ctrl-C: still the user's
        if _sigint_seen and not isinstance(e, CtrlC):
            raise CtrlC() from e
        raise
    finally:
        if mine:
            signal.signal(signal.SIGINT, previous)
        # Kept for the caller that reads it right after the block (a failed import); a nested
        # block's signal counts for the block around it.
        _sigint_seen = _sigint_seen or previous_seen


class _Unclosable(io.TextIOBase):
    """A text stream that writes to ``target`` and ignores ``close()`` (it is not the user's)."""

    def __init__(self, target: TextIO):
        self._target = target

    def write(self, text: str) -> int:
        return self._target.write(text)

    def flush(self) -> None:
        self._target.flush()

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:  # subprocess(stdout=sys.stdout) and faulthandler ask for it
        return self._target.fileno()

    def close(self) -> None:
        pass

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._target, "encoding", None) or "utf-8"

    def __getattr__(self, name: str):  # .buffer, .isatty ... of the stream written to
        if name == "_target":  # not set yet (copy, pickle): no endless recursion
            raise AttributeError(name)
        return getattr(self._target, name)

    @property
    def closed(self) -> bool:
        return False


def _dup(fd: int) -> Optional[int]:
    try:
        return os.dup(fd)
    except OSError:  # started with that descriptor closed: nothing to protect
        return None


@contextlib.contextmanager
def user_code(stdout: Optional[TextIO] = None, stderr: Optional[TextIO] = None) -> Iterator[None]:
    """Run user code with its Python-level stdout and stderr sent to ``stdout`` and ``stderr``
    (default: our stderr), its descriptor 1 to descriptor 2, ``os._exit``/``os.abort`` raising
    ProcessExit and a SIGINT told apart from the code's own KeyboardInterrupt (``CtrlC``); on
    exit, restore both streams, descriptors 1 and 2 and the SIGINT handler, and end a forked child
    that returns here."""
    pid = os.getpid()
    target = stdout if stdout is not None else sys.stderr
    errors = stderr if stderr is not None else sys.stderr
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = {fd: _dup(fd) for fd in (1, 2)}
    if saved[1] is not None and saved[2] is not None:
        os.dup2(saved[2], 1)
    try:
        with contextlib.redirect_stdout(_Unclosable(target)), contextlib.redirect_stderr(_Unclosable(errors)), \
                _exits_intercepted(), _sigint_told_apart():
            yield
    finally:
        if os.getpid() != pid:  # a fork's child came back into our code: it must not train too
            _REAL_EXIT(0)
        for stream in (target, errors):
            with contextlib.suppress(Exception):
                stream.flush()
        for fd, copy in saved.items():
            if copy is not None:
                os.dup2(copy, fd)
                os.close(copy)
