"""bench --shape: the shapes are the releases' (parameter counts as published), and the shape
benchmark's mechanisms run end to end on the embedded model (the shapes themselves are benchmark
material, too slow for the suite)."""

import math

import pytest
from mlx.utils import tree_flatten

from mlx_grpo import decode
from mlx_grpo.bench_shape import decode_clock, per_token, run_shape_bench, shape_table
from mlx_grpo.shapes import ShapeError, shape_config, shape_dir

# Published parameter counts (tied embeddings counted once).
PUBLISHED = {"qwen2.5-0.5b": 494_032_768, "qwen2.5-1.5b": 1_543_714_304, "llama-3.2-1b": 1_235_814_400}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_shape_has_the_release_parameter_count(name):
    from mlx_lm.utils import _get_classes

    config = shape_config(name)
    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))  # lazy: nothing is initialised
    assert sum(v.size for _, v in tree_flatten(model.parameters())) == PUBLISHED[name]


def test_unknown_shape_and_bits_name_the_choices(tmp_path):
    with pytest.raises(ShapeError, match="known: qwen2.5-0.5b, qwen2.5-1.5b, llama-3.2-1b"):
        shape_config("gpt-5")
    with pytest.raises(ShapeError, match="--bits: must be 0"):
        shape_dir("qwen2.5-0.5b", bits=3, root=tmp_path)


def test_a_4bit_shape_is_converted_as_mlx_lm_converts_a_bfloat16_release(tmp_path):
    """Quantized from bfloat16: packed weights, bfloat16 scales, biases and norms (so Metal and
    CUDA run it in bfloat16, as a real mlx-community 4-bit model), loadable through mlx-lm."""
    import json

    import mlx.core as mx

    from mlx_grpo.config import ModelConfig
    from mlx_grpo.models import load_model

    path = shape_dir("qwen2.5-0.5b", bits=4, layers=1, root=tmp_path)
    assert path.name == "shape-qwen2.5-0.5b-4bit-bf16-1layers"
    config = json.loads((path / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["quantization"]["bits"] == 4
    weights = mx.load(str(path / "model.safetensors"))
    assert {str(v.dtype) for v in weights.values()} == {"mlx.core.uint32", "mlx.core.bfloat16"}
    assert weights["model.layers.0.mlp.down_proj.scales"].dtype == mx.bfloat16
    model, _ = load_model(ModelConfig(path=str(path), float_base=False))
    out = model(mx.array([[1, 2, 3]]))
    assert out.dtype == mx.bfloat16 and out.shape == (1, 3, 151936)
    assert bool(mx.isfinite(out.astype(mx.float32)).all())


def test_per_token_times_compare_the_first_and_last_tenth():
    times = [0.0]
    for i in range(100):  # each gap 1 ms, growing to 2 ms by the end
        times.append(times[-1] + 0.001 * (1 + i / 99))
    d = per_token(times)
    assert d["start_s"] == pytest.approx(0.00106, rel=0.05) and d["end_s"] == pytest.approx(0.00195, rel=0.05)
    assert d["ratio"] == pytest.approx(d["end_s"] / d["start_s"])
    assert math.isnan(per_token([0.0, 1.0])["ratio"])


def test_shape_bench_runs_end_to_end_on_the_embedded_model(embedded_model_dir):
    step = decode.StaticDecoder.step
    r = run_shape_bench(str(embedded_model_dir), max_tokens=12)
    assert decode.StaticDecoder.step is step  # the decode clock put the step back
    ro = r["rollout"]
    assert ro["ours_tokens_per_sec"] > 0 and ro["batch_generate_tokens_per_sec"] > 0
    for key in ("step", "step_beta0"):
        st = r[key]
        assert st["mlx_peak_bytes"] > 0 and st["process_peak_bytes"] >= st["mlx_peak_bytes"] * 0.5
        assert st["estimate_bytes"] > 0 and st["rows_updated"] == 8
    assert r["step"]["beta"] == 0.1 and r["step_beta0"]["beta"] == 0.0
    assert r["limits"]["bandwidth_gbs"] > 0 and r["limits"]["matmul_gflops"] > 0
    for stage in ("generate", "score", "update"):
        assert r["bounds"][stage]["ratio"] > 0 and r["bounds"][stage]["measured_s"] == r["step"][stage]
    assert r["bounds_beta0"]["score"]["ratio"] is None  # beta 0, one iteration: no scoring pass
    assert "rollout ratio, ours / batch_generate" in shape_table(r)


def test_decode_clock_records_each_step_and_restores_on_error():
    times = []
    with pytest.raises(RuntimeError):
        with decode_clock(times):
            assert decode.StaticDecoder.step is not decode.EagerDecoder.step
            raise RuntimeError
    assert "timed" not in decode.StaticDecoder.step.__qualname__
