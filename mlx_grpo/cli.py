"""The command line: each command parses its options, builds one Config, calls one function.

Errors the user can fix (``errors.UserError``: bad config key, missing file, unloadable model, bad
reward) end with a one-line message and exit code 2; a run stopped by a fault (``errors.RunFault``:
out of memory, non-finite losses) with a one-line message and exit code 1, both through one guard
(``reported``); a run stopped by SIGINT/SIGTERM saves a checkpoint, says how to resume, and exits
with 130/143. ``--debug`` shows the traceback instead.

Imports inside functions, here and in the package, are there for one of four reasons only:
a command imports its own module when it runs (and ``train --help`` the task names when it shows
them), so ``--help``, ``plot``, ``runs`` and ``reward --completions`` start without MLX (and
mlx-lm, which imports transformers: seconds); ``blas.py`` chooses the BLAS before MLX is loaded
(the main group re-executes with it preloaded); optional extras (matplotlib, wandb, tensorboard,
pyarrow, math-verify) load only when asked for; and one import cycle (the config fills in a task's
default rewards from ``tasks/``, which imports the config).
"""

from __future__ import annotations

import errno
import json
import os
import sys
from contextlib import contextmanager
from typing import Any, List, Optional, Tuple

import click

from .config import ConfigError, choices, make_config, parse_set
from .errors import RunFault, UserError, printable, shown
from .rundir import RunDirError, check_named, check_output_file

