"""A fast BLAS for MLX's CPU backend on Linux.

The ``mlx[cpu]`` wheel links a reference BLAS that is 10-19x slower at matmuls than OpenBLAS or
MKL. Both export the standard cblas symbols, so loading one first (LD_PRELOAD) makes MLX use it,
with results equal up to float32 rounding. The dynamic loader reads LD_PRELOAD only at process
start, so the CLI re-executes itself once with it set (``maybe_reexec``).

OpenBLAS built with DYNAMIC_ARCH (Debian's, most distributions') picks its kernels from the CPU's
model number, and a release older than the CPU falls back to its oldest x86-64 kernels: Debian
12's OpenBLAS 0.3.21 takes a current Xeon for a "Prescott" (SSE3), 37 GFLOP/s at a 630 x 896 x
4864 float32 matmul where its SkylakeX (AVX-512) kernels give 260 (measured here). The restart
therefore also sets ``OPENBLAS_CORETYPE`` from the CPU's own feature flags when OpenBLAS's
detection is weaker than they allow (``core_override``); a user's own setting always wins.
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

from . import malloc, skinny

# Candidates in order of preference; each exports plain (unprefixed) cblas_sgemm.
CANDIDATES = [
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblasp.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
]
MARKER = "MLX_GRPO_BLAS"  # set on re-exec so it happens at most once
CORETYPE = "OPENBLAS_CORETYPE"
PTX_CACHE = "MLX_PTX_CACHE_DIR"  # where MLX's CUDA build keeps the kernels it compiled
# OpenBLAS's core names (lower case, as openblas_get_corename gives them) by the widest vector
# instructions their kernels use; a CPU whose flags allow more than the detected core gets more.
AVX512_CORES = {"skylakex", "cooperlake", "sapphirerapids"}
AVX2_CORES = AVX512_CORES | {"haswell", "zen"}
AVX512_FLAGS = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}
AVX2_FLAGS = {"avx2", "fma"}
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
    names = ("libopenblas", "libmkl_rt", "libblis")
    return next((p for p in malloc.preloads(env) if os.path.basename(p).startswith(names)), None)


def cpu_flags(path: str = "/proc/cpuinfo") -> set:
    """The first CPU's feature flags (Linux), or an empty set where they cannot be read."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def openblas_core(lib: str) -> Optional[str]:
    """The core OpenBLAS chose for this CPU (lower case), or None if ``lib`` is not OpenBLAS."""
    try:
        fn = getattr(ctypes.CDLL(lib), "openblas_get_corename", None)
    except OSError:
        return None
    if fn is None:
        return None
    fn.restype = ctypes.c_char_p
    name = fn()
    return name.decode(errors="replace").strip().lower() if name else None


def core_override(detected: Optional[str], flags: set) -> Optional[str]:
    """The OPENBLAS_CORETYPE to run with when OpenBLAS detected a core weaker than the CPU's
    flags allow (an OpenBLAS older than the CPU), else None."""
    if detected is None:
        return None
    if AVX512_FLAGS <= flags and detected not in AVX512_CORES:
        return "SkylakeX"
    if AVX2_FLAGS <= flags and detected not in AVX2_CORES:
        return "Haswell"
    return None


def _coretype_env(lib: str, env: Dict[str, str]) -> Dict[str, str]:
    """``{OPENBLAS_CORETYPE: ...}`` when ``lib`` needs one (and the user set none), else {}."""
    if env.get(CORETYPE):
        return {}
    core = core_override(openblas_core(lib), cpu_flags())
    return {CORETYPE: core} if core else {}


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
    """The environment to restart with (a fast BLAS preloaded, tcmalloc where installed:
    malloc.py, and the few-row product where a C compiler builds it: skinny.py), or None when no
    restart helps."""
    if env.get(MARKER) or env.get("MLX_GRPO_NO_FAST_BLAS"):
        return None
    if not cpu_backend_in_use():
        return None
    lib = preloaded(env)
    if lib is not None:  # preloaded by the user: restart only to give OpenBLAS its kernels
        core = _coretype_env(lib, env)
        return _with_preloads(env, None, {**core, MARKER: lib}) if core else None
    lib = find_fast_blas(env)
    if lib is None:
        return None
    return _with_preloads(env, lib, {**_coretype_env(lib, env), MARKER: lib})


