"""tcmalloc on the fast-BLAS restart: preloaded first, once, never over the user's choice."""

import os
import subprocess
import sys

import pytest

from mlx_grpo import blas, malloc
from mlx_grpo.bench import bundled_env

pytestmark = pytest.mark.usefixtures("no_skinny_product")  # the BLAS and allocator order only


def _libs(tmp_path):
    blas_lib = tmp_path / "libopenblas.so.0"
    alloc = tmp_path / "libtcmalloc_minimal.so.4"
    for f in (blas_lib, alloc):
        f.write_bytes(b"")
    return str(blas_lib), str(alloc)


def test_the_restart_preloads_the_allocator_before_the_blas_and_the_users_libraries(tmp_path):
    lib, alloc = _libs(tmp_path)
    env = {"MLX_GRPO_BLAS_LIB": lib, "MLX_GRPO_MALLOC_LIB": alloc, "LD_PRELOAD": "/x/other.so"}
    new = blas.reexec_env(env)
    assert new["LD_PRELOAD"] == f"{alloc}:{lib}:/x/other.so"
    assert new[malloc.REPORT] == malloc.NEVER  # no stack trace on stderr per large array
    assert blas.reexec_env(new) is None  # one restart
    assert blas.describe(new).endswith("(fast), malloc libtcmalloc_minimal.so.4")
    # the user's own report threshold is kept
    assert blas.reexec_env({**env, malloc.REPORT: "2000000000"})[malloc.REPORT] == "2000000000"


def test_the_allocator_can_be_turned_off_or_replaced_and_is_never_added_twice(tmp_path):
    lib, alloc = _libs(tmp_path)
    base = {"MLX_GRPO_BLAS_LIB": lib, "MLX_GRPO_MALLOC_LIB": alloc}
    assert blas.reexec_env({**base, malloc.OFF: "1"})["LD_PRELOAD"] == lib
    # an allocator the user preloaded stays the only one
    mine = {**base, "LD_PRELOAD": "/opt/libjemalloc.so.2"}
    new = blas.reexec_env(mine)
    assert new["LD_PRELOAD"] == f"{lib}:/opt/libjemalloc.so.2" and malloc.REPORT not in new
    assert malloc.describe(new) == ", malloc libjemalloc.so.2"
    # a named library that is not there: none (no preload of a missing file)
    assert malloc.find({malloc.EXPLICIT: str(tmp_path / "missing.so")}) is None
    assert blas.reexec_env({**base, malloc.EXPLICIT: str(tmp_path / "missing.so")})["LD_PRELOAD"] == lib
    # a BLAS the user preloaded but OpenBLAS without its kernels: that restart brings the allocator too
    assert malloc.restart_env({"LD_PRELOAD": "/usr/lib/libopenblas.so.0", malloc.EXPLICIT: alloc}) == {
        "LD_PRELOAD": alloc, malloc.REPORT: malloc.NEVER}


def test_the_bundled_blas_probe_keeps_the_allocator(tmp_path):
    lib, alloc = _libs(tmp_path)
    out = bundled_env({"LD_PRELOAD": f"{alloc}:{lib}"})
    assert out["LD_PRELOAD"] == alloc  # the BLAS comparison compares BLASes only


NEEDS_TCMALLOC = pytest.mark.skipif(
    not sys.platform.startswith("linux") or malloc.find(dict(os.environ)) is None
    or blas.find_fast_blas(dict(os.environ)) is None or not blas.cpu_backend_in_use(),
    reason="needs Linux's CPU backend with a fast BLAS and tcmalloc installed")
# As a user's shell starts it: nothing preloaded yet, so the process restarts itself.
FRESH = {"LD_PRELOAD": "", blas.MARKER: "", malloc.OFF: ""}


@NEEDS_TCMALLOC
def test_a_restarted_process_runs_on_tcmalloc():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = (f"import sys, os; sys.path.insert(0, {root!r}); from mlx_grpo import blas; "
              "len(sys.argv) > 1 and blas.maybe_reexec(['-c', sys.argv[1]], dict(os.environ)); "
              "import mlx.core as mx; mx.eval(mx.ones((64, 64)) @ mx.ones((64, 64))); "
              "print(any('libtcmalloc' in line for line in open('/proc/self/maps')))")
    for off, mapped in (("", "True"), ("1", "False")):
        r = subprocess.run([sys.executable, "-c", script, script], capture_output=True, text=True,
                           env={**os.environ, **FRESH, malloc.OFF: off})
        assert r.returncode == 0, r.stderr
        assert r.stdout.split() == [mapped]


@NEEDS_TCMALLOC
def test_training_on_tcmalloc_writes_the_same_adapters_bit_for_bit(tmp_path):
    from conftest import run_cli

    adapters = {}
    for name, off in (("tcmalloc", ""), ("glibc", "1")):
        r = run_cli("train", "--steps", "3", "--output", str(tmp_path / name), "--set", "output.eval_size=2",
                    "--no-progress", env={**FRESH, malloc.OFF: off})
        assert r.returncode == 0, r.stderr
        assert ("malloc libtcmalloc" in r.stdout.splitlines()[0]) == (name == "tcmalloc")
        adapters[name] = (tmp_path / name / "adapters.safetensors").read_bytes()
    assert adapters["tcmalloc"] == adapters["glibc"]
