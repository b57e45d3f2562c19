"""Every refusal is one line with exit 2: numbers past what their key or
their dtype holds, YAML past the size of a config, path names past the filesystem's limits, run
files holding numbers no float holds, user exceptions whose message is several lines or cannot be
shown, and a closed stdout. Real subprocesses, real files."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, one_line_error, run_cli, tree_hash

NO_BLAS = {"MLX_GRPO_NO_FAST_BLAS": "1"}
GOOD = "<think> 2 + 3 = 5 </think> <answer> 5 </answer>"


def _laughs(levels: int, key: str = "rollout:\n  stop:") -> str:
    """A billion-laughs YAML: each level a list of 9 aliases of the level below."""
    lines = [key, '  - &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    lines += [f"  - &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def _nested(n: int) -> str:
    return "train:\n  steps: " + "[" * n + "]" * n + "\n"


DOOR = [  # (train arguments, YAML text or None, message)
    (["--seed", "-1"], None, "train.seed: must be in 0..2**64-1 (an unsigned 64-bit seed), got -1"),
    (["--seed", str(2**64)], None, f"train.seed: must be in 0..2**64-1 (an unsigned 64-bit seed), got {2**64}"),
    (["--set", "data.split_seed=-3"], None, "data.split_seed: must be in 0..2**64-1"),
    (["--steps", str(10**23)], None, f"train.steps: must be at most 1000000000 in size, got {10**23}"),
    ([], f"train:\n  steps: {10**30}\n", f"train.steps: must be at most 1000000000 in size, got {10**30}"),
    (["--set", f"rollout.max_tokens={10**19}"], None, "rollout.max_tokens: must be at most 1000000000 in size"),
    ([], "train:\n  steps: 1" + "0" * 5000 + "\n", "cannot read a number (Exceeds the limit (4300 digits)"),
    (["--lr", "1e308"], None, "train.learning_rate: must be within float32's range (|x| <= 3.4e38), got 1e+308"),
    ([], "grpo:\n  beta: 1.0e+39\n", "grpo.beta: must be within float32's range (|x| <= 3.4e38), got 1e+39"),
    (["--set", "rewards.format=-1e300"], None, "rewards.format: must be within float32's range"),
    ([], _nested(100_000), "nested too deeply (more than 64 levels)"),
    ([], _nested(100), "nested too deeply (more than 64 levels)"),  # PyYAML reads it; still no config
    (["--set", "rollout.stop=" + "[" * 60_000 + "]" * 60_000], None, "--set rollout.stop: nested too deeply"),
    ([], _laughs(9), "too large for a config (over 100000 values once its aliases are expanded)"),
    # values that ran and meant nothing
    (["--set", "rollout.stop="], None, "rollout.stop[0]: must not be empty (an empty stop string ends every completion"),
    ([], "rollout:\n  stop: ['']\n", "rollout.stop[0]: must not be empty"),
    ([], "rewards:\n  accuracy: 3.0e+38\n  format: 3.0e+38\n", "rewards.accuracy: must be at most 1e+06 in size"),
    (["--set", "rewards.format=1e7"], None, "rewards.format: must be at most 1e+06 in size"),
    (["--set", "output.eval_size=-1"], None, "output.eval_size: must be at least 1 (null: all), got -1"),
    ([], "output:\n  eval_size: 0\n", "output.eval_size: must be at least 1 (null: all), got 0"),
    ([], "adapter:\n  keys: []\n", "adapter.keys: must name at least one module (null: every linear), got []"),
    (["--lr", "1e-320"], None, "train.learning_rate: must be 0 or at least 1.2e-38 in size (smaller is 0 in float32"),
    (["--beta", "1e-40"], None, "grpo.beta: must be 0 or at least 1.2e-38 in size"),
    (["--temperature", "-1e-45"], None, "rollout.temperature: must be 0 or at least 1.2e-38 in size"),
    (["--set", "data.eval_path="], None, "data.eval_path: must not be empty (an unset shell variable?; null: the default)"),
    (["--model", "x", "--gguf-file", ""], None, "--gguf-file: empty path (an unset shell variable?); name a .gguf file"),
]


@pytest.mark.parametrize("args,text,msg", DOOR, ids=[f"{i}:{m[:30]}" for i, (_, _, m) in enumerate(DOOR)])
def test_numbers_and_yaml_past_a_config_are_refused_at_the_door(tmp_path, args, text, msg):
    """Before: tracebacks (MLX's seed TypeError, a bad_cast in the lr schedule, RecursionError,
    ValueError past 4300 digits) or exit 1 after training began (lr 1e308 is inf in float32)."""
    if text is not None:
        (tmp_path / "c.yaml").write_text(text)
        args = ["--config", str(tmp_path / "c.yaml"), *args]
    r = run_cli("train", *args, "--output", str(tmp_path / "o"), env=NO_BLAS)
    one_line_error(r, msg)
    assert r.stdout == "" and not (tmp_path / "o").exists()


def test_the_largest_seed_is_taken():
    from mlx_grpo.config import make_config

    assert make_config(None, [("train.seed", 2**64 - 1)]).train.seed == 2**64 - 1


def test_an_error_quotes_at_most_200_characters_of_a_value(tmp_path):
    """Before: a billion laughs small enough to load printed a 39-million-character error line."""
    (tmp_path / "c.yaml").write_text(_laughs(5, key="train:"))  # under 100k values: it loads
    r = run_cli("train", "--config", str(tmp_path / "c.yaml"), "--output", str(tmp_path / "o"), env=NO_BLAS)
    one_line_error(r, "train: expected a section (a mapping), got [['lol', 'lol'")
    assert len(r.stderr) < 400, len(r.stderr)


LONG_NAME = "x" * 300


@pytest.mark.parametrize("args,msg", [
    (["train", "--output", "{tmp}/" + LONG_NAME],
     "output.dir: a name in the path is 300 bytes long, the filesystem allows"),
    (["train", "--set", "output.dir={tmp}/" + "/".join(["abc"] * 1100)], "output.dir: the path is"),
    (["train", "--resume", "{tmp}/" + LONG_NAME], "--resume: a name in the path is 300 bytes long"),
    (["train", "--config", "{tmp}/" + LONG_NAME], "--config: a name in the path is 300 bytes long"),
    (["plot", "{tmp}/run", "--out", "{tmp}/" + LONG_NAME], "--out: a name in the path is 300 bytes long"),
    (["reward", "--completions", "{tmp}/c.jsonl", "--out", "{tmp}/" + LONG_NAME], "--out: a name in the path"),
    (["reward", "--completions", "{tmp}/" + LONG_NAME], "a name in this path is longer than the filesystem allows"),
    (["eval", "--data", "{tmp}/" + LONG_NAME], "a name in this path is longer than the filesystem allows"),
    (["runs", "{tmp}/" + LONG_NAME], "a name in this path is longer than the filesystem allows"),
])
def test_a_path_longer_than_the_filesystem_allows_is_one_line(tmp_path, args, msg):
    """Before: OSError ENAMETOOLONG tracebacks from the first stat of the path."""
    (tmp_path / "c.jsonl").write_text(json.dumps({"completion": GOOD, "answer": "5"}) + "\n")
    _metrics_run(tmp_path / "run", '{"step": 1, "kind": "train", "reward_mean": 0.5}')
    before = tree_hash(tmp_path)
    r = run_cli(*[a.replace("{tmp}", str(tmp_path)) for a in args], env=NO_BLAS)
    one_line_error(r, msg)
    assert r.stdout == "" and len(r.stderr) < 600
    assert tree_hash(tmp_path) == before


def _metrics_run(d, *lines, summary=None):
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    if summary is not None:
        (d / "summary.json").write_text(summary)
    return d


HUGE = "1" + "0" * 400


@pytest.mark.parametrize("lines,summary", [
    ([f'{{"step": 1, "kind": "train", "reward_mean": {HUGE}, "step_time": -{HUGE}}}'], None),
    ([f'{{"step": {HUGE}, "kind": "train", "reward_mean": 0.5}}'], None),
    (['{"step": 1, "kind": "train", "reward_mean": 0.5}', f'{{"step": 2, "kind": "eval", "accuracy": {HUGE}}}'], None),
    (['{"step": 1, "kind": "train", "reward_mean": 1e400}'], f'{{"seconds": {HUGE}}}'),
    (['{"step": 1, "kind": "train", "reward_mean": 0.5}'], '{"seconds": 1' + "0" * 5000 + "}"),
])
def test_runs_and_plot_take_numbers_no_float_holds(tmp_path, lines, summary):
    """Before: OverflowError tracebacks (int too large to convert to float) in `runs` and `plot`."""
    run = _metrics_run(tmp_path / "runs" / "r", *lines, summary=summary)
    r = run_cli("runs", str(tmp_path / "runs"), env=NO_BLAS)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "runs/r " in r.stdout and "inf" in r.stdout  # (the table keeps a long path's end)
    r = run_cli("runs", str(tmp_path / "runs"), "--json", env=NO_BLAS)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    r = run_cli("plot", str(run), "--out", str(tmp_path / "c.png"), env=NO_BLAS)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert (tmp_path / "c.png").stat().st_size > 0


BAD_REWARDS = """
class Unprintable(Exception):
    def __str__(self):
        raise RuntimeError("no")

