"""Reading answers out of completions and comparing them by value (no eval of model output).

The built-in normaliser reads one number in the usual dresses: signs, decimals, thousands
separators (``1,000``), fractions (``3/4``, ``\\frac{3}{4}``), mixed numbers (``1 1/2``),
percentages (``50%``, ``50\\%``), vulgar fractions (``½``), LaTeX wrappers (``\\boxed{}``, ``$...$``,
``\\text{}``, thin spaces) and trailing punctuation, with only a closed list of words around it
(``x = 5``, ``minus 5``, ``$5``, ``5 million``, ``5 cm²``: see ``numbers``). Two numbers
are compared exactly (``fractions.Fraction``), so ``0.75`` equals ``3/4`` but ``0.33`` does not
equal ``1/3``; when the reference is one number the answer must be one number too (``3 + 4`` is
not a final answer for 7). Other references are compared as text (case and whitespace ignored)
and, when the optional ``math-verify`` package is installed, by its LaTeX parser (symbolic
equivalence such as ``\\frac{\\sqrt{2}}{2}`` = ``\\frac{1}{\\sqrt{2}}``). Nothing here calls eval().

Everything here is linear in the text, with few regex passes, each run only when its trigger
character is present: a model under RL may generate a megabyte of degenerate text.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import gc
import logging
import math
import re
from fractions import Fraction
from typing import Any, Callable, Dict, Iterable, Iterator, Optional

import numpy as np

from .rational import rational_equal, token_count
from .verdicts import Verifier
from .numbers import NUMBER_RE, SIMPLE_NUMBER_RE, Number, read_number

__all__ = ["Number", "NUMBER_RE", "answers_match", "clean_answer", "extract_answer", "extract_boxed",
           "last_number", "latex_to_plain", "parse_number", "pick_answer", "strip_trailing", "to_number"]

# An answer longer than this, once its \boxed{} is taken, is no final answer: it matches nothing,
# and is not cleaned (a megabyte of degenerate text would cost a regex pass per cleaning step).
MAX_ANSWER_CHARS = 10_000
# The lenient reading looks for the last number in this many final characters only: the answer is
# at the end, and a completion with tens of thousands of numbers would cost a Python step each.
LAST_NUMBER_WINDOW = 10_000
# What math-verify is given: its LaTeX parser and sympy spend up to its timeout (5 s by default;
# here MATH_VERIFY_LIMIT_S instead) on long or explosive input (``\\frac{1}{2}`` 25 times:
# 0.6 s; ``9^{9^{9}}``, ``10!!``, 100 nested brackets: the whole timeout). A final answer needs
# none of these.
MAX_MATH_VERIFY_CHARS = 150
# Its parse costs about a millisecond a token once warm (2 cores, idle), whatever the shape
# (``\\{\\sqrt{2}, \\sqrt{3}, ...\\}``, unions of intervals, tuples): at most this many tokens
# (a number, a command, a bracket, an operator: ``rational.token_count``) keeps it near 30 ms.
MAX_MATH_VERIFY_TOKENS = 32
MAX_MATH_VERIFY_DEPTH = 8  # bracket nesting
# Powers: sympy expands them when it compares, so the cost grows with the exponent and with the
# terms of the base: ``(x+1)^{999}-(x-1)^{999}`` held math-verify for its whole timeout, and so did
# ``\\sin(x)^{99}``, ``x^{999*999}`` and 15 factors ``(x+y+z+1)`` side by side. An exponent's size is
# the product of the numbers in it (``999*999`` counts 998001), and bounded twice: on a plain number
# (``2^{100}``: one integer, microseconds to compute) and on anything else (a symbol, a bracket).
MAX_MATH_VERIFY_NUMBER_EXPONENT = 999
MAX_MATH_VERIFY_EXPONENT = 12
# What the answer would expand to, estimated on math-verify's parse before it compares: a sum
# counts the terms of its parts, a product multiplies them, a power of a k-term base by n counts
# the C(n+k-1, k-1) terms of the multinomial (``(x+1)^{8}-(x-1)^{8}`` 18, ``(x+y+z+1)^{3}`` 20,
# ``(a+b)(c+d)(e+f)(g+h)`` 16). A comparison costs about 20 ms plus 2-5 ms a term (2 cores, under
# a load of 4): at 16 terms, what math-verify takes on any short answer there (``\\binom{n}{2}``
# against ``\\frac{n(n-1)}{2}``: 45-100 ms).
MAX_MATH_VERIFY_TERMS = 16
# The arguments of these are computed at parsing (``\\binom{999999}{499999}``: the whole timeout).
MAX_MATH_VERIFY_COMBINATORIAL_DIGITS = 4
# A reward waits at most this long for math-verify's verdict on a pair (``verdicts.Verifier``): a
# verdict decided later is no match this time and kept for the pair's next sight. Warm comparisons
# take 0.2-25 ms; a shape the parser meets for the first time up to ~250 ms, once (hence the
# warm-up on the run's own references: prepare_math_verify). The held-out evaluation waits for
# every verdict (``full_verdicts``).
MATH_VERIFY_WAIT_S = 0.04
# A last resort past every bound above: a comparison still running after this long is stopped and
# is no match (nobody waits for it in training; an evaluation waits this long at most for one
# comparison, plus those queued before it).
MATH_VERIFY_LIMIT_S = 1.0
MAX_RATIONAL_CHARS = 1_000  # what rational.rational_equal reads (linear; microseconds a character)
_EXPONENT_RE = re.compile(r"\^\s*(\{)?")
_LITERAL_RE = re.compile(r"\d+(?:\.\d+)?")
_NUMBER_BASE_RE = re.compile(r"(?<![\w.])\d+(?:\.\d+)?$")  # 2^, 1.5^: not x2^, a_2^, {2}^
_COMBINATORIAL_RE = re.compile(r"\\(?:[dt]?binom|choose|Gamma)(?![A-Za-z])")
_LONG_INTEGER_RE = re.compile(r"\d{%d}" % (MAX_MATH_VERIFY_COMBINATORIAL_DIGITS + 1))

_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|textit|textrm|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_FRAC_SHORT_RE = re.compile(r"\\[dt]?frac\s*(\d)\s*(\d)")
# ^\circ, ^{\circ}, ° (then an optional C or F). The brace and the spaces after it form one optional
# group: two optional space runs side by side would be tried in every split (quadratic on "^   ").
_DEGREES_RE = re.compile(r"(?:\^\s*(?:\{\s*)?\\circ\s*\}?|°)(?:[CF](?![A-Za-z]))?")
_THIN_SPACE_RE = re.compile(r"\\[,;:!]")
# Patterns start with a literal or a character set, so the engine skips ahead to candidates
# instead of trying every position (a lookbehind first would cost ~50 ms per MB).
_WIDE_SPACE_RE = re.compile(r"\\(?:q?quad\b| )")
_TIE_RE = re.compile(r"~(?<=\S~)(?=\S)")  # a LaTeX tie (5~cm), not "~5" (about 5)
_DIGIT_GROUP_SPACE_RE = re.compile(r"[\u00a0\u2009\u202f\u2007](?<=\d.)(?=\d{3}(?!\d))")  # 1 000 000
_VULGAR = {"½": "1/2", "⅓": "1/3", "⅔": "2/3", "¼": "1/4", "¾": "3/4", "⅕": "1/5", "⅖": "2/5",
           "⅗": "3/5", "⅘": "4/5", "⅙": "1/6", "⅚": "5/6", "⅐": "1/7", "⅛": "1/8", "⅜": "3/8",
           "⅝": "5/8", "⅞": "7/8", "⅑": "1/9", "⅒": "1/10"}
_VULGAR_RE = re.compile("[" + "".join(_VULGAR) + "]")
_CHARS = str.maketrans({"\u2212": "-", "\u2044": "/", "²": "^2", "³": "^3"})
_MATH_DELIMITER_RE = re.compile(r"\\[()\[\]]")
_BOXED_WORD_RE = re.compile(r" *([^\s$]*)")
# Every character str.isspace() accepts (the same set as the regex \s), for one C-level rstrip.
_WHITESPACE = ("\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005"
               "\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000")


def extract_answer(completion: str) -> Optional[str]:
    """The text inside the last complete <answer>...</answer> (the innermost when nested), or None.

    The last ``<answer>`` that opens before the last ``</answer>``, up to the first ``</answer>``
    after it: no opening tag stands between them, and no later block is closed. A few ``find``
    calls, whatever the number of tags.
    """
    last_close = completion.rfind("</answer>")
    start = completion.rfind("<answer>", 0, max(last_close, 0))
    if start < 0:
        return None
    start += len("<answer>")
    return completion[start : completion.find("</answer>", start)].strip()


def matching_close(text: str, start: int) -> int:
    """The index of the bracket that closes the one at ``text[start]`` (``(``, ``[`` or ``{``), or -1.

    The usual case (no bracket opens before the first close) is two ``find`` calls; otherwise the
    depth is a running sum over the UTF-8 bytes (brackets are ASCII, and no byte of a multi-byte
    character is ASCII), vectorised: a megabyte of nested brackets costs milliseconds, where a
    Python loop over it would cost a second.
    """
    opening = text[start]
    closing = {"(": ")", "[": "]", "{": "}"}[opening]
    first_close = text.find(closing, start + 1)
    if first_close < 0:
        return -1
    if text.find(opening, start + 1, first_close) < 0:
        return first_close
    data = text[start:].encode("utf-8", "surrogatepass")
    codes = np.frombuffer(data, dtype=np.uint8)
    depth = np.cumsum((codes == ord(opening)).astype(np.int32) - (codes == ord(closing)), dtype=np.int32)
    closed = np.flatnonzero(depth == 0)
    if not closed.size:
        return -1
    return start + len(data[: int(closed[0])].decode("utf-8", "surrogatepass"))


def extract_boxed(text: str) -> Optional[str]:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox``) with balanced braces, or None."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = start + (6 if text.startswith("\\boxed", start) else 5)
    word = _BOXED_WORD_RE.match(text, i)
    i = word.start(1)
    if i >= len(text):
        return None
    if text[i] != "{":  # \boxed 5: the next word
        return word.group(1) or None
    end = matching_close(text, i)
    return text[i + 1 : end].strip() if end >= 0 else None  # unbalanced: a truncated answer


def _frac(m: re.Match) -> str:
    num, den = m.group(1).strip(), m.group(2).strip()
    if SIMPLE_NUMBER_RE.fullmatch(num) and SIMPLE_NUMBER_RE.fullmatch(den):
        return f"{num}/{den}"
    return f"({num})/({den})"


def latex_to_plain(text: str) -> str:
    """LaTeX and Unicode number notation as plain text: fractions (``\\frac``, ``½``), percent,
    spaces (``\\,`` and thin or no-break spaces between digit groups), text commands, degrees,
    powers (``²``), the minus sign."""
    s = text.translate(_CHARS).replace("\\%", "%").replace("\\$", "$").replace("{,}", ",")
    # Each pass runs only when its trigger character is there: ``in`` is a C scan, ~50x faster
    # than a regex pass, and degenerate completions are long.
    if any(ch in s for ch in _VULGAR):
        s = _VULGAR_RE.sub(lambda m: " " + _VULGAR[m.group()], s)  # 1½ -> 1 1/2, a mixed number
    if any(ch in s for ch in "\u00a0\u2009\u202f\u2007"):
        s = _DIGIT_GROUP_SPACE_RE.sub("", s)
    if "~" in s:
        s = _TIE_RE.sub(" ", s)
    latex = "\\" in s
    if latex:
        s = _THIN_SPACE_RE.sub("", s)  # \, inside numbers is a thousands separator: 1\,000
        s = _WIDE_SPACE_RE.sub(" ", s)
        s = re.sub(r"\\left\b|\\right\b", "", s)
        for _ in range(3):  # nested \text{\textbf{..}}
            s = _TEXT_CMD_RE.sub(lambda m: f" {m.group(1)} ", s)
    if "^" in s or "°" in s:
        s = _DEGREES_RE.sub("", s)
    if latex:
        s = _FRAC_SHORT_RE.sub(r"\1/\2", s)
        for _ in range(3):  # nested fractions stay symbolic after the first pass
            s = _FRAC_RE.sub(_frac, s)
    return s


def strip_trailing(text: str, punctuation: str = ".!?;:,") -> str:
    """``text`` without trailing whitespace and ``punctuation``, in one C-level pass (a regex
    ``[...]+$`` retries from every position of a long run: quadratic)."""
    return text.rstrip(_WHITESPACE + punctuation)


def _unwrap(s: str) -> str:
    """Drop one pair of brackets around the whole string: (5), {5}, [5]."""
    if len(s) < 2 or s[0] not in "({[" or matching_close(s, 0) != len(s) - 1:
        return s  # (1)/(2): the first bracket closes early
    return s[1:-1].strip()


def clean_answer(text: str) -> str:
    """An answer without its wrappers: \\boxed, $...$, \\(..\\), LaTeX spacing, trailing punctuation;
    "" for an answer longer than ``MAX_ANSWER_CHARS`` (after its box is taken)."""
    s = text.strip()
    boxed = extract_boxed(s)
    if boxed is not None:
        s = boxed
    if len(s) > MAX_ANSWER_CHARS:
        return ""
    s = latex_to_plain(s)
    if "\\" in s:
        s = _MATH_DELIMITER_RE.sub(" ", s)
    s = s.replace("$", " ")  # math delimiters and dollar signs
    s = s.strip().strip("*`\"").strip()
    return _unwrap(strip_trailing(s))


def parse_number(text: str) -> Optional[Number]:
    """The value of an answer that is exactly one number, with only a lead (``x =``), a sign,
    currency, percent, a scale word and units around it (see ``numbers``)."""
    return read_number(clean_answer(text))


def to_number(text: str) -> Optional[Fraction]:
    """The value of a one-number answer with the percent applied (50% -> 1/2), or None."""
    n = parse_number(text)
    return None if n is None else n.scaled


_DIGIT_RE = re.compile(r"\d")
_SPACE_RE = re.compile(r"\s+")


def numbers_in(text: str) -> Iterator[re.Match]:
    """The matches of ``NUMBER_RE`` in ``text``, as ``finditer`` finds them, but fast on long text.

    ``finditer`` tries the pattern at every position (~0.5 s per MB of text without digits).
    Every number starts at a digit, or one or two characters before it (``-5``, ``.5``, ``-.5``),
    so the search jumps from digit to digit and tries the pattern only there.
    """
    pos = 0
    while True:
        digit = _DIGIT_RE.search(text, pos)
        if digit is None:
            return
        start = digit.start()
        if start > pos and text[start - 1] == ".":
            start -= 1
        if start > pos and text[start - 1] in "+-":
            start -= 1
        m = NUMBER_RE.match(text, start)
        if m is None:  # cannot happen (a digit is a number), but never loop forever
            pos = digit.end()
            continue
        yield m
        pos = m.end()


def last_number(text: str) -> Optional[str]:
    """The last number in ``text`` (the lenient reading of an answer), or None. Only the last
    ``LAST_NUMBER_WINDOW`` characters are read, from the first whitespace in them (so the cut
    does not split a number)."""
    if len(text) > LAST_NUMBER_WINDOW:
        tail = text[-LAST_NUMBER_WINDOW:]
        space = _SPACE_RE.search(tail)
        text = tail[space.end() :] if space else tail
    found = None
    for found in numbers_in(latex_to_plain(text)):
        pass
    return found.group(0) if found else None


def numbers_equal(a: Number, b: Number) -> bool:
    """Equal values; a percent sign on one side only may be read either way (50% = 0.5 = 50)."""
    if a.scaled == b.scaled:
        return True
    return a.percent != b.percent and a.value == b.value


def _text_key(s: str) -> str:
    return "".join(clean_answer(s).lower().split())


def answers_match(predicted: Optional[str], reference: object, math_verify: bool = True) -> bool:
    """Whether ``predicted`` equals ``reference``: by value when both are one number, else as text
    or, with ``math_verify``, symbolically: rational expressions exactly (``rational``), anything
    else by math-verify when it is installed."""
    if predicted is None or reference is None:
        return False
    ref = str(reference)
    cleaned = clean_answer(predicted)
    if not cleaned:
        return False  # an empty answer matches nothing, not even an empty reference
    p, r = parse_number(predicted), parse_number(ref)
    if r is not None:
        # A numeric reference wants a number: exact, no symbolic engine. An unevaluated
        # expression ("3 + 4" for 7) is not a final answer, or copying the question would pay.
        return p is not None and numbers_equal(p, r)
    if _text_key(predicted) == _text_key(ref):
        return True
    if not math_verify:
        return False
    if len(predicted) <= MAX_RATIONAL_CHARS and len(ref) <= MAX_RATIONAL_CHARS:
        same = rational_equal(cleaned, clean_answer(ref))
        if same is not None:
            return same
    if all(safe_for_math_verify(s) and _mathy(s) for s in (predicted, ref)):
        checker = math_verify_checker()
        if checker is not None:
            return checker(predicted, ref)
    return False


def _mathy(s: str) -> bool:
    # Only answers with a digit or a LaTeX command go to math-verify: it reads plain words as
    # products of symbols ("Pairs" would equal "Paris").
    return any(ch.isdigit() for ch in s) or "\\" in s


def safe_for_math_verify(text: str) -> bool:
    """Whether ``text`` is short and tame enough for math-verify to parse in milliseconds: at most
    ``MAX_MATH_VERIFY_CHARS`` characters, ``MAX_MATH_VERIFY_TOKENS`` tokens and
    ``MAX_MATH_VERIFY_DEPTH`` nested brackets, no
    factorial, no exponent that holds another exponent (sympy would compute ``9^{9^{9}}``), no
    exponent larger than ``MAX_MATH_VERIFY_EXPONENT`` (``MAX_MATH_VERIFY_NUMBER_EXPONENT`` on a
    plain number), no binomial or Gamma beside a number of more than
    ``MAX_MATH_VERIFY_COMBINATORIAL_DIGITS`` digits. What its parse expands to is bounded after
    parsing (``math_verify_checker``)."""
    if len(text) > MAX_MATH_VERIFY_CHARS or "!" in text or token_count(text) > MAX_MATH_VERIFY_TOKENS:
        return False
    depth = 0
    for ch in text:  # at most 150 characters
        depth += (ch in "({[") - (ch in ")}]")
        if depth > MAX_MATH_VERIFY_DEPTH:
            return False
    if _COMBINATORIAL_RE.search(text) and _LONG_INTEGER_RE.search(text):
        return False
    for m in _EXPONENT_RE.finditer(text):
        if m.group(1) is None:
            exponent = text[m.end() : m.end() + 1]  # x^2: one character
        else:
            close = matching_close(text, m.start(1))
            exponent = text[m.end() : close if close >= 0 else len(text)]
        if "^" in exponent:
            return False
        number_base = _NUMBER_BASE_RE.search(text[: m.start()].rstrip()) is not None
        limit = MAX_MATH_VERIFY_NUMBER_EXPONENT if number_base else MAX_MATH_VERIFY_EXPONENT
        if exponent_size(exponent, limit) > limit:
            return False
    return True


def exponent_size(exponent: str, limit: int) -> int:
    """The product of the numbers in ``exponent`` (each rounded up, at least 1): at least its value
    for any sum, product or quotient of them (``2*3`` counts 6, ``1/2`` 2, ``0.5`` 1); stops
    counting past ``limit``."""
    size = 1
    for m in _LITERAL_RE.finditer(exponent):
        size *= max(1, math.ceil(float(m.group())))
        if size > limit:
            break
    return size


def expansion_terms(expr: Any, limit: int = MAX_MATH_VERIFY_TERMS) -> int:
    """An estimate of the terms sympy's ``expr`` has once expanded, past which it stops counting
    (any count over ``limit`` is ``limit + 1``): an atom 1, a sum the sum of its parts, a product
    their product, a power by an integer n of a k-term base the C(n+k-1, k-1) terms of the
    multinomial (a root ``b^{p/q}`` as the power p), anything else the sum of its arguments. An
    unevaluated sum, product, integral, limit or derivative counts ``limit + 1``: math-verify
    would evaluate it (``\\sum_{k=1}^{999} k^k``: its whole timeout), and a final answer is a value,
    not an operation left to do."""
    over = limit + 1
    if isinstance(expr, _undone_operations()):
        return over
    args = getattr(expr, "args", ())
    if not args:
        return 1
    if getattr(expr, "is_Pow", False):
        base, exp = args
        if getattr(base, "is_Number", False):
            return min(over, expansion_terms(exp, limit))
        k = expansion_terms(base, limit)
        if getattr(exp, "is_Rational", False):
            n = abs(int(exp.p))
        elif getattr(exp, "is_Float", False):
            n = math.ceil(abs(float(exp)))
        elif getattr(exp, "is_number", False):  # an unevaluated 2*3: bounded in the text already
            n = MAX_MATH_VERIFY_EXPONENT
        else:  # x^{n}: nothing to expand
            return min(over, k * expansion_terms(exp, limit))
        return over if k > limit or n > MAX_MATH_VERIFY_EXPONENT else min(over, math.comb(n + k - 1, k - 1))
    counts = [expansion_terms(a, limit) for a in args]
    if getattr(expr, "is_Mul", False):
        total = 1
        for c in counts:
            total = min(over, total * c)
        return total
    return min(over, max(1, sum(counts)))


@functools.lru_cache(maxsize=1)
def _undone_operations() -> tuple:
    """sympy's unevaluated operations (a class no object is an instance of without sympy)."""
    try:
        from sympy import Derivative, Integral, Limit, Product, Sum
    except ImportError:
        return ()
    return (Sum, Product, Integral, Limit, Derivative)


# Answer shapes the parser sees first (see math_verify_checker): fractions, roots, polynomials,
# binomials, pi, tuples, intervals, sets, equations, functions, powers, complex numbers.
_WARM_UP = (
    r"\frac{3}{4}", r"\frac{\sqrt{3}}{2}", r"2\sqrt{5}", r"x^2+3x-4", r"(x+2)(x-3)", r"\binom{7}{3}",
    r"\frac{n(n+1)}{2}", r"3\pi", r"\frac{\pi}{6}", r"\left(2, \frac{1}{3}\right)", r"[1, 5)",
    r"(-\infty, 2] \cup [3, \infty)", r"\{1, 2, 3\}", r"x = 5", r"y = 2x + 1", r"\sin x", r"\cos^2\theta",
    r"\log_2 8", r"e^{2}", r"10^{-3}", r"-\frac{7}{2}", r"0.25", r"\begin{pmatrix} 1 \\ 2 \end{pmatrix}",
    r"90^\circ", r"50\%", r"a+b", r"\dfrac{1}{x-1}", r"\tfrac{2}{3}", r"|x|", r"x \le 3", r"2^{10}",
    r"\sqrt[3]{2}", r"1+2i", r"\left(\frac{1}{\pi}, \frac{2}{\pi}\right)", r"\{\sqrt{2}, \sqrt{3}\}",
    r"(0, 1) \cup (2, 3) \cup (4, 5)", r"3\pi x^{2}+2\pi x", r"\frac{\frac{\sqrt{2}}{3}}{5}",
)


def prepare_math_verify(references: Iterable[object], most: int = 100) -> int:
    """Import math-verify and warm its parser on the usual shapes and on up to ``most`` distinct
    references that it would judge (not a number, mathy, within its bounds): the shapes a run's
    answers take are the references' own, and a shape's first parse costs up to ~200 ms. Returns
    how many references it parsed; nothing is imported when none would reach it."""
    todo: Dict[str, None] = {}
    for ref in references:
        text = "" if ref is None else str(ref)
        if text and parse_number(text) is None and _mathy(text) and safe_for_math_verify(text):
            todo[text] = None
            if len(todo) >= most:
                break
    check = math_verify_checker() if todo else None
    if check is None:
        return 0
    with full_verdicts():
        for text in todo:
            check(text, text)
    return len(todo)


@functools.lru_cache(maxsize=1)
def math_verify_checker() -> Optional[Callable[[str, str], bool]]:
    """math-verify's equivalence test (LaTeX parser only), or None when it is not installed.
    Built once per process: the import and a warm-up parse of the usual answer shapes (~1 s).

    Only ``LatexExtractionConfig`` is used: math-verify's plain-expression reader goes through
    sympy's ``parse_expr``, which evaluates Python code.
    """
    try:
        from math_verify import LatexExtractionConfig, parse, verify
    except ImportError:
        return None
    # Its own timeouts are off (the Verifier stops a comparison instead); it warns about that.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    config = [LatexExtractionConfig()]

    def as_latex(s: str) -> str:
        s = s.strip()
        return s if "$" in s or "\\(" in s or "\\[" in s else f"${s}$"

    # Its parser (ANTLR, pure Python) learns each grammar path on first sight: a cold parse of a
    # new shape takes 40-240 ms, a warm one ~5-50 ms. One pass over the usual shapes, once.
    for text in _WARM_UP:
        try:
            parse(as_latex(text), extraction_config=config)
        except Exception:
            pass
    # sympy's and the parser's objects, hundreds of thousands of them, would be traversed by
    # every full garbage collection, wherever it starts: in the verifier's thread, one held the
    # interpreter for 20-40 ms past a reward's wait (measured). Moved out of the collector's sight.
    gc.collect()
    gc.freeze()

    def compare(predicted: str, reference: str) -> bool:
        try:  # math-verify's own timeouts (whole seconds of signal.alarm, main thread only) off
            gold = parse(as_latex(reference), extraction_config=config, parsing_timeout=None)
            pred = parse(as_latex(predicted), extraction_config=config, parsing_timeout=None)
            if not gold or not pred:
                return False
            # What the comparison would expand (parse evaluates nothing of the kind: bounded by
            # safe_for_math_verify): over MAX_MATH_VERIFY_TERMS it is not asked, and not a match.
            if any(expansion_terms(e) > MAX_MATH_VERIFY_TERMS for e in (*gold, *pred) if not isinstance(e, str)):
                return False
            return bool(verify(gold, pred, timeout_seconds=None))
        except Exception:  # a parser failure on model output is a wrong answer, not a crash
            return False

    # Groups repeat answers (a flat group is G copies of one): each pair is judged once.
    verifier = Verifier(compare, MATH_VERIFY_LIMIT_S)

    def check(predicted: str, reference: str) -> bool:
        """Whether they match, as far as decided within ``MATH_VERIFY_WAIT_S`` (inside
        ``full_verdicts``: decided)."""
        return bool(verifier.judge(predicted, reference, _wait.get()))

    return check


# How long answers_match waits for a verdict here (None: until it is decided).
_wait: contextvars.ContextVar = contextvars.ContextVar("math_verify_wait", default=MATH_VERIFY_WAIT_S)


@contextlib.contextmanager
def full_verdicts() -> Iterator[None]:
    """Within it, answers_match waits for every math-verify verdict (up to MATH_VERIFY_LIMIT_S a
    comparison) instead of MATH_VERIFY_WAIT_S: for evaluations, whose figures must not depend on
    what the parser has seen before."""
    token = _wait.set(None)
    try:
        yield
    finally:
        _wait.reset(token)


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
