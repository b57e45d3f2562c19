"""The update's passes in C (native_grad.py, csrc/grad.c): the same loss, statistics and adapter
gradients as MLX's differentiated graph (``nn.value_and_grad`` over ``learner.batch_loss``) on models
built here with every shape the C passes handle (grouped key heads, biases, an untied head, heads of
80 with 3 query heads a key head, padding inside or before the prompts, a shared prefix run once),
under several loss settings (KL on and off, a moved sampling policy, each loss type), rows of every
length from 0 to the full width (more scored positions than the head takes at a time);
gradients far from zero and reaching every adapter; one whole ``learner.update`` (micro-batches,
AdamW) landing on the same parameters either way. The switch, and adapters or models it does not
take, send the update through MLX."""

import mlx.core as mx
import numpy as np
import pytest

from mlx_grpo import native_grad
from mlx_grpo.config import Config
from preloaded import MODELS, NEEDS, built, run_preloaded

SETUP = MODELS + """
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.lora import LoRALinear
    from mlx_grpo import learner, native_grad, rollout
    from mlx_grpo.config import Config

    G, W = 4, 45  # 265 scored positions: two chunks of the output head (256 rows at a time)
    rng = np.random.default_rng(0)
    completions = mx.array(rng.integers(0, 301, size=(3 * G, W)).astype(np.int32))
    lengths = np.array([W, 0, 1, 2, 16, 17, 33, W, 5, W, 20, 36])
    mask = mx.array((np.arange(W)[None] < lengths[:, None]).astype(np.float32))
    row_prompt = np.repeat(np.arange(3), G)

    def trainable(kind, kw):
        model = build(kind, **kw)
        model.freeze()  # as models.attach_adapters leaves it: only the adapters train
        for _, m in model.named_modules():
            if isinstance(m, LoRALinear):
                m.unfreeze(keys=["lora_a", "lora_b"], recurse=False)
        model.train()
        return model

    def batch_of(model, prompts, moved):
        tokens, pads = rollout.left_pad(prompts, 0)
        b = learner.StepBatch(mx.array(tokens), list(pads), row_prompt, completions, mask,
                              mx.array(rng.normal(size=3 * G).astype(np.float32)))
        own = b.logprobs(model, 0.7)
        b.ref_logp = own + mx.array(rng.normal(size=own.shape).astype(np.float32) * 0.1)
        if moved:  # a sampling policy apart from the policy: ratios away from 1, some clipped
            b.old_logp = own + mx.array(rng.normal(size=own.shape).astype(np.float32) * 0.3)
        return b

    def config(beta, loss_type, iterations):
        cfg = Config()
        cfg.rollout.temperature = 0.7
        cfg.grpo.beta, cfg.grpo.loss_type, cfg.grpo.num_iterations = beta, loss_type, iterations
        return cfg
"""

COMPARE = SETUP + """
    out = {}
    SETTINGS = [(0.04, "grpo", 1), (0.0, "bnpo", 1), (0.04, "dr_grpo", 2)]
    for name, kind, kw, prompts in CASES:
        model = trainable(kind, kw)
        for beta, loss_type, iterations in SETTINGS:
            cfg = config(beta, loss_type, iterations)
            b = batch_of(model, prompts, moved=iterations > 1)
            norm = learner.step_normalizer([3 * G], float(mask.sum().item()), cfg)
            why = native_grad.unsupported(model, cfg)
            (loss, stats), grads = nn.value_and_grad(model, learner.batch_loss(cfg, norm))(model, b)
            c_loss, c_stats, c_grads = native_grad.value_and_grad(model, b, cfg, norm)
            g, c = dict(tree_flatten(grads)), dict(tree_flatten(c_grads))
            out[f"{name} {loss_type} beta={beta}"] = {
                "why": why, "names": sorted(g) == sorted(c), "loss": [loss.item(), c_loss.item()],
                "stats": [[stats[k].item(), c_stats[k].item()] for k in sorted(stats)],
                "worst": max(float(mx.abs(g[k] - c[k]).max()) / float(mx.abs(g[k]).max()) for k in g),
                "smallest": min(float(mx.abs(g[k]).max()) for k in g), "count": len(g)}
    print(json.dumps(out))
"""


@NEEDS
def test_gradients_match_mlx(tmp_path):
    out, _ = run_preloaded(COMPARE, built(tmp_path), tmp_path)
    assert len(out) == 15
    for case, r in out.items():
        assert r["why"] is None, case
        assert r["names"] and r["count"] == 3 * 7 * 2, case  # every layer's seven products, A and B
        assert r["loss"][1] == pytest.approx(r["loss"][0], rel=1e-4, abs=1e-6), case
        for want, got in r["stats"]:
            assert got == pytest.approx(want, rel=1e-4, abs=1e-6), case
        assert r["smallest"] > 1e-9, case  # every adapter gets a gradient: the comparison can fail
        assert r["worst"] < 1e-4, case


