"""Whole GRPO step: mlx-grpo against mlx-lm-lora's GRPO trainer, same model, data and settings.

Not part of the test suite. mlx-lm-lora is kept out of the project's environment:

    pip install --no-deps --target /tmp/peer mlx-lm-lora==5.10.2
    PYTHONPATH=/tmp/peer python benchmarks/peer_mlx_lm_lora.py [--steps N] [--json]

(it restarts itself with the fast BLAS the CLI uses, ``blas.py``, so both trainers run on it)

(its own dependencies beyond mlx/mlx-lm are not needed for the trainer module). ``--shape NAME``
runs a release's shape (``mlx_grpo/shapes.py``) in float32 with P=2 x G=4 x 64 new tokens
(``-P``, ``-G``, ``--max-tokens`` change them). Settings for both otherwise:
the embedded tiny model, arithmetic prompts, P=16 prompts x G=8, max 20 new tokens, temperature 1,
no top-p/top-k, LoRA rank 8 on every linear of every block, beta 0.1 (mlx-lm-lora keeps a second
copy of the model as the reference, as its CLI does), epsilon 0.2, one update per batch, lr 7e-4.
The peer runs its own ``train_grpo`` loop; per-step time comes from its per-iteration report
(steps_per_report=1), the first iteration (warm-up) dropped. Two peer configurations: its defaults
(generation concurrency = prompts per step, loss micro-batches of P rows) and its best batching
(all P*G rows decode together and score in one micro-batch).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
import mlx.optimizers as optim  # noqa: E402

P, G, MAX_TOKENS, BETA, LR = 16, 8, 20, 0.1, 7e-4
MODEL = None  # None: the embedded model; --shape NAME: a release's shape in float32 (shapes.py)
PROMPT_KIND = "r1"  # --chat: the tokenizer's chat template


def ours(steps: int):
    from mlx_grpo.bench import BenchSettings, Session, bench_config, step_split

    cfg = bench_config(None, MODEL, BenchSettings(prompts=P, group_size=G, max_tokens=MAX_TOKENS))
    cfg.grpo.beta, cfg.train.learning_rate = BETA, LR
    cfg = replace(cfg, prompt=replace(cfg.prompt, kind=PROMPT_KIND))
    sess = Session(cfg)
    return step_split(sess.grpo_steps(steps)), sess


def peer(steps: int, sess, best: bool):
    import mlx_lm_lora.trainer.grpo_trainer as gt
    from mlx_lm_lora.trainer.grpo_reward_functions import r1_accuracy_reward_func, r1_strict_format_reward_func

    from mlx_grpo.models import attach_adapters, load_model

    cfg = sess.cfg
    stock = replace(cfg.model, fast_mlp=False)  # the peer runs mlx-lm's model as mlx-lm loads it
    model, tok = load_model(stock)
    mx.random.seed(cfg.train.seed)
    attach_adapters(model, cfg.adapter)  # the same mlx-lm LoRA layers as ours
    ref, _ = load_model(stock)
    ref.freeze()
    dataset = [(tok.encode(p), tok.encode(str(r["answer"])), p, str(r["answer"])) for p, r in zip(sess.prompts, sess.rows)]
    times = []

    class Report:
        def on_train_loss_report(self, info):
            times.append(1.0 / info["iterations_per_second"])

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
                batch_size=P, iters=steps + 1, group_size=G, beta=BETA, epsilon=0.2,
                max_completion_length=MAX_TOKENS, temperature=cfg.rollout.temperature, top_p=1.0,
                top_k=0, min_p=0.0, steps_per_report=1, steps_per_eval=10**9, steps_per_save=10**9,
                adapter_file=str(Path(d) / "adapters.safetensors"), max_seq_length=512 + MAX_TOKENS,
            )
            gt.train_grpo(
                model, ref, tok, optim.AdamW(learning_rate=LR), dataset, None,
                reward_funcs=[r1_accuracy_reward_func, r1_strict_format_reward_func],
                args=args, training_callback=Report(),
            )
    finally:
        gt.generate_grpo, gt._grpo_value_and_grad = saved
    return statistics.median(times[1:])


def main():
    import os

    from mlx_grpo import blas

    # a fast BLAS with the kernels this CPU allows, as the CLI runs (blas.py)
    blas.maybe_reexec([str(Path(__file__).resolve()), *sys.argv[1:]], dict(os.environ))
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--shape", default=None, help="e.g. qwen2.5-0.5b: its float32 shape, P=2 x G=4 x 64 tokens")
    ap.add_argument("--model", default=None, help="a local or Hub model instead (e.g. benchmarks/make_bpe_model.py's)")
    ap.add_argument("--chat", action="store_true", help="prompts through the tokenizer's chat template")
    ap.add_argument("-P", type=int, default=None)
    ap.add_argument("-G", type=int, default=None)
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--peer", choices=("both", "best", "default"), default="both",
                    help="which peer configurations to run (a real shape takes minutes per step)")
    a = ap.parse_args()
    import mlx_lm_lora

    global P, G, MAX_TOKENS, MODEL, PROMPT_KIND
    MODEL, PROMPT_KIND = a.model, "chat" if a.chat else "r1"
    if a.shape:  # float32 weights, so the peer (no float32 base of its own) can finish
        from mlx_grpo.shapes import shape_dir

        MODEL, P, G, MAX_TOKENS = str(shape_dir(a.shape, bits=0)), 2, 4, 64
    P, G, MAX_TOKENS = a.P or P, a.G or G, a.max_tokens or MAX_TOKENS

    split, sess = ours(a.steps)
    sess.model = None  # the peer loads its own two copies; keep one model in memory at a time
    nan = float("nan")
    peer_default = peer(a.steps, sess, best=False) if a.peer in ("both", "default") else nan
    peer_best = peer(a.steps, sess, best=True) if a.peer in ("both", "best") else nan
    split2, _ = ours(a.steps)  # again, after the peer: load drift shows up as a difference
    mine = min(split["step_time"], split2["step_time"])
    res = {
        "mlx_lm_lora_version": mlx_lm_lora.__version__,
        "model": MODEL or "embedded", "prompt_kind": PROMPT_KIND,
        "settings": {"prompts": P, "group_size": G, "max_tokens": MAX_TOKENS, "beta": BETA, "lr": LR,
                     "temperature": sess.cfg.rollout.temperature, "lora_rank": sess.cfg.adapter.rank},
        "ours_step_s": [split["step_time"], split2["step_time"]],
        "ours_split": split,
        "peer_default_step_s": peer_default,
        "peer_best_step_s": peer_best,
        "speedup_vs_peer_best": min(t for t in (peer_default, peer_best) if t == t) / mine,
    }
    if a.json:
        print(json.dumps(res))
        return
    print(f"mlx-lm-lora {res['mlx_lm_lora_version']}, {res['settings']}")
    print("| trainer | seconds per GRPO step |\n|---|---|")
    print(f"| mlx-grpo | {split['step_time']:.3f} (again after the peer: {split2['step_time']:.3f}) |")
    print(f"| mlx-lm-lora, its defaults | {peer_default:.3f} |")
    print(f"| mlx-lm-lora, best batching (P*G rows at once) | {peer_best:.3f} |")
    print(f"| **speed-up, mlx-grpo vs mlx-lm-lora's best** | **{res['speedup_vs_peer_best']:.2f}x** |")


if __name__ == "__main__":
    main()
