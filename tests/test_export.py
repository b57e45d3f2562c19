"""A run trained on a GGUF model is written back as a GGUF file with its adapters fused in: the file
gives the logits of the model with its adapters, llama.cpp's own reader (the gguf package) reads
it with the source's metadata entries, values and types alike, and nothing is overwritten."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from conftest import ROOT, one_line_error, run_cli, tree_hash
from gguf_files import train_bpe, write_gguf
from mlx_grpo.config import AdapterConfig, ModelConfig, make_config
from mlx_grpo.export import export_gguf, modelfile, permute_rows
from mlx_grpo.gguf_convert import _unpermute_rows
from mlx_grpo.gguf_write import q8_0
from mlx_grpo.models import attach_adapters, load_adapters, load_model, model_dir, save_adapters
from test_gguf import SMOLLM2, made, needs_smollm2

gguf = pytest.importorskip("gguf")  # llama.cpp's reader checks what is written; its writer makes the sources

IDS = np.array([[1, 5, 9, 30, 2, 7, 11, 40]])


def trained_adapters(src: Path, out: Path, cache: Path, adapter_type: str = "lora", seed: int = 0,
                     std: float = 0.1) -> Path:
    """Adapters on every linear of the model in ``src``, with random (non-zero) weights, saved as
    a run saves them."""
    model_cfg = ModelConfig(path=str(src), gguf_cache=str(cache))
    model, _ = load_model(model_cfg, say=lambda _: None)
    cfg = AdapterConfig(type=adapter_type, rank=4)
    attach_adapters(model, cfg)
    rng = np.random.default_rng(seed)
    model.update(tree_unflatten([(k, mx.array(rng.normal(0, std, v.shape).astype(np.float32)))
                                 for k, v in tree_flatten(model.trainable_parameters())]))
    save_adapters(model, out, cfg, model_dir(model_cfg))  # as a run names its model
    return out


def logits_of(path: str, cache: Path, adapters: Path | None = None) -> np.ndarray:
    model, _ = load_model(ModelConfig(path=path, gguf_cache=str(cache)), say=lambda _: None)
    if adapters:
        load_adapters(model, str(adapters))
    return np.array(model(mx.array(IDS)).astype(mx.float32))


def fields(path: Path) -> dict:
    """Every metadata entry as llama.cpp's reader sees it: its value types and its value."""
    r = gguf.GGUFReader(str(path))
    return {k: ([int(t) for t in f.types], f.contents()) for k, f in r.fields.items() if not k.startswith("GGUF.")}


def test_q8_0_blocks_are_llama_cpps():
    a = np.random.default_rng(0).normal(0, 1, (6, 64)).astype(np.float32)
    a[1] = 0  # an all-zero block: scale 0, values 0
    assert q8_0(a) == gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0).tobytes()


def test_permuting_rows_undoes_the_conversions_reordering():
    a = np.arange(24 * 3, dtype=np.float32).reshape(24, 3)
    assert np.array_equal(np.array(_unpermute_rows(mx.array(permute_rows(a, 3)), 3)), a)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
