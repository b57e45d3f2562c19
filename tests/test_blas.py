"""The fast-BLAS restart: found when installed, never looping, results equal up to rounding."""

import os
import subprocess
import sys

import numpy as np
import pytest

from mlx_grpo import blas


def test_explicit_library_wins(tmp_path):
    lib = tmp_path / "libopenblas.so.0"
    lib.write_bytes(b"")
    assert blas.find_fast_blas({"MLX_GRPO_BLAS_LIB": str(lib)}) == str(lib)
    assert blas.find_fast_blas({"MLX_GRPO_BLAS_LIB": str(tmp_path / "missing.so")}) is None


def test_restart_happens_at_most_once_and_can_be_disabled(tmp_path):
    lib = tmp_path / "libopenblas.so.0"
    lib.write_bytes(b"")
    env = {"MLX_GRPO_BLAS_LIB": str(lib), "LD_PRELOAD": "/x/other.so"}
    new = blas.reexec_env(env)
    assert new is not None
    assert new["LD_PRELOAD"] == f"{lib}:/x/other.so"
    assert blas.reexec_env(new) is None  # already preloaded: no second restart
    assert blas.reexec_env({**env, "MLX_GRPO_NO_FAST_BLAS": "1"}) is None
    assert blas.preloaded({"LD_PRELOAD": "/usr/lib/libmkl_rt.so.2"}) == "/usr/lib/libmkl_rt.so.2"


MATMUL = (
    "import mlx.core as mx, numpy as np; mx.random.seed(0); a = mx.random.normal((256, 192)); "
    "b = mx.random.normal((192, 320)); np.save({path!r}, np.array(a @ b))"
)


@pytest.mark.skipif(blas.find_fast_blas(dict(os.environ)) is None, reason="no fast BLAS installed here")
def test_fast_blas_changes_results_only_by_rounding(tmp_path):
    outs = []
    for name, extra in (("ref", {"MLX_GRPO_NO_FAST_BLAS": "1", "LD_PRELOAD": ""}),
                        ("fast", {"LD_PRELOAD": blas.find_fast_blas(dict(os.environ))})):
        path = str(tmp_path / f"{name}.npy")
        env = {**os.environ, **extra}
        subprocess.run([sys.executable, "-c", MATMUL.format(path=path)], env=env, check=True)
        outs.append(np.load(path))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-4, atol=1e-4)


def test_cli_names_its_blas_on_the_first_line(tmp_path):
    from conftest import run_cli

    r = run_cli("train", "--steps", "0", "--output", str(tmp_path / "o"), "--set", "output.eval_size=2",
                "--no-progress")
    assert r.returncode == 0, r.stderr
    first = r.stdout.splitlines()[0]
    assert first.startswith("mlx-grpo: device cpu") or "Metal" in first or "CUDA" in first
    env = dict(os.environ)
    if blas.preloaded(env) or blas.reexec_env(env) is not None:
        assert "(fast)" in first
    elif first.startswith("mlx-grpo: device cpu"):
        assert "reference BLAS" in first and "libopenblas0-pthread" in first
