"""The decode step in C (native_decode.py, csrc/decode.c): the same log-probabilities as MLX's
static decode step, step after step, on models built here with every shape it must handle (grouped
key heads, biases, head and hidden sizes off the vector width and on it, an FFN deeper than a pass
of the products (KC), more rows than one block, more queries to a prompt's keys than one chunk,
padding inside or before the prompts, LoRA adapters folded in, rows dropped mid-way, an untied
head), the same rollouts, and MLX's path wherever it does not apply."""

import mlx.core as mx
import mlx.nn as nn

from mlx_grpo import native_decode
from preloaded import MODELS, NEEDS, built, run_preloaded

# Prefill both ways from the same prompts, then feed both decoders the same tokens (MLX's argmax
# shifted by the row's index, so no two rows agree; a temperature of 0.7 on both) and compare every
# step's log-probabilities over the whole vocabulary; drop two rows at step 5.
COMPARE = MODELS + """
    from mlx_grpo import fastmath, native_decode, rollout
    from mlx_grpo.models import adapters_folded

    def spread(logits):  # each row its own token: a group's rows must not share completion keys
        return (mx.argmax(logits, axis=-1) + mx.arange(logits.shape[0])) % logits.shape[-1]

    out = {}
    for name, kind, kw, prompts in CASES:
        model = build(kind, **kw)
        reason = native_decode.unsupported(model)
        tokens, pads = rollout.left_pad(prompts, 0)
        G, T = 4, 12  # 12 rows: a block of 8 and one of 4
        with fastmath.eager():
            l_native, nat = rollout._start_native(model, tokens, pads, G, T, 1 / 0.7)
            with adapters_folded(model):
                l_mlx, ref = rollout._start_static(model, tokens, pads, G, T, 1 / 0.7, True)
                y = spread(l_mlx)
                worst, same = float(mx.abs(l_native - l_mlx).max()), True
                for s in range(T):
                    a, b = ref.step(y), nat.step(y)
                    worst = max(worst, float(mx.abs(a - b).max()))
                    same = same and bool((mx.argmax(a, -1) == mx.argmax(b, -1)).all())
                    y = spread(a)
                    if s == 5:
                        keep = mx.array([0, 3, 4, 5])
                        ref.keep(keep), nat.keep(keep)
                        y = y[keep]
        out[name] = {"unsupported": reason, "worst": worst, "same_argmax": same, "rows": int(y.shape[0])}
    print(json.dumps(out))
"""


@NEEDS
def test_every_step_matches_mlx(tmp_path):
    out, _ = run_preloaded(COMPARE, built(tmp_path), tmp_path)
    for name, r in out.items():
        assert r["unsupported"] is None, name
        assert r["rows"] == 4
        assert r["same_argmax"], name
        assert r["worst"] < 2e-4, (name, r["worst"])


ROLLOUT = """
    import json, os
    import numpy as np
    from mlx_grpo import native_decode, rollout
    from mlx_grpo.bench import BenchSettings, Session, bench_config
    steps = []
    step = native_decode.NativeDecoder.step
    native_decode.NativeDecoder.step = lambda self, y: steps.append(1) or step(self, y)
    runs = {}
    for prompts in (2, 32):  # 8 rows, and 128 (the embedded default's batch)
        sess = Session(bench_config(None, None, BenchSettings(prompts=prompts, group_size=4, max_tokens=12)))
        for native in (True, False):
            rollout.NATIVE = native
            before = len(steps)
            ro = sess.ours(temperature=0.0)
            runs[f"{prompts}-{native}"] = {"tokens": np.asarray(ro.tokens).tolist(), "steps": len(steps) - before,
                                           "logprobs": np.asarray(ro.sample_logprobs).tolist()}
    print(json.dumps({"runs": runs}))
"""


@NEEDS
def test_a_rollout_decodes_in_c_with_the_same_tokens(tmp_path):
    out, _ = run_preloaded(ROLLOUT, built(tmp_path), tmp_path)
    import numpy as np

    for prompts in (2, 32):
        c, m = out["runs"][f"{prompts}-True"], out["runs"][f"{prompts}-False"]
        assert c["steps"] > 0 and m["steps"] == 0
        assert len(c["tokens"]) == prompts * 4
        assert c["tokens"] == m["tokens"]
        assert np.allclose(np.array(c["logprobs"]), np.array(m["logprobs"]), atol=1e-4)


def _llama(**kw):
    from mlx_lm.models import llama

    args = llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=96,
                           num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=128,
                           **kw)
    model = llama.Model(args)
    model.eval()
    return model


def test_what_it_does_not_take_decodes_through_mlx():
    assert native_decode.model_unsupported(_llama()) is None
    assert "training mode" in native_decode.model_unsupported(_llama().train())
    quantized = _llama()
    nn.quantize(quantized, group_size=32, bits=4)
    assert "not a float32" in native_decode.model_unsupported(quantized)
    scaled = _llama(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64})
    assert "RoPE" in native_decode.model_unsupported(scaled)
    half = _llama()
    half.set_dtype(mx.bfloat16)
    assert native_decode.model_unsupported(half) is not None
    other = _llama()
    other.model_type = "gemma"
    assert "not one of" in native_decode.model_unsupported(other)
    if native_decode.library() is None:  # pytest's own process: nothing preloaded
        assert "not loaded" in native_decode.unsupported(_llama())


def test_the_switch_sends_every_rollout_through_mlx(embedded_model_dir, monkeypatch):
    from mlx_grpo import rollout
    from mlx_grpo.config import ModelConfig, RolloutConfig
    from mlx_grpo.models import load_model

    model, tok = load_model(ModelConfig(path=str(embedded_model_dir)))
    steps = []
    real = native_decode.NativeDecoder.step
    monkeypatch.setattr(native_decode.NativeDecoder, "step", lambda self, y: steps.append(1) or real(self, y))
    cfg = RolloutConfig(group_size=2, max_tokens=4, temperature=0.0, stop=[])
    first = rollout.sample_groups(model, tok, ["1+1=", "2+2="], cfg)
    used = len(steps)
    assert used > 0 or native_decode.unsupported(model) is not None  # pytest's process preloads it where it can
    monkeypatch.setenv(native_decode.OFF, "1")
    second = rollout.sample_groups(model, tok, ["1+1=", "2+2="], cfg)
    assert len(steps) == used
    assert first.tokens.tolist() == second.tokens.tolist()
