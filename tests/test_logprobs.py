"""Scoring passes: left padding is invisible, and sharing a prompt's pass changes nothing."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from mlx_grpo.config import AdapterConfig, ModelConfig
from mlx_grpo.models import attach_adapters, load_model
from mlx_grpo.rollout import left_pad
from mlx_grpo.logprobs import completion_logprobs

from conftest import tol


@pytest.fixture(scope="module")
def model_tok(small_model_dir):
    model, tok = load_model(ModelConfig(path=str(small_model_dir)))
    mx.random.seed(0)
    attach_adapters(model, AdapterConfig(rank=4))
    # Move lora_b off zero so the adapters matter.
    model.update(tree_map(lambda p: p + 0.05, model.trainable_parameters()))
    return model, tok


def two_prompts(tok, rows: int, width: int, seed: int):
    """Two prompts of different lengths, left-padded, and ``rows`` random completions of ``width``
    tokens; the generator comes back too, for the test's further draws."""
    enc = [tok.encode("What is 3 + 4 ?"), tok.encode("5 + 5 = 10 . What is 2 + 2 ?")]
    prompts, pad = left_pad(enc, 0)
    rng = np.random.default_rng(seed)
    comp = mx.array(rng.integers(4, 100, size=(rows, width)).astype(np.int32))
    return enc, prompts, pad, comp, rng


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
    enc, prompts, pad, comp, rng = two_prompts(tok, 6, 7, seed=0)
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
    assert mx.abs(lp1 - lp2).max().item() < tol(1e-5, 1e-2)
    for (k, a), (_, b) in zip(tree_flatten(g1), tree_flatten(g2)):
        assert mx.abs(a - b).max().item() <= tol(1e-4, 1e-2) * mx.abs(b).max().item() + 1e-7, k
        assert mx.abs(b).max().item() > 0, k
    # Chunked scoring gives the same numbers.
    chunked = completion_logprobs(model, prompts, pad, comp, 0.8, row_prompt=row_prompt, chunk=4)
    assert mx.abs(chunked - lp1).max().item() < tol(1e-5, 1e-2)


def test_chunked_head_equals_whole_logits_values_and_grads(model_tok, monkeypatch):
    """Chunking the head + log-softmax over positions, or keeping its softmax for the backward
    pass (``kept_logprobs``), changes neither values nor gradients."""
    from mlx_grpo import logprobs as logprobs_module
    from mlx_grpo.forward import output_head
    from mlx_grpo.logprobs import chunked_logprobs, gather_logprobs

    model, tok = model_tok
    enc, prompts, pad, comp, rng = two_prompts(tok, 4, 9, seed=1)
    row_prompt = np.array([0, 0, 1, 1])
    body, module, head, vocab = output_head(model)
    assert vocab == model.model.embed_tokens.weight.shape[0]
    # Train the (tied) head too, so the check covers gradients through the chunked head itself.
    module.unfreeze()

    # The plain reference: whole logits from the model's own forward pass, one row at a time.
    def reference(model):
        rows = []
        for r in range(4):
            p = enc[row_prompt[r]]
            full = mx.concatenate([mx.array(p), comp[r]])[None]
            logits = model(full)[:, len(p) - 1 : -1, :]
            rows.append(gather_logprobs(logits, comp[r : r + 1], 0.8))
        return mx.concatenate(rows, axis=0)

    weights = mx.array(rng.normal(size=(4, 9)).astype(np.float32))
    # budget 4 * vocab * 2: two positions per chunk, so 5 chunks (the last one shorter).
    budget = 4 * vocab * 2
    f_chunk = lambda m: (completion_logprobs(m, prompts, pad, comp, 0.8, row_prompt, budget=budget) * weights).sum()
    f_whole = lambda m: (completion_logprobs(m, prompts, pad, comp, 0.8, row_prompt) * weights).sum()
    f_ref = lambda m: (reference(m) * weights).sum()
    try:
        vk, gk = nn.value_and_grad(model, f_whole)(model)  # within KEEP_BUDGET: kept_logprobs
        monkeypatch.setattr(logprobs_module, "KEEP_BUDGET", 0)
        v1, g1 = nn.value_and_grad(model, f_chunk)(model)
        v2, g2 = nn.value_and_grad(model, f_whole)(model)
        v3, g3 = nn.value_and_grad(model, f_ref)(model)
    finally:
        module.freeze()
    assert "model.embed_tokens.weight" in dict(tree_flatten(g1))
    rel = tol(1e-4, 1e-2)
    for v in (v1, v2, vk):
        assert abs(v.item() - v3.item()) < rel * abs(v3.item()) + 1e-5
    for (k, a), (_, b), (_, c), (_, d) in zip(tree_flatten(g1), tree_flatten(g2), tree_flatten(g3), tree_flatten(gk)):
        scale = mx.abs(c).max().item()
        assert scale > 0, k
        assert mx.abs(a - c).max().item() <= rel * scale + 1e-7, k
        assert mx.abs(b - c).max().item() <= rel * scale + 1e-7, k
        assert mx.abs(d - c).max().item() <= rel * scale + 1e-7, k


