"""Length and repetition shaping: penalties (<= 0) added to the total to steer length and style.

- ``overlong``: DAPO's soft overlong punishment (arXiv 2503.14476): 0 up to L_max - L_cache, then
  linear down to -1 at L_max, and -1 beyond.
- ``length``: a plain linear length penalty, -L / L_max (capped at -1).
- ``repetition``: minus the share of repeated word n-grams (open-r1's repetition penalty), over
  the completion's first ``MAX_WORDS`` words.

Lengths are counted in tokens (the ``completion_ids`` column the GRPO step passes, as TRL does),
words or characters, as the reward's settings say.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from ..config import LengthSettings, OverlongSettings, RepetitionSettings
from .errors import RewardError

RewardFn = Callable[..., List[Optional[float]]]

# The repetition penalty reads at most this many words, so a completion of any length costs no more
# than 50 k words do (1 MB holds up to 500 k words; numbering 250 k took 100-200 ms).
# A rollout's completions (rollout.max_tokens tokens, rarely more than one word each) stay below it,
# so in training the penalty is exact; only longer texts scored with `cli.py reward` are cut.
MAX_WORDS = 50_000
_INT64_MAX = np.iinfo(np.int64).max


def completion_lengths(
    completions: Sequence[str], unit: str, completion_ids: Optional[Sequence[Sequence[int]]], reward: str
) -> List[int]:
    """Each completion's length in ``unit`` (tokens, words or chars)."""
    if unit == "tokens":
        if completion_ids is None:
            raise RewardError(
                f"reward {reward} counts tokens but got no completion_ids column (training passes it; "
                f"for a file of completions add completion_ids or --set reward_settings.{reward}.unit=words)"
            )
        return [len(ids) for ids in completion_ids]
    if unit == "words":
        return [len(c.split()) for c in completions]
    return [len(c) for c in completions]


def overlong_penalty(length: int, max_length: int, cache: int) -> float:
    """DAPO: 0 if length <= max_length - cache; ((max_length - cache) - length) / cache up to
    max_length; -1 beyond. Range [-1, 0]."""
    free = max_length - cache
    if length <= free:
        return 0.0
    if length <= max_length:
        return (free - length) / cache
    return -1.0


def _need(value: Optional[int], key: str) -> int:
    # resolve_settings() fills these from rollout.max_tokens; a direct caller must give them.
    if value is None:
        raise RewardError(f"reward_settings.{key}: not set (resolve_settings fills it from rollout.max_tokens)")
    return value


def make_overlong_reward(settings: OverlongSettings) -> RewardFn:
    """DAPO's overlong penalty with L_max = ``max_length`` and L_cache = ``cache``. Range [-1, 0]."""
    max_length = _need(settings.max_length, "overlong.max_length")
    cache = _need(settings.cache, "overlong.cache")

    def overlong(prompts: List[str], completions: List[str], completion_ids=None, **_) -> List[Optional[float]]:
        lengths = completion_lengths(completions, settings.unit, completion_ids, "overlong")
        return [overlong_penalty(n, max_length, cache) for n in lengths]

    return overlong


def make_length_reward(settings: LengthSettings) -> RewardFn:
    """-min(L, max_length) / max_length: shorter is better, linearly. Range [-1, 0]."""
    max_length = _need(settings.max_length, "length.max_length")

    def length(prompts: List[str], completions: List[str], completion_ids=None, **_) -> List[Optional[float]]:
        lengths = completion_lengths(completions, settings.unit, completion_ids, "length")
        return [0.0 - min(n, max_length) / max_length for n in lengths]

    return length


def word_ids(words: Sequence[str]) -> Tuple[np.ndarray, int]:
    """Each word as a small integer (equal words, equal ids; ids numbered by first appearance) and
    the number of distinct words."""
    vocab = dict.fromkeys(words)
    index = dict(zip(vocab, range(len(vocab))))
    return np.fromiter(map(index.__getitem__, words), dtype=np.int64, count=len(words)), len(vocab)


def distinct_ngrams(ids: np.ndarray, size: int, n: int) -> int:
    """The number of distinct n-grams of ``ids`` (each in [0, size)), exactly: each n-gram packed
    into one int64 in base ``size`` and counted by sorting (a set of 250 k word tuples was the cost
    of the old penalty). Where the next digit would overflow int64, the partial keys are replaced
    by their ranks first (a bijection, so equal n-grams still get equal keys)."""
    total = len(ids) - n + 1
    keys, bound = ids[:total], size  # invariant: 0 <= keys < bound
    for k in range(1, n):
        if bound > _INT64_MAX // size:
            keys = np.unique(keys, return_inverse=True)[1].reshape(-1)
            bound = total
        keys = keys * size + ids[k:k + total]
        bound *= size
    ordered = np.sort(keys)
    return 1 + int(np.count_nonzero(ordered[1:] != ordered[:-1]))


def repetition_penalty(text: str, n: int) -> float:
    """-(1 - distinct n-grams / n-grams) over the first ``MAX_WORDS`` whitespace-separated words;
    0 with fewer than n words. Range (-1, 0]: -1 is approached by one n-gram said over and over."""
    words = text.split(None, MAX_WORDS)[:MAX_WORDS]
    if len(words) < n:
        return 0.0
    ids, size = word_ids(words)
    return distinct_ngrams(ids, size, n) / (len(words) - n + 1) - 1.0


def make_repetition_reward(settings: RepetitionSettings) -> RewardFn:
    """The repetition penalty on word ``ngram_size``-grams. Range (-1, 0]."""

    def repetition(prompts: List[str], completions: List[str], **_) -> List[Optional[float]]:
        return [repetition_penalty(c, settings.ngram_size) for c in completions]

    return repetition
