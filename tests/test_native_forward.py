"""The forward pass in C (native_forward.py, csrc/forward.c) as the scoring pass: the same completion
log-probabilities as MLX's (logprobs.completion_logprobs) on models built here with every shape it
must handle (grouped key heads, biases, an untied head, heads of 80 with 3 query heads a key head,
padding inside or before the prompts, a shared prefix run once), with the adapters switched off (the
KL reference) and on (the policy), rows of every length from 0 to the full width, rows cut into
several calls. Its prefill feeds the C decode step, checked against MLX in test_native_decode.py.
The switch, and models it does not take, send scoring through MLX."""

import mlx.nn as nn

from mlx_grpo import native_forward
from preloaded import MODELS, NEEDS, built, run_preloaded

COMPARE = MODELS + """
    from contextlib import nullcontext
    from mlx_grpo import fastmath, logprobs, native_forward, rollout
    from mlx_grpo.models import adapters_disabled

    out = {}
    G, W = 4, 37  # 12 rows of up to 37 tokens: more than two tiles of 16 own keys
    rng = np.random.default_rng(0)
    completions = mx.array(rng.integers(0, 301, size=(3 * G, W)).astype(np.int32))
    lengths = np.array([W, 0, 1, 2, 16, 17, 33, W, 5, W, 20, 36])
    row_prompt = np.repeat(np.arange(3), G)
    for name, kind, kw, prompts in CASES:
        model = build(kind, **kw)
        tokens, pads = rollout.left_pad(prompts, 0)
        tokens = mx.array(tokens)
        r = {"in_c": native_forward.scores_in_c(model)}
        for adapters in ("off", "on"):
            with fastmath.eager(), (adapters_disabled(model) if adapters == "off" else nullcontext()):
                want = logprobs.completion_logprobs(model, tokens, pads, completions, 0.7, row_prompt, lengths=lengths)
                native_forward.CALL_TOKENS = 4096
                got = native_forward.completion_logprobs(model, tokens, pads, row_prompt, completions, lengths, 0.7)
                native_forward.CALL_TOKENS = 40  # several calls, each a few rows
                cut = native_forward.completion_logprobs(model, tokens, pads, row_prompt, completions, lengths, 0.7)
            mask = np.arange(W)[None, :] < lengths[:, None]
            want, got, cut = (np.array(a) for a in (want, got, cut))
            r[adapters] = {"worst": float(np.abs((want - got) * mask).max()), "cut": float(np.abs(got - cut).max()),
                           "zero_past_length": bool((got[~mask] == 0).all()), "finite": bool(np.isfinite(got).all()),
                           "spread": float(np.abs(want * mask).max())}
        out[name] = r
    print(json.dumps(out))
"""


@NEEDS
def test_every_token_matches_mlx(tmp_path):
    out, _ = run_preloaded(COMPARE, built(tmp_path), tmp_path)
    for name, r in out.items():
        assert r["in_c"], name
        for adapters in ("off", "on"):
            got = r[adapters]
            assert got["finite"] and got["zero_past_length"], (name, adapters, got)
            assert got["cut"] < 1e-5, (name, adapters, got)  # the same sums, in other blocks of rows
            assert got["spread"] > 1.0, (name, adapters, got)  # log-probs far from zero: the check can fail
            assert got["worst"] < 2e-4, (name, adapters, got)


def test_the_switch_and_what_it_does_not_take_score_through_mlx(embedded_model_dir, monkeypatch):
    from mlx_grpo.config import ModelConfig
    from mlx_grpo.models import load_model

    model, _ = load_model(ModelConfig(path=str(embedded_model_dir)))
    model.eval()
    here = native_forward.library() is not None  # pytest's process preloads the library where it can
    assert native_forward.scores_in_c(model) == (here and native_forward.native_decode.unsupported(model) is None)
    monkeypatch.setenv(native_forward.OFF, "1")
    assert not native_forward.scores_in_c(model)
    monkeypatch.delenv(native_forward.OFF)
    monkeypatch.setattr(native_forward, "NATIVE", False)
    assert not native_forward.scores_in_c(model)
    monkeypatch.setattr(native_forward, "NATIVE", None)
    nn.quantize(model, group_size=32, bits=4)  # not float32 Linears: MLX's pass
    assert not native_forward.scores_in_c(model)
