"""Accuracy rewards: the answer, read from the completion, compared with the reference by value."""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..config import AccuracySettings
from .answers import answers_match, pick_answer

RewardFn = Callable[..., List[Optional[float]]]


def make_accuracy_reward(settings: AccuracySettings, extract: Optional[str] = None) -> RewardFn:
    """The accuracy reward for ``settings`` (``extract`` overrides where the answer is read).

    1.0 when the answer equals the reference ``answer`` column (``answers_match``), else 0.0; rows
    without a reference get None (not applicable). Range [0, 1].
    """
    mode = extract or settings.extract

    def accuracy(
        prompts: List[str], completions: List[str], answer: Optional[Sequence[object]] = None, **_
    ) -> List[Optional[float]]:
        if answer is None:
            return [None] * len(completions)
        # One verdict per distinct pair in a call: math-verify's verdict on a new shape may arrive
        # while the call runs (answers.MATH_VERIFY_WAIT_S), and the copies of one answer in a
        # group must not score differently (equal completions, unequal advantages).
        verdicts: Dict[Tuple[Optional[str], str], float] = {}

        def judged(completion: str, ref: object) -> float:
            key = (pick_answer(completion, mode), str(ref))
            if key not in verdicts:
                verdicts[key] = float(answers_match(key[0], ref, settings.math_verify))
            return verdicts[key]

        return [None if ref is None else judged(c, ref) for c, ref in zip(completions, answer)]

    accuracy.__doc__ = f"Accuracy of the answer read as {mode!r} against the answer column. Range [0, 1]."
    return accuracy

