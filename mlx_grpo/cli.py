"""The command line: each command parses its options, builds one Config, calls one function.

Errors the user can fix (bad config key, missing file, unloadable model, bad reward) end with a
one-line message and exit code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
from typing import Any, List, Optional, Tuple

import click

from .config import ConfigError, make_config, parse_set

# Command-line flags that are shortcuts for config keys (flag name -> dotted key).
TRAIN_FLAGS = {
    "model": "model.path",
    "output": "output.dir",
    "steps": "train.steps",
    "seed": "train.seed",
    "learning_rate": "train.learning_rate",
    "batch_size": "train.prompts_per_step",
    "group_size": "rollout.group_size",
    "max_tokens": "rollout.max_tokens",
    "temperature": "rollout.temperature",
    "beta": "grpo.beta",
    "epsilon": "grpo.epsilon",
    "num_iterations": "grpo.num_iterations",
    "loss_type": "grpo.loss_type",
    "adapter_type": "adapter.type",
    "lora_rank": "adapter.rank",
    "data": "data.path",
    "task": "data.task",
    "prompt_format": "prompt.kind",
}


def user_errors() -> Tuple[type, ...]:
    """Exception types that mean bad input (reported in one line), not a bug."""
    from .models import ModelLoadError
    from .rewards import RewardError
    from .tasks import DataError
    from .trainer import RunDirError

    return (ConfigError, ModelLoadError, RewardError, DataError, RunDirError, FileNotFoundError)


def fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(2)


def _self_argv() -> List[str]:
    """How to start this same command again under ``sys.executable``."""
    if sys.argv[0].endswith(os.path.join("mlx_grpo", "cli.py")):
        return ["-m", "mlx_grpo.cli"] + sys.argv[1:]
    return list(sys.argv)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlx-grpo")
def main() -> None:
    """mlx-grpo: teach a language model to reason with GRPO on MLX, through LoRA adapters."""
    from . import blas

    # On Linux CPUs, restart once with a fast BLAS preloaded (the bundled one is 10-19x slower).
    blas.maybe_reexec(_self_argv(), dict(os.environ))


@main.command()
@click.option("--config", "config_path", type=str, default=None, help="YAML config file (see configs/).")
@click.option("--output", type=str, default=None, help="Run directory [output.dir].")
@click.option("--steps", type=int, default=None, help="GRPO steps [train.steps].")
@click.option("--seed", type=int, default=None, help="Random seed [train.seed].")
@click.option("--model", type=str, default=None, help="Hub id or local model directory [model.path].")
@click.option("--data", type=str, default=None, help="JSONL data file; sets data.task=jsonl [data.path].")
@click.option("--task", type=str, default=None, help="arithmetic | jsonl [data.task].")
@click.option("--prompt-format", type=str, default=None, help="r1 | chat [prompt.kind].")
@click.option("--learning-rate", "--lr", "learning_rate", type=float, default=None, help="[train.learning_rate]")
@click.option("--batch-size", type=int, default=None, help="Prompts per step [train.prompts_per_step].")
@click.option("--group-size", "-G", type=int, default=None, help="Completions per prompt [rollout.group_size].")
@click.option("--max-tokens", type=int, default=None, help="Max completion tokens [rollout.max_tokens].")
@click.option("--temperature", type=float, default=None, help="[rollout.temperature]")
@click.option("--beta", type=float, default=None, help="KL coefficient [grpo.beta].")
@click.option("--epsilon", type=float, default=None, help="Clip range [grpo.epsilon].")
@click.option("--num-iterations", type=int, default=None, help="Updates per rollout batch, mu [grpo.num_iterations].")
@click.option("--loss-type", type=str, default=None, help="grpo | bnpo | dr_grpo | dapo [grpo.loss_type].")
@click.option("--adapter-type", type=str, default=None, help="lora | dora | full [adapter.type].")
@click.option("--lora-rank", type=int, default=None, help="[adapter.rank]")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override any config key, e.g. --set grpo.beta=0.04 (repeatable).")
@click.option("--overwrite", is_flag=True, help="Reuse an output directory that already holds a run.")
@click.option("--no-progress", is_flag=True, help="No progress bar (for logs).")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def train(config_path: Optional[str], sets: Tuple[str, ...], overwrite: bool, no_progress: bool,
          debug: bool, **flags: Any) -> None:
    """Train with GRPO. With no options: the embedded tiny model on the arithmetic task, offline.

    Precedence: built-in defaults < --config YAML < --set and the flags above.
    """
    try:
        overrides: List[Tuple[str, Any]] = []
        if flags.get("data") is not None and flags.get("task") is None:
            overrides.append(("data.task", "jsonl"))
        overrides += [(TRAIN_FLAGS[k], v) for k, v in flags.items() if v is not None]
        overrides += [parse_set(s) for s in sets]
        if overwrite:
            overrides.append(("output.overwrite", True))
        if no_progress:
            overrides.append(("output.progress", False))
        cfg = make_config(config_path, overrides)
        from . import blas
        from .trainer import train as run_training

        click.echo(f"mlx-grpo: {blas.describe(dict(os.environ))}")
        run_training(cfg)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except Exception as e:
        if debug or not isinstance(e, user_errors()):
            raise
        fail(str(e))


@main.command("eval")
@click.option("--config", "config_path", type=str, default=None, help="YAML config (task, prompt, rollout).")
@click.option("--run", "run_dir", type=str, default=None, help="A run directory: its config and adapters.")
@click.option("--model", type=str, default=None, help="Hub id or local model directory [model.path].")
@click.option("--adapter", type=str, default=None, help="Adapter directory (adapters.safetensors).")
@click.option("--data", type=str, default=None, help="JSONL file; its held-out split is evaluated.")
@click.option("--n", "limit", type=int, default=None, help="Evaluate the first N held-out prompts.")
@click.option("--max-tokens", type=int, default=None, help="[rollout.max_tokens]")
@click.option("--compare-base", is_flag=True, help="Also evaluate the base model (adapters off).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override any config key.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def eval_cmd(config_path, run_dir, model, adapter, data, limit, max_tokens, compare_base, as_json, sets, debug):
    """Greedy held-out accuracy (strict and lenient) and format rate of a model or a run."""
    import json
    from pathlib import Path

    try:
        if run_dir:
            config_path = config_path or str(Path(run_dir) / "config.yaml")
            adapter = adapter or run_dir
        overrides: List[Tuple[str, Any]] = [("output.overwrite", True)]
        if model:
            overrides.append(("model.path", model))
        if data:
            overrides += [("data.task", "jsonl"), ("data.path", data)]
        if max_tokens:
            overrides.append(("rollout.max_tokens", max_tokens))
        overrides += [parse_set(x) for x in sets]
        cfg = make_config(config_path, overrides)
        from .evaluate import evaluate_config

        results = evaluate_config(cfg, adapter, limit, compare_base)
    except Exception as e:
        if debug or not isinstance(e, user_errors()):
            raise
        fail(str(e))
    if as_json:
        click.echo(json.dumps(results))
        return
    for name, r in results.items():
        click.echo(f"{name:>8}: accuracy {r['accuracy']:.3f}  lenient {r['lenient_accuracy']:.3f}  "
                   f"format {r['format_rate']:.3f}  length {r['mean_length']:.1f}  (n={r['n']})")


@main.command()
@click.option("--model", type=str, default=None, help="Hub id or local model directory [model.path].")
@click.option("--config", "config_path", type=str, default=None, help="YAML config (sampling, adapter, beta).")
@click.option("--large", is_flag=True, help="Bench a randomly initialised ~100M-parameter model (built once, cached).")
@click.option("--quick", is_flag=True, help="Tiny settings, one repetition: checks that everything runs.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--out", "out_path", type=str, default=None, help="Also write the JSON result to this file.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def bench(model, config_path, large, quick, as_json, out_path, debug):
    """Rollout throughput vs mlx_lm.batch_generate, GRPO step split, peak memory, fast vs bundled BLAS."""
    import json

    from .bench import run_bench, table

    say = (lambda m: click.echo(m, err=True)) if not as_json else (lambda m: None)
    try:
        result = run_bench(config_path, model, large=large, quick=quick, say=say)
    except Exception as e:
        if debug or not isinstance(e, user_errors()):
            raise
        fail(str(e))
    if out_path:
        from pathlib import Path

        from .models import atomic_write

        atomic_write(Path(out_path), lambda p: p.write_text(json.dumps(result, indent=2) + "\n"))
    click.echo(json.dumps(result) if as_json else table(result))


if __name__ == "__main__":  # pragma: no cover
    main()
