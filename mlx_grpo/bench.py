"""``cli.py bench``: how fast a GRPO step is, measured against baselines run in the same process.

One run, the same prompts throughout:
- rollout tokens/s of our engine against mlx-lm's ``batch_generate`` given the P*G rows in one
  call (prompts repeated G times, completion and prefill batch = P*G), same sampler and max tokens,
  both stopping only at EOS; our engine with MLX's decode step uncompiled (what ``mx.compile``
  buys); where ours decodes in C (``native_decode``), also through MLX's compiled step;
- greedy outputs of both engines compared token for token;
- a GRPO step's time split into generate / reward / score / update (``grpo_step``'s timings);
- peak memory of a step with beta = 0 and beta > 0 (same weights, seed and rollouts);
- on Linux with MLX's CPU backend: step time with the fast BLAS against MLX's bundled BLAS, the
  latter in a subprocess (the BLAS is chosen when the process starts);
- how far each stage of the step (generate / score / update) is from this machine's limits: the
  memory bandwidth and matmul throughput measured once (``limits.py``), and the shortest time the
  stage's work, as the measured steps did it, could take at them (``bounds.py``).

Timings are medians over ``reps`` repetitions after a warm-up; wall-clock numbers depend on the
machine and its load, the ratios are what the benchmark is for.
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten

from . import blas, cachedir, malloc, native_forward, native_grad, skinny
from . import rollout as rollout_module
from . import step as step_module
from .assets.make_tiny_model import build_model
from .bounds import Rows, bound_lines, bounds_report, limits_line, model_cost, step_phases
from .config import EMBEDDED_MODEL, Config, make_config
from .fastmath import stock_attention
from .float_base import device_kind
from .limits import measure_limits
from .policy import load_policy
from .rollout import encode_prompt, sample_groups, stop_token_ids
from .sampling import make_sampler
from .tasks import load_task
from .rundir import METRICS, SUMMARY
from .step import grpo_step

# --large: a randomly initialised ~100M-parameter llama with the embedded model's tokenizer.
LARGE = {"hidden": 768, "layers": 10, "heads": 12, "ffn": 3072}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


@dataclass
class BenchSettings:
    prompts: int = 16  # P
    group_size: int = 8  # G
    max_tokens: int = 20
    reps: int = 3  # timed repetitions after one warm-up
    steps: int = 2  # timed GRPO steps after one warm-up
    blas_steps: int = 1  # timed GRPO steps in the bundled-BLAS subprocess


QUICK = BenchSettings(prompts=2, group_size=4, max_tokens=8, reps=1, steps=1, blas_steps=1)


def large_model_dir(cache_root: Optional[Path] = None) -> Path:
    """Build (once, cached) a random ~100M-parameter model in the HF layout; returns its dir."""

    root = cache_root or cachedir.cache_root()
    tag = "-".join(f"{k}{v}" for k, v in LARGE.items())
    out = root / f"bench-large-{tag}"
    if (out / "model.safetensors").exists():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    embedded = Path(EMBEDDED_MODEL)
    for name in TOKENIZER_FILES:
        (tmp / name).write_bytes((embedded / name).read_bytes())
    vocab = json.loads((embedded / "config.json").read_text())["vocab_size"]
    mx.random.seed(0)
    model, config = build_model(vocab, **LARGE)
    mx.save_safetensors(str(tmp / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out)  # atomic: a half-written model is never found
    return out


def bench_config(config_path: Optional[str], model: Optional[str], s: BenchSettings) -> Config:
    overrides: List[Tuple[str, Any]] = [
        ("rollout.group_size", s.group_size),
        ("rollout.max_tokens", s.max_tokens),
        ("train.prompts_per_step", s.prompts),
        ("output.progress", False),
        # Every row takes part in the update, so score/update time and memory don't depend on
        # how many groups happened to have equal rewards.
        ("grpo.skip_zero_advantage", False),
    ]
    if model:
        overrides.append(("model.path", model))
    return make_config(config_path, overrides)


class Session:
    """The model, tokenizer, prompts and GRPO pieces one benchmark run shares."""

    def __init__(self, cfg: Config, say: Callable[[str], None] = lambda _: None):
        self.cfg = cfg
        self.policy = load_policy(cfg, say)  # as train builds it: the config's rewards and settings
        self.model, self.tokenizer = self.policy.model, self.policy.tokenizer
        data = load_task(cfg.data)
        n = cfg.train.prompts_per_step
        self.rows = (data.train * (n // max(1, len(data.train)) + 1))[:n]
        self.prompts = self.policy.prompter.prompts(self.rows)

    # ------------------------------------------------------------------ rollouts

    def ours(self, temperature: Optional[float] = None, compiled: bool = True):
        rcfg = replace(self.cfg.rollout, stop=[])  # EOS only, as batch_generate
        return sample_groups(self.model, self.tokenizer, self.prompts, rcfg, temperature=temperature,
                             compiled=compiled)

    def peer(self, temperature: Optional[float] = None, group_size: Optional[int] = None):
        from mlx_lm.generate import batch_generate

        G = self.cfg.rollout.group_size if group_size is None else group_size
        rows = [encode_prompt(self.tokenizer, p) for p in self.prompts for _ in range(G)]
        with stock_attention(self.model):  # mlx-lm's generation as mlx-lm runs it
            return batch_generate(
                self.model, self.tokenizer, rows, max_tokens=self.cfg.rollout.max_tokens,
                sampler=make_sampler(self.cfg.rollout, temperature), completion_batch_size=len(rows),
                prefill_batch_size=len(rows), return_token_ids=True,
            )

    def rollout_throughput(self, reps: int) -> Dict[str, Any]:
        """Rollout tokens/s of ours (as ``train`` runs it), of ours uncompiled and of
        ``batch_generate``, interleaved; where ours decodes in C, also of MLX's compiled step."""
        in_c = rollout_module.decodes_in_c(self.model)

        def ours(compiled=True, native=None):
            def run():
                saved = rollout_module.NATIVE
                if native is not None:
                    rollout_module.NATIVE = native
                try:
                    return int(self.ours(compiled=compiled).mask.sum().item())
                finally:
                    rollout_module.NATIVE = saved
            return run

        def peer():
            return int(self.peer().stats.generation_tokens)

        runs = [("ours", ours()), ("ours_uncompiled", ours(False)), ("batch_generate", peer)]
        if in_c:
            runs.insert(1, ("ours_mlx", ours(native=False)))
        for name, fn in runs:
            fn()  # warm-up
        # Interleaved repetitions, so load changes on a shared machine hit all of them alike.
        rates: Dict[str, List[float]] = {name: [] for name, _ in runs}
        for _ in range(reps):
            for name, fn in runs:
                t = time.perf_counter()
                n = fn()
                rates[name].append(n / (time.perf_counter() - t))
        out: Dict[str, Any] = {"engine": "C decode step" if in_c else "compiled MLX step"}
        for name, r in rates.items():
            out[f"{name}_tokens_per_sec"] = statistics.median(r)
        out["ratio_vs_batch_generate"] = out["ours_tokens_per_sec"] / out["batch_generate_tokens_per_sec"]
        compiled = out["ours_mlx_tokens_per_sec"] if in_c else out["ours_tokens_per_sec"]
        out["ratio_compiled_vs_uncompiled"] = compiled / out["ours_uncompiled_tokens_per_sec"]  # what mx.compile buys
        if in_c:
            out["ratio_c_vs_mlx"] = out["ours_tokens_per_sec"] / out["ours_mlx_tokens_per_sec"]
        return out

    def greedy_check(self) -> Dict[str, Any]:
        """Greedy completions of both engines, one row per prompt, compared token for token."""
        eos, _, _ = stop_token_ids(self.tokenizer, [])
        ro = self.ours(temperature=0.0)
        G = self.cfg.rollout.group_size
        theirs = self.peer(temperature=0.0, group_size=1).token_ids
        mismatched = 0
        for p, want in enumerate(theirs):
            row = p * G
            n = int(ro.mask[row].sum().item())
            got = ro.tokens[row, :n].tolist()
            if got and got[-1] in eos:  # batch_generate drops the EOS it stopped at
                got = got[:-1]
            same_group = all(ro.tokens[row + g].tolist() == ro.tokens[row].tolist() for g in range(G))
            mismatched += int(got != list(want) or not same_group)
        return {"rows": len(theirs), "mismatched": mismatched, "identical": mismatched == 0}

    # ------------------------------------------------------------------ GRPO steps

    def grpo_steps(self, n: int, beta: Optional[float] = None, warmup: bool = True) -> List[Dict[str, Any]]:
        """Run (1 warm-up +) ``n`` GRPO steps from the current weights and a fixed seed; their
        metrics, each with "phases": the work of its stages (``bounds.step_phases``). The weights
        are restored afterwards, so every call starts from the same policy."""
        cfg = self.cfg
        if beta is not None:
            cfg = replace(cfg, grpo=replace(cfg.grpo, beta=beta))
        start = [(k, mx.array(v)) for k, v in tree_flatten(self.model.trainable_parameters())]
        opt = optim.AdamW(learning_rate=cfg.train.learning_rate)
        cost = model_cost(self.model)
        out = []
        try:
            for i in range(n + 1 if warmup else n):
                mx.random.seed(cfg.train.seed + i)
                mx.synchronize()
                mx.clear_cache()
                mx.reset_peak_memory()
                work: Dict[str, Any] = {"rollouts": [], "batch": None}
                with step_work(work):
                    m = grpo_step(self.policy, opt, self.rows, cfg).metrics
                m["peak_memory_bytes"] = mx.get_peak_memory()
                # Counted after the step, so none of it falls inside the step's timings.
                rollouts = [Rows.of(r.prompt_tokens, r.left_padding, r.row_prompt, r.lengths)
                            for r in work["rollouts"]]
                b = work["batch"]
                rows = None if b is None else Rows.of(b.prompts, b.left_padding, b.row_prompt, b.lengths())
                m["phases"] = step_phases(cost, rollouts, rows, cfg)
                work.clear()  # the step's arrays go now: the next step's peak memory must not hold them
                b = None
                if i or not warmup:
                    out.append(m)
        finally:
            self.model.update(tree_unflatten(start))
        return out


