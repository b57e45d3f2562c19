"""The GRPO training loop: ``train`` = prepare -> loop -> finish.

    prepare   check what can be checked, load the policy, build the optimizer, open the run
              directory (rundir.py; fresh, or resumed from a checkpoint: checkpoint.py)
    loop      per step: grpo_step (step.py: rollout, rewards, advantages, learn, metrics), its
              log (runlog.py), evaluations and checkpoints when due, a clean stop on a signal
    finish    the final evaluation, summary.json, the closing lines

Under ``mlx.launch`` every process runs this loop on its share of each step (distributed.py).
"""

from __future__ import annotations

import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

from . import __version__, distributed
from .checkpoint import (
    CheckpointError,
    RunState,
    latest_checkpoint,
    check_data_position,
    load_checkpoint,
    restore_rng_key,
    rng_key,
    save_checkpoint,
)
from .config import Config, ConfigError, TrainConfig, config_warnings, save_config
from .evaluate import evaluate_held_out
from .microbatch import fit_micro_batch
from .interrupts import Interrupted, stop_on_signals
from .models import NonFiniteError, model_dir, save_adapters
from .memory import available_memory
from .rewards.answers import prepare_math_verify
from .preflight import check_prompts, estimate_memory, is_out_of_memory, memory_report, out_of_memory
from .policy import Policy, load_policy
from .rundir import ADAPTERS, CONFIG, check_run_dir, log_sizes, prepare_run_dir, resume_run_dir, write_summary
from .runlog import RunLog, compare_line
from .step import grpo_step
from .tasks import load_task
from .tripwires import Tripwires, fingerprint


def make_schedule(cfg: TrainConfig, total_updates: int) -> Callable:
    """Linear warm-up to the learning rate, then constant, cosine or linear decay."""
    lr = cfg.learning_rate
    decay_steps = max(1, total_updates - cfg.warmup_steps)
    if cfg.lr_schedule == "cosine":
        main = optim.cosine_decay(lr, decay_steps, 0.0)
    elif cfg.lr_schedule == "linear":
        main = optim.linear_schedule(lr, 0.0, decay_steps)
    else:
        main = lambda _: mx.array(lr)  # noqa: E731
    if cfg.warmup_steps == 0:
        return main
    # Update i < warmup_steps gets lr * (i + 1) / warmup_steps: no update at lr 0, full lr at the end.
    warm = optim.linear_schedule(lr / cfg.warmup_steps, lr, max(cfg.warmup_steps - 1, 1))
    return optim.join_schedules([warm, main], [cfg.warmup_steps])


def prompt_batches(rows: Sequence[Dict], size: int, seed: int, skip: int = 0) -> Iterator[List[Dict]]:
    """Endless batches of rows: a fresh seeded shuffle each epoch, never a row twice per epoch.

    ``skip`` batches are drawn and dropped first: a resumed run continues the same order (the
    order is a function of the seed alone, so replaying it is exact and costs only shuffles).
    """
    rng = np.random.default_rng(seed)
    order: List[int] = []
    drawn = 0
    while True:
        batch = []
        while len(batch) < size:
            if not order:
                order = rng.permutation(len(rows)).tolist()
            batch.append(rows[order.pop()])
        drawn += 1
        if drawn > skip:
            yield batch


@dataclass
class Run:
    """A run set up by ``prepare``: what the loop and ``finish`` work with."""

    cfg: Config
    out: Path
    main: bool  # rank 0: speaks for the run, reads and writes its directory
    say: Callable[[str], None]
    policy: Policy  # model (adapters attached), tokenizer, KL reference, prompter, rewards
    train_rows: List[Dict[str, Any]]
    eval_rows: List[Dict[str, Any]]
    opt: optim.Optimizer
    state: RunState
    ckpt: Optional[Path]  # the checkpoint resumed from, then the newest one saved
    log: RunLog
    started: float = 0.0  # perf_counter when the loop began
    seconds_before: float = 0.0  # training time of the run before this process (resume)


