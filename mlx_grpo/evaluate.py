"""Held-out evaluation: greedy completions scored for strict accuracy, lenient accuracy and format.

strict accuracy: the completion has the strict layout and the value inside <answer> equals the
reference; lenient accuracy: the last number anywhere in the completion equals the reference;
format rate: the share with the strict layout.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, List, Mapping, Optional, Sequence

import mlx.nn as nn
import numpy as np

from .config import Config, RolloutConfig
from .rewards.answers import answers_match, extract_answer, last_number
from .rewards.countdown import countdown_correct
from .rewards.format import is_strict_format
from .rollout import sample_groups
from .tasks.templates import PromptFormat, prompt_format, render_prompt


def judge(response: str, reference: Any, row: Optional[Mapping[str, Any]] = None) -> Dict[str, bool]:
    """Format, strict and lenient correctness of one full response (prefix + completion).

    A countdown row (with ``numbers`` and ``target``) is correct when its <answer> is a valid
    equation; lenient then means "correct whatever the layout around it".
    """
    fmt = is_strict_format(response)
    if row is not None and row.get("numbers") is not None and row.get("target") is not None:
        ok = countdown_correct(extract_answer(response), row["numbers"], row["target"])
        return {"format": fmt, "strict": fmt and ok, "lenient": ok}
    return {
        "format": fmt,
        "strict": fmt and answers_match(extract_answer(response), reference),
        "lenient": answers_match(last_number(response), reference),
    }


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    rows: Sequence[Dict[str, Any]],
    fmt: PromptFormat,
    rollout: RolloutConfig,
    max_tokens: int,
    batch_size: int = 128,
) -> Dict[str, Any]:
    """Greedy-decode every row and return rates (n, accuracy, lenient_accuracy, format_rate...)."""
    cfg = dataclasses.replace(rollout, max_tokens=max_tokens)
    verdicts: List[Dict[str, bool]] = []
    lengths: List[int] = []
    truncated: List[bool] = []
    was_training = model.training
    model.eval()
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prompts = [render_prompt(r["prompt"], fmt, tokenizer) for r in chunk]
        ro = sample_groups(model, tokenizer, prompts, cfg, group_size=1, temperature=0.0)
        for r, text in zip(chunk, ro.texts):
            verdicts.append(judge(fmt.response_prefix + text, r.get("answer"), r))
        lengths.extend(ro.lengths.tolist())
        truncated.extend(ro.truncated)
    if was_training:
        model.train()
    rate = lambda k: float(np.mean([v[k] for v in verdicts])) if verdicts else float("nan")  # noqa: E731
    return {
        "n": len(verdicts),
        "accuracy": rate("strict"),
        "lenient_accuracy": rate("lenient"),
        "format_rate": rate("format"),
        "mean_length": float(np.mean(lengths)) if lengths else float("nan"),
        "truncated_rate": float(np.mean(truncated)) if truncated else float("nan"),
    }


def evaluate_held_out(
    model: nn.Module, tokenizer: Any, rows: Sequence[Dict[str, Any]], cfg: Config
) -> Dict[str, Any]:
    """``evaluate`` with the run's prompt format, sampling settings and evaluation length."""
    tokens = cfg.output.eval_max_tokens or cfg.rollout.max_tokens
    return evaluate(model, tokenizer, rows, prompt_format(cfg.prompt), cfg.rollout, tokens)


def evaluate_config(
    cfg: Config, adapter_dir: str | None = None, limit: int | None = None, compare_base: bool = False
) -> Dict[str, Dict[str, Any]]:
    """Evaluate the configured model (with ``adapter_dir`` attached) on the task's held-out rows.

    Returns {"adapter" or "model": results} and, with ``compare_base``, "base" too.
    """
    from .models import adapters_disabled, load_adapters, load_model
    from .tasks import load_task

    rows = load_task(cfg.data).held_out
    rows = rows[:limit] if limit else rows
    model, tokenizer = load_model(cfg.model)
    if adapter_dir:
        load_adapters(model, adapter_dir)
    run = lambda: evaluate_held_out(model, tokenizer, rows, cfg)  # noqa: E731
    out = {"adapter" if adapter_dir else "model": run()}
    if compare_base and adapter_dir:
        with adapters_disabled(model):
            out["base"] = run()
    return out