@contextlib.contextmanager
def step_work(work: Dict[str, Any]) -> Iterator[None]:
    """Keep what GRPO steps run inside the block worked on: every rollout (``work["rollouts"]``:
    more than one under dynamic sampling) and the rows scored and updated (``work["batch"]``, the
    ``StepBatch``; None when no row was in the loss). The bounds count the work the timed step
    really did (its completion lengths, the rows it kept), not the settings' worst case."""
    roll_out, select_rows = step_module.roll_out, step_module.select_rows

    def recorded_roll_out(*args, **kwargs):
        prompts, ro = roll_out(*args, **kwargs)
        work["rollouts"].append(ro)
        return prompts, ro

    def recorded_select_rows(*args, **kwargs):
        work["batch"] = select_rows(*args, **kwargs)
        return work["batch"]

    step_module.roll_out, step_module.select_rows = recorded_roll_out, recorded_select_rows
    try:
        yield
    finally:
        step_module.roll_out, step_module.select_rows = roll_out, select_rows


def step_split(metrics: List[Dict[str, Any]]) -> Dict[str, float]:
    keys = ["time_generate", "time_reward", "time_score", "time_update", "step_time"]
    out = {k.replace("time_", ""): statistics.median([m[k] for m in metrics]) for k in keys}
    out["rows_updated"] = statistics.median([m["rows_updated"] for m in metrics])
    out["tokens"] = statistics.median([m["tokens"] for m in metrics])
    return out


