"""Batched group decoding against mlx-lm's own one-prompt-at-a-time generation."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_grpo.config import ModelConfig, RolloutConfig
from mlx_grpo.models import load_model
from mlx_grpo.rollout import sample_groups, stop_token_ids
from mlx_grpo.logprobs import completion_logprobs

from conftest import mlx_lm_greedy, tol


@pytest.fixture(scope="module")
def model_tok(small_model_dir):
    return load_model(ModelConfig(path=str(small_model_dir)))


# Prompts of different token lengths, so rows are left-padded.
PROMPTS = ["What is 3 + 4 ?", "tags : <think> </think> What is 1 + 2 ? <think>", "5 + 5 ="]


def assert_same_rollouts(a, b) -> None:
    """Two rollouts record the same thing: texts, stops, tokens, masks and log-probabilities."""
    assert a.texts == b.texts and a.truncated == b.truncated
    assert np.array_equal(np.array(a.tokens), np.array(b.tokens))
    assert np.array_equal(np.array(a.mask), np.array(b.mask))
    assert mx.abs(a.sample_logprobs - b.sample_logprobs).max().item() < tol(1e-5, 1e-2)


def test_greedy_batch_equals_mlx_lm_one_at_a_time(model_tok):
    model, tok = model_tok
    cfg = RolloutConfig(group_size=2, max_tokens=12, temperature=0.0, stop=[])
    ro = sample_groups(model, tok, PROMPTS, cfg)
    for p, prompt in enumerate(PROMPTS):
        want = mlx_lm_greedy(model, tok.encode(prompt), 12, set(tok.eos_token_ids))
        for g in range(2):
            row = p * 2 + g
            n = int(ro.mask[row].sum().item())
            assert ro.tokens[row, :n].tolist() == want


def test_sampled_logprobs_equal_scoring_pass(model_tok):
    model, tok = model_tok
    mx.random.seed(3)
    cfg = RolloutConfig(group_size=4, max_tokens=10, temperature=0.7, stop=[])
    ro = sample_groups(model, tok, PROMPTS, cfg)
    lp = completion_logprobs(model, ro.prompt_tokens, ro.left_padding, ro.tokens, 0.7, ro.row_prompt)
    diff = mx.abs((lp - ro.sample_logprobs) * ro.mask).max().item()
    assert diff < 1e-4
    assert len(ro.texts) == 12 and ro.tokens.shape[0] == 12


def test_seeded_sampling_is_reproducible_and_groups_differ(model_tok):
    model, tok = model_tok
    cfg = RolloutConfig(group_size=6, max_tokens=10, temperature=1.0, stop=[])
    mx.random.seed(0)
    a = sample_groups(model, tok, PROMPTS[:1], cfg)
    mx.random.seed(0)
    b = sample_groups(model, tok, PROMPTS[:1], cfg)
    assert a.texts == b.texts
    assert len(set(a.texts)) > 1  # G samples of one prompt, not one sample copied


def test_stop_strings_end_rows(model_tok):
    model, tok = model_tok
    _, ids, text_stops = stop_token_ids(tok, ["+", "= 1"])
    assert tok.encode("+", add_special_tokens=False)[0] in ids  # a one-token stop is checked on ids
    assert text_stops == ["= 1"]  # a longer one on text
    mx.random.seed(1)
    cfg = RolloutConfig(group_size=8, max_tokens=16, temperature=1.0, stop=["+", "= 1"])
    ro = sample_groups(model, tok, PROMPTS, cfg)
    stopped = 0
    for text, trunc in zip(ro.texts, ro.truncated):
        body = text[:-1] if text.endswith("+") else text
        assert "+" not in body
        if not trunc:
            stopped += 1
    assert stopped > 0


def test_top_k_one_is_greedy(model_tok):
    model, tok = model_tok
    greedy = sample_groups(model, tok, PROMPTS, RolloutConfig(group_size=2, max_tokens=8, temperature=0.0, stop=[]))
    topk = sample_groups(model, tok, PROMPTS, RolloutConfig(group_size=2, max_tokens=8, temperature=1.0, top_k=1, stop=[]))
    assert greedy.texts == topk.texts


def test_shared_prefill_cache_gives_the_logits_of_a_separate_prefill(model_tok):
    """Prefill once + repeat the cache G times == prefill every row; then one decode step agrees."""
    from mlx_grpo.forward import batch_cache
    from mlx_grpo.rollout import encode_prompt, left_pad, repeat_cache

    model, tok = model_tok
    prompts, pad = left_pad([encode_prompt(tok, p) for p in PROMPTS], 0)
    G = 3
    shared = batch_cache(model, pad)
    first_shared = mx.repeat(model(prompts, cache=shared)[:, -1, :], G, axis=0)
    repeat_cache(shared, G)
    separate = batch_cache(model, [p for p in pad for _ in range(G)])
    first_separate = model(mx.repeat(prompts, G, axis=0), cache=separate)[:, -1, :]
    assert mx.abs(first_shared - first_separate).max().item() < 1e-5
    nxt = mx.arange(3 * G)[:, None] + 5
    a = model(nxt, cache=shared)[:, -1, :]
    b = model(nxt, cache=separate)[:, -1, :]
    assert mx.abs(a - b).max().item() < 1e-5
    # Each row alone, unpadded, gives the same logits too (padding is invisible).
    for r in range(3 * G):
        ids = encode_prompt(tok, PROMPTS[r // G]) + [5 + r]
        alone = model(mx.array([ids]))[0, -1, :]
        assert mx.abs(alone - a[r]).max().item() < 1e-4


def test_rollout_logprobs_match_a_plain_forward_pass(model_tok):
    """The recorded logprob of each sampled token equals log softmax(model(prompt + prefix) / T)."""
    model, tok = model_tok
    mx.random.seed(5)
    T = 0.8
    ro = sample_groups(model, tok, PROMPTS, RolloutConfig(group_size=2, max_tokens=8, temperature=T, stop=[]))
    for row in range(len(ro.texts)):
        n = int(ro.mask[row].sum().item())
        prompt = tok.encode(PROMPTS[row // 2])
        seq = mx.array([prompt + ro.tokens[row, :n].tolist()])
        logits = model(seq)[0, len(prompt) - 1 : -1, :] / T
        want = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        want = mx.take_along_axis(want, ro.tokens[row, :n, None], axis=-1)[:, 0]
        assert mx.abs(want - ro.sample_logprobs[row, :n]).max().item() < 1e-4


def test_finished_rows_produce_only_padding(model_tok):
    """After a row's stop token: pad ids, mask 0, logprob 0; the row's length is where it stopped."""
    model, tok = model_tok
    mx.random.seed(2)
    cfg = RolloutConfig(group_size=8, max_tokens=16, temperature=1.0, stop=["+"])
    ro = sample_groups(model, tok, PROMPTS, cfg)
    plus = tok.encode("+", add_special_tokens=False)[0]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    tokens, mask, logps = np.array(ro.tokens), np.array(ro.mask), np.array(ro.sample_logprobs)
    ended = 0
    for r in range(tokens.shape[0]):
        n = int(mask[r].sum())
        assert mask[r, :n].all() and not mask[r, n:].any()
        assert (tokens[r, n:] == pad).all() and (logps[r, n:] == 0).all()
        assert (logps[r, :n] < 0).all() or n == 0
        if not ro.truncated[r]:
            ended += 1
            assert tokens[r, n - 1] in {plus, *tok.eos_token_ids}
    lengths = mask.sum(axis=1)
    assert ended > 0 and lengths.min() < lengths.max()  # rows finished at different steps


def test_compiled_uncompiled_and_mlx_lm_caches_agree(model_tok, monkeypatch):
    """The compiled static-cache step picks the same tokens with the same logprobs as the same step
    uncompiled and as mlx-lm's own batch caches, while finished rows are compacted away.
    (top_k=1: random draws would depend on the batch size, which the paths compact differently.)"""
    from mlx_grpo import rollout

    model, tok = model_tok
    cfg = RolloutConfig(group_size=4, max_tokens=14, temperature=0.9, top_k=1, stop=["+", "="])
    out = []
    for compiled, static in ((True, True), (False, True), (True, False)):
        monkeypatch.setattr(rollout, "plain_kv_layers", lambda m: static)
        mx.random.seed(11)
        out.append(sample_groups(model, tok, PROMPTS, cfg, compiled=compiled))
    a = out[0]
    for b in out[1:]:
        assert a.texts == b.texts
        assert np.array_equal(np.array(a.tokens), np.array(b.tokens))
        assert mx.abs(a.sample_logprobs - b.sample_logprobs).max().item() < 1e-4
    assert any(not t for t in a.truncated)  # rows did finish, so compaction happened


def test_a_failing_compiled_step_falls_back_once_with_a_warning(small_model_dir, capfd, monkeypatch):
    """If the static step cannot be traced for a model, the rollout warns once (one line), decodes
    with mlx-lm's caches instead, and the next rollout goes there directly."""
    monkeypatch.setattr("mlx_grpo.rollout.NATIVE", False)  # the MLX decode step is what this tests
    from mlx_grpo import decode

    model, tok = load_model(ModelConfig(path=str(small_model_dir)))
    cfg = RolloutConfig(group_size=2, max_tokens=6, temperature=0.0, stop=[])
    want = sample_groups(model, tok, PROMPTS, cfg, compiled=False)
    capfd.readouterr()
    calls = []

    def broken(fn, **_):
        def traced(*args):
            calls.append(1)
            raise ValueError("unsupported primitive in this architecture")
        return traced

    monkeypatch.setattr(decode.mx, "compile", broken)
    got = sample_groups(model, tok, PROMPTS, cfg)
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: compiled decoding does not fit")
    assert "unsupported primitive" in err[0]
    assert got.texts == want.texts
    again = sample_groups(model, tok, PROMPTS, cfg)
    assert capfd.readouterr().err == "" and len(calls) == 1  # no second try, no second warning
    assert again.texts == want.texts


