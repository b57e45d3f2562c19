"""Reading answers out of completions and comparing them by value (no eval of model output)."""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Optional

ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
NUMBER_RE = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?")


def extract_answer(completion: str) -> Optional[str]:
    """The text inside the last complete <answer>...</answer>, or None."""
    found = ANSWER_RE.findall(completion)
    return found[-1].strip() if found else None


def last_number(text: str) -> Optional[str]:
    """The last number anywhere in ``text`` (the lenient reading of an answer), or None."""
    found = NUMBER_RE.findall(text)
    return found[-1] if found else None


def to_number(text: str) -> Optional[Fraction]:
    """Parse a single number with its usual decorations ($, %, commas, a/b), exactly; else None."""
    s = text.strip().rstrip(".!;:").strip()
    s = re.sub(r"^\$|\$$", "", s).strip()
    percent = s.endswith("%")
    s = s.rstrip("%").strip().replace(",", "")
    try:
        if "/" in s:
            num, den = s.split("/", 1)
            value = Fraction(num.strip()) / Fraction(den.strip())
        else:
            value = Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return value / 100 if percent else value


def answers_match(predicted: Optional[str], reference: str) -> bool:
    """Whether ``predicted`` equals ``reference``: by value when both are numbers, else as text."""
    if predicted is None:
        return False
    p, r = to_number(predicted), to_number(str(reference))
    if p is not None and r is not None:
        return p == r
    norm = lambda s: " ".join(str(s).strip().rstrip(".").lower().split())  # noqa: E731
    return norm(predicted) == norm(reference)