UPDATE = SETUP + """
    import mlx.optimizers as optim
    from mlx.utils import tree_map

    name, kind, kw, prompts = CASES[0]
    cfg = config(0.04, "grpo", 1)
    cfg.train.grad_accumulation_steps = 3  # micro-batches of 4 rows, summed
    out = {}
    for in_c in (True, False):
        native_grad.NATIVE = in_c
        model = trainable(kind, kw)
        rng = np.random.default_rng(0)
        b = batch_of(model, prompts, moved=False)
        before = {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}
        stats = learner.update(model, optim.AdamW(learning_rate=1e-3), b, cfg)
        after = {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}
        out[str(in_c)] = {"stats": stats, "moved": min(float(np.abs(after[k] - before[k]).max()) for k in after),
                          "params": {k: v.tolist() for k, v in after.items()}}
    c, m = out["True"], out["False"]
    print(json.dumps({"c": c["stats"], "mlx": m["stats"], "moved": c["moved"],
                      "apart": max(float(np.abs(np.array(c["params"][k]) - np.array(m["params"][k])).max()) for k in c["params"])}))
"""


@NEEDS
def test_an_update_in_c_lands_where_mlx_lands(tmp_path):
    out, _ = run_preloaded(UPDATE, built(tmp_path), tmp_path)
    assert out["moved"] > 1e-4  # AdamW's first step moves every parameter by ~ the learning rate
    assert out["apart"] < 1e-5
    for k in ("loss", "grad_norm", "kl"):
        assert out["c"][k] == pytest.approx(out["mlx"][k], rel=1e-4, abs=1e-7), k


def test_layout_shares_the_prefix_and_feeds_each_prompts_last_token():
    # prompts left-padded with 0: two share their first 20 tokens, the third is a single token apart
    prefix = list(range(5, 25))
    prompts = np.array([[0, 0] + prefix + [40], prefix + [50, 51, 52]])
    pads = [2, 0]
    completions = np.array([[7, 8, 9], [10, 11, 12], [13, 14, 15]])
    lengths = np.array([3, 0, 2])
    lay = native_grad.layout(prompts, pads, np.array([0, 0, 1]), completions, lengths)
    start, length, parent, pos0 = lay.segments.T
    # the prefix (20 tokens), prompt 0's own (none but its last), prompt 1's (50, 51), rows 0 and 2
    assert length.tolist() == [20, 0, 2, 3, 2] and parent.tolist() == [-1, 0, 0, 1, 2]
    assert pos0.tolist() == [0, 20, 20, 20, 22]
    assert lay.tokens[start[3]:start[3] + 3].tolist() == [40, 7, 8]  # prompt 0's last, then the row
    assert lay.targets[start[3]:start[3] + 3].tolist() == [7, 8, 9]
    assert lay.tokens[start[4]:].tolist() == [52, 13] and lay.targets[start[4]:].tolist() == [13, 14]
    assert (lay.targets[:start[3]] == -1).all()
    assert lay.row_start.tolist() == [start[3], start[4], start[4]]  # row 1 (empty) takes no tokens


def test_the_switch_and_what_it_does_not_take_update_through_mlx(embedded_model_dir, monkeypatch):
    from mlx_grpo.config import ModelConfig
    from mlx_grpo.models import attach_adapters, load_model

    cfg = Config()
    model, _ = load_model(ModelConfig(path=str(embedded_model_dir)))
    attach_adapters(model, cfg.adapter)
    model.train()
    if native_grad.library() is not None:  # pytest's process preloads the library where it can
        assert native_grad.unsupported(model, cfg) is None
    monkeypatch.setenv(native_grad.OFF, "1")
    assert native_grad.unsupported(model, cfg) == "switched off"
    monkeypatch.delenv(native_grad.OFF)
    monkeypatch.setattr(native_grad, "NATIVE", False)
    assert native_grad.unsupported(model, cfg) == "switched off"
    monkeypatch.setattr(native_grad, "NATIVE", True)
    cfg.adapter.dropout = 0.1
    assert "dropout" in native_grad.unsupported(model, cfg)
    cfg.adapter.dropout, cfg.adapter.type = 0.0, "dora"
    assert "LoRA" in native_grad.unsupported(model, cfg)
    cfg.adapter.type = "lora"
    cfg.train.grad_checkpoint = True
    assert "grad_checkpoint" in native_grad.unsupported(model, cfg)
    cfg.train.grad_checkpoint = False
    model.model.norm.unfreeze()  # a trainable parameter C would not differentiate
    assert "not a LoRA adapter" in native_grad.unsupported(model, cfg)


def test_the_c_update_keeps_less_than_the_estimate_plans_for_mlx(embedded_model_dir):
    """The preflight estimate is MLX's update's peak (tests/test_preflight.py); the C update keeps
    its activations outside MLX, and fewer: at every size the estimate plans for, its kept
    activations (each prompt counted whole, no shared prefix) stay below the estimate's."""
    from mlx_grpo.config import ModelConfig, make_config
    from mlx_grpo.models import attach_adapters, load_model
    from mlx_grpo.preflight import estimate_memory

    if native_grad.library() is None:
        pytest.skip("mlx-grpo's kernel library is not loaded in this process")
    model, _ = load_model(ModelConfig(path=str(embedded_model_dir)))
    attach_adapters(model, Config().adapter)
    for prompts, max_tokens in ((4, 64), (1, 512), (16, 20)):
        cfg = make_config(None, [("model.path", str(embedded_model_dir)), ("train.prompts_per_step", prompts),
                                 ("rollout.group_size", 4), ("rollout.max_tokens", max_tokens)])
        prompt = 90
        tokens = prompts * prompt + prompts * 4 * max_tokens
        kept = native_grad.kept_bytes(model, tokens)
        planned = estimate_memory(model, cfg, prompt)["activations"]
        assert 0.2 * planned < kept < planned, (prompts, max_tokens, kept / planned)
