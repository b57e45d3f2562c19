"""One typed config for a run: dataclass defaults < YAML file < command line.

The defaults are the embedded offline run (the tiny model on the arithmetic task), so
``python cli.py train`` with no arguments is a real job. Every key of the YAML file and every
``--set section.key=value`` is checked: an unknown key, a wrong type or an out-of-range value is a
``ConfigError`` whose message names the key (and the file), never a silently ignored setting.
"""

from __future__ import annotations

from .errors import UserError, first_line, shown
from .rundir import check_path_length

import dataclasses
import math
import struct
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Literal, Mapping, Optional, Tuple

import yaml


ASSETS = Path(__file__).resolve().parent / "assets"
EMBEDDED_MODEL = str(ASSETS / "tiny-r1")


class ConfigError(UserError, ValueError):
    """A bad config key or value; the message names the key and, where known, the file."""


# Every integer setting is a count, a length or a size: none means anything past a billion, and
# past 2**63 MLX and numpy cannot even hold it (``train.steps: 10**30`` failed inside the lr
# schedule). Seeds are the exception: MLX and numpy take any unsigned 64-bit seed, nothing else.
MAX_COUNT = 10**9
INT_RANGES: Dict[str, Tuple[int, int]] = {"train.seed": (0, 2**64 - 1), "data.split_seed": (0, 2**64 - 1)}
# Numbers are used in float32 (the learning rate, clip ranges, KL terms, reward weights and
# totals): past this one is inf there, and training fails after it began instead of at the door.
FLOAT32_MAX = 3.4028234663852886e38
# Below this (float32's smallest normal number) a nonzero setting is 0 where it is used: float32
# rounds 1e-50 to 0, and Metal, CUDA and many CPU kernels flush subnormals (down to 1.4e-45) to 0.
# ``--lr 1e-320`` passed the > 0 check and trained nothing.
FLOAT32_TINY = 1.1754943508222875e-38
# Reward weights are relative: advantages are normalised within a group (or the batch), so only
# their ratios count, and float32 keeps about 7 significant digits, so a reward weighted a million
# times less than another adds nothing to the total. No weight means more than 1e6 in size; past it
# a few weights times a reward overflow the total and its square (the advantages' std): two
# weights of 1e308 made every total inf, every update was skipped and the run still exited 0.
MAX_REWARD_WEIGHT = 1e6
# String settings for which "" means something as written (no response prefix, no system prompt).
# Any other empty string (a path, a Hub id, a field name, a stop string, a module key) can only be a
# mistake, mostly an unset shell variable in ``--set key=$VAR``, and was read as "not set".
EMPTY_STRING_KEYS = ("prompt.response_prefix", "prompt.system_prompt")
# Why an empty string is refused, where the reason is other than an unset shell variable.
EMPTY_STRING_WHY = {
    "rollout.stop": "an empty stop string ends every completion at its first token",
    "adapter.keys": "a module path inside a block, e.g. self_attn.q_proj",
    "data.answer_delimiter": "null: no delimiter",
}
# A config is a few hundred values: a YAML whose aliases expand past this (a billion laughs) or
# that nests deeper than this (100k nested lists) is not a config.
MAX_YAML_NODES = 100_000
MAX_YAML_DEPTH = 64


# Choice-valued settings: each type carries its choices once; the config's coercion checks them
# (``_coerce``) and the command line's help shows them (``choices``).
AdapterType = Literal["lora", "dora", "full"]
PromptKind = Literal["r1", "chat"]  # r1: the R1-Zero plain template; chat: the tokenizer's chat template
AnswerExtract = Literal["tag", "boxed", "last_number", "any"]  # tag: <answer>; boxed: last \boxed{}; any: first found
LengthUnit = Literal["tokens", "words", "chars"]
LossType = Literal["grpo", "bnpo", "dr_grpo", "dapo"]
ImportanceSampling = Literal["token", "sequence"]  # sequence: GSPO
ScaleRewards = Literal["group", "batch", "none"]  # none: Dr. GRPO
LRSchedule = Literal["constant", "cosine", "linear"]
MicroBatch = Literal["auto", "fixed"]
Tracker = Literal["tensorboard", "wandb"]