def test_the_compiled_step_follows_weight_updates(small_model_dir):
    """The compiled step is reused across rollouts with the weights as inputs: after an update, a
    rollout decodes with the new weights (not the ones of its first trace)."""
    from mlx.utils import tree_map

    model, tok = load_model(ModelConfig(path=str(small_model_dir)))
    cfg = RolloutConfig(group_size=2, max_tokens=10, temperature=0.0, stop=[])
    before = sample_groups(model, tok, PROMPTS, cfg)
    mx.random.seed(7)
    model.update(tree_map(lambda p: p + 0.05 * mx.random.normal(p.shape), model.parameters()))
    after = sample_groups(model, tok, PROMPTS, cfg)
    fresh = sample_groups(model, tok, PROMPTS, cfg, compiled=False)
    assert after.texts == fresh.texts and after.texts != before.texts
    assert mx.abs(after.sample_logprobs - fresh.sample_logprobs).max().item() < 1e-4


def test_row_keys_make_samples_independent_of_how_prompts_are_split(model_tok):
    """Each row draws from its own key: decoding the prompts together or in two parts (as two
    processes do) gives the same completions and log-probabilities."""
    from mlx_grpo.sampling import row_keys

    model, tok = model_tok
    cfg = RolloutConfig(group_size=4, max_tokens=10, temperature=1.0, top_p=0.95, stop=[])
    keys = row_keys(mx.random.key(5), len(PROMPTS), 4)
    assert keys.shape == (12, 2) and len({tuple(k) for k in keys.tolist()}) == 12
    whole = sample_groups(model, tok, PROMPTS, cfg, keys=keys)
    first = sample_groups(model, tok, PROMPTS[:1], cfg, keys=keys[:4])
    rest = sample_groups(model, tok, PROMPTS[1:], cfg, keys=keys[4:])
    assert whole.texts == first.texts + rest.texts
    assert len(set(whole.texts[:4])) > 1  # a group's rows still differ
    for part, rows in ((first, slice(0, 4)), (rest, slice(4, 12))):
        w = part.tokens.shape[1]
        diff = mx.abs(whole.sample_logprobs[rows, :w] - part.sample_logprobs) * part.mask
        assert diff.max().item() < tol(1e-4, 1e-2)
    other = sample_groups(model, tok, PROMPTS, cfg, keys=row_keys(mx.random.key(6), len(PROMPTS), 4))
    assert other.texts != whole.texts


