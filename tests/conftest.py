"""Shared fixtures: small real models built here, in the Hugging Face layout."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlx_grpo import blas  # noqa: E402



def pytest_configure(config):
    """Like the CLI: restart once with a fast BLAS preloaded when one is installed (same results,
    10x faster matmuls on Linux CPUs). MLX_GRPO_NO_FAST_BLAS=1 keeps the bundled one."""
    if blas.reexec_env(dict(os.environ)) is None:
        return
    capman = config.pluginmanager.getplugin("capturemanager")
    if capman is not None:  # give the restarted process the real stdout/stderr back
        capman.stop_global_capturing()
    blas.maybe_reexec(["-m", "pytest", *config.invocation_params.args], dict(os.environ))

EMBEDDED = ROOT / "mlx_grpo" / "assets" / "tiny-r1"


@pytest.fixture(autouse=True)
def _full_verdicts():
    """Tests judge symbolic answers as an evaluation does, waiting for math-verify's verdict: a
    reward's bounded wait (answers.MATH_VERIFY_WAIT_S) would make a verdict depend on the machine's
    speed and on what the parser saw before. The bounded wait has tests of its own."""
    from mlx_grpo.rewards.answers import full_verdicts

    with full_verdicts():
        yield


ARITHMETIC_PROMPTS = ["What is 1 + 2 ?", "3 + 4 =", "What is 5 + 5 ?", "2 +"]


def off_reference_rollouts(model_dir, cfg):
    """The small model with adapters whose B moved off zero (LoRA's B starts at zero, where every
    KL and A's gradient is 0), and its rollouts of four arithmetic prompts: (model, rollouts)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    from mlx_grpo.config import ModelConfig
    from mlx_grpo.models import attach_adapters, load_model
    from mlx_grpo.rollout import sample_groups

    model, tok = load_model(ModelConfig(path=str(model_dir)))
    mx.random.seed(0)
    attach_adapters(model, cfg.adapter)
    model.update(tree_unflatten([(k, 0.05 * mx.random.normal(v.shape)) if k.endswith("lora_b") else (k, v)
                                 for k, v in tree_flatten(model.trainable_parameters())]))
    return model, sample_groups(model, tok, ARITHMETIC_PROMPTS, cfg.rollout)


def tf32_matmuls() -> bool:
    """True where MLX runs float32 matmuls in TF32 (a 10-bit mantissa): its CUDA backend. The CPU
    backend (CI) and Metal compute them in full float32."""
    import mlx.core as mx

    cuda = getattr(mx, "cuda", None)
    return mx.default_device().type == mx.gpu and cuda is not None and cuda.is_available()


def tol(cpu: float, tf32: float) -> float:
    """A numerical tolerance: ``cpu`` where float32 is float32, ``tf32`` where matmuls use TF32.

    Two computations of the same numbers in a different order (shared vs separate prompt passes,
    chunked vs whole logits, micro-batches) agree to about 1e-6 relative in float32, to about 1e-3
    with TF32's rounding of every matmul input.
    """
    return tf32 if tf32_matmuls() else cpu


@pytest.fixture
def no_skinny_product(monkeypatch):
    """The restart leaves the few-row product out: for tests of the BLAS and the allocator, whose
    LD_PRELOAD orders would otherwise depend on a C compiler being here (test_skinny.py tests
    where the product goes)."""
    from mlx_grpo import skinny

    monkeypatch.setattr(skinny, "restart_preload", lambda env: None)


@pytest.fixture(scope="session")
def small_model_dir(tmp_path_factory) -> Path:
    """A 2-layer model pre-trained for a few steps: real weights, real tokenizer, built in seconds."""
    from mlx_grpo.assets.make_tiny_model import make

    out = tmp_path_factory.mktemp("small-model")
    make(out, steps=30, seed=0, max_operand=9, hidden=32, layers=2, heads=2, ffn=64, batch=16,
         lr=3e-3, log_every=0)
    return out


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    if not (EMBEDDED / "model.safetensors").exists():
        pytest.fail("the embedded model is missing: python -m mlx_grpo.assets.make_tiny_model")
    return EMBEDDED


def mlx_lm_greedy(model, ids, max_tokens: int, eos) -> list:
    """mlx-lm's own greedy generation for one prompt (token ids up to and including an EOS)."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    out = []
    for t, _ in generate_step(mx.array(ids), model, max_tokens=max_tokens):
        out.append(int(t))
        if int(t) in eos:
            break
    return out


def tree_hash(root: Path) -> dict:
    """Every file under ``root`` with a hash of its bytes: equal before and after means untouched."""
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).rglob("*")) if p.is_file()}


def one_line_error(r, msg: str) -> None:
    """The CLI's bad-input contract: exit 2, exactly one line on stderr, ``error: ...`` holding
    ``msg``, no traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.startswith("error: ") and msg in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def run_cli(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: int = 600):
    """Run ``python cli.py ARGS`` as a real subprocess; returns CompletedProcess."""
    import subprocess

    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), *args], cwd=cwd, env=e, capture_output=True,
        text=True, timeout=timeout,
    )
