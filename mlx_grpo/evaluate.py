"""Held-out evaluation: greedy accuracy, pass@k from samples, format, rewards and length.

strict accuracy: the completion has the strict layout and the value inside <answer> equals the
reference; lenient accuracy: the last number anywhere in the completion equals the reference;
format rate: the share with the strict layout; pass@k: the unbiased estimator of Chen et al. (2021)
over K sampled completions per prompt, judged strictly (``pass_at_*``) and leniently
(``lenient_pass_at_*``: what the model can find when sampled, whatever the layout; the headroom
that reinforcement learning can turn into greedy accuracy).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from math import comb
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from .config import Config, RolloutConfig
from .models import adapters_disabled
from .policy import Policy, load_policy
from .preflight import check_decode_memory, check_rows
from .rewards import score
from .rewards.answers import full_verdicts, prepare_math_verify
from .rollout import sample_groups
from .tasks import TASKS, columns, load_task
from .tasks.judges import Judge, judge_answer

# The figures `eval --compare-base` and the run reports put side by side, in display order.
HEADLINE = [
    ("accuracy", "accuracy"),
    ("lenient_accuracy", "lenient"),
    ("format_rate", "format"),
    ("reward_mean", "reward"),
    ("mean_length", "length"),
    ("truncated_rate", "truncated"),
]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def pass_rates(correct: Sequence[bool], samples: int) -> Dict[str, float]:
    """Mean pass@1 and pass@K over prompts from row-major verdicts, ``samples`` per prompt."""
    c = np.asarray(correct, dtype=bool).reshape(-1, samples).sum(axis=1)
    return {
        "pass_at_1": _mean([pass_at_k(samples, int(ci), 1) for ci in c]),
        "pass_at_k": _mean([pass_at_k(samples, int(ci), samples) for ci in c]),
    }


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


@dataclass
class Responses:
    """Sampled responses for rows, ``group_size`` per row, row-major: texts (response prefix +
    completion, as rewards see them), the rendered prompts, completion token ids and cut flags."""

    texts: List[str]
    prompts: List[str]
    ids: List[List[int]]
    truncated: List[bool]

    @property
    def lengths(self) -> List[int]:
        return [len(i) for i in self.ids]


BATCH_SIZE = 128  # completions decoded at once by an evaluation (at least one prompt's group)


def prompts_per_batch(group_size: int, batch_size: int = BATCH_SIZE) -> int:
    """Prompts decoded together: as many groups as fit in ``batch_size`` completions, at least one."""
    return max(1, batch_size // group_size)


def rows_at_once(n_prompts: int, group_size: int, batch_size: int = BATCH_SIZE) -> int:
    """The most completions ``sample_responses`` decodes at once for ``n_prompts`` prompts: one
    group is never split, so ``group_size`` alone may exceed ``batch_size``."""
    return min(n_prompts, prompts_per_batch(group_size, batch_size)) * group_size


def sample_responses(
    policy: Policy, rows: Sequence[Dict[str, Any]], rollout: RolloutConfig, group_size: int = 1,
    temperature: Optional[float] = None, batch_size: int = BATCH_SIZE,
) -> Responses:
    """Decode every row through the rollout engine with the policy's model and prompt template,
    ``batch_size`` completions at a time."""
    out = Responses([], [], [], [])
    per_batch = prompts_per_batch(group_size, batch_size)
    for start in range(0, len(rows), per_batch):
        prompts = policy.prompter.prompts(rows[start : start + per_batch])
        ro = sample_groups(policy.model, policy.tokenizer, prompts, rollout, group_size=group_size,
                           temperature=temperature)
        out.texts += policy.prompter.responses(ro.texts)
        out.prompts += [p for p in prompts for _ in range(group_size)]
        out.ids += ro.completion_ids()
        out.truncated += list(ro.truncated)
    return out


def evaluate(
    policy: Policy,
    rows: Sequence[Dict[str, Any]],
    rollout: RolloutConfig,
    max_tokens: int,
    batch_size: int = BATCH_SIZE,
    samples: int = 0,
    temperature: Optional[float] = None,
    rewards: Optional[Mapping[str, float]] = None,
    judge: Judge = judge_answer,
) -> Dict[str, Any]:
    """Greedy-decode every row with the policy; with ``samples`` K >= 1 also sample K per row for
    pass@1/pass@K. ``rewards``: each reward's weight (the policy's reward functions score the
    greedy completions; None: no reward figures). ``judge``: the task's (``tasks.judges``), by
    default the reference ``answer`` column's.

    Returns n, accuracy, lenient_accuracy, format_rate, reward_mean and rewards/<name> (the
    configured rewards on the greedy completions), mean_length, truncated_rate and, with samples,
    k, sample_temperature, pass_at_1 and pass_at_k (strict) and lenient_pass_at_1 and
    lenient_pass_at_k.
    """
    cfg = dataclasses.replace(rollout, max_tokens=max_tokens)
    model = policy.model
    was_training = model.training
    model.eval()
    try:
        with full_verdicts():  # figures that do not depend on what the parser saw before
            greedy = sample_responses(policy, rows, cfg, 1, 0.0, batch_size)
            verdicts = [judge(t, r) for t, r in zip(greedy.texts, rows)]
            out: Dict[str, Any] = {
                "n": len(verdicts),
                "accuracy": _mean([v["strict"] for v in verdicts]),
                "lenient_accuracy": _mean([v["lenient"] for v in verdicts]),
                "format_rate": _mean([v["format"] for v in verdicts]),
                "mean_length": _mean(greedy.lengths),
                "truncated_rate": _mean(greedy.truncated),
            }
            if rewards and rows:
                cols = {**columns(list(rows)), "completion_ids": greedy.ids}
                rw = score(greedy.prompts, greedy.texts, cols, policy.reward_fns, rewards)
                out["reward_mean"] = float(rw.total.mean())
                out.update({f"rewards/{k}": v for k, v in rw.means().items()})
            if samples and rows:
                temp = rollout.temperature if temperature is None else temperature
                s_texts = sample_responses(policy, rows, cfg, samples, temp, batch_size).texts
                sampled = [judge(t, rows[i // samples]) for i, t in enumerate(s_texts)]
                out["k"] = samples
                out["sample_temperature"] = temp
                for prefix, kind in (("", "strict"), ("lenient_", "lenient")):
                    correct = [v[kind] for v in sampled]
                    out.update({prefix + k: v for k, v in pass_rates(correct, samples).items()})
    finally:
        if was_training:
            model.train()
    return out


def evaluate_held_out(
    policy: Policy,
    rows: Sequence[Dict[str, Any]],
    cfg: Config,
    samples: int = 0,
    temperature: Optional[float] = None,
) -> Dict[str, Any]:
    """``evaluate`` of the run's policy (its prompt template and reward functions) with the run's
    sampling settings, reward weights, task judge and evaluation length."""
    tokens = cfg.output.eval_max_tokens or cfg.rollout.max_tokens
    return evaluate(
        policy, rows, cfg.rollout, tokens, samples=samples, temperature=temperature,
        rewards=cfg.rewards, judge=TASKS[cfg.data.task].judge,
    )


def evaluate_config(
    cfg: Config,
    adapter_dir: str | None = None,
    limit: int | None = None,
    compare_base: bool = False,
    samples: int = 0,
    temperature: Optional[float] = None,
) -> Dict[str, Dict[str, Any]]:
    """Evaluate the configured model (with ``adapter_dir`` attached) on the task's held-out rows.

    Before any decoding, every prompt evaluated must fit the model's context with the evaluation's
    tokens (``preflight.check_rows``: a ``DataError`` naming the row) and the largest batch decoded
    at once must fit in memory (``preflight.check_decode_memory``: ``-k 200000`` decodes 200000
    completions of one prompt together). Returns {"adapter" or "model": results} and, with
    ``compare_base``, "base" too.
    """
    data = load_task(cfg.data)
    rows = data.held_out[:limit] if limit else data.held_out
    p = load_policy(cfg, adapter_dir=adapter_dir, training=False)
    tokens = cfg.output.eval_max_tokens or cfg.rollout.max_tokens
    longest = check_rows(p.tokenizer, p.model, p.prompter, cfg, rows, "held-out", len(data.train), tokens,
                         "output.eval_max_tokens")
    greedy, sampled = rows_at_once(len(rows), 1), rows_at_once(len(rows), samples) if samples else 0
    option = "--samples" if sampled > greedy else "--max-tokens"
    check_decode_memory(p.model, max(greedy, sampled), longest, tokens, option,
                        "lower --samples or --max-tokens" if samples else "lower --max-tokens")
    prepare_math_verify(r.get("answer") for r in rows)  # before the first answer is judged
    run = lambda: evaluate_held_out(p, rows, cfg, samples, temperature)  # noqa: E731
    out = {"adapter" if adapter_dir else "model": run()}
    if compare_base and adapter_dir:
        with adapters_disabled(p.model):
            out["base"] = run()
    return out


def comparison_rows(a: Dict[str, Any], b: Dict[str, Any]) -> List[tuple]:
    """(label, a, b, b - a) for each headline figure present in both results."""
    sampled = [("pass_at_1", "pass@1"), ("pass_at_k", f"pass@{a.get('k')}"),
               ("lenient_pass_at_1", "len.pass@1"), ("lenient_pass_at_k", f"len.pass@{a.get('k')}")]
    keys = HEADLINE + (sampled if "k" in a else [])
    return [(label, a[k], b[k], b[k] - a[k]) for k, label in keys if k in a and k in b]