def _task_registry() -> Mapping[str, Any]:
    """``tasks.TASKS``: each task by name, with its default reward set (``Task.rewards``).

    A config that names no ``rewards`` gets its task's set here, when the config is built, rather
    than where a command meets the task: the run's saved config.yaml records the rewards it trained
    with (a resumed run reads them back), ``--set rewards.NAME=W`` adds to the task's set, the
    config's checks see the weights, and every command (train, eval, the rewards lab, bench) reads
    ``cfg.rewards``. The sets themselves live on the tasks' entries, so adding a task touches
    ``tasks/`` alone. Imported here, when a config is built, not at the top: ``tasks/`` imports
    this module, and importing the config alone loads nothing of ``tasks/``.
    """
    from .tasks import TASKS

    return TASKS


@dataclass
class ModelConfig:
    path: str = EMBEDDED_MODEL  # a Hub id (e.g. mlx-community/Qwen2.5-0.5B-Instruct-4bit), a local dir, a .gguf file or ollama:NAME[:TAG]
    revision: Optional[str] = None
    # A GGUF file inside the Hub repository ``path`` (e.g. path: bartowski/SmolLM2-135M-Instruct-GGUF,
    # gguf_file: SmolLM2-135M-Instruct-Q8_0.gguf); converted once into an MLX directory (gguf_convert.py).
    gguf_file: Optional[str] = None
    # Where converted GGUF models are kept; None: ~/.cache/mlx-grpo/gguf (under $XDG_CACHE_HOME if set).
    gguf_cache: Optional[str] = None
    trust_remote_code: bool = False
    # KL reference: None means the policy itself with its adapters switched off (no second copy).
    reference: Optional[str] = None
    # MLX's CPU backend only: rebuild a quantized or bf16/fp16 frozen base in float32 at load,
    # when it fits (its float32 matmuls are 30-75x faster there); Metal and CUDA keep it as is.
    float_base: bool = True
    # MLX's CPU backend only: the SiLU of gated MLPs (llama, qwen2/3, mistral, ...) without MLX's
    # slow CPU exp (fastmath.py; same outputs to float32 rounding); Metal and CUDA keep theirs.
    fast_mlp: bool = True
    # MLX's CPU backend only: attention with grouped heads stacked into one product and its
    # softmax without MLX's slow CPU exp (fastmath.attention).
    fast_attention: bool = True


@dataclass
class AdapterConfig:
    type: AdapterType = "lora"
    rank: int = 8
    scale: float = 2.0  # mlx-lm's name: the LoRA update is scale * B A
    alpha: Optional[float] = None  # PEFT's name: when set, scale = alpha / rank
    dropout: float = 0.0
    num_layers: int = -1  # the last N transformer blocks get adapters; -1: all
    keys: Optional[List[str]] = None  # module paths inside a block, e.g. [self_attn.q_proj]; None: all linears

    def effective_scale(self) -> float:
        return self.alpha / self.rank if self.alpha is not None else self.scale


@dataclass
class CountdownConfig:
    numbers: int = 3  # given numbers per puzzle
    max_number: int = 20  # each given number is in 1..max_number
    max_target: int = 99  # targets are integers in 1..max_target
    size: int = 2000  # distinct puzzles generated (train + held-out)


@dataclass
class DataConfig:
    task: str = "arithmetic"  # a name in tasks.TASKS: arithmetic, countdown, gsm8k, dataset...
    path: Optional[str] = None  # dataset: a JSONL/Parquet file, a folder of them or a Hub dataset id
    eval_path: Optional[str] = None  # held-out file; None: eval_split, else the last eval_size rows
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    answer_delimiter: Optional[str] = None  # keep only the text after it, e.g. "####" for GSM8K
    subset: Optional[str] = None  # Hub dataset config (folder), e.g. "main" for openai/gsm8k
    split: str = "train"  # Hub/folder split used for training
    eval_split: Optional[str] = None  # Hub/folder split held out, e.g. "test"
    revision: Optional[str] = None  # Hub dataset revision
    max_operand: int = 29  # arithmetic: a, b in 0..max_operand
    countdown: CountdownConfig = field(default_factory=CountdownConfig)
    eval_size: int = 400
    split_seed: int = 0


