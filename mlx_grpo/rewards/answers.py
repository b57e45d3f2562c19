"""Reading answers out of completions and comparing them by value (no eval of model output).

The built-in normaliser reads one number in the usual dresses: signs, decimals, thousands
separators (``1,000``), fractions (``3/4``, ``\\frac{3}{4}``), mixed numbers (``1 1/2``),
percentages (``50%``, ``50\\%``), currency and units around it (``$5``, ``5 cm``, ``x = 5``), LaTeX
wrappers (``\\boxed{}``, ``$...$``, ``\\text{}``, thin spaces) and trailing punctuation. Two numbers
are compared exactly (``fractions.Fraction``), so ``0.75`` equals ``3/4`` but ``0.33`` does not
equal ``1/3``; when the reference is one number the answer must be one number too (``3 + 4`` is
not a final answer for 7). Other references are compared as text (case and whitespace ignored)
and, when the optional ``math-verify`` package is installed, by its LaTeX parser (symbolic
equivalence such as ``\\frac{\\sqrt{2}}{2}`` = ``\\frac{1}{\\sqrt{2}}``). Nothing here calls eval().
"""

from __future__ import annotations

import functools
import re
import threading
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Dict, Optional

# The innermost last answer block: an <answer> inside another one is skipped over.
ANSWER_RE = re.compile(r"<answer>((?:(?!<answer>).)*?)</answer>", re.DOTALL)

_NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d{1,3})?|\.\d+"  # exponents up to 999: no huge ints
# One number: a mixed number (1 1/2), a fraction (3/4, -1.5/2) or a plain number; sign included.
NUMBER_RE = re.compile(
    rf"(?P<mixed>[-+]?\d+)\s+(?P<mnum>\d+)\s*/\s*(?P<mden>\d+)(?![\d.,/])"
    rf"|(?P<num>[-+]?(?:{_NUM}))\s*/\s*(?P<den>[-+]?(?:{_NUM}))"
    rf"|(?P<plain>[-+]?(?:{_NUM}))"
)
# What may surround the one number of an answer: words (units, "x ="), currency, %, degrees.
_DECORATION_RE = re.compile(r"[A-Za-z_\s$€£¥₹%°'.:=]*")
_UNIT_SLASH_RE = re.compile(r"(?<=[A-Za-z])/(?=[A-Za-z])")  # km/h, not 5 / x
_PERCENT_RE = re.compile(r"\s*(?:%|percent\b|per\s+cent\b)", re.IGNORECASE)

_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_FRAC_SHORT_RE = re.compile(r"\\[dt]?frac\s*(\d)\s*(\d)")
_DEGREES_RE = re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°")
_THIN_SPACE_RE = re.compile(r"\\[,;:!]")
_WIDE_SPACE_RE = re.compile(r"\\q?quad\b|\\ |~")
_SIMPLE_NUMBER_RE = re.compile(rf"[-+]?(?:{_NUM})")


@dataclass(frozen=True)
class Number:
    """A parsed number: its exact value (the percent sign not applied) and whether it had one."""

    value: Fraction
    percent: bool = False

    @property
    def scaled(self) -> Fraction:
        return self.value / 100 if self.percent else self.value


def extract_answer(completion: str) -> Optional[str]:
    """The text inside the last complete <answer>...</answer> (the innermost when nested), or None."""
    found = ANSWER_RE.findall(completion)
    return found[-1].strip() if found else None


def extract_boxed(text: str) -> Optional[str]:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox``) with balanced braces, or None."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (6 if text.startswith("\\boxed", start) else 5)
    while i < len(text) and text[i] == " ":
        i += 1
    if i >= len(text):
        return None
    if text[i] != "{":  # \boxed 5: the next word
        word = re.match(r"[^\s$]+", text[i:])
        return word.group(0) if word else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j].strip()
    return None  # unbalanced: a truncated answer


def _frac(m: re.Match) -> str:
    num, den = m.group(1).strip(), m.group(2).strip()
    if _SIMPLE_NUMBER_RE.fullmatch(num) and _SIMPLE_NUMBER_RE.fullmatch(den):
        return f"{num}/{den}"
    return f"({num})/({den})"


def latex_to_plain(text: str) -> str:
    """LaTeX number notation as plain text: fractions, percent, spaces, text commands, degrees."""
    s = text.replace("\u2212", "-").replace("\\%", "%").replace("\\$", "$").replace("{,}", ",")
    s = _THIN_SPACE_RE.sub("", s)  # \, inside numbers is a thousands separator: 1\,000
    s = _WIDE_SPACE_RE.sub(" ", s)
    s = re.sub(r"\\left\b|\\right\b", "", s)
    for _ in range(3):  # nested \text{\textbf{..}}
        s = _TEXT_CMD_RE.sub(lambda m: f" {m.group(1)} ", s)
    s = _DEGREES_RE.sub("", s)
    s = _FRAC_SHORT_RE.sub(r"\1/\2", s)
    for _ in range(3):  # nested fractions stay symbolic after the first pass
        s = _FRAC_RE.sub(_frac, s)
    return s