def test_head_paths_against_numpy_values_and_gradients(monkeypatch):
    """Chunked (checkpointed), NumPy's log-sum-exp (eager) and kept-softmax heads against the
    formula in float64: log softmax(h W^T / T)[t] and its gradients for h and W,
    d/dz = c (onehot(t) - softmax(z)) / T."""
    from mlx_grpo import fastmath, logprobs as logprobs_module
    from mlx_grpo.logprobs import chunked_logprobs

    rng = np.random.default_rng(7)
    h = mx.array(rng.normal(size=(3, 7, 5)).astype(np.float32))
    w0 = mx.array(rng.normal(size=(11, 5)).astype(np.float32))
    t = mx.array(rng.integers(0, 11, size=(3, 7)).astype(np.int32))
    c = rng.normal(size=(3, 7))
    T = 0.5

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = w0

    z = (np.array(h, np.float64) @ np.array(w0, np.float64).T) / T
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.take_along_axis(np.log(p), np.array(t)[..., None], -1)[..., 0]
    dz = -p * c[..., None]
    np.put_along_axis(dz, np.array(t)[..., None], np.take_along_axis(dz, np.array(t)[..., None], -1) + c[..., None], -1)
    dz /= T
    want_dh, want_dw = dz @ np.array(w0, np.float64), np.einsum("blv,blh->vh", dz, np.array(h, np.float64))

    calls = []
    real_kept = logprobs_module.kept_logprobs
    monkeypatch.setattr(logprobs_module, "kept_logprobs", lambda *a: calls.append(1) or real_kept(*a))

    def run(eager: bool, keep: int):
        monkeypatch.setattr(logprobs_module, "KEEP_BUDGET", keep)
        monkeypatch.setattr(fastmath, "_eager_depth", int(eager))
        m = Head()
        f = lambda m, h: (chunked_logprobs(m, lambda m, x: x @ m.w.T, h, t, T, 11, budget=3 * 11 * 3)
                          * mx.array(c.astype(np.float32))).sum()
        dh, dm = mx.grad(lambda h: f(m, h))(h), nn.value_and_grad(m, lambda mm: f(mm, h))(m)[1]
        got = chunked_logprobs(m, lambda m, x: x @ m.w.T, h, t, T, 11, budget=3 * 11 * 3)
        return np.array(got), np.array(dh), np.array(dm["w"])

    for eager, keep, kept in ((False, 3 * 7 * 11, True), (False, 3 * 7 * 11 - 1, False), (True, 1 << 30, False)):
        calls.clear()
        got, dh, dw = run(eager, keep)
        assert bool(calls) == kept, (eager, keep)  # kept only when differentiable and within budget
        assert np.abs(got - want).max() < tol(1e-5, 1e-2)
        assert np.abs(dh - want_dh).max() < tol(1e-4, 1e-2) * np.abs(want_dh).max()
        assert np.abs(dw - want_dw).max() < tol(1e-4, 1e-2) * np.abs(want_dw).max()