# Against the unrounded fused weights: F16 and Q8_0 differ by their own rounding (Q8_0's is
# checked exactly against llama.cpp's quantizer below).
@pytest.mark.parametrize("type_name,tol", [("F32", 1e-4), ("F16", 2e-2), ("Q8_0", 0.1)])
def test_the_exported_file_gives_the_logits_of_the_model_with_its_adapters(tmp_path, arch, type_name, tol):
    tok = train_bpe("smollm")
    config, weights = made(arch, tok)
    src = write_gguf(tmp_path / "m.gguf", arch, config, weights, tok, "F32")
    cache = tmp_path / "cache"
    run = trained_adapters(src, tmp_path / "run", cache)
    cfg = make_config(None, [("model.path", str(src)), ("model.gguf_cache", str(cache))])
    out = export_gguf(cfg, str(run), None, type_name, say=lambda _: None)
    assert out == run / f"m-grpo-{type_name}.gguf" and (run / f"m-grpo-{type_name}.Modelfile").is_file()

    want = logits_of(str(src), cache, run)
    base = logits_of(str(src), cache)
    got = logits_of(str(out), cache)
    assert np.abs(want - base).max() > 5 * tol  # the adapters move the logits well past the tolerance
    assert np.abs(got - want).max() < tol, np.abs(got - want).max()

    before, after = fields(src), fields(out)
    assert after.pop("general.file_type") == ([4], {"F32": 0, "F16": 1, "Q8_0": 7}[type_name])
    before.pop("general.file_type", None)
    assert after == before  # every other entry, its types and its values, as the source had it
    r_src, r_out = gguf.GGUFReader(str(src)), gguf.GGUFReader(str(out))
    assert [t.name for t in r_out.tensors] == [t.name for t in r_src.tensors]
    for t in r_out.tensors:
        assert t.tensor_type.name == ("F32" if len(t.shape) == 1 else type_name), t.name


@pytest.mark.parametrize("adapter_type", ["lora", "dora"])
def test_adapters_on_a_quantized_base_are_fused_and_dequantized(tmp_path, adapter_type):
    """model.float_base false keeps a Q8_0 base quantized, as on Metal: the adapters fuse into
    dequantized weights, and the embedding (a quantized layer without adapters) is dequantized."""
    tok = train_bpe("smollm")
    config, weights = made("llama", tok)
    src = write_gguf(tmp_path / "m.gguf", "llama", config, weights, tok, "Q8_0")
    cache = tmp_path / "cache"
    run = trained_adapters(src, tmp_path / "run", cache, adapter_type)
    cfg = make_config(None, [("model.path", str(src)), ("model.gguf_cache", str(cache)), ("model.float_base", False)])
    out = export_gguf(cfg, str(run), tmp_path / "x.gguf", "F32", say=lambda _: None)
    assert {t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors} == {"F32"}
    want = logits_of(str(src), cache, run)
    assert np.abs(want - logits_of(str(src), cache)).max() > 0.1  # the adapters matter
    # the quantized kernels against the same weights dequantized: float rounding apart
    assert np.abs(logits_of(str(out), cache) - want).max() < 5e-3