@dataclass
class PromptConfig:
    kind: PromptKind = "r1"
    response_prefix: str = " <think>"  # opens the response; judged as part of the completion
    system_prompt: Optional[str] = None  # chat only; None: the R1-Zero instruction, "": none


@dataclass
class RolloutConfig:
    group_size: int = 8  # G completions per prompt
    max_tokens: int = 20
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    stop: List[str] = field(default_factory=lambda: ["</answer>"])


@dataclass
class AccuracySettings:
    extract: AnswerExtract = "tag"
    math_verify: bool = True  # symbolic comparison: rational.py, then math-verify (LaTeX only) if installed


@dataclass
class OverlongSettings:
    max_length: Optional[int] = None  # DAPO's L_max; None: rollout.max_tokens
    cache: Optional[int] = None  # DAPO's L_cache (soft zone); None: max_length // 5
    unit: LengthUnit = "tokens"  # tokens need completion_ids (as in training)


@dataclass
class LengthSettings:
    max_length: Optional[int] = None  # penalty -1 at this length; None: rollout.max_tokens
    unit: LengthUnit = "tokens"


@dataclass
class RepetitionSettings:
    ngram_size: int = 3  # words per n-gram


@dataclass
class RewardSettings:
    """Settings of the built-in rewards that have any; each section is named after its reward."""

    accuracy: AccuracySettings = field(default_factory=AccuracySettings)
    overlong: OverlongSettings = field(default_factory=OverlongSettings)
    length: LengthSettings = field(default_factory=LengthSettings)
    repetition: RepetitionSettings = field(default_factory=RepetitionSettings)


@dataclass
class GRPOConfig:
    beta: float = 0.04  # KL coefficient (k3 estimator), DeepSeekMath's; 0 disables the reference pass
    epsilon: float = 0.2  # lower clip: ratio >= 1 - epsilon
    epsilon_high: Optional[float] = None  # upper clip (DAPO's clip-higher); None: epsilon
    # Bound on each token's k3 KL estimate (verl's low-variance KL clamps at 10): a token the
    # reference almost never emits otherwise gives KL in the hundreds and one step's gradient is
    # all KL. None: unbounded (the formula as published).
    kl_clamp: Optional[float] = 10.0
    num_iterations: int = 1  # mu: updates per batch of rollouts (clipping acts when > 1)
    loss_type: LossType = "grpo"
    importance_sampling: ImportanceSampling = "token"
    scale_rewards: ScaleRewards = "group"
    # Leave zero-advantage rows (flat groups) out of the update: faster, and exact only when
    # beta = 0 (with beta > 0 their KL term is dropped). False: the paper's objective, every row.
    skip_zero_advantage: bool = False
    mask_truncated_completions: bool = False  # TRL's flag: rows cut at max_tokens leave the loss
    # DAPO: sample more prompt groups until the step has prompts_per_step groups whose rewards
    # differ, at most dynamic_sampling_max_draws batches of prompts per step.
    dynamic_sampling: bool = False
    dynamic_sampling_max_draws: int = 4

    def clip_range(self) -> Tuple[float, float]:
        high = self.epsilon if self.epsilon_high is None else self.epsilon_high
        return self.epsilon, high


@dataclass
class TrainConfig:
    steps: int = 300
    prompts_per_step: int = 16
    learning_rate: float = 5e-4
    lr_schedule: LRSchedule = "cosine"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    grad_accumulation_steps: int = 1  # micro-batches per step (memory), one optimizer update
    grad_checkpoint: bool = False
    # auto: before the first step a measured dry micro-batch raises grad_accumulation_steps (and
    # sets grad_checkpoint) until a step fits in memory (microbatch.py); fixed: as configured.
    micro_batch: MicroBatch = "auto"
    # On the CPU backend, the rows of the scoring and update passes run in this many parts side
    # by side, one per core (MLX runs element-wise work on one thread per stream; lanes.py);
    # 1: one pass. More lanes than the BLAS's threads or than rows are not used.
    cpu_lanes: int = 2
    seed: int = 0
    # Steps in a row whose every update had a non-finite loss or gradient (each one skipped)
    # before the run stops; 0: never stop.
    max_nonfinite_steps: int = 3


