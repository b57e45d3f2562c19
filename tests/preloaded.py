"""Running a script in a fresh Python with mlx-grpo's kernel library preloaded in front of the
fast BLAS: shared by the tests of the few-row product and of the C decode step."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from mlx_grpo import blas, skinny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE = (sys.platform.startswith("linux") and shutil.which(os.environ.get("CC") or "cc") is not None
        and blas.find_fast_blas(dict(os.environ)) is not None and blas.cpu_backend_in_use())
NEEDS = pytest.mark.skipif(not HAVE, reason="needs Linux's CPU backend, a fast BLAS and a C compiler")


def built(tmp_path):
    lib = skinny.build({**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert lib is not None and os.path.basename(lib).startswith(skinny.NAME)
    return lib


def run_preloaded(script, lib, tmp_path, alone=False):
    """``script`` in a fresh Python with the library preloaded in front of the fast BLAS (``alone``:
    with no BLAS after it); its last line of output as JSON, and its stderr."""
    preload = lib if alone else f"{lib}:{blas.find_fast_blas(dict(os.environ))}"
    path = tmp_path / "script.py"
    path.write_text(f"import sys; sys.path.insert(0, {ROOT!r})\n" + textwrap.dedent(script))
    r = subprocess.run([sys.executable, str(path)], capture_output=True, text=True,
                       env={**os.environ, "LD_PRELOAD": preload, blas.MARKER: "1", "MLX_GRPO_NO_FAST_BLAS": "1"})
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1]), r.stderr


# The models both C passes are checked on, as a snippet a preloaded script starts with: ``build``
# makes one (3 layers, grouped key heads, LoRA adapters that move the outputs: B is zero when LoRA
# starts), ``CASES`` names each with its prompts -- 20 shared tokens (padding lands inside the
# prompts) or none (left padding); an untied head; qwen2's biases; heads of 80 (whole vectors: 64 +
# 16) with 3 query heads a key head, so a chunk of 8 queries ends inside a row.
MODELS = """
    import json
    import mlx.core as mx, mlx.nn as nn, numpy as np
    from mlx_lm.models import llama, qwen2
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx.utils import tree_map

    def build(kind, **kw):
        mx.random.seed(3)
        mod = {"llama": llama, "qwen2": qwen2}[kind]
        shape = dict(hidden_size=72, num_attention_heads=4, num_key_value_heads=2)
        shape.update(kw)
        args = mod.ModelArgs(model_type=kind, num_hidden_layers=3, intermediate_size=300, rms_norm_eps=1e-5,
                             vocab_size=301, rope_theta=500.0, **shape)
        model = mod.Model(args)
        linear_to_lora_layers(model, 3, {"rank": 4, "scale": 2.0, "dropout": 0.0})
        model.update(tree_map(lambda p: mx.random.normal(p.shape) * 0.05, model.trainable_parameters()))
        model.eval()
        mx.eval(model.parameters())
        return model

    prefix = list(range(5, 25))
    shared = [prefix + [40, 41, 42], prefix + [50, 51, 52, 53, 54, 55, 56], prefix + [60]]
    apart = [[7, 8, 9], [30, 31, 32, 33, 34, 35, 36, 37], [60, 61, 62, 63, 64]]
    CASES = [("llama-gqa-tied", "llama", {"tie_word_embeddings": True}, shared),
             ("llama-left-padded", "llama", {"tie_word_embeddings": True}, apart),
             ("llama-untied", "llama", {"tie_word_embeddings": False}, shared),
             ("qwen2-bias", "qwen2", {"tie_word_embeddings": False}, shared),
             ("llama-heads-of-80", "llama", {"tie_word_embeddings": True, "hidden_size": 480,
                                             "num_attention_heads": 6}, apart)]
"""
