import json

import pytest

from mlx_grpo.config import DataConfig, ModelConfig
from mlx_grpo.tasks import DataError, columns, load_task, read_jsonl
from mlx_grpo.tasks.arithmetic import make_splits
from mlx_grpo.tasks.templates import R1_ZERO_PREAMBLE, PromptFormat, render_prompt


def test_arithmetic_splits_never_overlap_and_are_seeded():
    train, held = make_splits(29, 400, seed=0)
    assert len(held) == 400 and len(train) == 900 - 400
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert make_splits(29, 400, seed=0) == (train, held)
    assert make_splits(29, 400, seed=1)[1] != held
    a, b = map(int, held[0]["prompt"].split()[2::2][:2])
    assert held[0]["answer"] == str(a + b)


def test_multistep_splits_are_disjoint_seeded_three_number_sums():
    train, held = make_splits(14, 400, seed=0, terms=3)
    assert len(held) == 400 and len(train) == 15 ** 3 - 400
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert make_splits(14, 400, seed=0, terms=3) == (train, held)
    assert make_splits(14, 400, seed=1, terms=3)[1] != held
    for r in held:
        words = r["prompt"].split()
        assert words[:2] == ["What", "is"] and words[3] == words[5] == "+" and words[-1] == "?"
        assert r["answer"] == str(int(words[2]) + int(words[4]) + int(words[6]))
    data = load_task(DataConfig(task="multistep", max_operand=14, eval_size=400))
    assert (data.train, data.held_out) == (train, held)


def test_multistep_eval_size_must_leave_training_rows():
    with pytest.raises(DataError, match="data.eval_size: must be between 1 and 7 "):
        load_task(DataConfig(task="multistep", max_operand=1, eval_size=8))


def test_r1_template_word_for_word():
    text = render_prompt("What is 1 + 2 ?", PromptFormat())
    assert text == R1_ZERO_PREAMBLE + " User: What is 1 + 2 ? Assistant: <think>"
    assert render_prompt("Solve x", PromptFormat(response_prefix="")).endswith("User: Solve x. Assistant:")


def test_chat_template(small_model_dir):
    from mlx_grpo.models import load_model

    _, tok = load_model(ModelConfig(path=str(small_model_dir)))
    text = render_prompt("What is 1 + 2 ?", PromptFormat(kind="chat", response_prefix=""), tok)
    assert text.startswith(R1_ZERO_PREAMBLE) and text.endswith("User: What is 1 + 2 ? Assistant:")
    bare = render_prompt("What is 1 + 2 ?", PromptFormat(kind="chat", system_prompt=""), tok)
    assert bare == "User: What is 1 + 2 ? Assistant: <think>"


def test_chat_without_template_is_a_clear_error():
    class NoTemplate:
        chat_template = None

    with pytest.raises(ValueError, match="no chat template"):
        render_prompt("q", PromptFormat(kind="chat"), NoTemplate())


def test_jsonl_fields_delimiter_and_split(tmp_path):
    p = tmp_path / "gsm.jsonl"
    rows = [{"question": f"q{i}", "answer": f"work {i} #### {i * 2}", "level": i % 3} for i in range(20)]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    data = load_task(DataConfig(task="jsonl", path=str(p), prompt_field="question",
                                answer_delimiter="####", eval_size=4))
    assert len(data.train) == 16 and len(data.held_out) == 4
    assert data.train[3] == {"prompt": "q3", "answer": "6", "level": 0}
    assert columns(data.train[:2]) == {"answer": ["0", "2"], "level": [0, 1]}