def unprintable(prompts, completions, **kw):
    raise Unprintable()

def multiline(prompts, completions, **kw):
    raise ValueError("first line\\nsecond line\\nthird line")

def long(prompts, completions, **kw):
    raise ValueError("x" * 100_000)
"""


@pytest.mark.parametrize("name,msg", [
    ("unprintable", "raised Unprintable: (its message cannot be shown) on sample 0"),
    ("multiline", "raised ValueError: first line on sample 0"),
    ("long", "raised ValueError: xxxxx"),
])
def test_a_reward_exception_is_one_line_and_the_rest_under_debug(tmp_path, name, msg):
    """Before: a __str__ that raises gave a traceback, a multi-line message several lines."""
    (tmp_path / "bad.py").write_text(BAD_REWARDS)
    (tmp_path / "c.jsonl").write_text(json.dumps({"completion": GOOD, "answer": "5"}) + "\n")
    args = ["reward", "--completions", str(tmp_path / "c.jsonl"), "--rewards", f"{tmp_path}/bad.py:{name}"]
    r = run_cli(*args, env=NO_BLAS)
    one_line_error(r, f"reward {tmp_path}/bad.py:{name} {msg}")
    assert len(r.stderr) < 700, len(r.stderr)
    if name == "multiline":  # the whole message is in --debug's traceback
        r = run_cli(*args, "--debug", env=NO_BLAS)
        assert "second line\nthird line" in r.stderr and "Traceback" in r.stderr


def _closed_stdout(*args: str, cwd=ROOT):
    """``python cli.py ARGS >&-`` as cron may start it; the fast-BLAS restart left on."""
    return subprocess.run(["bash", "-c", '"$0" cli.py "$@" >&-', sys.executable, *args], cwd=cwd,
                          capture_output=False, stderr=subprocess.PIPE, text=True, timeout=600)


def test_a_closed_stdout_is_no_traceback_and_no_output_lands_in_a_run_file(tmp_path):
    """Before: AttributeError on sys.stdout (None) at the first flush; and fd 1, free, would have
    been given to the next file opened (a run's metrics.jsonl) with every print landing in it."""
    (tmp_path / "c.jsonl").write_text(json.dumps({"completion": GOOD, "answer": "5"}) + "\n")
    r = _closed_stdout("reward", "--completions", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "s.jsonl"))
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert [json.loads(x)["completion"] for x in (tmp_path / "s.jsonl").read_text().splitlines()] == [GOOD]
    out = tmp_path / "run"
    r = _closed_stdout("train", "--steps", "1", "--output", str(out), "--batch-size", "2", "-G", "2",
                       "--max-tokens", "4", "--no-progress", "--set", "output.eval_size=2")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line)  # only records: no device line, no progress, no library output
    r = _closed_stdout("runs", str(tmp_path))
    assert r.returncode == 0 and r.stderr == "", r.stderr
    r = _closed_stdout("reward", "--completions", str(tmp_path / "nope.jsonl"))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.splitlines()) == 1, r.stderr


