"""The GRPO training loop: the seed's four steps, in order, once per step.

    rollouts   = sample_groups(...)        # 1. G completions per prompt
    rewards    = score(...)                # 2. rule-based rewards
    advantages = group_advantages(...)     # 3. group-relative
    update(...)                            # 4. clipped surrogate + KL, num_iterations times

Everything else here is bookkeeping: the run directory, metrics, progress and checkpoints.
Under ``mlx.launch`` every process runs this loop on its share of each step (distributed.py).
"""

from __future__ import annotations

import json
import math
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from . import __version__, distributed
from .advantages import flat_groups, group_advantages
from .checkpoint import (
    CheckpointError,
    RunState,
    latest_checkpoint,
    check_data_position,
    load_checkpoint,
    log_sizes,
    restore_rng_key,
    rng_key,
    save_checkpoint,
    truncate_logs,
)
from .config import Config, ConfigError, TrainConfig, config_warnings, save_config
from .evaluate import evaluate_held_out
from .fit import fit_micro_batch
from .loggers import Trackers
from .loss import Normalizer, counted_tokens, grpo_loss, rows_in_loss
from .forward import enable_grad_checkpoint
from .models import adapters_disabled, NonFiniteError, save_adapters
from .interrupts import Interrupted, stop_on_signals
from .outputs import RunDirError, adopt_run_dir, check_run_dir, prepare_run_dir  # noqa: F401 (RunDirError: re-exported)
from .preflight import available_memory, check_prompts, estimate_memory, is_out_of_memory, memory_report, out_of_memory
from .policy import load_policy
from .rewards import Rewards, score
from .rollout import Rollouts, pad_id, row_keys, sample_groups
from .sampling import Drawn, fill_with_spread
from .scoring import completion_logprobs
from .tasks import columns, load_task
from .tripwires import Tripwires, fingerprint
from .tasks.templates import PromptFormat, render_prompt


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
class StepBatch:
    """The rows of one step that take part in the update, with everything the loss needs.

    prompts: [U, Lp] the distinct left-padded prompts; row_prompt: [B] each row's prompt index.
    """

    prompts: mx.array
    left_padding: List[int]
    row_prompt: np.ndarray
    tokens: mx.array
    mask: mx.array
    advantages: mx.array
    ref_logp: Optional[mx.array] = None
    old_logp: Optional[mx.array] = None

    def rows(self, sl: slice) -> "StepBatch":
        pick = lambda a: None if a is None else a[sl]  # noqa: E731
        return StepBatch(
            self.prompts, self.left_padding, self.row_prompt[sl], self.tokens[sl], self.mask[sl],
            self.advantages[sl], pick(self.ref_logp), pick(self.old_logp),
        )

    def logprobs(self, model: nn.Module, temperature: float, chunk: Optional[int] = None) -> mx.array:
        return completion_logprobs(
            model, self.prompts, self.left_padding, self.tokens, temperature, self.row_prompt, chunk,
            lengths=np.array(self.mask.sum(axis=1)).astype(np.int64),  # rows scored in length groups
        )


def select_rows(ro: Rollouts, adv: np.ndarray, keep: np.ndarray) -> StepBatch:
    """The kept rows of a rollout, trimmed to their longest completion."""
    idx = mx.array(keep.astype(np.int32))
    mask = ro.mask[idx]
    width = max(1, int(mask.sum(axis=0).astype(mx.bool_).sum().item()))
    return StepBatch(
        prompts=ro.prompt_tokens,
        left_padding=list(ro.left_padding),
        row_prompt=ro.row_prompt[keep],
        tokens=ro.tokens[idx][:, :width],
        mask=mask[:, :width],
        advantages=mx.array(adv[keep]),
    )


