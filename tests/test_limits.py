"""The machine-limit probes (limits.py) and the work a GRPO step's stages are bounded by
(bounds.py), against hand counts on models and rows built here. No timing thresholds: the probes
only have to return sane numbers; what they measure is read from the bench, not asserted."""

import math
import os

import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models import llama
from mlx_lm.tuner.lora import LoRALinear

from mlx_grpo import limits, step
from mlx_grpo.bench import step_work
from mlx_grpo.bounds import (ModelCost, Phase, Rows, bounds_report, continuations, model_cost, positions,
                             step_phases)
from mlx_grpo.config import make_config
from mlx_grpo.limits import measure_bandwidth, measure_limits, measure_matmul


def _finite_positive(x):
    return isinstance(x, float) and math.isfinite(x) and x > 0


def test_probes_return_positive_finite_numbers_at_tiny_sizes():
    assert _finite_positive(measure_bandwidth(megabytes=1, reps=1, min_seconds=0))
    assert _finite_positive(measure_matmul(n=16, reps=2, min_seconds=0.001))
    lim = measure_limits(megabytes=0.5, n=8, reps=1, min_seconds=0)
    assert set(lim) == {"bandwidth_gbs", "matmul_gflops"} and all(map(_finite_positive, lim.values()))


def test_bandwidth_on_the_cpu_counts_the_faster_of_mlx_and_numpy_sums(monkeypatch):
    """MLX's CPU sum is one thread without vector loads: NumPy's sum of as large a buffer counts
    when it is faster, MLX's when NumPy's is slower."""
    import mlx.core as mx

    from mlx_grpo import limits

    if mx.default_device().type != mx.cpu:
        pytest.skip("the host sum is compared on the CPU backend only")
    seen = []
    timed = limits.best_seconds

    def host(run, reps, min_seconds):
        out = run()
        if isinstance(out, mx.array):  # MLX's sum: timed for real
            return timed(run, reps, min_seconds)
        seen.append(float(out))  # NumPy sums its own array of ones: 1.0 per element
        return host.seconds

    monkeypatch.setattr(limits, "best_seconds", host)
    host.seconds = 1e-9
    fast = measure_bandwidth(megabytes=1, reps=1, min_seconds=0)
    assert seen == [250000.0] and math.isclose(fast, 1e6 / 1e-9 / 1e9, rel_tol=1e-6)
    host.seconds = 1e3
    slow = measure_bandwidth(megabytes=1, reps=1, min_seconds=0)
    assert 1e6 / 1e3 / 1e9 < slow < fast


# A 2-layer llama: hidden 64, 4 query heads and 2 KV heads of 16, FFN 128, vocabulary 50.
H, FFN, VOCAB, LAYERS, KV = 64, 128, 50, 2, 2 * 16
PER_LAYER_MATMUL = H * H + H * KV + H * KV + H * H + 3 * H * FFN  # q, k, v, o; gate, up, down
NORMS = LAYERS * 2 * H + H  # two per layer and the final one
BODY = LAYERS * PER_LAYER_MATMUL + NORMS
HEAD = VOCAB * H


def _model(tied: bool) -> nn.Module:
    args = llama.ModelArgs.from_dict(dict(
        model_type="llama", hidden_size=H, num_hidden_layers=LAYERS, intermediate_size=FFN,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=VOCAB,
        tie_word_embeddings=tied))
    return llama.Model(args)


def test_model_cost_counts_a_two_layer_model_by_hand():
    assert BODY == 74048
    untied = model_cost(_model(tied=False))
    # Untied: the embedding is a lookup (neither FLOPs nor a full read per step), lm_head the head.
    assert untied == ModelCost(body_params=BODY, head_params=HEAD, weight_bytes=4 * (BODY + HEAD),
                               attention_width=LAYERS * H, kv_bytes=LAYERS * 2 * KV * 4)
    tied = model_cost(_model(tied=True))  # the embedding table is the head, read once per step
    assert tied == untied
    # 2 FLOPs per body parameter per token, per head parameter per logits position, and
    # 4 x the query width per key attended.
    assert untied.forward_flops(3, 2, 6) == 2 * (3 * BODY + 2 * HEAD) + 4 * LAYERS * H * 6


def test_model_cost_counts_quantized_weights_unpacked_and_lora_parameters():
    m = _model(tied=False)
    nn.quantize(m, group_size=64, bits=4)
    q = model_cost(m)
    assert (q.body_params, q.head_params) == (BODY, HEAD)  # the values the packed words stand for
    # 4-bit weights with float32 scales and biases per 64 values: 0.5 + 8/64 bytes per weight;
    # the norms stay float32.
    matmul = LAYERS * PER_LAYER_MATMUL + HEAD
    assert q.weight_bytes == matmul * (0.5 + 8 / 64) + 4 * NORMS

    m = _model(tied=False)
    attn = m.model.layers[0].self_attn
    attn.q_proj = LoRALinear.from_base(attn.q_proj, r=4)
    with_lora = model_cost(m)
    assert with_lora.body_params == BODY + 4 * (H + H)  # A: 64 x 4, B: 4 x 64
    assert with_lora.attention_width == LAYERS * H  # the q_proj inside the adapter still counts


