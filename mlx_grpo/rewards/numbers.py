"""Reading one number, and the few words a careful reader lets stand around it, from plain text.

An answer is one number in a short, closed grammar (never "any words around a number": under
reward pressure a model would learn ``not 5``, ``at least 5`` or ``5 thousand`` for 5)::

    [lead] [sign] [currency] NUMBER [percent] [scale] [units]

- lead: ``the answer is``, ``answer:``, ``x =`` (a one-letter name) and the like (``LEAD_WORDS``);
- sign: ``-``/``+`` (also apart from the number, or before a currency: ``- 5``, ``-$5``), ``minus``,
  ``negative``;
- currency: ``€ £ ¥ ₹`` before or after, ``USD``/``EUR``/... before (``$`` is stripped earlier);
- percent: ``%``, ``percent``, ``per cent``; scale: ``hundred``/``thousand``/``million``/... give their
  value (``5 million`` is 5000000);
- units: words of ``UNITS`` (case-insensitive, single letters as written), each with an optional
  power (``cm^2``, ``m^{3}``; ``²``/``³`` were made ``^2``/``^3`` earlier), joined by nothing, ``/`` or
  ``per``, and ``square``/``cubic``/``sq`` before one.

Anything else (``not``, ``less than``, ``about``, ``~``, ``≈``, ``>``, ``5 or more``, ``5 squared``, a
count noun such as ``apples``) makes the text not a number; it is then compared as text.
The reader stops after ``MAX_TOKENS`` tokens, so a long text costs no more than a short one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import List, Optional, Tuple

_NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d{1,3})?|\.\d+"  # exponents up to 999: no huge ints
# One number: a mixed number (1 1/2), a fraction (3/4, -1.5/2) or a plain number; sign included.
NUMBER_PATTERN = (
    rf"(?P<mixed>[-+]?\d+)\s+(?P<mnum>\d+)\s*/\s*(?P<mden>\d+)(?![\d.,/])"
    rf"|(?P<num>[-+]?(?:{_NUM}))\s*/\s*(?P<den>[-+]?(?:{_NUM}))"
    rf"|(?P<plain>[-+]?(?:{_NUM}))"
)
NUMBER_RE = re.compile(NUMBER_PATTERN)
SIMPLE_NUMBER_RE = re.compile(rf"[-+]?(?:{_NUM})")
# Every alternative is a run of one character class or a bounded number: no nested repeats, so
# scanning is linear whatever the text.
_TOKEN_RE = re.compile(
    rf"(?P<number>{NUMBER_PATTERN})|(?P<word>[A-Za-z]+)|(?P<power>\^\{{?\d{{1,3}}\}}?)|(?P<space>\s+)|(?P<symbol>.)",
    re.DOTALL,
)
MAX_TOKENS = 24  # more than this around one number is not an answer of this grammar

LEAD_WORDS = frozenset("the final answer result total value is equals so thus therefore hence".split())
SIGNS = {"-": -1, "+": 1, "minus": -1, "negative": -1, "plus": 1, "positive": 1}
CURRENCY_SYMBOLS = frozenset("€£¥₹")
CURRENCY_CODES = frozenset("usd us eur gbp jpy inr cad aud chf cny rs".split())
SCALES = {"hundred": 100, "thousand": 10**3, "million": 10**6, "billion": 10**9, "trillion": 10**12}
PERCENT_WORDS = frozenset({"percent"})
UNIT_MODIFIERS = frozenset({"square", "cubic", "sq"})
UNITS = frozenset(
    # money
    "dollar dollars cent cents euro euros pound pounds yen rupee rupees usd eur gbp "
    # length, area
    "mm cm m km in inch inches ft foot feet yd yard yards mi mile miles meter meters metre metres "
    "millimeter millimeters centimeter centimeters kilometer kilometers acre acres hectare hectares "
    # mass
    "mg g kg gram grams kilogram kilograms lb lbs oz ounce ounces ton tons tonne tonnes "
    # volume
    "ml l L liter liters litre litres gallon gallons gal cup cups pint pints quart quarts cc "
    # time
    "s sec secs second seconds min mins minute minutes h hr hrs hour hours day days week weeks "
    "month months year years yr yrs "
    # speed, angle, temperature, other
    "mph kph kmh degree degrees deg rad radians celsius fahrenheit kelvin unit units".split()
)


@dataclass(frozen=True)
class Number:
    """A parsed number: its exact value (the percent sign not applied) and whether it had one."""

    value: Fraction
    percent: bool = False

    @property
    def scaled(self) -> Fraction:
        return self.value / 100 if self.percent else self.value


@dataclass(frozen=True)
class _Token:
    kind: str
    text: str
    match: re.Match

    @property
    def word(self) -> str:
        """A word lowercased, or "" for other tokens."""
        return self.text.lower() if self.kind == "word" else ""


def _tokens(text: str) -> Optional[List[_Token]]:
    """The non-space tokens of ``text``, or None when there are more than ``MAX_TOKENS``."""
    out: List[_Token] = []
    for m in _TOKEN_RE.finditer(text):
        if m.lastgroup == "space":
            continue
        if len(out) == MAX_TOKENS:
            return None
        out.append(_Token(m.lastgroup or "symbol", m.group(), m))
    return out


def _lead_and_sign(tokens: List[_Token]) -> Optional[Tuple[int, bool]]:
    """(sign, whether one was written) for the tokens before the number, or None when they are
    not a lead, a sign and a currency."""
    i, n = 0, len(tokens)
    while i < n:
        t = tokens[i]
        if t.word in LEAD_WORDS or t.text in (":", "="):
            i += 1
        elif t.kind == "word" and len(t.text) == 1 and i + 1 < n and tokens[i + 1].text == "=":
            i += 2  # x = 5
        else:
            break
    sign: Optional[int] = None
    currency = False
    for t in tokens[i:]:
        key = t.word or t.text
        if key in SIGNS and sign is None:
            sign = SIGNS[key]
        elif (t.text in CURRENCY_SYMBOLS or t.word in CURRENCY_CODES) and not currency:
            currency = True
        else:
            return None
    return (1, False) if sign is None else (sign, True)


def _is_unit(t: _Token) -> bool:
    # Single letters as written: "M" is not metres (it reads as million), "m" is.
    return t.kind == "word" and (t.text in UNITS if len(t.text) == 1 else t.word in UNITS)


def _percent_and_scale(tokens: List[_Token]) -> Optional[Tuple[bool, int]]:
    """(percent sign given, scale factor) for what follows the number, or None when it is not a
    percent, a scale word, a currency and units."""
    i, n = 0, len(tokens)
    percent, scale = False, 1
    if i < n and (tokens[i].text == "%" or tokens[i].word in PERCENT_WORDS):
        percent, i = True, i + 1
    elif i + 1 < n and tokens[i].word == "per" and tokens[i + 1].word == "cent":
        percent, i = True, i + 2
    if not percent and i < n and tokens[i].word.rstrip("s") in SCALES:
        scale, i = SCALES[tokens[i].word.rstrip("s")], i + 1
    if i < n and tokens[i].text in CURRENCY_SYMBOLS:
        i += 1
    need_unit, after_unit = False, False  # after "/", "per" or "square" a unit must follow
    while i < n:
        t = tokens[i]
        if _is_unit(t):
            i += 2 if i + 1 < n and tokens[i + 1].kind == "power" else 1
            need_unit, after_unit = False, True
        elif after_unit and (t.text == "/" or t.word == "per"):
            need_unit, after_unit = True, False
            i += 1
        elif t.word in UNIT_MODIFIERS and not need_unit:
            need_unit, after_unit = True, False
            i += 1
        else:
            return None
    return None if need_unit else (percent, scale)


def _value(m: re.Match) -> Fraction:
    """The exact value of a NUMBER_PATTERN match (raises ValueError/ZeroDivisionError)."""
    if m.group("mixed") is not None:
        whole = Fraction(m.group("mixed"))
        part = Fraction(int(m.group("mnum")), int(m.group("mden")))
        return whole - part if m.group("mixed").startswith("-") else whole + part
    if m.group("num") is not None:
        return _fraction(m.group("num")) / _fraction(m.group("den"))
    return _fraction(m.group("plain"))


def _fraction(token: str) -> Fraction:
    return Fraction(token.replace(",", ""))


def read_number(text: str) -> Optional[Number]:
    """The value of plain ``text`` that is exactly one number in the grammar above, or None."""
    tokens = _tokens(text)
    if tokens is None:
        return None
    at = [i for i, t in enumerate(tokens) if t.kind == "number"]
    if len(at) != 1:
        return None
    k = at[0]
    number = tokens[k]
    lead = _lead_and_sign(tokens[:k])
    after = _percent_and_scale(tokens[k + 1 :])
    if lead is None or after is None:
        return None
    sign, signed = lead
    if signed and number.text[0] in "+-":
        return None  # two signs: "- -5", "minus +5"
    try:
        value = _value(number.match)
    except (ValueError, ZeroDivisionError):
        return None
    percent, scale = after
    return Number(sign * value * scale, percent)
