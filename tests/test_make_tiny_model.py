"""The embedded model is made by a deterministic script and loads as a Hub model does."""

import json

from mlx_grpo.assets.make_tiny_model import make


def test_two_runs_write_byte_identical_files(tmp_path):
    kw = dict(steps=6, seed=5, max_operand=9, hidden=32, layers=1, heads=2, ffn=32, batch=8, lr=3e-3,
              log_every=0, polish_steps=3)
    make(tmp_path / "a", **kw)
    make(tmp_path / "b", **kw)
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_stage_three_from_a_stage_two_model_equals_the_full_build(tmp_path):
    """``--from`` (how the committed tiny-r1's third stage was run) gives the bytes of one run of
    all three stages."""
    kw = dict(steps=6, seed=5, max_operand=9, hidden=32, layers=1, heads=2, ffn=32, batch=8, lr=3e-3,
              log_every=0, polish_steps=3)
    make(tmp_path / "two", **kw)
    make(tmp_path / "three", **kw, tag_steps=3)
    make(tmp_path / "continued", **kw, tag_steps=3, start_from=tmp_path / "two")
    weights = [(tmp_path / d / "model.safetensors").read_bytes() for d in ("two", "three", "continued")]
    assert weights[1] == weights[2]
    assert weights[0] != weights[1]  # stage 3 trained
    meta = json.loads((tmp_path / "continued" / "pretraining.json").read_text())
    assert meta["tag_steps"] == 3 and len(meta["stages_1_2_from_sha256"]) == 64


def test_embedded_model_loads_through_mlx_lm(embedded_model_dir):
    from mlx_lm import load

    model, tok = load(str(embedded_model_dir))
    conf = json.loads((embedded_model_dir / "config.json").read_text())
    assert conf["model_type"] == "llama"
    size = (embedded_model_dir / "model.safetensors").stat().st_size
    assert size < 6_000_000
    ids = tok.encode("What is 3 + 4 ? <think>")
    assert tok.decode(ids) == "What is 3 + 4 ? <think>"
    for tag in ("<think>", "</think>", "<answer>", "</answer>", "17", "99"):
        assert len(tok.encode(tag, add_special_tokens=False)) == 1, tag
