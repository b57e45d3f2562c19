"""Data parallelism with real processes on MLX's ring backend (CPU, this machine).

Two processes launched by ``mlx.launch`` (or started directly with the variables it sets: MLX_RANK
and MLX_HOSTFILE) against one process, on the same seed and global batch.
"""

from __future__ import annotations

import json
import os
import random
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conftest import ROOT, run_cli

from mlx_grpo import blas, distributed
from mlx_grpo.config import make_config
from mlx_grpo.learner import step_normalizer

LAUNCH = [sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()"]
CLI = [sys.executable, str(ROOT / "cli.py")]


def run_args(model: Path, steps: int = 3) -> list:
    """A short run touching every distributed path: batch-scaled advantages, the global token
    normaliser (dapo), micro-batches, two updates per step (old logprobs) and the KL term."""
    sets = {
        "train.prompts_per_step": 4, "rollout.group_size": 4, "rollout.max_tokens": 16,
        "data.max_operand": 9, "data.eval_size": 10, "output.eval_size": 4, "output.save_every": 1,
        "grpo.beta": 0.04, "grpo.num_iterations": 2, "grpo.scale_rewards": "batch", "grpo.loss_type": "dapo",
        "train.grad_accumulation_steps": 2, "train.learning_rate": 0.003, "rewards.lenient_accuracy": 1.0,
        # Constant, so a run resumed with more steps is the same run as one started with them (a
        # decaying schedule stretches with --steps).
        "train.lr_schedule": "constant",
    }
    args = ["train", "--model", str(model), "--steps", str(steps), "--seed", "3", "--no-progress"]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    return args


def free_port(n: int) -> int:
    """A port p such that p .. p+n-1 are free on 127.0.0.1 (the ring listens on one per rank)."""
    for _ in range(200):
        p = random.randint(20000, 60000)
        socks = []
        try:
            for i in range(n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p + i))
            return p
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


def launch(args: list, n: int = 2, env: dict | None = None, launcher_args: tuple = (), timeout: int = 300):
    """``mlx.launch -n N --backend ring -- python cli.py ARGS``; returns CompletedProcess."""
    cmd = LAUNCH + ["-n", str(n), "--backend", "ring", "--starting-port", str(free_port(n)),
                    *launcher_args, "--", *CLI, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env or dict(os.environ), capture_output=True, text=True,
                          timeout=timeout)


def start_ranks(args: list, cwds: list, tmp_path: Path, timeout: int = 300) -> list:
    """Start one process per rank directly, as mlx.launch does (MLX_RANK + a ring host list), each
    in its own working directory; returns [(exit code, stdout, stderr)] in rank order."""
    port = free_port(len(cwds))
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([[f"127.0.0.1:{port + i}"] for i in range(len(cwds))]))
    procs = [
        subprocess.Popen(CLI + args, cwd=cwd, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**os.environ, "MLX_RANK": str(r), "MLX_HOSTFILE": str(hosts)})
        for r, cwd in enumerate(cwds)
    ]
    outputs = [p.communicate(timeout=timeout) for p in procs]
    return [(p.returncode, *o) for p, o in zip(procs, outputs)]


def train_lines(run: Path) -> list:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(x)["kind"] == "train"]


def assert_same_run(a: Path, b: Path) -> None:
    """Same per-step metrics (discrete ones exactly) and adapter weights, to float tolerance."""
    ma, mb = train_lines(a), train_lines(b)
    assert [m["step"] for m in ma] == [m["step"] for m in mb]
    for x, y in zip(ma, mb):
        for k in ("reward_mean", "reward_std", "rewards/accuracy", "rewards/lenient_accuracy", "rows_updated",
                  "tokens", "completion_length", "truncated_rate", "zero_std_groups", "learning_rate"):
            assert x[k] == y[k], (x["step"], k, x[k], y[k])
        for k in ("loss", "kl", "grad_norm", "entropy", "clip_fraction", "ratio_mean"):
            assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-6), (x["step"], k, x[k], y[k])
    assert any(m["grad_norm"] > 0 for m in ma)  # the runs learned something to compare
    wa, wb = mx.load(str(a / "adapters.safetensors")), mx.load(str(b / "adapters.safetensors"))
    assert set(wa) == set(wb)
    for k in wa:
        assert np.allclose(np.array(wa[k]), np.array(wb[k]), rtol=1e-3, atol=1e-4), k
    assert max(float(mx.abs(v).max().item()) for k, v in wa.items() if k.endswith("lora_b")) > 1e-3


