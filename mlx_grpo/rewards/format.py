"""Format rewards for the R1-Zero answer layout ``<think> ... </think> <answer> ... </answer>``."""

from __future__ import annotations

import re
from typing import List

_NO_TAG = r"(?:(?!</?think>|</?answer>).)*"
STRICT_RE = re.compile(rf"^\s*<think>{_NO_TAG}</think>\s*<answer>{_NO_TAG}</answer>\s*$", re.DOTALL)
SOFT_RE = re.compile(r"<think>.*?</think>.*?<answer>.*?</answer>", re.DOTALL)
TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def is_strict_format(completion: str) -> bool:
    """Exactly one think block then one answer block, nothing else but whitespace around them."""
    return STRICT_RE.match(completion) is not None


def format_reward(prompts: List[str], completions: List[str], **_) -> List[float]:
    """1.0 for the strict layout, else 0.0. Range [0, 1]."""
    return [1.0 if is_strict_format(c) else 0.0 for c in completions]


def soft_format_reward(prompts: List[str], completions: List[str], **_) -> List[float]:
    """1.0 when both tag pairs appear in order (anything around them allowed), else 0.0."""
    return [1.0 if SOFT_RE.search(c) else 0.0 for c in completions]


def tag_count_reward(prompts: List[str], completions: List[str], **_) -> List[float]:
    """0.25 for each of the four tags that appears exactly once. Range [0, 1]."""
    return [sum(0.25 for t in TAGS if c.count(t) == 1) for c in completions]