def test_models_with_extra_output_work_fall_back_to_whole_logits(model_tok):
    """A model whose output is not head(body(x)) (e.g. soft-capped logits) is not split."""
    from mlx_grpo.forward import output_head

    model, tok = model_tok

    class Capped(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.model = inner.model
            self.args = inner.args

        @property
        def layers(self):
            return self.model.layers

        def __call__(self, x, cache=None):
            return 5.0 * mx.tanh(self.model.embed_tokens.as_linear(self.model(x, cache=cache)) / 5.0)

    capped = Capped(model)
    assert output_head(capped) is None
    assert output_head(model) is not None
    comp = mx.array([[5, 6, 7]])
    p = tok.encode("What is 3 + 4 ?")
    lp = completion_logprobs(capped, mx.array([p]), [0], comp, budget=1)
    full = capped(mx.concatenate([mx.array(p), comp[0]])[None])[:, len(p) - 1 : -1, :]
    want = full - mx.logsumexp(full, axis=-1, keepdims=True)
    want = mx.take_along_axis(want, comp[..., None], axis=-1)[..., 0]
    assert mx.abs(lp - want).max().item() < 1e-5


def test_length_groups_cut_where_it_saves_work():
    from mlx_grpo.logprobs import length_groups

    # 127 rows of 13 tokens and one of 20: the long row gets its own group.
    lengths = np.array([13] * 60 + [20] + [13] * 67)
    groups = length_groups(lengths)
    assert [len(g) for g in groups] == [127, 1] and groups[1].tolist() == [60]
    assert sorted(np.concatenate(groups).tolist()) == list(range(128))
    # Nearly equal lengths: one group (a cut would save less than a pass costs).
    assert len(length_groups(np.array([12, 13, 13, 13]))) == 1
    # Widely spread lengths: several groups, each sorted, every row once.
    spread = np.random.default_rng(0).integers(1, 200, size=64)
    groups = length_groups(spread)
    assert len(groups) >= 2
    assert all(spread[a].max() <= spread[b].min() for a, b in zip(groups, groups[1:]))
    positions = sum(len(g) * spread[g].max() for g in groups)
    assert positions < 0.8 * len(spread) * spread.max()
    assert sorted(np.concatenate(groups).tolist()) == list(range(64))


def test_length_groups_give_the_same_logprobs_and_gradients(model_tok):
    """Scoring rows in length groups == one pass over all rows at full width, on every real token
    (values and gradients)."""
    from mlx_grpo import logprobs as scoring

    model, tok = model_tok
    enc, prompts, pad, comp, rng = two_prompts(tok, 6, 12, seed=2)
    lengths = np.array([3, 12, 3, 4, 11, 3])
    mask = mx.array((np.arange(12)[None] < lengths[:, None]).astype(np.float32))
    row_prompt = np.array([0, 0, 0, 1, 1, 1])
    weights = mx.array(rng.normal(size=(6, 12)).astype(np.float32)) * mask
    assert len(scoring.length_groups(lengths)) > 1  # the test's premise

    def f(m, lens):
        lp = completion_logprobs(m, prompts, pad, comp, 0.8, row_prompt, lengths=lens)
        return (lp * weights).sum(), lp

    (v1, lp1), g1 = nn.value_and_grad(model, lambda m: f(m, lengths))(model)
    (v2, lp2), g2 = nn.value_and_grad(model, lambda m: f(m, None))(model)
    assert mx.abs((lp1 - lp2) * mask).max().item() < tol(1e-5, 1e-2)
    assert mx.isfinite(lp1).all().item()  # masked positions hold finite values (0 past a group's width)
    rel = tol(1e-4, 1e-2)
    assert abs(v1.item() - v2.item()) < rel * abs(v2.item()) + 1e-6
    for (k, a), (_, b) in zip(tree_flatten(g1), tree_flatten(g2)):
        scale = mx.abs(b).max().item()
        assert scale > 0, k
        assert mx.abs(a - b).max().item() <= rel * scale + 1e-7, k


def test_model_flags_are_computed_once_and_kept_off_the_parameters(model_tok):
    """forward.model_flag: one verdict per model, asked for once; never part of its parameters."""
    from mlx_grpo.forward import model_flag, set_model_flag

    model, _ = model_tok
    calls = []
    assert model_flag(model, "test_verdict", lambda: calls.append(1) or "yes") == "yes"
    assert model_flag(model, "test_verdict", lambda: calls.append(1) or "no") == "yes"
    assert calls == [1]
    set_model_flag(model, "test_verdict", "changed")
    assert model_flag(model, "test_verdict", lambda: "no") == "changed"
    assert not any("test_verdict" in k for k, _ in tree_flatten(model.parameters()))


def test_output_head_is_named_and_generation_does_not_import_scoring(model_tok):
    """The split model reads by name (head.logits(head.body(x)) == model(x)); rollouts need only
    forward.py, not the scoring module."""
    import subprocess
    import sys

    from mlx_grpo.forward import output_head

    model, _ = model_tok
    head = output_head(model)
    x = mx.array([[3, 4, 5]])
    assert mx.allclose(head.logits(head.body(x, None)), model(x), atol=1e-4).item()
    assert head.vocab == head.module.weight.shape[0]
    code = "import sys, mlx_grpo.rollout; print('mlx_grpo.logprobs' in sys.modules)"
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert got.stdout.strip() == "False"