@pytest.mark.parametrize("text,msg", [
    ('{"prompt": "a"}\n[1, 2]\n', ":2: expected a JSON object"),
    ('{"question": "a"}\n', ":1: missing field 'prompt'"),
    ("\n\n", "no rows (empty dataset)"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, text, msg):
    p = tmp_path / "d.jsonl"
    p.write_text(text)
    with pytest.raises(DataError) as e:
        read_jsonl(str(p), "prompt", "answer")
    assert str(p) in str(e.value) and msg in str(e.value)


# ---------------------------------------------------------------- countdown, gsm8k, datasets

import subprocess
import sys

from mlx_grpo.config import Config, ConfigError, CountdownConfig, make_config
from mlx_grpo.rewards import BUILTIN
from mlx_grpo.rewards.countdown import countdown_correct
from mlx_grpo.tasks import TASKS
from mlx_grpo.tasks import countdown

GSM8K_ROWS = [  # the exact openai/gsm8k row shape
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many "
                 "clips in May. How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 "
               "clips altogether in April and May.\n#### 72"},
    {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of "
                 "babysitting. How much did she earn?",
     "answer": "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned "
               "0.2 x 50 = $<<0.2*50=10>>10.\n#### 10"},
]


def gsm8k_rows(n, start=0):
    return [{"question": f"{GSM8K_ROWS[i % 2]['question']} (#{start + i})",
             "answer": GSM8K_ROWS[i % 2]["answer"].rsplit("####", 1)[0] + f"#### {start + i}"}
            for i in range(n)]


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)


def test_countdown_splits_disjoint_seeded_and_solvable():
    cfg = CountdownConfig(numbers=3, max_number=20, max_target=99, size=600)
    train, held = countdown.make_splits(cfg, 100, seed=0)
    assert len(train) == 500 and len(held) == 100
    key = lambda r: (tuple(sorted(r["numbers"])), r["target"])  # noqa: E731
    assert not {key(r) for r in train} & {key(r) for r in held}
    assert len({key(r) for r in train + held}) == 600
    assert countdown.make_splits(cfg, 100, seed=0) == (train, held)
    assert countdown.make_splits(cfg, 100, seed=1)[1] != held
    for r in train + held:
        assert len(r["numbers"]) == 3 and all(1 <= n <= 20 for n in r["numbers"])
        assert 1 <= r["target"] <= 99
        assert countdown_correct(r["solution"], r["numbers"], r["target"]), r
        assert f"[{', '.join(map(str, r['numbers']))}]" in r["prompt"] and f"equals {r['target']}." in r["prompt"]


@pytest.mark.parametrize("data,msg", [
    (DataConfig(task="countdown", eval_size=10, countdown=CountdownConfig(numbers=2, max_number=2, size=50)),
     "data.countdown: only"),
    (DataConfig(task="countdown", eval_size=50, countdown=CountdownConfig(size=50)), "data.eval_size: must be between 1 and 49"),
])
def test_countdown_impossible_settings_are_data_errors(data, msg):
    with pytest.raises(DataError, match=msg):
        load_task(data)


def test_countdown_held_out_judged_by_equation():
    row = {"prompt": "q", "numbers": [1, 2, 3], "target": 9}
    judge = TASKS["countdown"].judge
    assert judge("<think>x</think><answer>(1 + 2) * 3</answer>", row) == {
        "format": True, "strict": True, "lenient": True}
    assert judge("<answer>(1 + 2) * 3</answer>", row) == {"format": False, "strict": False, "lenient": True}
    assert judge("<think>x</think><answer>9</answer>", row)["strict"] is False
    # A user's dataset of countdown puzzles is judged as countdown; other tasks by their answer.
    assert TASKS["dataset"].judge("<answer>(1 + 2) * 3</answer>", row)["lenient"] is True
    assert TASKS["arithmetic"].judge("<think>x</think><answer>9</answer>", {"answer": "9"})["strict"] is True