def test_export_a_trained_run_through_the_cli_and_keep_what_exists(tmp_path):
    """train on a GGUF file, export the run: the file and the Modelfile prompt as the run did;
    a second export does not replace them without --overwrite; a run of a model that is no GGUF
    file, or no run at all, is one line."""
    tok = train_bpe("smollm")
    config, weights = made("llama", tok)
    src = write_gguf(tmp_path / "m.gguf", "llama", config, weights, tok, "Q8_0")
    run = tmp_path / "run"
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    r = run_cli("train", "--model", str(src), "--output", str(run), "--steps", "2", "--batch-size", "2", "-G", "2",
                "--max-tokens", "6", "--prompt-format", "chat", "--no-progress", "--set", "output.eval_size=2",
                "--set", "rollout.stop=['</answer>']", env=env)
    assert r.returncode == 0, r.stderr
    r = run_cli("export", "--run", str(run), "--type", "q8_0", env=env)
    assert r.returncode == 0, r.stderr
    out = run / "m-grpo-Q8_0.gguf"
    assert f"wrote {out}" in r.stdout and "ollama create" in r.stdout
    modelfile = (run / "m-grpo-Q8_0.Modelfile").read_text()
    assert "FROM ./m-grpo-Q8_0.gguf" in modelfile
    assert '<|im_start|>assistant\n <think>"""' in modelfile  # the run's response prefix opens the answer
    assert 'SYSTEM """A conversation between User and Assistant.' in modelfile
    assert 'PARAMETER stop "</answer>"' in modelfile
    # the exported file loads as a model of its own
    r = run_cli("eval", "--model", str(out), "--n", "2", "--set", "prompt.kind=chat", "--json", env=env)
    assert r.returncode == 0, r.stderr
    stamp = out.stat().st_mtime_ns, (run / "m-grpo-Q8_0.Modelfile").read_bytes()
    r = run_cli("export", "--run", str(run), "--type", "q8_0", env=env)
    one_line_error(r, f"--out: {out} exists (--overwrite replaces it)")
    assert (out.stat().st_mtime_ns, (run / "m-grpo-Q8_0.Modelfile").read_bytes()) == stamp
    r = run_cli("export", "--run", str(run), "--type", "q8_0", "--overwrite", env=env)
    assert r.returncode == 0, r.stderr
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp")]  # nothing half-written left
    # a checkpoint's adapters, exported into the run (never into the checkpoint, which the run may prune)
    [ckpt] = (run / "checkpoints").iterdir()
    before = tree_hash(ckpt)
    r = run_cli("export", "--run", str(run), "--adapter", str(ckpt), "--type", "f16", env=env)
    assert r.returncode == 0, r.stderr
    assert (run / "m-grpo-F16.gguf").is_file() and (run / "m-grpo-F16.Modelfile").is_file()
    assert tree_hash(ckpt) == before

    # the run started over keeps the exports: the run does not own them
    r = run_cli("train", "--model", str(src), "--output", str(run), "--steps", "1", "--batch-size", "2", "-G", "2",
                "--max-tokens", "6", "--prompt-format", "chat", "--no-progress", "--set", "output.eval_size=2",
                "--overwrite", env=env)
    assert r.returncode == 0, r.stderr
    assert out.is_file() and (run / "m-grpo-Q8_0.Modelfile").is_file() and (run / "m-grpo-F16.gguf").is_file()

    # --out a folder: the file goes in it; a folder that does not exist: one line
    (tmp_path / "exports").mkdir()
    r = run_cli("export", "--run", str(run), "--out", str(tmp_path / "exports"), env=env)
    assert r.returncode == 0 and (tmp_path / "exports" / "m-grpo-F16.gguf").is_file(), r.stderr
    r = run_cli("export", "--run", str(run), "--out", str(tmp_path / "nowhere" / "x.gguf"), env=env)
    one_line_error(r, f"--out: {tmp_path / 'nowhere'} is not a directory")

    r = run_cli("export", env=env)
    one_line_error(r, "export: name the run (--run RUN_DIR) or its adapters (--adapter DIR)")
    r = run_cli("export", "--adapter", str(run), "--model", str(ROOT / "mlx_grpo" / "assets" / "tiny-r1"), env=env)
    one_line_error(r, "is not a GGUF file: export writes back GGUF models")


@pytest.mark.parametrize("kind,template,want,absent", [
    ("r1", "", ['TEMPLATE """A conversation between User and Assistant.', 'User: {{ .Prompt }} Assistant: <think>"""'], ["SYSTEM"]),
    ("chat", "{% for m in messages %}<|start_header_id|>{{ m.content }}{% endfor %}",
     ['SYSTEM """A conversation', '# the run opened each response with " <think>"; this template does not'], ["TEMPLATE"]),
])
def test_the_modelfile_prompts_as_the_run_did(kind, template, want, absent):
    text = modelfile(make_config(None, [("prompt.kind", kind)]), Path("x.gguf"), template)
    assert text.splitlines()[2] == "FROM ./x.gguf"
    assert all(w in text for w in want) and not any(a in text for a in absent), text


LLAMA_CPP = ROOT / "models" / "node-llama-cpp" / "node_modules"
needs_llama_cpp = pytest.mark.skipif(
    not (LLAMA_CPP / "node-llama-cpp").is_dir() or shutil.which("node") is None,
    reason=f"llama.cpp not found ({LLAMA_CPP}/node-llama-cpp and node): .ci/run installs it with npm",
)


