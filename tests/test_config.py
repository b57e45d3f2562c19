import re

import pytest

from mlx_grpo.config import Config, ConfigError, config_warnings, make_config, parse_set


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def test_defaults_are_the_embedded_run():
    cfg = make_config()
    assert cfg.model.path.endswith("tiny-r1")
    assert cfg.data.task == "arithmetic"
    assert cfg.rewards == {"accuracy": 1.0, "format": 0.5}


def test_precedence_cli_over_yaml_over_defaults(tmp_path):
    path = write(tmp_path, "grpo:\n  beta: 0.2\n  epsilon: 0.3\ntrain:\n  steps: 7\n")
    cfg = make_config(path, [("grpo.beta", 0.5)])
    assert cfg.grpo.beta == 0.5  # command line beats YAML
    assert cfg.grpo.epsilon == 0.3  # YAML beats the default
    assert cfg.train.steps == 7
    assert cfg.rollout.group_size == Config().rollout.group_size  # default kept


def test_every_yaml_key_is_used_none_ignored(tmp_path):
    """A peer silently ignores YAML keys whose CLI flag has a default; here each one lands."""
    path = write(tmp_path, "rollout:\n  group_size: 4\n  max_tokens: 9\n  temperature: 0.7\n"
                           "train:\n  learning_rate: 1e-5\n  seed: 3\n")
    cfg = make_config(path)
    assert (cfg.rollout.group_size, cfg.rollout.max_tokens, cfg.rollout.temperature) == (4, 9, 0.7)
    assert cfg.train.learning_rate == 1e-5 and cfg.train.seed == 3


@pytest.mark.parametrize("text,key", [
    ("grpo:\n  betta: 0.1\n", "grpo.betta: unknown key"),
    ("trian:\n  steps: 1\n", "trian: unknown key"),
    ("train:\n  steps: many\n", "train.steps: expected an integer"),
    ("rollout:\n  group_size: 1\n", "rollout.group_size: must be at least 2"),
    ("grpo:\n  beta: -0.1\n", "grpo.beta: must be >= 0"),
    ("grpo:\n  loss_type: ppo\n", "grpo.loss_type: must be one of"),
    ("train: 3\n", "train: expected a section"),
])
def test_yaml_errors_name_the_key_and_file(tmp_path, text, key):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        make_config(path)
    assert key in str(e.value)
    if "unknown" in key or "expected" in key:
        assert path in str(e.value)


def test_invalid_yaml_names_line(tmp_path):
    path = write(tmp_path, "train:\n  steps: 1\n  seed: [1\n")
    with pytest.raises(ConfigError, match=r"c.yaml: line \d+ invalid YAML"):
        make_config(path)


def test_missing_config_file():
    with pytest.raises(ConfigError, match="nope.yaml: config file not found"):
        make_config("nope.yaml")


def test_set_overrides_parse_values():
    assert parse_set("grpo.beta=0.04") == ("grpo.beta", 0.04)
    assert parse_set("rollout.stop=[</answer>, END]") == ("rollout.stop", ["</answer>", "END"])
    cfg = make_config(None, [parse_set("train.grad_checkpoint=true"), parse_set("rewards.format=2")])
    assert cfg.train.grad_checkpoint is True
    assert cfg.rewards == {"accuracy": 1.0, "format": 2.0}
    with pytest.raises(ConfigError, match="grpo.nope: unknown key"):
        make_config(None, [parse_set("grpo.nope=1")])
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_set("grpo.beta")


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="data.path: required"):
        make_config(None, [("data.task", "jsonl")])
    with pytest.raises(ConfigError, match="grad_accumulation_steps: must divide"):
        make_config(None, [("train.prompts_per_step", 6), ("train.grad_accumulation_steps", 4)])


def test_alpha_sets_scale():
    cfg = make_config(None, [("adapter.alpha", 32), ("adapter.rank", 16)])
    assert cfg.adapter.effective_scale() == 2.0


def test_shipped_configs_load_and_default_yaml_equals_defaults():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    default = make_config(str(root / "configs" / "default.yaml"))
    builtin = make_config()
    assert (root / default.model.path).resolve() == Path(builtin.model.path).resolve()
    default.model.path = builtin.model.path
    assert default == builtin
    for f in sorted((root / "configs").glob("*.yaml")):
        make_config(str(f), [("data.path", "x.jsonl")] if "gsm8k" in f.name else [])


