"""Make the second embedded model, tiny-reason: tiny-r1 taught a three-number sum it usually
stops half-way through.

It continues tiny-r1's pre-training (same tokenizer, same architecture, same Hugging Face layout)
on a corpus where ``What is a + b + c ?``, in tiny-r1's chat template with no system prompt
(``User: ... Assistant: <think>``, 12 tokens instead of the R1-Zero instruction's 80, which keeps
pre-training and GRPO cheap), is answered in the full layout in one of two ways, as sloppy and
careful solutions mix on the web:

  * careful (CAREFUL_RATE of them): ``a + b = s . s + c = t . </think> <answer> t </answer>``
  * hasty (the rest): ``a + b = s . </think> <answer> s </answer>``, the first step's value.

Both ways are fluent and well formatted, so the base model writes the layout but greedily takes
the likelier, hasty way on most questions (right there only when c = 0); sampled at temperature 1
it takes the second step a bit less than half the time and is then usually right. Reinforcement
learning on the accuracy reward alone has to make the second step the habit: the R1-Zero effect
(longer reasoning, better answers) at a size that trains in minutes. The other documents are
drills: half chains (``3 + 4 = 7 . 7 + 5 = 12 .``, each fact starting from the previous sum),
which practise what the second step does (copy the first sum, add c), half plain facts in
tiny-r1's range, which keep the facts.

Deterministic: the corpus comes from a seeded ``random.Random``, training from ``mx.random.seed``,
and the BLAS runs on one thread (OpenBLAS's sums depend on its thread count), so two runs with the
same arguments (and the same tiny-r1) write the same weights.

Run (the committed asset is exactly this, the defaults, one stage of 1,000 steps):
    python -m mlx_grpo.assets.make_reasoning_model --out mlx_grpo/assets/tiny-reason
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

import mlx.core as mx
from mlx.utils import tree_flatten

from mlx_grpo import blas
from mlx_grpo.assets.make_tiny_model import batch_iterator, build_model, drill, pretrain
from mlx_grpo.tasks.arithmetic import question

ASSETS = Path(__file__).parent
# Share of three-number solutions that take the second step: low enough that greedy decoding takes
# the hasty way on most questions (greedy accuracy 0.422 at 0.45), high enough that 8 samples at
# temperature 1 nearly always include a careful one (pass@8 0.970).
CAREFUL_RATE = 0.45
THREE_TERM_SHARE = 0.8  # the rest are drills, which keep the addition facts
# Share of the drills that are chains (each fact starting from the previous sum), the rest plain
# facts in the base's range: chains practise exactly what the second step does, copying the first
# sum and adding c to it.
CHAIN_SHARE = 0.5
BASE_OPERAND = 29  # tiny-r1's range: every s + c of the task stays inside it when max_operand <= 14
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def chat_prompt(question_text: str) -> str:
    """The prompt that ``prompt.kind: chat`` with ``system_prompt: ""`` renders with tiny-r1's
    chat template and the default response prefix (a test checks the two agree)."""
    return f"User: {question_text} Assistant: <think>"


def three_term_solution(a: int, b: int, c: int, careful: bool) -> str:
    """The response to ``a + b + c`` after the template's ``<think>``: one or two steps, then the
    answer tags with the last value computed."""
    s, t = a + b, a + b + c
    steps = f"{a} + {b} = {s} ." + (f" {s} + {c} = {t} ." if careful else "")
    return f"{steps} </think> <answer> {t if careful else s} </answer>"


def chain_drill(rng: random.Random, max_operand: int) -> str:
    """Two to four facts in a row, each adding an operand in 0..max_operand to the previous sum
    (``3 + 4 = 7 . 7 + 5 = 12 .``), stopping before the sum leaves the base's range."""
    total = rng.randint(0, max_operand)
    facts = []
    for _ in range(rng.randint(2, 4)):
        c = rng.randint(0, max_operand)
        if total + c > BASE_OPERAND:
            break
        facts.append(f"{total} + {c} = {total + c} .")
        total += c
    return " ".join(facts)


def reasoning_document(rng: random.Random, max_operand: int, careful_rate: float = CAREFUL_RATE,
                       chain_share: float = CHAIN_SHARE) -> str:
    """One continuation document: a three-number question and its solution, or a drill."""
    if rng.random() >= THREE_TERM_SHARE:
        return chain_drill(rng, max_operand) if rng.random() < chain_share else drill(rng, BASE_OPERAND)
    a, b, c = (rng.randint(0, max_operand) for _ in range(3))
    return f"{chat_prompt(question(a, b, c))} {three_term_solution(a, b, c, rng.random() < careful_rate)}"


def make(out: Path, base: Path, steps: Sequence[int], seed: int, max_operand: int, batch: int,
         lr: float, careful_rate: float = CAREFUL_RATE, chain_share: float = CHAIN_SHARE,
         log_every: int = 50) -> None:
    """Continue ``base``'s pre-training on the three-number corpus; write the layout into ``out``.

    ``steps`` lists the stages: stage i runs that many steps on the corpus seeded ``seed + i`` with
    a fresh optimizer and warm-up (a restart, as when a run is extended after the fact).
    """
    if max_operand > BASE_OPERAND // 2:
        raise ValueError(f"--max-operand: at most {BASE_OPERAND // 2} (a + b + c stays within the base's facts)")
    out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(base / name, out / name)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    config = json.loads((base / "config.json").read_text())
    mx.random.seed(seed)
    model, _ = build_model(config["vocab_size"], config["hidden_size"], config["num_hidden_layers"],
                           config["num_attention_heads"], config["intermediate_size"])
    model.load_weights(str(base / "model.safetensors"))
    start = time.time()
    for stage, n in enumerate(steps):
        rng = random.Random(seed + stage)
        batches = batch_iterator(tok, rng, max_operand, batch, seq_len=64,
                                 document=lambda r: reasoning_document(r, max_operand, careful_rate, chain_share))
        pretrain(model, batches, n, lr, log_every)
    weights = dict(sorted(tree_flatten(model.parameters())))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    meta = {"base": base.name, "steps": list(steps), "seed": seed, "max_operand": max_operand, "batch": batch,
            "lr": lr, "careful_rate": careful_rate, "chain_share": chain_share,
            "three_term_share": THREE_TERM_SHARE}
    (out / "pretraining.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    print(f"pre-trained in {time.time() - start:.0f} s")


def main() -> None:
    # Like the CLI: a fast BLAS preloaded on Linux CPU (10-19x faster matmuls than MLX's bundled one).
    blas.maybe_reexec(["-m", "mlx_grpo.assets.make_reasoning_model", *sys.argv[1:]], dict(os.environ))
    # OpenBLAS's sums depend on its thread count (20 steps on 1 and on 2 threads wrote different
    # weights), so one thread: the same bytes on every machine with the same BLAS.
    blas.limit_threads(1, dict(os.environ))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ASSETS / "tiny-reason")
    p.add_argument("--base", type=Path, default=ASSETS / "tiny-r1")
    p.add_argument("--steps", type=int, nargs="+", default=[1000],
                   help="steps of each stage (a fresh optimizer per stage)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-operand", type=int, default=9)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--careful-rate", type=float, default=CAREFUL_RATE)
    p.add_argument("--chain-share", type=float, default=CHAIN_SHARE)
    p.add_argument("--log-every", type=int, default=50)
    a = p.parse_args()
    make(a.out, a.base, a.steps, a.seed, a.max_operand, a.batch, a.lr, a.careful_rate, a.chain_share, a.log_every)


if __name__ == "__main__":
    main()
