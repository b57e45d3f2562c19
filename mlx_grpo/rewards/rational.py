"""Exact equality of rational expressions (polynomials and fractions of them), without sympy.

``x^2+2x+1`` and ``(x+1)^{2}``, ``\\binom{n}{2}`` and ``\\frac{n(n-1)}{2}``: answers written with
integers, decimals, one-letter variables, ``+ - * /``, ``\\cdot``, ``\\times``, ``\\div``,
``\\frac``, ``\\binom{e}{k}`` (an integer k), brackets and integer powers are read by a small
recursive-descent parser and compared by evaluating both sides exactly (``fractions.Fraction``) at
random integer points. Two different rational functions of degree d agree at a random point with
probability at most d / 2**31 (Schwartz-Zippel), so three points decide.

Why not math-verify: its LaTeX parser (ANTLR in pure Python) takes 50-250 ms on a sum of a few
monomials (``24x^{11}+440x^{9}+...``), and sympy's comparison expands powers. This reads and
decides such an answer in well under a millisecond; anything outside the subset (roots, pi, e, i,
functions, sets, equations, other commands) is None: not decided here.

Every step is linear in the text, and the numbers evaluation makes are bounded in bits
(``MAX_BITS``): ``((x^{12})^{12})^{12}`` is not evaluated.
"""

from __future__ import annotations

import operator
import random
import re
import zlib
from fractions import Fraction
from typing import Callable, Dict, List, Optional, Tuple

__all__ = ["MAX_BITS", "POINTS", "rational_equal", "token_count"]

