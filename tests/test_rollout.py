"""Batched group decoding against mlx-lm's own one-prompt-at-a-time generation."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_grpo.config import ModelConfig, RolloutConfig
from mlx_grpo.models import load_model
from mlx_grpo.rollout import sample_groups, stop_token_ids
from mlx_grpo.scoring import completion_logprobs


@pytest.fixture(scope="module")
def model_tok(small_model_dir):
    return load_model(ModelConfig(path=str(small_model_dir)))


# Prompts of different token lengths, so rows are left-padded.
PROMPTS = ["What is 3 + 4 ?", "tags : <think> </think> What is 1 + 2 ? <think>", "5 + 5 ="]


def test_greedy_batch_equals_mlx_lm_one_at_a_time(model_tok):
    from mlx_lm.generate import generate_step

    model, tok = model_tok
    cfg = RolloutConfig(group_size=2, max_tokens=12, temperature=0.0, stop=[])
    ro = sample_groups(model, tok, PROMPTS, cfg)
    eos = set(tok.eos_token_ids)
    for p, prompt in enumerate(PROMPTS):
        want = []
        for t, _ in generate_step(mx.array(tok.encode(prompt)), model, max_tokens=12):
            want.append(int(t))
            if int(t) in eos:
                break
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


def test_row_keys_make_samples_independent_of_how_prompts_are_split(model_tok):
    """Each row draws from its own key: decoding the prompts together or in two parts (as two
    processes do) gives the same completions and log-probabilities."""
    from mlx_grpo.rollout import row_keys

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
        assert diff.max().item() < 1e-4
    other = sample_groups(model, tok, PROMPTS, cfg, keys=row_keys(mx.random.key(6), len(PROMPTS), 4))
    assert other.texts != whole.texts


def test_keyed_sampling_follows_the_temperature_scaled_distribution():
    """Gumbel-max with per-row keys draws token i with probability softmax(logprobs)_i."""
    from mlx_grpo.rollout import KeyedSampler

    logprobs = mx.log(mx.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    sampler = KeyedSampler(RolloutConfig(temperature=1.0), 1.0, mx.random.split(mx.random.key(0), 4000))
    counts = np.bincount(np.array(sampler(logprobs)), minlength=4) / 4000
    assert np.allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.03)
    # Each call advances every row's key: a second draw is not a copy of the first.
    assert not np.array_equal(np.array(sampler(logprobs)), np.array(sampler(logprobs)))
    greedy = KeyedSampler(RolloutConfig(temperature=0.0), 0.0, mx.random.split(mx.random.key(0), 3))
    assert greedy(mx.log(mx.array([[0.2, 0.7, 0.1]] * 3))).tolist() == [1, 1, 1]
