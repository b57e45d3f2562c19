"""train.micro_batch: auto on a small real model, with "available memory" capped by
MLX_GRPO_MEMORY_LIMIT: a cap the one-batch step exceeds makes it pick more micro-batches, with the
same metrics as a run configured by hand that way; the choice is kept on resume; a cap nothing
fits in stops before the first step with one line."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from mlx_grpo.checkpoint import resume_config
from mlx_grpo.config import make_config
from mlx_grpo import microbatch
from mlx_grpo.microbatch import MARGIN, DoesNotFit, choose, dry_step_peak
from mlx_grpo.forward import enable_grad_checkpoint
from mlx_grpo.models import attach_adapters, load_model
from mlx_grpo.preflight import check_prompts
from mlx_grpo.tasks import load_task
from mlx_grpo.tasks.templates import prompter
from mlx_grpo.trainer import train

ROOT = Path(__file__).resolve().parents[1]
TIMES = ("step_time", "time_generate", "time_reward", "time_score", "time_update", "tokens_per_sec",
         "peak_memory_gb", "time")


def config(model_dir, out, *overrides):
    return make_config(None, [
        ("model.path", str(model_dir)), ("output.dir", str(out)), ("train.steps", 2),
        ("train.prompts_per_step", 4), ("rollout.group_size", 4), ("rollout.max_tokens", 16),
        ("rollout.stop", []), ("data.eval_size", 10), ("output.progress", False),
        ("output.eval_size", 2), ("output.save_every", 1), ("train.learning_rate", 1e-2),
        ("grpo.skip_zero_advantage", False), *overrides])


def loaded(cfg):
    model, tok = load_model(cfg.model)
    attach_adapters(model, cfg.adapter)
    longest = check_prompts(tok, model, load_task(cfg.data), prompter(cfg.prompt, tok), cfg)
    return model, longest


def train_metrics(cfg):
    said = []
    train(cfg, say=said.append)
    rows = [json.loads(x) for x in (Path(cfg.output.dir) / "metrics.jsonl").read_text().splitlines()]
    return said, [{k: v for k, v in r.items() if k not in TIMES} for r in rows]


@pytest.fixture(scope="module")
def peaks(embedded_model_dir, tmp_path_factory):
    """Measured dry-step peaks of 16 rows (one micro-batch) and 8 rows (two)."""
    cfg = config(embedded_model_dir, tmp_path_factory.mktemp("p") / "x")
    model, longest = loaded(cfg)
    return {rows: dry_step_peak(model, cfg, longest, rows) for rows in (16, 8, 4)}


def test_dry_step_peak_grows_with_the_rows(peaks):
    assert peaks[16] > peaks[8] > peaks[4]
    assert peaks[16] - peaks[8] > 0.5 * (peaks[8] - peaks[4])  # activations scale with the rows


def test_a_cap_picks_more_micro_batches_with_the_metrics_of_the_hand_configured_run(
        embedded_model_dir, tmp_path, monkeypatch, peaks):
    # Two micro-batches of 8 rows fit under the cap, one of 16 does not.
    cap = (peaks[16] + peaks[8]) / 2 / MARGIN
    monkeypatch.setenv("MLX_GRPO_MEMORY_LIMIT", str(int(cap)))
    said, auto = train_metrics(config(embedded_model_dir, tmp_path / "auto"))
    line = [s for s in said if s.startswith("micro_batch auto")]
    assert len(line) == 1 and "chose grad_accumulation_steps=2" in line[0], said
    saved = yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())["train"]
    assert saved["grad_accumulation_steps"] == 2 and saved["grad_checkpoint"] is False
    # The same cap for the hand-configured run: the memory available also decides whether the
    # rollouts fold the adapters into the weights (models.adapters_folded), which rounds differently.
    _, hand = train_metrics(config(embedded_model_dir, tmp_path / "hand", ("train.micro_batch", "fixed"),
                                   ("train.grad_accumulation_steps", 2)))
    monkeypatch.delenv("MLX_GRPO_MEMORY_LIMIT")
    assert auto == hand
    assert any(r.get("rows_updated") for r in auto)

    # Resumed without the cap: the run keeps its two micro-batches, no dry step.
    said = []
    cfg = resume_config(str(tmp_path / "auto"), [("train.steps", 3)])
    assert cfg.train.grad_accumulation_steps == 2
    train(cfg, say=said.append, resume=True)
    assert not [s for s in said if s.startswith("micro_batch auto")]
    assert yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())["train"]["grad_accumulation_steps"] == 2


def test_checkpointing_is_switched_on_when_micro_batches_alone_do_not_fit(embedded_model_dir, tmp_path, peaks,
                                                                         monkeypatch):
    cfg = config(embedded_model_dir, tmp_path / "x")
    model, longest = loaded(cfg)
    calls = []
    monkeypatch.setattr(microbatch, "enable_grad_checkpoint", calls.append)  # seen, not done
    with pytest.raises(DoesNotFit) as e:
        # Less than the smallest micro-batch needs: every divisor is measured, then checkpointing.
        choose(model, cfg, longest, 0.9 * peaks[4] / MARGIN)
    assert calls == [model]
    msg = str(e.value)
    assert msg.startswith("train.micro_batch: one update micro-batch of 4 rows (grad_checkpoint on)")
    assert "rollout.group_size (4)" in msg and "rollout.max_tokens (16)" in msg and "\n" not in msg


def test_nothing_fits_stops_before_the_first_step(embedded_model_dir, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_grpo.cli", "train", "--model", str(embedded_model_dir),
         "--output", str(out), "--steps", "1", "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, env={**__import__("os").environ, "MLX_GRPO_MEMORY_LIMIT": "2MB"})
    assert proc.returncode == 2, proc.stderr
    errors = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: train.micro_batch: ") and "lower" in errors[0]
    assert not out.exists()


def test_fixed_and_unknown_values(embedded_model_dir):
    from mlx_grpo.config import ConfigError

    with pytest.raises(ConfigError, match="train.micro_batch: must be one of auto, fixed"):
        make_config(None, [("train.micro_batch", "big")])


def test_grad_checkpoint_changes_only_the_model_it_is_given(embedded_model_dir):
    """Two models of one architecture in a process (e.g. the policy and an explicit reference):
    checkpointing one leaves the other's blocks as mlx-lm built them, with the same parameters."""
    from mlx.utils import tree_flatten

    from mlx_grpo.config import ModelConfig

    a, _ = load_model(ModelConfig(path=str(embedded_model_dir)))
    b, _ = load_model(ModelConfig(path=str(embedded_model_dir)))
    stock = type(b.layers[0])
    names = sorted(k for k, _ in tree_flatten(a.parameters()))
    enable_grad_checkpoint(a)
    enable_grad_checkpoint(a)  # twice: no second layer of wrapping
    assert all(getattr(type(layer), "_mlx_grpo_checkpointed", False) for layer in a.layers)
    assert type(a.layers[0]).__mro__[1] is stock
    assert all(type(layer) is stock for layer in b.layers)
    assert not getattr(stock, "_mlx_grpo_checkpointed", False)  # the class itself is untouched
    assert sorted(k for k, _ in tree_flatten(a.parameters())) == names
