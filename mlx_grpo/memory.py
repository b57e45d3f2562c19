"""How much memory this machine lets a run use: the bottom floor every estimate compares with.

Kept apart from the preflight checks so that loading a model (which sizes its float base by what
is free) does not import the rollout engine, the scorer and every task with them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Optional

import mlx.core as mx

from .config import ConfigError
from .float_base import device_kind

GB = 1e9
MARGIN = 0.85  # a step, or a batch decoded at once, may use this share of the memory available


MEMORY_LIMIT_ENV = "MLX_GRPO_MEMORY_LIMIT"  # caps "available memory", e.g. 2GB, 500MB or bytes


def memory_limit() -> Optional[float]:
    """The cap set in ``MLX_GRPO_MEMORY_LIMIT`` in bytes (None when unset); a bad value is an
    error naming the variable."""
    raw = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
    if not raw:
        return None
    units = {"GB": 1e9, "MB": 1e6, "KB": 1e3, "B": 1.0}
    unit = next((u for u in units if raw.upper().endswith(u)), "B")
    try:
        value = float(raw[: len(raw) - len(unit)] if raw.upper().endswith(unit) else raw) * units[unit]
    except ValueError:
        value = -1.0
    if value <= 0:
        raise ConfigError(f"{MEMORY_LIMIT_ENV}: expected a size such as 8GB, 500MB or bytes, got {raw!r}")
    return value


def available_memory(held: float = 0.0) -> Optional[float]:
    """Bytes the run can use: the GPU's recommended working set on Metal, else free RAM (plus
    ``held``, what the process already holds and a measured peak counts), capped by
    ``MLX_GRPO_MEMORY_LIMIT``; None if unknown."""
    found = _machine_memory()
    if found is not None:
        found += held
    cap = memory_limit()
    if cap is None:
        return found
    return cap if found is None else min(cap, found)


def _machine_memory() -> Optional[float]:
    """(psutil is not a dependency: /proc/meminfo on Linux, sysctl on macOS.)"""
    info: Dict[str, Any] = {}
    try:
        info = dict(mx.device_info()) if hasattr(mx, "device_info") else dict(mx.metal.device_info())
    except Exception:  # no such device query on this backend
        pass
    for key in ("max_recommended_working_set_size", "memory_size"):
        if isinstance(info.get(key), int) and info[key] > 0:
            return float(info[key])
    if sys.platform.startswith("linux"):
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
        except OSError:
            pass
        try:
            return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError):
            return None
    if sys.platform == "darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "hw.memsize"], capture_output=True, text=True, timeout=5)
            return float(out.stdout.strip())
        except (OSError, ValueError, subprocess.SubprocessError):
            return None
    return None


def memory_budget() -> Optional[float]:
    """Bytes a command may use in all: ``available_memory``, where on the CPU backend the free RAM
    is counted with what MLX already holds (the weights, loaded, are in what it measures)."""
    held = mx.get_active_memory() + mx.get_cache_memory() if device_kind() == "cpu" else 0.0
    return available_memory(held)
