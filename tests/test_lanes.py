"""Lanes (lanes.py): a pass's rows split in two, each half on its own CPU stream. The loss, its
statistics, the gradient and the reference logprobs are those of one pass; the cut follows the
prompts; the setting that lets MLX run the halves side by side is made before MLX evaluates
anything and never over a user's; the BLAS gets its threads back."""

import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_grpo import lanes
from mlx_grpo.config import make_config
from mlx_grpo.learner import (
    lane_value_and_grad, logprobs_of, pass_lanes, select_rows, step_normalizer,
)
from mlx_grpo.models import adapters_disabled

from conftest import ROOT, off_reference_rollouts, tol


def test_split_cuts_where_the_prompt_changes_nearest_the_middle():
    assert lanes.split(np.repeat([0, 1, 2, 3], 4), 2) == [slice(0, 8), slice(8, 16)]
    # three prompts of four rows: the change at 4 or 8, both 2 from the middle: the nearer first
    assert lanes.split(np.repeat([0, 1, 2], 4), 2) in ([slice(0, 4), slice(4, 12)], [slice(0, 8), slice(8, 12)])
    assert lanes.split(np.array([0, 0, 0, 1, 1, 1, 1, 1, 1, 1]), 2) == [slice(0, 3), slice(3, 10)]
    # one prompt: the middle
    assert lanes.split(np.zeros(6, dtype=int), 2) == [slice(0, 3), slice(3, 6)]
    # no prompt change near the middle (a quarter of the rows away at most): the middle
    assert lanes.split(np.array([0] + [1] * 15), 2) == [slice(0, 8), slice(8, 16)]
    assert lanes.split(np.array([0]), 2) == [slice(0, 1)]
    assert lanes.split(np.arange(3), 5) == [slice(0, 1), slice(1, 2), slice(2, 3)]
    assert lanes.split(np.repeat(np.arange(8), 2), 4) == [slice(0, 4), slice(4, 8), slice(8, 12), slice(12, 16)]
    for n in range(1, 40):  # always a partition of the rows, in order
        for k in range(1, 6):
            rp = np.sort(np.random.default_rng(n * 7 + k).integers(0, 5, n))
            parts = lanes.split(rp, k)
            assert parts[0].start == 0 and parts[-1].stop == n
            assert all(a.stop == b.start and a.start < a.stop for a, b in zip(parts, parts[1:]))


def _batch(model_dir, loss_type="grpo"):
    cfg = make_config(None, [("rollout.group_size", 4), ("rollout.max_tokens", 8), ("rollout.stop", []),
                             ("train.prompts_per_step", 4), ("grpo.beta", 0.1), ("grpo.kl_clamp", None),
                             ("grpo.loss_type", loss_type)])
    model, ro = off_reference_rollouts(model_dir, cfg)
    adv = np.tile(np.array([1.0, -1.0, 0.5, -0.5], dtype=np.float32), 4)
    return cfg, model, select_rows(ro, adv, np.arange(16))


@pytest.mark.parametrize("n_lanes", [2, 3])
def test_reference_logprobs_in_lanes_equal_one_pass(small_model_dir, n_lanes):
    cfg, model, batch = _batch(small_model_dir)
    with adapters_disabled(model):
        one = np.array(logprobs_of(model, batch, 1.0, 16))
        split = np.array(logprobs_of(model, batch, 1.0, 16, n_lanes))
    mask = np.array(batch.mask) > 0  # past a row's end a logprob means nothing (0 or any value)
    assert mask.sum() > 16 and np.abs(one[mask]).max() > 0.1
    np.testing.assert_allclose(split[mask], one[mask], rtol=tol(1e-5, 1e-2), atol=tol(1e-5, 1e-3))


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_loss_stats_and_gradient_in_lanes_equal_one_pass(small_model_dir, loss_type):
    """bnpo included: it normalises by the micro-batch's own tokens, which its lanes are given."""
    cfg, model, batch = _batch(small_model_dir, loss_type)
    with adapters_disabled(model):
        batch.ref_logp = logprobs_of(model, batch, 1.0, 16)
    norm = step_normalizer([16], batch.mask.sum().item(), cfg)
    out = {}
    for n in (1, 2):
        loss, stats, grads = lane_value_and_grad(model, batch, cfg, norm, n)
        mx.eval(loss, stats, grads)
        out[n] = (loss.item(), {k: v.item() for k, v in stats.items()}, dict(tree_flatten(grads)))
    (l1, s1, g1), (l2, s2, g2) = out[1], out[2]
    assert abs(l1) > 1e-4 and s1["kl"] > 1e-4
    assert l2 == pytest.approx(l1, rel=tol(1e-5, 1e-2), abs=1e-7)
    for k in s1:
        assert s2[k] == pytest.approx(s1[k], rel=tol(1e-5, 1e-2), abs=1e-7), k
    moved = 0
    for k in g1:
        assert mx.allclose(g2[k], g1[k], rtol=tol(1e-4, 1e-2), atol=tol(1e-7, 1e-5)).item(), k
        moved += mx.abs(g1[k]).max().item() > 0
    assert moved == len(g1)  # every LoRA matrix gets a gradient