def test_positions_share_the_common_prefix_and_continuations_count_context():
    # Two prompts sharing 3 tokens: the prefix once, each remainder once; the duplicate is free.
    p = positions([[1, 2, 3, 4, 5], [1, 2, 3, 9], [1, 2, 3, 4, 5]])
    assert p.tokens == 3 + 2 + 1
    assert p.context == (1 + 2 + 3) + (4 + 5) + 4  # each position attends itself and all before
    # Every prompt keeps a token of its own: [1, 2] and [1, 2, 3] share only [1].
    assert positions([[1, 2], [1, 2, 3]]) == (1 + 1 + 2, 1 + 2 + (2 + 3))
    assert positions([[7, 8, 9]]) == (3, 6)
    # Rows of 3 and 1 tokens after prompts of 5 and 4: positions 6, 7 and none.
    assert continuations([5, 4], [3, 1]) == (2, 6 + 7)


def _limits(flops_per_s: float, bytes_per_s: float):
    return {"matmul_gflops": flops_per_s / 1e9, "bandwidth_gbs": bytes_per_s / 1e9}


def test_step_phases_and_bounds_by_hand():
    cost = ModelCost(body_params=100, head_params=10, weight_bytes=1000, attention_width=2, kv_bytes=8)
    rows = Rows(prompts=[[1, 2], [1, 3]], row_prompt=[0, 0, 1, 1], lengths=[3, 1, 2, 2])
    cfg = make_config(None, [("grpo.beta", 0.1), ("grpo.num_iterations", 1), ("adapter.type", "lora")])
    ph = step_phases(cost, [rows], rows, cfg)
    # Prefill: prefix [1] once + the two own tokens (3 positions, 1 + 2 + 2 keys), logits at 2.
    prefill = Phase(2 * (100 * 3 + 10 * 2) + 4 * 2 * 5, 1000)
    # Decode: 2 + 0 + 1 + 1 positions after prompts of 2 (keys 3+4, -, 3, 3), logits at each;
    # the longest row (3 tokens) takes 2 steps, each reading the weights; every row its own keys.
    decode = Phase(2 * (100 * 4 + 10 * 4) + 4 * 2 * 13, 2 * 1000 + 13 * 8)
    assert ph["generate"] == [prefill, decode]
    # Scoring (beta > 0: the reference pass only): prompts and completions, logits at all 8 tokens.
    fwd = Phase(2 * (100 * 7 + 10 * 8) + 4 * 2 * 18, 1000)
    assert ph["score"] == [fwd]
    assert ph["update"] == [Phase(2 * fwd.flops, 2000)]  # LoRA: forward + backward through activations

    # 1000 FLOP/s and 1000 B/s: prefill 1.0 s (reads), decode 2.104 s (reads), score 1.704 s (FLOPs).
    b = bounds_report({"generate": 6.208, "score": 1.704, "update": 34.08}, [ph], _limits(1000, 1000))
    assert b["generate"]["bound_s"] == pytest.approx(3.104) and b["generate"]["ratio"] == pytest.approx(2.0)
    assert b["generate"]["limited_by"] == "bandwidth"
    assert b["score"]["bound_s"] == pytest.approx(1.704) and b["score"]["limited_by"] == "matmul"
    assert b["update"]["ratio"] == pytest.approx(10.0) and b["update"]["gflop"] == pytest.approx(3.408e-6)

    # beta 0 and two iterations: the scoring pass is the sampling policy's; two updates.
    cfg2 = make_config(None, [("grpo.beta", 0.0), ("grpo.num_iterations", 2)])
    ph2 = step_phases(cost, [rows], rows, cfg2)
    assert ph2["score"] == [fwd] and ph2["update"] == [Phase(2 * fwd.flops, 2000)] * 2
    # beta 0, one iteration: scoring runs no pass, so it has no bound (ratio None).
    ph3 = step_phases(cost, [rows], rows, make_config(None, [("grpo.beta", 0.0)]))
    assert ph3["score"] == []
    assert bounds_report({"generate": 1, "score": 0.01, "update": 1}, [ph3], _limits(1, 1))["score"]["ratio"] is None
    # Full fine-tuning adds the weight gradients: 3 forwards' FLOPs.
    full = step_phases(cost, [rows], rows, make_config(None, [("grpo.beta", 0.1), ("adapter.type", "full")]))
    assert full["update"] == [Phase(3 * fwd.flops, 2000)]


def test_step_work_puts_the_step_functions_back():
    roll_out, select_rows = step.roll_out, step.select_rows
    with pytest.raises(RuntimeError):
        with step_work({"rollouts": [], "batch": None}):
            assert step.roll_out is not roll_out
            raise RuntimeError
    assert (step.roll_out, step.select_rows) == (roll_out, select_rows)


def test_the_bandwidth_probe_reads_on_as_many_threads_as_the_products_use(monkeypatch):
    from mlx_grpo import blas

    monkeypatch.setattr(blas, "threads", lambda env: 1)  # OPENBLAS_NUM_THREADS=1 beside other runs
    assert limits.cpu_threads() == 1
    monkeypatch.setattr(blas, "threads", lambda env: None)  # no BLAS preloaded: the cores allowed
    assert limits.cpu_threads() == len(os.sched_getaffinity(0))
    monkeypatch.setattr(limits, "cpu_threads", lambda: 3)
    sizes = []
    split = np.array_split
    monkeypatch.setattr(np, "array_split", lambda a, k: sizes.append((a.size, k)) or split(a, k))
    assert _finite_positive(measure_bandwidth(megabytes=1, reps=1, min_seconds=0))
    assert sizes == [(250000, 3)]  # the whole array, in three slices read at once
