"""Symbolic answer comparison, each pair timed the first time it is seen (the goal: under 50 ms
a reward on any answer; the per-pair cache makes repeats free). Not part of the test suite.

    python benchmarks/answer_timing.py [--json]

Times ``answers_match`` on usual answers (rational expressions, decided by ``rational.py``;
roots, pi, intervals, sets, decided by math-verify when installed) and on the worst shapes that
pass the bounds (the longest sums of powers, nested fractions, unions of intervals). For each pair:
what a reward waits (``answers_match`` as training calls it: at most ``MATH_VERIFY_WAIT_S`` for
math-verify's verdict), whether it had the verdict by then, and when the verdict was decided (the
next pair starts after it). Prints the one-time cost (math-verify's import and warm-up), then
milliseconds per pair, and the median, 90th percentile and maximum of each group.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import common  # noqa: F401  (the repository on sys.path)
from mlx_grpo.rewards import answers
from mlx_grpo.rewards.rational import token_count

MONOMIALS = "+".join(f"{c}x^{{{k}}}" for c, k in zip(range(101, 999, 37), range(12, 0, -1)))
USUAL_RATIONAL = [
    ("x^2+2x+1", "(x+1)^{2}"), ("\\binom{n}{2}", "\\frac{n(n-1)}{2}"), ("\\frac{1}{x+1}", "\\frac{x}{x^2+x}"),
    ("24x^{11}+440x^{9}+1584x^{7}+1584x^{5}+440x^{3}+24x", "(x+1)^{12}-(x-1)^{12}"), ("3a-2b", "a+2a-2b"),
    ("\\frac{2}{3}x+1", "\\frac{2x+3}{3}"), ("(a+b)(a-b)", "a^2-b^2"), ("4n^2-1", "(2n-1)(2n+1)"),
]
USUAL_OTHER = [
    ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}"), ("3\\pi", "\\pi+2\\pi"), ("2\\sqrt{5}", "\\sqrt{20}"),
    ("\\left(2, \\frac{1}{3}\\right)", "(2, 1/3)"), ("[1, 5)", "[1,5)"), ("\\{1, 2, 3\\}", "\\{3, 2, 1\\}"),
    ("\\frac{\\pi}{6}", "30^\\circ"), ("y = 2x + 1", "y=1+2x"), ("1+2i", "2i+1"), ("e^{2}", "e^2"),
    ("\\sqrt[3]{2}", "2^{1/3}"), ("\\log_2 8", "3"), ("\\frac{5\\sqrt{3}}{3}", "\\frac{5}{\\sqrt{3}}"),
]
# Shapes grown to the most tokens math-verify is given (MAX_MATH_VERIFY_TOKENS), and past it.
GROWN = {
    "sum of roots": lambda n: "+".join(f"\\sqrt{{{p}}}" for p in range(2, 2 + n)),
    "sum of pi monomials": lambda n: "+".join(f"{c}\\pi x^{{{k}}}" for c, k in zip(range(3, 999, 7), range(n, 0, -1))),
    "union of intervals": lambda n: " \\cup ".join(f"({a}, {a + 1})" for a in range(0, 3 * n, 3)),
    "set of roots": lambda n: "\\{" + ", ".join(f"\\sqrt{{{a}}}" for a in range(2, 2 + n)) + "\\}",
    "nested fractions": lambda n: "\\frac{" * n + "\\sqrt{2}" + "".join(f"}}{{{k}}}" for k in range(3, 3 + n)),
    "tuple of fractions": lambda n: "\\left(" + ", ".join(f"\\frac{{{a}}}{{\\pi}}" for a in range(1, 1 + n)) + "\\right)",
}


def at_the_bound(grow) -> str:
    n = 1
    while token_count(grow(n + 1)) <= answers.MAX_MATH_VERIFY_TOKENS and n < 50:
        n += 1
    return grow(n)


WORST = [  # the longest or deepest that pass safe_for_math_verify, then past it
    *[(at_the_bound(g), "\\sqrt{2}") for g in GROWN.values()],
    ("\\sin(x)^{12}+\\cos(x)^{12}", "1"), ("(x+\\pi)^{8}-(x-\\pi)^{8}", "16\\pi x^{7}"),
    ("\\binom{9999}{4999}", "\\binom{9999}{5000}"), (MONOMIALS, "x"),
    *[(g(12), "\\sqrt{2}") for g in GROWN.values()],  # past the bound: refused before parsing
]


def time_pair(answer: str, reference: str) -> tuple:
    """(a reward's wait in ms, its verdict, ms until the verdict was decided, that verdict)."""
    t = time.perf_counter()
    in_reward = answers.answers_match(answer, reference)
    waited = time.perf_counter() - t
    with answers.full_verdicts():
        decided = answers.answers_match(answer, reference)
    total = time.perf_counter() - t
    return round(waited * 1e3, 2), in_reward, round(total * 1e3, 2), decided


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    t = time.perf_counter()
    installed = answers.math_verify_checker() is not None
    setup = time.perf_counter() - t
    groups = {"usual rational": USUAL_RATIONAL, "usual other": USUAL_OTHER, "worst within bounds": WORST}
    out = {"math_verify_installed": installed, "setup_ms": round(setup * 1e3, 1), "groups": {}}
    for name, pairs in groups.items():
        timed = [time_pair(a, r) for a, r in pairs]
        ms, decided = [t[0] for t in timed], [t[2] for t in timed]
        out["groups"][name] = {"pairs": [[a, r, *t] for (a, r), t in zip(pairs, timed)],
                               "median_ms": statistics.median(ms), "max_ms": max(ms),
                               "p90_ms": sorted(ms)[int(0.9 * (len(ms) - 1))],
                               "decided_median_ms": statistics.median(decided), "decided_max_ms": max(decided),
                               "late_verdicts": sum(t[1] != t[3] for t in timed)}
    if args.json:
        print(json.dumps(out))
        return
    print(f"math-verify installed: {installed}; import and warm-up, once: {out['setup_ms']:.0f} ms")
    print(f"a reward waits at most {answers.MATH_VERIFY_WAIT_S * 1e3:.0f} ms for math-verify's verdict")
    for name, g in out["groups"].items():
        print(f"\n{name}: a reward's wait median {g['median_ms']:.1f} ms, p90 {g['p90_ms']:.1f}, max "
              f"{g['max_ms']:.1f}; decided median {g['decided_median_ms']:.1f}, max {g['decided_max_ms']:.1f}; "
              f"verdicts not ready in the reward's wait that were a match: {g['late_verdicts']}")
        for a, r, m, got, d, final in g["pairs"]:
            late = "  (match decided later)" if got != final else ""
            print(f"  {m:8.2f} ms  decided {d:8.2f} ms  {final!s:5}  {a[:50]!s:52} vs {r[:26]}{late}")


if __name__ == "__main__":
    main()
