"""A few-row float32 product for decoding on the CPU, preloaded in front of the BLAS.

A decode step multiplies one row per completion (16 for 4 prompts x G 4) by every weight of the
model, so it is bound by reading the weights. OpenBLAS packs each weight matrix into panels before
multiplying, and at 16 rows that packing is most of the product: SmolLM2's 211 products of one
step take 70 ms through OpenBLAS (two threads) where ``csrc/skinny.c`` takes 36 (each thread
streams its share of the weight rows, four against four input rows in registers, and prefetches
the next four while these compute from cache). The library defines ``cblas_sgemm``, computes
x[M,K] @ W[N,K]^T itself for 2-48 rows over a weight of at least 65,536 values, and hands every
other call to the BLAS preloaded after it, so MLX's products go through it unchanged (results
equal to float32 rounding). Measured on SmolLM2 (16 rows, 64 tokens): a decode step 111 -> 75-79
ms, a rollout 7.6 -> 5.4-5.6 s.

It is C, so it is compiled on the user's machine, once, with the system's C compiler (``cc`` or
``$CC``; ``-O3 -march=native -fopenmp``) into the cache folder (``cachedir.py``:
``~/.cache/mlx-grpo``), keyed by the source, the compiler and the CPU; with no compiler the BLAS
does every product as before. ``MLX_GRPO_NO_SKINNY=1`` turns it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from . import malloc
from .cachedir import cache_root

# The kernel, and the decode step (native_decode.py) and the prefill and scoring passes
# (native_forward.py) built on it, in one library.
SOURCES = [Path(__file__).parent / "csrc" / name for name in ("skinny.c", "decode.c", "forward.c", "grad.c")]
HEADERS = [Path(__file__).parent / "csrc" / name for name in ("vec.h", "kernels.h", "passes.h")]  # part of the cache key
OFF = "MLX_GRPO_NO_SKINNY"
DECODE_OFF = "MLX_GRPO_NO_NATIVE_DECODE"  # set: rollouts decode through MLX (native_decode.py)
SCORE_OFF = "MLX_GRPO_NO_NATIVE_SCORE"  # set: scoring passes run through MLX (native_forward.py)
GRAD_OFF = "MLX_GRPO_NO_NATIVE_GRAD"  # set: updates run through MLX (native_grad.py)
NAME = "mlx_grpo_skinny"  # the library's file name starts with it
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]


def _cpu_id() -> str:
    """The CPU's model and flags: a library built with -march=native runs only where they match
    (a home directory shared between machines)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.machine()
    keep = [ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags", "Features", "CPU part")]
    return platform.machine() + "\n" + "\n".join(sorted(set(keep)))


def _compiler(env: Dict[str, str]) -> Optional[Tuple[List[str], str]]:
    """The C compiler's command line (``$CC`` or ``cc``) and its version line, or None without one."""
    cc = shlex.split(env.get("CC") or "cc")
    try:
        out = subprocess.run(cc + ["--version"], capture_output=True, text=True, timeout=30)
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return cc, (out.stdout.splitlines() or [""])[0]


def _loads(path: Path) -> bool:
    """True when ``path`` is a library this module built: it opens and answers, in a separate
    Python (-S: no site packages, ~0.07 s), so this process never maps a file that might be damaged
    or replaced later."""
    probe = ("import ctypes, sys; lib = ctypes.CDLL(sys.argv[1]); lib.mlx_grpo_skinny_enable; "
             "sys.exit(lib.mlx_grpo_skinny_calls())")
    try:
        return subprocess.run([sys.executable, "-S", "-c", probe, str(path)], capture_output=True,
                              timeout=60).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def build(env: Dict[str, str]) -> Optional[str]:
    """The library's path, compiled first when the cache has none for this source, compiler and
    CPU; None when it cannot be built (no compiler, or it failed). Written to a temporary file
    and renamed into place, so a run started beside this one never loads a half-written file."""
    compiler = _compiler(env)
    if compiler is None:
        return None
    cc, version = compiler
    key = hashlib.sha256(b"\0".join([*(p.read_bytes() for p in SOURCES + HEADERS), version.encode(), " ".join(FLAGS).encode(), _cpu_id().encode()]))
    target = cache_root(env) / f"{NAME}-{key.hexdigest()[:16]}.so"
    if target.exists() and _loads(target):
        return str(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{NAME}-", suffix=".so", dir=target.parent)
        os.close(fd)
    except OSError:
        return None
    try:
        done = subprocess.run(cc + FLAGS + [str(p) for p in SOURCES] + ["-o", tmp], capture_output=True, timeout=300)
        if done.returncode != 0 or not _loads(Path(tmp)):
            return None
        os.replace(tmp, target)
        return str(target)
    except (OSError, subprocess.SubprocessError):
        return None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def restart_preload(env: Dict[str, str]) -> Optional[str]:
    """The library for the restart that preloads the BLAS to put in front of it, or None (turned
    off, already preloaded, or not buildable here)."""
    if env.get(OFF) or preloaded(env):
        return None
    return build(env)


def preloaded(env: Dict[str, str]) -> Optional[str]:
    """This library, when LD_PRELOAD holds it."""
    return next((p for p in malloc.preloads(env) if os.path.basename(p).startswith(NAME)), None)


def _loaded() -> Optional[ctypes.CDLL]:
    """The process's global symbols when this library is among them, else None."""
    handle = ctypes.CDLL(None)
    return handle if hasattr(handle, "mlx_grpo_skinny_calls") else None


def calls() -> Optional[int]:
    """How many products the preloaded library has computed in this process (None when it is
    not loaded)."""
    handle = _loaded()
    if handle is None:
        return None
    handle.mlx_grpo_skinny_calls.restype = ctypes.c_long
    return int(handle.mlx_grpo_skinny_calls())


def set_enabled(on: bool) -> bool:
    """Turn the library's own products on or off in this process (off: every call goes to the
    BLAS, as without it, e.g. for a peer trainer timed in the same process); True when loaded."""
    handle = _loaded()
    if handle is None:
        return False
    handle.mlx_grpo_skinny_enable(ctypes.c_int(1 if on else 0))
    return True


def describe(env: Dict[str, str]) -> str:
    """What a run's first line says about the library: what it does where it is preloaded (the
    rollouts in C unless ``DECODE_OFF`` is set, scoring unless ``SCORE_OFF`` is, updates unless
    ``GRAD_OFF`` is), else ""."""
    if not preloaded(env):
        return ""
    in_c = [what for what, off in (("rollouts", DECODE_OFF), ("scoring", SCORE_OFF), ("updates", GRAD_OFF))
            if not env.get(off)]
    if not in_c:
        return ", few-row products by mlx-grpo's kernel"
    named = in_c[0] if len(in_c) == 1 else f"{', '.join(in_c[:-1])} and {in_c[-1]}"
    return f", mlx-grpo's kernels (few-row products; llama-shaped {named} in C)"