def test_sequence_ratio_with_a_token_loss_warns():
    assert config_warnings(make_config(None, [("grpo.importance_sampling", "sequence")])) == []
    for lt in ("bnpo", "dr_grpo", "dapo"):
        (w,) = config_warnings(make_config(None, [("grpo.importance_sampling", "sequence"), ("grpo.loss_type", lt)]))
        assert w.startswith("grpo.importance_sampling: sequence") and lt in w
    assert config_warnings(make_config(None, [("grpo.loss_type", "dapo")])) == []


def test_a_run_says_the_config_warnings(small_model_dir, tmp_path):
    from mlx_grpo.trainer import train

    cfg = make_config(None, [("model.path", str(small_model_dir)), ("output.dir", str(tmp_path / "r")),
                             ("train.steps", 0), ("data.eval_size", 4), ("output.progress", False),
                             ("grpo.importance_sampling", "sequence"), ("grpo.loss_type", "dr_grpo")])
    said = []
    train(cfg, say=said.append)
    assert [s for s in said if s.startswith("warning: grpo.importance_sampling: sequence")]


def test_choices_are_carried_by_the_types_and_checked_as_read(tmp_path):
    """A choice-valued key lists its choices once (its Literal type): the coercion refuses any
    other value naming the key, the file and the choices; the CLI help shows the same choices."""
    import subprocess
    import sys

    from mlx_grpo.config import choices

    assert choices("grpo.loss_type") == ("grpo", "bnpo", "dr_grpo", "dapo")
    assert choices("output.log_to") == ("tensorboard", "wandb") and choices("train.steps") == ()
    y = tmp_path / "c.yaml"
    y.write_text("adapter:\n  type: qlora\n")
    with pytest.raises(ConfigError, match=r"c.yaml: adapter.type: must be one of lora, dora, full, got 'qlora'"):
        make_config(str(y))
    with pytest.raises(ConfigError, match=r"^grpo.scale_rewards: must be one of group, batch, none, got 'std'"):
        make_config(None, [("grpo.scale_rewards", "std")])
    assert make_config(None, [("grpo.scale_rewards", "none")]).grpo.scale_rewards == "none"
    code = ("import sys, mlx_grpo.config; "
            "print(sorted(m for m in sys.modules if m.startswith('mlx_grpo.tasks')))")
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert got.stdout.strip() == "[]"  # the config needs nothing from tasks/ (no import circle)
    from click.testing import CliRunner

    from mlx_grpo.cli import main

    shown = " ".join(CliRunner().invoke(main, ["train", "--help"]).output.split())
    for flag, key in (("--loss-type", "grpo.loss_type"), ("--adapter-type", "adapter.type"),
                      ("--prompt-format", "prompt.kind")):
        assert f"{flag} TEXT {' | '.join(choices(key))} [{key}]." in shown


# ---------------------------------------------------------------- values that mean nothing

