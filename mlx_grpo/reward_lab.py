"""The rewards lab (``python cli.py reward``): score completions without training and show how each
reward judges them, before paying for a run.

Input: a JSONL file, one completion per line: ``{"completion": ..., "prompt": ..., "answer": ...,
...}`` (``prompt`` optional; every other field is a column for the rewards), or completions
sampled here from a model on a task's training prompts. Output: per reward its mean, std, min and
max over the rows where it applies, the share of rows where it is non-zero and where it is None
(not applicable), the weighted total, the Pearson correlation between rewards, the worst and best
rows by total and, when rows carry a ``group`` column (sampled groups), the share of groups whose
totals are all equal (rows GRPO learns nothing from).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import numpy as np

from .config import Config, ConfigError, reward_weight_problem
from .errors import printable
from .rewards import Rewards, configured_rewards, score
from .rewards.answers import full_verdicts
from .rundir import atomic_write
from .tasks import DataError, iter_jsonl

# Keys a previous `reward --out` added; they are results, not columns, when a scores file is re-read.
RESULT_KEYS = ("rewards", "total")


@dataclass
class Completions:
    """Rows to score: prompts, completions, the other columns, and the rows as read (for --out)."""

    prompts: List[str]
    completions: List[str]
    columns: Dict[str, List[Any]]
    records: List[Dict[str, Any]]


def from_records(records: List[Dict[str, Any]]) -> Completions:
    """Column view of records that each hold a string ``completion`` (and maybe ``prompt``)."""
    keys = sorted({k for r in records for k in r if k not in ("prompt", "completion", *RESULT_KEYS)})
    return Completions(
        prompts=[str(r.get("prompt") or "") for r in records],
        completions=[r["completion"] for r in records],
        columns={k: [r.get(k) for r in records] for k in keys},
        records=records,
    )


def read_completions(path: str) -> Completions:
    """The completions of a JSONL file; a bad line is a DataError naming file:line."""
    records = []
    for n, obj in iter_jsonl(path):
        if "completion" not in obj:
            raise DataError(f"{path}:{n}: missing field 'completion'")
        if not isinstance(obj["completion"], str):
            raise DataError(
                f"{path}:{n}: field 'completion' must be a string, got {type(obj['completion']).__name__}"
            )
        records.append(obj)
    if not records:
        raise DataError(f"{path}: no completions (empty file)")
    return from_records(records)


def sample_completions(
    cfg: Config, adapter: Optional[str], n_prompts: int, group_size: int = 1, chunk: int = 64
) -> Completions:
    """``group_size`` completions for each of the first ``n_prompts`` training prompts of the task,
    sampled as in training (the rollout settings, the prompt template); the completion includes
    the template's response prefix, as the rewards see it in training. Before any decoding, every
    prompt must fit the model's context and ``chunk`` groups decoded at once must fit in memory
    (as ``eval`` checks them: ``preflight``)."""
    from .evaluate import rows_at_once, sample_responses
    from .policy import load_policy
    from .preflight import check_decode_memory, check_rows
    from .tasks import load_task

    data = load_task(cfg.data)
    rows = data.train[:n_prompts]
    p = load_policy(cfg, adapter_dir=adapter, training=False)
    longest = check_rows(p.tokenizer, p.model, p.prompter, cfg, rows, "train", len(data.train),
                         cfg.rollout.max_tokens, "rollout.max_tokens")
    check_decode_memory(p.model, rows_at_once(len(rows), group_size, chunk * group_size), longest,
                        cfg.rollout.max_tokens, "--group-size" if group_size > 1 else "--max-tokens",
                        "lower --group-size, --samples or --max-tokens")
    got = sample_responses(p, rows, cfg.rollout, group_size, batch_size=chunk * group_size)
    records: List[Dict[str, Any]] = []
    for i, (prompt, text, ids) in enumerate(zip(got.prompts, got.texts, got.ids)):
        other = {k: v for k, v in rows[i // group_size].items() if k != "prompt"}
        records.append({"prompt": prompt, "completion": text, **other, "completion_ids": ids,
                        "group": i // group_size})
    return from_records(records)


# ------------------------------------------------------------------------------- statistics


def _num(x: float) -> Optional[float]:
    """A float for JSON: NaN and inf become None."""
    return float(x) if math.isfinite(x) else None


def column_stats(values: np.ndarray, weight: Optional[float] = None) -> Dict[str, Any]:
    """mean/std/min/max over the applicable (non-NaN) values; nonzero and none as shares of all rows."""
    n = len(values)
    ok = ~np.isnan(values)
    v = values[ok]
    out: Dict[str, Any] = {} if weight is None else {"weight": weight}
    out.update({
        "n": int(ok.sum()),
        "mean": _num(v.mean()) if v.size else None,
        "std": _num(v.std()) if v.size else None,
        "min": _num(v.min()) if v.size else None,
        "max": _num(v.max()) if v.size else None,
        "nonzero": float(np.count_nonzero(v)) / n if n else None,
        "none": float((~ok).sum()) / n if n else None,
    })
    return out


def correlation(a: np.ndarray, b: np.ndarray) -> Optional[float]:
    """Pearson correlation over the rows where both apply; None with fewer than 2 such rows or
    when either is constant there."""
    ok = ~np.isnan(a) & ~np.isnan(b)
    x, y = a[ok], b[ok]
    if x.size < 2 or x.std() == 0 or y.std() == 0:
        return None
    return _num(float(np.corrcoef(x, y)[0, 1]))


def _example(i: int, rw: Rewards, data: Completions) -> Dict[str, Any]:
    ex: Dict[str, Any] = {
        "index": i,
        "total": _num(rw.total[i]),
        "rewards": {k: _num(v[i]) for k, v in rw.columns.items()},
        "completion": data.completions[i],
    }
    if "answer" in data.columns:
        ex["answer"] = data.columns["answer"][i]
    return ex


def summarize(rw: Rewards, weights: Mapping[str, float], data: Completions, top: int = 3) -> Dict[str, Any]:
    """The lab's report as one JSON-ready dict: n, rewards, total, correlation, worst, best (and
    groups when rows carry a ``group`` column)."""
    names = list(rw.columns)
    worst = np.argsort(rw.total, kind="stable")  # ties: the earlier row first
    best = np.argsort(-rw.total, kind="stable")
    k = min(top, len(worst))
    out: Dict[str, Any] = {
        "n": int(rw.total.size),
        "rewards": {name: column_stats(rw.columns[name], weights.get(name, 1.0)) for name in names},
        "total": column_stats(rw.total),
        "correlation": {a: {b: correlation(rw.columns[a], rw.columns[b]) for b in names} for a in names},
        "worst": [_example(int(i), rw, data) for i in worst[:k]],
        "best": [_example(int(i), rw, data) for i in best[:k]],
    }
    groups = data.columns.get("group")
    if groups is not None and all(g is not None for g in groups):
        by_group: Dict[Any, List[float]] = {}
        for g, t in zip(groups, rw.total.tolist()):
            by_group.setdefault(json.dumps(g), []).append(t)
        flat = [max(v) == min(v) for v in by_group.values()]
        out["groups"] = {"count": len(flat), "zero_std": sum(flat) / len(flat)}
    return out


def write_scores(path: str, data: Completions, rw: Rewards) -> None:
    """Each input row with its ``rewards`` (None where not applicable) and ``total``, as JSONL;
    written by ``rundir.atomic_write``, so a failure leaves no half-written file behind and a FIFO,
    a device or a symbolic link is written through, never replaced by a regular file."""

    def write(p: Path) -> None:
        with open(p, "w", encoding="utf-8") as f:
            for i, record in enumerate(data.records):
                scores = {k: _num(v[i]) for k, v in rw.columns.items()}
                f.write(json.dumps({**record, "rewards": scores, "total": _num(rw.total[i])}) + "\n")

    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(Path(path), write)
    except OSError as e:
        raise DataError(f"{path}: cannot write scores ({e.strerror or e})") from None


def run(
    cfg: Config,
    weights: Mapping[str, float],
    completions_path: Optional[str] = None,
    samples: Optional[int] = None,
    adapter: Optional[str] = None,
    group_size: int = 1,
    out: Optional[str] = None,
    top: int = 3,
) -> Dict[str, Any]:
    """Score a file of completions (or ``samples`` prompts' worth sampled from ``cfg.model``) with
    the rewards named in ``weights``; write ``out`` if given; return the summary."""
    cfg = dataclasses.replace(cfg, rewards=dict(weights))  # the lab's rewards, the config's settings
    fns = configured_rewards(cfg)  # a bad name fails before any model loads
    if completions_path:
        data = read_completions(completions_path)
    else:
        data = sample_completions(cfg, adapter, int(samples or 0), group_size)
    # What each reward pays, decided: not what a training step would have had within its bounded
    # wait for math-verify (answers.MATH_VERIFY_WAIT_S), which depends on the machine's speed.
    with full_verdicts():
        rw = score(data.prompts, data.completions, data.columns, fns, weights)
    if out:
        write_scores(out, data, rw)
    return summarize(rw, weights, data, top)


# ------------------------------------------------------------------------------- text report


def _fmt(x: Optional[float], width: int = 7) -> str:
    return f"{'-':>{width}}" if x is None else f"{x:>{width}.3f}"


def _clip(text: str, limit: int = 100) -> str:
    """``text`` on one line for the report, escaped (a completion may hold terminal escapes or lone
    surrogates: printed raw, they reach the terminal or fail to encode), cut to ``limit``."""
    text = printable(" ".join(str(text).split()))
    return text if len(text) <= limit else text[: limit - 3] + "..."


def format_report(summary: Dict[str, Any]) -> str:
    """The summary as a table for a terminal."""
    names = list(summary["rewards"])
    width = max([len(n) for n in names] + [6])
    head = f"{'reward':<{width}}  {'weight':>6} {'mean':>7} {'std':>7} {'min':>7} {'max':>7} {'nonzero':>7} {'none':>7}"
    lines = [f"{summary['n']} completions", head]
    for name, s in [*summary["rewards"].items(), ("total", summary["total"])]:
        weight = f"{s['weight']:>6.2f}" if "weight" in s else " " * 6
        lines.append(
            f"{name:<{width}}  {weight} {_fmt(s['mean'])} {_fmt(s['std'])} {_fmt(s['min'])} "
            f"{_fmt(s['max'])} {_fmt(s['nonzero'])} {_fmt(s['none'])}"
        )
    if len(names) > 1:
        lines += ["", "correlation (Pearson, rows where both apply; - : constant or too few rows)"]
        lines.append(" " * width + "".join(f" {n[:9]:>9}" for n in names))
        for a in names:
            lines.append(f"{a:<{width}}" + "".join(f" {_fmt(summary['correlation'][a][b], 9)}" for b in names))
    if "groups" in summary:
        g = summary["groups"]
        lines += ["", f"groups: {g['count']}, with all totals equal (no GRPO signal): {g['zero_std']:.3f}"]
    for title in ("worst", "best"):
        lines += ["", f"{title} by total:"]
        for ex in summary[title]:
            parts = " ".join(f"{k}={'-' if v is None else f'{v:g}'}" for k, v in ex["rewards"].items())
            answer = f" answer={_clip(ex['answer'], 20)}" if "answer" in ex else ""
            lines.append(f"  #{ex['index']} total={ex['total']:g} {parts}{answer} | {_clip(ex['completion'])}")
    return "\n".join(lines)


def parse_reward_list(text: str, configured: Mapping[str, float]) -> Dict[str, float]:
    """``accuracy,format=0.5,my.py:fn`` -> {name: weight}; a name without a weight keeps its
    configured weight, else 1.0."""
    out: Dict[str, float] = {}
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        name, weight = item, configured.get(item, 1.0)
        if "=" in item:
            name, raw = (s.strip() for s in item.rsplit("=", 1))
            try:
                weight = float(raw)
            except ValueError:
                raise ConfigError(f"--rewards: bad weight {raw!r} in {item!r} (expected name=number)") from None
            why = reward_weight_problem(weight)  # the config's own check (nan made every total nan)
            if why:
                raise ConfigError(f"--rewards: weight {raw!r} in {item!r} {why}")
        out[name] = weight
    if not out:
        raise ConfigError(f"--rewards: no reward named in {text!r}" + (" (an unset shell variable?)" if not text.strip() else ""))
    return out