# Command-line flags that are shortcuts for config keys (flag name -> dotted key).
TRAIN_FLAGS = {
    "model": "model.path",
    "gguf_file": "model.gguf_file",
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


def key_help(key: str, text: str = "") -> str:
    """An option's help: ``text``, the choices of the config key it sets (from the config's own
    types, so help and checks cannot disagree), and the key."""
    options = " | ".join(choices(key))
    return " ".join(p for p in (text, options, f"[{key}].") if p)


class TaskOption(click.Option):
    """``--task``, whose help lists the task names (``tasks.TASKS``), read only when the help is
    shown: the task registry imports the rewards and NumPy, which a command's start does without."""

    def get_help_record(self, ctx: click.Context) -> Optional[Tuple[str, str]]:
        from .tasks import TASKS

        self.help = f"{' | '.join(TASKS)} [data.task]."
        return super().get_help_record(ctx)


def fail(message: str, code: int = 2) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _self_argv() -> List[str]:
    """How to start this same command again under ``sys.executable``."""
    if sys.argv[0].endswith(os.path.join("mlx_grpo", "cli.py")):
        return ["-m", "mlx_grpo.cli"] + sys.argv[1:]
    return list(sys.argv)


def _open_standard_streams() -> None:
    """Give a closed stdin, stdout or stderr (``cli.py ... >&-``, as cron or a daemon may start
    it) the null device: Python leaves ``sys.stdout`` None then (a traceback at the first print),
    and the next file opened (metrics.jsonl) would take fd 1 and receive every library's output."""
    for fd, name, mode in ((0, "stdin", "r"), (1, "stdout", "w"), (2, "stderr", "w")):
        try:
            os.fstat(fd)
            continue
        except OSError:
            pass
        null = os.open(os.devnull, os.O_RDWR)  # the lowest free fd: this one, as 0..fd-1 are open
        if null != fd:
            os.dup2(null, fd)
            os.close(null)
        setattr(sys, name, open(fd, mode, closefd=False))


class EmptyPath(click.UsageError):
    """An empty path on the command line, refused as it is read (``PathText``)."""


class PathText(click.ParamType):
    """A path, or a Hub id, on the command line: any text but an empty one. An unset shell
    variable gives one (``--config "$CFG"``), and every command read "" as the option not given
    (the default config, no adapter, the base model); ``rundir.check_named`` says so, naming the
    option, as ``--out ""`` and ``--output ""`` are refused. Every option that takes a path has it."""

    name = "text"  # (the help's metavar, as for type=str)

    def __init__(self, what: str) -> None:
        self.what = what  # what to name instead, e.g. "a file"

    def convert(self, value: Any, param: Optional[click.Parameter], ctx: Optional[click.Context]) -> Any:
        """``value`` as given, or ``EmptyPath`` naming the option when it is empty or blank."""
        if isinstance(param, click.Option):
            flag = param.opts[0]
        else:  # an argument: RUN_DIRS, ROOT
            flag = param.human_readable_name if param is not None else "path"
        try:
            check_named(value, flag, self.what)
        except RunDirError as e:
            raise EmptyPath(str(e)) from None
        return value


A_FILE = PathText("a file")
A_DIR = PathText("a directory")
A_MODEL = PathText("a Hub id, a model directory, a .gguf file or ollama:NAME")
A_GGUF = PathText("a .gguf file")
AN_ADAPTER = PathText("an adapter directory")


class OneLineErrors(click.Group):
    """click's own option errors (a bad type, a value out of range, a missing option) in the
    one-line form of every other bad input: ``error: ...``, exit 2, no usage block."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        _open_standard_streams()
        kwargs["standalone_mode"] = False  # errors come back here instead of being printed
        try:
            rv = super().main(*args, **kwargs)
        except EmptyPath as e:  # in the form of the other path errors: the option, then why
            fail(e.format_message())
        except click.UsageError as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # no command given: the help, as click shows it
                e.show()
                sys.exit(e.exit_code)
            where = f"{e.ctx.command_path}: " if e.ctx is not None else ""
            fail(where + " ".join(e.format_message().split()))
        except click.ClickException as e:
            e.show()
            sys.exit(e.exit_code)
        except click.Abort:  # Ctrl-C in a command without its own handling (eval, generate, reward)
            click.echo("interrupted", err=True)
            sys.exit(130)  # as a shell reports a process SIGINT stopped, and as train does
        sys.exit(rv if isinstance(rv, int) else 0)  # --help and --version return their exit code


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="mlx-grpo")
def main() -> None:
    """mlx-grpo: teach a language model to reason with GRPO on MLX, through LoRA adapters."""
    from . import blas, hub

    # Before anything imports huggingface_hub (mlx-lm does), which reads its timeouts once; the
    # restart below inherits them.
    try:
        hub.set_timeout_defaults()
    except UserError as e:
        fail(str(e))
    # On Linux CPUs, restart once with a fast BLAS preloaded (the bundled one is 10-19x slower).
    blas.maybe_reexec(_self_argv(), dict(os.environ))


@main.command()
@click.option("--config", "config_path", type=A_FILE, default=None, help="YAML config file (see configs/).")
@click.option("--output", type=str, default=None, help="Run directory [output.dir].")
@click.option("--steps", type=int, default=None, help="GRPO steps [train.steps].")
@click.option("--seed", type=int, default=None, help="Random seed [train.seed].")
@click.option("--model", type=A_MODEL, default=None, help="Hub id, local model directory, .gguf file or ollama:NAME[:TAG] (a model Ollama pulled) [model.path].")
@click.option("--gguf-file", type=A_GGUF, default=None, help="A GGUF file in the Hub repository --model [model.gguf_file].")
@click.option("--data", type=A_FILE, default=None, help="JSONL data file; sets data.task=jsonl [data.path].")
@click.option("--task", cls=TaskOption, type=str, default=None)
@click.option("--prompt-format", type=str, default=None, help=key_help("prompt.kind"))
@click.option("--learning-rate", "--lr", "learning_rate", type=float, default=None, help="[train.learning_rate]")
@click.option("--batch-size", type=int, default=None, help="Prompts per step [train.prompts_per_step].")
@click.option("--group-size", "-G", type=int, default=None, help="Completions per prompt [rollout.group_size].")
@click.option("--max-tokens", type=int, default=None, help="Max completion tokens [rollout.max_tokens].")
@click.option("--temperature", type=float, default=None, help="[rollout.temperature]")
@click.option("--beta", type=float, default=None, help="KL coefficient [grpo.beta].")
@click.option("--epsilon", type=float, default=None, help="Clip range [grpo.epsilon].")
@click.option("--num-iterations", type=int, default=None, help="Updates per rollout batch, mu [grpo.num_iterations].")
@click.option("--loss-type", type=str, default=None, help=key_help("grpo.loss_type"))
@click.option("--adapter-type", type=str, default=None, help=key_help("adapter.type"))
@click.option("--lora-rank", type=int, default=None, help="[adapter.rank]")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override any config key, e.g. --set grpo.beta=0.04 (repeatable).")
@click.option("--overwrite", is_flag=True, help="Reuse an output directory that already holds a run.")
@click.option("--resume", "resume_dir", type=A_DIR, default=None, metavar="RUN_DIR",
              help="Continue a run from its newest checkpoint (its own config; --steps may raise the total).")
@click.option("--no-progress", is_flag=True, help="No progress bar (for logs).")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def train(config_path: Optional[str], sets: Tuple[str, ...], overwrite: bool, resume_dir: Optional[str],
          no_progress: bool, debug: bool, **flags: Any) -> None:
    """Train with GRPO. With no options: the embedded tiny model on the arithmetic task, offline.

    Precedence: built-in defaults < --config YAML < --set and the flags above. With --resume, the
    run's own config replaces the defaults and the YAML file.
    """
    from . import distributed
    from .interrupts import Interrupted

    try:
        with reported(debug):
            overrides: List[Tuple[str, Any]] = []
            if flags.get("data") is not None and flags.get("task") is None:
                overrides.append(("data.task", "jsonl"))
            overrides += [(TRAIN_FLAGS[k], v) for k, v in flags.items() if v is not None]
            overrides += [parse_set(s) for s in sets]
            if no_progress:
                overrides.append(("output.progress", False))
            if resume_dir is not None:
                from .checkpoint import resume_config

                if overwrite or config_path:
                    raise ConfigError(f"--resume {resume_dir}: the run keeps its own config and directory; "
                                      "drop --overwrite/--config")
                if flags.get("output") is not None and flags["output"] != resume_dir:
                    raise ConfigError(f"--output: --resume continues {resume_dir} in place, got {flags['output']}")
                # Under mlx.launch only rank 0 reads the run (other machines need no copy of it).
                cfg = resume_config(resume_dir, overrides) if distributed.is_main() else None
            else:
                if overwrite:
                    overrides.append(("output.overwrite", True))
                cfg = make_config(config_path, overrides)
            if distributed.size() > 1:  # every process runs rank 0's config
                from .config import config_from_dict

                cfg = config_from_dict(distributed.broadcast(cfg.to_dict() if cfg is not None else None))
            from . import blas
            from .learner import pass_lanes
            from .trainer import train as run_training

            if distributed.is_main():
                n = pass_lanes(cfg, cfg.train.prompts_per_step * cfg.rollout.group_size)
                # the passes MLX runs: the update, and scoring where it is not in C (native_forward.py)
                lanes = f"; MLX's scoring and update passes in {n} lanes (train.cpu_lanes)" if n > 1 else ""
                click.echo(f"mlx-grpo: {blas.describe(dict(os.environ))}{lanes}")
            run_training(cfg, resume=resume_dir is not None)
    except Interrupted as e:
        if distributed.is_main():  # rank 0 saved the checkpoint and says how to resume
            click.echo(str(e), err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted; nothing saved since the last checkpoint", err=True)
        sys.exit(130)


@contextmanager
def reported(debug: bool):
    """The one guard every command runs in: a user error becomes ``error: ...`` and exit 2, a run
    fault ``error: ...`` and exit 1 (``--debug``: the traceback instead). A missing file the user
    named (``FileNotFoundError``) is a user error too; anything else is a bug and shows its traceback."""
    try:
        yield
    except (UserError, RunFault, FileNotFoundError) as e:
        if debug:
            raise
        fail(str(e), RunFault.exit_code if isinstance(e, RunFault) else UserError.exit_code)
    except OSError as e:
        # A path the user named that no filesystem takes (a name over NAME_MAX, a path over
        # PATH_MAX): outputs are checked at the door (rundir.check_path_length), inputs fail here
        # at their first stat wherever they are read.
        if debug or e.errno != errno.ENAMETOOLONG:
            raise
        fail(f"{shown(e.filename)}: a name in this path is longer than the filesystem allows")


def model_config(
    config_path: Optional[str], run_dir: Optional[str], model: Optional[str], gguf_file: Optional[str],
    adapter: Optional[str], overrides: List[Tuple[str, Any]], sets: Tuple[str, ...],
) -> Tuple[Any, Optional[str]]:
    """The Config and adapter directory for commands that use a model: a run directory supplies
    its own config and adapters; --model, the given overrides and --set come on top."""
    from pathlib import Path

    from .rundir import CONFIG

    if run_dir:
        run_cfg = Path(run_dir) / CONFIG
        if not run_cfg.is_file():
            raise ConfigError(f"--run: {run_dir} is not a run directory (no config.yaml)")
        config_path = config_path or str(run_cfg)
        adapter = adapter or run_dir
    pairs: List[Tuple[str, Any]] = [("output.overwrite", True)]
    if model:
        pairs.append(("model.path", model))
    if gguf_file:
        pairs.append(("model.gguf_file", gguf_file))
    pairs += overrides + [parse_set(x) for x in sets]
    return make_config(config_path, pairs), adapter


def model_options(f):
    """--config/--run/--model/--adapter/--set/--debug: how every model-using command finds its model."""
    for opt in reversed([
        click.option("--config", "config_path", type=A_FILE, default=None, help="YAML config (task, prompt, rollout)."),
        click.option("--run", "run_dir", type=A_DIR, default=None, help="A run directory: its config and adapters."),
        click.option("--model", type=A_MODEL, default=None, help="Hub id, local model directory, .gguf file or ollama:NAME[:TAG] (a model Ollama pulled) [model.path]."),
        click.option("--gguf-file", type=A_GGUF, default=None, help="A GGUF file in the Hub repository --model [model.gguf_file]."),
        click.option("--adapter", type=AN_ADAPTER, default=None, help="Adapter directory (adapters.safetensors)."),
        click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override any config key."),
        click.option("--debug", is_flag=True, help="Show tracebacks."),
    ]):
        f = opt(f)
    return f


@main.command("eval")
@model_options
@click.option("--task", type=str, default=None, help="Task whose held-out split is evaluated [data.task].")
@click.option("--data", type=A_FILE, default=None, help="JSONL file; its held-out split is evaluated.")
@click.option("--n", "limit", type=int, default=None, help="Evaluate the first N held-out prompts.")
@click.option("--samples", "-k", type=click.IntRange(min=0), default=0, help="K samples per prompt for pass@1 and pass@K.")
@click.option("--temperature", type=float, default=None, help="Sampling temperature for --samples [rollout.temperature].")
@click.option("--max-tokens", type=int, default=None, help="[rollout.max_tokens]")
@click.option("--compare-base", is_flag=True, help="Also evaluate the base model (adapters off), side by side.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_cmd(config_path, run_dir, model, gguf_file, adapter, sets, debug, task, data, limit, samples, temperature,
             max_tokens, compare_base, as_json):
    """Held-out accuracy (greedy, strict and lenient), pass@k, format, rewards and length."""
    with reported(debug):
        overrides: List[Tuple[str, Any]] = []
        if data:
            overrides += [("data.task", "jsonl"), ("data.path", data)]
        if task is not None:  # "" too: the config refuses it (an unset shell variable)
            overrides.append(("data.task", task))
        if limit is not None and limit < 1:
            raise ConfigError(f"--n: must be at least 1, got {limit}")
        if max_tokens is not None:
            overrides += [("rollout.max_tokens", max_tokens), ("output.eval_max_tokens", max_tokens)]
        if temperature is not None:  # checked by the config like train's (>= 0, finite)
            overrides.append(("rollout.temperature", temperature))
        cfg, adapter = model_config(config_path, run_dir, model, gguf_file, adapter, overrides, sets)
        from .evaluate import evaluate_config

        results = evaluate_config(cfg, adapter, limit, compare_base, samples, temperature)
    if as_json:
        body = results.get("adapter") or results.get("model")
        click.echo(json.dumps({**body, **({"base": results["base"]} if "base" in results else {})}))
        return
    if "base" in results:
        from .evaluate import comparison_rows

        click.echo(f"{'':>10} {'base':>9} {'adapter':>9} {'change':>9}   (n={results['base']['n']})")
        for label, a, b, d in comparison_rows(results["base"], results["adapter"]):
            click.echo(f"{label:>10} {a:>9.3f} {b:>9.3f} {d:>+9.3f}")
        return
    for name, r in results.items():
        line = (f"{name}: accuracy {r['accuracy']:.3f}  lenient {r['lenient_accuracy']:.3f}  "
                f"format {r['format_rate']:.3f}")
        if "reward_mean" in r:
            line += f"  reward {r['reward_mean']:.3f}"
        if "k" in r:
            line += (f"  pass@1 {r['pass_at_1']:.3f}  pass@{r['k']} {r['pass_at_k']:.3f}"
                     f"  lenient pass@1 {r['lenient_pass_at_1']:.3f}  pass@{r['k']} {r['lenient_pass_at_k']:.3f}")
        click.echo(line + f"  length {r['mean_length']:.1f}  truncated {r['truncated_rate']:.3f}  (n={r['n']})")


@main.command()
@model_options
@click.option("--prompt", "-p", "question", type=str, required=True, help="The question to answer.")
@click.option("--template", type=click.Choice(choices("prompt.kind")), default=None, help="Prompt template [prompt.kind].")
@click.option("--samples", "-k", type=click.IntRange(min=1), default=1, help="Completions to sample.")
@click.option("--temperature", type=float, default=None, help="[rollout.temperature]; 0: greedy.")
@click.option("--max-tokens", type=int, default=None, help="[rollout.max_tokens]")
def generate(config_path, run_dir, model, gguf_file, adapter, sets, debug, question, template, samples, temperature, max_tokens):
    """Print completions of one prompt, with the template used in training (one sample streams)."""
    with reported(debug):
        overrides: List[Tuple[str, Any]] = []
        if template:
            overrides.append(("prompt.kind", template))
        if max_tokens is not None:
            overrides.append(("rollout.max_tokens", max_tokens))
        if temperature is not None:  # checked by the config like train's (>= 0, finite)
            overrides.append(("rollout.temperature", temperature))
        cfg, adapter = model_config(config_path, run_dir, model, gguf_file, adapter, overrides, sets)
        from .generate import generate as run_generate
        from .policy import load_policy

        policy = load_policy(cfg, adapter_dir=adapter, training=False)
        loaded = (policy.model, policy.prompter)
        # A model's text may hold terminal escapes: printed escaped, its lines and tabs kept.
        if samples == 1:
            run_generate(*loaded, question, cfg, 1, temperature,
                         emit=lambda t: click.echo(printable(t, keep="\n\t"), nl=False))
            click.echo()
            return
        for i, text in enumerate(run_generate(*loaded, question, cfg, samples, temperature), 1):
            click.echo(f"--- sample {i}/{samples}")
            click.echo(printable(text, keep="\n\t"))


@main.command("export")
@model_options
@click.option("--out", type=PathText("a .gguf file"), default=None,
              help="The GGUF file to write [RUN/<model>-grpo-<type>.gguf]; FILE.Modelfile for Ollama goes beside it.")
@click.option("--type", "type_name", type=click.Choice(["f16", "q8_0", "f32"], case_sensitive=False), default="f16",
              help="How the weight matrices are stored (norms and biases: f32).")
@click.option("--overwrite", is_flag=True, help="Replace an existing file.")
def export_cmd(config_path, run_dir, model, gguf_file, adapter, sets, debug, out, type_name, overwrite):
    """Fuse a run's adapters into its GGUF model and write a GGUF file (llama.cpp, Ollama)."""
    from pathlib import Path

    with reported(debug):
        if not (run_dir or adapter):
            raise ConfigError("export: name the run (--run RUN_DIR) or its adapters (--adapter DIR)")
        cfg, adapter = model_config(config_path, run_dir, model, gguf_file, adapter, [], sets)
        from .export import export_gguf, modelfile_path

        path = export_gguf(cfg, adapter, Path(out) if out else None, type_name, overwrite,
                           say=lambda m: click.echo(m, err=True), out_dir=run_dir)  # not into a checkpoint
    modelfile = modelfile_path(path)
    click.echo(f"wrote {path} and {modelfile}")
    click.echo(f"  llama.cpp: llama-cli -m {path}")
    click.echo(f"  Ollama:    cd {path.parent} && ollama create NAME -f {modelfile.name} && ollama run NAME")


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=A_DIR)
@click.option("--out", type=A_FILE, default=None, help="PNG file [RUN_DIR/curves.png].")
@click.option("--smooth", type=click.IntRange(min=1), default=None, help="Moving-average window in steps [steps/30].")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def plot(run_dirs, out, smooth, debug):
    """Draw reward, accuracy, KL, length, clip fraction, entropy and lr curves of one or more runs."""
    from pathlib import Path

    from .plot import plot_runs

    with reported(debug):
        path = plot_runs(run_dirs, Path(run_dirs[0]) / "curves.png" if out is None else out, smooth)  # "" is refused
    click.echo(f"wrote {path}")