@pytest.mark.parametrize("host", [False, True])
@pytest.mark.parametrize("keyed", [False, True])
def test_sampler_draws_from_the_softmax_of_its_logprobs(host, keyed):
    """Both draws (Gumbel-max on the device, the inverse CDF on the host), with per-row keys or
    the global PRNG, draw token i with probability softmax(logprobs)_i, and return each drawn
    token's log-probability."""
    from mlx_grpo.sampling import Sampler

    n = 4000
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logprobs = mx.log(mx.array([probs.tolist()] * n))
    keys = mx.random.split(mx.random.key(0), n) if keyed else None
    mx.random.seed(1)
    sampler = Sampler(RolloutConfig(temperature=1.0), 1.0, keys, host=host)
    y, lp = sampler(logprobs)
    counts = np.bincount(np.array(y), minlength=4) / n
    assert np.allclose(counts, probs, atol=0.03)
    np.testing.assert_allclose(np.array(lp), np.log(probs)[np.array(y)], atol=1e-6)
    # Each call advances every row's key: a second draw is not a copy of the first.
    assert not np.array_equal(np.array(sampler(logprobs)[0]), np.array(sampler(logprobs)[0]))
    greedy = Sampler(RolloutConfig(temperature=0.0), 0.0, mx.random.split(mx.random.key(0), 3), host=host)
    assert greedy(mx.log(mx.array([[0.2, 0.7, 0.1]] * 3)))[0].tolist() == [1, 1, 1]