def llama_cpp_greedy(model: Path, prompts: list, max_tokens: int, tmp_path: Path) -> list:
    """Greedy completions by llama.cpp itself (``tests/llama_cpp_complete.mjs``)."""
    (tmp_path / "node_modules").symlink_to(LLAMA_CPP)  # the script's imports resolve from its folder
    script = tmp_path / "complete.mjs"
    shutil.copy(ROOT / "tests" / "llama_cpp_complete.mjs", script)
    (tmp_path / "prompts.json").write_text(json.dumps(prompts))
    r = subprocess.run(["node", str(script), str(model), str(tmp_path / "prompts.json"), str(max_tokens)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@needs_smollm2
@needs_llama_cpp
def test_llama_cpp_runs_an_export_and_answers_as_the_run_does(tmp_path):
    """SmolLM2 with adapters, exported and run by llama.cpp: greedy, it writes what our model with
    the adapters writes greedily, under the recipe's prompt (system prompt, chat template, the
    <think> that opens the answer)."""
    cache = tmp_path / "cache"
    run = trained_adapters(SMOLLM2, tmp_path / "run", cache, seed=2, std=0.005)
    cfg = make_config(str(ROOT / "configs" / "smollm2.yaml"), [
        ("model.path", str(SMOLLM2)), ("model.gguf_cache", str(cache)), ("rollout.max_tokens", 24)])
    out = export_gguf(cfg, str(run), None, "F16", say=lambda _: None)
    from mlx_grpo.generate import generate as run_generate
    from mlx_grpo.policy import load_policy

    policy = load_policy(cfg, adapter_dir=str(run), training=False)
    questions = ["What is 23 + 38 ?", "What is the capital of France?"]
    ours = [run_generate(policy.model, policy.prompter, q, cfg, 1, 0.0)[0] for q in questions]
    theirs = llama_cpp_greedy(out, [policy.prompter.render(q) for q in questions], cfg.rollout.max_tokens, tmp_path)
    prefix = policy.prompter.prefix
    assert all(t.startswith(prefix) for t in ours)
    ours = [t[len(prefix):] for t in ours]
    for stop in cfg.rollout.stop or []:  # ours ends at a stop string, llama.cpp at EOS or the limit
        theirs = [t[: t.index(stop) + len(stop)] if stop in t else t for t in theirs]
    assert [t.split("<|im_end|>")[0].strip() for t in theirs] == [t.strip() for t in ours]
    assert "Paris" in ours[1]  # the model answers, not two empty strings


@needs_smollm2
def test_smollm2_exported_still_knows_the_capital_of_france(tmp_path):
    """The real model with adapters, written as F16 (the default): greedy picks the same token at
    every position of the prompt as the model with its adapters, the ten likeliest next tokens
    within 0.05 nats, and it still answers Paris."""
    cache = tmp_path / "cache"
    run = trained_adapters(SMOLLM2, tmp_path / "run", cache, seed=1, std=0.005)
    cfg = make_config(None, [("model.path", str(SMOLLM2)), ("model.gguf_cache", str(cache))])
    out = export_gguf(cfg, str(run), None, "F16", say=lambda _: None)
    from mlx_lm import generate
    from mlx_lm.utils import load

    model, tokenizer = load(json.loads((run / "adapter_config.json").read_text())["model"], adapter_path=str(run))
    exported, _ = load(model_dir(ModelConfig(path=str(out), gguf_cache=str(cache)), say=lambda _: None))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    ids = mx.array(tokenizer.encode(prompt))[None]

    def logprobs(m) -> np.ndarray:
        z = m(ids)[0].astype(mx.float32)
        return np.array(z - mx.logsumexp(z, -1, keepdims=True))

    a, b = logprobs(model), logprobs(exported)
    top = np.argsort(-a[-1])[:10]
    assert (a.argmax(-1) == b.argmax(-1)).all() and np.abs(a[-1, top] - b[-1, top]).max() < 0.05
    assert "Paris" in generate(exported, tokenizer, prompt, max_tokens=24)
