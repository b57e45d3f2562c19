"""load_policy: the one way train, bench, eval, generate and the rewards lab build a policy."""

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from mlx_grpo.config import make_config
from mlx_grpo.models import save_adapters
from mlx_grpo.policy import load_policy
from mlx_grpo.rewards import RewardError
from mlx_grpo.tasks.templates import PromptFormat, Prompter, render_prompt


def _weights(model):
    return {k: mx.array(v) for k, v in tree_flatten(model.trainable_parameters())}


def test_training_policy_is_seeded_and_carries_the_config(tmp_path):
    cfg = make_config(None, [("prompt.response_prefix", " <t>"), ("rewards.length", 0.5)])
    a, b = load_policy(cfg), load_policy(cfg)
    wa, wb = _weights(a.model), _weights(b.model)
    assert wa and all(mx.array_equal(wa[k], wb[k]).item() for k in wa)  # same seed, same adapters
    assert a.reference is None and a.weights == dict(cfg.rewards) and set(a.reward_fns) == set(cfg.rewards)
    assert a.prompter.prefix == " <t>" and a.prompter.render("q").endswith("Assistant: <t>")
    other = _weights(load_policy(make_config(None, [("train.seed", 1)])).model)
    assert any(not mx.array_equal(wa[k], other[k]).item() for k in wa)


def test_inference_policy_loads_saved_adapters(tmp_path):
    cfg = make_config(None, [])
    trained = load_policy(cfg)
    from mlx.utils import tree_map

    # Adapters that differ from any fresh initialisation (lora_b starts at zero).
    trained.model.update(tree_map(lambda v: v + 0.25, trained.model.trainable_parameters()))
    save_adapters(trained.model, tmp_path, cfg.adapter, cfg.model.path)
    loaded = load_policy(cfg, adapter_dir=str(tmp_path), training=False)
    got, want = dict(tree_flatten(loaded.model.parameters())), _weights(trained.model)
    assert all(mx.array_equal(got[k], want[k]).item() for k in want)
    assert not loaded.model.training


def test_a_bad_reward_fails_before_the_model_loads(tmp_path):
    cfg = make_config(None, [("rewards.nope", 1.0), ("model.path", str(tmp_path / "absent"))])
    with pytest.raises(RewardError, match="rewards.nope"):
        load_policy(cfg)


def test_prompter_renders_and_prefixes_in_one_place():
    p = Prompter(PromptFormat(response_prefix=" <think>"))
    assert p.prompts([{"prompt": "What is 1 + 2 ?"}]) == [render_prompt("What is 1 + 2 ?", PromptFormat())]
    assert p.responses(["a", "b"]) == [" <think>a", " <think>b"]
