"""`cli.py generate`: completions for one prompt, with the template and sampling used in training."""

from __future__ import annotations

from typing import Any, Callable, List, Optional

from .config import Config
from .preflight import check_decode_memory, check_prompt
from .rollout import encode_prompt, sample_groups
from .sampling import make_sampler
from .tasks.templates import Prompter


def stream_completion(
    model: Any, tokenizer: Any, prompt_text: str, cfg: Config, temperature: float,
    emit: Callable[[str], None],
) -> str:
    """Decode one completion token by token, passing each new piece of text to ``emit``.

    Stops at EOS, at max_tokens, or once a configured stop string appeared. Returns the completion.
    """
    from mlx_lm import stream_generate

    sampler = make_sampler(cfg.rollout, temperature)
    text = ""
    for resp in stream_generate(
        model, tokenizer, encode_prompt(tokenizer, prompt_text), max_tokens=cfg.rollout.max_tokens,
        sampler=sampler,
    ):
        text += resp.text
        emit(resp.text)
        if any(s in text for s in cfg.rollout.stop):  # the token that completes a stop is kept,
            break  # as in training rollouts
    return text


def generate(
    model: Any, prompter: Prompter, question: str, cfg: Config, samples: int = 1,
    temperature: Optional[float] = None, emit: Optional[Callable[[str], None]] = None,
) -> List[str]:
    """``samples`` completions of ``question`` under the run's template, each with its prefix.

    One sample with ``emit`` streams; several decode together in one batch (the rollout engine).
    Before any decoding, the rendered question must fit the model's context with
    ``rollout.max_tokens`` (a ``DataError`` naming ``--prompt`` and its length in tokens) and the
    samples, decoded together, must fit in memory (``TooLarge`` naming ``--samples``).
    """
    temp = cfg.rollout.temperature if temperature is None else temperature
    prompt_text, tokenizer = prompter.render(question), prompter.tokenizer
    n = check_prompt(tokenizer, model, prompt_text, cfg.rollout.max_tokens, "--prompt", "rollout.max_tokens")
    check_decode_memory(model, samples, n, cfg.rollout.max_tokens, "--samples", "lower --samples or --max-tokens")
    if samples == 1 and emit is not None:
        emit(prompter.prefix)
        return prompter.responses([stream_completion(model, tokenizer, prompt_text, cfg, temp, emit)])
    ro = sample_groups(model, tokenizer, [prompt_text], cfg.rollout, group_size=samples, temperature=temp)
    return prompter.responses(ro.texts)
