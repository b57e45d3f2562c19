"""Models Ollama has pulled, by name: ``ollama:smollm2:135m`` is a GGUF file in Ollama's store.

Ollama keeps a model as a manifest, ``manifests/<host>/<namespace>/<model>/<tag>`` (JSON, as a
container registry writes one), whose layer of media type ``application/vnd.ollama.image.model``
names a blob, ``blobs/sha256-<hex>``: the GGUF file itself, with no suffix. This module finds that
file; ``gguf_convert.py`` converts it like any other. Ollama's server is never contacted and its
store is only read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Tuple

from .errors import UserError

PREFIX = "ollama:"
MODEL_LAYER = "application/vnd.ollama.image.model"
DEFAULT_HOST = "registry.ollama.ai"


class OllamaError(UserError, ValueError):
    """An Ollama model name that does not lead to a model file; the message names it."""


def is_ollama(path: str) -> bool:
    """Whether a model path names a model in Ollama's store (``ollama:NAME[:TAG]``)."""
    return path.startswith(PREFIX)


def stores() -> List[Path]:
    """Where Ollama keeps models: ``$OLLAMA_MODELS`` when set, else the user's store (macOS, Linux,
    Windows) and the Linux service's."""
    if os.environ.get("OLLAMA_MODELS"):
        return [Path(os.environ["OLLAMA_MODELS"]).expanduser()]
    return [Path.home() / ".ollama" / "models", Path("/usr/share/ollama/.ollama/models")]


def manifest_parts(name: str) -> Tuple[str, ...]:
    """``smollm2:135m`` -> (registry.ollama.ai, library, smollm2, 135m), Ollama's own defaults:
    host registry.ollama.ai, namespace library, tag latest (``hf.co/org/repo:Q4_K_M`` keeps its
    host and namespace)."""
    repo, _, tag = name.rpartition(":") if ":" in name.rsplit("/", 1)[-1] else (name, "", "")
    parts = repo.split("/")
    if not repo or any(not p or p in (".", "..") for p in parts) or len(parts) > 3 or tag in (".", ".."):
        raise OllamaError(f"model.path: {PREFIX}{name} is not an Ollama model name (NAME, NAME:TAG or HOST/NAMESPACE/NAME:TAG)")
    parts = [DEFAULT_HOST, "library"][: 3 - len(parts)] + parts
    return (*parts, tag or "latest")


def model_file(spec: str) -> Tuple[Path, str]:
    """The GGUF file of the Ollama model ``spec`` (``ollama:NAME[:TAG]``), and a name for its
    conversion (``smollm2-135m``)."""
    name = spec[len(PREFIX):]
    parts = manifest_parts(name)
    looked = [store / "manifests" / Path(*parts) for store in stores()]
    found = next((m for m in looked if m.is_file()), None)
    if found is None:
        raise OllamaError(f"model.path: {spec}: Ollama has not pulled it (no manifest at "
                          f"{' or '.join(map(str, looked))}): `ollama pull {name}` fetches it")
    try:
        layers = json.loads(found.read_text(encoding="utf-8"))["layers"]
        digest = next(layer["digest"] for layer in layers if layer.get("mediaType") == MODEL_LAYER)
    except StopIteration:
        raise OllamaError(f"model.path: {spec}: its manifest {found} has no model layer ({MODEL_LAYER})") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise OllamaError(f"model.path: {spec}: cannot read its manifest {found} ({type(e).__name__})") from None
    store = found.parents[len(parts)]  # <store>/manifests/<host>/<namespace>/<model>/<tag>
    algorithm, _, hexdigest = str(digest).partition(":")
    # Ollama names blobs sha256-<hex>; versions before 0.1.x used the digest as written
    blobs = [store / "blobs" / f"{algorithm}-{hexdigest}", store / "blobs" / str(digest)]
    well_formed = hexdigest and "/" not in str(digest)  # a digest never leads outside blobs/
    blob = next((b for b in blobs if b.is_file()), None) if well_formed else None
    if blob is None:
        raise OllamaError(f"model.path: {spec}: its model file {blobs[0]} is missing (`ollama pull {name}` again)")
    return blob, "-".join(parts[2:]).replace(":", "-")
