"""The GRPO training loop: the seed's four steps, in order, once per step.

    rollouts   = sample_groups(...)        # 1. G completions per prompt
    rewards    = score(...)                # 2. rule-based rewards
    advantages = group_advantages(...)     # 3. group-relative
    update(...)                            # 4. clipped surrogate + KL, num_iterations times

Everything else here is bookkeeping: the run directory, metrics, progress and checkpoints.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map

from . import __version__
from .advantages import group_advantages
from .config import Config, TrainConfig, save_config
from .evaluate import evaluate_held_out
from .loss import Normalizer, grpo_loss
from .models import (
    adapters_disabled,
    attach_adapters,
    enable_grad_checkpoint,
    load_model,
    save_adapters,
)
from .rewards import load_rewards, score, settings_for
from .rollout import Rollouts, sample_groups
from .scoring import completion_logprobs
from .tasks import columns, load_task
from .tasks.templates import PromptFormat, prompt_format, render_prompt


class RunDirError(ValueError):
    """The output directory cannot be used (it already holds a run)."""


def prepare_run_dir(out: Path, overwrite: bool) -> None:
    """Refuse to write into a directory that already holds a run, unless told to overwrite."""
    if (out / "metrics.jsonl").exists() and not overwrite:
        raise RunDirError(
            f"output.dir: {out} already holds a run; pass --overwrite or choose another --output"
        )
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for name in ("metrics.jsonl", "samples.jsonl", "summary.json"):
            (out / name).unlink(missing_ok=True)


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


def prompt_batches(rows: Sequence[Dict], size: int, seed: int) -> Iterator[List[Dict]]:
    """Endless batches of rows: a fresh seeded shuffle each epoch, never a row twice per epoch."""
    rng = np.random.default_rng(seed)
    order: List[int] = []
    while True:
        batch = []
        while len(batch) < size:
            if not order:
                order = rng.permutation(len(rows)).tolist()
            batch.append(rows[order.pop()])
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
            model, self.prompts, self.left_padding, self.tokens, temperature, self.row_prompt, chunk
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


def logprobs_of(model: nn.Module, b: StepBatch, temperature: float, micro: int) -> mx.array:
    return mx.stop_gradient(b.logprobs(model, temperature, chunk=micro))


def update(
    model: nn.Module,
    opt: optim.Optimizer,
    batch: StepBatch,
    cfg: Config,
) -> Dict[str, float]:
    """One optimizer update on ``batch``, accumulated over micro-batches; returns loss and stats."""
    n = batch.tokens.shape[0]
    n_micro = min(cfg.train.grad_accumulation_steps, n)
    size = math.ceil(n / n_micro)
    norm = Normalizer(float(n), float(batch.mask.sum().item()), cfg.rollout.max_tokens, n_micro)
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
        w = mb.tokens.shape[0] / n
        for k, v in stats.items():
            stats_sum[k] = stats_sum.get(k, 0.0) + w * v.item()
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
) -> Dict[str, Any]:
    """One GRPO step on ``rows``; returns the step's metrics (and samples under "_samples")."""
    G = cfg.rollout.group_size
    temperature = cfg.rollout.temperature
    micro = math.ceil(len(rows) * G / cfg.train.grad_accumulation_steps)
    t0 = time.perf_counter()

    # 1. Rollouts from the current policy.
    model.eval()
    prompts = [render_prompt(r["prompt"], fmt, tokenizer) for r in rows]
    ro = sample_groups(model, tokenizer, prompts, cfg.rollout)
    t1 = time.perf_counter()

    # 2. Rewards on the whole response (the template's response prefix + the completion).
    responses = [fmt.response_prefix + t for t in ro.texts]
    row_of = [r for r in rows for _ in range(G)]
    ids = [t[:n] for t, n in zip(ro.tokens.tolist(), ro.lengths.tolist())]  # TRL's completion_ids
    cols = {**columns(row_of), "completion_ids": ids}
    rw = score([p for p in prompts for _ in range(G)], responses, cols, reward_fns, cfg.rewards)
    t2 = time.perf_counter()

    # 3. Group-relative advantages.
    adv = group_advantages(rw.total, G, cfg.grpo.scale_rewards)
    keep = np.flatnonzero(adv != 0) if cfg.grpo.skip_zero_advantage else np.arange(adv.size)

    # 4. Reference and old-policy logprobs, then num_iterations clipped updates.
    upd: Dict[str, float] = {}
    t3 = t4 = time.perf_counter()
    if keep.size:
        batch = select_rows(ro, adv, keep)
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
        per_iter = [update(model, opt, batch, cfg) for _ in range(cfg.grpo.num_iterations)]
        model.eval()
        upd = {k: float(np.mean([p[k] for p in per_iter])) for k in per_iter[0]}
        upd["skipped"] = float(sum(p["skipped"] for p in per_iter))
        t4 = time.perf_counter()

    lengths = ro.lengths
    n_tokens = int(lengths.sum())
    step_time = t4 - t0
    groups = rw.total.reshape(-1, G)
    metrics: Dict[str, Any] = {
        "loss": upd.get("loss", 0.0),
        "reward_mean": float(rw.total.mean()),
        "reward_std": float(rw.total.std()),
        **{f"rewards/{k}": v for k, v in rw.means().items()},
        "kl": upd.get("kl", 0.0),
        "clip_fraction": upd.get("clip_fraction", 0.0),
        "clip_low": upd.get("clip_low", 0.0),
        "clip_high": upd.get("clip_high", 0.0),
        "ratio_mean": upd.get("ratio_mean", 1.0),
        "grad_norm": upd.get("grad_norm", 0.0),
        "skipped_updates": upd.get("skipped", 0.0),
        "completion_length": float(lengths.mean()),
        "truncated_rate": float(np.mean(ro.truncated)),
        "zero_std_groups": float(np.mean(groups.max(axis=1) == groups.min(axis=1))),
        "rows_updated": int(keep.size),
        "tokens": n_tokens,
        "tokens_per_sec": n_tokens / max(t1 - t0, 1e-9),
        "step_time": step_time,
        "time_generate": t1 - t0,
        "time_reward": t2 - t1,
        "time_score": t3 - t2,
        "time_update": t4 - t3,
        "peak_memory_gb": mx.get_peak_memory() / 1e9,
    }
    metrics["_samples"] = [
        {"prompt": rows[i // G]["prompt"], "completion": ro.texts[i], "reward": float(rw.total[i]),
         "advantage": float(adv[i])}
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


def train(cfg: Config, say: Callable[[str], None] = print) -> Dict[str, Any]:
    """Run GRPO as configured; returns the summary (also written to the run directory)."""
    out = Path(cfg.output.dir)
    reward_fns = load_rewards(list(cfg.rewards), settings_for(cfg))  # fail before loading a model
    data = load_task(cfg.data)
    prepare_run_dir(out, cfg.output.overwrite)

    model, tokenizer = load_model(cfg.model)
    ref_model = None
    if cfg.model.reference:
        ref_model, _ = load_model(cfg.model, cfg.model.reference)
        ref_model.freeze()
    # Seed after loading: building a model draws random initial weights before loading its own,
    # so the adapters' initialisation and the rollouts don't depend on what else was loaded.
    mx.random.seed(cfg.train.seed)
    attach_adapters(model, cfg.adapter)
    if cfg.train.grad_checkpoint:
        enable_grad_checkpoint(model)
    n_train = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    n_total = sum(v.size for _, v in tree_flatten(model.parameters()))
    say(
        f"mlx-grpo {__version__} | model {cfg.model.path} | {cfg.adapter.type}: "
        f"{n_train / 1e6:.3f}M of {n_total / 1e6:.2f}M parameters trainable | "
        f"{len(data.train)} train / {len(data.held_out)} held-out prompts | device {mx.default_device()}"
    )
    fmt = prompt_format(cfg.prompt)
    total_updates = cfg.train.steps * cfg.grpo.num_iterations
    opt = optim.AdamW(
        learning_rate=make_schedule(cfg.train, total_updates), weight_decay=cfg.train.weight_decay
    )
    save_config(cfg, out / "config.yaml")
    metrics_path, samples_path = out / "metrics.jsonl", out / "samples.jsonl"

    eval_rows = data.held_out[: cfg.output.eval_size] if cfg.output.eval_size else data.held_out

    def run_eval(step: int) -> Optional[Dict[str, Any]]:
        if not eval_rows:
            return None
        t = time.perf_counter()
        res = evaluate_held_out(model, tokenizer, eval_rows, cfg)
        res["time"] = time.perf_counter() - t
        _append_jsonl(metrics_path, {"step": step, "kind": "eval", **res})
        return res

    start = time.perf_counter()
    first_eval = run_eval(0)
    if first_eval:
        say(f"held-out at step 0: {_eval_line(first_eval)}")
    batches = prompt_batches(data.train, cfg.train.prompts_per_step, cfg.train.seed)
    bar = _progress(cfg.train.steps, cfg.output.progress)
    first_reward = last_reward = None
    last_eval = first_eval
    for step in range(1, cfg.train.steps + 1):
        m = grpo_step(model, tokenizer, opt, next(batches), cfg, fmt, reward_fns, ref_model)
        samples = m.pop("_samples")
        m["learning_rate"] = float(opt.learning_rate.item())
        _append_jsonl(metrics_path, {"step": step, "kind": "train", **m})
        for s in samples:
            _append_jsonl(samples_path, {"step": step, **s})
        first_reward = m["reward_mean"] if first_reward is None else first_reward
        last_reward = m["reward_mean"]
        if cfg.output.save_every and step % cfg.output.save_every == 0 and step < cfg.train.steps:
            save_adapters(model, out / "checkpoints" / f"step_{step:06d}", cfg.adapter, cfg.model.path)
            save_adapters(model, out, cfg.adapter, cfg.model.path)
        if cfg.output.eval_every and step % cfg.output.eval_every == 0 and step < cfg.train.steps:
            last_eval = run_eval(step)
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(
                f"reward {m['reward_mean']:.3f} kl {m['kl']:.4f} len {m['completion_length']:.1f} "
                f"{m['tokens_per_sec']:.0f} tok/s"
            )
    if bar is not None:
        bar.close()
    save_adapters(model, out, cfg.adapter, cfg.model.path)
    if cfg.train.steps:
        last_eval = run_eval(cfg.train.steps)
    summary = {
        "steps": cfg.train.steps,
        "seconds": time.perf_counter() - start,
        "reward_first": first_reward,
        "reward_last": last_reward,
        "eval_start": first_eval,
        "eval_end": last_eval,
        "adapters": str(out / "adapters.safetensors"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if first_eval and last_eval:
        say("held-out, before -> after: " + _compare_line(first_eval, last_eval))
    say(f"adapters saved in {out} (load with: mlx_lm.generate --model {cfg.model.path} --adapter-path {out})")
    return summary


def _eval_line(e: Dict[str, Any]) -> str:
    return (
        f"format {e['format_rate']:.3f}, accuracy {e['accuracy']:.3f}, "
        f"lenient accuracy {e['lenient_accuracy']:.3f} on {e['n']} prompts"
    )


def _compare_line(a: Dict[str, Any], b: Dict[str, Any]) -> str:
    keys = [("format_rate", "format"), ("accuracy", "accuracy"), ("lenient_accuracy", "lenient accuracy")]
    return ", ".join(f"{name} {a[k]:.3f} -> {b[k]:.3f}" for k, name in keys) + f" ({b['n']} prompts)"