def train(cfg: Config, say: Callable[[str], None] = print, resume: bool = False) -> Dict[str, Any]:
    """Run GRPO as configured; returns the summary (also written to the run directory).

    With ``resume``, continue the run in ``output.dir`` from its newest checkpoint (``cfg`` comes
    from ``checkpoint.resume_config``). Everything that can be checked before the first step
    (rewards, data, model, prompts, run directory) is checked before anything is written.

    Under ``mlx.launch`` every process calls this; rank 0 alone prints, reads the run directory
    and writes to it, and the others start from its weights, optimizer state and position.
    """
    run = prepare(cfg, say, resume)
    loop(run)
    return finish(run)


def prepare(cfg: Config, say: Callable[[str], None], resume: bool) -> Run:
    """Check what can be checked, load the policy, build the optimizer, and open the run
    directory (fresh, or resumed from its newest checkpoint)."""
    out = Path(cfg.output.dir)
    distributed.check_batch(cfg.train.prompts_per_step)
    if cfg.grpo.dynamic_sampling and distributed.size() > 1:
        raise ConfigError("grpo.dynamic_sampling: runs on one process only (not under mlx.launch yet)")
    main = distributed.is_main()
    if not main:
        say = lambda _: None  # noqa: E731 - rank 0 speaks for the run
    data = load_task(cfg.data)
    ckpt = latest_checkpoint(out) if resume and main else None
    if resume and main and ckpt is None:
        raise CheckpointError(f"--resume: {out} has no complete checkpoint")
    if not resume and main:
        check_run_dir(out, cfg.output.overwrite)

    policy = load_policy(cfg, say)  # the rewards first: a bad one fails before the model loads
    model = policy.model
    longest_prompt = check_prompts(policy.tokenizer, model, data, policy.prompter, cfg)
    # math-verify's import and warm-up (a second or a few) now, not inside the first step's rewards
    prepare_math_verify(r.get("answer") for r in (*data.train, *data.held_out))
    _announce(model, cfg, data, longest_prompt, say)
    opt = make_optimizer(model, cfg)
    if not resume and distributed.size() == 1:  # a resumed run keeps the micro-batching it chose
        cfg = fit_micro_batch(model, cfg, longest_prompt, say)
    state = _open_run_dir(out, cfg, ckpt, model, opt, main, say)
    state = _start_from_rank0(model, opt, state)
    if distributed.size() > 1:
        say(f"data parallel over {distributed.size()} processes: "
            f"{cfg.train.prompts_per_step // distributed.size()} of {cfg.train.prompts_per_step} prompts each per step")
    tripwires = Tripwires(lambda: fingerprint(model)) if main else Tripwires()
    log = RunLog(out, cfg, say, tripwires, state.step, main)
    eval_rows = data.held_out[: cfg.output.eval_size] if cfg.output.eval_size else data.held_out
    return Run(cfg, out, main, say, policy, data.train, eval_rows, opt, state, ckpt, log)


def loop(run: Run) -> None:
    """The steps from the run's position to ``train.steps``: a GRPO step, its log, and the
    evaluations and checkpoints that are due; a signal stops it after a step, with a checkpoint."""
    cfg, state = run.cfg, run.state
    run.started, run.seconds_before = time.perf_counter(), state.seconds
    if run.ckpt is None:
        state.eval_start = state.eval_end = evaluate(run, 0)
    batches = prompt_batches(run.train_rows, cfg.train.prompts_per_step, cfg.train.seed, state.batches_drawn)
    step = state.step
    try:
        with stop_on_signals(run.say) as stop:
            for step in range(state.step + 1, cfg.train.steps + 1):
                distributed.test_exit_hook(step)
                m, samples = grpo_step(run.policy, run.opt, next(batches), cfg, sampling_key(cfg.train.seed, step),
                                       more_rows=lambda: next(batches))
                m["learning_rate"] = float(run.opt.learning_rate.item())
                _advance(state, step, m)
                run.log.step(step, m, samples)
                _count_nonfinite(state, m, cfg, run.out)
                if cfg.output.eval_every and step % cfg.output.eval_every == 0 and step < cfg.train.steps:
                    state.eval_end = evaluate(run, step)
                # A signal seen by any process stops every process after this same step.
                stopping = distributed.any_true(stop.signum is not None)
                stop.signum = stop.signum or (signal.SIGTERM if stopping else None)
                due = cfg.output.save_every and step % cfg.output.save_every == 0
                if run.main and (due or step == cfg.train.steps or stopping):
                    with stop.uninterruptible():
                        run.ckpt = save(run)
                # Decided once, above: a signal that lands after that point is acted on after
                # the next step (which then saves), never here without a checkpoint.
                if stopping:
                    raise Interrupted(stop.signum, run.out, run.ckpt)
    except Interrupted as e:  # a second signal stops at once: the newest checkpoint is the one on disk
        raise Interrupted(e.signum, run.out, e.checkpoint or latest_checkpoint(run.out)) from None
    except distributed.PeerLost as e:  # (a RuntimeError) name what is left to resume from
        last = latest_checkpoint(run.out) if run.main else None
        raise distributed.PeerLost(f"{e}; last checkpoint: {last or 'none'}" if run.main else str(e)) from None
    except (RuntimeError, MemoryError) as e:
        if is_out_of_memory(e):
            raise out_of_memory(e, cfg, step, latest_checkpoint(run.out)) from e
        raise
    finally:
        run.log.end_progress()  # what is said after the loop goes to ``say``