def peak_memory(sess: Session, beta: float) -> Dict[str, float]:
    """Peak memory of the same step (weights, seed, rollouts) with beta = 0 and ``beta``."""
    zero = sess.grpo_steps(1, beta=0.0, warmup=False)[0]["peak_memory_bytes"]
    with_kl = sess.grpo_steps(1, beta=beta, warmup=False)[0]["peak_memory_bytes"]
    return {"beta": beta, "beta0_bytes": zero, "beta_bytes": with_kl, "ratio": with_kl / max(zero, 1)}


# ---------------------------------------------------------------------- BLAS comparison


def blas_applies() -> Optional[str]:
    """None when the fast-vs-bundled BLAS comparison applies here, else why not."""
    if device_kind() != "cpu" or not sys.platform.startswith("linux"):
        return f"not on Linux with MLX's CPU backend (device {device_kind()})"
    if not blas.preloaded(dict(os.environ)):
        return "no fast BLAS in use (nothing to compare the bundled BLAS with)"
    return None


def bundled_env(env: Dict[str, str]) -> Dict[str, str]:
    """This environment without the preloaded fast BLAS (nor the few-row kernel, skinny.py, which
    is part of the fast path), and told not to load one."""
    out = dict(env)
    drop = {blas.preloaded(env), skinny.preloaded(env)}
    rest = [p for p in malloc.preloads(env) if p not in drop]
    if rest:
        out["LD_PRELOAD"] = ":".join(rest)
    else:
        out.pop("LD_PRELOAD", None)
    out.pop(blas.MARKER, None)
    out["MLX_GRPO_NO_FAST_BLAS"] = "1"
    root = str(Path(__file__).resolve().parents[1])
    out["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return out


def probe_steps(cfg: Config, steps: int) -> Dict[str, Any]:
    """The median GRPO step split of ``steps`` steps (after a warm-up): the BLAS probe's work."""
    sess = Session(cfg)
    return step_split(sess.grpo_steps(steps))


def run_probe_subprocess(config_path: Optional[str], model: Optional[str], s: BenchSettings,
                         steps: int) -> Dict[str, Any]:
    args = {"config": config_path, "model": model, "settings": s.__dict__, "steps": steps}
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_grpo.bench", "--probe", json.dumps(args)],
        env=bundled_env(dict(os.environ)), capture_output=True, text=True,
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"bundled-BLAS probe failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------- the benchmark


def run_bench(config_path: Optional[str] = None, model: Optional[str] = None, large: bool = False,
              quick: bool = False, say: Callable[[str], None] = lambda _: None,
              processes: int = 0) -> Dict[str, Any]:
    """Run every measurement; returns one JSON-ready dict. ``processes`` N >= 2 adds training
    steps/s with 1 and N processes (``distributed_throughput``)."""
    s = QUICK if quick else (BenchSettings(prompts=4) if large else BenchSettings())
    if large:
        say("building/loading the random ~100M-parameter model ...")
        model = str(large_model_dir())
    cfg = bench_config(config_path, model, s)
    say(f"loading {cfg.model.path} ...")
    sess = Session(cfg)
    say("machine limits: memory bandwidth, matmul throughput ...")
    limits = measure_limits()
    result: Dict[str, Any] = {
        "model": cfg.model.path,
        "parameters": sum(v.size for _, v in tree_flatten(sess.model.parameters())),
        "device": device_kind(),
        "backend": blas.describe(dict(os.environ)),  # which BLAS and kernels the figures come from
        "engines": engines(sess.model, sess.cfg),
        "mlx_version": mx.__version__,
        "settings": {
            "prompts": s.prompts, "group_size": cfg.rollout.group_size,
            "max_tokens": cfg.rollout.max_tokens, "temperature": cfg.rollout.temperature,
            "top_p": cfg.rollout.top_p, "top_k": cfg.rollout.top_k, "min_p": cfg.rollout.min_p,
            "beta": cfg.grpo.beta, "adapter": cfg.adapter.type, "rank": cfg.adapter.rank,
            "reps": s.reps, "steps": s.steps,
        },
        "limits": limits,
    }
    say("rollouts: ours vs mlx_lm batch_generate ...")
    result["rollout"] = sess.rollout_throughput(s.reps)
    result["greedy"] = sess.greedy_check()
    say("GRPO steps ...")
    steps = sess.grpo_steps(s.steps)
    result["step"] = step_split(steps)
    result["bounds"] = bounds_report(result["step"], [m["phases"] for m in steps], limits)
    say("peak memory, beta = 0 vs beta > 0 ...")
    result["memory"] = peak_memory(sess, cfg.grpo.beta if cfg.grpo.beta > 0 else 0.1)
    why_not = blas_applies()
    if why_not:
        result["blas"] = {"skipped": why_not}
    else:
        say("bundled BLAS (subprocess) ...")
        bundled = run_probe_subprocess(config_path, model, s, s.blas_steps)
        fast = result["step"]
        result["blas"] = {
            "fast_step_s": fast["step_time"], "bundled_step_s": bundled["step_time"],
            "ratio": bundled["step_time"] / fast["step_time"],
            "fast_generate_s": fast["generate"], "bundled_generate_s": bundled["generate"],
        }
    if processes >= 2:
        say(f"training steps/s with 1 and {processes} processes (mlx.launch) ...")
        sets = ["--batch-size", str(s.prompts), "-G", str(s.group_size), "--max-tokens", str(s.max_tokens)]
        sets += ["--config", config_path] if config_path else []
        result["distributed"] = distributed_throughput(processes, 2 + 2 * s.steps, model, sets)
    return result


def distributed_throughput(processes: int, steps: int, model: Optional[str] = None,
                           extra: Sequence[str] = (), launcher: Sequence[str] = ()) -> Dict[str, Any]:
    """Steps/s of the same seeded training run with 1 process and with ``processes`` under
    ``mlx.launch`` (ring backend; ``launcher`` adds e.g. ``--hostfile hosts.json``).

    Both runs use the same config, seed and global batch, so they do the same work; the
    N-process run splits every step's prompt groups between its processes. A step's time is
    ``step_time`` from rank 0's metrics (rollouts, rewards, scoring, update and the exchanges
    between processes), median over the steps after the first (a warm-up). On one machine the
    processes share its cores, so N processes are faster only where one leaves hardware idle.
    """
    root = Path(__file__).resolve().parents[1]
    args = ["--steps", str(steps), "--seed", "0", "--no-progress", "--set", "output.eval_size=1",
            "--set", "output.save_every=0", *(["--model", model] if model else []), *extra]
    launch = [sys.executable, "-c", "from mlx._distributed_utils.launch import main; main()"]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, processes):
            out = Path(tmp) / f"p{n}"
            cmd = [sys.executable, "-m", "mlx_grpo.cli", "train", "--output", str(out), *args]
            if n > 1:
                cmd = launch + ["-n", str(n), "--backend", "ring", *launcher, "--", *cmd]
            t0 = time.perf_counter()
            r = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            metrics = out / METRICS
            # mlx.launch exits 0 whatever its processes did: judge by the run's own files.
            if r.returncode or not (out / SUMMARY).exists() or "error:" in r.stderr:
                raise RuntimeError(f"{n}-process training run failed: {r.stderr.strip()[-1500:]}")
            lines = [json.loads(x) for x in metrics.read_text().splitlines()]
            timed = [m for m in lines if m["kind"] == "train"][1:] or [lines[-1]]
            step_time = statistics.median(m["step_time"] for m in timed)
            runs.append({
                "processes": n, "step_time_s": step_time, "steps_per_s": 1.0 / step_time,
                "tokens_per_s": statistics.median(m["tokens"] / m["step_time"] for m in timed),
                "wall_s": wall,
            })
    return {"runs": runs, "speedup_steps_per_s": runs[1]["steps_per_s"] / runs[0]["steps_per_s"]}


