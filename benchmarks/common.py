"""What every script in ``benchmarks/`` needs, in one place.

Importing it puts the repository root on ``sys.path``, so a script run as ``python
benchmarks/NAME.py`` (which puts only ``benchmarks/`` there) imports ``mlx_grpo`` from this
checkout without an install. ``fast_blas()`` restarts the script once with the fast BLAS the CLI
uses (``mlx_grpo/blas.py``: MLX's CPU wheel bundles a reference BLAS 10-19x slower at matmuls,
so timings without it measure the wrong thing); ``shape_args()`` adds the arguments that pick a
release's shape and the step's size, with each script's own defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def fast_blas() -> None:
    """Re-execute this script with a fast BLAS preloaded when that helps (Linux, MLX's CPU backend,
    not done yet); else return. Call it before the first timing, with the arguments unparsed or
    parsed: the restart gets the same command line."""
    from mlx_grpo import blas

    blas.maybe_reexec([str(Path(sys.argv[0]).resolve()), *sys.argv[1:]], dict(os.environ))


def blas_line() -> str:
    """One line: which device and BLAS this run computes with (for the output's header)."""
    from mlx_grpo import blas

    return blas.describe(dict(os.environ))


@contextlib.contextmanager
def peer_side() -> Iterator[None]:
    """Within the block a peer trainer runs as in a process of its own: mlx-grpo's few-row product
    (``mlx_grpo/skinny.py``), preloaded for the whole process by the restart, hands every product
    to the BLAS. (The BLAS and the allocator stay: both sides run on those, as the result's
    ``backend`` says.)"""
    from mlx_grpo import skinny

    was_on = skinny.set_enabled(False)
    try:
        yield
    finally:
        if was_on:
            skinny.set_enabled(True)


def backend_fields() -> dict:
    """What a peer benchmark's result says about the native code both trainers ran on: the BLAS and
    allocator (shared, in one process) and that the few-row kernel was ours only (``peer_side``)."""
    return {"backend": blas_line(), "peer_few_row_kernel": False}


def load_stock_model(model_cfg: Any):
    """``models.load_model`` as a peer gets it: the same float32 base on the CPU, with mlx-lm's own
    MLP and attention (none of ``fastmath``'s), so a peer runs the model as mlx-lm loads it."""
    from dataclasses import replace

    from mlx_grpo.models import load_model

    return load_model(replace(model_cfg, fast_mlp=False, fast_attention=False))


def say(line: str) -> None:
    """Progress on stderr, so that stdout keeps only the result."""
    print(line, file=sys.stderr, flush=True)


def shape_args(ap: argparse.ArgumentParser, *, shape: Any = "qwen2.5-0.5b", bits: Any = 0, prompts: Any = 2,
               group: Any = 4, max_tokens: Any = 64,
               shape_help: str = "a release's shape (mlx_grpo/shapes.py) or a model directory") -> None:
    """``--shape``, ``--bits``, ``-P``, ``-G`` and ``--max-tokens`` with these defaults. Passing
    ``...`` leaves that argument out (a script without it); None makes None its default (the
    script fills it in)."""
    if shape is not ...:
        ap.add_argument("--shape", default=shape, help=shape_help)
    if bits is not ...:
        ap.add_argument("--bits", type=int, default=bits, choices=[0, 4, 8],
                        help="weights on disk: 0 float32, 4 or 8 bits (mlx-lm's quantization)")
    if prompts is not ...:
        ap.add_argument("-P", type=int, default=prompts, help="prompts per step")
    if group is not ...:
        ap.add_argument("-G", type=int, default=group, help="completions per prompt")
    if max_tokens is not ...:
        ap.add_argument("--max-tokens", type=int, default=max_tokens, help="new tokens per completion")
