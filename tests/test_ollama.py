"""A model Ollama has pulled loads by its name (``--model ollama:NAME[:TAG]``) or by its blob's
path, from a store laid out as Ollama lays it out; Ollama's store is only read; a name that does
not lead to a model file is one line naming it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from conftest import one_line_error, run_cli, tree_hash
from gguf_files import train_bpe, write_gguf
from mlx_grpo.config import ModelConfig
from mlx_grpo.models import model_dir
from mlx_grpo.ollama import OllamaError, manifest_parts, model_file, stores
from test_gguf import made

pytest.importorskip("gguf")  # the test extra installs it: llama.cpp's writer makes the files


def ollama_store(root: Path, name: str, tag: str, gguf: Path, namespace: str = "library",
                 host: str = "registry.ollama.ai") -> Path:
    """Ollama's layout: the GGUF file as blobs/sha256-<its digest>, a manifest naming it beside a
    template layer and a config, as ``ollama pull`` leaves them. Returns the blob."""
    data = gguf.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    blob = root / "blobs" / f"sha256-{digest}"
    blob.write_bytes(data)
    template = b"{{ .Prompt }}"
    (root / "blobs" / f"sha256-{hashlib.sha256(template).hexdigest()}").write_bytes(template)
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": "sha256:" + "0" * 64, "size": 2},
        "layers": [
            {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}", "size": len(data)},
            {"mediaType": "application/vnd.ollama.image.template",
             "digest": f"sha256:{hashlib.sha256(template).hexdigest()}", "size": len(template)},
        ],
    }
    where = root / "manifests" / host / namespace / name
    where.mkdir(parents=True, exist_ok=True)
    (where / tag).write_text(json.dumps(manifest))
    return blob


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """An Ollama store holding tiny:q8 (a qwen2 model written here), and the plain .gguf file."""
    root = tmp_path_factory.mktemp("ollama")
    tok = train_bpe("smollm")
    config, weights = made("qwen2", tok)
    src = write_gguf(root / "src" / "tiny.gguf" if (root / "src").mkdir() is None else None,
                     "qwen2", config, weights, tok, "Q8_0")
    blob = ollama_store(root / "models", "tiny", "q8", src)
    return root / "models", blob, src


@pytest.mark.parametrize("name,parts", [
    ("smollm2", ("registry.ollama.ai", "library", "smollm2", "latest")),
    ("smollm2:135m", ("registry.ollama.ai", "library", "smollm2", "135m")),
    ("someone/model:v1", ("registry.ollama.ai", "someone", "model", "v1")),
    ("hf.co/bartowski/SmolLM2-135M-Instruct-GGUF:Q4_K_M", ("hf.co", "bartowski", "SmolLM2-135M-Instruct-GGUF", "Q4_K_M")),
    ("localhost:5000/team/model", ("localhost:5000", "team", "model", "latest")),
])
def test_names_follow_ollamas_defaults(name, parts):
    assert manifest_parts(name) == parts


@pytest.mark.parametrize("name", ["", ":tag", "a/b/c/d", "../../etc:passwd", "a//b", "x:.."])
def test_a_name_ollama_would_not_take_is_refused(name):
    with pytest.raises(OllamaError, match="is not an Ollama model name"):
        manifest_parts(name)


def test_the_store_is_ollama_models_or_the_users(monkeypatch, tmp_path):
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "elsewhere"))
    assert stores() == [tmp_path / "elsewhere"]
    monkeypatch.setenv("OLLAMA_MODELS", "")  # set but empty: as if unset, as Ollama reads it
    monkeypatch.setenv("HOME", str(tmp_path))
    assert stores()[0] == tmp_path / ".ollama" / "models"


def test_a_name_finds_the_model_blob(store, monkeypatch):
    root, blob, _ = store
    monkeypatch.setenv("OLLAMA_MODELS", str(root))
    assert model_file("ollama:tiny:q8") == (blob, "tiny-q8")


def test_the_blob_by_its_path_is_a_gguf_file_without_the_suffix(store, tmp_path):
    """Ollama's blobs have no .gguf suffix: the file's first bytes say what it is, and it converts
    to the same weights as the .gguf file it was copied from."""
    _, blob, src = store
    cache = str(tmp_path / "cache")
    from_blob = Path(model_dir(ModelConfig(path=str(blob), gguf_cache=cache), say=lambda _: None))
    from_file = Path(model_dir(ModelConfig(path=str(src), gguf_cache=cache), say=lambda _: None))
    assert from_blob != from_file  # named by their stems ...
    assert from_blob.name.split("-")[-2] == from_file.name.split("-")[-2]  # ... keyed by the same content
    assert (from_blob / "model.safetensors").read_bytes() == (from_file / "model.safetensors").read_bytes()


def test_eval_and_generate_take_an_ollama_name_and_leave_the_store_as_it_was(store, tmp_path):
    root, _, _ = store
    before = tree_hash(root)
    env = {"OLLAMA_MODELS": str(root), "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    r = run_cli("eval", "--model", "ollama:tiny:q8", "--n", "2", "--set", "prompt.kind=chat", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("converting") == 1 and "(GGUF)" in r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["n"] == 2
    [converted] = (tmp_path / "xdg" / "mlx-grpo" / "gguf").iterdir()
    assert converted.name.startswith("tiny-q8-")
    r = run_cli("generate", "--model", "ollama:tiny:q8", "--prompt", "What is 1 + 2 ?", "--max-tokens", "4", env=env)
    assert r.returncode == 0, r.stderr
    assert "converting" not in r.stderr  # the conversion is reused
    assert tree_hash(root) == before


def broken_store(tmp_path: Path, store, how: str) -> Path:
    """A copy of the store's manifest and blob, damaged one way."""
    root, blob, src = store
    copy = tmp_path / "models"
    blob = ollama_store(copy, "tiny", "q8", src)
    manifest = copy / "manifests" / "registry.ollama.ai" / "library" / "tiny" / "q8"
    if how == "no model layer":
        m = json.loads(manifest.read_text())
        m["layers"] = [layer for layer in m["layers"] if layer["mediaType"] != "application/vnd.ollama.image.model"]
        manifest.write_text(json.dumps(m))
    elif how == "damaged manifest":
        manifest.write_text(manifest.read_text()[:40])
    elif how == "missing blob":
        blob.unlink()
    return copy


