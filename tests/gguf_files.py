"""GGUF files written here as llama.cpp's converter writes them, from small models built here.

``write_gguf`` takes a model in Hugging Face's layout (names, float32 weights, config) and a
``tokenizers`` BPE, and writes what ``convert_hf_to_gguf.py`` would: GGUF tensor names, llama's
query/key rows permuted for llama.cpp's rotary embedding, the tokenizer as metadata, 2-D weights
in the requested ggml type (quantized by the ``gguf`` package, llama.cpp's own Python code).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
BLOCK = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def gguf_name(hf: str) -> str:
    stem, _, leaf = hf.rpartition(".")
    if stem in TOP:
        return f"{TOP[stem]}.{leaf}"
    parts = stem.split(".")
    return f"blk.{parts[2]}.{BLOCK['.'.join(parts[3:])]}.{leaf}"


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def train_bpe(pre: str = "smollm", vocab_size: int = 400):
    """A byte-level BPE trained on arithmetic chat text, with ChatML's special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers as pt, trainers

    from mlx_grpo.gguf_tokenizer import QWEN2_SPLIT

    tok = Tokenizer(models.BPE())
    if pre == "smollm":
        tok.pre_tokenizer = pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False)])
    else:
        tok.pre_tokenizer = pt.Sequence([pt.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                                         pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    rng = np.random.default_rng(0)
    text = [f"<|im_start|>user\nWhat is {a} + {b} ?<|im_end|>\n<|im_start|>assistant\n"
            f"<think> {a} plus {b} makes {a + b} </think> <answer> {a + b} </answer><|im_end|>"
            for a, b in rng.integers(0, 200, (500, 2))]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS,
                                  initial_alphabet=pt.ByteLevel.alphabet())
    tok.train_from_iterator(text, trainer)
    return tok


def write_gguf(path: Path, arch: str, config: Dict[str, Any], weights: Dict[str, np.ndarray], tok,
               qtype: str = "F32", pre: str = "smollm", tokenizer_model: str = "gpt2",
               extra: Optional[Dict[str, np.ndarray]] = None) -> Path:
    """Write a GGUF file of ``weights`` (HF names, float32) with 2-D tensors in ``qtype``."""
    import gguf
    from gguf import GGMLQuantizationType as T

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("test model")
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config.get("max_position_embeddings", 2048))
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_rope_freq_base(config["rope_theta"])
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    heads = {"self_attn.q_proj": config["num_attention_heads"], "self_attn.k_proj": config["num_key_value_heads"]}
    for hf, a in weights.items():
        a = np.asarray(a, dtype=np.float32)
        if arch == "llama":
            for key, n in heads.items():
                if key in hf:
                    a = permute(a, n)
        name = gguf_name(hf)
        if a.ndim == 1 or qtype == "F32":
            w.add_tensor(name, a)
        elif qtype == "F16":
            w.add_tensor(name, a.astype(np.float16))
        else:
            t = T[qtype]
            w.add_tensor(name, gguf.quants.quantize(a, t), raw_dtype=t)
    for name, a in (extra or {}).items():
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def rounded(a: np.ndarray, qtype: str) -> np.ndarray:
    """What a 2-D weight becomes after storage as ``qtype`` (the reference the loaded model must match)."""
    import gguf
    from gguf import GGMLQuantizationType as T

    if a.ndim == 1 or qtype == "F32":
        return a
    if qtype == "F16":
        return a.astype(np.float16).astype(np.float32)
    return gguf.quants.dequantize(gguf.quants.quantize(a, T[qtype]), T[qtype]).astype(np.float32)