def test_json_a_run_or_an_adapter_holds_nested_100k_deep_is_one_line(tmp_path):
    """Before: RecursionError tracebacks from json in `eval --adapter` (adapter_config.json) and
    in `train --overwrite` (a run's .mlx-grpo-run manifest: unreadable, so it proves nothing)."""
    deep = "[" * 100_000 + "]" * 100_000
    adapter = tmp_path / "a"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(deep)
    (adapter / "adapters.safetensors").write_bytes(b"")
    r = run_cli("eval", "--adapter", str(adapter), "--n", "1", env=NO_BLAS)
    one_line_error(r, f"--adapter: {adapter}/adapter_config.json: unreadable (nested too deeply)")
    out = tmp_path / "o"
    out.mkdir()
    (out / ".mlx-grpo-run").write_text(deep)
    (out / "config.yaml").write_text("mine: true\n")
    before = tree_hash(out)
    r = run_cli("train", "--output", str(out), "--overwrite", "--steps", "1", env=NO_BLAS)
    one_line_error(r, f"output.dir: {out}/config.yaml was not written by mlx-grpo")
    assert tree_hash(out) == before


def test_the_reward_report_prints_a_completion_escaped(tmp_path):
    """Before: a lone surrogate was a UnicodeEncodeError traceback, and terminal escapes (clear the
    screen, set the window title) reached the terminal raw."""
    bad = "bad \ud800 x \x1b[2J\x1b]0;pwned\x07 \u202e <answer> 5 </answer>"
    (tmp_path / "c.jsonl").write_text(json.dumps({"completion": bad, "answer": "5\x1b[31m"}) + "\n")
    r = run_cli("reward", "--completions", str(tmp_path / "c.jsonl"), env=NO_BLAS)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert "\x1b" not in r.stdout and "\x07" not in r.stdout and "\u202e" not in r.stdout
    assert "bad \\ud800 x \\x1b[2J\\x1b]0;pwned\\x07 \\u202e <answer> 5 </answer>" in r.stdout
    assert "answer=5\\x1b[31m" in r.stdout