def _keys_of_type(wanted) -> list:
    """Every dotted config key whose type (Optional unwrapped, a list's items, a mapping's values)
    is ``wanted``: walked from the dataclasses, so that a key added later is covered too."""
    import dataclasses
    import typing

    def base(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if typing.get_origin(tp) is typing.Union:
            return base(args[0])
        if typing.get_origin(tp) in (list, dict):
            return base(args[-1])
        return tp

    out = []

    def walk(cls, prefix):
        for f in dataclasses.fields(cls):
            tp = typing.get_type_hints(cls)[f.name]
            if dataclasses.is_dataclass(tp):
                walk(tp, f"{prefix}{f.name}.")
            elif base(tp) is wanted:
                out.append((prefix + f.name, typing.get_origin(tp)))
    walk(Config, "")
    return out


@pytest.mark.parametrize("text,msg", [
    # an empty stop string cut every completion to one token
    ("rollout:\n  stop: ['</answer>', '']\n",
     "rollout.stop[1]: must not be empty (an empty stop string ends every completion at its first token), got ''"),
    # weights whose total overflows: every update was skipped as non-finite and the run exited 0
    ("rewards:\n  accuracy: 3.0e+38\n  format: 3.0e+38\n", "rewards.accuracy: must be at most 1e+06 in size"),
    ("rewards:\n  accuracy: 1.0\n  format: -2000000\n", "rewards.format: must be at most 1e+06 in size"),
    # -1 evaluated 399 of 400 held-out prompts and 0 all of them; null is all
    ("output:\n  eval_size: -1\n", "output.eval_size: must be at least 1 (null: all), got -1"),
    ("output:\n  eval_size: 0\n", "output.eval_size: must be at least 1 (null: all), got 0"),
    # [] reached mlx-lm as "every linear"
    ("adapter:\n  keys: []\n", "adapter.keys: must name at least one module (null: every linear), got []"),
    ("adapter:\n  keys: [self_attn.q_proj, '']\n", "adapter.keys[1]: must not be empty"),
    # nonzero, and 0 in float32 where it is used
    ("train:\n  learning_rate: 1.0e-320\n", "train.learning_rate: must be 0 or at least 1.2e-38 in size (smaller is 0 in float32"),
    ("grpo:\n  beta: 1.0e-40\n", "grpo.beta: must be 0 or at least 1.2e-38 in size"),
    ("rewards:\n  accuracy: 1.0e-45\n", "rewards.accuracy: must be 0 or at least 1.2e-38 in size"),
    # "" read as "not set": the policy as its own reference, the last rows as held-out data
    ("model:\n  reference: ''\n", "model.reference: must not be empty (an unset shell variable?; null: the default), got ''"),
    ("data:\n  eval_path: ''\n", "data.eval_path: must not be empty"),
    ("data:\n  answer_delimiter: ''\n", "data.answer_delimiter: must not be empty (null: no delimiter)"),
])
def test_values_that_mean_nothing_are_refused_naming_the_key(tmp_path, text, msg):
    with pytest.raises(ConfigError) as e:
        make_config(write(tmp_path, text))
    assert msg in str(e.value), str(e.value)


def test_null_keeps_meaning_the_default_and_edge_values_are_taken(tmp_path):
    cfg = make_config(write(tmp_path, "output:\n  eval_size: null\nadapter:\n  keys: null\n"
                                      "rewards:\n  accuracy: 1000000\n  format: -1.0e+6\n"
                                      "grpo:\n  beta: 0\n  epsilon: 1.2e-38\nprompt:\n  system_prompt: ''\n"
                                      "  response_prefix: ''\n"))
    assert cfg.output.eval_size is None and cfg.adapter.keys is None
    assert cfg.rewards == {"accuracy": 1e6, "format": -1e6} and cfg.grpo.beta == 0.0
    assert cfg.prompt.system_prompt == "" and cfg.prompt.response_prefix == ""  # "" means none there
    assert make_config(None, [("output.eval_size", 1)]).output.eval_size == 1


@pytest.mark.parametrize("key", [k for k, _ in _keys_of_type(float)])
def test_every_float_key_is_checked_in_float32(key):
    """One helper (config.float32_problem) for every float setting: nonzero but 0 in float32, or
    past its range, is refused naming the key; 0 stays 0."""
    name = key.replace("rewards", "rewards.accuracy")
    for value, msg in (("1e-320", "must be 0 or at least 1.2e-38 in size"), ("-1e-39", "must be 0 or at least 1.2e-38"),
                       ("1e39", "must be within float32's range")):
        with pytest.raises(ConfigError, match=rf"^{re.escape(name)}: {re.escape(msg)}"):
            make_config(None, [parse_set(f"{name}={value}")])


@pytest.mark.parametrize("key,origin", _keys_of_type(str), ids=[k for k, _ in _keys_of_type(str)])
def test_every_empty_string_is_refused_but_where_it_means_none(key, origin):
    """An empty string (``--set key=$UNSET``) was read as "not set" by every path, id and name;
    only the prompt's prefix and system prompt take "" as written."""
    from mlx_grpo.config import EMPTY_STRING_KEYS

    value = [""] if origin is list else ""
    if key in EMPTY_STRING_KEYS:
        make_config(None, [(key, value)])
        return
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}(\[0\])?: must (not be empty|name a directory)"):
        make_config(None, [(key, value)])


@pytest.mark.parametrize("value", [["a"], {"a": 1}])
def test_task_of_a_wrong_type_is_named_not_a_traceback(value):
    """The task picks the default rewards before the types are checked: a list (unhashable) or
    a mapping there must still reach the type check that names the key."""
    with pytest.raises(ConfigError, match=r"data\.task: expected a string"):
        make_config(None, [("data.task", value)])


def test_the_harder_smollm2_recipe_is_the_recipe_but_for_its_task_and_prompt():
    """configs/smollm2-harder.yaml may differ from configs/smollm2.yaml only where its comments
    say: the operands, the worked example in the system prompt, where and how often it evaluates."""
    import dataclasses
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    base = dataclasses.asdict(make_config(str(root / "configs" / "smollm2.yaml")))
    harder = dataclasses.asdict(make_config(str(root / "configs" / "smollm2-harder.yaml")))
    differ = sorted(f"{section}.{k}" for section in base for k in base[section]
                    if base[section][k] != harder[section][k])
    assert differ == ["data.max_operand", "output.dir", "output.eval_size", "prompt.system_prompt"]
    assert harder["data"]["max_operand"] == 49
    assert harder["prompt"]["system_prompt"].endswith("e.g., <think> 20 + 7 = 27 </think> <answer> 27 </answer>.")