def test_task_picks_its_reward_set_unless_rewards_are_configured(tmp_path):
    assert make_config(None).rewards == {"accuracy": 1.0, "format": 0.5}
    assert make_config(None, [("data.task", "countdown")]).rewards == TASKS["countdown"].rewards
    assert make_config(None, [("data.task", "countdown"), ("rewards.repetition", 0.1)]).rewards == {
        "countdown": 1.0, "format": 0.1, "repetition": 0.1}
    y = tmp_path / "c.yaml"
    y.write_text("data:\n  task: countdown\nrewards:\n  format: 1.0\n")
    assert make_config(str(y)).rewards == {"format": 1.0}
    y.write_text("data:\n  task: gsm8k\n")
    assert make_config(str(y)).rewards == TASKS["gsm8k"].rewards
    # Each task's set is on its entry, built-in rewards only; the config's own default (a Config
    # built without make_config) is the default task's.
    assert all(t.rewards and set(t.rewards) <= set(BUILTIN) for t in TASKS.values())
    assert Config().rewards == TASKS[DataConfig.task].rewards
    # train --task's help lists the tasks (read from TASKS when the help is shown).
    from click.testing import CliRunner

    from mlx_grpo.cli import main

    assert f"{' | '.join(TASKS)} [data.task]." in " ".join(CliRunner().invoke(main, ["train", "--help"]).output.split())
    # The task name is load_task's to check (an unknown task keeps the default set).
    unknown = make_config(None, [("data.task", "nosuch")])
    assert unknown.rewards == Config().rewards
    with pytest.raises(DataError, match="data.task: unknown task 'nosuch' .known: arithmetic, multistep, countdown, gsm8k, dataset, jsonl"):
        load_task(unknown.data)
    with pytest.raises(ConfigError, match="data.countdown.numbers: must be in 2..6"):
        make_config(None, [("data.countdown.numbers", 9)])
    with pytest.raises(ConfigError, match="data.path: required when data.task is dataset"):
        make_config(None, [("data.task", "dataset")])


def test_gsm8k_local_file_of_the_hub_shape(tmp_path):
    p = tmp_path / "train.jsonl"
    write_jsonl(p, GSM8K_ROWS * 5)
    data = load_task(DataConfig(task="gsm8k", path=str(p), eval_size=2))
    assert len(data.train) == 8 and len(data.held_out) == 2
    assert data.train[0] == {"prompt": GSM8K_ROWS[0]["question"], "answer": "72"}
    assert data.train[1]["answer"] == "10"
    ev = tmp_path / "test.jsonl"
    write_jsonl(ev, GSM8K_ROWS)
    data = load_task(DataConfig(task="gsm8k", path=str(p), eval_path=str(ev)))
    assert len(data.train) == 10 and [r["answer"] for r in data.held_out] == ["72", "10"]
    with pytest.raises(DataError, match="data.prompt_field: task gsm8k reads question"):
        load_task(DataConfig(task="gsm8k", path=str(p), prompt_field="text"))


def make_gsm8k_repo(root, suffix=".parquet"):
    """openai/gsm8k's layout: main/ and socratic/ configurations, train and test splits."""
    write = write_parquet if suffix == ".parquet" else write_jsonl
    write(root / "main" / f"train-00000-of-00001{suffix}", gsm8k_rows(12))
    write(root / "main" / f"test-00000-of-00001{suffix}", gsm8k_rows(3, start=100))
    write(root / "socratic" / f"train-00000-of-00001{suffix}", gsm8k_rows(5, start=500))
    write(root / "socratic" / f"test-00000-of-00001{suffix}", gsm8k_rows(2, start=600))
    (root / "README.md").write_text("---\nconfigs: ...\n---\n")


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_gsm8k_folder_in_the_hub_layout(tmp_path, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    make_gsm8k_repo(tmp_path / "gsm8k", suffix)
    data = load_task(DataConfig(task="gsm8k", path=str(tmp_path / "gsm8k")))
    assert [r["answer"] for r in data.train] == [str(i) for i in range(12)]  # main/train
    assert [r["answer"] for r in data.held_out] == ["100", "101", "102"]  # main/test
    socratic = load_task(DataConfig(task="gsm8k", path=str(tmp_path / "gsm8k"), subset="socratic"))
    assert len(socratic.train) == 5 and len(socratic.held_out) == 2
    with pytest.raises(DataError, match="split 'train' is in several subsets"):
        load_task(DataConfig(task="dataset", path=str(tmp_path / "gsm8k"), prompt_field="question"))
    with pytest.raises(DataError, match="no files for split 'validation' of subset 'main'"):
        load_task(DataConfig(task="gsm8k", path=str(tmp_path / "gsm8k"), split="validation"))


def test_parquet_file_with_fields_from_config(tmp_path):
    pytest.importorskip("pyarrow")
    p = tmp_path / "d.parquet"
    write_parquet(p, [{"text": f"q{i}", "label": i, "level": i % 2} for i in range(10)])
    data = load_task(DataConfig(task="dataset", path=str(p), prompt_field="text", answer_field="label", eval_size=2))
    assert data.train[1] == {"prompt": "q1", "answer": "1", "level": 1} and len(data.held_out) == 2
    with pytest.raises(DataError, match=r"d.parquet: row 1: missing field 'question'"):
        load_task(DataConfig(task="dataset", path=str(p), prompt_field="question"))
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    with pytest.raises(DataError, match="bad.parquet: cannot read Parquet"):
        load_task(DataConfig(task="dataset", path=str(bad)))


def test_parquet_without_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    p = tmp_path / "d.parquet"
    p.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match=r"d.parquet: reading Parquet needs pyarrow: pip install 'mlx-grpo\[parquet\]'"):
        load_task(DataConfig(task="dataset", path=str(p)))


