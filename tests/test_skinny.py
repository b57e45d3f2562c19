"""The few-row product preloaded in front of the BLAS: built once, right to float32 rounding on
every shape it takes, every other call handed to the BLAS, and used by a real rollout."""

import json
import os
import shutil
import subprocess
import sys
import textwrap


from mlx_grpo import blas, malloc, skinny
from mlx_grpo.bench import bundled_env
from preloaded import NEEDS, ROOT, built, run_preloaded

@NEEDS
def test_every_product_it_takes_or_hands_on_matches_numpy(tmp_path):
    lib = built(tmp_path)
    out, _ = run_preloaded(PRODUCTS, lib, tmp_path)
    taken = [r for r in out if r[8]]
    assert len(taken) == 9 * 4 + 2 and all(r[8] == 1 for r in taken)
    assert all(r[3] <= 48 and r[0] == 101 and r[1] == 111 and r[2] == 112 for r in taken)
    assert len(out) - len(taken) == 8  # the handed-on cases, counted by nobody here
    for r in out:
        assert r[9] < 2e-6, r  # float32 rounding of sums of up to 1,537 products


@NEEDS
def test_with_no_blas_after_it_every_product_is_still_right(tmp_path):
    out, err = run_preloaded(PRODUCTS, built(tmp_path), tmp_path, alone=True)
    assert len(out) == 46 and max(r[9] for r in out) < 2e-6
    assert err.count("without a BLAS after it") == 1  # said once, not per product


PRODUCTS = """
        import ctypes, json
        import numpy as np
        g = ctypes.CDLL(None)
        f = g.cblas_sgemm
        F = ctypes.c_float
        f.argtypes = [ctypes.c_int] * 6 + [F, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
                                           F, ctypes.c_void_p, ctypes.c_int]
        g.mlx_grpo_skinny_calls.restype = ctypes.c_long
        rng = np.random.default_rng(0)
        report = []

        def case(order, ta, tb, M, N, K, alpha, beta, pad=0, threads=2):
            if hasattr(g, "openblas_set_num_threads"):  # absent when no BLAS is preloaded
                g.openblas_set_num_threads(threads)
            ka, kb = K + pad, K + pad  # leading dimensions wider than the rows
            A = rng.standard_normal((M, ka) if ta == 111 else (K, M + pad), dtype=np.float32)
            B = rng.standard_normal((N, kb) if tb == 112 else (K, N + pad), dtype=np.float32)
            C = rng.standard_normal((M, N + pad), dtype=np.float32)
            if beta == 0:
                C[:] = np.nan  # beta 0: C must not be read
            a = A[:, :K] if ta == 111 else A[:, :M].T
            b = B[:, :K].T if tb == 112 else B[:, :N]
            want = alpha * (a.astype(np.float64) @ b.astype(np.float64))
            if beta:
                want += beta * C[:, :N].astype(np.float64)
            before = g.mlx_grpo_skinny_calls()
            if order == 101:
                f(101, ta, tb, M, N, K, alpha, A.ctypes.data, A.shape[1], B.ctypes.data, B.shape[1],
                  beta, C.ctypes.data, C.shape[1])
                got = C[:, :N]
            else:  # column major: the same product as C^T = B^T A^T
                Ct = np.full((N, M), np.nan, np.float32) if beta == 0 else np.ascontiguousarray(C[:, :N].T)
                af, bf = np.asfortranarray(a), np.asfortranarray(b)  # held while the call runs
                f(102, 111, 111, M, N, K, alpha, af.ctypes.data, M, bf.ctypes.data, K, beta, Ct.ctypes.data, M)
                got = Ct.T
            err = float(np.abs(got - want).max() / (np.abs(want).max() + 1e-30))
            report.append([order, ta, tb, M, N, K, pad, threads, g.mlx_grpo_skinny_calls() - before, err])

        for M in (2, 3, 4, 5, 7, 16, 24, 33, 48):
            for N, K in ((4100, 16), (1537, 100), (257, 576), (64, 1537)):
                case(101, 111, 112, M, N, K, 1.0, 0.0)
        case(101, 111, 112, 16, 1539, 577, 0.5, 2.0, pad=3)  # strides, alpha, beta, every tail
        case(101, 111, 112, 9, 2048, 640, 1.0, 1.0, threads=1)
        # handed on: one row, 49 rows, a small weight, short rows, other layouts
        for M, N, K in ((1, 4096, 64), (49, 4096, 64), (16, 255, 256), (16, 8192, 8)):
            case(101, 111, 112, M, N, K, 1.0, 0.0)
        case(101, 111, 111, 8, 2048, 640, 1.0, 0.0)
        case(101, 112, 112, 8, 2048, 640, 1.0, 0.0)
        case(102, 111, 111, 8, 2048, 640, 1.0, 0.0)
        g.mlx_grpo_skinny_enable(0)  # off: the BLAS computes what it would have taken
        case(101, 111, 112, 16, 2048, 640, 1.0, 0.0)
        g.mlx_grpo_skinny_enable(1)
        print(json.dumps(report))
"""