@main.command()
@click.argument("root", default="runs", type=A_DIR)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON list.")
def runs(root, as_json):
    """List the runs under ROOT (default: runs/) with their key figures."""
    from .runs import find_runs, format_table, key_figures, read_run

    with reported(False):  # (a ROOT no filesystem takes)
        found = find_runs(root)
    rows = []
    for path in found:
        try:
            rows.append(key_figures(read_run(path)))
        except (ValueError, OSError) as e:
            click.echo(f"warning: skipping {path}: {e}", err=True)
    if as_json:
        click.echo(json.dumps(rows))
    elif not rows:
        click.echo(f"no runs under {root}")
    else:
        click.echo(format_table(rows))


@main.command("reward")
@click.option("--completions", "completions_path", type=A_FILE, default=None,
              help="JSONL file, one {\"completion\", \"prompt\", \"answer\", ...} per line.")
@click.option("--rewards", "reward_list", type=str, default=None,
              help="Comma-separated rewards, each optionally =weight (default: the config's or task's).")
@click.option("--model", type=A_MODEL, default=None, help="Sample the completions from this model first [model.path].")
@click.option("--gguf-file", type=A_GGUF, default=None, help="A GGUF file in the Hub repository --model [model.gguf_file].")
@click.option("--adapter", type=AN_ADAPTER, default=None, help="Adapter directory for --model.")
@click.option("--task", type=str, default=None, help="Task whose training prompts are sampled [data.task].")
@click.option("--samples", type=int, default=None, help="With --model: how many prompts to sample.")
@click.option("--group-size", "-G", type=int, default=1, show_default=True, help="With --model: completions per prompt.")
@click.option("--max-tokens", type=int, default=None, help="With --model: [rollout.max_tokens]")
@click.option("--config", "config_path", type=A_FILE, default=None, help="YAML config (rewards, reward_settings, task...).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Override any config key.")
@click.option("--out", "out_path", type=A_FILE, default=None, help="Write each row with its rewards and total (JSONL).")
@click.option("--top", type=int, default=3, show_default=True, help="Worst and best examples to show.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def reward_cmd(completions_path, reward_list, model, gguf_file, adapter, task, samples, group_size, max_tokens,
               config_path, sets, out_path, top, as_json, debug):
    """Score completions with rewards, without training: per-reward statistics, correlations,
    worst and best examples. From a file (--completions) or sampled (--model --samples N)."""
    with reported(debug):
        if bool(completions_path) == bool(model):
            raise ConfigError("reward: give either --completions FILE.jsonl or --model M --samples N")
        if model and not (samples and samples > 0):
            raise ConfigError("--samples: with --model, how many prompts to sample (at least 1)")
        if group_size < 1 or top < 0:
            bad = ("--group-size", "at least 1", group_size) if group_size < 1 else ("--top", ">= 0", top)
            raise ConfigError(f"{bad[0]}: must be {bad[1]}, got {bad[2]}")
        if out_path is not None:  # before anything is read: never over an input or a run's file
            check_output_file(out_path, "--out", [("the --completions file", completions_path),
                                                   ("the --config file", config_path)])
        overrides: List[Tuple[str, Any]] = [("output.overwrite", True)]
        overrides += [(k, v) for k, v in (("model.path", model), ("model.gguf_file", gguf_file), ("data.task", task),
                                          ("rollout.max_tokens", max_tokens)) if v is not None]
        overrides += [parse_set(x) for x in sets]
        cfg = make_config(config_path, overrides)
        from .reward_lab import format_report, parse_reward_list, run

        weights = parse_reward_list(reward_list, cfg.rewards) if reward_list is not None else dict(cfg.rewards)
        summary = run(cfg, weights, completions_path, samples, adapter, group_size, out_path, top)
    click.echo(json.dumps(summary) if as_json else format_report(summary))


