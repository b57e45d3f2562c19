"""Make the embedded tiny base model: a word-level tokenizer and a small llama pre-trained here.

The result is a standard Hugging Face layout (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json) that mlx-lm loads through exactly the path a Hub model takes.

Deterministic: the corpus comes from a seeded ``random.Random`` and training from
``mx.random.seed``, so two runs with the same arguments write byte-identical weights.

The corpus teaches two things and deliberately not a third:
  * addition facts ("12 + 7 = 19 .") and questions answered with a short reasoning block, so the
    base model already gets most answers right somewhere in its completion;
  * the R1-Zero preamble, think blocks that reason about a preceding question, documents listing
    the empty tags, and answer tags that restate a value just computed;
  * the full layout after the R1-Zero preamble rarely (stage 2: 1% of those documents; stage 3:
    15%, at a gentle rate): in the template the base model writes it in about 1 sample in 12 and
    never greedily, and GRPO has to make it the habit from the reward alone. Stage 3 is there so
    that when it does write the layout it copies the sum it just computed into the tag; after
    stage 2 alone it did not, and GRPO found the layout before the copy (the held-out answers fell
    to ~0.6 for dozens of steps before recovering).

Run:  python -m mlx_grpo.assets.make_tiny_model --out mlx_grpo/assets/tiny-r1
(all three stages; the committed tiny-r1 ran stage 3 with ``--from`` the stage-2 model committed
before it, which a test shows gives the bytes of the full run from the same stage-2 weights).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from mlx_grpo import blas
from mlx_grpo.tasks.arithmetic import question
from mlx_grpo.tasks.templates import R1_ZERO_PREAMBLE, PromptFormat, render_prompt

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
TAGS = ["<think>", "</think>", "<answer>", "</answer>"]
EXTRA_WORDS = (
    "so the answer is we get it sum of plus equals add and then check result tags are "
    "a number here : that gives let me compute"
)
# Stage 2's share of templated documents that end in the full layout. Rare on purpose: the base
# model then writes it about once in a hundred samples and never greedily, so GRPO has a signal to
# find but everything to teach (like a real base model that has seen such tags on the web).
FILLED_LAYOUT_RATE = 0.01
# Stage 3: the full layout in TAG_RATE of the templated documents, at a gentle
# rate. Stage 2 alone left the model unable to fill the tag after ``</think>`` (GRPO then found the
# layout before the copy, and the answers fell to ~0.6 lenient for dozens of steps); after stage 3
# it copies the sum it just wrote, yet greedy decoding still never writes the layout.
TAG_RATE = 0.15
TAG_LR = 3e-4

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }} "
    "{% elif m['role'] == 'user' %}User: {{ m['content'] }} "
    "{% else %}Assistant: {{ m['content'] }} {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


def pre_tokenize(text: str) -> List[str]:
    from tokenizers import pre_tokenizers

    return [w for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)]


def build_tokenizer(out: Path) -> "object":
    """Write tokenizer.json and tokenizer_config.json; return the tokenizers.Tokenizer."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    words: List[str] = list(SPECIALS) + list(TAGS) + [str(i) for i in range(100)]
    sample_text = " ".join(
        [R1_ZERO_PREAMBLE, render_prompt(question(1, 2), PromptFormat()), EXTRA_WORDS, "+ = ? ."]
    )
    for w in pre_tokenize(sample_text.replace("<think>", " ").replace("</think>", " ")
                          .replace("<answer>", " ").replace("</answer>", " ")):
        if w not in words:
            words.append(w)
    vocab = {w: i for i, w in enumerate(words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAGS])
    tok.save(str(out / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "model_max_length": 512,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return tok


def drill(rng: random.Random, max_operand: int) -> str:
    """Three to eight addition facts in a row, "a + b = s ." each."""

    def fact() -> str:
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        return f"{a} + {b} = {a + b} ."

    return " ".join(fact() for _ in range(rng.randint(3, 8)))


def make_document(rng: random.Random, max_operand: int, filled_rate: float = 0.0) -> str:
    """One pre-training document (see the module docstring for what each kind teaches)."""

    def fact() -> tuple:
        a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
        return a, b, f"{a} + {b} = {a + b} ."

    kind = rng.random()
    if kind < 0.30:  # drills
        return drill(rng, max_operand)
    if kind < 0.55:  # preamble + question answered with reasoning, rarely in the full layout
        a, b, f = fact()
        ending = rng.choice([f"the answer is {a + b} .", f"so it is {a + b} ."])
        if filled_rate and rng.random() < filled_rate:
            ending = f"<answer> {a + b} </answer>"
        prompt = render_prompt(question(a, b), PromptFormat())
        return f"{prompt} {f} </think> {ending}"
    if kind < 0.67:  # think blocks reasoning about a preceding question
        a, b, f = fact()
        return f"{question(a, b)} <think> let me compute {f} </think> the answer is {a + b} ."
    if kind < 0.82:  # answer tags restating a value just computed
        a, b, f = fact()
        return f"{f} <answer> {a + b} </answer>"
    if kind < 0.87:  # lists of the empty tags
        return " ".join(rng.choice(["<think> </think> <answer> </answer>", "tags : <think> </think>",
                                    "tags : <answer> </answer>"]) for _ in range(rng.randint(1, 3)))
    if kind < 0.89:  # a bare question with both blocks: the layout exists, never after the preamble
        a, b, f = fact()
        return f"{question(a, b)} <think> {f} </think> <answer> {a + b} </answer>"
    a, b, f = fact()  # plain question / answer
    return f"{question(a, b)} {f} the answer is {a + b} ."


def build_model(vocab_size: int, hidden: int, layers: int, heads: int, ffn: int):
    from mlx_lm.models import llama

    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": ffn,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab_size,
        "max_position_embeddings": 512,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "bos_token_id": 2,
        "eos_token_id": 3,
        "torch_dtype": "float32",
    }
    model = llama.Model(llama.ModelArgs.from_dict(config))
    return model, config


def pretrain(model, batches, steps: int, lr: float, log_every: int = 50) -> None:
    def loss_fn(model, x, y, mask):
        logits = model(x)
        ce = nn.losses.cross_entropy(logits, y) * mask
        return ce.sum() / mask.sum()

    schedule = optim.join_schedules(
        [optim.linear_schedule(0.0, lr, max(1, steps // 20)),
         optim.cosine_decay(lr, steps, lr * 0.05)],
        [max(1, steps // 20)],
    )
    opt = optim.AdamW(learning_rate=schedule, weight_decay=0.01)
    step_fn = nn.value_and_grad(model, loss_fn)
    start = time.time()
    for step in range(steps):
        x, y, mask = next(batches)
        loss, grads = step_fn(model, x, y, mask)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, loss)
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - start:6.1f}s", flush=True)


def batch_iterator(tok, rng: random.Random, max_operand: int, batch: int, seq_len: int,
                   filled_rate: float = 0.0,
                   document: Optional[Callable[[random.Random], str]] = None):
    """Endless (inputs, targets, mask) batches of documents; ``document`` replaces this corpus."""
    eos = tok.token_to_id("</s>")
    pad = tok.token_to_id("<pad>")
    document = document or (lambda r: make_document(r, max_operand, filled_rate))
    while True:
        rows = []
        for _ in range(batch):
            ids = tok.encode(document(rng)).ids[: seq_len] + [eos]
            rows.append(ids)
        width = max(len(r) for r in rows)
        x = [r[:-1] + [pad] * (width - len(r)) for r in rows]
        y = [r[1:] + [pad] * (width - len(r)) for r in rows]
        m = [[1.0] * (len(r) - 1) + [0.0] * (width - len(r)) for r in rows]
        yield mx.array(x), mx.array(y), mx.array(m)


def make(out: Path, steps: int, seed: int, max_operand: int, hidden: int, layers: int,
         heads: int, ffn: int, batch: int, lr: float, log_every: int = 50,
         polish_steps: int = 0, polish_lr: float = 1e-3,
         filled_rate: float = FILLED_LAYOUT_RATE, tag_steps: int = 0, tag_lr: float = TAG_LR,
         tag_rate: float = TAG_RATE, start_from: Optional[Path] = None) -> None:
    """Build the tokenizer, pre-train the model and write the Hugging Face layout into ``out``.

    Stage 1 (``steps``) never shows the full layout after the preamble; stage 2
    (``polish_steps``, fresh optimizer, seed + 1) shows it in ``filled_rate`` of those documents;
    stage 3 (``tag_steps``, fresh optimizer, seed + 2, a gentler rate) in ``tag_rate`` of them.
    ``start_from`` (a model this script wrote after stage 2) skips stages 1 and 2 and continues
    from its weights.
    """
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    mx.random.seed(seed)
    model, config = build_model(tok.get_vocab_size(), hidden, layers, heads, ffn)
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"tiny model: {n_params / 1e6:.2f}M parameters, vocab {tok.get_vocab_size()}")
    stages = []
    if start_from is not None:
        start = Path(start_from)
        if json.loads((start / "config.json").read_text()) != config:
            raise SystemExit(f"--from {start}: its config.json is not this script's model")
        model.load_weights(str(start / "model.safetensors"))
        continued = hashlib.sha256((start / "model.safetensors").read_bytes()).hexdigest()
    else:
        continued = None
        stages += [(steps, lr, seed, 0.0), (polish_steps, polish_lr, seed + 1, filled_rate)]
    stages.append((tag_steps, tag_lr, seed + 2, tag_rate))
    for n, stage_lr, stage_seed, rate in stages:
        if not n:
            continue
        mx.random.seed(stage_seed)
        batches = batch_iterator(tok, random.Random(stage_seed), max_operand, batch, 160, rate)
        pretrain(model, batches, n, stage_lr, log_every)
    weights = dict(sorted(tree_flatten(model.parameters())))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": 3}) + "\n")
    meta = {"steps": steps, "seed": seed, "max_operand": max_operand, "batch": batch, "lr": lr,
            "polish_steps": polish_steps, "polish_lr": polish_lr, "filled_layout_rate": filled_rate,
            "tag_steps": tag_steps, "tag_lr": tag_lr, "tag_rate": tag_rate}
    if continued:
        meta["stages_1_2_from_sha256"] = continued
    (out / "pretraining.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def main() -> None:
    # Like make_reasoning_model: a fast BLAS preloaded, and one BLAS thread, because OpenBLAS's
    # sums depend on its thread count: the same bytes on every machine with the same BLAS.
    blas.maybe_reexec(["-m", "mlx_grpo.assets.make_tiny_model", *sys.argv[1:]], dict(os.environ))
    blas.limit_threads(1, dict(os.environ))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "tiny-r1")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-operand", type=int, default=29)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ffn", type=int, default=512)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--polish-steps", type=int, default=300)
    p.add_argument("--polish-lr", type=float, default=1e-3)
    p.add_argument("--filled-rate", type=float, default=FILLED_LAYOUT_RATE,
                   help="stage 2's share of templated documents in the full layout")
    p.add_argument("--tag-steps", type=int, default=200, help="stage 3's steps")
    p.add_argument("--tag-lr", type=float, default=TAG_LR)
    p.add_argument("--tag-rate", type=float, default=TAG_RATE,
                   help="stage 3's share of templated documents in the full layout")
    p.add_argument("--from", dest="start_from", type=Path, default=None,
                   help="continue from this stage-2 model (skips stages 1 and 2)")
    p.add_argument("--log-every", type=int, default=50)
    a = p.parse_args()
    make(a.out, a.steps, a.seed, a.max_operand, a.hidden, a.layers, a.heads, a.ffn, a.batch, a.lr,
         a.log_every, a.polish_steps, a.polish_lr, a.filled_rate, a.tag_steps, a.tag_lr, a.tag_rate,
         a.start_from)


if __name__ == "__main__":
    main()