def _unwrap(s: str) -> str:
    """Drop one pair of brackets around the whole string: (5), {5}, [5]."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    if len(s) < 2 or s[0] not in pairs or s[-1] != pairs[s[0]]:
        return s
    depth = 0
    for i, ch in enumerate(s):
        depth += ch == s[0]
        depth -= ch == pairs[s[0]]
        if depth == 0 and i < len(s) - 1:
            return s  # (1)/(2): the first bracket closes early
    return s[1:-1].strip()


def clean_answer(text: str) -> str:
    """An answer without its wrappers: \\boxed, $...$, \\(..\\), LaTeX spacing, trailing punctuation."""
    s = text.strip()
    boxed = extract_boxed(s)
    if boxed is not None:
        s = boxed
    s = latex_to_plain(s)
    s = re.sub(r"\\[()\[\]]", " ", s).replace("$", " ")  # math delimiters and dollar signs
    s = s.strip().strip("*`\"").strip()
    s = re.sub(r"[\s.!?;:,]+$", "", s)
    return _unwrap(s)


def parse_number(text: str) -> Optional[Number]:
    """The value of an answer that is exactly one number (words and units around it allowed)."""
    s = clean_answer(text)
    found = list(NUMBER_RE.finditer(s))
    if len(found) != 1:
        return None
    m = found[0]
    rest = _UNIT_SLASH_RE.sub("", s[: m.start()] + " " + s[m.end() :])
    if not _DECORATION_RE.fullmatch(rest):  # an operator or bracket left over: an expression
        return None
    try:
        if m.group("mixed") is not None:
            whole = Fraction(m.group("mixed"))
            part = Fraction(int(m.group("mnum")), int(m.group("mden")))
            value = whole - part if m.group("mixed").startswith("-") else whole + part
        elif m.group("num") is not None:
            value = _fraction(m.group("num")) / _fraction(m.group("den"))
        else:
            value = _fraction(m.group("plain"))
    except (ValueError, ZeroDivisionError):
        return None
    percent = bool(_PERCENT_RE.match(s, m.end()))
    return Number(value, percent)


def _fraction(token: str) -> Fraction:
    return Fraction(token.replace(",", ""))


def to_number(text: str) -> Optional[Fraction]:
    """The value of a one-number answer with the percent applied (50% -> 1/2), or None."""
    n = parse_number(text)
    return None if n is None else n.scaled


def last_number(text: str) -> Optional[str]:
    """The last number anywhere in ``text`` (the lenient reading of an answer), or None."""
    found = list(NUMBER_RE.finditer(latex_to_plain(text)))
    return found[-1].group(0) if found else None


def numbers_equal(a: Number, b: Number) -> bool:
    """Equal values; a percent sign on one side only may be read either way (50% = 0.5 = 50)."""
    if a.scaled == b.scaled:
        return True
    return a.percent != b.percent and a.value == b.value


def _text_key(s: str) -> str:
    return "".join(clean_answer(s).lower().split())


def answers_match(predicted: Optional[str], reference: object, math_verify: bool = True) -> bool:
    """Whether ``predicted`` equals ``reference``: by value when both are one number, else as text
    or (with ``math_verify`` and the package installed) symbolically."""
    if predicted is None or reference is None:
        return False
    ref = str(reference)
    if not clean_answer(predicted):
        return False  # an empty answer matches nothing, not even an empty reference
    p, r = parse_number(predicted), parse_number(ref)
    if r is not None:
        # A numeric reference wants a number: exact, no symbolic engine. An unevaluated
        # expression ("3 + 4" for 7) is not a final answer, or copying the question would pay.
        return p is not None and numbers_equal(p, r)
    if _text_key(predicted) == _text_key(ref):
        return True
    if math_verify and _mathy(predicted) and _mathy(ref):
        checker = math_verify_checker()
        if checker is not None:
            return checker(predicted, ref)
    return False


def _mathy(s: str) -> bool:
    # Only answers with a digit or a LaTeX command go to math-verify: it reads plain words as
    # products of symbols ("Pairs" would equal "Paris").
    return any(ch.isdigit() for ch in s) or "\\" in s


@functools.lru_cache(maxsize=1)
def math_verify_checker() -> Optional[Callable[[str, str], bool]]:
    """math-verify's equivalence test (LaTeX parser only), or None when it is not installed.

    Only ``LatexExtractionConfig`` is used: math-verify's plain-expression reader goes through
    sympy's ``parse_expr``, which evaluates Python code.
    """
    try:
        from math_verify import LatexExtractionConfig, parse, verify
    except ImportError:
        return None
    config = [LatexExtractionConfig()]

    def as_latex(s: str) -> str:
        s = s.strip()
        return s if "$" in s or "\\(" in s or "\\[" in s else f"${s}$"

    def check(predicted: str, reference: str) -> bool:
        # Its timeouts use signal.alarm, which only the main thread may set.
        main = threading.current_thread() is threading.main_thread()
        timeout: Dict[str, Optional[int]] = {} if main else {"parsing_timeout": None}
        try:
            gold = parse(as_latex(reference), extraction_config=config, **timeout)
            pred = parse(as_latex(predicted), extraction_config=config, **timeout)
            if not gold or not pred:
                return False
            return bool(verify(gold, pred, **({} if main else {"timeout_seconds": None})))
        except Exception:  # a parser failure on model output is a wrong answer, not a crash
            return False

    return check


EXTRACTORS: Dict[str, Callable[[str], Optional[str]]] = {
    "tag": extract_answer,
    "boxed": extract_boxed,
    "last_number": last_number,
}


def pick_answer(completion: str, mode: str = "tag") -> Optional[str]:
    """The answer of a completion read as ``mode``: tag, boxed, last_number, or any (the first of
    those that finds one)."""
    if mode == "any":
        for extract in EXTRACTORS.values():
            found = extract(completion)
            if found is not None:
                return found
        return None
    return EXTRACTORS[mode](completion)
