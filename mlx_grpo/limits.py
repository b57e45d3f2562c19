"""This machine's two limits, measured on the device MLX runs on (``mx.default_device()``).

- ``measure_bandwidth``: memory bandwidth, GB/s: a large float32 array summed (read once, nothing
  written), bytes read / time (on the CPU backend, the faster of MLX's sum and NumPy's, NumPy's
  over as many threads as the step's products use: one core alone reads about half of what two do);
- ``measure_matmul``: float32 matmul throughput, GFLOP/s: an n x n x n product, 2 n^3 / time.

Each is the best of a few timings after a warm-up: the best is the nearest to what the hardware
can do (a shared machine only ever makes a timing slower). A device that finishes one run in
microseconds (a GPU) repeats it within each timing until the timing lasts ``min_seconds``, so
launch and clock overheads do not dominate. ``bounds.py`` turns these into the shortest time each
stage of a GRPO step could take.
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict

import mlx.core as mx
import numpy as np


def _sync() -> None:
    """Wait for the device to finish everything queued (``mx.synchronize`` where MLX has it)."""
    sync = getattr(mx, "synchronize", None)
    if sync is not None:
        sync()


def best_seconds(run: Callable[[], mx.array], reps: int = 3, min_seconds: float = 0.05) -> float:
    """Seconds of one ``run()`` (evaluated): the best of ``reps`` timings after one warm-up; each
    timing repeats ``run`` as often as it takes to last about ``min_seconds`` (0: once)."""
    mx.eval(run())  # warm-up: kernels, the allocator's buffers
    _sync()
    t = time.perf_counter()
    mx.eval(run())
    _sync()
    once = time.perf_counter() - t
    inner = max(1, math.ceil(min_seconds / max(once, 1e-9)))
    best = math.inf
    for _ in range(max(1, reps)):
        t = time.perf_counter()
        for _ in range(inner):
            mx.eval(run())  # one at a time: queued outputs of a copy-like op would pile up in memory
        _sync()
        best = min(best, (time.perf_counter() - t) / inner)
    return best


def measure_bandwidth(megabytes: float = 256.0, reps: int = 3, min_seconds: float = 0.05) -> float:
    """Memory bandwidth, GB/s: a float32 array of ``megabytes`` MB summed; bytes read / seconds.

    The default is far larger than any CPU cache, so the array streams from memory, as a decode
    step's weights do. A sum writes nothing back, like a decode step reading its weights. On the
    CPU backend the same buffer is also summed by NumPy and the faster sum counts: MLX's CPU
    reduction runs on one thread without vector loads and measured the reduction, not the memory
    (4.7 GB/s here, where NumPy reads the same buffer at 25.8 GB/s and BLAS streams a 2-thread
    matrix-vector product's weights at 9.2). NumPy sums an array of its own in ``cpu_threads()``
    slices at once: one thread read 16.4 GB/s on a 2-core machine where two read 32.2, and the
    decode's products run on both. Its own, because NumPy asks Linux for huge pages for large
    arrays and MLX's allocations stay on 4 KB pages, whose reads by plain sums run at half the rate
    (two threads: 14.9 against 30.2 GB/s here); the memory's rate is what bounds a stage, and the
    decode kernel (``skinny.py``) streams MLX's weights faster than those sums (a 113 MB head at
    20 GB/s).
    """
    n = max(1, int(megabytes * 1e6) // 4)
    a = mx.ones((n,), dtype=mx.float32)
    mx.eval(a)
    seconds = best_seconds(lambda: a.sum(), reps, min_seconds)
    if mx.default_device().type == mx.cpu:
        parts = np.array_split(np.ones(n, dtype=np.float32), cpu_threads())
        with ThreadPoolExecutor(len(parts)) as pool:  # NumPy lets go of the GIL while it sums
            def host_sum() -> float:
                return float(sum(pool.map(np.sum, parts)))

            seconds = min(seconds, best_seconds(host_sum, reps, min_seconds))  # mx.eval lets a float pass
    return a.nbytes / seconds / 1e9


def cpu_threads() -> int:
    """The threads the step's products run on (``blas.threads_or_cores``): the preloaded BLAS's,
    as the matmul probe and the decode kernel use, else the cores this process may use."""
    from . import blas

    return blas.threads_or_cores(dict(os.environ))


def measure_matmul(n: int = 2048, reps: int = 3, min_seconds: float = 0.05) -> float:
    """Float32 matmul throughput, GFLOP/s: an ``n`` x ``n`` by ``n`` x ``n`` product, 2 n^3 / seconds.

    2048 is 17 GFLOP: a fraction of a second on CPU cores with a good BLAS; a GPU repeats it
    within each timing (``min_seconds``).
    """
    a = mx.random.normal((n, n), dtype=mx.float32)
    b = mx.random.normal((n, n), dtype=mx.float32)
    mx.eval(a, b)
    seconds = best_seconds(lambda: a @ b, reps, min_seconds)
    return 2.0 * n**3 / seconds / 1e9


def measure_limits(megabytes: float = 256.0, n: int = 2048, reps: int = 3,
                   min_seconds: float = 0.05) -> Dict[str, float]:
    """Both limits on the default device: {"bandwidth_gbs", "matmul_gflops"} (JSON-ready)."""
    out = {
        "bandwidth_gbs": measure_bandwidth(megabytes, reps, min_seconds),
        "matmul_gflops": measure_matmul(n, reps, min_seconds),
    }
    # The probes' buffers would otherwise stay in MLX's cache and count in the footprint the
    # benchmarks measure next.
    mx.clear_cache()
    return out
