"""``cli.py bench --shape NAME``: a GRPO step at a release's real shape, measured.

On one model (``shapes.py``: a release's exact configuration with random weights, 4-bit by
default, or any local/Hub model) and P prompts x G completions of ``max_tokens`` tokens (random
weights rarely emit EOS, so every completion runs to the limit: the worst case memory planning
needs), it reports:
- rollout tokens/s of our engine against mlx-lm's ``batch_generate`` at the same rows;
- decode time per token at the start and at the end of our rollout (flat, or growing with the
  cache?);
- a GRPO step's split (generate / reward / score / update), with beta > 0 and beta = 0;
- each step's peak memory measured two ways, ``mx.get_peak_memory`` and the process's own
  footprint (peak resident set on Linux, reset before the step; Metal's active + cache memory on
  a Mac), next to the preflight estimate for the same step;
- how far each stage of each step is from this machine's limits (memory bandwidth and matmul
  throughput, measured once: ``limits.py``; the step's work at them: ``bounds.py``).
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import mlx.core as mx
from mlx.utils import tree_flatten

from . import blas, decode
from .bench import BenchSettings, Session, bench_config, engines, engines_line
from .bounds import bound_lines, bounds_report, limits_line
from .float_base import device_kind
from .limits import measure_limits
from .preflight import estimate_memory, estimate_total
from .rollout import encode_prompt
from .shapes import SHAPES, shape_dir

GB = 1e9


def process_peak_reset() -> None:
    """Start a new peak of the process's footprint (Linux: clear the resident-set high-water mark)."""
    if sys.platform.startswith("linux"):
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def process_peak() -> Optional[float]:
    """The process's memory footprint peak since ``process_peak_reset``, bytes: VmHWM on a Linux
    CPU; on a GPU (Metal, CUDA), where the step's arrays live outside the resident set, MLX's
    active + cache memory now (the cache keeps the step's freed buffers)."""
    if sys.platform.startswith("linux") and device_kind() == "cpu":
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1]) * 1024
        return None
    return float(mx.get_active_memory() + mx.get_cache_memory())


@contextlib.contextmanager
def decode_clock(times: List[float]) -> Iterator[None]:
    """Record the time of every decode step of rollouts run inside the block: the gap between two
    calls is one token's full cost (the step, sampling and the bookkeeping that waits for it)."""
    originals = {cls: cls.step for cls in (decode.StaticDecoder, decode.EagerDecoder)}

    def timed(original: Callable) -> Callable:
        def step(self, y):
            times.append(time.perf_counter())
            return original(self, y)
        return step

    for cls, original in originals.items():
        cls.step = timed(original)
    try:
        yield
    finally:
        for cls, original in originals.items():
            cls.step = original