def test_printable_keeps_text_and_the_characters_asked_for():
    from mlx_grpo.errors import printable

    assert printable("2 + 3 = 5\u00a0é 中") == "2 + 3 = 5\u00a0é 中"
    assert printable("a\n\tb\x1b[0m\r", keep="\n\t") == "a\n\tb\\x1b[0m\\r"


def _unshare_env() -> dict:
    """The environment for ``unshare``: without the suite's LD_PRELOAD of a multi-threaded BLAS,
    whose threads start with the process and make unshare(CLONE_NEWUSER) fail (EINVAL)."""
    return {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}


def _read_only_namespace(folder) -> bool:
    """Whether this machine lets a user namespace bind-mount ``folder`` read-only (unshare -rm)."""
    if shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "-rm", "sh", "-c", 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0"',
                        str(folder)], capture_output=True, env=_unshare_env(), timeout=30)
    return r.returncode == 0


def test_resume_on_a_read_only_filesystem_is_one_line_and_changes_nothing(tmp_path):
    """Before: an OSError (EROFS) traceback from cutting metrics.jsonl, after the checks said yes."""
    if not _read_only_namespace(tmp_path):
        pytest.skip("no unprivileged read-only bind mounts here (unshare -rm)")
    out = tmp_path / "run"
    r = run_cli("train", "--steps", "1", "--output", str(out), "--batch-size", "2", "-G", "2", "--max-tokens", "4",
                "--no-progress", "--set", "output.eval_size=2", env=NO_BLAS)
    assert r.returncode == 0, r.stderr
    before = tree_hash(out)
    script = ('mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" && '
              '"$0" cli.py train --resume "$1" --steps 2 --no-progress')
    r = subprocess.run(["unshare", "-rm", "sh", "-c", script, sys.executable, str(out)], cwd=ROOT,
                       capture_output=True, text=True, env={**_unshare_env(), **NO_BLAS}, timeout=600)
    one_line_error(r, f"--resume: cannot write in {out} (read-only file system)")
    assert tree_hash(out) == before


def _path_params():
    """(command, parameter) for every option and argument of every command that takes a path."""
    from mlx_grpo.cli import PathText, main

    return [(name, p) for name, cmd in sorted(main.commands.items()) for p in cmd.params
            if isinstance(p.type, PathText)]


# Text options that are not paths (a choice, a task name, a question, a reward list); --output is
# refused by its key, output.dir (the config's own check, also for a YAML file's output.dir: "").
NOT_PATHS = {"--task", "--prompt-format", "--loss-type", "--adapter-type", "--prompt", "--rewards", "--output",
             "--set"}


def test_every_option_that_takes_a_path_refuses_an_empty_one():
    """A new path option declared type=str would be read as "not given" when empty again."""
    import click

    from mlx_grpo.cli import main

    for name, cmd in main.commands.items():
        for p in cmd.params:
            if p.type is click.STRING:
                assert p.opts[0] in NOT_PATHS, f"{name} {p.opts[0]}: a path option? then type=PathText"
    assert len(_path_params()) >= 25