def draw_groups(
    model: nn.Module,
    tokenizer: Any,
    rows: List[Dict[str, Any]],
    cfg: Config,
    fmt: PromptFormat,
    reward_fns: Dict[str, Callable],
    keys: Optional[mx.array],
) -> Drawn:
    """Steps 1 and 2 for ``rows``: G completions each, scored on the whole response (the
    template's response prefix + the completion)."""
    G = cfg.rollout.group_size
    t0 = time.perf_counter()
    prompts = [render_prompt(r["prompt"], fmt, tokenizer) for r in rows]
    ro = sample_groups(model, tokenizer, prompts, cfg.rollout, keys=keys)
    t1 = time.perf_counter()
    responses = [fmt.response_prefix + t for t in ro.texts]
    cols = {**columns([r for r in rows for _ in range(G)]), "completion_ids": ro.completion_ids()}
    rw = score([p for p in prompts for _ in range(G)], responses, cols, reward_fns, cfg.rewards)
    return Drawn(list(rows), prompts, ro, rw, t1 - t0, time.perf_counter() - t1)


def logprobs_of(model: nn.Module, b: StepBatch, temperature: float, micro: int) -> mx.array:
    return mx.stop_gradient(b.logprobs(model, temperature, chunk=micro))


STATS = ("kl", "clip_fraction", "clip_low", "clip_high", "ratio_mean")  # grpo_loss's diagnostics


def micro_size(rows: int, cfg: TrainConfig) -> int:
    """Rows per micro-batch: the step's rows cut into ``grad_accumulation_steps`` parts."""
    return max(1, math.ceil(rows / cfg.grad_accumulation_steps))


def step_normalizer(
    rows_per_process: Sequence[int], tokens: float, cfg: Config, step_rows: Optional[int] = None
) -> Normalizer:
    """The whole step's sizes: the completions counted (``step_rows``, default the rows in the
    update) and their tokens, and micro-batches over all processes (each cuts its rows in the
    update into micro-batches of ``micro_size`` of the step's rows in the update)."""
    n = int(sum(rows_per_process))
    size = micro_size(n, cfg.train)
    n_micro = sum(math.ceil(r / size) for r in rows_per_process)
    counted = n if step_rows is None else step_rows
    return Normalizer(float(counted), float(tokens), cfg.rollout.max_tokens, n_micro, float(n))


def update(
    model: nn.Module,
    opt: optim.Optimizer,
    batch: Optional[StepBatch],
    cfg: Config,
    norm: Optional[Normalizer] = None,
) -> Dict[str, float]:
    """One optimizer update on ``batch``, accumulated over micro-batches; returns loss and stats.

    ``norm`` holds the sizes of the whole step over all processes (default: ``batch``'s own);
    losses are normalised by them, so every process's gradient is its share of the step's
    gradient and their sum is the update applied on every process. A process with no rows
    (``batch`` None) adds zeros.
    """
    if norm is None:
        norm = step_normalizer([batch.tokens.shape[0]], batch.mask.sum().item(), cfg)
    n = 0 if batch is None else batch.tokens.shape[0]
    size = micro_size(norm.rows, cfg.train)
    temperature = cfg.rollout.temperature

    def loss_fn(model, b: StepBatch):
        logp = b.logprobs(model, temperature)
        return grpo_loss(logp, b.old_logp, b.ref_logp, b.mask, b.advantages, cfg.grpo, norm)

    value_and_grad = nn.value_and_grad(model, loss_fn)
    grads = None
    loss_total = 0.0
    stats_sum: Dict[str, float] = {}
    for start in range(0, n, size):
        mb = batch.rows(slice(start, start + size))
        (loss, stats), g = value_and_grad(model, mb)
        grads = g if grads is None else tree_map(mx.add, grads, g)
        mx.eval(loss, grads, stats)
        loss_total += loss.item()
        # The stats are token means: weighting each micro-batch by its tokens gives the step's.
        w = mb.mask.sum().item() / max(norm.num_tokens, 1.0)
        for k, v in stats.items():
            stats_sum[k] = stats_sum.get(k, 0.0) + w * v.item()
    if grads is None:
        grads = tree_map(mx.zeros_like, model.trainable_parameters())
    grads = distributed.sum_gradients(grads)
    loss_total, *values = distributed.sum_values([loss_total] + [stats_sum.get(k, 0.0) for k in STATS])
    stats_sum = dict(zip(STATS, values))
    grad_norm = math.sqrt(sum((g.astype(mx.float32) ** 2).sum().item() for _, g in tree_flatten(grads)))
    if not (math.isfinite(loss_total) and math.isfinite(grad_norm)):
        return {"loss": loss_total, "grad_norm": grad_norm, "skipped": 1.0, **stats_sum}
    if cfg.train.max_grad_norm > 0:
        grads, _ = optim.clip_grad_norm(grads, cfg.train.max_grad_norm)
    opt.update(model, grads)
    mx.eval(model.trainable_parameters(), opt.state)
    return {"loss": loss_total, "grad_norm": grad_norm, "skipped": 0.0, **stats_sum}


