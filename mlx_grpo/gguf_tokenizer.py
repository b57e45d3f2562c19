"""A GGUF file's tokenizer, rebuilt as a Hugging Face ``tokenizer.json`` (no torch, no network).

GGUF keeps a byte-level BPE tokenizer as its vocabulary (``tokenizer.ggml.tokens``), its merges,
the token types (control tokens are the special ones), BOS/EOS ids, the chat template and the
name of its pre-tokenizer (``tokenizer.ggml.pre``), which says how text is split before the merges.
The splits below are the ones the original ``tokenizer.json`` files hold (and llama.cpp's
``llama-vocab.cpp`` mirrors): SmolLM's digits-then-GPT-2, Qwen2's and Llama 3's regexes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from .errors import UserError

# Llama 3's split (tokenizer.json of meta-llama/Llama-3.x); Qwen2's differs in single digits.
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = ("smollm", "qwen2", "llama-bpe", "gpt-2", "default")

# gguf token types (llama.cpp's llama_token_type)
CONTROL, USER_DEFINED = 3, 4


class GGUFTokenizerError(UserError, ValueError):
    """A GGUF tokenizer that cannot be rebuilt; the message names the file and the key."""


def _pre_tokenizer(name: str, where: str):
    from tokenizers import Regex, pre_tokenizers as pt

    if name == "smollm":
        return pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False, use_regex=True)])
    if name in ("qwen2", "llama-bpe"):
        split = QWEN2_SPLIT if name == "qwen2" else LLAMA3_SPLIT
        return pt.Sequence([pt.Split(Regex(split), behavior="isolated", invert=False),
                            pt.ByteLevel(add_prefix_space=False, use_regex=False)])
    if name in ("gpt-2", "default"):
        return pt.ByteLevel(add_prefix_space=False, use_regex=True)
    raise GGUFTokenizerError(
        f"{where}: tokenizer.ggml.pre {name!r} is not supported (supported: {', '.join(PRE_TOKENIZERS)})")


def _token(md: Dict[str, Any], key: str, tokens: List[str]) -> Optional[str]:
    i = md.get(key)
    return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None


def write_tokenizer(md: Dict[str, Any], out: Path, where: str) -> Dict[str, Optional[int]]:
    """Write tokenizer.json and tokenizer_config.json for the metadata ``md`` into ``out``.

    ``where`` names the source file in errors. Returns the BOS and EOS ids (for config.json).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    kind = md.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFTokenizerError(
            f"{where}: tokenizer.ggml.model {kind!r} is not supported (supported: 'gpt2', byte-level BPE)")
    tokens: List[str] = md.get("tokenizer.ggml.tokens") or []
    merges: List[str] = md.get("tokenizer.ggml.merges") or []
    if not tokens or not merges:
        missing = "tokenizer.ggml.tokens" if not tokens else "tokenizer.ggml.merges"
        raise GGUFTokenizerError(f"{where}: metadata {missing} is missing or empty")
    types = md.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    vocab = {t: i for i, t in enumerate(tokens)}
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep:
            raise GGUFTokenizerError(f"{where}: tokenizer.ggml.merges holds {m[:40]!r}, not a pair")
        pairs.append((a, b))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(str(md.get("tokenizer.ggml.pre", "default")), where)
    if md.get("tokenizer.ggml.pre") == "qwen2":
        from tokenizers import normalizers

        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == CONTROL]
    tok.add_special_tokens(special)
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == USER_DEFINED])

    bos = _token(md, "tokenizer.ggml.bos_token_id", tokens)
    eos = _token(md, "tokenizer.ggml.eos_token_id", tokens)
    pad = _token(md, "tokenizer.ggml.padding_token_id", tokens)
    add_bos = bool(md.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    if add_bos:  # as the original's post-processor does (Llama 3): BOS before every encoded text
        bos_id = vocab[bos]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(str(out / "tokenizer.json"))

    conf: Dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": int(md.get(f"{md.get('general.architecture')}.context_length", 2048)),
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    for key, value in (("bos_token", bos), ("eos_token", eos), ("pad_token", pad or eos), ("unk_token", None)):
        if value is not None:
            conf[key] = value
    if md.get("tokenizer.chat_template"):
        conf["chat_template"] = md["tokenizer.chat_template"]
    (out / "tokenizer_config.json").write_text(json.dumps(conf, indent=2) + "\n")
    return {"bos_token_id": vocab.get(bos) if bos else None, "eos_token_id": vocab.get(eos) if eos else None}
