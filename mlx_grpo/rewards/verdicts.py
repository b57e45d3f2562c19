"""Verdicts of a slow comparison, judged in a background thread, each awaited a bounded time.

math-verify's LaTeX parser (ANTLR, pure Python) spends 100-250 ms on its first sight of a long
answer shape (a tuple of roots and fractions of pi) and a millisecond a token once it has seen
it; a reward must not wait that long. A ``Verifier`` judges each pair in one background thread,
and the caller waits for the verdict at most ``wait`` seconds: a verdict not ready by then is no
verdict (the caller's no match), while the thread finishes it and keeps it, so the pair's next
sight gets it at once. Stopping a comparison instead would lose its work: the parser learns a
shape only from a parse that ends (measured: a 240 ms shape stopped at 50 ms eight times in a row
never got faster).

A comparison still running after ``limit`` seconds is stopped (an exception raised in its thread,
a BaseException so no ``except Exception`` in the code it stops swallows it) and judged no match.
"""

from __future__ import annotations

import ctypes
import os
import threading
import weakref
from typing import Callable, Dict, Optional, Tuple

Pair = Tuple[str, str]


class OverTime(BaseException):
    """Raised in the verifier's thread when a comparison runs past its limit."""


def _raise_in(thread_id: int, exc: Optional[type]) -> None:
    """Raise ``exc`` in the thread ``thread_id`` at its next Python instruction (None: withdraw
    one not yet raised)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id),
                                               ctypes.py_object(exc) if exc is not None else None)


class Verifier:
    """``compare(a, b) -> bool`` judged in a background thread, each pair once (up to ``keep``
    verdicts kept), at most ``pending`` pairs queued (past that a new pair gets no verdict and is
    not queued), each comparison stopped after ``limit`` seconds (no match)."""

    def __init__(self, compare: Callable[[str, str], bool], limit: float, keep: int = 8192,
                 pending: int = 256) -> None:
        self._compare, self._limit, self._keep, self._pending = compare, limit, keep, pending
        self._reset()
        # A forked child has no copy of the thread, and may have copied a lock held by it.
        me = weakref.ref(self)

        def reset_in_child() -> None:
            verifier = me()
            if verifier is not None:
                verifier._reset()

        os.register_at_fork(after_in_child=reset_in_child)

    def _reset(self) -> None:
        self._cond = threading.Condition()
        self._todo: Dict[Pair, None] = {}  # in arrival order
        self._done: Dict[Pair, bool] = {}
        self._thread: Optional[threading.Thread] = None
        self._stop_lock = threading.Lock()
        self._job: Optional[object] = None  # the comparison running now (a token)

    def judge(self, a: str, b: str, wait: Optional[float]) -> Optional[bool]:
        """The verdict on ``(a, b)``, waiting at most ``wait`` seconds for it (None: until it is
        decided); None when it is not decided by then (it goes on being judged)."""
        key = (a, b)
        with self._cond:
            if key in self._done:
                return self._done[key]
            if key not in self._todo:
                if len(self._todo) >= self._pending:
                    return None
                self._todo[key] = None
                if self._thread is None or not self._thread.is_alive():
                    self._thread = threading.Thread(target=self._run, name="mlx-grpo-verifier", daemon=True)
                    self._thread.start()
                self._cond.notify_all()
            self._cond.wait_for(lambda: key in self._done, timeout=wait)
            return self._done.get(key)

    def _run(self) -> None:
        while True:
            try:  # an OverTime delivered after its comparison had ended lands here: no match
                with self._cond:
                    self._cond.wait_for(lambda: self._todo)
                    key = next(iter(self._todo))
                verdict = False
                verdict = self._timed(key)
            except OverTime:
                pass
            with self._cond:
                self._todo.pop(key, None)
                if len(self._done) >= self._keep:
                    self._done.clear()
                self._done[key] = verdict
                self._cond.notify_all()

    def _timed(self, key: Pair) -> bool:
        me, token = threading.get_ident(), object()
        with self._stop_lock:
            self._job = token
        timer = threading.Timer(self._limit, self._stop, (token, me))
        timer.daemon = True
        timer.start()
        try:
            return bool(self._compare(*key))
        except OverTime:
            return False
        finally:
            timer.cancel()
            with self._stop_lock:  # past this, the timer raises nothing: none is left pending
                self._job = None
                _raise_in(me, None)

    def _stop(self, token: object, thread_id: int) -> None:
        with self._stop_lock:
            if self._job is token:
                _raise_in(thread_id, OverTime)
