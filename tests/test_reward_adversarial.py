"""Every built-in reward is linear in the completion, on every degenerate shape a
model may generate, and the parsers that replaced the backtracking regexes agree with them.

Time is never asserted in seconds: each reward runs on a completion of n and of 8n characters of
the same shape, and the ratio must stay far from 64 (quadratic). Before the string parsers,
``soft_format`` on repeated ``<think></think><answer>`` and ``accuracy`` on ``5`` + spaces +
``x`` grew by 100x-500x between these sizes.
"""

import random
import re
import time

import pytest

from mlx_grpo.rewards import BUILTIN
from mlx_grpo.rewards.adversarial import SHAPES, seconds
from mlx_grpo.rewards.answers import (LAST_NUMBER_WINDOW, MAX_ANSWER_CHARS, answers_match, extract_answer,
                                      last_number, matching_close, numbers_in, strip_trailing)
from mlx_grpo.rewards.format import has_soft_format, is_strict_format
from mlx_grpo.rewards.numbers import NUMBER_RE

N = 2048  # and 8N: big enough that a reward's fixed cost does not hide its growth
LINEAR_RATIO_LIMIT = 24.0  # linear ~8, n log n ~10, quadratic ~64


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_reward_is_linear_on_every_degenerate_shape(shape):
    small, large = SHAPES[shape](N), SHAPES[shape](8 * N)
    assert len(large) > 6 * len(small)
    slow = {}
    for name, fn in BUILTIN.items():
        # The fastest of 5 runs: a loaded machine only ever adds time, so the minimum is the cost.
        t_small, t_large = seconds(fn, small, repeats=5), seconds(fn, large, repeats=5)
        # A floor of 20 us on the small run: a reward that returns in a few microseconds whatever
        # the size would otherwise give ratios made of timer noise.
        ratio = t_large / max(t_small, 20e-6)
        if ratio > LINEAR_RATIO_LIMIT:
            slow[name] = round(ratio, 1)
    assert not slow, f"{shape}: time grows faster than linear from {N} to {8 * N} chars: {slow}"


# ---------------------------------------------------------------- the parsers against the regexes they replaced

OLD_ANSWER_RE = re.compile(r"<answer>((?:(?!<answer>).)*?)</answer>", re.DOTALL)
_NO_TAG = r"(?:(?!</?think>|</?answer>).)*"
OLD_STRICT_RE = re.compile(rf"^\s*<think>{_NO_TAG}</think>\s*<answer>(?P<answer>{_NO_TAG})</answer>\s*$", re.DOTALL)
OLD_SOFT_RE = re.compile(r"<think>.*?</think>.*?<answer>.*?</answer>", re.DOTALL)
PIECES = ["<think>", "</think>", "<answer>", "</answer>", " ", "\n", "5", "x", "<", "/", "answer>"]


def random_texts(count, seed):
    rng = random.Random(seed)
    return ["".join(rng.choice(PIECES) for _ in range(rng.randint(0, 12))) for _ in range(count)]


def test_tag_parsers_agree_with_the_regexes_on_random_tag_soup():
    for text in random_texts(5000, seed=0):
        found = OLD_ANSWER_RE.findall(text)
        assert extract_answer(text) == (found[-1].strip() if found else None), text
        strict = OLD_STRICT_RE.match(text)
        assert is_strict_format(text) == (strict is not None and bool(strict.group("answer").strip())), text
        assert has_soft_format(text) == bool(OLD_SOFT_RE.search(text)), text


def test_numbers_in_finds_what_finditer_finds():
    rng = random.Random(1)
    alphabet = "0123456789 -+./,eE%x\n½"
    for _ in range(5000):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 25)))
        assert [m.span() for m in numbers_in(text)] == [m.span() for m in NUMBER_RE.finditer(text)], text


def test_matching_close_agrees_with_a_python_depth_count():
    def reference(text, start):
        depth = 0
        for j in range(start, len(text)):
            depth += (text[j] == text[start]) - (text[j] == {"(": ")", "[": "]", "{": "}"}[text[start]])
            if depth == 0:
                return j
        return -1

    rng = random.Random(2)
    for _ in range(3000):
        text = "".join(rng.choice("{}()[]a½é𝛼 ") for _ in range(rng.randint(1, 30)))  # multi-byte too
        for start, ch in enumerate(text):
            if ch in "{([":
                assert matching_close(text, start) == reference(text, start), (text, start)


