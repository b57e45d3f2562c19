"""One way to build a policy: the model, its tokenizer, the KL reference, the prompt template and
the rewards with their settings, as every command that runs the model needs them.

``train``, ``bench``, ``eval``, ``generate`` and the rewards lab all start from ``load_policy``, so
a setting (``reward_settings``, ``prompt``, ``adapter``, ``train.seed``) means the same everywhere.
The rewards are resolved before any model loads: a typo in a reward name costs no loading time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

import mlx.core as mx
import mlx.nn as nn

from .config import Config
from .forward import enable_grad_checkpoint
from .models import attach_adapters, load_adapters, load_model
from .rewards import RewardFn, configured_rewards
from .tasks.templates import Prompter, prompter


@dataclass
class Policy:
    """What a command samples from and judges with.

    model: the policy (adapters attached: fresh ones for training, loaded ones for inference).
    tokenizer: its tokenizer.
    reference: a separate KL reference model (``model.reference``); None: the policy with its
        adapters switched off (``models.adapters_disabled``).
    prompter: the prompt template and the response prefix (``tasks.templates.Prompter``).
    reward_fns: the configured rewards, built with the config's ``reward_settings``.
    weights: each reward's weight (``cfg.rewards``).
    """

    model: nn.Module
    tokenizer: Any
    reference: Optional[nn.Module]
    prompter: Prompter
    reward_fns: Dict[str, RewardFn]
    weights: Dict[str, float]


def load_policy(
    cfg: Config,
    say: Optional[Callable[[str], None]] = None,
    adapter_dir: Optional[str] = None,
    training: bool = True,
) -> Policy:
    """Build the configured policy.

    ``training``: fresh adapters (``cfg.adapter``), gradient checkpointing as configured and the
    separate reference model when one is configured. Otherwise (eval, generate, the rewards lab)
    the adapters saved in ``adapter_dir`` (when given) are attached and the model is in eval mode.
    The random generator is seeded with ``train.seed`` after loading either way: building a model
    draws random initial weights before loading its own, so the adapters' initialisation and the
    samples don't depend on what else was loaded (or on whether a reference model was).
    """
    reward_fns = configured_rewards(cfg)  # fail before loading a model
    model, tokenizer = load_model(cfg.model, say=say)
    reference = None
    if training and cfg.model.reference:
        reference, _ = load_model(cfg.model, cfg.model.reference, say=say)
        reference.freeze()
    if training:
        mx.random.seed(cfg.train.seed)  # before the adapters: their initial weights come from it
        attach_adapters(model, cfg.adapter)
        if cfg.train.grad_checkpoint:
            enable_grad_checkpoint(model)
    else:
        if adapter_dir:
            load_adapters(model, adapter_dir)
        model.eval()
        mx.random.seed(cfg.train.seed)  # after the saved adapters (their placeholders draw too)
    return Policy(model, tokenizer, reference, prompter(cfg.prompt, tokenizer), reward_fns, dict(cfg.rewards))
