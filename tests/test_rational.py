"""Exact equality of rational expressions (mlx_grpo/rewards/rational.py), checked against
math-verify's symbolic verdicts, and its bounds."""

from __future__ import annotations

import time

import pytest

from mlx_grpo.rewards import answers
from mlx_grpo.rewards.rational import MAX_BITS, parse_rational, rational_equal

EXPANSION_12 = "24x^{11}+440x^{9}+1584x^{7}+1584x^{5}+440x^{3}+24x"  # (x+1)^12 - (x-1)^12
PAIRS = [  # (answer, reference, equal)
    ("x^2+2x+1", "(x+1)^{2}", True), ("x^2+2x+2", "(x+1)^2", False),
    ("\\binom{n}{2}", "\\frac{n(n-1)}{2}", True), ("\\binom{n}{3}", "\\frac{n(n-1)}{2}", False),
    (EXPANSION_12, "(x+1)^{12}-(x-1)^{12}", True),
    (EXPANSION_12.replace("+24x", "+25x"), "(x+1)^{12}-(x-1)^{12}", False),
    ("\\frac{1}{x+1}", "\\frac{x}{x^2+x}", True), ("\\dfrac{2}{x}", "2x^{-1}", True),
    ("2x", "x+x+1", False), ("x+y", "y+x", True), ("xy", "yx", True), ("x - y", "y - x", False),
    ("a\\cdot b", "ba", True), ("6 \\div 3x", "\\frac{2}{x}", True), ("1/2x", "\\frac{x}{2}", False), ("-x^2", "-(x^2)", True), ("-x^2", "(-x)^2", False),
    ("0.5x", "\\frac{x}{2}", True), ("\\left(x+1\\right)^{3}", "x^3+3x^2+3x+1", True),
    ("(a+b)(a-b)", "a^2-b^2", True), ("(a+b)^{2}", "a^2+b^2", False),
]


@pytest.mark.parametrize("answer,reference,equal", PAIRS)
def test_rational_equality_is_exact(answer, reference, equal):
    assert rational_equal(answer, reference) is equal
    assert rational_equal(reference, answer) is equal


# (not the 12th powers: comparing them is what math-verify's term bound refuses)
@pytest.mark.parametrize("answer,reference,equal", [p for p in PAIRS if "^{12}" not in p[1]])
def test_rational_equality_agrees_with_math_verify(answer, reference, equal):
    """The reference check: math-verify's own verdict on the same pair (its parse and sympy's
    comparison)."""
    math_verify = pytest.importorskip("math_verify", reason="math-verify is not installed (pip install -e '.[math]')")
    cfg = [math_verify.LatexExtractionConfig()]
    gold = math_verify.parse(f"${reference}$", extraction_config=cfg)
    pred = math_verify.parse(f"${answer}$", extraction_config=cfg)
    assert bool(math_verify.verify(gold, pred)) is equal


@pytest.mark.parametrize("text", [
    "\\sqrt{2}", "3\\pi", "e^{x}", "2i", "x = 3", "(1, 2)", "2\\frac{1}{2}", "[0, 1)", "x^{n}", "x^23", "2 3", "1 000",
    "\\sin x", "x^{1.5}", "\\binom{n}{k}", "x^{100}", "", "()", "x+", "$x$",
])
def test_what_is_not_a_rational_expression_is_left_undecided(text):
    assert parse_rational(text) is None
    assert rational_equal(text, "x") is None


def test_the_numbers_evaluation_makes_are_bounded():
    """Powers of powers and long products stop at MAX_BITS (undecided, not computed), in
    milliseconds; nesting past Python's recursion limit is undecided, not a crash."""
    t = time.perf_counter()
    assert rational_equal("((x^{99})^{99})^{99}", "x") is None
    assert rational_equal("(" * 5000 + "x" + ")" * 5000, "x") is None
    assert rational_equal("x" * 900, "x^{900}") is None  # 900 * 31 bits > MAX_BITS
    assert rational_equal("x" * 90, "x^{90}") is True and 90 * 31 < MAX_BITS
    assert rational_equal("x", "x^{100}") is None  # an exponent past MAX_EXPONENT
    assert time.perf_counter() - t < 5  # bounded work, not a timing claim: a power of 10^7 would hang


def test_a_pair_always_gets_the_same_points():
    verdicts = {rational_equal("\\frac{x^2-1}{x-1}", "x+1") for _ in range(20)}
    assert verdicts == {True}  # equal where both are defined; x = 1 is never drawn


def test_answers_match_decides_rational_answers_without_math_verify(monkeypatch):
    """The former false negative (the expansion of (x+1)^12 - (x-1)^12 past math-verify's term
    bound) matches; rational pairs never reach math-verify; ``math_verify=False`` turns symbolic
    comparison off."""
    monkeypatch.setattr(answers, "math_verify_checker", lambda: pytest.fail("math-verify was asked"))
    assert answers.answers_match(EXPANSION_12, "(x+1)^{12}-(x-1)^{12}")
    assert answers.answers_match("\\boxed{\\binom{n}{2}}", "\\frac{n(n-1)}{2}")
    assert not answers.answers_match("x^2+2x+2", "(x+1)^{2}")
    assert not answers.answers_match("x^2+2x+1", "(x+1)^{2}", math_verify=False)


def test_math_verify_judges_each_pair_once(monkeypatch):
    """A group repeats answers: the second comparison of a pair does not parse again."""
    math_verify = pytest.importorskip("math_verify", reason="math-verify is not installed (pip install -e '.[math]')")
    calls = []
    real = math_verify.parse
    monkeypatch.setattr(math_verify, "parse", lambda *a, **k: calls.append(a[0]) or real(*a, **k))
    answers.math_verify_checker.cache_clear()
    try:
        answers.math_verify_checker()  # the warm-up parses its own shapes
        calls.clear()
        for _ in range(4):
            assert answers.answers_match("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}")
        assert len(calls) == 2  # the reference and the answer, once
    finally:
        answers.math_verify_checker.cache_clear()


def test_math_verify_is_prepared_on_the_references_it_would_judge(monkeypatch):
    """Numbers, words and overlong references never reach math-verify: nothing is imported for
    them; LaTeX references are parsed once each (distinct), at most ``most``."""
    built = []
    real = answers.math_verify_checker
    monkeypatch.setattr(answers, "math_verify_checker", lambda: built.append(1) or real())
    assert answers.prepare_math_verify(["7", 3, None, "1/2", "Paris", "x^2+1" * 100]) == 0 and not built
    refs = ["7", "\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt{3}}{2}", "2\\pi", "3\\pi", "4\\pi"]
    expected = 3 if real() is not None else 0  # without math-verify there is nothing to warm
    assert answers.prepare_math_verify(refs, most=3) == expected