def grpo_step(
    model: nn.Module,
    tokenizer: Any,
    opt: optim.Optimizer,
    rows: List[Dict[str, Any]],
    cfg: Config,
    fmt: PromptFormat,
    reward_fns: Dict[str, Callable],
    ref_model: Optional[nn.Module] = None,
    key: Optional[mx.array] = None,
    more_rows: Optional[Callable[[], List[Dict[str, Any]]]] = None,
) -> Dict[str, Any]:
    """One GRPO step on the global batch ``rows``; returns the step's metrics (and samples under
    "_samples").

    With ``grpo.dynamic_sampling``, ``more_rows()`` gives the next batch of prompts whenever the
    step needs more groups with reward spread (sampling.py); "dynamic_draws" counts the batches.

    This process samples and learns from its share of ``rows`` (all of them when run alone); the
    advantages and metrics are computed on every process's rows, gathered. With ``key`` (see
    ``sampling_key``) each row samples from its own stream, the same however ``rows`` is split.
    """
    G = cfg.rollout.group_size
    temperature = cfg.rollout.temperature
    part = distributed.shard(len(rows))
    mine = rows[part]
    lo, hi = part.start * G, part.stop * G  # this process's rows in the step's row order
    micro = micro_size(len(mine) * G, cfg.train)
    t0 = time.perf_counter()

    # 1-2. Rollouts from the current policy, and their rewards; DAPO draws more prompts if asked.
    model.eval()
    keys = None if key is None else row_keys(key, len(rows), G)[lo:hi]
    drawn = draw_groups(model, tokenizer, mine, cfg, fmt, reward_fns, keys)
    extra: Dict[str, float] = {}
    if cfg.grpo.dynamic_sampling:  # one process (checked at the start of train)
        def draw(d: int) -> Drawn:
            more = more_rows()
            k = None if key is None else row_keys(mx.random.split(key, cfg.grpo.dynamic_sampling_max_draws)[d], len(more), G)
            return draw_groups(model, tokenizer, more, cfg, fmt, reward_fns, k)

        drawn, extra = fill_with_spread(drawn, draw, len(rows), cfg.grpo.dynamic_sampling_max_draws, pad_id(tokenizer))
    mine, prompts, ro, rw = drawn.rows, drawn.prompts, drawn.ro, drawn.rw
    hi = lo + len(mine) * G  # dynamic sampling: the step's groups as drawn
    t1 = t0 + drawn.generate_time
    t2 = t1 + drawn.reward_time

    # 3. Group-relative advantages, over every process's rows (each one's own come back sliced).
    entropy_terms = -(ro.sample_logprobs * ro.mask).sum(axis=1)
    table = distributed.gather(np.column_stack(
        [rw.total, ro.lengths, ro.truncated, np.array(entropy_terms.tolist()), *rw.columns.values()]
    ))
    total, lengths, truncated, entropy_sum = table[:, 0], table[:, 1], table[:, 2], table[:, 3].sum()
    reward_columns = {k: table[:, 4 + i] for i, k in enumerate(rw.columns)}
    adv_all = group_advantages(total, G, cfg.grpo.scale_rewards)
    keep_all = np.flatnonzero(rows_in_loss(adv_all, truncated, cfg.grpo))
    adv = adv_all[lo:hi]
    keep = keep_all[(keep_all >= lo) & (keep_all < hi)] - lo
    per_process = np.bincount(keep_all // (hi - lo), minlength=distributed.size())
    # Every completion counts in the normaliser, in the update or not (the paper's, TRL's).
    norm = step_normalizer(per_process.tolist(), counted_tokens(lengths, truncated, cfg.grpo), cfg, adv_all.size)

    # 4. Reference and old-policy logprobs, then num_iterations clipped updates.
    upd: Dict[str, float] = {}
    t3 = t4 = time.perf_counter()
    if keep_all.size:
        batch = select_rows(ro, adv, keep) if keep.size else None  # None: this process adds zeros
        if batch is not None:
            if cfg.grpo.beta > 0:
                if ref_model is not None:
                    batch.ref_logp = logprobs_of(ref_model, batch, temperature, micro)
                else:
                    with adapters_disabled(model):
                        batch.ref_logp = logprobs_of(model, batch, temperature, micro)
            if cfg.grpo.num_iterations > 1:
                batch.old_logp = logprobs_of(model, batch, temperature, micro)
            mx.eval(batch.ref_logp, batch.old_logp)
        t3 = time.perf_counter()
        model.train()
        per_iter = [update(model, opt, batch, cfg, norm) for _ in range(cfg.grpo.num_iterations)]
        model.eval()
        upd = {k: float(np.mean([p[k] for p in per_iter])) for k in per_iter[0]}
        upd["skipped"] = float(sum(p["skipped"] for p in per_iter))
        t4 = time.perf_counter()

    n_tokens = int(lengths.sum())
    step_time = t4 - t0
    generate_time = float(distributed.gather(np.array([t1 - t0])).max())  # the slowest process's
    metrics: Dict[str, Any] = {
        "loss": upd.get("loss", 0.0),
        "reward_mean": float(total.mean()),
        "reward_std": float(total.std()),
        **{f"rewards/{k}": v for k, v in Rewards(reward_columns, total).means().items()},
        "kl": upd.get("kl", 0.0),
        "clip_fraction": upd.get("clip_fraction", 0.0),
        "clip_low": upd.get("clip_low", 0.0),
        "clip_high": upd.get("clip_high", 0.0),
        "ratio_mean": upd.get("ratio_mean", 1.0),
        "grad_norm": upd.get("grad_norm", 0.0),
        "skipped_updates": upd.get("skipped", 0.0),
        # Mean -log p of the sampled tokens: a Monte-Carlo estimate of the per-token entropy of the
        # (temperature-scaled) policy, free because the rollout kept the logprobs.
        "entropy": float(entropy_sum) / max(n_tokens, 1),
        "completion_length": float(lengths.mean()),
        "truncated_rate": float(np.mean(truncated)),
        "zero_std_groups": float(np.mean(flat_groups(total, G))),
        "rows_updated": int(keep_all.size),
        "tokens": n_tokens,
        "tokens_per_sec": n_tokens / max(generate_time, 1e-9),
        "step_time": step_time,
        "time_generate": generate_time,
        "time_reward": t2 - t1,
        "time_score": t3 - t2,
        "time_update": t4 - t3,
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
        **extra,  # dynamic sampling's log; its zero_std_groups counts every group it sampled
    }
    metrics["_samples"] = [  # from this process's rows
        {"prompt": mine[i // G]["prompt"], "completion": ro.texts[i], "reward": float(rw.total[i]),
         "rewards": {k: (None if np.isnan(v[i]) else float(v[i])) for k, v in rw.columns.items()},
         "advantage": float(adv[i]), "answer": mine[i // G].get("answer")}
        for i in range(0, len(ro.texts), max(1, len(ro.texts) // 4))
    ]
    return metrics


def _progress(total: int, enabled: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with huggingface-hub
        return None
    return tqdm(total=total, disable=not enabled, dynamic_ncols=True, unit="step")


def _append_jsonl(path: Path, obj: Dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")


def train(cfg: Config, say: Callable[[str], None] = print, resume: bool = False) -> Dict[str, Any]:
    """Run GRPO as configured; returns the summary (also written to the run directory).

    With ``resume``, continue the run in ``output.dir`` from its newest checkpoint (``cfg`` comes
    from ``checkpoint.resume_config``). Everything that can be checked before the first step
    (rewards, data, model, prompts, run directory) is checked before anything is written.

    Under ``mlx.launch`` every process calls this; rank 0 alone prints, reads the run directory
    and writes to it, and the others start from its weights, optimizer state and position.
    """
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
    model, tokenizer, ref_model = policy.model, policy.tokenizer, policy.reference
    fmt, reward_fns = policy.prompter.fmt, policy.reward_fns
    longest_prompt = check_prompts(tokenizer, model, data, fmt, cfg)
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
    total_updates = cfg.train.steps * cfg.grpo.num_iterations
    opt = optim.AdamW(
        learning_rate=make_schedule(cfg.train, total_updates), weight_decay=cfg.train.weight_decay
    )
    opt.init(model.trainable_parameters())  # the full state tree from the start: every checkpoint has it
    if not resume and distributed.size() == 1:  # a resumed run keeps the micro-batching it chose
        cfg = fit_micro_batch(model, cfg, longest_prompt, enable_grad_checkpoint, say)
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, opt)
        check_data_position(state, ckpt, cfg.grpo.dynamic_sampling_max_draws if cfg.grpo.dynamic_sampling else 1)
        truncate_logs(out, state)
        adopt_run_dir(out)
        (out / "summary.json").unlink(missing_ok=True)  # it described the run before this resume
        say(f"resuming {out} from {ckpt.name}: step {state.step + 1} of {cfg.train.steps}")
    else:
        if main:
            prepare_run_dir(out, cfg.output.overwrite)
        state = RunState()
    if main:
        save_config(cfg, out / "config.yaml")
    state = _start_from_rank0(model, opt, state)
    if distributed.size() > 1:
        say(f"data parallel over {distributed.size()} processes: "
            f"{cfg.train.prompts_per_step // distributed.size()} of {cfg.train.prompts_per_step} prompts each per step")
    metrics_path, samples_path = out / "metrics.jsonl", out / "samples.jsonl"

    eval_rows = data.held_out[: cfg.output.eval_size] if cfg.output.eval_size else data.held_out

    trackers = Trackers(cfg, out) if main else None
    tripwires = Tripwires(lambda: fingerprint(model)) if main else Tripwires()
    bar = None

    def warn(found: List[Dict[str, Any]]) -> None:
        # Tripwires warn and never stop the run: in the console and in metrics.jsonl.
        for w in found if main else []:
            _append_jsonl(metrics_path, w)
            (bar.write if bar is not None and not bar.disable else say)(f"warning: {w['message']}")

    def run_eval(step: int) -> Optional[Dict[str, Any]]:
        # Rank 0 evaluates alone (the others wait at the next step's first exchange): the
        # held-out figures are then exactly a single process's.
        if not eval_rows or not main:
            return None
        t = time.perf_counter()
        res = evaluate_held_out(model, tokenizer, eval_rows, cfg, cfg.output.eval_samples, None, reward_fns)
        res = {"step": step, **res, "time": time.perf_counter() - t}
        _append_jsonl(metrics_path, {"kind": "eval", **res})
        trackers.log(step, res, "eval")
        warn(tripwires.evaluated(step, res))
        return res

    start, seconds_before = time.perf_counter(), state.seconds
    if ckpt is None:
        state.eval_start = state.eval_end = run_eval(0)
        if state.eval_start:
            say(f"held-out at step 0: {_eval_line(state.eval_start)}")

    def save(step: int) -> Path:
        state.rng_key = rng_key()
        state.seconds = seconds_before + time.perf_counter() - start
        state.log_sizes = log_sizes(out)
        path = save_checkpoint(out, model, opt, cfg, state)
        save_adapters(model, out, cfg.adapter, cfg.model.path)
        return path

    batches = prompt_batches(data.train, cfg.train.prompts_per_step, cfg.train.seed, state.batches_drawn)
    bar = _progress(cfg.train.steps, cfg.output.progress and main)
    if bar is not None:
        bar.update(state.step)
    step = state.step
    try:
        with stop_on_signals(say) as stop:
            for step in range(state.step + 1, cfg.train.steps + 1):
                distributed.test_exit_hook(step)
                key = sampling_key(cfg.train.seed, step)
                m = grpo_step(model, tokenizer, opt, next(batches), cfg, fmt, reward_fns, ref_model, key,
                              more_rows=lambda: next(batches))
                state.step, state.batches_drawn = step, state.batches_drawn + int(m.get("dynamic_draws", 1))
                samples = m.pop("_samples")
                m["learning_rate"] = float(opt.learning_rate.item())
                state.tokens += m["tokens"]
                if main:
                    _append_jsonl(metrics_path, {"step": step, "kind": "train", **m})
                    trackers.log(step, m)
                    for s in samples:
                        _append_jsonl(samples_path, {"step": step, **s})
                if state.reward_first is None:
                    state.reward_first = m["reward_mean"]
                state.reward_last = m["reward_mean"]
                _count_nonfinite(state, m, cfg, out)
                warn(tripwires.train(step, m))
                if cfg.output.eval_every and step % cfg.output.eval_every == 0 and step < cfg.train.steps:
                    state.eval_end = run_eval(step)
                    if state.eval_end:
                        (bar.write if bar is not None else say)(
                            f"held-out at step {step}: {_eval_line(state.eval_end)}"
                        )
                # A signal seen by any process stops every process after this same step.
                stopping = distributed.any_true(stop.signum is not None)
                stop.signum = stop.signum or (signal.SIGTERM if stopping else None)
                due = cfg.output.save_every and step % cfg.output.save_every == 0
                if main and (due or step == cfg.train.steps or stopping):
                    with stop.uninterruptible():
                        ckpt = save(step)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(_bar_line(m))
                # Decided once, above: a signal that lands after that point is acted on after
                # the next step (which then saves), never here without a checkpoint.
                if stopping:
                    raise Interrupted(stop.signum, out, ckpt)
    except Interrupted as e:  # a second signal stops at once: the newest checkpoint is the one on disk
        raise Interrupted(e.signum, out, e.checkpoint or latest_checkpoint(out)) from None
    except distributed.PeerLost as e:  # (a RuntimeError) name what is left to resume from
        last = latest_checkpoint(out) if main else None
        raise distributed.PeerLost(f"{e}; last checkpoint: {last or 'none'}" if main else str(e)) from None
    except (RuntimeError, MemoryError) as e:
        if is_out_of_memory(e):
            raise out_of_memory(e, cfg, step, latest_checkpoint(out)) from e
        raise
    finally:
        if bar is not None:
            bar.close()
            bar = None  # what is said after the loop goes to ``say``
    if not main:
        return {}
    if state.step == 0:  # a run of no steps: the last step's checkpoint would have written them
        save_adapters(model, out, cfg.adapter, cfg.model.path)
    if cfg.train.steps:
        state.eval_end = run_eval(cfg.train.steps)
    trackers.close()
    summary = {
        "steps": cfg.train.steps,
        "seconds": seconds_before + time.perf_counter() - start,
        "tokens": state.tokens,
        "reward_first": state.reward_first,
        "reward_last": state.reward_last,
        "skipped_updates": state.skipped_updates,
        "eval_start": state.eval_start,
        "eval_end": state.eval_end,
        "adapters": str(out / "adapters.safetensors"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if state.eval_start and state.eval_end:
        say("held-out, before -> after: " + _compare_line(state.eval_start, state.eval_end))
    say(f"adapters saved in {out} (load with: mlx_lm.generate --model {cfg.model.path} --adapter-path {out})")
    return summary


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


def _bar_line(m: Dict[str, Any]) -> str:
    """The progress bar's figures: this step's training reward, accuracy and format (the reward
    columns of that name, when configured), KL, length and speed."""
    shown = "".join(f" {label} {m[k]:.3f}" for k, label in (("rewards/accuracy", "acc"), ("rewards/format", "fmt"))
                    if isinstance(m.get(k), float))
    return (f"reward {m['reward_mean']:.3f}{shown} kl {m['kl']:.4f} len {m['completion_length']:.1f} "
            f"{m['tokens_per_sec']:.0f} tok/s")


def _eval_line(e: Dict[str, Any]) -> str:
    return (
        f"format {e['format_rate']:.3f}, accuracy {e['accuracy']:.3f}, "
        f"lenient accuracy {e['lenient_accuracy']:.3f} on {e['n']} prompts"
    )


def _compare_line(a: Dict[str, Any], b: Dict[str, Any]) -> str:
    keys = [("format_rate", "format"), ("accuracy", "accuracy"), ("lenient_accuracy", "lenient accuracy")]
    return ", ".join(f"{name} {a[k]:.3f} -> {b[k]:.3f}" for k, name in keys) + f" ({b['n']} prompts)"
