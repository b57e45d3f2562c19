"""A fast BLAS for MLX's CPU backend on Linux.

The ``mlx[cpu]`` wheel links a reference BLAS that is 10-19x slower at matmuls than OpenBLAS or
MKL. Both export the standard cblas symbols, so loading one first (LD_PRELOAD) makes MLX use it,
with results equal up to float32 rounding. The dynamic loader reads LD_PRELOAD only at process
start, so the CLI re-executes itself once with it set (``maybe_reexec``).
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
from typing import Dict, List, Optional

# Candidates in order of preference; each exports plain (unprefixed) cblas_sgemm.
CANDIDATES = [
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
]
MARKER = "MLX_GRPO_BLAS"  # set on re-exec so it happens at most once
HINT = (
    "MLX's CPU backend is using its bundled reference BLAS (slow); for a 5-15x faster CPU run "
    "install OpenBLAS (Debian/Ubuntu: apt-get install libopenblas0-pthread) or set "
    "MLX_GRPO_BLAS_LIB to a libopenblas/libmkl_rt path"
)


def _mkl_candidates() -> List[str]:
    found: List[str] = []
    for base in {sys.prefix, sys.base_prefix}:
        found += sorted(glob.glob(os.path.join(base, "lib", "libmkl_rt.so*")))
    return found


def find_fast_blas(env: Dict[str, str]) -> Optional[str]:
    """The first fast BLAS library found (an explicit MLX_GRPO_BLAS_LIB wins), or None."""
    explicit = env.get("MLX_GRPO_BLAS_LIB")
    if explicit:
        return explicit if os.path.exists(explicit) else None
    for path in CANDIDATES + _mkl_candidates():
        if os.path.exists(path):
            return path
    return None


def preloaded(env: Dict[str, str]) -> Optional[str]:
    """The fast BLAS already in LD_PRELOAD, if any."""
    for item in env.get("LD_PRELOAD", "").replace(" ", ":").split(":"):
        name = os.path.basename(item)
        if name.startswith(("libopenblas", "libmkl_rt", "libblis")):
            return item
    return None


def cpu_backend_in_use() -> bool:
    """True on Linux when MLX computes on the CPU (no CUDA device)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import mlx.core as mx

        return not mx.cuda.is_available()
    except Exception:  # an mlx without the cuda module: the CPU build
        return True


def reexec_env(env: Dict[str, str]) -> Optional[Dict[str, str]]:
    """The environment to restart with (a fast BLAS preloaded), or None when no restart helps."""
    if env.get(MARKER) or env.get("MLX_GRPO_NO_FAST_BLAS") or preloaded(env):
        return None
    if not cpu_backend_in_use():
        return None
    lib = find_fast_blas(env)
    if lib is None:
        return None
    new_env = dict(env)
    new_env["LD_PRELOAD"] = ":".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
    new_env[MARKER] = lib
    return new_env


def maybe_reexec(argv: List[str], env: Dict[str, str]) -> None:
    """Re-execute ``python argv...`` with a fast BLAS preloaded when that helps; else return."""
    new_env = reexec_env(env)
    if new_env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + argv, new_env)


def limit_threads(n: int, env: Dict[str, str]) -> bool:
    """Cap the preloaded BLAS at ``n`` threads (processes sharing a machine would otherwise each
    start one per core, and their spinning threads starve each other); True when it applied."""
    lib = preloaded(env)
    if lib is None:
        return False
    try:
        handle = ctypes.CDLL(lib)
    except OSError:
        return False
    for name in ("openblas_set_num_threads", "MKL_Set_Num_Threads", "bli_thread_set_num_threads"):
        fn = getattr(handle, name, None)
        if fn is not None:
            fn(ctypes.c_int(n))
            return True
    return False


def describe(env: Dict[str, str]) -> str:
    """One line: which device and BLAS this run computes with."""
    import mlx.core as mx

    if sys.platform == "darwin":
        return f"device {mx.default_device()} (Metal / Accelerate)"
    if not cpu_backend_in_use():
        return f"device {mx.default_device()} (CUDA)"
    lib = preloaded(env)
    if lib:
        return f"device cpu, BLAS {os.path.basename(lib)} (fast)"
    return f"device cpu, bundled reference BLAS -- {HINT}"
