"""Format rewards for the R1-Zero answer layout ``<think> ... </think> <answer> ... </answer>``."""

from __future__ import annotations

import re
from typing import List

_NO_TAG = r"(?:(?!</?think>|</?answer>).)*"
STRICT_RE = re.compile(
    rf"^\s*<think>{_NO_TAG}</think>\s*<answer>(?P<answer>{_NO_TAG})</answer>\s*$", re.DOTALL
)
SOFT_RE = re.compile(r"<think>.*?</think>.*?<answer>.*?</answer>", re.DOTALL)
TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def is_strict_format(completion: str) -> bool:
    """Exactly one think block then one non-empty answer block, nothing but whitespace around
    them (newlines allowed anywhere). The think block may be empty; an answer of only
    whitespace is no answer (otherwise ``<think></think><answer></answer>`` earns the reward)."""
    m = STRICT_RE.match(completion)
    return m is not None and bool(m.group("answer").strip())


def format_reward(prompts: List[str], completions: List[str], **_) -> List[float]:
    """Strict layout: 1.0 when ``is_strict_format``, else 0.0. Range [0, 1]."""
    return [1.0 if is_strict_format(c) else 0.0 for c in completions]


def soft_format_reward(prompts: List[str], completions: List[str], **_) -> List[float]:
    """1.0 when a think pair is followed by an answer pair anywhere (text around, nesting and
    repeats allowed), else 0.0. Range [0, 1]."""
    return [1.0 if SOFT_RE.search(c) else 0.0 for c in completions]


def tag_count(completion: str) -> float:
    """0.25 for each tag of the largest set of tags that each appear exactly once and stand in
    the layout's order (<think>, </think>, <answer>, </answer>).

    A tag written twice earns nothing, and neither does one out of place:
    ``<think><answer></think></answer>`` earns 0.75, not 1.0.
    """
    positions = [completion.find(t) for t in TAGS if completion.count(t) == 1]
    # Longest increasing run of positions, in layout order (at most 4 items: quadratic is fine).
    best: List[int] = []
    for i, p in enumerate(positions):
        best.append(1 + max((best[j] for j in range(i) if positions[j] < p), default=0))
    return 0.25 * max(best, default=0)


def tag_count_reward(prompts: List[str], completions: List[str], **_) -> List[float]:
    """Partial credit for the four tags (see ``tag_count``). Range [0, 1] in steps of 0.25."""
    return [tag_count(c) for c in completions]