def _with_preloads(env: Dict[str, str], lib: Optional[str], extra: Dict[str, str]) -> Dict[str, str]:
    """``env`` with ``extra`` set and the allocator (malloc.py), the few-row product (skinny.py) and
    ``lib`` put before whatever LD_PRELOAD already held: the product hands every other call on to
    the next ``cblas_sgemm``, so it must come before the BLAS."""
    alloc = malloc.restart_env(env)
    shim = skinny.restart_preload(env)
    preloads = [p for p in (alloc.pop("LD_PRELOAD", None), shim, lib, env.get("LD_PRELOAD")) if p]
    new_env = {**env, **alloc, **extra}
    if preloads:
        new_env["LD_PRELOAD"] = ":".join(preloads)
    return new_env


def maybe_reexec(argv: List[str], env: Dict[str, str]) -> None:
    """Re-execute ``python argv...`` with a fast BLAS preloaded when that helps; else return."""
    new_env = reexec_env(env)
    if new_env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable] + argv, new_env)


def _handle(env: Dict[str, str]) -> Optional[ctypes.CDLL]:
    """The preloaded BLAS library, opened (None when none is preloaded or it cannot be opened)."""
    lib = preloaded(env)
    if lib is None:
        return None
    try:
        return ctypes.CDLL(lib)
    except OSError:
        return None


def limit_threads(n: int, env: Dict[str, str]) -> bool:
    """Cap the preloaded BLAS at ``n`` threads (processes sharing a machine would otherwise each
    start one per core, and their spinning threads starve each other); True when it applied."""
    handle = _handle(env)
    for name in ("openblas_set_num_threads", "MKL_Set_Num_Threads", "bli_thread_set_num_threads"):
        fn = getattr(handle, name, None) if handle is not None else None
        if fn is not None:
            fn(ctypes.c_int(n))
            return True
    return False


def threads(env: Dict[str, str]) -> Optional[int]:
    """The threads the preloaded BLAS uses now (None when none is preloaded or it does not say)."""
    handle = _handle(env)
    for name in ("openblas_get_num_threads", "MKL_Get_Max_Threads", "bli_thread_get_num_threads"):
        fn = getattr(handle, name, None) if handle is not None else None
        if fn is not None:
            return int(fn())
    return None


def threads_or_cores(env: Dict[str, str]) -> int:
    """The threads the products run on now: the preloaded BLAS's (``threads``; the decode kernel
    follows it too), else the cores this process may use."""
    n = threads(env)
    if n is not None:
        return max(1, n)
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def describe(env: Dict[str, str]) -> str:
    """One line: which device and BLAS this run computes with."""
    import mlx.core as mx

    if sys.platform == "darwin":
        return f"device {mx.default_device()} (Metal / Accelerate)"
    if not cpu_backend_in_use():
        return f"device {mx.default_device()} (CUDA)" + cuda_kernel_note(mx.__version__, env)
    lib = preloaded(env)
    if lib:
        core = openblas_core(lib)
        kernels = f", {core} kernels" + (f" ({CORETYPE})" if env.get(CORETYPE) else "") if core else ""
        return f"device cpu, BLAS {os.path.basename(lib)}{kernels} (fast){malloc.describe(env)}{skinny.describe(env)}"
    return f"device cpu, bundled reference BLAS -- {HINT}"


def cuda_kernel_cache(version: str, env: Dict[str, str], tmp: Optional[str] = None) -> Path:
    """Where MLX's CUDA build keeps the kernels it compiled: ``$MLX_PTX_CACHE_DIR``, by default
    ``<tmp>/mlx/<version>/ptx`` (MLX's jit_module)."""
    return Path(env.get(PTX_CACHE) or Path(tmp or tempfile.gettempdir()) / "mlx" / version / "ptx")


def cuda_kernel_note(version: str, env: Dict[str, str], tmp: Optional[str] = None) -> str:
    """A warning for the device line when MLX's CUDA kernel cache is empty, else "".

    MLX's CUDA build compiles each kernel with NVRTC on its first use and keeps it in
    ``cuda_kernel_cache``. With that cache empty the first GRPO step spends minutes compiling
    (measured on an H200: 195 s for the first step of a 4-layer Qwen2.5-0.5B shape, 0.5 s for the
    next, new completion lengths included), which looks like a hang unless it is said.
    """
    cache = cuda_kernel_cache(version, env, tmp)
    try:
        if any(cache.iterdir()):
            return ""
    except OSError:  # no cache yet
        pass
    keep = "" if env.get(PTX_CACHE) else f"; {PTX_CACHE}=DIR keeps them across reboots"
    return (f"; MLX compiles its CUDA kernels on first use: the first step can take minutes "
            f"(kept in {cache} for later runs{keep})")