@pytest.mark.parametrize("command,param", _path_params(), ids=[f"{c} {p.opts[0]}" for c, p in _path_params()])
def test_an_empty_path_is_one_line_and_changes_nothing(tmp_path, command, param):
    """Before: --config '', eval --adapter '', --run '' (an unset shell variable) were ignored: the
    default config, no adapter, the base model, evaluated and reported as if asked for."""
    import click

    if isinstance(param, click.Argument):
        args = [command, ""]
        flag = param.human_readable_name
    else:
        args = [command, param.opts[0], ""] + (["-p", "1 + 1"] if command == "generate" else [])
        flag = param.opts[0]
    (tmp_path / "keep").write_text("x")
    before = tree_hash(tmp_path)
    r = run_cli(*args, cwd=tmp_path, env=NO_BLAS, timeout=120)
    one_line_error(r, f"error: {flag}: empty path (an unset shell variable?); name ")
    assert r.stdout == "" and tree_hash(tmp_path) == before


@pytest.mark.parametrize("line,msg", [
    ('{"prompt": null, "answer": "5"}', "d.jsonl:2: field 'prompt' (data.prompt_field) must be a string or a number, got null"),
    ('{"prompt": {"q": "2 + 3"}, "answer": "5"}', "d.jsonl:2: field 'prompt' (data.prompt_field) must be a string or a number, got an object"),
    ('{"prompt": ["2 + 3"], "answer": "5"}', "d.jsonl:2: field 'prompt' (data.prompt_field) must be a string or a number, got a list"),
    ('{"prompt": "2 + 3", "answer": [5]}', "d.jsonl:2: field 'answer' (data.answer_field) must be a string or a number, got a list"),
    ('{"prompt": "2 + 3", "answer": {"v": 5}}', "d.jsonl:2: field 'answer' (data.answer_field) must be a string or a number, got an object"),
    ('{"prompt": "2 + 3", "answer": true}', "must be a string or a number, got true"),
    ('{"prompt": "2 + 3", "answer": NaN}', "must be a string or a number, got NaN"),
    ('{"prompt": "2 + 3", "answer": 1e400}', "must be a string or a number, got Infinity"),
    # Python reads no int of over 4300 digits: the error named no file or line
    ('{"prompt": "2 + 3", "answer": 1' + "0" * 5000 + "}", "d.jsonl:2: cannot read a number (Exceeds the limit (4300 digits)"),
])
def test_a_prompt_or_answer_that_is_not_text_is_refused_naming_file_and_line(tmp_path, line, msg):
    """Before: the question "None" or a Python repr ("{'q': '2 + 3'}") was trained on."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1 + 1", "answer": 2}\n' + line + "\n")
    r = run_cli("train", "--data", str(data), "--output", str(tmp_path / "o"), env=NO_BLAS)
    one_line_error(r, msg)
    assert not (tmp_path / "o").exists()  # (stdout: the BLAS line a run starts with)


def test_numbers_and_a_null_answer_are_rows(tmp_path):
    """Numbers are text as Python writes them; a null answer is a row without a reference (as a
    Parquet column holds null), which the accuracy reward leaves unscored."""
    from mlx_grpo.tasks import read_jsonl

    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": 12, "answer": 2.5}\n{"prompt": "x", "answer": null}\n{"prompt": "y"}\n')
    assert read_jsonl(str(data), "prompt", "answer") == [
        {"prompt": "12", "answer": "2.5"}, {"prompt": "x", "answer": None}, {"prompt": "y"}]


@pytest.mark.parametrize("weights,msg", [
    ("accuracy=1e7", "--rewards: weight '1e7' in 'accuracy=1e7' must be at most 1e+06 in size"),
    ("accuracy=1,format=-3e38", "--rewards: weight '-3e38' in 'format=-3e38' must be at most 1e+06 in size"),
    ("accuracy=1e-320", "--rewards: weight '1e-320' in 'accuracy=1e-320' must be 0 or at least 1.2e-38 in size"),
])
def test_reward_weights_on_the_command_line_are_checked_as_the_configs_are(tmp_path, weights, msg):
    (tmp_path / "c.jsonl").write_text(json.dumps({"completion": GOOD, "answer": "5"}) + "\n")
    r = run_cli("reward", "--completions", str(tmp_path / "c.jsonl"), "--rewards", weights, env=NO_BLAS)
    one_line_error(r, msg)
    assert r.stdout == ""