@NEEDS
def test_mlx_products_at_decode_shapes_go_through_it(tmp_path):
    lib = built(tmp_path)
    out, _ = run_preloaded("""
        import json
        import numpy as np
        import mlx.core as mx
        from mlx_grpo import skinny
        rng = np.random.default_rng(1)
        x = rng.standard_normal((16, 576), dtype=np.float32)
        w = rng.standard_normal((1536, 576), dtype=np.float32)
        c = rng.standard_normal((16, 1536), dtype=np.float32)
        n0 = skinny.calls()
        y = np.array(mx.addmm(mx.array(c), mx.array(x), mx.array(w).T, alpha=0.5, beta=2.0))
        n1 = skinny.calls()
        z = np.array(mx.array(x[:1]) @ mx.array(w).T)  # one row: MLX's matrix-vector path
        want = 0.5 * (x.astype(np.float64) @ w.T.astype(np.float64)) + 2.0 * c
        print(json.dumps([n1 - n0, skinny.calls() - n1,
                          float(np.abs(y - want).max()), float(np.abs(z - want[:1] / 0.5 + 4.0 * c[:1]).max())]))
    """, lib, tmp_path)
    taken, one_row, err, err1 = out
    assert taken == 1 and one_row == 0
    assert err < 1e-3 and err1 < 1e-3


