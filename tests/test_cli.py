"""The command line as a user runs it: real subprocesses, real files."""

import json
import subprocess
import sys

import pytest

from conftest import run_cli, tree_hash


def test_help_lists_commands():
    r = run_cli("--help")
    assert r.returncode == 0 and "train" in r.stdout
    r = run_cli("train", "--help")
    assert r.returncode == 0 and "--set" in r.stdout and "--config" in r.stdout


@pytest.fixture(scope="module")
def short_run(small_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "r"
    r = run_cli("train", "--model", str(small_model_dir), "--output", str(out), "--steps", "3",
                "--batch-size", "2", "-G", "4", "--max-tokens", "8", "--no-progress",
                "--set", "output.eval_size=8", "--set", "data.max_operand=9", "--set", "data.eval_size=20",
                "--set", "output.save_every=2")
    assert r.returncode == 0, r.stderr
    return out, r


def test_train_writes_run_directory(short_run, small_model_dir):
    out, r = short_run
    assert r.stdout.splitlines()[0].startswith("mlx-grpo: device")
    for name in ("adapters.safetensors", "adapter_config.json", "config.yaml", "metrics.jsonl",
                 "samples.jsonl", "summary.json", "checkpoints/step_000002/adapters.safetensors"):
        assert (out / name).exists(), name
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    train = [l for l in lines if l["kind"] == "train"]
    assert [l["step"] for l in train] == [1, 2, 3]
    for key in ("loss", "reward_mean", "reward_std", "rewards/accuracy", "rewards/format", "kl",
                "clip_fraction", "completion_length", "tokens_per_sec", "peak_memory_gb", "learning_rate"):
        assert key in train[0], key
    assert [l["step"] for l in lines if l["kind"] == "eval"] == [0, 3]
    conf = json.loads((out / "adapter_config.json").read_text())
    assert conf["model"] == str(small_model_dir)


def test_resolved_config_reloads(short_run):
    from mlx_grpo.config import make_config

    out, _ = short_run
    cfg = make_config(str(out / "config.yaml"))
    assert cfg.train.steps == 3 and cfg.rollout.group_size == 4 and cfg.data.max_operand == 9


def test_adapters_work_with_mlx_lm_generate_and_fuse(short_run, small_model_dir, tmp_path):
    out, _ = short_run
    g = subprocess.run([sys.executable, "-m", "mlx_lm", "generate", "--model", str(small_model_dir),
                        "--adapter-path", str(out), "--prompt", "What is 3 + 4 ?", "--max-tokens", "4",
                        "--ignore-chat-template"], capture_output=True, text=True)
    assert g.returncode == 0, g.stderr
    f = subprocess.run([sys.executable, "-m", "mlx_lm", "fuse", "--model", str(small_model_dir),
                        "--adapter-path", str(out), "--save-path", str(tmp_path / "fused")],
                       capture_output=True, text=True)
    assert f.returncode == 0, f.stderr
    assert (tmp_path / "fused" / "config.json").exists()


def _files(tmp, model):
    """The bad inputs, written for one case."""
    import shutil

    (tmp / "bad.yaml").write_bytes(b"train:\n  steps: \xff\xfe\n")
    (tmp / "broken.yaml").write_text("train:\n  steps: 1\n  seed: [1\n")
    (tmp / "malformed.jsonl").write_text('{"prompt": "1 + 1", "answer": "2"}\n{"prompt": oops}\n')
    (tmp / "fields.jsonl").write_text('{"question": "1 + 1", "answer": "2"}\n')
    (tmp / "empty.jsonl").write_text("\n\n")
    long_prompt = " ".join(["1 + 1"] * 200)
    (tmp / "long.jsonl").write_text('{"prompt": "2 + 2", "answer": "4"}\n\n'
                                    + json.dumps({"prompt": long_prompt, "answer": "2"}) + "\n")
    (tmp / "not-a-model").mkdir()
    (tmp / "not-a-model" / "weights.bin").write_bytes(b"\0")
    (tmp / "garbage-model").mkdir()
    (tmp / "garbage-model" / "config.json").write_text('{"model_type": "nosuch"}')
    no_chat = tmp / "no-chat"
    shutil.copytree(model, no_chat)
    conf = json.loads((no_chat / "tokenizer_config.json").read_text())
    conf.pop("chat_template", None)
    (no_chat / "tokenizer_config.json").write_text(json.dumps(conf))
    (tmp / "import_fails.py").write_text("import no_such_module_here\n")
    (tmp / "no_fn.py").write_text("def other(prompts, completions, **kw):\n    return [0.0] * len(completions)\n")


# Each bad input, run against a directory that already holds a run, with --overwrite (so only
# the check itself stands between the input and the old run): exit 2, one line naming the
# file/line/key, no traceback, and every file of the old run byte for byte the same.
BAD_INPUTS = [
    (["--set", "grpo.betta=1"], "grpo.betta: unknown key"),
    (["--set", "train.steps=many"], "train.steps: expected an integer, got 'many'"),
    (["--group-size", "1"], "rollout.group_size: must be at least 2"),
    (["--beta", "-1"], "grpo.beta: must be >= 0"),
    (["--config", "{tmp}/missing.yaml"], "{tmp}/missing.yaml: config file not found"),
    (["--config", "{tmp}/bad.yaml"], "{tmp}/bad.yaml: cannot read config (not UTF-8 text)"),
    (["--config", "{tmp}/broken.yaml"], "{tmp}/broken.yaml: line 4 invalid YAML"),
    (["--data", "{tmp}/missing.jsonl"], "{tmp}/missing.jsonl: data file not found"),
    (["--data", "{tmp}/malformed.jsonl"], "{tmp}/malformed.jsonl:2: malformed JSON"),
    (["--data", "{tmp}/fields.jsonl"], "{tmp}/fields.jsonl:1: missing field 'prompt' (data.prompt_field)"),
    (["--data", "{tmp}/empty.jsonl"], "{tmp}/empty.jsonl: no rows (empty dataset)"),
    (["--model", "/nonexistent/model"], "model.path: /nonexistent/model does not exist"),
    (["--model", "{tmp}/not-a-model"], "model.path: {tmp}/not-a-model has no config.json (not a model directory)"),
    (["--model", "{tmp}/garbage-model"], "model.path: cannot load {tmp}/garbage-model"),
    (["--model", "{tmp}/no-chat", "--prompt-format", "chat"],
     "prompt.kind: chat was asked for but this tokenizer has no chat template"),
    (["--set", "rewards.nosuch=1"], "rewards.nosuch: unknown reward"),
    (["--set", "rewards.{tmp}/import_fails.py:fn=1"], "cannot import {tmp}/import_fails.py: ModuleNotFoundError"),
    (["--set", "rewards.{tmp}/no_fn.py:score=1"], "{tmp}/no_fn.py has no function 'score'"),
    (["--data", "{tmp}/long.jsonl"], "{tmp}/long.jsonl:3: the prompt is"),
    (["NO-OVERWRITE"], "already holds a run; continue it with --resume"),
    (["RESUME", "--lr", "0.5"], "train.learning_rate: --resume continues the run as configured"),
    (["RESUME", "--set", "rollout.group_size=2"], "rollout.group_size: --resume continues the run"),
    (["RESUME", "--overwrite"], "the run keeps its own config and directory"),
    (["RESUME", "--steps", "1"], "train.steps: the run already completed 3 steps, got 1"),
    (["--resume", "{tmp}/nowhere"], "--resume: {tmp}/nowhere does not exist"),
]


@pytest.mark.parametrize("args,msg", BAD_INPUTS, ids=[" ".join(a)[:40] for a, _ in BAD_INPUTS])
def test_bad_input_one_line_error_and_nothing_damaged(args, msg, short_run, small_model_dir, tmp_path):
    out, _ = short_run
    _files(tmp_path, small_model_dir)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    msg = msg.replace("{tmp}", str(tmp_path))
    if args[0] == "RESUME":
        args = ["--resume", str(out), *args[1:]]
    elif args[0] == "NO-OVERWRITE":
        args = ["--model", str(small_model_dir), "--output", str(out)]
    elif args[0] != "--resume":
        model = [] if "--model" in args else ["--model", str(small_model_dir)]
        args = [*model, "--output", str(out), "--overwrite", *args]
    before = tree_hash(out)
    r = run_cli("train", *args, env={"MLX_GRPO_NO_FAST_BLAS": "1"})
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and msg in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert tree_hash(out) == before


def test_debug_shows_the_traceback(tmp_path):
    r = run_cli("train", "--output", str(tmp_path / "o"), "--set", "grpo.betta=1", "--debug",
                env={"MLX_GRPO_NO_FAST_BLAS": "1"})
    assert r.returncode != 0 and "Traceback" in r.stderr and "grpo.betta: unknown key" in r.stderr


def test_hub_id_loads_through_huggingface_cache(small_model_dir, tmp_path):
    """A Hub id goes through huggingface_hub's snapshot resolution, exactly as on a Mac online;
    here the snapshot sits in a Hugging Face cache laid out as a download leaves it."""
    import shutil

    cache = tmp_path / "hf-cache"
    repo = cache / "models--mlx-grpo-test--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    shutil.copytree(small_model_dir, snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    out = tmp_path / "o"
    env = {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    r = run_cli("train", "--model", "mlx-grpo-test/tiny", "--output", str(out), "--steps", "1",
                "--batch-size", "2", "-G", "2", "--max-tokens", "4", "--no-progress",
                "--set", "output.eval_size=2", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "adapter_config.json").read_text())["model"] == "mlx-grpo-test/tiny"
    missing = run_cli("train", "--model", "mlx-grpo-test/absent", "--output", str(tmp_path / "p"),
                      env=env)
    assert missing.returncode == 2
    assert "model.path: cannot load mlx-grpo-test/absent" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_eval_command_on_a_run(short_run):
    out, _ = short_run
    r = run_cli("eval", "--run", str(out), "--n", "6", "--compare-base", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.splitlines()[-1])
    for v in (res, res["base"]):
        assert v["n"] == 6 and 0 <= v["accuracy"] <= v["format_rate"] <= 1


def test_non_finite_steps_stop_the_run_in_one_line(small_model_dir, tmp_path):
    huge = tmp_path / "huge.py"
    huge.write_text("def huge(prompts, completions, **kw):\n"
                    "    return [1e300 if i % 2 else 0.0 for i in range(len(completions))]\n")
    r = run_cli("train", "--model", str(small_model_dir), "--output", str(tmp_path / "o"), "--steps", "6",
                "--batch-size", "2", "-G", "4", "--max-tokens", "4", "--no-progress",
                "--set", f"rewards.{huge}:huge=1", "--set", "grpo.scale_rewards=none",
                "--set", "train.max_nonfinite_steps=2", "--set", "output.eval_size=2")
    assert r.returncode == 1, r.stderr
    # (NumPy may warn first about the float32 overflow that makes the loss infinite.)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and r.stderr.strip().splitlines()[-1] == errors[0]
    assert errors[0].startswith("error: stopped at step 2: 2 steps in a row had a non-finite loss")
    assert "Traceback" not in r.stderr
