"""Lanes: the rows of a scoring or update pass split in two, each half on its own CPU stream.

MLX's CPU backend runs its element-wise work (norms, softmaxes, SwiGLU, LoRA's adds, the
gradient's sums) on one thread per stream; only the BLAS products use every core. In a SmolLM2
update that leaves one of two cores idle for about half the time (``perf``: OpenBLAS's second
thread spinning). Two halves of the rows on two MLX CPU streams, with the BLAS on one thread
each, keep both cores busy: the update 6.3-7.0 -> 5.5-5.8 s on 2 cores (docs/performance.md).

Two things make it work, and the module sees to both:

- MLX orders a graph for evaluation breadth-first only up to ``MLX_BFS_MAX_WIDTH`` (default 20)
  nodes, then depth-first, so the first half is queued almost whole before the second starts and
  the streams take turns instead of running side by side. MLX reads the setting once, at its
  first evaluation, so it is set when this package is imported (``prepare``), on the CPU
  backend only, and only when nothing has been evaluated yet; a user's own value is kept.
  Measured with it and without (the whole pipeline on one stream): the same step times and
  peak memory.
- Two streams that each call a two-thread BLAS oversubscribe the cores (the update 11-12 s):
  the BLAS runs on one thread while lanes run (``single_blas``).

A lane's rows are cut at a prompt's boundary where one is near the middle, so each prompt's
prefill runs in one lane. Results are the same as one pass up to float32 rounding (the gradient
is summed in a different order).
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Dict, Iterator, List, Optional

import mlx.core as mx
import numpy as np

from . import blas

BFS_ENV = "MLX_BFS_MAX_WIDTH"
BFS_WIDTH = 1_000_000  # wider than any step's graph: breadth-first throughout
LANES = 2

_ready: Optional[bool] = None  # MLX's ordering allows lanes (set by prepare)
_streams: Dict[int, List[mx.Stream]] = {}  # per thread: MLX streams belong to their thread


def prepare(env: Optional[Dict[str, str]] = None) -> bool:
    """Let MLX order graphs breadth-first (``BFS_ENV``) when that can still take effect: on the
    CPU backend, before MLX's first evaluation, and not against a value the user set. Returns
    whether lanes can run side by side in this process. Called once, at import."""
    global _ready
    env = os.environ if env is None else env
    if _ready is not None:
        return _ready
    own = env.get(BFS_ENV)
    if own is not None:
        try:
            _ready = int(own) >= BFS_WIDTH
        except ValueError:
            _ready = False
    elif mx.default_device() == mx.cpu and mx.get_peak_memory() == 0:
        env[BFS_ENV] = str(BFS_WIDTH)  # nothing evaluated yet: MLX reads it at its first eval
        _ready = True
    else:
        _ready = False
    return _ready


def count(rows: int, wanted: int = LANES) -> int:
    """How many lanes a pass over ``rows`` rows takes: ``wanted`` (at most one per row) on the
    CPU backend when MLX orders graphs breadth-first and the BLAS may use as many threads as
    lanes; else 1."""
    if wanted <= 1 or rows < 2 or not _ready or mx.default_device() != mx.cpu:
        return 1
    return max(1, min(wanted, rows, _blas_threads()))


def split(row_prompt: np.ndarray, lanes: int) -> List[slice]:
    """``lanes`` contiguous slices of the rows, cut where a row's prompt changes nearest to an
    equal share (so a prompt's rows share one lane and its prefill runs once), or at an equal
    share when the prompt does not change near it."""
    n = len(row_prompt)
    lanes = max(1, min(lanes, n))
    changes = [i for i in range(1, n) if row_prompt[i] != row_prompt[i - 1]]
    cuts = [0]
    for k in range(1, lanes):
        target = round(k * n / lanes)
        near = [c for c in changes if c > cuts[-1] and abs(c - target) <= n / (2 * lanes)]
        cut = min(near, key=lambda c: abs(c - target)) if near else target
        if cuts[-1] < cut < n:
            cuts.append(cut)
    bounds = cuts + [n]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def each(row_prompt: np.ndarray, lanes: int) -> Iterator[slice]:
    """The rows of each lane (``split``), each yielded while its own stream is the default, so
    what the caller builds for those rows runs on that lane's stream."""
    for rows, stream in zip(split(row_prompt, lanes), streams(lanes)):
        with mx.stream(stream):
            yield rows


def streams(lanes: int) -> List[mx.Stream]:
    """``lanes`` CPU streams of this thread, made once."""
    own = _streams.setdefault(threading.get_ident(), [])
    while len(own) < lanes:
        own.append(mx.new_stream(mx.cpu))
    return own[:lanes]


@contextlib.contextmanager
def single_blas(active: bool) -> Iterator[None]:
    """Within the block the preloaded BLAS runs on one thread (when ``active``); its thread
    count is restored afterwards."""
    env = dict(os.environ)
    before = blas.threads(env) if active else None
    if before is None or before <= 1:
        yield
        return
    blas.limit_threads(1, env)
    try:
        yield
    finally:
        blas.limit_threads(before, env)


def _blas_threads() -> int:
    """The threads the BLAS may use now (the cores this process may use when no BLAS is
    preloaded): a run limited to one (OPENBLAS_NUM_THREADS=1 beside other runs) keeps one lane."""
    return blas.threads_or_cores(dict(os.environ))
