"""What user reward code may not do to the process that calls it.

While user code runs (a reward, or its module's import), stdout is stderr at both levels: Python's
``sys.stdout`` and file descriptor 1, so neither a ``print`` nor a subprocess (``os.system``) nor
a C extension writes into ``--json`` output. The streams it sees cannot be closed for us:
``sys.stdout.close()`` closes nothing, and descriptors 1 and 2 are put back afterwards even if it
closed them (``os.close(1)``). A child it forks that returns into our code ends there, silently,
so one process trains and writes the run, not two.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from typing import Iterator, Optional, TextIO


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
    (default: our stderr) and its descriptor 1 to descriptor 2; on exit, restore both streams and
    descriptors 1 and 2, and end a forked child that returns here."""
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
        with contextlib.redirect_stdout(_Unclosable(target)), contextlib.redirect_stderr(_Unclosable(errors)):
            yield
    finally:
        if os.getpid() != pid:  # a fork's child came back into our code: it must not train too
            os._exit(0)
        for stream in (target, errors):
            with contextlib.suppress(Exception):
                stream.flush()
        for fd, copy in saved.items():
            if copy is not None:
                os.dup2(copy, fd)
                os.close(copy)