@pytest.mark.parametrize("how,spec,message", [
    ("not pulled", "ollama:tiny:nope",
     r"model\.path: ollama:tiny:nope: Ollama has not pulled it \(no manifest at .*nope\): `ollama pull tiny:nope` fetches it"),
    ("no model layer", "ollama:tiny:q8", r"its manifest .*q8 has no model layer \(application/vnd\.ollama\.image\.model\)"),
    ("damaged manifest", "ollama:tiny:q8", r"ollama:tiny:q8: cannot read its manifest .*q8 \(JSONDecodeError\)"),
    ("missing blob", "ollama:tiny:q8", r"its model file .*blobs/sha256-[0-9a-f]{64} is missing \(`ollama pull tiny:q8` again\)"),
    ("bad name", "ollama:a/b/c/d", r"ollama:a/b/c/d is not an Ollama model name"),
])
def test_a_name_that_leads_to_no_model_file_is_one_line_naming_it(tmp_path, store, how, spec, message):
    import re

    root = broken_store(tmp_path, store, how)
    r = run_cli("eval", "--model", spec, "--n", "1", env={"OLLAMA_MODELS": str(root), "XDG_CACHE_HOME": str(tmp_path / "xdg")})
    one_line_error(r, "model.path: ")
    assert re.search(message, r.stderr), r.stderr
    assert not (tmp_path / "xdg" / "mlx-grpo" / "gguf").exists()