def test_inverse_cdf_matches_numpy_over_a_large_vocabulary_and_never_draws_a_zero():
    """The host's two-level search returns what a plain cumulative sum and searchsorted give,
    over a vocabulary that is not a multiple of the block, at the ends of [0, 1) and with
    filtered (-inf) tokens, which it never draws."""
    from mlx_grpo.sampling import inverse_cdf

    rng = np.random.default_rng(0)
    V = 49152 + 37
    logits = rng.normal(0, 3, (6, V)).astype(np.float32)
    logits[:, ::3] = -np.inf  # filtered out
    logits[5, :-1], logits[5, -1] = -np.inf, 0.0  # only the last token has mass
    lp = logits - np.log(np.exp(logits.astype(np.float64)).sum(axis=1, keepdims=True)).astype(np.float32)
    for u in (np.zeros(6), np.full(6, 1 - 2.0**-24), rng.random(6)):
        got = inverse_cdf(lp, u, block=256)
        c = np.cumsum(np.exp(lp.astype(np.float64)), axis=1)
        want = [np.searchsorted(c[r], u[r] * c[r, -1], side="right") for r in range(6)]
        assert np.isfinite(lp[np.arange(6), got]).all()  # never a filtered token
        assert (np.abs(got - np.minimum(want, V - 1)) <= 1).all()  # rounding: at most a neighbour with mass
        assert got[5] == V - 1
    draws = inverse_cdf(np.repeat(lp[:1], 2000, axis=0), rng.random(2000))
    p = np.exp(lp[0].astype(np.float64))
    top = np.argsort(p)[-3:]
    for t in top:  # the most likely tokens come up as often as their probability says
        assert abs((draws == t).mean() - p[t]) < 4 * np.sqrt(p[t] * (1 - p[t]) / 2000) + 1e-3


@pytest.mark.parametrize("host", [False, True])
@pytest.mark.parametrize("keyed", [False, True])
def test_rollouts_sample_the_temperature_scaled_distribution(model_tok, keyed, host, monkeypatch):
    """End to end, with or without per-row keys, drawn on the device or the host: the first
    token's frequencies over many rows follow softmax(logits / T), and the recorded logprob is
    log of that probability (T applied once)."""
    from mlx_grpo import rollout
    from mlx_grpo.rollout import encode_prompt
    from mlx_grpo.sampling import row_keys

    monkeypatch.setattr(rollout, "HOST_SAMPLING", host)
    model, tok = model_tok
    T, n = 2.0, 3000
    prompt = "What is 3 + 4 ? Assistant: <think>"
    logits = model(mx.array([encode_prompt(tok, prompt)]))[0, -1].astype(mx.float32)
    p = np.array(mx.softmax(logits / T))
    mx.random.seed(3)
    keys = row_keys(mx.random.key(5), 1, n) if keyed else None
    ro = sample_groups(model, tok, [prompt], RolloutConfig(max_tokens=1, stop=[]), group_size=n,
                       temperature=T, keys=keys)
    first = np.array(ro.tokens[:, 0])
    logp = np.log(p.astype(np.float64))
    np.testing.assert_allclose(np.array(ro.sample_logprobs[:, 0]), logp[first], atol=tol(1e-4, 1e-2))
    # The mean log p of the drawn tokens estimates E_p[log p] = -H(p), within 4 standard errors.
    se = np.sqrt((p * logp**2).sum() - ((p * logp).sum()) ** 2) / np.sqrt(n)
    assert abs(logp[first].mean() - (p * logp).sum()) < 4 * se
    # The test has the power to see T applied twice (drawing from softmax(logits / T^2)).
    q = np.array(mx.softmax(logits / T**2)).astype(np.float64)
    assert abs((q * logp).sum() - (p * logp).sum()) > 10 * se


