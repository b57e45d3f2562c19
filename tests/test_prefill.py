"""The shared-prefix prompt pass: the same logprobs, gradients and rollouts as running every prompt
whole, with padding in the middle of rows invisible."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from mlx_grpo import prefill as prefill_mod
from mlx_grpo.config import AdapterConfig, ModelConfig, RolloutConfig
from mlx_grpo.forward import rows_cache
from mlx_grpo.models import attach_adapters, load_model
from mlx_grpo.prefill import MIN_SHARED_PREFIX, prefill, shared_prefix
from mlx_grpo.rollout import encode_prompt, left_pad, sample_groups
from mlx_grpo.logprobs import completion_logprobs

from conftest import mlx_lm_greedy, tol

# A template-like instruction (well over MIN_SHARED_PREFIX tokens) before questions whose token
# counts differ, so the per-prompt suffixes are padded between the prefix and the question.
INSTRUCTION = ("A conversation between User and Assistant . The assistant thinks inside <think> </think> "
               "and answers inside <answer> </answer> tags . ")
QUESTIONS = ["What is 3 + 4 ?", "What is 13 + 14 ? Think about it , then answer .", "5 + 5 ="]
PROMPTS = [INSTRUCTION + q for q in QUESTIONS]


@pytest.fixture(scope="module")
def model_tok(small_model_dir):
    model, tok = load_model(ModelConfig(path=str(small_model_dir)))
    mx.random.seed(0)
    attach_adapters(model, AdapterConfig(rank=4))
    model.update(tree_map(lambda p: p + 0.05, model.trainable_parameters()))  # adapters matter
    return model, tok


@pytest.fixture
def no_sharing(monkeypatch):
    """Turn prefix sharing off: every prompt runs whole (the plain path to compare with)."""
    def off():
        monkeypatch.setattr(prefill_mod, "MIN_SHARED_PREFIX", 10**9)
    return off


def test_shared_prefix_length():
    pad = 0
    rows = [[5, 6, 7, 8, 9, 1], [5, 6, 7, 8, 2], [5, 6, 7, 8, 9, 3, 4]]
    width = max(map(len, rows))
    toks = np.array([[pad] * (width - len(r)) + r for r in rows])
    left = [width - len(r) for r in rows]
    old = prefill_mod.MIN_SHARED_PREFIX
    try:
        prefill_mod.MIN_SHARED_PREFIX = 1
        assert shared_prefix(toks, left) == 4  # real tokens aligned despite different padding
        assert shared_prefix(toks[:1], left[:1]) == 0  # one prompt: nothing to share
        same = np.array([[1, 2, 3], [1, 2, 3]])
        assert shared_prefix(same, [0, 0]) == 2  # every prompt keeps one token of its own
        prefill_mod.MIN_SHARED_PREFIX = 5
        assert shared_prefix(toks, left) == 0  # too short to be worth a pass
    finally:
        prefill_mod.MIN_SHARED_PREFIX = old


def test_prompts_share_a_long_prefix(model_tok):
    model, tok = model_tok
    enc = [encode_prompt(tok, p) for p in PROMPTS]
    toks, left = left_pad(enc, 0)
    n = shared_prefix(np.array(toks), left)
    assert n >= MIN_SHARED_PREFIX and len({len(e) for e in enc}) == 3  # the test's premise


def test_middle_padding_is_invisible_values_and_grads(model_tok, no_sharing):
    """Scoring with the shared prefix == each prompt whole (values and gradients), and == each
    row alone, unpadded."""
    model, tok = model_tok
    enc = [encode_prompt(tok, p) for p in PROMPTS]
    prompts, pad = left_pad(enc, 0)
    rng = np.random.default_rng(0)
    comp = mx.array(rng.integers(4, 100, size=(6, 5)).astype(np.int32))
    row_prompt = np.array([0, 0, 1, 1, 2, 2])
    weights = mx.array(rng.normal(size=(6, 5)).astype(np.float32))

    def f(m):
        lp = completion_logprobs(m, prompts, pad, comp, 0.8, row_prompt)
        return (lp * weights).sum(), lp

    (v1, lp1), g1 = nn.value_and_grad(model, f)(model)
    alone = [completion_logprobs(model, mx.array([enc[p]]), [0], comp[r : r + 1], 0.8)[0]
             for r, p in enumerate(row_prompt)]
    no_sharing()
    (v2, lp2), g2 = nn.value_and_grad(model, f)(model)
    assert mx.abs(lp1 - lp2).max().item() < tol(1e-5, 1e-2)
    assert mx.abs(lp1 - mx.stack(alone)).max().item() < tol(1e-5, 1e-2)
    for (k, a), (_, b) in zip(tree_flatten(g1), tree_flatten(g2)):
        scale = mx.abs(b).max().item()
        assert scale > 0, k
        assert mx.abs(a - b).max().item() <= tol(1e-4, 1e-2) * scale + 1e-7, k


def test_prefill_cache_continues_like_a_whole_prompt(model_tok):
    """After the shared prefill, one more token through the cache gives the logits of a separate,
    unpadded pass over prompt + token (positions and masks carry over)."""
    model, tok = model_tok
    enc = [encode_prompt(tok, p) for p in PROMPTS]
    prompts, pad = left_pad(enc, 0)
    last, cache = prefill(model, lambda x, c: model(x, cache=c), prompts, pad)
    nxt = mx.array([[7], [8], [9]])
    out = model(nxt, cache=cache)[:, -1, :]
    for r, ids in enumerate(enc):
        want = model(mx.array([ids + [7 + r]]))[0, -1, :]
        assert mx.abs(out[r] - want).max().item() < tol(1e-4, 1e-2)
        assert mx.abs(last[r, -1] - model(mx.array([ids]))[0, -1, :]).max().item() < tol(1e-4, 1e-2)


def test_rollouts_with_a_shared_prefix_match_mlx_lm_and_scoring(model_tok):
    model, tok = model_tok
    cfg = RolloutConfig(group_size=2, max_tokens=8, temperature=0.0, stop=[])
    ro = sample_groups(model, tok, PROMPTS, cfg)
    for p, prompt in enumerate(PROMPTS):
        want = mlx_lm_greedy(model, encode_prompt(tok, prompt), 8, set(tok.eos_token_ids))
        n = int(ro.mask[2 * p].sum().item())
        assert ro.tokens[2 * p, :n].tolist() == want
    mx.random.seed(4)
    ro = sample_groups(model, tok, PROMPTS, RolloutConfig(group_size=3, max_tokens=8, temperature=0.9, stop=[]))
    lp = completion_logprobs(model, ro.prompt_tokens, ro.left_padding, ro.tokens, 0.9, ro.row_prompt)
    assert mx.abs((lp - ro.sample_logprobs) * ro.mask).max().item() < tol(1e-4, 1e-2)


def test_rows_cache_pad_hides_slots_and_skips_positions():
    """RowsCache.pad: the mask hides exactly the declared slots; RoPE offsets don't count them."""
    c = rows_cache(type("M", (), {"layers": [0]})(), [1, 0])[0]
    k = mx.zeros((2, 1, 3, 2))
    assert c.offset.tolist() == [-1, 0]
    mask = c.make_mask(3)
    c.update_and_fetch(k, k)
    assert np.array(mask)[:, 0, 2].tolist() == [[False, True, True], [True, True, True]]
    c.pad(mx.array([0, 2]))
    mask = np.array(c.make_mask(3))
    assert c.offset.tolist() == [2, 1]  # 2 real slots in row 0 so far; row 1: 3 real - 2 pads
    assert mask[1, 0, 2].tolist() == [True, True, True, False, False, True]
    assert mask[0, 0, 0].tolist() == [False, True, True, True, False, False]  # causal
    c.update_and_fetch(k, k)
    assert np.array(c.visible).tolist() == [[False, True, True, True, True, True],
                                            [True, True, True, False, False, True]]
