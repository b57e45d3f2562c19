"""Format rewards for the R1-Zero answer layout ``<think> ... </think> <answer> ... </answer>``.

Parsed with ``str.find``/``str.count`` only, never a backtracking regex: a model under RL writes
degenerate text (thousands of repeated tags, long whitespace runs), and each reward here must stay
linear in the completion (a 1 MB completion of any shape costs milliseconds).
"""

from __future__ import annotations

from typing import List

TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def is_strict_format(completion: str) -> bool:
    """Exactly one think block then one non-empty answer block, nothing but whitespace around
    them (newlines allowed anywhere). The think block may be empty; an answer of only
    whitespace is no answer (otherwise ``<think></think><answer></answer>`` earns the reward)."""
    if any(completion.count(tag) != 1 for tag in TAGS):
        return False
    think, end_think, answer, end_answer = (completion.find(tag) for tag in TAGS)
    if not think < end_think < answer < end_answer:
        return False
    between = completion[end_think + len("</think>") : answer]
    after = completion[end_answer + len("</answer>") :]
    inside = completion[answer + len("<answer>") : end_answer]
    return not (completion[:think] + between + after).strip() and bool(inside.strip())


def has_soft_format(completion: str) -> bool:
    """A ``<think>`` then ``</think>`` then ``<answer>`` then ``</answer>``, anything around and
    between. Taking the earliest of each tag after the previous one finds such a chain whenever one
    exists, in one pass."""
    at = 0
    for tag in TAGS:
        at = completion.find(tag, at)
        if at < 0:
            return False
        at += len(tag)
    return True


def format_reward(prompts: List[str], completions: List[str], **_) -> List[float]:
    """Strict layout: 1.0 when ``is_strict_format``, else 0.0. Range [0, 1]."""
    return [1.0 if is_strict_format(c) else 0.0 for c in completions]


def soft_format_reward(prompts: List[str], completions: List[str], **_) -> List[float]:
    """1.0 when a think pair is followed by an answer pair anywhere (text around, nesting and
    repeats allowed), else 0.0. Range [0, 1]."""
    return [1.0 if has_soft_format(c) else 0.0 for c in completions]


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
