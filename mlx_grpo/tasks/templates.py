"""Prompt templates: DeepSeek-R1-Zero's plain template and the tokenizer's chat template.

A template turns a question into the text the model continues. Some templates end inside the
response (R1-Zero ends with ``Assistant: <think>``), so the part of the response that the
template already wrote is kept as ``response_prefix``: rewards judge ``response_prefix +
completion``, exactly what a reader of the whole answer would see.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence

from ..config import ConfigError, PromptConfig

# DeepSeek-R1-Zero's template, word for word (arXiv 2501.12948, table 1).
R1_ZERO_PREAMBLE = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., <think> reasoning "
    "process here </think> <answer> answer here </answer>."
)
R1_ZERO_TEMPLATE = R1_ZERO_PREAMBLE + " User: {prompt} Assistant:"

# The system prompt used with chat templates: same instruction, as a system message.
R1_SYSTEM_PROMPT = R1_ZERO_PREAMBLE


@dataclass(frozen=True)
class PromptFormat:
    """How a question becomes model input.

    kind: "r1" (the plain R1-Zero template) or "chat" (the tokenizer's chat template).
    response_prefix: text appended after the template that opens the response (e.g. "<think>");
        it is part of the prompt tokens and prepended to the completion for scoring.
    system_prompt: for "chat": the system message (None: the R1-Zero instruction; "": none).
    """

    kind: str = "r1"
    response_prefix: str = " <think>"
    system_prompt: Optional[str] = None


def prompt_format(cfg: PromptConfig) -> PromptFormat:
    """The prompt format a run's ``prompt`` config section describes."""
    return PromptFormat(cfg.kind, cfg.response_prefix, cfg.system_prompt)


def render_prompt(question: str, fmt: PromptFormat, tokenizer: Any = None) -> str:
    """Return the full prompt text for ``question`` under ``fmt``."""
    if fmt.kind == "r1":
        question = question.strip()
        # The paper writes "User: prompt. Assistant:"; a question that already ends a sentence
        # keeps its own mark instead of gaining a second one.
        if not question.endswith((".", "?", "!")):
            question += "."
        return R1_ZERO_TEMPLATE.format(prompt=question) + fmt.response_prefix
    if fmt.kind == "chat":
        template = getattr(tokenizer, "chat_template", None)
        if tokenizer is None or not template:
            raise ConfigError(
                "prompt.kind: chat was asked for but this tokenizer has no chat template; use r1"
            )
        messages = []
        system = R1_SYSTEM_PROMPT if fmt.system_prompt is None else fmt.system_prompt
        if system:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": question})
        text = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return text + fmt.response_prefix
    raise ConfigError(f"prompt.kind: unknown prompt format {fmt.kind!r} (expected r1 or chat)")


@dataclass(frozen=True)
class Prompter:
    """The one place a question becomes a prompt and a completion becomes the judged response.

    Every command that samples (train, eval, generate, bench, the rewards lab) goes through this:
    ``prompts`` renders rows with the run's template, ``responses`` puts the template's response
    prefix back in front of completions, as the rewards and the evaluation judge them.
    """

    fmt: PromptFormat
    tokenizer: Any = None

    @property
    def prefix(self) -> str:
        """The part of the response the template already wrote (shown before a streamed answer)."""
        return self.fmt.response_prefix

    def render(self, question: str) -> str:
        """The full prompt text for one question."""
        return render_prompt(question, self.fmt, self.tokenizer)

    def prompts(self, rows: Sequence[Mapping[str, Any]]) -> List[str]:
        """The prompt text of each row (its ``prompt`` column)."""
        return [self.render(r["prompt"]) for r in rows]

    def responses(self, completions: Sequence[str]) -> List[str]:
        """Each completion as the whole response a reader sees: response prefix + completion."""
        return [self.prefix + c for c in completions]


def prompter(cfg: PromptConfig, tokenizer: Any) -> Prompter:
    """The run's prompter: the ``prompt`` section's format with the model's tokenizer."""
    return Prompter(prompt_format(cfg), tokenizer)