@pytest.mark.parametrize("static", [True, False])
def test_pipelined_decoding_draws_what_the_step_by_step_loop_draws(model_tok, monkeypatch, static):
    """Queueing the next decode step before the last token is read back (on by default on a GPU)
    changes nothing a rollout records: with per-row keys the same tokens, log-probabilities and
    stops, while rows finish at different steps and are compacted away (static buffer) or
    dropped at once (mlx-lm's caches)."""
    from mlx_grpo import rollout
    from mlx_grpo.sampling import row_keys

    model, tok = model_tok
    monkeypatch.setattr(rollout, "plain_kv_layers", lambda m: static)
    monkeypatch.setattr(rollout, "HOST_SAMPLING", False)  # the device's draws, as on a GPU
    cfg = RolloutConfig(group_size=6, max_tokens=16, temperature=1.0, stop=["+"])
    keys = row_keys(mx.random.key(9), len(PROMPTS), 6)
    out = {}
    for on in (True, False):
        monkeypatch.setattr(rollout, "PIPELINE", on)
        out[on] = sample_groups(model, tok, PROMPTS, cfg, keys=keys)
    a, b = out[True], out[False]
    assert_same_rollouts(a, b)
    lengths = np.array(a.mask).sum(axis=1)
    assert any(not t for t in a.truncated) and lengths.min() < lengths.max()  # rows ended apart


def test_pipelining_is_off_where_the_log_softmax_evaluates_at_once(model_tok, monkeypatch):
    """Where the decode step's log-softmax runs through NumPy or tokens are drawn on the host
    (both evaluate at once, so nothing would overlap), the loop never queues a step ahead, even
    when asked to."""
    from mlx_grpo import fastmath, rollout

    model, tok = model_tok
    queued = []
    monkeypatch.setattr(rollout.mx, "async_eval", lambda *a: queued.append(1))
    monkeypatch.setattr(rollout, "PIPELINE", True)
    monkeypatch.setattr(rollout, "HOST_SAMPLING", False)
    cfg = RolloutConfig(group_size=2, max_tokens=6, temperature=1.0, stop=[])
    sample_groups(model, tok, PROMPTS, cfg)
    assert queued  # asked for and possible: it queues
    queued.clear()
    monkeypatch.setattr(rollout, "HOST_SAMPLING", True)  # host draws evaluate at once too
    sample_groups(model, tok, PROMPTS, cfg)
    assert not queued
    monkeypatch.setattr(rollout, "HOST_SAMPLING", False)
    monkeypatch.setattr(fastmath, "evaluates", lambda n: True)
    sample_groups(model, tok, PROMPTS, cfg)
    assert not queued


def test_a_buffer_grown_block_by_block_decodes_what_one_whole_buffer_does(model_tok, monkeypatch):
    """The static decoder's key/value buffers grow by ``decode.GROW`` slots (each growth traces the
    compiled step again): tiny blocks, crossed many times, give the tokens and log-probabilities
    of one buffer sized for the whole rollout, with rows compacted away in between."""
    monkeypatch.setattr("mlx_grpo.rollout.NATIVE", False)  # the MLX decode step is what this tests
    from mlx_grpo import decode, rollout
    from mlx_grpo.sampling import row_keys

    model, tok = model_tok
    cfg = RolloutConfig(group_size=4, max_tokens=20, temperature=1.0, stop=["+"])
    keys = row_keys(mx.random.key(4), len(PROMPTS), 4)
    seen = []
    grow = decode.StaticDecoder._grow

    def counting(self):
        grow(self)
        seen.append(self.kv[0].shape[2])

    monkeypatch.setattr(decode.StaticDecoder, "_grow", counting)
    out = {}
    for block in (3, 10**6):
        monkeypatch.setattr(decode, "GROW", block)
        seen.clear()
        out[block] = sample_groups(model, tok, PROMPTS, cfg, keys=keys)
        out[block, "sizes"] = sorted(set(seen))
    small, whole = out[3], out[10**6]
    assert len(out[3, "sizes"]) >= 3 and all(n % 3 == 0 for n in out[3, "sizes"][:-1])  # it grew, by blocks
    assert len(out[10**6, "sizes"]) == 1  # prompt + max_tokens at once
    assert_same_rollouts(small, whole)
    assert any(not t for t in small.truncated)  # rows finished: compaction happened in between