@NEEDS
def test_the_cache_builds_once_and_replaces_a_damaged_library(tmp_path):
    log = tmp_path / "cc.log"
    cc = tmp_path / "cc"
    cc.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\nexec {shutil.which(os.environ.get('CC') or 'cc')} \"$@\"\n")
    cc.chmod(0o755)
    env = {**os.environ, "CC": str(cc), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    lib = skinny.build(env)
    assert lib is not None and skinny.build(env) == lib
    compiles = [line for line in log.read_text().splitlines() if "skinny.c" in line]
    assert len(compiles) == 1  # the second build found it in the cache
    with open(lib, "r+b") as f:  # a half-written or damaged file: rebuilt, not preloaded as is
        f.truncate(100)
    assert skinny.build(env) == lib and os.path.getsize(lib) > 100
    assert len([line for line in log.read_text().splitlines() if "skinny.c" in line]) == 2
    assert [p.name for p in (tmp_path / "xdg" / "mlx-grpo").iterdir()] == [os.path.basename(lib)]  # no temporaries left


def test_the_restart_puts_it_between_the_allocator_and_the_blas(tmp_path, monkeypatch):
    lib_blas = tmp_path / "libopenblas.so.0"
    alloc = tmp_path / "libtcmalloc_minimal.so.4"
    shim = tmp_path / "mlx_grpo_skinny-0.so"
    for f in (lib_blas, alloc, shim):
        f.write_bytes(b"")
    built = []
    monkeypatch.setattr(skinny, "build", lambda env: built.append(1) or str(shim))
    env = {"MLX_GRPO_BLAS_LIB": str(lib_blas), malloc.EXPLICIT: str(alloc), "LD_PRELOAD": "/x/other.so"}
    new = blas.reexec_env(env)
    assert new["LD_PRELOAD"] == f"{alloc}:{shim}:{lib_blas}:/x/other.so"
    assert blas.reexec_env(new) is None
    assert blas.describe(new).endswith(
        ", mlx-grpo's kernels (few-row products; llama-shaped rollouts, scoring and updates in C)")
    assert blas.describe({**new, skinny.DECODE_OFF: "1"}).endswith("(few-row products; llama-shaped scoring and updates in C)")
    assert blas.describe({**new, skinny.SCORE_OFF: "1", skinny.GRAD_OFF: "1"}).endswith(
        "(few-row products; llama-shaped rollouts in C)")
    off = {**new, skinny.DECODE_OFF: "1", skinny.SCORE_OFF: "1", skinny.GRAD_OFF: "1"}
    assert blas.describe(off).endswith(", few-row products by mlx-grpo's kernel")
    assert blas.reexec_env({**env, skinny.OFF: "1"})["LD_PRELOAD"] == f"{alloc}:{lib_blas}:/x/other.so"
    # the user's own BLAS, restarted only for its kernels: it still goes in front of it
    mine = {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0", malloc.OFF: "1"}
    assert skinny.restart_preload(mine) == str(shim)
    assert skinny.restart_preload({"LD_PRELOAD": str(shim)}) is None  # never twice
    # the bundled-BLAS probe drops it with the fast BLAS: it is part of the fast path
    assert bundled_env({"LD_PRELOAD": f"{alloc}:{shim}:{lib_blas}"})["LD_PRELOAD"] == str(alloc)
    monkeypatch.setattr(skinny, "build", lambda env: None)  # no compiler: the BLAS does it all
    assert blas.reexec_env(env)["LD_PRELOAD"] == f"{alloc}:{lib_blas}:/x/other.so"


def test_no_compiler_means_no_library(tmp_path):
    env = {"CC": str(tmp_path / "no-such-cc"), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    assert skinny.build(env) is None
    assert skinny.build({**env, "CC": "false"}) is None  # a compiler that fails
    assert not (tmp_path / "xdg").exists() or not any((tmp_path / "xdg" / "mlx-grpo").iterdir())


@NEEDS
def test_a_rollout_decodes_through_it_with_the_same_tokens(tmp_path):
    script = """
        import json, os
        from mlx_grpo import blas
        blas.maybe_reexec([__file__], dict(os.environ))
        import mlx.core as mx
        import numpy as np
        from mlx_grpo import rollout, skinny
        from mlx_grpo.bench import BenchSettings, Session, bench_config
        rollout.NATIVE = False  # MLX's decode step, whose products go through the library
        cfg = bench_config(None, None, BenchSettings(prompts=2, group_size=4, max_tokens=12))
        sess = Session(cfg)
        before = skinny.calls()
        ro = sess.ours()
        print(json.dumps({"calls": None if before is None else skinny.calls() - before,
                          "first": blas.describe(dict(os.environ)),
                          "tokens": np.asarray(ro.tokens).tolist(),
                          "logprobs": np.asarray(ro.sample_logprobs).tolist()}))
    """
    path = tmp_path / "rollout.py"
    path.write_text(f"import sys; sys.path.insert(0, {ROOT!r})\n" + textwrap.dedent(script))
    runs = {}
    for off in ("", "1"):
        fresh = {"LD_PRELOAD": "", blas.MARKER: "", skinny.OFF: off, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
        r = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, env={**os.environ, **fresh})
        assert r.returncode == 0, r.stderr
        runs[off] = json.loads(r.stdout.strip().splitlines()[-1])
    on, off = runs[""], runs["1"]
    assert on["calls"] > 0 and off["calls"] is None  # 8 rows through the embedded model's 128 x 512 MLPs
    assert "few-row products" in on["first"] and "few-row products" not in off["first"]
    assert on["tokens"] == off["tokens"]
    import numpy as np
    a, b = np.array(on["logprobs"], dtype=float), np.array(off["logprobs"], dtype=float)
    assert np.allclose(a, b, atol=1e-4)