def per_token(times: List[float]) -> Dict[str, float]:
    """Median seconds per token over the first and the last tenth of a rollout's decode steps."""
    gaps = [b - a for a, b in zip(times, times[1:])]
    if len(gaps) < 4:
        return {"start_s": float("nan"), "end_s": float("nan"), "ratio": float("nan")}
    k = max(2, len(gaps) // 10)
    start, end = statistics.median(gaps[1 : k + 1]), statistics.median(gaps[-k:])
    return {"start_s": start, "end_s": end, "ratio": end / start}


def step_memory(sess: Session, beta: float, limits: Optional[Dict[str, float]] = None) -> Dict[str, Any]:
    """One GRPO step with ``beta``: its split, measured peaks and the preflight estimate; with
    ``limits`` (``limits.measure_limits``), also "bounds": each stage against them."""
    cfg = replace(sess.cfg, grpo=replace(sess.cfg.grpo, beta=beta))
    longest = max(len(encode_prompt(sess.tokenizer, p)) for p in sess.prompts)
    est = estimate_memory(sess.model, cfg, longest)
    process_peak_reset()
    m = sess.grpo_steps(1, beta=beta, warmup=False)[0]
    out = {
        "beta": beta, "generate": m["time_generate"], "reward": m["time_reward"],
        "score": m["time_score"], "update": m["time_update"], "step_time": m["step_time"],
        "tokens": m["tokens"], "rows_updated": m["rows_updated"],
        "mlx_peak_bytes": m["peak_memory_bytes"], "process_peak_bytes": process_peak(),
        "estimate_bytes": estimate_total(est), "estimate": est,
        "estimate_over_mlx_peak": estimate_total(est) / max(m["peak_memory_bytes"], 1),
    }
    if limits is not None:
        out["bounds"] = bounds_report(out, [m["phases"]], limits)
    return out


def rollouts(sess: Session) -> Dict[str, Any]:
    """Our rollout (with per-token times) against batch_generate, each after a short warm-up."""
    short = replace(sess.cfg, rollout=replace(sess.cfg.rollout, max_tokens=4))
    full = sess.cfg
    sess.cfg = short
    sess.ours(), sess.peer()  # warm-up: allocator, kernels
    sess.cfg = full
    times: List[float] = []
    t = time.perf_counter()
    with decode_clock(times):
        n_ours = int(sess.ours().mask.sum().item())
    ours = n_ours / (time.perf_counter() - t)
    t = time.perf_counter()
    n_peer = int(sess.peer().stats.generation_tokens)
    peer = n_peer / (time.perf_counter() - t)
    return {"ours_tokens_per_sec": ours, "batch_generate_tokens_per_sec": peer,
            "ratio_vs_batch_generate": ours / peer, "tokens": n_ours, "decode_per_token": per_token(times)}


def shape_session(shape: str, bits: int, prompts: int, group_size: int, max_tokens: int,
                  say: Callable[[str], None] = lambda _: None, config_path: Optional[str] = None,
                  beta: Optional[float] = None) -> Session:
    """A benchmark session on shape ``shape`` (a name in ``SHAPES``, built once and cached, or a
    model path / Hub id): P prompts x G completions of ``max_tokens`` tokens, stopping at EOS only
    (random weights rarely emit it, so every completion runs to the limit)."""
    if shape in SHAPES:
        say(f"building/loading the {shape} shape ({bits or 32}-bit random weights; cached) ...")
        model = str(shape_dir(shape, bits))
    else:
        model = shape
    s = BenchSettings(prompts=prompts, group_size=group_size, max_tokens=max_tokens, reps=1, steps=1)
    cfg = bench_config(config_path, model, s)
    cfg = replace(cfg, rollout=replace(cfg.rollout, stop=[]))
    if beta is not None:
        cfg = replace(cfg, grpo=replace(cfg.grpo, beta=beta))
    say(f"loading {cfg.model.path} ...")
    return Session(cfg, say=say)


def run_shape_bench(shape: str, bits: int = 4, prompts: int = 2, group_size: int = 4, max_tokens: int = 256,
                    config_path: Optional[str] = None, say: Callable[[str], None] = lambda _: None,
                    beta: float = 0.1) -> Dict[str, Any]:
    """Every measurement of the module docstring, on shape ``shape`` (a name in ``SHAPES``) or a
    model path / Hub id; returns one JSON-ready dict."""
    sess = shape_session(shape, bits, prompts, group_size, max_tokens, say, config_path, beta)
    cfg = sess.cfg
    say("machine limits: memory bandwidth, matmul throughput ...")
    limits = measure_limits()
    result: Dict[str, Any] = {
        "shape": shape, "bits": bits if shape in SHAPES else None, "model": cfg.model.path,
        "parameters": sum(v.size for _, v in tree_flatten(sess.model.parameters())),
        "base_dtype": str(next(v.dtype for _, v in tree_flatten(sess.model.parameters())
                               if mx.issubdtype(v.dtype, mx.floating))),
        "device": device_kind(), "backend": blas.describe(dict(os.environ)), "engines": engines(sess.model, sess.cfg),
        "mlx_version": mx.__version__,
        "settings": {"prompts": prompts, "group_size": group_size, "max_tokens": max_tokens,
                     "temperature": cfg.rollout.temperature, "adapter": cfg.adapter.type,
                     "rank": cfg.adapter.rank, "beta": beta},
        "limits": limits,
    }
    say("rollouts: ours vs mlx_lm batch_generate ...")
    result["rollout"] = rollouts(sess)
    say(f"GRPO step, beta {beta} ...")
    result["step"] = step_memory(sess, beta, limits)
    say("GRPO step, beta 0 ...")
    result["step_beta0"] = step_memory(sess, 0.0, limits)
    result["bounds"] = result["step"].pop("bounds")
    result["bounds_beta0"] = result["step_beta0"].pop("bounds")
    return result


def shape_table(r: Dict[str, Any]) -> str:
    """The result as a Markdown table (what docs/results/ quotes)."""
    ro, se = r["rollout"], r["settings"]
    d = ro["decode_per_token"]
    stored = "as stored" if r["bits"] is None else ("float32" if r["bits"] == 0 else f"{r['bits']}-bit")
    lines = [
        f"shape {r['shape']} ({r['parameters'] / 1e6:.0f}M parameters as loaded; weights {stored} on "
        f"disk, base {r['base_dtype']} in memory), {r['backend']}, mlx {r['mlx_version']}; "
        f"P={se['prompts']} x G={se['group_size']}, {se['max_tokens']} new tokens, {se['adapter']} "
        f"rank {se['rank']}",
        "",
        "| measurement | value |",
        "|---|---|",
        *engines_line(r),
        limits_line(r["limits"]),
        f"| rollout, ours | {ro['ours_tokens_per_sec']:.1f} tokens/s ({ro['tokens']} tokens) |",
        f"| rollout, mlx_lm batch_generate (same rows) | {ro['batch_generate_tokens_per_sec']:.1f} tokens/s |",
        f"| **rollout ratio, ours / batch_generate** | **{ro['ratio_vs_batch_generate']:.2f}x** |",
        f"| decode time per token, first / last tenth of the rollout | {d['start_s'] * 1e3:.1f} / "
        f"{d['end_s'] * 1e3:.1f} ms ({d['ratio']:.2f}x) |",
    ]
    for key, bounds in (("step", "bounds"), ("step_beta0", "bounds_beta0")):
        st = r[key]
        lines += [
            f"| GRPO step beta={st['beta']}: generate / reward / score / update | {st['generate']:.2f} / "
            f"{st['reward']:.3f} / {st['score']:.2f} / {st['update']:.2f} s (total {st['step_time']:.2f} s) |",
            f"| peak memory beta={st['beta']}: mx.get_peak_memory / process / preflight estimate | "
            f"{st['mlx_peak_bytes'] / GB:.2f} / {(st['process_peak_bytes'] or 0) / GB:.2f} / "
            f"{st['estimate_bytes'] / GB:.2f} GB (estimate / MLX peak {st['estimate_over_mlx_peak']:.2f}) |",
        ]
        lines += bound_lines(r[bounds], f"beta={st['beta']} ")
    return "\n".join(lines)
