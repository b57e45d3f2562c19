"""Real training subprocesses stopped by signals: Ctrl-C and SIGTERM save and say how to resume;
SIGKILL at many moments (inside a checkpoint save too) always leaves a checkpoint the run resumes
from, and the run killed and resumed again and again ends with the weights of an unbroken run."""

import json
import os
import signal
import subprocess
import sys
import time

import mlx.core as mx
import pytest

from conftest import ROOT, run_cli

ARGS = ["--batch-size", "2", "-G", "4", "--max-tokens", "6", "--no-progress", "--set", "data.max_operand=9",
        "--set", "data.eval_size=10", "--set", "output.eval_size=2", "--set", "rewards.soft_format=1",
        "--set", "rewards.tag_count=1", "--set", "train.learning_rate=0.01"]


def start(*args):
    return subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "train", *args], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(cond, proc, timeout=60.0, poll=0.0005):
    """Poll the file system until ``cond()`` holds (True) or the process ends (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    raise AssertionError("timed out")


def train_steps(run):
    return [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()
            if json.loads(x)["kind"] == "train"]


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_a_checkpoint_and_says_how_to_resume(small_model_dir, tmp_path, sig, code):
    run = tmp_path / "run"
    p = start("--model", str(small_model_dir), "--output", str(run), "--steps", "200",
              "--set", "output.save_every=0", *ARGS)
    assert wait_for(lambda: (run / "metrics.jsonl").exists() and train_steps(run), p)
    p.send_signal(sig)
    _, err = p.communicate(timeout=60)
    assert p.returncode == code, err
    assert f"resume with: python cli.py train --resume {run}" in err and "Traceback" not in err
    done = train_steps(run)
    assert done == list(range(1, len(done) + 1)) and len(done) < 200
    assert (run / "checkpoints" / f"step_{done[-1]:06d}" / "state.json").exists()
    if sig == signal.SIGINT:  # and the run goes on from there, each step logged once
        r = run_cli("train", "--resume", str(run), "--steps", str(done[-1] + 2), "--no-progress")
        assert r.returncode == 0, r.stderr
        assert f"from step_{done[-1]:06d}" in r.stdout
        assert train_steps(run) == list(range(1, done[-1] + 3))


def test_second_ctrl_c_stops_at_once(small_model_dir, tmp_path):
    run = tmp_path / "run"
    p = start("--model", str(small_model_dir), "--output", str(run), "--steps", "200",
              "--set", "output.save_every=1", *ARGS)
    assert wait_for(lambda: (run / "metrics.jsonl").exists() and train_steps(run), p)
    p.send_signal(signal.SIGINT)
    time.sleep(0.01)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130 and "Traceback" not in err, err
    from mlx_grpo.checkpoint import latest_checkpoint

    assert f"last checkpoint {latest_checkpoint(run)}" in err  # the newest complete one, named
    r = run_cli("train", "--resume", str(run), "--steps", "8", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert train_steps(run) == list(range(1, 9))


def test_sigkill_at_many_points_always_resumes_to_the_same_run(small_model_dir, tmp_path):
    steps = 40  # enough that eight kill rounds never reach the end, however fast steps get
    common = ["--model", str(small_model_dir), "--steps", str(steps), "--set", "output.save_every=1",
              "--set", "output.keep_checkpoints=2", *ARGS]
    straight = tmp_path / "straight"
    r = run_cli("train", "--output", str(straight), *common)
    assert r.returncode == 0, r.stderr

    run = tmp_path / "run"
    ckdir = run / "checkpoints"
    names = lambda: os.listdir(ckdir) if ckdir.is_dir() else []  # noqa: E731
    complete = lambda: sorted(n for n in names() if n.startswith("step_"))  # noqa: E731
    # Each round waits for a moment, then kills: the first .tmp- directory of a save (a save in
    # progress), the moment a new checkpoint appears (between rename, root adapters and pruning),
    # or some time into a step (inside rollouts, updates or a log append).
    moments = ["in_save", "new_checkpoint", 0.05, "in_save", 0.2, "in_save", "new_checkpoint", 0.12]
    inside_save = 0
    for i, moment in enumerate(moments):
        p = start("--output", str(run), *(common if i == 0 else ["--resume", str(run), "--no-progress"]))
        before = complete()
        if i == 0:
            assert wait_for(lambda: complete(), p)  # the first checkpoint, so there is one to resume
            before = complete()
        if moment == "in_save":
            hit = wait_for(lambda: any(n.startswith(".tmp-") for n in names()), p)
        elif moment == "new_checkpoint":
            hit = wait_for(lambda: complete() and complete()[-1] not in before, p)
        else:
            hit = wait_for(lambda: complete() and complete()[-1] not in before, p)
            time.sleep(moment)
        p.kill()
        p.communicate()
        assert hit, f"round {i}: the run ended before the kill"
        inside_save += any(n.startswith(".tmp-") for n in names())
        from mlx_grpo.checkpoint import latest_checkpoint, read_state

        last = latest_checkpoint(run)
        assert last is not None, f"round {i}"
        assert read_state(last).step == int(last.name.split("_")[1])
        for name in ("adapters.safetensors", "optimizer.safetensors"):
            mx.load(str(last / name))  # complete, loadable files
    print("kills inside a save:", inside_save, "resumed from:", latest_checkpoint(run).name)
    assert inside_save >= 1, "no kill landed inside a checkpoint save"

    r = run_cli("train", "--resume", str(run), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert train_steps(run) == list(range(1, steps + 1))
    a = mx.load(str(straight / "adapters.safetensors"))
    b = mx.load(str(run / "adapters.safetensors"))
    for k in a:
        assert mx.allclose(a[k], b[k], atol=1e-5).item(), k
    s = json.loads((run / "summary.json").read_text())
    assert s["reward_last"] == pytest.approx(json.loads((straight / "summary.json").read_text())["reward_last"])