def test_settings_that_keep_one_lane(small_model_dir, monkeypatch):
    monkeypatch.setattr(lanes, "_ready", True)
    monkeypatch.setattr(lanes, "_blas_threads", lambda: 2)
    cfg = make_config(None, [])
    if mx.default_device() == mx.cpu:
        assert pass_lanes(cfg, 16) == 2
        assert lanes.count(16, 4) == 2  # no more lanes than the BLAS's threads
    assert pass_lanes(make_config(None, [("train.cpu_lanes", 1)]), 16) == 1
    assert lanes.count(1) == 1
    monkeypatch.setattr(lanes, "_blas_threads", lambda: 1)  # OPENBLAS_NUM_THREADS=1 beside other runs
    assert lanes.count(16) == 1
    monkeypatch.setattr(lanes, "_blas_threads", lambda: 2)
    monkeypatch.setattr(lanes, "_ready", False)  # MLX orders depth-first: the halves would take turns
    assert lanes.count(16) == 1


def test_cpu_lanes_is_checked(tmp_path):
    from mlx_grpo.config import ConfigError

    with pytest.raises(ConfigError, match=r"train\.cpu_lanes: must be at least 1"):
        make_config(None, [("train.cpu_lanes", 0)])


def _import_lanes(code: str, env: dict) -> str:
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_breadth_first_setting_is_made_before_mlx_evaluates_and_never_over_the_users():
    env = {k: v for k, v in os.environ.items() if k != lanes.BFS_ENV}
    env.pop("MLX_GRPO_FORCE_DEVICE", None)
    show = "import os, mlx_grpo; print(os.environ.get('MLX_BFS_MAX_WIDTH'), mlx_grpo.lanes._ready)"
    device = _import_lanes("import mlx.core as mx; print(mx.default_device() == mx.cpu)", env)
    if device == "True":
        assert _import_lanes(show, env) == f"{lanes.BFS_WIDTH} True"
    else:  # Metal and CUDA: MLX's own ordering stays
        assert _import_lanes(show, env) == "None False"
    assert _import_lanes(show, {**env, lanes.BFS_ENV: "50"}) == "50 False"
    assert _import_lanes(show, {**env, lanes.BFS_ENV: "oops"}) == "oops False"
    assert _import_lanes(show, {**env, lanes.BFS_ENV: str(lanes.BFS_WIDTH)}) == f"{lanes.BFS_WIDTH} True"
    # MLX evaluated something first: its ordering is already read, so lanes stay off
    late = "import mlx.core as mx; mx.eval(mx.ones(3) + 1); " + show.replace("import os, ", "import os; import ")
    assert _import_lanes(late, env) == "None False"


def test_single_blas_gives_the_threads_back():
    """With OpenBLAS preloaded, the block runs on one thread and the count comes back."""
    from mlx_grpo import blas

    lib = blas.find_fast_blas({})
    if lib is None or "openblas" not in lib:
        pytest.skip("no OpenBLAS on this machine")
    code = ("import os; from mlx_grpo import blas, lanes; env = dict(os.environ); "
            "a = blas.threads(env); "
            "cm = lanes.single_blas(True); cm.__enter__(); b = blas.threads(env); cm.__exit__(None, None, None); "
            "print(a, b, blas.threads(env))")
    env = {**os.environ, "LD_PRELOAD": lib, "OPENBLAS_NUM_THREADS": "2"}
    assert _import_lanes(code, env) == "2 1 2"
    env["OPENBLAS_NUM_THREADS"] = "1"
    assert _import_lanes(code, env) == "1 1 1"


def test_each_lane_is_built_on_its_own_stream():
    """What a caller builds for a lane's rows goes to that lane's stream; the default comes back."""
    before = mx.default_stream(mx.cpu)
    seen = [(rows, mx.default_stream(mx.cpu)) for rows in lanes.each(np.repeat([0, 1], 2), 2)]
    assert [r for r, _ in seen] == [slice(0, 2), slice(2, 4)]
    assert [s for _, s in seen] == lanes.streams(2) and seen[0][1] != seen[1][1]
    assert before not in [s for _, s in seen] and mx.default_stream(mx.cpu) == before