def test_strip_trailing_knows_every_whitespace_character():
    every_space = "".join(ch for ch in map(chr, range(0x110000)) if ch.isspace())
    assert strip_trailing("5" + every_space + ". ! ,") == "5"
    assert strip_trailing("5" + every_space, punctuation="") == "5"
    assert strip_trailing("3!", punctuation=".,") == "3!"


# ---------------------------------------------------------------- the caps that keep one completion cheap


def test_long_answers_are_judged_only_through_their_box():
    reasoning = "step " * (MAX_ANSWER_CHARS // 5 + 10)
    assert answers_match(reasoning + "\\boxed{19}", "19")  # the box is read whatever the length
    assert not answers_match("19" + " " * MAX_ANSWER_CHARS + "cm", "19")  # no final answer is this long
    assert answers_match("19" + " " * 100 + "cm", "19")


def test_lenient_reads_the_last_number_in_the_final_window():
    assert last_number("7 " + "x " * LAST_NUMBER_WINDOW + "then 19") == "19"
    assert last_number("123456 " + "x" * (LAST_NUMBER_WINDOW - 3)) is None  # the number is before the window
    # The window starts after its first whitespace, so a number it cuts into is not read in part.
    assert last_number("12345 " + "y" * (LAST_NUMBER_WINDOW - 3)) is None


def test_math_verify_gets_no_long_or_explosive_input(monkeypatch):
    from mlx_grpo.rewards import answers

    calls = []
    monkeypatch.setattr(answers, "math_verify_checker", lambda: (lambda p, r: calls.append(p) or True))
    assert answers.answers_match("\\sqrt{2}", "\\sqrt{2}/1")
    long = "\\sqrt{2}" + " + 0" * answers.MAX_MATH_VERIFY_CHARS
    assert not answers.answers_match(long, "\\sqrt{2}/1")
    assert not answers.answers_match("9^{9^{9}}", "\\sqrt{2}/1")
    assert calls == ["\\sqrt{2}"]


@pytest.mark.parametrize("text,safe", [
    ("\\frac{\\sqrt{2}}{2}", True), ("x^2 + 1", True), ("2^{100}", True), ("e^{\\pi i}", True),
    ("\\begin{pmatrix}1&2\\\\3&4\\end{pmatrix}", True), ("(" * 8 + "1" + ")" * 8, True),
    ("9^{9^{9}}", False), ("x^{x^{x}}", False), ("2^{10000}", False), ("10!!", False), ("(10^{10})!", False),
    ("(" * 9 + "1" + ")" * 9, False), ("1+" * 80 + "1", False), ("2^{1+x^{2}", False),
    # powers: an exponent's size is the product of its numbers; at most 12 but on a plain number
    ("(x+1)^{12}-(x-1)^{12}", True), ("x^{2.5}", True), ("x^{1/2}", True), ("10^{-3}", True), ("1.5^{999}", True),
    ("(x+1)^{999}-(x-1)^{999}", False), ("(x+1)^{13}", False), ("\\sin(x)^{99}+\\cos(x)^{99}", False),
    ("e^{999}", False), ("x^{999*999}", False), ("x^{3*5}", False), ("2^{999*999*999}", False),
    ("x2^{999}", False), ("a_2^{999}", False), ("{2}^{999}", False), ("\\sqrt{2}^{99}", False),
    # binomials and Gamma are computed at parsing: their numbers are bounded
    ("\\binom{n}{2}", True), ("\\binom{9999}{4999}", True), ("\\binom{999999}{499999}", False),
    ("\\Gamma(99999)", False), ("{99999 \\choose 3}", False), ("99999x + \\sqrt{2}", True),
    # at most MAX_MATH_VERIFY_TOKENS (32) tokens: its parse costs about a millisecond a token
    ("(0, 1) \\cup (3, 4) \\cup (6, 7) \\cup (9, 10) \\cup (12, 13)", True),
    ("(0, 1) \\cup (3, 4) \\cup (6, 7) \\cup (9, 10) \\cup (12, 13) \\cup (15, 16)", False),
    ("\\{" + ", ".join("\\sqrt{%d}" % k for k in range(2, 8)) + "\\}", False),
])
def test_what_math_verify_may_judge(text, safe):
    from mlx_grpo.rewards.answers import safe_for_math_verify

    assert safe_for_math_verify(text) is safe


def test_what_math_verify_would_expand_is_bounded_after_parsing():
    """On math-verify's parse, before it compares: an estimate of the terms the answer expands to
    (a sum adds, a product multiplies, a power of a k-term base by n counts C(n+k-1, k-1)); an
    unevaluated sum, product, integral, limit or derivative is never compared."""
    sympy = pytest.importorskip("sympy", reason="sympy comes with math-verify, which is not installed")
    from mlx_grpo.rewards.answers import MAX_MATH_VERIFY_TERMS, expansion_terms

    x, y, z, k = sympy.symbols("x y z k")
    over = MAX_MATH_VERIFY_TERMS + 1
    cases = [
        (x**2 + 2 * x + 1, 3), ((x + 1) ** 6 - (x - 1) ** 6, 14), ((x + y + z + 1) ** 2, 10),
        ((x + 1) ** 8 - (x - 1) ** 8, over), ((x + y + z + 1) ** 3, over),  # 18 and 20 terms
        (sympy.sqrt(x + y + z + 1), 4), ((x + 1) / (x - 1), 4), (sympy.Integer(2) ** 100, 1),
        (sympy.sin(x) ** 12 + sympy.cos(x) ** 12, 2), (x ** k, 1),
        ((x + 1) ** 999 - (x - 1) ** 999, over), ((x + y + z + 1) ** 12, over),
        (sympy.Mul(*[x + y + z + 1] * 15, evaluate=False), over),
        (sympy.Sum(k ** k, (k, 1, 999)), over), (sympy.Integral(x ** 9, (x, 0, 1)), over),
        (sympy.Product(x + k, (k, 1, 999)), over), (sympy.Limit(sympy.sin(x) / x, x, 0), over),
        (sympy.Derivative(x ** 2, x), over),
    ]
    for expr, terms in cases:
        assert expansion_terms(expr) == terms, expr


def test_math_verify_never_compares_what_would_expand_past_the_bound(monkeypatch):
    """Answers that pass the text checks but expand past MAX_MATH_VERIFY_TERMS once parsed (a
    power of a 4-term sum, 5 factors side by side, an unevaluated sum or integral) are no match, and math-verify's
    comparison is not asked; within the bound it is."""
    math_verify = pytest.importorskip("math_verify", reason="math-verify is not installed (pip install -e '.[math]')")
    from mlx_grpo.rewards import answers

    asked = []
    real = math_verify.verify
    monkeypatch.setattr(math_verify, "verify", lambda *a, **k: asked.append(a) or real(*a, **k))
    answers.math_verify_checker.cache_clear()  # rebuilt with the spy, and again afterwards
    try:
        # (\\pi: not a rational expression, which rational.py would decide without math-verify)
        for answer in ("\\pi(x+y+z+1)^{3}", "\\pi(x+1)(x+2)(x+3)(x+4)(x+5)", "\\sum_{k=1}^{9} k^{k}",
                       "\\int_{0}^{1} x^{9} dx"):
            assert answers.safe_for_math_verify(answer)
            assert not answers.answers_match(answer, "2x + 1")
        assert asked == []
        assert answers.answers_match("\\pi x^2+2\\pi x+\\pi", "\\pi(x+1)^{2}") and len(asked) == 1
    finally:
        answers.math_verify_checker.cache_clear()


def _spin_or_compare(a: str, b: str) -> bool:
    """A comparison that never ends on "spin" (and swallows every Exception, as math-verify and
    sympy do), sleeps 0.3 s on "slow", and is equality otherwise."""
    if a == "spin":
        while True:
            try:
                sum(range(10_000))
            except Exception:
                pass
    if a == "slow":
        time.sleep(0.3)
    return a == b.replace("slow-ref", "slow")


def test_a_verdict_not_ready_in_time_is_none_and_is_kept_when_it_arrives():
    """The caller waits at most ``wait``; the comparison goes on in the background, once, and its
    verdict serves the pair's next sight without comparing again."""
    from mlx_grpo.rewards.verdicts import Verifier

    calls = []
    v = Verifier(lambda a, b: calls.append(a) or _spin_or_compare(a, b), limit=5.0)
    assert v.judge("slow", "slow-ref", wait=0.0) is None  # not decided: nobody could have yet
    assert v.judge("slow", "slow-ref", wait=None) is True  # waited for
    assert v.judge("slow", "slow-ref", wait=0.0) is True and calls == ["slow"]
    assert v.judge("a", "b", wait=None) is False and v.judge("a", "a", wait=None) is True


def test_a_comparison_past_its_limit_is_stopped_and_is_no_match():
    """The last resort: a comparison that never ends (and catches every Exception) is stopped at
    the limit, judged no match and kept; the thread goes on to the next pair."""
    from mlx_grpo.rewards.verdicts import Verifier

    calls = []
    v = Verifier(lambda a, b: calls.append(a) or _spin_or_compare(a, b), limit=0.05)
    assert v.judge("spin", "x", wait=None) is False  # unstopped, it would never return
    assert v.judge("x", "x", wait=None) is True
    assert v.judge("spin", "x", wait=None) is False and calls == ["spin", "x"]


def test_a_full_queue_gives_no_verdict_without_queueing():
    """Past ``pending`` pairs waiting (the one being compared counts), a new pair gets no verdict
    and is not queued: it is compared only when asked again with room in the queue."""
    from mlx_grpo.rewards.verdicts import Verifier

    v = Verifier(_spin_or_compare, limit=5.0, pending=1)
    assert v.judge("slow", "slow-ref", wait=0.0) is None  # queued: compared for 0.3 s
    assert v.judge("b", "b", wait=0.0) is None  # the queue is full: refused, not queued
    assert v.judge("slow", "slow-ref", wait=None) is True
    time.sleep(0.2)  # had "b" been queued, it would be decided by now (an equality)
    assert v.judge("b", "b", wait=0.0) is None  # asked again: queued now
    assert v.judge("b", "b", wait=None) is True


def test_a_forked_child_gets_its_own_verifier():
    """A child forked while the thread runs (a lock it holds copied) judges on a thread of its own."""
    import os

    from mlx_grpo.rewards.verdicts import Verifier

    v = Verifier(_spin_or_compare, limit=5.0)
    assert v.judge("slow", "slow-ref", wait=0.0) is None  # the thread is busy for 0.3 s
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only when it judges by itself
        try:
            os._exit(0 if v.judge("a", "a", wait=10) is True and v.judge("slow", "slow-ref", wait=10) else 3)
        finally:
            os._exit(4)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_math_verify_waits_a_bounded_time_in_a_reward_and_to_the_end_in_an_evaluation():
    """A shape the parser has never seen takes it 100-250 ms: answers_match waits
    MATH_VERIFY_WAIT_S and says no match while undecided; inside full_verdicts (the evaluation) it
    waits for the verdict; the verdict, once decided, serves every later call."""
    pytest.importorskip("math_verify", reason="math-verify is not installed (pip install -e '.[math]')")
    from mlx_grpo.rewards import answers

    answers.math_verify_checker.cache_clear()
    try:
        pair = ("\\left(\\sqrt{12\\pi}+\\sqrt{\\sqrt{24}}, \\frac{88}{90}^{2}, 16\\right)",
                "\\left(2\\sqrt{3\\pi}+\\sqrt[4]{24}, \\frac{1936}{2025}, 16\\right)")
        assert answers.safe_for_math_verify(pair[0]) and answers.safe_for_math_verify(pair[1])
        token = answers._wait.set(0.0)  # a reward that cannot wait at all: undecided, no match
        try:
            assert not answers.answers_match(*pair)
        finally:
            answers._wait.reset(token)
        with answers.full_verdicts():
            assert answers.answers_match(*pair)
        assert answers.answers_match(*pair)  # decided: at once, whatever the wait
    finally:
        answers.math_verify_checker.cache_clear()


def test_the_copies_of_an_answer_in_one_reward_call_score_alike(monkeypatch):
    """A verdict that arrives while a call runs does not split a group: the accuracy reward judges
    each distinct answer once a call."""
    from mlx_grpo.config import AccuracySettings
    from mlx_grpo.rewards import answers
    from mlx_grpo.rewards.accuracy import make_accuracy_reward

    seen = []
    monkeypatch.setattr(answers, "math_verify_checker", lambda: (lambda p, r: seen.append(p) or len(seen) > 1))
    reward = make_accuracy_reward(AccuracySettings())
    c = "<think> t </think> <answer> \\sqrt{8} </answer>"
    assert reward(["q"] * 3, [c, c, c], answer=["2\\sqrt{2}"] * 3) == [0.0, 0.0, 0.0]
    assert reward(["q"] * 2, [c, c], answer=["2\\sqrt{2}"] * 2) == [1.0, 1.0]  # the next call: decided
