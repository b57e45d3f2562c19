"""The fast-BLAS restart: found when installed, never looping, results equal up to rounding."""

import os
import subprocess
import sys

import numpy as np
import pytest

from mlx_grpo import blas, malloc

pytestmark = pytest.mark.usefixtures("no_skinny_product")  # the BLAS and allocator order only


def test_explicit_library_wins(tmp_path):
    lib = tmp_path / "libopenblas.so.0"
    lib.write_bytes(b"")
    assert blas.find_fast_blas({"MLX_GRPO_BLAS_LIB": str(lib)}) == str(lib)
    assert blas.find_fast_blas({"MLX_GRPO_BLAS_LIB": str(tmp_path / "missing.so")}) is None


def test_restart_happens_at_most_once_and_can_be_disabled(tmp_path):
    lib = tmp_path / "libopenblas.so.0"
    lib.write_bytes(b"")
    env = {"MLX_GRPO_BLAS_LIB": str(lib), "LD_PRELOAD": "/x/other.so", "MLX_GRPO_NO_TCMALLOC": "1"}
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
        if malloc.preloaded(env) or malloc.find(env):  # the allocator rides on the same restart
            assert ", malloc " in first, first
        # two cores and nothing set against it: the line says the passes run in two lanes
        if first.startswith("mlx-grpo: device cpu") and (os.cpu_count() or 1) >= 2 and "OPENBLAS_NUM_THREADS" not in env:
            assert first.endswith("; MLX's scoring and update passes in 2 lanes (train.cpu_lanes)"), first
        r1 = run_cli("train", "--steps", "0", "--output", str(tmp_path / "o1"), "--set", "output.eval_size=2",
                     "--no-progress", "--set", "train.cpu_lanes=1")
        assert r1.returncode == 0, r1.stderr
        assert "lanes" not in r1.stdout.splitlines()[0]
    elif first.startswith("mlx-grpo: device cpu"):
        assert "reference BLAS" in first and "libopenblas0-pthread" in first


AVX512 = {"fma", "avx2", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}


def test_an_openblas_older_than_the_cpu_gets_the_kernels_its_flags_allow():
    # Debian 12's OpenBLAS takes a current Xeon for a Prescott (SSE3): 7x slower matmuls.
    assert blas.core_override("prescott", AVX512) == "SkylakeX"
    assert blas.core_override("haswell", AVX512) == "SkylakeX"
    assert blas.core_override("prescott", {"avx2", "fma"}) == "Haswell"
    for detected, flags in (("skylakex", AVX512), ("cooperlake", AVX512), ("zen", {"avx2", "fma"}),
                            ("haswell", {"avx2", "fma"}), ("prescott", {"sse3"}), (None, AVX512)):
        assert blas.core_override(detected, flags) is None, (detected, flags)


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu sse3 avx2 fma\n\nflags\t\t: other\n")
    assert blas.cpu_flags(str(info)) == {"fpu", "sse3", "avx2", "fma"}
    assert blas.cpu_flags(str(tmp_path / "missing")) == set()


def test_coretype_is_set_on_restart_and_a_users_own_setting_wins(monkeypatch, tmp_path):
    lib = tmp_path / "libopenblas.so.0"
    lib.write_bytes(b"")
    monkeypatch.setattr(blas, "openblas_core", lambda path: "prescott")
    monkeypatch.setattr(blas, "cpu_flags", lambda: AVX512)
    monkeypatch.setattr(blas, "cpu_backend_in_use", lambda: True)
    monkeypatch.setattr(malloc, "find", lambda env: None)  # the BLAS alone (tcmalloc: test_malloc.py)
    new = blas.reexec_env({"MLX_GRPO_BLAS_LIB": str(lib)})
    assert new["OPENBLAS_CORETYPE"] == "SkylakeX" and new["LD_PRELOAD"] == str(lib)
    assert blas.reexec_env({"MLX_GRPO_BLAS_LIB": str(lib), "OPENBLAS_CORETYPE": "Haswell"}).get(
        "OPENBLAS_CORETYPE") == "Haswell"
    # Preloaded by the user without a core type: one restart to set it, then none.
    user = {"LD_PRELOAD": str(lib)}
    again = blas.reexec_env(user)
    assert again["OPENBLAS_CORETYPE"] == "SkylakeX" and again["LD_PRELOAD"] == str(lib)
    assert blas.reexec_env(again) is None
    monkeypatch.setattr(blas, "openblas_core", lambda path: "skylakex")
    assert blas.reexec_env(user) is None  # detected well: the user's process runs as it is


@pytest.mark.skipif(blas.find_fast_blas(dict(os.environ)) is None
                    or blas.openblas_core(blas.find_fast_blas(dict(os.environ)) or "") is None,
                    reason="no OpenBLAS installed here")
def test_a_restarted_process_runs_the_core_type_chosen_for_it():
    import json

    lib = blas.find_fast_blas(dict(os.environ))
    clean = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", blas.MARKER, blas.CORETYPE)}
    # OpenBLAS reports what this process asked of it, so the choice is made in a clean process.
    plan = subprocess.run([sys.executable, "-c", "import json, os; from mlx_grpo import blas; "
                           "print(json.dumps(blas.reexec_env(dict(os.environ))))"],
                          env=clean, capture_output=True, text=True, check=True)
    new = json.loads(plan.stdout)
    assert new is not None and lib in new["LD_PRELOAD"].split(":")
    code = f"import mlx.core as mx; from mlx_grpo import blas; print(blas.openblas_core({lib!r}))"
    out = subprocess.run([sys.executable, "-c", code], env=new, capture_output=True, text=True, check=True)
    chosen = new.get("OPENBLAS_CORETYPE")
    if chosen:  # OpenBLAS runs the kernels the restart asked for
        assert out.stdout.strip() == chosen.lower()
    else:  # it detected this CPU as well as its flags allow
        assert blas.core_override(out.stdout.strip(), blas.cpu_flags()) is None


def test_cuda_kernel_note_only_while_mlx_kernel_cache_is_empty(tmp_path):
    """MLX's CUDA build compiles kernels on first use (minutes for a real model's first step): the
    device line says so until MLX's cache (<tmp>/mlx/<version>/ptx, or $MLX_PTX_CACHE_DIR) holds
    kernels."""
    note = blas.cuda_kernel_note("9.9.9", {}, str(tmp_path))
    assert "first step can take minutes" in note and str(tmp_path / "mlx" / "9.9.9" / "ptx") in note
    assert "MLX_PTX_CACHE_DIR=DIR keeps them" in note
    cache = tmp_path / "mlx" / "9.9.9" / "ptx"
    cache.mkdir(parents=True)
    assert blas.cuda_kernel_note("9.9.9", {}, str(tmp_path)) == note  # an empty cache compiles too
    (cache / "gather_float32_int32_1.ptx").write_text("// kernel")
    assert blas.cuda_kernel_note("9.9.9", {}, str(tmp_path)) == ""
    assert blas.cuda_kernel_note("1.0.0", {}, str(tmp_path)) != ""  # another MLX version's kernels don't count
    own = tmp_path / "kept"
    env = {"MLX_PTX_CACHE_DIR": str(own)}
    note = blas.cuda_kernel_note("9.9.9", env, str(tmp_path))  # MLX reads the variable's directory
    assert str(own) in note and "keeps them" not in note
    own.mkdir()
    (own / "gather_float32_int32_1.ptx").write_text("// kernel")
    assert blas.cuda_kernel_note("9.9.9", env, str(tmp_path)) == ""


def test_describe_on_cuda_carries_the_kernel_note(monkeypatch, tmp_path):
    monkeypatch.setattr(blas, "cpu_backend_in_use", lambda: False)
    monkeypatch.setattr(blas.sys, "platform", "linux")
    monkeypatch.setattr(blas.tempfile, "gettempdir", lambda: str(tmp_path))
    line = blas.describe({})
    assert "(CUDA)" in line and "first step can take minutes" in line