def files(run: Path) -> list:
    return sorted(str(p.relative_to(run)) for p in run.rglob("*"))


@pytest.fixture(scope="module")
def single_run(small_model_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single") / "run"
    r = run_cli(*run_args(small_model_dir), "--output", str(out))
    assert r.returncode == 0, r.stderr
    return out


def test_two_processes_under_mlx_launch_match_one(single_run, small_model_dir, tmp_path):
    out = tmp_path / "run"
    # Without the fast-BLAS marker each rank re-executes itself (blas.maybe_reexec): the variables
    # mlx.launch set (MLX_RANK, MLX_HOSTFILE) must survive that for the ranks to connect.
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MLX_GRPO_BLAS")}
    r = launch(run_args(small_model_dir) + ["--output", str(out)], env=env)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert "data parallel over 2 processes: 2 of 4 prompts each per step" in r.stdout
    if blas.reexec_env(env) is not None:  # (where a fast BLAS is installed) the re-exec happened
        assert "(fast)" in r.stdout.splitlines()[0], r.stdout
    assert r.stdout.count("held-out, before -> after") == 1  # rank 0 alone reports
    assert_same_run(single_run, out)
    # The same files, each written once (two writers would double the log lines).
    assert files(out) == files(single_run)
    assert len((out / "metrics.jsonl").read_text().splitlines()) == len(
        (single_run / "metrics.jsonl").read_text().splitlines())


def test_only_rank0_writes_and_resume_continues_the_same_run(single_run, small_model_dir, tmp_path):
    """Ranks in separate working directories with a relative --output: anything rank 1 wrote
    would land in its own directory. Rank 0's checkpoint alone resumes both."""
    a, b = tmp_path / "rank0", tmp_path / "rank1"
    a.mkdir()
    b.mkdir()
    results = start_ranks(run_args(small_model_dir, steps=2) + ["--output", "run"], [a, b], tmp_path)
    assert [code for code, _, _ in results] == [0, 0], results
    assert (a / "run" / "checkpoints").is_dir()
    results = start_ranks(["train", "--resume", "run", "--steps", "3", "--no-progress"], [a, b], tmp_path)
    assert [code for code, _, _ in results] == [0, 0], results
    assert "resuming run from step_000002" in results[0][1]
    assert results[1][1] == ""  # rank 1 prints nothing: rank 0 speaks for the run
    assert list(b.iterdir()) == []
    assert_same_run(single_run, a / "run")


def test_a_process_that_dies_stops_the_others(small_model_dir, tmp_path):
    """Started without a launcher, nothing but the lost connection tells rank 0 its peer died.
    Rank 1 exits abruptly as step 2 begins (test hook); rank 0 meets it in the step's first
    exchange, and stops with one line naming the checkpoint to resume from."""
    a, b = tmp_path / "rank0", tmp_path / "rank1"
    a.mkdir()
    b.mkdir()
    t0 = time.monotonic()
    args = run_args(small_model_dir, steps=4) + ["--output", str(a / "run")]
    os.environ[distributed.TEST_EXIT] = "1:2"
    try:
        (code0, _, err0), (code1, _, _) = start_ranks(args, [a, b], tmp_path, timeout=120)
    finally:
        del os.environ[distributed.TEST_EXIT]
    assert time.monotonic() - t0 < 120
    assert (code0, code1) == (1, 3), err0
    assert "Traceback" not in err0
    line = [x for x in err0.splitlines() if x.startswith("error: ")]
    assert len(line) == 1 and line[0].startswith("error: rank 0: lost the connection to another process"), err0
    assert line[0].endswith(f"last checkpoint: {a / 'run' / 'checkpoints' / 'step_000001'}")
    assert [m["step"] for m in train_lines(a / "run")] == [1]


def test_under_mlx_launch_a_dead_process_ends_the_launch(small_model_dir, tmp_path):
    """mlx.launch also stops the others (SIGTERM) when a process fails: rank 0 then ends either
    at the lost connection or by saving at the step boundary; both say where to resume."""
    out = tmp_path / "run"
    t0 = time.monotonic()
    r = launch(run_args(small_model_dir, steps=4) + ["--output", str(out)],
               launcher_args=("--env", f"{distributed.TEST_EXIT}=1:2"), timeout=120)
    assert time.monotonic() - t0 < 120
    assert "Node with rank 1 exited with code 3" in r.stderr
    # mlx.launch itself exits 0 whatever its processes did; it reports their codes. Rank 0's is
    # 1, 143 or -15 depending on where the SIGTERM met it, never 0.
    assert re.search(r"Node with rank 0 exited with code -?[1-9]", r.stderr), r.stderr
    assert f"last checkpoint: {out / 'checkpoints' / 'step_000001'}" in r.stderr or \
        f"last checkpoint {out / 'checkpoints' / 'step_000001'}" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_indivisible_global_batch_is_a_one_line_error(small_model_dir, tmp_path):
    out = tmp_path / "run"
    r = launch(["train", "--model", str(small_model_dir), "--output", str(out), "--set", "train.prompts_per_step=3"],
               timeout=120)
    # Each rank finds it; mlx.launch stops the other when the first exits, so one or two lines.
    errors = [x for x in r.stderr.splitlines() if x.startswith("error: ")]
    assert errors and all(e == errors[0] for e in errors), r.stderr
    assert errors[0].startswith("error: train.prompts_per_step: 3 prompts do not split evenly over 2 processes")
    assert "Traceback" not in r.stderr
    assert "exited with code 2" in r.stderr
    assert not out.exists()


# ---------------------------------------------------------------- one process: the helpers


def test_helpers_are_identities_in_one_process():
    assert (distributed.rank(), distributed.size(), distributed.is_main()) == (0, 1, True)
    x = np.array([[1.5, np.nan], [2.0, 3.0]])
    assert distributed.gather(x) is not None and np.array_equal(distributed.gather(x), x, equal_nan=True)
    assert distributed.sum_values([1.0, 2.5]).tolist() == [1.0, 2.5]
    assert distributed.broadcast({"a": [1, 2]}) == {"a": [1, 2]}
    assert distributed.shard(6) == slice(0, 6)
    grads = {"w": mx.ones((2, 2))}
    assert distributed.sum_gradients(grads) is grads
    assert distributed.any_true(True) and not distributed.any_true(False)


def test_processes_sharing_a_machine_are_counted_from_the_host_list(tmp_path, monkeypatch):
    hosts = tmp_path / "hosts.json"
    hosts.write_text(json.dumps([["10.0.0.1:5000"], ["10.0.0.1:5001"], ["10.0.0.2:5002"]]))
    monkeypatch.setenv("MLX_HOSTFILE", str(hosts))
    assert [distributed._processes_on_this_machine(r) for r in range(3)] == [2, 2, 1]
    monkeypatch.setenv("MLX_HOSTFILE", str(tmp_path / "missing.json"))
    assert distributed._processes_on_this_machine(0) == 1


def test_step_normalizer_counts_every_process_rows_tokens_and_micro_batches():
    cfg = make_config(None, [("train.prompts_per_step", 8), ("train.grad_accumulation_steps", 4),
                             ("rollout.max_tokens", 32)])
    one = step_normalizer([16], 300, cfg)
    assert (one.num_sequences, one.num_tokens, one.max_len, one.num_micro) == (16, 300, 32, 4)
    # Two processes with 8 rows each cut them into micro-batches of 4 (16 / 4): 4 in all.
    two = step_normalizer([8, 8], 300, cfg)
    assert (two.num_sequences, two.num_tokens, two.num_micro) == (16, 300, 4)
    # Uneven shares (rows with zero advantage dropped): 10 rows, micro-batches of 3 -> 2 + 1.
    assert step_normalizer([7, 3], 90, cfg).num_micro == 4
    assert step_normalizer([10, 0], 90, cfg).num_micro == 4