def hub_cache(tmp_path, repo_id, make):
    """A Hugging Face cache holding a dataset snapshot, laid out as a download leaves it."""
    cache = tmp_path / "hf-cache"
    repo = cache / ("datasets--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    make(repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}


LOAD_SNIPPET = """
import json, sys
from mlx_grpo.config import make_config, parse_set
from mlx_grpo.tasks import DataError, load_task
try:
    d = load_task(make_config(None, [parse_set(a) for a in sys.argv[1:]]).data)
except DataError as e:
    print(json.dumps({"error": str(e)})); sys.exit(0)
print(json.dumps({"train": [r["answer"] for r in d.train], "held_out": [r["answer"] for r in d.held_out]}))
"""


def load_in_subprocess(env, *sets):
    """Load a task in a fresh process, so huggingface_hub reads the cache settings in env."""
    import os

    from conftest import ROOT

    r = subprocess.run([sys.executable, "-c", LOAD_SNIPPET, *sets], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, **env, "MLX_GRPO_NO_FAST_BLAS": "1"}, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_gsm8k_from_the_hub_cache(tmp_path, suffix):
    """No data.path: openai/gsm8k through huggingface_hub (here its cache, offline), main/train
    for training and main/test held out: the same files a download leaves."""
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    env = hub_cache(tmp_path, "openai/gsm8k", lambda root: make_gsm8k_repo(root, suffix))
    got = load_in_subprocess(env, "data.task=gsm8k")
    assert got == {"train": [str(i) for i in range(12)], "held_out": ["100", "101", "102"]}


def test_hub_dataset_id_with_fields_and_a_missing_one(tmp_path):
    def make(root):
        write_jsonl(root / "data" / "train.jsonl", [{"q": f"x{i}", "a": i} for i in range(10)])
        write_jsonl(root / "data" / "validation.jsonl", [{"q": "y", "a": 99}])

    env = hub_cache(tmp_path, "someone/tiny-qa", make)
    got = load_in_subprocess(env, "data.task=dataset", "data.path=someone/tiny-qa", "data.prompt_field=q",
                             "data.answer_field=a", "data.eval_split=validation")
    assert got == {"train": [str(i) for i in range(10)], "held_out": ["99"]}
    carved = load_in_subprocess(env, "data.task=dataset", "data.path=someone/tiny-qa", "data.prompt_field=q",
                                "data.answer_field=a", "data.eval_size=2")
    assert carved["held_out"] == ["8", "9"] and len(carved["train"]) == 8
    missing = load_in_subprocess(env, "data.task=dataset", "data.path=someone/absent")
    assert missing["error"].startswith("data.path: cannot load Hub dataset someone/absent:")
