"""Degenerate completions of any length, the shapes a model under RL may generate (repeated tags,
whitespace runs, nested and unclosed tags, ``^`` before spaces, endless digits or braces), and
the time each built-in reward takes on them.

Every built-in reward must be linear in the completion: ``tests/test_reward_adversarial.py``
checks the growth from n to 8n characters on each shape, and ``benchmarks/reward_timing.py``
prints the time on 1 MB.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Mapping

RewardFn = Callable[..., list]


def _repeat(unit: str, n: int) -> str:
    return unit * max(1, n // len(unit))


def _answer(body: str) -> str:
    return f"<think>x</think><answer>{body}</answer>"


# Each shape: n -> a completion of about n characters.
SHAPES: Dict[str, Callable[[int], str]] = {
    **{f"repeated {tag}": (lambda n, tag=tag: _repeat(tag, n))
       for tag in ("<think>", "</think>", "<answer>", "</answer>")},
    "repeated <think></think><answer>": lambda n: _repeat("<think></think><answer>", n),
    "repeated <think></think><answer></answer>": lambda n: _repeat("<think></think><answer></answer>", n),
    "nested <answer>": lambda n: _repeat("<answer>", n // 2) + "5" + _repeat("</answer>", n // 2),
    "unclosed <answer> then spaces": lambda n: "<answer>" + " " * n,
    "spaces in answer": lambda n: _answer(" " * n),
    "spaces then a letter in answer": lambda n: _answer("5" + " " * n + "x"),
    "newlines in answer": lambda n: _answer("5" + "\n" * n + "x"),
    "^ then spaces in answer": lambda n: _answer("5^" + " " * n),
    "repeated ^ and space": lambda n: _answer(_repeat("^ ", n)),
    "repeated '. '": lambda n: _answer("5" + _repeat(". ", n) + "x"),
    "digits": lambda n: _answer("1" * n),
    "digits and spaces": lambda n: _answer(_repeat("1 ", n)),
    "digit groups": lambda n: _answer(_repeat("1,", n) + "000"),
    "fraction chain": lambda n: _answer(_repeat("1/", n) + "2"),
    "open braces": lambda n: _answer("\\boxed" + "{" * n),
    "nested \\boxed": lambda n: _answer(_repeat("\\boxed{", n // 2) + "5" + "}" * (n // 14)),
    "repeated \\frac{": lambda n: _answer(_repeat("\\frac{1}{", n)),
    "repeated \\text{": lambda n: _answer(_repeat("\\text{ ", n)),
    "repeated $": lambda n: _answer("$" * n),
    "repeated ~": lambda n: _answer("~" * n),
    "words": lambda n: _repeat("the answer is ", n),
    "distinct words": lambda n: " ".join(f"w{i}" for i in range(max(1, n // 7))),
    "countdown expression": lambda n: _answer(_repeat("(1 + 2) * ", n) + "3"),
    # the forms the answer parsers read as values (no-break spaces, a sign apart, scale words), repeated
    "no-break space groups": lambda n: _answer(_repeat("1\u00a0", n)),
    "sign then spaces": lambda n: _answer("-" + " " * n + "5"),
    "scale words": lambda n: _answer("5" + _repeat(" million", n)),
    "unit powers": lambda n: _answer("5 m" + _repeat("^2", n)),
    "multiplication signs": lambda n: _answer(_repeat("1\u00d7", n) + "1"),
    "expression over lines": lambda n: _answer(_repeat("(1 +\n", n) + "2"),
}

# Columns every built-in needs: a numeric reference, countdown numbers, token ids.
def columns(completions: List[str]) -> Dict[str, list]:
    """Reward columns for ``completions``: reference 19, countdown [1, 2, 3] -> 9, one id per char."""
    n = len(completions)
    return {"answer": ["19"] * n, "numbers": [[1, 2, 3]] * n, "target": [9] * n,
            "completion_ids": [range(len(c)) for c in completions]}


def seconds(fn: RewardFn, completion: str, repeats: int = 3) -> float:
    """The fastest of ``repeats`` calls of reward ``fn`` on one completion, in seconds."""
    cols = columns([completion])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn([""], [completion], **cols)
        best = min(best, time.perf_counter() - start)
    return best


def timings(rewards: Mapping[str, RewardFn], size: int, repeats: int = 3) -> Dict[str, Dict[str, float]]:
    """{shape: {reward: seconds}} for a completion of ``size`` characters of each shape."""
    out: Dict[str, Dict[str, float]] = {}
    for shape, make in SHAPES.items():
        completion = make(size)
        out[shape] = {name: seconds(fn, completion, repeats) for name, fn in rewards.items()}
    return out