@main.command()
@click.option("--model", type=A_MODEL, default=None, help="Hub id or local model directory [model.path].")
@click.option("--config", "config_path", type=A_FILE, default=None, help="YAML config (sampling, adapter, beta).")
@click.option("--large", is_flag=True, help="Bench a randomly initialised ~100M-parameter model (built once, cached).")
@click.option("--quick", is_flag=True, help="Tiny settings, one repetition: checks that everything runs.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--processes", "-n", type=click.IntRange(min=0), default=0,
              help="Also time training steps/s with 1 and N processes under mlx.launch (N >= 2).")
@click.option("--out", "out_path", type=A_FILE, default=None, help="Also write the JSON result to this file.")
@click.option("--shape", type=PathText("a shape or a model"), default=None,
              help="qwen2.5-0.5b | qwen2.5-1.5b | llama-3.2-1b (random weights, built once, cached) or a "
                   "model path/Hub id: a step at real scale, memory measured vs the estimate.")
@click.option("--bits", type=click.Choice(["0", "4", "8"]), default="4", help="--shape weights: 0 = float32.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=256, help="--shape: new tokens per completion.")
@click.option("-P", "prompts", type=click.IntRange(min=1), default=2, help="--shape: prompts per step.")
@click.option("-G", "group_size", type=click.IntRange(min=1), default=4, help="--shape: completions per prompt.")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
def bench(model, config_path, large, quick, processes, as_json, out_path, shape, bits, max_tokens, prompts,
          group_size, debug):
    """Rollout throughput vs mlx_lm.batch_generate, GRPO step split and each stage against the
    machine's limits, peak memory, fast vs bundled BLAS."""
    from .bench import run_bench, table as bench_table

    say = (lambda m: click.echo(m, err=True)) if not as_json else (lambda m: None)
    with reported(debug):
        if processes == 1:
            raise ConfigError("--processes: must be 0 (off) or at least 2 (it compares 1 and N processes), got 1")
        if out_path is not None:  # before the measurement: minutes of it must not be lost at the end
            check_output_file(out_path, "--out", [("the --config file", config_path)])
        if shape:
            from .bench_shape import run_shape_bench, shape_table

            result, table = run_shape_bench(shape, int(bits), prompts, group_size, max_tokens, config_path, say), shape_table
        else:
            result, table = run_bench(config_path, model, large=large, quick=quick, say=say, processes=processes), bench_table
        if out_path:
            from pathlib import Path

            from .rundir import atomic_write

            Path(out_path).parent.mkdir(parents=True, exist_ok=True)
            try:
                atomic_write(Path(out_path), lambda p: p.write_text(json.dumps(result, indent=2) + "\n"))
            except OSError as e:  # changed since the check: say so, and keep the result on stdout
                click.echo(f"error: --out: cannot write {out_path} ({e.strerror or e}); the result follows",
                           err=True)
                click.echo(json.dumps(result))
                sys.exit(2)
    click.echo(json.dumps(result) if as_json else table(result))


if __name__ == "__main__":  # pragma: no cover
    main()
