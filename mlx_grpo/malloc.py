"""tcmalloc for MLX's CPU backend on Linux, preloaded on the restart that preloads the BLAS.

MLX builds every pass as a graph of C++ arrays and frees it afterwards: a SmolLM2 update (16
rows, two lanes) is ~118,000 nodes, one decode step 2,510. Under glibc's malloc the thread that
builds and dispatches those graphs spent half of its time allocating and freeing (``perf``:
``_int_malloc`` alone 27% of its samples, 1.3 s of CPU an update), on cores it shares with the
lanes that compute. tcmalloc keeps a cache of small blocks per thread: measured in separate
processes, alternating, that thread's CPU went 1.27-1.36 -> 0.83-0.86 s an update, the update
5.25-5.67 -> 4.54-4.77 s and the whole SmolLM2 step 15.07-15.20 -> 14.29-14.51 s; the embedded
default's steps ~8% faster. jemalloc gave about half of that (update 4.99-5.10 s). The cost:
tcmalloc returns freed memory to the system later, so the process's resident size is higher
(SmolLM2: 2.69 -> 2.96 GB at most; MLX's own peak, what the memory estimate predicts, unchanged).

Found where distributions install it (Debian/Ubuntu: ``apt-get install libtcmalloc-minimal4``;
Fedora: gperftools-libs). ``MLX_GRPO_NO_TCMALLOC=1`` keeps the system allocator,
``MLX_GRPO_MALLOC_LIB`` names another library to preload instead (jemalloc, say); an allocator
already in ``LD_PRELOAD`` is left as it is.
"""

from __future__ import annotations

import os
from typing import Dict, List, Optional

CANDIDATES = [
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
    "/usr/lib/libtcmalloc_minimal.so.4",
]
ALLOCATORS = ("libtcmalloc", "libjemalloc", "libmimalloc")  # library names that replace malloc
OFF = "MLX_GRPO_NO_TCMALLOC"
EXPLICIT = "MLX_GRPO_MALLOC_LIB"
# Some tcmalloc builds write a stack trace to stderr for every allocation above this many bytes
# (1 GB by default), which a large model's weights would print (Debian 12's 2.10 does not). Raised
# unless the user set it.
REPORT = "TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"
NEVER = str(1 << 62)


def preloads(env: Dict[str, str]) -> List[str]:
    """The libraries in LD_PRELOAD, in order (the loader takes colons and spaces between them)."""
    return [p for p in env.get("LD_PRELOAD", "").replace(" ", ":").split(":") if p]


def preloaded(env: Dict[str, str]) -> Optional[str]:
    """The allocator already in LD_PRELOAD, if any."""
    return next((p for p in preloads(env) if os.path.basename(p).startswith(ALLOCATORS)), None)


def find(env: Dict[str, str]) -> Optional[str]:
    """The allocator to preload: ``MLX_GRPO_MALLOC_LIB`` when it exists, else the first tcmalloc
    installed; None when turned off (``MLX_GRPO_NO_TCMALLOC``) or none is found."""
    if env.get(OFF):
        return None
    explicit = env.get(EXPLICIT)
    if explicit:
        return explicit if os.path.exists(explicit) else None
    return next((p for p in CANDIDATES if os.path.exists(p)), None)


def restart_env(env: Dict[str, str]) -> Dict[str, str]:
    """What a restart adds for the allocator: ``{"LD_PRELOAD": lib}`` and tcmalloc's
    large-allocation report raised out of reach; {} when none is found or one is preloaded."""
    if preloaded(env):
        return {}
    lib = find(env)
    if lib is None:
        return {}
    out = {"LD_PRELOAD": lib}
    if os.path.basename(lib).startswith("libtcmalloc") and REPORT not in env:
        out[REPORT] = NEVER
    return out


def describe(env: Dict[str, str]) -> str:
    """", malloc <library>" when an allocator is preloaded, else ""."""
    lib = preloaded(env)
    return f", malloc {os.path.basename(lib)}" if lib else ""