POINTS = 3
MAX_BITS = 20_000  # of any number made while evaluating (x^{99} at a 31-bit point: 3,069)
MAX_EXPONENT = 99
_POINT_BITS = 31
# Letters read as variables: not e (Euler's number) or i (the imaginary unit) as math-verify reads them.
_VARIABLES = set("abcdfghjklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_TOKEN_RE = re.compile(r"\s+|\d+(?:\.\d+)?|\.\d+|\\[A-Za-z]+|\\[,;:! ]|.", re.S)
_SKIPPED = {"\\left", "\\right", "\\,", "\\;", "\\:", "\\!", "\\ "}
_OPERATORS = {"\\cdot": "*", "\\times": "*", "\\div": "/", "\\dfrac": "\\frac", "\\tfrac": "\\frac",
              "\\dbinom": "\\binom", "\\tbinom": "\\binom"}

# ("num", Fraction) | ("var", name) | ("neg", node) | ("^", node, n) | ("binom", node, k)
# | ("sum", [("+" or "-", node), ...]) | ("product", [("*" or "/", node), ...])
Node = Tuple


class _NotRational(Exception):
    pass


class _TooBig(Exception):
    pass


def _tokens(text: str) -> Optional[List[str]]:
    out: List[str] = []
    for tok in _TOKEN_RE.findall(text):
        if tok.isspace() or tok in _SKIPPED:
            continue
        tok = _OPERATORS.get(tok, tok)
        if tok[0] == "\\" and tok not in ("\\frac", "\\binom"):
            return None  # \sqrt, \pi, \sin, ...: not a rational expression
        if out and _is_number(tok) and _is_number(out[-1]):
            return None  # "1 000", "2 3": a spaced number or a product? Not decided here
        out.append(tok)
    return out


def token_count(text: str) -> int:
    """The tokens of ``text`` as this module reads them: numbers, commands, single characters;
    spaces not counted (one regex pass)."""
    return sum(1 for tok in _TOKEN_RE.findall(text) if not tok.isspace())


def _is_number(tok: str) -> bool:
    return tok[0].isdigit() or tok[0] == "."


class _Parser:
    """expr := term (('+'|'-') term)*; term := juxtaposed (('*'|'/') juxtaposed)*; juxtaposed :=
    unary power*; unary := ('-'|'+') unary | power; power := atom ('^' exponent)?; atom := number | variable | '(' expr ')' | '{' expr '}'
    | \\frac{expr}{expr} | \\binom{expr}{integer}."""

    def __init__(self, tokens: List[str]):
        self.t, self.i = tokens, 0

    def peek(self) -> Optional[str]:
        return self.t[self.i] if self.i < len(self.t) else None

    def take(self, want: Optional[str] = None) -> str:
        tok = self.peek()
        if tok is None or (want is not None and tok != want):
            raise _NotRational
        self.i += 1
        return tok

    def whole(self) -> Node:
        node = self.expr()
        if self.peek() is not None:
            raise _NotRational
        return node

    # Chains are flat (a sum of n terms is one node of n parts), so the tree is only as deep as
    # the brackets and evaluating a long sum does not recurse once a term.
    def expr(self) -> Node:
        parts = [("+", self.term())]
        while self.peek() in ("+", "-"):
            op = self.take()
            parts.append((op, self.term()))
        return parts[0][1] if len(parts) == 1 else ("sum", parts)

    def term(self) -> Node:
        parts = [("*", self.juxtaposed())]
        while self.peek() in ("*", "/"):
            op = self.take()
            parts.append((op, self.juxtaposed()))
        return parts[0][1] if len(parts) == 1 else ("product", parts)

    def juxtaposed(self) -> Node:
        """An implicit product (2x, x(x+1)); it binds tighter than * and /, as math-verify reads
        it (1/2x is 1/(2x))."""
        parts = [("*", self.unary())]
        while True:
            tok = self.peek()
            if tok is None or not (_is_number(tok) or tok in _VARIABLES or tok in ("(", "{", "\\frac", "\\binom")):
                return parts[0][1] if len(parts) == 1 else ("product", parts)
            if tok == "\\frac" and parts[-1][1][0] == "num":
                raise _NotRational  # 2\frac{1}{2}: math-verify reads a mixed number (5/2)
            parts.append(("*", self.power()))

    def unary(self) -> Node:
        if self.peek() in ("-", "+"):
            op = self.take()
            inner = self.unary()
            return ("neg", inner) if op == "-" else inner
        return self.power()

    def power(self) -> Node:
        base = self.atom()
        if self.peek() != "^":
            return base
        self.take()
        if self.peek() == "{":
            self.take()
            sign = -1 if self.peek() == "-" else 1
            if sign < 0:
                self.take()
            n = self.take()
            self.take("}")
        else:
            n = self.take()
            if len(n) != 1:
                raise _NotRational  # x^23 is x^2 times 3 in LaTeX: left to math-verify
            sign = 1
        if not n.isdigit() or int(n) > MAX_EXPONENT:
            raise _NotRational
        return ("^", base, sign * int(n))

    def atom(self) -> Node:
        tok = self.take()
        if _is_number(tok):
            return ("num", Fraction(tok))
        if tok in _VARIABLES:
            return ("var", tok)
        if tok in ("(", "{"):
            node = self.expr()
            self.take(")" if tok == "(" else "}")
            return node
        if tok == "\\frac":
            return ("product", [("*", self.group()), ("/", self.group())])
        if tok == "\\binom":
            top = self.group()
            k = self.group()
            if k[0] != "num" or k[1].denominator != 1 or not 0 <= k[1] <= MAX_EXPONENT:
                raise _NotRational
            return ("binom", top, int(k[1]))
        raise _NotRational

    def group(self) -> Node:
        self.take("{")
        node = self.expr()
        self.take("}")
        return node


def parse_rational(text: str) -> Optional[Node]:
    """The expression tree of ``text`` when it is a rational expression (see the module), else None."""
    tokens = _tokens(text)
    if not tokens:
        return None
    try:
        return _Parser(tokens).whole()
    except (_NotRational, RecursionError):
        return None


def _bits(x: Fraction) -> int:
    return x.numerator.bit_length() + x.denominator.bit_length()


def evaluate(node: Node, point: Dict[str, Fraction]) -> Fraction:
    """``node`` at ``point``, exactly; ZeroDivisionError where a denominator vanishes, _TooBig
    past ``MAX_BITS``."""
    kind = node[0]
    if kind == "num":
        return node[1]
    if kind == "var":
        return point[node[1]]
    if kind == "neg":
        return -evaluate(node[1], point)
    if kind == "^":
        base = evaluate(node[1], point)
        if _bits(base) * abs(node[2]) > MAX_BITS:
            raise _TooBig
        return base ** node[2]
    if kind == "binom":
        top, k = evaluate(node[1], point), node[2]
        if _bits(top) * max(1, k) > MAX_BITS:
            raise _TooBig
        out = Fraction(1)
        for j in range(k):
            out = out * (top - j) / (j + 1)
        return out
    out = Fraction(0) if kind == "sum" else Fraction(1)
    for op, child in node[1]:
        out = _ARITH[op](out, evaluate(child, point))
        if _bits(out) > MAX_BITS:
            raise _TooBig
    return out


_ARITH: Dict[str, Callable[[Fraction, Fraction], Fraction]] = {
    "+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv,
}


def _children(node: Node) -> List[Node]:
    if node[0] in ("sum", "product"):
        return [child for _, child in node[1]]
    return [node[1]] if node[0] in ("neg", "^", "binom") else []


def _variables(node: Node, into: set) -> set:
    if node[0] == "var":
        into.add(node[1])
    for child in _children(node):
        _variables(child, into)
    return into


def rational_equal(a: str, b: str) -> Optional[bool]:
    """Whether the answers ``a`` and ``b`` are the same rational expression, decided exactly at
    ``POINTS`` random integer points (drawn from the two texts, so a pair always gets the same
    points); None when either is not a rational expression (see the module), its numbers would
    pass ``MAX_BITS``, or no point avoids a zero denominator."""
    ta, tb = parse_rational(a), parse_rational(b)
    if ta is None or tb is None:
        return None
    names = sorted(_variables(ta, set()) | _variables(tb, set()))
    rng = random.Random(zlib.crc32(f"{a}\0{b}".encode("utf-8", "surrogatepass")))
    agreed = tries = 0
    needed = POINTS if names else 1
    while agreed < needed and tries < 4 * POINTS:
        tries += 1
        point = {v: Fraction(rng.randrange(2, 2**_POINT_BITS)) for v in names}
        try:
            va, vb = evaluate(ta, point), evaluate(tb, point)
        except ZeroDivisionError:
            continue  # a denominator vanished here: draw another point
        except (_TooBig, RecursionError):
            return None
        if va != vb:
            return False
        agreed += 1
    return True if agreed == needed else None