def test_a_decode_step_writes_its_keys_into_the_buffers_in_place(model_tok, monkeypatch):
    """The decoder lets go of its key/value buffers before the compiled step evaluates, so MLX
    writes the new slot into them (``slice_update`` donates an input nobody else holds) rather than
    copying every layer's buffer each step. Checked where the log-softmax evaluates inside the
    step (NumPy's, as on the CPU with a large vocabulary): a copy would hold the buffers twice."""
    from mlx_grpo import decode, fastmath, rollout

    model, tok = model_tok
    monkeypatch.setattr(decode, "GROW", 10**6)  # one buffer, large enough to see a copy
    monkeypatch.setattr(fastmath, "evaluates", lambda n: True)
    prompt_tokens, left_padding = rollout.left_pad([rollout.encode_prompt(tok, p) for p in PROMPTS], 0)
    logits, dec = rollout._start_static(model, prompt_tokens, left_padding, 8, 6000, 1.0, True)
    buffers = sum(a.nbytes for a in dec.kv)
    assert buffers > 20e6
    y = mx.argmax(logits, axis=-1)
    with fastmath.eager():
        for _ in range(3):  # the first traces and compiles
            mx.eval(y)
            mx.synchronize()
            before = mx.get_active_memory()
            mx.reset_peak_memory()
            y = mx.argmax(dec.step(y), axis=-1)
            mx.eval(y, dec.kv)
            grew = mx.get_peak_memory() - before
    assert grew < 0.25 * buffers, (grew, buffers)


def test_folded_adapters_decode_what_the_lora_layers_decode(small_model_dir, monkeypatch):
    """A rollout folds each LoRA layer over a float base into one Linear (W + scale (A B)^T) and
    puts the LoRA layers back after: the same tokens and log-probabilities as the LoRA layers
    decoding themselves (trained adapters, not zeros), the same modules afterwards, also when the
    rollout fails, and nothing folded when the copies would not fit the memory share."""
    monkeypatch.setattr("mlx_grpo.rollout.NATIVE", False)  # the MLX decode step is what this tests
    from mlx.utils import tree_flatten, tree_map

    from mlx_grpo import models, rollout
    from mlx_grpo.config import AdapterConfig
    from mlx_grpo.sampling import row_keys

    model, tok = load_model(ModelConfig(path=str(small_model_dir)))
    models.attach_adapters(model, AdapterConfig(rank=4, keys=None))
    model.eval()
    mx.random.seed(3)
    model.update(tree_map(lambda p: p + 0.2 * mx.random.normal(p.shape), model.trainable_parameters()))
    layers = [m for _, m in models._adapter_modules(model)]
    assert layers
    cfg = RolloutConfig(group_size=4, max_tokens=12, temperature=1.0, stop=["+"])
    keys = row_keys(mx.random.key(2), len(PROMPTS), 4)

    folded_during = []
    real = rollout._sample_groups

    def spy(m, *a, **k):
        folded_during.append(len(models._adapter_modules(m)))  # LoRA layers left during the rollout
        return real(m, *a, **k)

    monkeypatch.setattr(rollout, "_sample_groups", spy)
    folded = sample_groups(model, tok, PROMPTS, cfg, keys=keys)
    monkeypatch.setattr(models, "FOLD_SHARE", 0.0)  # no room: the LoRA layers decode
    as_lora = sample_groups(model, tok, PROMPTS, cfg, keys=keys)
    assert folded_during == [0, len(layers)]  # folded: every LoRA layer was one Linear
    assert_same_rollouts(folded, as_lora)
    assert [m for _, m in models._adapter_modules(model)] == layers  # the same modules, restored
    # The trainable parameters are the LoRA layers' own, untouched.
    assert all(k.endswith(("lora_a", "lora_b")) for k, _ in tree_flatten(model.trainable_parameters()))

    monkeypatch.setattr(models, "FOLD_SHARE", 0.1)

    def boom(*a, **k):
        raise RuntimeError("decode failed")

    monkeypatch.setattr(rollout, "_sample_groups", boom)
    with pytest.raises(RuntimeError):
        sample_groups(model, tok, PROMPTS, cfg, keys=keys)
    assert [m for _, m in models._adapter_modules(model)] == layers
    with models.adapters_folded(model, budget=1.0) as n:  # 1 byte: nothing fits
        assert n == 0
    model.train()
    with models.adapters_folded(model) as n:  # dropout may be on: never folded in train mode
        assert n == 0