def engines(model: Any, cfg: Config) -> Dict[str, str]:
    """Where each pass of a step runs for ``model`` under ``cfg`` here: "C" (native_decode.py,
    native_forward.py, native_grad.py) or "MLX"."""
    in_c = rollout_module.decodes_in_c(model)
    return {"prefill_and_decode": "C" if in_c else "MLX",
            "score": "C" if native_forward.scores_in_c(model) else "MLX",
            "update": "C" if native_grad.unsupported(model, cfg) is None else "MLX"}


def engines_line(r: Dict[str, Any]) -> List[str]:
    """The table's line naming where each pass ran (none for a result from before it was recorded)."""
    e = r.get("engines")
    if not e:
        return []
    return [f"| where the passes run: prefill and decode / score / update | {e['prefill_and_decode']} / "
            f"{e['score']} / {e['update']} |"]


def table(r: Dict[str, Any]) -> str:
    """The result as a Markdown table (what docs/results/ quotes)."""
    ro, st, mem, bl = r["rollout"], r["step"], r["memory"], r["blas"]
    se = r["settings"]
    lines = [
        f"model {Path(r['model']).name} ({r['parameters'] / 1e6:.1f}M parameters), {r['backend']}, "
        f"mlx {r['mlx_version']}; P={se['prompts']} prompts x G={se['group_size']}, max_tokens "
        f"{se['max_tokens']}, temperature {se['temperature']}, {se['adapter']} rank {se['rank']}, "
        f"beta {se['beta']}; medians of {se['reps']} rollouts / {se['steps']} steps",
        "",
        "| measurement | value |",
        "|---|---|",
        *engines_line(r),
        f"| rollout, ours ({ro.get('engine', 'compiled MLX step')}) | {ro['ours_tokens_per_sec']:.0f} tokens/s |",
        *([f"| rollout, ours through MLX's compiled step | {ro['ours_mlx_tokens_per_sec']:.0f} tokens/s |"]
          if "ours_mlx_tokens_per_sec" in ro else []),
        f"| rollout, ours uncompiled (MLX) | {ro['ours_uncompiled_tokens_per_sec']:.0f} tokens/s |",
        f"| rollout, mlx_lm batch_generate (P*G rows in one call) | {ro['batch_generate_tokens_per_sec']:.0f} tokens/s |",
        f"| **rollout ratio, ours / batch_generate** | **{ro['ratio_vs_batch_generate']:.2f}x** |",
        *([f"| rollout ratio, decode in C / MLX's compiled step | {ro['ratio_c_vs_mlx']:.2f}x |"]
          if "ratio_c_vs_mlx" in ro else []),
        f"| rollout ratio, MLX compiled / uncompiled | {ro['ratio_compiled_vs_uncompiled']:.2f}x |",
        f"| greedy outputs identical to batch_generate | {r['greedy']['identical']} "
        f"({r['greedy']['rows'] - r['greedy']['mismatched']}/{r['greedy']['rows']} rows) |",
        f"| GRPO step: generate / reward / score / update | {st['generate']:.3f} / {st['reward']:.4f} / "
        f"{st['score']:.3f} / {st['update']:.3f} s |",
        f"| GRPO step total | {st['step_time']:.3f} s ({st['tokens']:.0f} tokens, {st['rows_updated']:.0f} rows updated) |",
        limits_line(r["limits"]),
        *bound_lines(r["bounds"]),
        f"| peak memory beta=0 / beta={mem['beta']} | {mem['beta0_bytes'] / 1e6:.1f} / {mem['beta_bytes'] / 1e6:.1f} MB |",
        f"| **peak memory ratio, beta>0 / beta=0** | **{mem['ratio']:.3f}** |",
    ]
    if "skipped" in bl:
        lines.append(f"| fast vs bundled BLAS | skipped: {bl['skipped']} |")
    else:
        lines += [
            f"| GRPO step, fast BLAS / bundled BLAS | {bl['fast_step_s']:.3f} / {bl['bundled_step_s']:.3f} s |",
            f"| **step speed-up from the fast BLAS** | **{bl['ratio']:.2f}x** |",
        ]
    if "distributed" in r:
        d = r["distributed"]
        one, many = d["runs"]
        lines += [
            f"| training steps/s, 1 process / {many['processes']} processes (mlx.launch, ring) | "
            f"{one['steps_per_s']:.2f} / {many['steps_per_s']:.2f} |",
            f"| **steps/s ratio, {many['processes']} processes / 1** | **{d['speedup_steps_per_s']:.2f}x** |",
        ]
    return "\n".join(lines)


def _probe_main(arg: str) -> None:
    a = json.loads(arg)
    cfg = bench_config(a["config"], a["model"], BenchSettings(**a["settings"]))
    print(json.dumps(probe_steps(cfg, a["steps"])))


if __name__ == "__main__":  # the bundled-BLAS subprocess: python -m mlx_grpo.bench --probe JSON
    if len(sys.argv) == 3 and sys.argv[1] == "--probe":
        _probe_main(sys.argv[2])
    else:
        sys.exit("usage: python cli.py bench (this module's own entry is the BLAS probe)")
