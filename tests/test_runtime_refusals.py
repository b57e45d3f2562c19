"""Silent nonsense refused at run time, each as a real CLI subprocess on real files: a reward's own
KeyboardInterrupt is its error wherever rewards run (a real Ctrl-C stays an interrupt); a run is
never written into a filesystem root or the home directory, and a manifest copied from another
directory proves nothing; a batch decoded at once that cannot fit in memory, and a prompt past
the model's context, are refused in one line before any decoding."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, one_line_error, run_cli, tree_hash
from mlx_grpo.rundir import MANIFEST, RunDirError, check_run_dir, prepare_run_dir, read_manifest

NO_BLAS = {"MLX_GRPO_NO_FAST_BLAS": "1"}  # these commands fail (or finish) in seconds: no BLAS restart
GOOD = "<think> 2 + 3 = 5 </think> <answer> 5 </answer>"
TINY = ["--batch-size", "2", "-G", "2", "--max-tokens", "4", "--no-progress", "--set", "output.eval_size=2"]


def tiny_run(model, out, *extra, env=None):
    """Cheap training steps into ``out`` (one unless ``extra`` says otherwise)."""
    return run_cli("train", "--model", str(model), "--output", str(out), "--steps", "1", *TINY, *extra,
                   env={**NO_BLAS, **(env or {})})


# ------------------------------------------------------------ a reward's own KeyboardInterrupt

# Raises KeyboardInterrupt in the N-th held-out evaluation (a batch of output.eval_size=2; a
# training step scores 2 prompts x 2 = 4): 1 before the first step, 2 after step 1, 3 after the last.
ON_EVAL = ("import os\nstate = {'evals': 0}\n"
           "def r(prompts, completions, **kw):\n"
           "    if len(completions) == 2:\n"
           "        state['evals'] += 1\n"
           "        if state['evals'] == int(os.environ['RAISE_ON_EVAL']):\n"
           "            raise KeyboardInterrupt\n"
           "    return [0.5] * len(completions)\n")


@pytest.mark.parametrize("nth", [1, 2, 3], ids=["before the first step", "every eval_every", "after the last step"])
def test_a_rewards_keyboard_interrupt_in_any_evaluation_is_its_error(small_model_dir, tmp_path, nth):
    """Before: in the evaluation before the first step (and the final one) it was taken for the
    user's Ctrl-C (exit 130, 'interrupted'); in a training step it was the reward's error."""
    f = tmp_path / "kbd.py"
    f.write_text(ON_EVAL)
    out = tmp_path / "o"
    r = tiny_run(small_model_dir, out, "--steps", "2", "--set", "output.eval_every=1", "--set", "output.save_every=1",
                 "--set", f"rewards.{f}:r=1", env={"RAISE_ON_EVAL": str(nth)})
    one_line_error(r, f"reward {f}:r raised KeyboardInterrupt")
    assert not (out / "summary.json").exists()  # the run did not finish


@pytest.mark.parametrize("command", ["eval", "reward"])
def test_a_rewards_keyboard_interrupt_in_eval_and_the_rewards_lab_is_its_error(small_model_dir, tmp_path, command):
    f = tmp_path / "kbd.py"
    f.write_text("def r(prompts, completions, **kw):\n    raise KeyboardInterrupt\n")
    (tmp_path / "c.jsonl").write_text(json.dumps({"completion": GOOD, "answer": "5"}) + "\n")
    if command == "eval":
        r = run_cli("eval", "--model", str(small_model_dir), "--n", "2", "--max-tokens", "4",
                    "--set", f"rewards.{f}:r=1", env=NO_BLAS)
    else:
        r = run_cli("reward", "--completions", str(tmp_path / "c.jsonl"), "--rewards", f"{f}:r", env=NO_BLAS)
    one_line_error(r, f"reward {f}:r raised KeyboardInterrupt on sample 0")


SLEEPS = ("import pathlib, time\n"
          "def r(prompts, completions, **kw):\n"
          "    pathlib.Path({marker!r}).touch()\n"
          "    time.sleep(120)\n"
          "    return [0.5] * len(completions)\n")


@pytest.mark.parametrize("command", ["train", "reward"])
def test_a_real_ctrl_c_while_a_reward_runs_is_an_interrupt(small_model_dir, tmp_path, command):
    """A SIGINT that arrives while a reward runs (here in the evaluation before the first step,
    and in the rewards lab) stops the command as interrupted, never as the reward's error."""
    marker = tmp_path / "scoring"
    f = tmp_path / "slow.py"
    f.write_text(SLEEPS.format(marker=str(marker)))
    (tmp_path / "c.jsonl").write_text(json.dumps({"completion": GOOD}) + "\n")
    if command == "train":
        args = ["train", "--model", str(small_model_dir), "--output", str(tmp_path / "o"), "--steps", "1", *TINY,
                "--set", f"rewards.{f}:r=1"]
    else:
        args = ["reward", "--completions", str(tmp_path / "c.jsonl"), "--rewards", f"{f}:r"]
    # The command starts as from a terminal, with SIGINT at its default: a suite started in the
    # background (`pytest &`, nohup) hands its children SIGINT ignored, and Python keeps it so.
    p = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *args], cwd=ROOT, env={**os.environ, **NO_BLAS},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    end = time.monotonic() + 120
    while not marker.exists():
        assert p.poll() is None and time.monotonic() < end, p.communicate()
        time.sleep(0.01)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert "raised" not in err and "Traceback" not in err, err
    assert p.returncode == 130 and "interrupted" in err, (p.returncode, err)  # every command alike


# ------------------------------------------------------------ the run directory

@pytest.mark.parametrize("output", ["/", "//", "/..", "/tmp/.."])
def test_a_filesystem_root_is_never_a_run_directory(tmp_path, output):
    """Before: as root, `--output /` wrote a run's files into / (and --overwrite removed them
    there). The model does not exist, so a missed check would still write nothing."""
    before = sorted(os.listdir("/"))
    r = run_cli("train", "--output", output, "--model", str(tmp_path / "no-model"), "--steps", "1", env=NO_BLAS)
    one_line_error(r, f"output.dir: {output} (/) is the filesystem root" if output != "/" else
                   "output.dir: / is the filesystem root; a run needs a directory of its own, e.g. /runs/NAME")
    assert sorted(os.listdir("/")) == before


def test_the_home_directory_is_never_a_run_directory(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "config.yaml").write_text("mine: true\n")
    (tmp_path / "link").symlink_to(home)
    before = tree_hash(tmp_path)
    for output in (home, tmp_path / "link", f"{home}/."):
        r = run_cli("train", "--output", str(output), "--overwrite", "--model", str(tmp_path / "no-model"),
                    "--steps", "1", env={**NO_BLAS, "HOME": str(home)})
        one_line_error(r, "is your home directory; a run needs a directory of its own, e.g. "
                          f"{home}/runs/NAME")
    assert tree_hash(tmp_path) == before


def test_a_copied_manifest_proves_nothing(small_model_dir, tmp_path):
    """Before: a .mlx-grpo-run copied from a run into the user's folder let --overwrite delete the
    user's config.yaml. Now the manifest names its own directory: a copy lists nothing there."""
    run = tmp_path / "run"
    r = tiny_run(small_model_dir, run)
    assert r.returncode == 0, r.stderr
    assert json.loads((run / MANIFEST).read_text())["dir"] == str(run.resolve())
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: settings\n")
    (mine / "notes.txt").write_text("mine")
    shutil.copy(run / MANIFEST, mine / MANIFEST)
    before = tree_hash(mine)
    r = tiny_run(small_model_dir, mine, "--overwrite")
    one_line_error(r, f"output.dir: {mine}/config.yaml was not written by mlx-grpo (its {MANIFEST} was "
                      f"written for {run.resolve()}: a copy proves nothing)")
    assert tree_hash(mine) == before
    # A whole run copied: refused in the same way; --resume continues it and gives it its own manifest.
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, symlinks=True)
    assert read_manifest(copy) == []
    with pytest.raises(RunDirError, match="a copy proves nothing"):
        check_run_dir(copy, overwrite=True)
    r = run_cli("train", "--resume", str(copy), "--steps", "2", "--no-progress", env=NO_BLAS)
    assert r.returncode == 0, r.stderr
    assert json.loads((copy / MANIFEST).read_text())["dir"] == str(copy.resolve())
    check_run_dir(copy, overwrite=True)
    # A run renamed keeps its directory's device and inode: still ours.
    moved = tmp_path / "moved"
    os.rename(run, moved)
    assert "config.yaml" in read_manifest(moved)
    check_run_dir(moved, overwrite=True)
    # A run in the home directory (written there before this check) is not resumed in place.
    r = run_cli("train", "--resume", str(moved), "--steps", "2", "--no-progress", env={**NO_BLAS, "HOME": str(moved)})
    one_line_error(r, f"--resume: {moved} is your home directory")


def test_a_manifest_from_before_manifests_named_their_directory(tmp_path):
    """Such a manifest cannot tell a copy from the original: it is trusted where a complete
    checkpoint shows a run lives there, and nowhere else."""
    old = {"written_by": "mlx-grpo", "version": "0.1.0", "files": ["config.yaml", "metrics.jsonl", "checkpoints"]}
    run = tmp_path / "run"
    (run / "checkpoints" / "step_000001").mkdir(parents=True)
    (run / "config.yaml").write_text("x: 1\n")
    (run / MANIFEST).write_text(json.dumps(old))
    assert read_manifest(run) == old["files"]
    prepare_run_dir(run, overwrite=True)  # removes what the run wrote, writes a manifest naming it
    assert not (run / "config.yaml").exists() and not (run / "checkpoints").exists()
    assert json.loads((run / MANIFEST).read_text())["dir"] == str(run.resolve())
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my: settings\n")
    (mine / MANIFEST).write_text(json.dumps(old))
    assert read_manifest(mine) == []
    before = tree_hash(mine)
    with pytest.raises(RunDirError, match="config.yaml was not written by mlx-grpo"):
        prepare_run_dir(mine, overwrite=True)
    assert tree_hash(mine) == before


# ------------------------------------------------------------ memory of a batch decoded at once

MEMORY = {**NO_BLAS, "MLX_GRPO_MEMORY_LIMIT": "200MB"}  # the same refusal on any machine


@pytest.mark.parametrize("args,msg", [
    (["eval", "--n", "2", "-k", "200000"], "--samples: 200000 completions decoded at once need ~"),
    (["generate", "-p", "1 + 2", "-k", "200000"], "--samples: 200000 completions decoded at once need ~"),
    (["reward", "--samples", "2", "-G", "200000"], "--group-size: 400000 completions decoded at once need ~"),
    (["eval", "--n", "2", "--max-tokens", "300"], None),  # fits: the check passes, the eval runs
])
def test_a_batch_that_cannot_fit_in_memory_is_refused_before_decoding(small_model_dir, args, msg):
    """Before: `eval -k 200000` and `reward --samples -G 200000` were killed by the kernel with no
    message (train already refused such a rollout before its first step)."""
    r = run_cli(*args, "--model", str(small_model_dir), env=MEMORY)
    if msg is None:
        assert r.returncode == 0, r.stderr
        return
    one_line_error(r, msg)
    assert "(85% of the 0.20 GB available); lower " in r.stderr, r.stderr


# ------------------------------------------------------------ prompts past the model's context

def test_a_question_longer_than_the_context_is_refused_in_generate(small_model_dir):
    """Before: a 100 KB question was prefilled and decoded for minutes."""
    r = run_cli("generate", "--model", str(small_model_dir), "-p", "1 + 2 " * 20_000, env=NO_BLAS)
    one_line_error(r, "--prompt: the prompt is ")
    assert "tokens; with rollout.max_tokens 20 it exceeds the model's context of 512 tokens" in r.stderr


@pytest.mark.parametrize("command", ["eval", "reward"])
def test_a_data_row_longer_than_the_context_is_refused_naming_its_line(small_model_dir, tmp_path, command):
    """eval (the held-out rows, the last 2 of 10 here) and reward --model (the training rows
    sampled) check every prompt they decode, as train does, and name the file and line."""
    rows = [{"prompt": f"{i} + 1", "answer": str(i + 1)} for i in range(10)]
    long_at = 9 if command == "eval" else 1  # a held-out row; a training row
    rows[long_at]["prompt"] = " + ".join(["1"] * 2000)
    d = tmp_path / "d.jsonl"
    d.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if command == "eval":
        r = run_cli("eval", "--model", str(small_model_dir), "--data", str(d), "--set", "data.eval_size=2", env=NO_BLAS)
        key = "output.eval_max_tokens"
    else:
        r = run_cli("reward", "--model", str(small_model_dir), "--samples", "3", "--set", "data.task=jsonl",
                    "--set", f"data.path={d}", "--set", "data.eval_size=2", env=NO_BLAS)
        key = "rollout.max_tokens"
    one_line_error(r, f"{d}:{long_at + 1}: the prompt is ")
    assert f"tokens; with {key} 20 it exceeds the model's context of 512 tokens" in r.stderr


# ------------------------------------------------------------ math-verify's explosive answers

EXPLOSIVE = ["(x+1)^{999}-(x-1)^{999}", "\\sin(x)^{99}+\\cos(x)^{99}", "x^{999*999}", "2^{999*999*999}",
             "\\binom{999999}{499999}", "\\sum_{k=1}^{999} k^{k}", "\\prod_{k=1}^{999}(x+k)", "e^{999}"]


@pytest.mark.parametrize("answer", EXPLOSIVE)
def test_an_explosive_answer_costs_the_accuracy_reward_no_math_verify_timeout(answer):
    """Before: each of these held math-verify for its whole 1 s timeout, per completion. Now the
    bound refuses them before parsing (a wrong answer), in well under 50 ms a reward call."""
    pytest.importorskip("math_verify", reason="math-verify is not installed (pip install -e '.[math]'); "
                                              "tests/test_reward_adversarial.py checks the bound itself")
    from mlx_grpo.rewards import BUILTIN
    from mlx_grpo.rewards.answers import math_verify_checker, safe_for_math_verify

    assert not safe_for_math_verify(answer)
    math_verify_checker()("x", "x")  # its imports, once, outside the time measured
    completion = f"<think> it expands </think> <answer> {answer} </answer>"
    start = time.perf_counter()
    assert BUILTIN["accuracy"](["p"], [completion], answer=["2x + 1"]) == [0.0]
    assert time.perf_counter() - start < 0.05
