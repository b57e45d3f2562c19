"""Ctrl-C and SIGTERM: stop at a step boundary with a checkpoint, instead of losing the run.

The first SIGINT or SIGTERM only raises a flag: the loop finishes the step in progress, writes a
checkpoint and raises ``Interrupted``. A second signal stops at once (dropping the step in
progress; the last checkpoint stays), except while a checkpoint is being written: that finishes
first, so a checkpoint directory is never left half-written by a signal.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path
from typing import Callable, Iterator, Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """The run stopped on a signal. ``exit_code`` is the shell's convention: 128 + the signal."""

    def __init__(self, signum: int, run_dir: Optional[Path] = None, checkpoint: Optional[Path] = None):
        super().__init__(signum, run_dir, checkpoint)
        self.signum, self.run_dir, self.checkpoint = signum, run_dir, checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        name = signal.Signals(self.signum).name
        if self.checkpoint is None:
            return f"{name}: stopped before the first checkpoint; nothing to resume"
        from .distributed import size

        # Several processes: the same launch line again, with --resume (the launcher's own
        # arguments are not known here).
        launch = f"mlx.launch -n {size()} <same launch arguments> -- " if size() > 1 else ""
        return (f"{name}: stopped; last checkpoint {self.checkpoint}\n"
                f"resume with: {launch}python cli.py train --resume {self.run_dir}")


class StopFlag:
    """Set by the first signal; read by the loop between steps."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self.saving = False  # a checkpoint is being written: a second signal waits for it

    @contextlib.contextmanager
    def uninterruptible(self) -> Iterator[None]:
        self.saving = True
        try:
            yield
        finally:
            self.saving = False


@contextlib.contextmanager
def stop_on_signals(say: Callable[[str], None]) -> Iterator[StopFlag]:
    """Within the block, SIGINT/SIGTERM set the returned flag; a second one raises ``Interrupted``.

    Outside the main thread (where Python cannot install handlers) the flag is never set.
    """
    flag = StopFlag()

    def handler(signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if flag.signum is None:
            flag.signum = signum
            say(f"\n{name}: finishing this step and saving a checkpoint (send it again to stop at once)")
        elif not flag.saving:
            raise Interrupted(signum)

    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
