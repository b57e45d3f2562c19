"""A small llama with a byte-level BPE tokenizer and a ChatML chat template, for benchmarks.

The embedded model's word-level tokenizer makes every tag one token and every prompt short; a Hub
model's BPE splits ``</answer>`` into several tokens (so the stop string is checked on text) and
its chat template makes prompts longer. This builds that case at a size where the trainer's own
overheads show: a llama of about 3.5M parameters (hidden 256, 4 layers, FFN 640), random weights,
a BPE of 2,048 tokens trained on the arithmetic task's prompts, ChatML template (Qwen's layout).
Written once to ``~/.cache/mlx-grpo/bench-bpe-llama`` (or ``--out``); prints the directory:

    python benchmarks/make_bpe_model.py [--out DIR]
    PYTHONPATH=/tmp/peer python benchmarks/peer_mlx_lm_lora.py --model "$(python benchmarks/make_bpe_model.py)" \
        -P 4 -G 4 --max-tokens 32
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import common  # noqa: F401  (the repository on sys.path)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CONFIG = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 256,
    "num_hidden_layers": 4, "intermediate_size": 640, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 2048, "max_position_embeddings": 4096,
    "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    "bos_token_id": 0, "eos_token_id": 2, "torch_dtype": "float32",
}


def corpus(n: int = 2000):
    """Text like what the model will read and write: the task's prompts in the chat template and
    R1-Zero style completions."""
    from mlx_grpo.tasks.arithmetic import question
    from mlx_grpo.tasks.templates import R1_ZERO_PREAMBLE

    rng = random.Random(0)
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        yield (f"<|im_start|>system\n{R1_ZERO_PREAMBLE}<|im_end|>\n<|im_start|>user\n"
               f"{question(a, b)}<|im_end|>\n<|im_start|>assistant\n"
               f"<think> {a} + {b} = {a + b} </think> <answer> {a + b} </answer><|im_end|>\n")


def build(out: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from mlx_grpo import shapes

    if (out / "config.json").exists():
        return out
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=CONFIG["vocab_size"], special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)

    def tokenizer_files(d: Path) -> None:
        tok.save(str(d / "tokenizer.json"))
        (d / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>", "chat_template": CHATML, "model_max_length": 4096,
            "clean_up_tokenization_spaces": False,
        }, indent=2) + "\n")

    config = {**CONFIG, "bos_token_id": tok.token_to_id("<|endoftext|>"), "eos_token_id": tok.token_to_id("<|im_end|>")}
    return shapes.save_model_dir(out, shapes.build(config), config, tokenizer_files)


def main() -> None:
    from mlx_grpo.shapes import cache_root

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    print(build(Path(a.out) if a.out else cache_root() / "bench-bpe-llama"))


if __name__ == "__main__":
    main()