def finish(run: Run) -> Dict[str, Any]:
    """After the last step (rank 0): the final evaluation, summary.json and the closing lines;
    returns the summary ({} on other processes)."""
    if not run.main:
        return {}
    cfg, state, out = run.cfg, run.state, run.out
    if state.step == 0:  # a run of no steps: the last step's checkpoint would have written them
        save_adapters(run.policy.model, out, cfg.adapter, model_dir(cfg.model))
    if cfg.train.steps:
        state.eval_end = evaluate(run, cfg.train.steps, announce=False)
    run.log.close()
    summary = {
        "steps": cfg.train.steps,
        "seconds": run.seconds_before + time.perf_counter() - run.started,
        "tokens": state.tokens,
        "reward_first": state.reward_first,
        "reward_last": state.reward_last,
        "skipped_updates": state.skipped_updates,
        "eval_start": state.eval_start,
        "eval_end": state.eval_end,
        "adapters": str(out / ADAPTERS),
    }
    write_summary(out, summary)
    if state.eval_start and state.eval_end:
        run.say("held-out, before -> after: " + compare_line(state.eval_start, state.eval_end))
    run.say(f"adapters saved in {out} (load with: mlx_lm.generate --model {model_dir(cfg.model)} --adapter-path {out})")
    return summary


def make_optimizer(model: nn.Module, cfg: Config) -> optim.Optimizer:
    """AdamW on the learning-rate schedule, its state tree built for ``model``'s trainable
    parameters from the start (so every checkpoint holds the whole tree)."""
    total_updates = cfg.train.steps * cfg.grpo.num_iterations
    opt = optim.AdamW(learning_rate=make_schedule(cfg.train, total_updates), weight_decay=cfg.train.weight_decay)
    opt.init(model.trainable_parameters())
    return opt


def evaluate(run: Run, step: int, announce: bool = True) -> Optional[Dict[str, Any]]:
    """The held-out evaluation at ``step``, logged. Rank 0 evaluates alone (the others wait at
    the next step's first exchange): the held-out figures are then exactly a single process's."""
    if not run.eval_rows or not run.main:
        return None
    t = time.perf_counter()
    res = evaluate_held_out(run.policy, run.eval_rows, run.cfg, run.cfg.output.eval_samples)
    res = {"step": step, **res, "time": time.perf_counter() - t}
    run.log.eval(step, res, announce)
    return res


def save(run: Run) -> Path:
    """A checkpoint of the run now, and its adapters at the top of the run directory."""
    state = run.state
    state.rng_key = rng_key()
    state.seconds = run.seconds_before + time.perf_counter() - run.started
    state.log_sizes = log_sizes(run.out)
    path = save_checkpoint(run.out, run.policy.model, run.opt, run.cfg, state)
    save_adapters(run.policy.model, run.out, run.cfg.adapter, model_dir(run.cfg.model))
    return path


def _announce(model: nn.Module, cfg: Config, data: Any, longest_prompt: int, say: Callable[[str], None]) -> None:
    """The opening lines: what is trained on what, the memory estimate, the config's warnings."""
    n_train = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    n_total = sum(v.size for _, v in tree_flatten(model.parameters()))
    say(
        f"mlx-grpo {__version__} | model {cfg.model.path} | {cfg.adapter.type}: "
        f"{n_train / 1e6:.3f}M of {n_total / 1e6:.2f}M parameters trainable | "
        f"{len(data.train)} train / {len(data.held_out)} held-out prompts | device {mx.default_device()}"
    )
    for line in memory_report(estimate_memory(model, cfg, longest_prompt), available_memory(), cfg):
        say(line)
    for line in config_warnings(cfg):
        say(f"warning: {line}")


def _open_run_dir(out: Path, cfg: Config, ckpt: Optional[Path], model: nn.Module, opt: optim.Optimizer,
                  main: bool, say: Callable[[str], None]) -> RunState:
    """The run directory made ready (rank 0) and the loop's starting state: with ``ckpt``, its
    state loaded into ``model`` and ``opt`` and the directory cut back to it; else a fresh run
    directory. The config is saved either way."""
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, opt)
        check_data_position(state, ckpt, cfg.grpo.dynamic_sampling_max_draws if cfg.grpo.dynamic_sampling else 1)
        resume_run_dir(out, state.log_sizes, state.step, ckpt / "state.json")
        say(f"resuming {out} from {ckpt.name}: step {state.step + 1} of {cfg.train.steps}")
    else:
        if main:
            prepare_run_dir(out, cfg.output.overwrite)
        state = RunState()
    if main:
        save_config(cfg, out / CONFIG)
    return state


def _advance(state: RunState, step: int, m: Dict[str, Any]) -> None:
    """The run's position and totals after ``step`` (its metrics ``m``)."""
    state.step, state.batches_drawn = step, state.batches_drawn + int(m.get("dynamic_draws", 1))
    state.tokens += m["tokens"]
    if state.reward_first is None:
        state.reward_first = m["reward_mean"]
    state.reward_last = m["reward_mean"]


def sampling_key(seed: int, step: int) -> mx.array:
    """The PRNG key of step ``step``'s rollouts: a function of the seed and step alone, so a
    resumed run and any number of processes sample exactly what one uninterrupted process does."""
    return mx.array(np.random.SeedSequence([seed % 2**64, step]).generate_state(2), dtype=mx.uint32)


def _start_from_rank0(model: nn.Module, opt: optim.Optimizer, state: RunState) -> RunState:
    """Every process continues from rank 0's adapters, optimizer state and loop position (on
    resume only rank 0 reads the checkpoint: other machines need no copy of the run)."""
    if distributed.size() == 1:
        return state
    model.update(distributed.broadcast_arrays(model.trainable_parameters()))
    opt.state = distributed.broadcast_arrays(opt.state)
    state = RunState(**distributed.broadcast(asdict(state)))
    if state.rng_key is not None:
        restore_rng_key(state.rng_key)
    return state


def _count_nonfinite(state: RunState, m: Dict[str, Any], cfg: Config, out: Path) -> None:
    """Count skipped updates; stop the run after ``train.max_nonfinite_steps`` bad steps in a row.

    A step counts as bad when every one of its updates was skipped (non-finite loss or gradient);
    a step with no update at all (every advantage zero) neither counts nor resets the streak.
    """
    skipped = int(m["skipped_updates"])
    state.skipped_updates += skipped
    if m["rows_updated"] == 0:
        return
    state.nonfinite_streak = state.nonfinite_streak + 1 if skipped == cfg.grpo.num_iterations else 0
    limit = cfg.train.max_nonfinite_steps
    if limit and state.nonfinite_streak >= limit:
        last = latest_checkpoint(out)
        raise NonFiniteError(
            f"stopped at step {state.step}: {state.nonfinite_streak} steps in a row had a non-finite "
            f"loss or gradient (loss {m['loss']}, grad_norm {m['grad_norm']}; updates skipped, weights "
            f"unchanged); lower train.learning_rate or check the rewards' scale "
            f"(train.max_nonfinite_steps={limit}); last checkpoint: {last or 'none'}"
        )

