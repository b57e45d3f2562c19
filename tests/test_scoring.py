"""Scoring passes: left padding is invisible, and sharing a prompt's pass changes nothing."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from mlx_grpo.config import AdapterConfig, ModelConfig
from mlx_grpo.models import attach_adapters, load_model
from mlx_grpo.rollout import left_pad
from mlx_grpo.scoring import completion_logprobs


@pytest.fixture(scope="module")
def model_tok(small_model_dir):
    model, tok = load_model(ModelConfig(path=str(small_model_dir)))
    mx.random.seed(0)
    attach_adapters(model, AdapterConfig(rank=4))
    # Move lora_b off zero so the adapters matter.
    model.update(tree_map(lambda p: p + 0.05, model.trainable_parameters()))
    return model, tok


def test_padding_is_invisible(model_tok):
    model, tok = model_tok
    short, long = tok.encode("What is 3 + 4 ?"), tok.encode("tags : <think> </think> What is 13 + 14 ? <think>")
    comp = mx.array([[5, 6, 7, 8], [9, 10, 11, 12]])
    prompts, pad = left_pad([short, long], 0)
    both = completion_logprobs(model, prompts, pad, comp)
    alone = completion_logprobs(model, mx.array([short]), [0], comp[:1])
    assert pad[0] > 0
    assert mx.abs(both[0] - alone[0]).max().item() < 1e-5
    # Without the padding mask the result would differ: the check above has teeth.
    unmasked = completion_logprobs(model, prompts, [0, 0], comp)
    assert mx.abs(unmasked[0] - alone[0]).max().item() > 1e-3


def test_shared_prompt_pass_equals_one_pass_per_row(model_tok):
    model, tok = model_tok
    enc = [tok.encode("What is 3 + 4 ?"), tok.encode("5 + 5 = 10 . What is 2 + 2 ?")]
    prompts, pad = left_pad(enc, 0)
    rng = np.random.default_rng(0)
    comp = mx.array(rng.integers(4, 100, size=(6, 7)).astype(np.int32))
    row_prompt = np.array([0, 0, 0, 1, 1, 1])
    repeated = prompts[mx.array(row_prompt)]
    rep_pad = [pad[i] for i in row_prompt]

    def loss(model, shared):
        if shared:
            lp = completion_logprobs(model, prompts, pad, comp, 0.8, row_prompt=row_prompt)
        else:
            lp = completion_logprobs(model, repeated, rep_pad, comp, 0.8)
        return (lp * mx.arange(7)).sum(), lp

    (l1, lp1), g1 = nn.value_and_grad(model, lambda m: loss(m, True))(model)
    (l2, lp2), g2 = nn.value_and_grad(model, lambda m: loss(m, False))(model)
    assert mx.abs(lp1 - lp2).max().item() < 1e-5
    for (k, a), (_, b) in zip(tree_flatten(g1), tree_flatten(g2)):
        assert mx.abs(a - b).max().item() <= 1e-4 * mx.abs(b).max().item() + 1e-7, k
        assert mx.abs(b).max().item() > 0, k
    # Chunked scoring gives the same numbers.
    chunked = completion_logprobs(model, prompts, pad, comp, 0.8, row_prompt=row_prompt, chunk=4)
    assert mx.abs(chunked - lp1).max().item() < 1e-5
