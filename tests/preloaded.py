"""Running a script in a fresh Python with mlx-grpo's kernel library preloaded in front of the
fast BLAS: shared by the tests of the few-row product and of the C decode step."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from mlx_grpo import blas, skinny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE = (sys.platform.startswith("linux") and shutil.which(os.environ.get("CC") or "cc") is not None
        and blas.find_fast_blas(dict(os.environ)) is not None and blas.cpu_backend_in_use())
NEEDS = pytest.mark.skipif(not HAVE, reason="needs Linux's CPU backend, a fast BLAS and a C compiler")


def built(tmp_path):
    lib = skinny.build({**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert lib is not None and os.path.basename(lib).startswith(skinny.NAME)
    return lib


def run_preloaded(script, lib, tmp_path, alone=False):
    """``script`` in a fresh Python with the library preloaded in front of the fast BLAS (``alone``:
    with no BLAS after it); its last line of output as JSON, and its stderr."""
    preload = lib if alone else f"{lib}:{blas.find_fast_blas(dict(os.environ))}"
    path = tmp_path / "script.py"
    path.write_text(f"import sys; sys.path.insert(0, {ROOT!r})\n" + textwrap.dedent(script))
    r = subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                       env={**os.environ, "LD_PRELOAD": preload, blas.MARKER: "1", "MLX_GRPO_NO_FAST_BLAS": "1"})
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr
