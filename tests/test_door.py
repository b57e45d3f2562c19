"""Every option checked at the door: a bad value is one line naming
the option or key, exit 2, before any model loads; user rewards cannot end a run with their own
exit code or corrupt --json output; JSONL lines end at \\n only; plot names the bad metrics line.
Real subprocesses, real files."""

import json

import pytest

from conftest import one_line_error, run_cli, tree_hash
from mlx_grpo.runs import read_run
from mlx_grpo.tasks import iter_jsonl

NO_BLAS = {"MLX_GRPO_NO_FAST_BLAS": "1"}
GOOD = "<think> 2 + 3 = 5 </think> <answer> 5 </answer>"

DOOR = [
    (["eval", "--n", "0"], "--n: must be at least 1, got 0"),
    (["eval", "--n", "-2"], "--n: must be at least 1, got -2"),
    (["eval", "--max-tokens", "0"], "rollout.max_tokens: must be at least 1, got 0"),
    (["eval", "--temperature", "-0.5"], "rollout.temperature: must be >= 0, got -0.5"),
    (["eval", "--temperature", "nan"], "rollout.temperature: expected a finite number, got nan"),
    (["generate", "-p", "1 + 1", "--temperature", "nan"], "rollout.temperature: expected a finite number, got nan"),
    (["generate", "-p", "1 + 1", "--temperature", "-1"], "rollout.temperature: must be >= 0, got -1.0"),
    (["generate", "-p", "1 + 1", "--max-tokens", "0"], "rollout.max_tokens: must be at least 1, got 0"),
    (["train", "--lr", "inf"], "train.learning_rate: expected a finite number, got inf"),
    (["train", "--set", "rewards.accuracy=nan"], "rewards.accuracy: expected a finite number, got nan"),
    (["train", "--set", "output.eval_max_tokens=0"], "output.eval_max_tokens: must be at least 1, got 0"),
    (["reward", "--completions", "{tmp}/c.jsonl", "--rewards", "accuracy=nan", "--json"],
     "--rewards: weight 'nan' in 'accuracy=nan' must be a finite number"),
    (["reward", "--completions", "{tmp}/c.jsonl", "--rewards", "format=-inf"],
     "--rewards: weight '-inf' in 'format=-inf' must be a finite number"),
    (["bench", "--quick", "--processes", "1"], "--processes: must be 0 (off) or at least 2"),
    (["bench", "--shape", "qwen2.5-0.5b", "-G", "0"], "Invalid value for '-G': 0 is not in the range x>=1"),
    (["bench", "--shape", "qwen2.5-0.5b", "--max-tokens", "0"], "Invalid value for '--max-tokens': 0 is not in the range x>=1"),
    # an empty --rewards (an unset shell variable) is refused, not read as "the configured ones"
    (["reward", "--completions", "{tmp}/c.jsonl", "--rewards", ""], "--rewards: no reward named in '' (an unset shell variable?)"),
    (["reward", "--completions", "{tmp}/c.jsonl", "--rewards", " , "], "--rewards: no reward named in ' , '"),
    # click's own checks, in the same one-line form (no usage block)
    (["eval", "--samples", "-1"], "cli.py eval: Invalid value for '--samples' / '-k': -1 is not in the range x>=0."),
    (["train", "--steps", "x"], "cli.py train: Invalid value for '--steps': 'x' is not a valid integer."),
    (["generate", "--max-tokens", "4"], "cli.py generate: Missing option '--prompt' / '-p'."),
    (["train", "--stpes", "3"], "cli.py train: No such option"),  # (wording varies by click version)
]


@pytest.mark.parametrize("args,msg", DOOR, ids=[" ".join(a)[:40] for a, _ in DOOR])
def test_bad_option_one_line_before_any_work(tmp_path, args, msg):
    (tmp_path / "c.jsonl").write_text(json.dumps({"completion": GOOD, "answer": "5"}) + "\n")
    before = tree_hash(tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if args[0] == "train":
        args += ["--output", str(tmp_path / "o")]
    r = run_cli(*args, env=NO_BLAS)
    one_line_error(r, msg)
    assert r.stdout == "", r.stdout  # refused before anything ran (train's device line included)
    assert tree_hash(tmp_path) == before


def test_reward_calling_sys_exit_stops_training_with_exit_2(small_model_dir, tmp_path):
    """Before: sys.exit(0) inside a reward ended training with exit 0 and a near-empty run."""
    f = tmp_path / "quits.py"
    f.write_text("import sys\ndef r(prompts, completions, **kw):\n    sys.exit(0)\n")
    r = run_cli("train", "--model", str(small_model_dir), "--output", str(tmp_path / "o"), "--steps", "2",
                "--batch-size", "2", "-G", "2", "--max-tokens", "4", "--no-progress",
                "--set", "output.eval_size=1", "--set", f"rewards.{f}:r=1", env=NO_BLAS)
    one_line_error(r, f"reward {f}:r raised SystemExit: 0 on sample 0")


def test_reward_prints_never_reach_json_stdout(tmp_path):
    f = tmp_path / "chatty.py"
    f.write_text("print('hello from import')\n"
                 "def r(prompts, completions, **kw):\n    print('scoring', len(completions))\n"
                 "    return [1.0] * len(completions)\n")
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"completion": GOOD}) + "\n" for _ in range(3)))
    r = run_cli("reward", "--completions", str(tmp_path / "c.jsonl"), "--rewards", f"{f}:r,format", "--json",
                env=NO_BLAS)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)  # the whole of stdout is the one JSON object
    assert res["n"] == 3 and res["rewards"][f"{f}:r"]["mean"] == 1.0
    assert "hello from import" in r.stderr and "scoring 3" in r.stderr


ESCAPES = {  # what a reward may do to the process's output, each tried with --json
    "a subprocess writing to descriptor 1": "import os\nos.system('echo at-import')\n"
                                             "def r(p, c, **k):\n    os.system('echo from-a-subprocess')\n"
                                             "    return [1.0] * len(c)\n",
    "sys.stdout.close()": "import sys\ndef r(p, c, **k):\n    sys.stdout.close()\n    sys.stderr.close()\n"
                          "    return [1.0] * len(c)\n",
    "os.close(1) and os.close(2)": "import os\ndef r(p, c, **k):\n    os.close(1)\n    os.close(2)\n"
                                   "    return [1.0] * len(c)\n",
    "sys.stdout.buffer.write": "import sys\ndef r(p, c, **k):\n    sys.stdout.buffer.write(b'bytes\\n')\n"
                               "    print(sys.stdout.encoding, file=sys.stdout)\n    return [1.0] * len(c)\n",
    "os.fork() (the child returns too)": "import os\ndef r(p, c, **k):\n    os.fork()\n    return [1.0] * len(c)\n",
}


@pytest.mark.parametrize("body", list(ESCAPES.values()), ids=list(ESCAPES))
def test_reward_cannot_corrupt_or_close_the_output(tmp_path, body):
    """Before: a subprocess's echo landed in --json stdout, a fork printed the JSON twice (and in
    training two processes would write one run), os.close(1) ended in a traceback."""
    f = tmp_path / "escape.py"
    f.write_text(body)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"completion": GOOD, "answer": "5"}) + "\n" for _ in range(3)))
    r = run_cli("reward", "--completions", str(tmp_path / "c.jsonl"), "--rewards", f"{f}:r,accuracy", "--json",
                "--out", str(tmp_path / "scored.jsonl"), env=NO_BLAS)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)  # the whole of stdout is the one JSON object
    assert res["n"] == 3 and res["rewards"]["accuracy"]["mean"] == 1.0
    assert len((tmp_path / "scored.jsonl").read_text().splitlines()) == 3
    assert "Traceback" not in r.stderr


def test_reward_that_forks_trains_one_run(small_model_dir, tmp_path):
    f = tmp_path / "forks.py"
    f.write_text("import os\ndef r(prompts, completions, **kw):\n    os.fork()\n    return [0.5] * len(completions)\n")
    out = tmp_path / "o"
    r = run_cli("train", "--model", str(small_model_dir), "--output", str(out), "--steps", "2",
                "--batch-size", "2", "-G", "2", "--max-tokens", "4", "--no-progress",
                "--set", "output.eval_size=1", "--set", f"rewards.{f}:r=1", env=NO_BLAS)
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m["step"] for m in records if m.get("kind", "train") == "train"]
    assert steps == [1, 2]  # one process wrote the run: no step logged twice


def test_reward_import_that_exits_is_one_line(tmp_path):
    f = tmp_path / "cli_at_import.py"
    f.write_text("import argparse\np = argparse.ArgumentParser()\np.add_argument('--k', required=True)\n"
                 "p.parse_args()\ndef r(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    (tmp_path / "c.jsonl").write_text(json.dumps({"completion": GOOD}) + "\n")
    r = run_cli("reward", "--completions", str(tmp_path / "c.jsonl"), "--rewards", f"{f}:r", "--json", env=NO_BLAS)
    one_line_error(r, f"rewards.{f}:r: cannot import {f}: SystemExit: 2 (it printed: ")
    assert "required: --k" in r.stderr and r.stdout == ""


PROCESS_EXITS = {  # each ends the process unless intercepted (exit 0 or 3 looked like success or a code of ours)
    "os._exit(0)": ("import os\ndef r(p, c, **k):\n    os._exit(0)\n", "ProcessExit: os._exit(0)"),
    "os._exit(3)": ("import os\ndef r(p, c, **k):\n    os._exit(3)\n", "ProcessExit: os._exit(3)"),
    "bound at import": ("from os import _exit\ndef r(p, c, **k):\n    _exit(0)\n", "ProcessExit: os._exit(0)"),
    "posix._exit": ("import posix\ndef r(p, c, **k):\n    posix._exit(0)\n", "ProcessExit: os._exit(0)"),
    "os.abort()": ("import os\ndef r(p, c, **k):\n    os.abort()\n", "ProcessExit: os.abort()"),
    "caught as Exception": ("import os\ndef r(p, c, **k):\n    try:\n        os._exit(0)\n    except Exception:\n"
                            "        pass\n    return [1.0] * len(c)\n", "ProcessExit: os._exit(0)"),
}


@pytest.mark.parametrize("body,msg", list(PROCESS_EXITS.values()), ids=list(PROCESS_EXITS))
def test_reward_calling_os_exit_is_its_error_not_the_end_of_the_process(tmp_path, body, msg):
    """Before: os._exit(0) inside a reward ended the command with exit 0, no message, no output."""
    f = tmp_path / "exits.py"
    f.write_text(body)
    (tmp_path / "c.jsonl").write_text(json.dumps({"completion": GOOD, "answer": "5"}) + "\n")
    r = run_cli("reward", "--completions", str(tmp_path / "c.jsonl"), "--rewards", f"{f}:r", "--json", env=NO_BLAS)
    one_line_error(r, f"reward {f}:r raised {msg} on sample 0")
    assert r.stdout == ""


def test_a_child_a_reward_forks_may_still_call_os_exit(tmp_path):
    """The interception is for our process only: a forked child's os._exit ends the child."""
    f = tmp_path / "child.py"
    f.write_text("import os\ndef r(p, c, **k):\n    pid = os.fork()\n    if pid == 0:\n        os._exit(7)\n"
                 "    _, status = os.waitpid(pid, 0)\n    return [float(os.waitstatus_to_exitcode(status))] * len(c)\n")
    (tmp_path / "c.jsonl").write_text(json.dumps({"completion": GOOD}) + "\n")
    r = run_cli("reward", "--completions", str(tmp_path / "c.jsonl"), "--rewards", f"{f}:r", "--json", env=NO_BLAS)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["rewards"][f"{f}:r"]["mean"] == 7.0


def test_reward_calling_os_exit_in_training_stops_with_exit_2_and_the_steps_checkpointed(small_model_dir, tmp_path):
    """Before: training ended with exit 0 (or the reward's code), no message and no summary: it
    looked like success to a shell. Now step 2's reward error stops the run like any other (exit 2,
    one line naming the reward); step 1 is checkpointed and the run resumes from it."""
    f = tmp_path / "late_exit.py"
    f.write_text("import os\nstate = {'train_calls': 0, 'armed': False}\n"
                 "def r(prompts, completions, **kw):\n"
                 "    if len(completions) == 4:  # a training step's batch (2 prompts x 2), not the evaluation's 2\n"
                 "        state['train_calls'] += 1\n"
                 "        state['armed'] = state['armed'] or state['train_calls'] == 2\n"
                 "    if state['armed']:\n        os._exit(0)\n"
                 "    return [0.5] * len(completions)\n")
    out = tmp_path / "o"
    r = run_cli("train", "--model", str(small_model_dir), "--output", str(out), "--steps", "3",
                "--batch-size", "2", "-G", "2", "--max-tokens", "4", "--no-progress", "--set", "output.eval_size=2",
                "--set", "output.save_every=1", "--set", f"rewards.{f}:r=1", env=NO_BLAS)
    one_line_error(r, f"reward {f}:r raised ProcessExit: os._exit(0) on sample 0")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000001"]
    assert not (out / "summary.json").exists()  # the run did not finish
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(x).get("kind") == "train"]
    assert steps == [1]


SEPARATORS = "\u2028\u2029\u0085\x1c\x1d\x1e\x0b\x0c"


def test_jsonl_strings_with_unicode_line_separators_load(tmp_path):
    """str.splitlines would cut these JSON lines apart; valid JSON, so they must load."""
    p = tmp_path / "d.jsonl"
    rows = [{"prompt": f"a{c}b", "answer": "1"} for c in SEPARATORS]
    p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows), encoding="utf-8")
    got = list(iter_jsonl(str(p)))
    assert [n for n, _ in got] == list(range(1, len(rows) + 1))
    assert [o for _, o in got] == rows


def test_jsonl_with_separators_trains_and_scores(small_model_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is 2 + {i % 7} ?{c}", "answer": str(2 + i % 7)},
                                       ensure_ascii=False) + "\n" for i, c in enumerate(SEPARATORS * 2)),
                    encoding="utf-8")
    r = run_cli("train", "--model", str(small_model_dir), "--data", str(data), "--output", str(tmp_path / "o"),
                "--steps", "1", "--batch-size", "2", "-G", "2", "--max-tokens", "4", "--no-progress",
                "--set", "output.eval_size=2", env=NO_BLAS)
    assert r.returncode == 0, r.stderr
    comp = tmp_path / "c.jsonl"
    comp.write_text("".join(json.dumps({"completion": f"<think>{c}</think><answer>1</answer>"},
                                       ensure_ascii=False) + "\n" for c in SEPARATORS), encoding="utf-8")
    r = run_cli("reward", "--completions", str(comp), "--rewards", "format", "--json", env=NO_BLAS)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["n"] == len(SEPARATORS)


def test_metrics_with_separators_read_back(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(
        json.dumps({"step": 1, "kind": "train", "reward_mean": 0.5, "note": "a\u2028b"}, ensure_ascii=False) + "\n"
        + json.dumps({"step": 1, "kind": "eval", "accuracy": 0.5}) + "\n", encoding="utf-8")
    rec = read_run(run)
    assert len(rec.train) == 1 and len(rec.evals) == 1 and rec.train[0]["note"] == "a\u2028b"


MALFORMED = [
    ('{"step": 1, "kind": "train"}\n{oops\n{"step": 2, "kind": "train"}\n', "metrics.jsonl:2: not valid JSON"),
    ('{"step": 1, "kind": "train"}\n[1, 2]\n{"step": 3}\n', "metrics.jsonl:2: expected a JSON object with a numeric \"step\""),
    ('{"kind": "train"}\n', "metrics.jsonl:1: expected a JSON object"),
    ('{"step": "one", "kind": "train"}\n', "metrics.jsonl:1: expected a JSON object"),
    (b'{"step": 1}\n{"step": 2, "x": "\xff"}\n', "metrics.jsonl:2: not UTF-8 text"),
]


@pytest.mark.parametrize("text,msg", MALFORMED, ids=range(len(MALFORMED)))
def test_plot_on_malformed_metrics_names_file_and_line(tmp_path, text, msg):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_bytes(text if isinstance(text, bytes) else text.encode())
    before = tree_hash(tmp_path)
    r = run_cli("plot", str(run), env=NO_BLAS)
    one_line_error(r, f"{run}/{msg}")
    assert tree_hash(tmp_path) == before


def test_jsonl_with_a_byte_order_mark_or_deep_nesting(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('\ufeff{"prompt": "a", "answer": "1"}\n{"prompt": "b", "answer": "2"}\n', encoding="utf-8")
    assert [o["prompt"] for _, o in iter_jsonl(str(p))] == ["a", "b"]  # as Windows editors save it
    p.write_text('{"prompt": "a"}\n{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    with pytest.raises(Exception) as e:  # before: a RecursionError traceback
        list(iter_jsonl(str(p)))
    assert type(e.value).__name__ == "DataError" and str(e.value) == f"{p}:2: malformed JSON (nested too deeply)"


def _metrics_run(d):
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "kind": "train", "reward_mean": 0.1 * s}) + "\n"
                                             for s in (1, 2)))
    return d


DAMAGED_RUN_FILES = [  # (file, content, what `runs` says when it skips the run)
    ("config.yaml", "x: [1\n", "config.yaml: unreadable (while parsing a flow sequence)"),
    ("config.yaml", "- 1\n- 2\n", "config.yaml: expected a mapping, got list"),
    ("config.yaml", b"\xff\xfe", "config.yaml: unreadable ('utf-8' codec can't decode byte 0xff"),
    ("summary.json", "nope", "summary.json: unreadable (Expecting value"),
    ("summary.json", "[1]", "summary.json: expected a mapping, got list"),
]


@pytest.mark.parametrize("name,content,msg", DAMAGED_RUN_FILES)
def test_runs_skips_and_plot_ignores_a_damaged_config_or_summary(tmp_path, name, content, msg):
    """Before: runs and plot ended in tracebacks (YAMLError, AttributeError) or an error naming no file."""
    run = _metrics_run(tmp_path / "runs" / "r")
    (run / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    r = run_cli("runs", str(tmp_path / "runs"), env=NO_BLAS)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith(f"warning: skipping {run}: {run}/{msg}") and len(r.stderr.splitlines()) == 1, r.stderr
    r = run_cli("plot", str(run), "--out", str(tmp_path / "c.png"), env=NO_BLAS)  # curves need only metrics
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "c.png").stat().st_size > 0


def test_runs_lists_hand_edited_figures_as_missing(tmp_path):
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1, "kind": "train"}\n{"step": 2, "kind": "train", "reward_mean": "hi"}\n'
                                       '{"step": 3, "kind": "train", "reward_mean": 0.5}\n')
    (run / "config.yaml").write_text("train: 5\nmodel: [1]\n")
    (run / "summary.json").write_text('{"seconds": "long"}')
    r = run_cli("runs", str(tmp_path / "runs"), "--json", env=NO_BLAS)
    assert r.returncode == 0, r.stderr  # before: KeyError / AttributeError tracebacks
    (row,) = json.loads(r.stdout)
    assert (row["step"], row["steps"], row["model"], row["reward_first"], row["reward_last10"]) == (3, None, None, 0.5, 0.5)
