"""The command line as a user runs it: real subprocesses, real files."""

import json
import subprocess
import sys

import pytest

from conftest import run_cli


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


def test_existing_run_is_refused_and_untouched(short_run, small_model_dir):
    out, _ = short_run
    before = (out / "metrics.jsonl").read_bytes()
    r = run_cli("train", "--model", str(small_model_dir), "--output", str(out), "--steps", "1")
    assert r.returncode == 2
    assert "already holds a run" in r.stderr and "Traceback" not in r.stderr
    assert (out / "metrics.jsonl").read_bytes() == before


@pytest.mark.parametrize("args,msg", [
    (["--set", "grpo.betta=1"], "grpo.betta: unknown key"),
    (["--group-size", "1"], "rollout.group_size: must be at least 2"),
    (["--beta", "-1"], "grpo.beta: must be >= 0"),
    (["--config", "missing.yaml"], "missing.yaml: config file not found"),
    (["--model", "/nonexistent/model"], "model.path: /nonexistent/model does not exist"),
    (["--data", "missing.jsonl"], "missing.jsonl: data file not found"),
    (["--set", "rewards.nosuch=1"], "rewards.nosuch: unknown reward"),
])
def test_bad_input_one_line_error(args, msg, tmp_path):
    r = run_cli("train", "--output", str(tmp_path / "o"), *args)
    assert r.returncode == 2, r.stderr
    assert msg in r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


def test_malformed_jsonl_names_line(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1 + 1", "answer": "2"}\n{"prompt": oops}\n')
    r = run_cli("train", "--data", str(data), "--output", str(tmp_path / "o"))
    assert r.returncode == 2 and f"{data}:2: malformed JSON" in r.stderr


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