@dataclass
class OutputConfig:
    dir: str = "runs/default"
    save_every: int = 50  # steps between checkpoints; 0: only at the end (and on an interrupt)
    keep_checkpoints: int = 3  # the newest K checkpoints are kept
    eval_every: int = 25  # steps between held-out evaluations (a curve in `plot`); 0: only at start and end
    eval_size: Optional[int] = None  # held-out prompts per evaluation; None: all
    eval_max_tokens: Optional[int] = None  # None: rollout.max_tokens
    eval_samples: int = 0  # K samples per held-out prompt for pass@1 / pass@K; 0: greedy only
    progress: bool = True
    overwrite: bool = False
    log_to: List[Tracker] = field(default_factory=list)  # optional extras
    wandb_project: str = "mlx-grpo"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    # Left out of a config: the task's reward set (make_config). This default is the default
    # task's (arithmetic's) set written out, not read from tasks/: building a Config must not import
    # tasks/ (rewards/ builds one as it loads, and tasks/ imports rewards/); tests/test_tasks.py
    # checks that the two agree.
    rewards: Dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.5})
    reward_settings: RewardSettings = field(default_factory=RewardSettings)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- building and checking


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` as type ``tp`` or raise a ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: must be one of {', '.join(allowed)}, got {shown(value)}")
        return value
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if origin in (list, List):
        (item,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single item on the command line
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {shown(value)}")
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        _, vt = typing.get_args(tp)
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping of name: value, got {shown(value)}")
        return {str(k): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {shown(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return _in_int_range(value, key)
        if isinstance(value, float) and value.is_integer():
            return _in_int_range(int(value), key)
        raise ConfigError(f"{key}: expected an integer, got {shown(value)}")
    if tp is float:
        number: Optional[float] = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {shown(value)}")
        if not math.isfinite(number):  # no setting means anything at nan or inf (weights would poison totals)
            raise ConfigError(f"{key}: expected a finite number, got {number}")
        why = float32_problem(number)
        if why:  # (repr: the number as written; :g shows 1e-320 as 9.99989e-321)
            raise ConfigError(f"{key}: {why}, got {number!r}")
        return number
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {shown(value)}")
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover - a bug in this file


def float32_problem(number: float) -> Optional[str]:
    """Why the finite ``number`` is not itself in float32, the dtype every float setting is used in
    (the learning rate, KL and clip settings, temperature, reward weights): past float32's range it
    is inf, nonzero below its smallest normal number 0; None when float32 holds it (rounded)."""
    if abs(number) > FLOAT32_MAX:  # finite in Python, inf where it is used
        return "must be within float32's range (|x| <= 3.4e38)"
    # (struct rounds as float32 does; the bound, not the rounding, decides: subnormals flush to 0)
    if number != 0 and abs(struct.unpack("f", struct.pack("f", number))[0]) < FLOAT32_TINY:
        return "must be 0 or at least 1.2e-38 in size (smaller is 0 in float32, where it is used)"
    return None


def reward_weight_problem(weight: float) -> Optional[str]:
    """Why ``weight`` cannot weigh a reward (None when it can): it must be finite, held by float32
    and at most MAX_REWARD_WEIGHT in size. The config's ``rewards`` and ``reward --rewards`` both ask."""
    if not math.isfinite(weight):
        return "must be a finite number"
    if abs(weight) > MAX_REWARD_WEIGHT:
        return f"must be at most {MAX_REWARD_WEIGHT:g} in size (weights are relative; past it totals overflow)"
    return float32_problem(weight)


def _in_int_range(value: int, key: str) -> int:
    """``value`` when it is in ``key``'s range (INT_RANGES, else at most MAX_COUNT in size; the
    sign is validate's to check), else a ConfigError naming the key and the range."""
    low, high = INT_RANGES.get(key, (-MAX_COUNT, MAX_COUNT))
    if low <= value <= high:
        return value
    if key in INT_RANGES:
        raise ConfigError(f"{key}: must be in {low}..2**64-1 (an unsigned 64-bit seed), got {shown(value)}")
    raise ConfigError(f"{key}: must be at most {MAX_COUNT} in size, got {shown(value)}")


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in known:
            raise ConfigError(
                f"{prefix}{k}: unknown key (known: {', '.join(sorted(known))})"
            )
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        value = data[f.name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{prefix}{f.name}: expected a section (a mapping), got {shown(value)}")
            kwargs[f.name] = _build(tp, value, f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = _coerce(value, tp, f"{prefix}{f.name}")
    return cls(**kwargs)


def validate(cfg: Config) -> Config:
    """Range checks and checks across keys (choices are checked as values are read, ``_coerce``;
    the task name by ``tasks.load_task``); raises ConfigError naming the first bad key."""
    checks = [
        ("rollout.group_size", cfg.rollout.group_size >= 2, "must be at least 2 (advantages compare completions of a group)"),
        ("rollout.max_tokens", cfg.rollout.max_tokens >= 1, "must be at least 1"),
        ("rollout.temperature", cfg.rollout.temperature >= 0, "must be >= 0"),
        ("rollout.top_p", 0 < cfg.rollout.top_p <= 1, "must be in (0, 1]"),
        ("rollout.top_k", cfg.rollout.top_k >= 0, "must be >= 0"),
        ("rollout.min_p", 0 <= cfg.rollout.min_p < 1, "must be in [0, 1)"),
        ("grpo.beta", cfg.grpo.beta >= 0, "must be >= 0"),
        ("grpo.epsilon", cfg.grpo.epsilon > 0, "must be > 0"),
        ("grpo.epsilon_high", cfg.grpo.epsilon_high is None or cfg.grpo.epsilon_high > 0, "must be > 0"),
        ("grpo.kl_clamp", cfg.grpo.kl_clamp is None or cfg.grpo.kl_clamp > 0, "must be > 0 (null: unbounded)"),
        ("grpo.num_iterations", cfg.grpo.num_iterations >= 1, "must be at least 1"),
        ("grpo.dynamic_sampling_max_draws", cfg.grpo.dynamic_sampling_max_draws >= 1, "must be at least 1"),
        ("train.steps", cfg.train.steps >= 0, "must be >= 0"),
        ("train.prompts_per_step", cfg.train.prompts_per_step >= 1, "must be at least 1"),
        ("train.learning_rate", cfg.train.learning_rate > 0, "must be > 0"),
        ("train.warmup_steps", cfg.train.warmup_steps >= 0, "must be >= 0"),
        ("train.weight_decay", cfg.train.weight_decay >= 0, "must be >= 0"),
        ("train.max_grad_norm", cfg.train.max_grad_norm >= 0, "must be >= 0"),
        ("train.grad_accumulation_steps", cfg.train.grad_accumulation_steps >= 1, "must be at least 1"),
        ("train.cpu_lanes", cfg.train.cpu_lanes >= 1, "must be at least 1 (1: one pass)"),
        ("adapter.rank", cfg.adapter.rank >= 1, "must be at least 1"),
        ("adapter.dropout", 0 <= cfg.adapter.dropout < 1, "must be in [0, 1)"),
        ("adapter.num_layers", cfg.adapter.num_layers == -1 or cfg.adapter.num_layers >= 1, "must be -1 (all) or at least 1"),
        # [] passed on to mlx-lm means every linear: the opposite of naming none
        ("adapter.keys", cfg.adapter.keys is None or len(cfg.adapter.keys) >= 1, "must name at least one module (null: every linear)"),
        ("data.max_operand", 1 <= cfg.data.max_operand <= 49, "must be in 1..49 (sums stay below 100)"),
        ("data.eval_size", cfg.data.eval_size >= 1, "must be at least 1"),
        ("data.countdown.numbers", 2 <= cfg.data.countdown.numbers <= 6, "must be in 2..6"),
        ("data.countdown.max_number", cfg.data.countdown.max_number >= 1, "must be at least 1"),
        ("data.countdown.max_target", cfg.data.countdown.max_target >= 1, "must be at least 1"),
        ("data.countdown.size", cfg.data.countdown.size >= 2, "must be at least 2"),
        ("reward_settings.overlong.max_length", _positive(cfg.reward_settings.overlong.max_length), "must be at least 1"),
        ("reward_settings.overlong.cache", _positive(cfg.reward_settings.overlong.cache), "must be at least 1"),
        ("reward_settings.length.max_length", _positive(cfg.reward_settings.length.max_length), "must be at least 1"),
        ("reward_settings.repetition.ngram_size", cfg.reward_settings.repetition.ngram_size >= 1, "must be at least 1"),
        ("output.dir", bool(cfg.output.dir.strip()), "must name a directory (an unset shell variable?)"),
        ("output.eval_max_tokens", _positive(cfg.output.eval_max_tokens), "must be at least 1"),
        # held_out[:-1] kept all but one prompt and held_out[:0] read as "all": null is all
        ("output.eval_size", _positive(cfg.output.eval_size), "must be at least 1 (null: all)"),
        ("output.save_every", cfg.output.save_every >= 0, "must be >= 0"),
        ("output.keep_checkpoints", cfg.output.keep_checkpoints >= 1, "must be at least 1"),
        ("train.max_nonfinite_steps", cfg.train.max_nonfinite_steps >= 0, "must be >= 0"),
        ("output.eval_every", cfg.output.eval_every >= 0, "must be >= 0"),
        ("output.eval_samples", cfg.output.eval_samples >= 0, "must be >= 0"),
    ]
    for key, ok, why in checks:
        if not ok:
            raise ConfigError(f"{key}: {why}, got {shown(_get(cfg, key))}")
    for key, value, optional in _strings(cfg):
        if value == "" and key not in EMPTY_STRING_KEYS:
            why = EMPTY_STRING_WHY.get(key.split("[")[0], "an unset shell variable?" + ("; null: the default" if optional else ""))
            raise ConfigError(f"{key}: must not be empty ({why}), got ''")
    for name, weight in cfg.rewards.items():
        why = reward_weight_problem(weight)
        if why:
            raise ConfigError(f"rewards.{name}: {why}, got {weight:g}")
    if cfg.data.task in ("jsonl", "dataset") and not cfg.data.path:
        raise ConfigError(f"data.path: required when data.task is {cfg.data.task}")
    if cfg.train.prompts_per_step % cfg.train.grad_accumulation_steps:
        raise ConfigError(
            f"train.grad_accumulation_steps: must divide train.prompts_per_step "
            f"({cfg.train.prompts_per_step}), got {cfg.train.grad_accumulation_steps}"
        )
    if not cfg.rewards:
        raise ConfigError("rewards: at least one reward is needed")
    check_path_length(cfg.output.dir, "output.dir")  # here, before a run prints anything
    return cfg


def config_warnings(cfg: Config) -> List[str]:
    """Settings that are valid but probably not meant (said at the start of a run, as TRL does)."""
    out = []
    if cfg.grpo.importance_sampling == "sequence" and cfg.grpo.loss_type != "grpo":
        out.append(
            f"grpo.importance_sampling: sequence (GSPO) is defined with each sequence's ratio "
            f"averaged per sequence (loss_type grpo); with loss_type {cfg.grpo.loss_type} longer "
            "completions weigh more than in GSPO"
        )
    return out


def _positive(value: Optional[int]) -> bool:
    return value is None or value >= 1


def _strings(obj: Any, prefix: str = "") -> Iterator[Tuple[str, str, bool]]:
    """(key, value, whether null is allowed) of every string setting, a list's items as key[i]:
    walked from the dataclasses, so that a key added later is checked too."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), prefix + f.name
        optional = type(None) in typing.get_args(hints[f.name])
        if dataclasses.is_dataclass(value):
            yield from _strings(value, key + ".")
        elif isinstance(value, str):
            yield key, value, optional
        elif isinstance(value, list):
            yield from ((f"{key}[{i}]", v, False) for i, v in enumerate(value) if isinstance(v, str))


def _get(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _set_dotted(tree: Dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        child = node.setdefault(p, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {p} is not a section")
        node = child
    node[parts[-1]] = value


def parse_set(item: str) -> Tuple[str, Any]:
    """Parse one ``key=value`` override; the value is read as YAML (so 0.1, true, [a, b] work)."""
    if "=" not in item:
        raise ConfigError(f"--set {shown(item)}: expected key=value, e.g. grpo.beta=0.04")
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = _read_yaml(raw, f"--set {key}") if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _read_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load(text)``, refused in one line naming ``where`` when it is not the size of a
    config: nested past MAX_YAML_DEPTH (PyYAML itself recurses: 100k nested lists are a
    RecursionError) or, counting every alias where it is used, past MAX_YAML_NODES values."""
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply (more than {MAX_YAML_DEPTH} levels)") from None
    except ValueError as e:  # Python will not read an int of over 4300 digits (not a YAMLError)
        raise ConfigError(f"{where}: cannot read a number ({first_line(e)})") from None
    _check_yaml_size(data, where)
    return data


def _check_yaml_size(data: Any, where: str) -> None:
    """Walk ``data`` as the config will (aliases expanded), without recursion, and stop at the first
    value past the bounds: a billion laughs is refused after MAX_YAML_NODES steps, not 10**9."""
    todo = [(data, 1)]
    for _ in range(MAX_YAML_NODES):
        if not todo:
            return
        value, depth = todo.pop()
        if depth > MAX_YAML_DEPTH:
            raise ConfigError(f"{where}: nested too deeply (more than {MAX_YAML_DEPTH} levels)")
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        todo.extend((c, depth + 1) for c in children)
    if todo:
        raise ConfigError(f"{where}: too large for a config (over {MAX_YAML_NODES} values once its "
                          "aliases are expanded)")


def load_yaml(path: str) -> Dict[str, Any]:
    """Read a YAML config file; errors name the file (and line for syntax errors)."""
    check_path_length(path, "--config")
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = _read_yaml(p.read_text(encoding="utf-8"), path)
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: cannot read config (not UTF-8 text)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}:{where} invalid YAML ({getattr(e, 'problem', e)})") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    return data


def make_config(
    yaml_path: Optional[str] = None,
    overrides: Optional[List[Tuple[str, Any]]] = None,
) -> Config:
    """Build the run config: defaults, then the YAML file, then each (dotted key, value) override."""
    tree: Dict[str, Any] = {}
    source = ""
    if yaml_path:
        tree = load_yaml(yaml_path)
        source = f"{yaml_path}: "
        try:
            _build(Config, tree, "")
        except ConfigError as e:
            raise ConfigError(f"{source}{e}") from None
    weights: List[Tuple[str, Any]] = []
    for key, value in overrides or []:
        if key.startswith("rewards."):
            weights.append((key[len("rewards."):], value))
            continue
        _check_dotted_key(key)
        _set_dotted(tree, key, value)
    if "rewards" not in tree:
        # Not configured: the task's own reward set (an unknown task keeps the default set, and
        # load_task names it as unknown before anything runs).
        data = tree.get("data") or {}
        task = data.get("task", DataConfig.task) if isinstance(data, dict) else None
        tasks = _task_registry()
        if isinstance(task, str) and task in tasks:  # a wrong type is named by the checks below
            tree["rewards"] = dict(tasks[task].rewards)
    for name, value in weights:
        # One reward's weight: added to (or changing) the rewards already configured.
        # A weight of 0 keeps a reward logged but out of the total.
        if not isinstance(tree.setdefault("rewards", {}), dict):
            raise ConfigError(f"rewards: expected a mapping of name: weight, got {shown(tree['rewards'])}")
        tree["rewards"][name] = value
    return validate(_build(Config, tree, ""))


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """A Config from ``Config.to_dict()`` output (e.g. one sent by another process), checked."""
    return validate(_build(Config, data, ""))


def _check_dotted_key(key: str) -> None:
    cls: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(cls)}
        if part not in names:
            where = ".".join(parts[:i]) or "top level"
            raise ConfigError(f"{key}: unknown key ({where} has: {', '.join(sorted(names))})")
        tp = typing.get_type_hints(cls)[part]
        if i < len(parts) - 1:
            if not dataclasses.is_dataclass(tp):
                raise ConfigError(f"{key}: {part} is not a section")
            cls = tp


def choices(dotted: str) -> Tuple[str, ...]:
    """The allowed values of a choice-valued key (e.g. ``grpo.loss_type``); () for other keys."""
    _check_dotted_key(dotted)
    cls: Any = Config
    *sections, name = dotted.split(".")
    for part in sections:
        cls = typing.get_type_hints(cls)[part]
    tp = typing.get_type_hints(cls)[name]
    if typing.get_origin(tp) in (list, List):
        (tp,) = typing.get_args(tp)
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else ()


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config as YAML (loadable again with --config)."""
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
