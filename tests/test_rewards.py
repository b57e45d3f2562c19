import math

import numpy as np
import pytest

from mlx_grpo.rewards import RewardError, load_reward, load_rewards, score
from mlx_grpo.rewards.answers import answers_match, extract_answer, last_number
from mlx_grpo.rewards.format import format_reward, is_strict_format, soft_format_reward, tag_count_reward

GOOD = "<think> 12 + 7 = 19 . </think> <answer> 19 </answer>"


@pytest.mark.parametrize("text", [
    GOOD,
    "<think>\n12 + 7 = 19\n</think>\n<answer>\n19\n</answer>\n",
    "  <think>x</think><answer>19</answer>",
])
def test_strict_format_accepts_layout_with_any_whitespace(text):
    assert is_strict_format(text)


@pytest.mark.parametrize("text", [
    "<think> a </think> <answer> 1 </answer> more",
    "<think> a </think> <think> b </think> <answer> 1 </answer>",
    "<answer> 1 </answer> <think> a </think>",
    "<think> a <answer> 1 </answer> </think>",
    "<think> a </think> <answer> 1",
    "19",
])
def test_strict_format_rejects(text):
    assert not is_strict_format(text)


def test_soft_format_and_tag_count():
    loose = "so <think> a </think> then <answer> 1 </answer> bye"
    assert soft_format_reward([""], [loose]) == [1.0]
    assert format_reward([""], [loose]) == [0.0]
    assert tag_count_reward([""], [GOOD, "<think> only", "<think><think></think>"]) == [1.0, 0.25, 0.25]


def test_answers_by_value():
    assert answers_match("19.", "19")
    assert answers_match(" 1,000 ", "1000")
    assert answers_match("3/4", "0.75")
    assert answers_match("$5", "5")
    assert answers_match("50%", "0.5")
    assert not answers_match("18", "19")
    assert not answers_match(None, "19")
    assert extract_answer("<answer>1</answer> x <answer> 2 </answer>") == "2"
    assert last_number("a 3 then -4.5 end") == "-4.5"


def test_accuracy_builtin_uses_answer_column_and_none_when_missing():
    acc = load_reward("accuracy")
    assert acc(["p", "p"], [GOOD, "<answer>18</answer>"], answer=["19", "19"]) == [1.0, 0.0]
    assert acc(["p"], [GOOD]) == [None]


def test_score_weighted_total_and_per_reward_means():
    fns = load_rewards(["accuracy", "format"])
    rw = score(["p"] * 3, [GOOD, "19", "<think>x</think><answer>3</answer>"],
               {"answer": ["19", "19", "19"]}, fns, {"accuracy": 1.0, "format": 0.5})
    np.testing.assert_allclose(rw.total, [1.5, 0.0, 0.5])
    assert rw.means() == {"accuracy": pytest.approx(1 / 3), "format": pytest.approx(2 / 3)}


def test_none_is_left_out_of_the_mean_and_counts_zero(tmp_path):
    f = tmp_path / "r.py"
    f.write_text("def half(prompts, completions, **kw):\n    return [None, 1.0]\n")
    fns = load_rewards([f"{f}:half"])
    rw = score(["a", "b"], ["x", "y"], {}, fns, {})
    assert rw.means()[f"{f}:half"] == 1.0
    np.testing.assert_allclose(rw.total, [0.0, 1.0])


def test_user_reward_from_module(tmp_path, monkeypatch):
    (tmp_path / "myrewards.py").write_text(
        "def length(prompts, completions, answer=None, **kw):\n    return [len(c) for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = load_reward("myrewards:length")
    assert fn(["p"], ["abc"], answer=["1"]) == [3]


@pytest.mark.parametrize("name,msg", [
    ("nosuch", "unknown reward"),
    ("missing_file.py:fn", "not found"),
])
def test_bad_reward_names(name, msg):
    with pytest.raises(RewardError, match=msg):
        load_reward(name)


def test_reward_file_without_function_or_with_import_error(tmp_path):
    f = tmp_path / "r.py"
    f.write_text("x = 1\n")
    with pytest.raises(RewardError, match="has no function 'fn'"):
        load_reward(f"{f}:fn")
    g = tmp_path / "broken.py"
    g.write_text("import does_not_exist_anywhere\n")
    with pytest.raises(RewardError, match="cannot import"):
        load_reward(f"{g}:fn")


# ---------------------------------------------------------------- accuracy: answers by value

from mlx_grpo.config import AccuracySettings, ConfigError, LengthSettings, OverlongSettings, RewardSettings, make_config
from mlx_grpo.rewards import BUILTIN, RANGES, resolve_settings, settings_for
from mlx_grpo.rewards.accuracy import make_accuracy_reward
from mlx_grpo.rewards.answers import (clean_answer, extract_boxed, math_verify_checker, parse_number,
                                      pick_answer)
from mlx_grpo.rewards.countdown import countdown_correct, countdown_reward, evaluate_expression
from mlx_grpo.rewards.format import tag_count
from mlx_grpo.rewards.shaping import overlong_penalty, repetition_penalty

EQUAL = [  # (predicted, reference): the same value in another dress
    ("19", "19"), ("19.", "19"), (" 19 ", "19"), ("19!", "19"), ("19;", "19"), ("+19", "19"),
    ("-7", "-7"), ("\u22127", "-7"), ("-7.0", "-7"), ("007", "7"), ("5.00", "5"), (".5", "0.5"),
    ("1,000", "1000"), ("1,234,567", "1234567"), ("1,234.50", "1234.5"), ("1\\,000", "1000"),
    ("1{,}000", "1000"), ("1e3", "1000"), ("3/4", "0.75"), ("3 / 4", "0.75"), ("-3/4", "-0.75"),
    ("6/8", "3/4"), ("1 1/2", "1.5"), ("-1 1/2", "-1.5"), ("50%", "0.5"), ("50 %", "0.5"),
    ("50%", "50"), ("50\\%", "0.5"), ("12.5 percent", "0.125"), ("$5", "5"), ("$5.00", "5"),
    ("\\$1,234", "1234"), ("€20", "20"), ("USD 5", "5"), ("5 dollars", "5"), ("5 cm", "5"),
    ("60 km/h", "60"), ("90^\\circ", "90"), ("90°", "90"), ("x = 5", "5"), ("The answer is 42", "42"),
    ("\\frac{3}{4}", "0.75"), ("\\dfrac{3}{4}", "3/4"), ("\\tfrac34", "0.75"), ("-\\frac{3}{4}", "-0.75"),
    ("\\frac{-3}{4}", "-0.75"), ("\\boxed{42}", "42"), ("\\boxed{\\frac{1}{2}}", "0.5"),
    ("$42$", "42"), ("$$42$$", "42"), ("\\(42\\)", "42"), ("\\[42\\]", "42"), ("$\\boxed{1,000}$", "1000"),
    ("\\text{42 cm}", "42"), ("**42**", "42"), ("(42)", "42"), ("{42}", "42"), ("42", "$42"),
    ("0.75", "\\frac{3}{4}"), ("Paris", "paris"), ("\\text{Paris}", "Paris"), ("New  York.", "new york"),
]
NOT_EQUAL = [
    ("18", "19"), ("-19", "19"), ("1.9", "19"), ("0.33", "1/3"), ("1,00", "100"), ("3 or 4", "3"),
    ("3 + 4", "7"), ("5 / x", "5"), ("2024-01-01", "2024"), ("", "19"), ("   ", ""), ("$", "5"),
    ("1/0", "1"), ("\\boxed{4", "4"), ("Pairs", "Paris"), ("19 20", "19"), ("19e", "19e2"),
]


# Words that negate, bound or scale a number are not units; forms that mean the same
# value are read. Only a short allow-list (lead words, signs, currency, percent, scale, units) may
# stand around the one number.
SAME_VALUE = [
    ("minus 5", "-5"), ("Minus 5", "-5"), ("negative 5", "-5"), ("x = minus 5", "-5"), ("plus 5", "5"),
    ("- 5", "-5"), ("+ 5", "5"), ("-$5", "-5"), ("- $5", "-5"), ("$-5", "-5"), ("\\$-5", "-5"), ("-€5", "-5"),
    ("€ -5", "-5"), ("-5 €", "-5"), ("5 $", "5"), ("\u22125", "-5"), ("\u2212 5", "-5"),
    ("5 million", "5000000"), ("5 thousand", "5000"), ("2.5 billion", "2500000000"), ("$3 million", "3000000"),
    ("5 hundred", "500"), ("1.5 thousand dollars", "1500"), ("3 millions", "3000000"),
    ("½", "0.5"), ("1½", "1.5"), ("1 ½", "3/2"), ("-½", "-0.5"), ("¾", "0.75"), ("2⅓", "7/3"), ("⅛ cup", "0.125"),
    ("1\u20442", "0.5"), ("5 cm²", "5"), ("5 cm³", "5"), ("5 m^2", "5"), ("5 m^{2}", "5"), ("5 \\text{cm}^2", "5"),
    ("5 square feet", "5"), ("5 sq ft", "5"), ("9.8 m/s^2", "9.8"), ("60 km per hour", "60"), ("60 mph", "60"),
    ("1\u2009000\u2009000", "1000000"), ("1\u00a0000", "1000"), ("1\u202f234.5", "1234.5"), ("12\u2007345", "12345"),
    ("5 m", "5"), ("5 kg", "5"), ("2 L", "2"), ("90°C", "90"), ("90 degrees", "90"), ("3 hours", "3"), ("5~cm", "5"),
    ("Answer: 5", "5"), ("The final answer is 5", "5"), ("x=5", "5"), ("n = -3", "-3"), ("USD 5", "5"),
    ("5 per cent", "0.05"), ("minus 50%", "-0.5"), ("1 1/2 cups", "1.5"),
]
NOT_SAME_VALUE = [
    ("not 5", "5"), ("never 5", "5"), ("no 5", "5"), ("less than 5", "5"), ("more than 5", "5"), ("at least 5", "5"),
    ("at most 5", "5"), ("under 5", "5"), ("over 5", "5"), ("about 5", "5"), ("approximately 5", "5"),
    ("around 5", "5"), ("nearly 5", "5"), ("almost 5", "5"), ("roughly 5", "5"), ("~5", "5"), ("~ 5", "5"),
    ("≈5", "5"), ("x ≈ 5", "5"), ("x \\approx 5", "5"), ("> 5", "5"), ("x > 5", "5"), ("x < 5", "5"),
    ("x >= 5", "5"), ("x \\geq 5", "5"), ("x \\neq 5", "5"), ("x != 5", "5"), ("≥ 5", "5"), ("≠ 5", "5"),
    ("5 or more", "5"), ("5 or less", "5"), ("5 or fewer", "5"), ("5+", "5"), ("5 less", "5"), ("5 more", "5"),
    ("5 fewer", "5"), ("5 times", "5"), ("5 squared", "5"), ("5 cubed", "5"), ("5 dozen", "5"), ("5k", "5"),
    ("5 M", "5"), ("5 million", "5"), ("5 thousand", "5"), ("minus 5", "5"), ("negative 5", "5"), ("- 5", "5"),
    ("-$5", "5"), ("5²", "5"), ("5^2", "5"), ("5^2", "25"), ("5 square", "5"), ("5 cm /", "5"), ("5 / cm", "5"),
    ("minus -5", "5"), ("- -5", "5"), ("- -5", "-5"), ("+ -5", "-5"), ("--5", "5"), ("5 x", "5"), ("x 5", "5"),
    ("5 is wrong", "5"), ("5, not 6", "5"), ("between 4 and 6", "5"), ("5 ± 1", "5"), ("1 over 5", "0.2"),
    ("42 apples", "42"),  # a count noun is not told apart from "less" or "dozen": only listed units stand
    ("1 000", "1000"),  # a plain space between digit groups stays two numbers (thin and no-break spaces join)
]


@pytest.mark.parametrize("predicted,reference", SAME_VALUE)
def test_forms_of_the_same_value_get_credit(predicted, reference):
    assert answers_match(predicted, reference), (predicted, reference)


@pytest.mark.parametrize("predicted,reference", NOT_SAME_VALUE)
def test_words_that_negate_bound_or_scale_are_not_units(predicted, reference):
    assert not answers_match(predicted, reference), (predicted, reference)


@pytest.mark.parametrize("predicted,reference", EQUAL)
def test_equal_answers_in_every_format(predicted, reference):
    assert answers_match(predicted, reference), (predicted, reference)
    assert answers_match(predicted, reference, math_verify=False)


@pytest.mark.parametrize("predicted,reference", NOT_EQUAL)
def test_unequal_answers(predicted, reference):
    assert not answers_match(predicted, reference), (predicted, reference)


def test_numbers_parse_exactly_and_never_build_huge_values():
    assert parse_number("3/4").value == parse_number("0.75").value
    assert parse_number("1e999") is not None  # the exponent is capped at 3 digits
    assert parse_number("1e99999") is None  # "1e999" then "99": two numbers
    assert parse_number("9" * 5000) is None  # over Python's int-from-text limit: not a number
    assert parse_number("5 - 3") is None and parse_number("2^10") is None
    assert clean_answer(" \\boxed{ 7 } . ") == "7"


def test_answer_extraction_modes():
    text = "work 3 <answer> 4 </answer> then \\boxed{5} and 6 end"
    assert pick_answer(text, "tag") == "4"
    assert pick_answer(text, "boxed") == "5"
    assert pick_answer(text, "last_number") == "6"
    assert pick_answer("no tag \\boxed{5} 6", "any") == "5"
    assert pick_answer("no tag, no box, 6", "any") == "6"
    assert pick_answer("nothing", "any") is None
    assert extract_boxed("\\boxed{\\frac{1}{\\sqrt{2}}}") == "\\frac{1}{\\sqrt{2}}"
    assert extract_boxed("\\boxed 5 more") == "5"
    assert extract_boxed("\\boxed{unclosed") is None


@pytest.mark.parametrize("completion,expected", [
    ("<answer>1</answer> x <answer> 2 </answer>", "2"),  # repeated: the last one
    ("<answer><answer>5</answer></answer>", "5"),  # nested: the innermost
    ("<answer>5 <answer>6</answer>", "6"),
    ("<answer> 7", None),  # truncated
    ("", None),
    ("</answer>5<answer>", None),
])
def test_answer_tag_edge_cases(completion, expected):
    assert extract_answer(completion) == expected


@pytest.mark.parametrize("completion,answer,strict,lenient", [
    ("<think>x</think><answer>19</answer>", "19", 1.0, 1.0),
    ("<think>x</think><answer>\\boxed{19}</answer>", "19", 1.0, 1.0),
    ("<think>x</think><answer>18</answer> 19", "19", 0.0, 1.0),
    ("<think>19</think><answer></answer>", "19", 0.0, 1.0),
    ("", "19", 0.0, 0.0),
    ("19", None, None, None),
])
def test_accuracy_rewards_table(completion, answer, strict, lenient):
    assert BUILTIN["accuracy"]([""], [completion], answer=[answer]) == [strict]
    assert BUILTIN["lenient_accuracy"]([""], [completion], answer=[answer]) == [lenient]


def test_accuracy_settings_choose_where_the_answer_is_read():
    text = "so the result is \\boxed{12}, not 13"
    acc = lambda mode: make_accuracy_reward(AccuracySettings(extract=mode))  # noqa: E731
    assert acc("tag")([""], [text], answer=["12"]) == [0.0]
    assert acc("boxed")([""], [text], answer=["12"]) == [1.0]
    assert acc("last_number")([""], [text], answer=["12"]) == [0.0]
    assert acc("any")([""], [text], answer=["12"]) == [1.0]
    cfg = make_config(None, [("reward_settings.accuracy.extract", "boxed")])
    assert load_reward("accuracy", settings_for(cfg))([""], [text], answer=["12"]) == [1.0]


SYMBOLIC = ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}")


def test_symbolic_equivalence_with_math_verify():
    pytest.importorskip("math_verify")
    assert math_verify_checker() is not None
    assert answers_match(*SYMBOLIC)
    assert answers_match("2\\pi", "\\pi \\cdot 2")
    assert not answers_match("\\sqrt{3}", "\\sqrt{2}")
    assert not answers_match(*SYMBOLIC, math_verify=False)  # the built-in normaliser alone can't


def test_without_math_verify_the_builtin_decides(monkeypatch):
    import sys

    math_verify_checker.cache_clear()
    monkeypatch.setitem(sys.modules, "math_verify", None)  # as if not installed
    try:
        assert math_verify_checker() is None
        assert not answers_match(*SYMBOLIC)
        assert answers_match("\\frac{3}{4}", "0.75")
    finally:
        math_verify_checker.cache_clear()


# ---------------------------------------------------------------- format


@pytest.mark.parametrize("text,strict,soft,tags", [
    ("<think>a</think><answer>1</answer>", 1, 1, 1.0),
    ("<think>\na\n</think>\n<answer>\n1\n</answer>\n", 1, 1, 1.0),
    ("<think></think><answer>1</answer>", 1, 1, 1.0),  # empty think allowed
    ("<think>a</think><answer>  </answer>", 0, 1, 1.0),  # empty answer is no answer
    ("<think>a</think><answer>1</answer> trailing", 0, 1, 1.0),
    ("lead <think>a</think><answer>1</answer>", 0, 1, 1.0),
    ("<think>a</think><think>b</think><answer>1</answer>", 0, 1, 0.5),  # repeated think
    ("<think>a</think><answer>1</answer><answer>2</answer>", 0, 1, 0.5),  # repeated answer
    ("<think>a <think>b</think> c</think><answer>1</answer>", 0, 1, 0.5),  # nested think
    ("<think>a</think><answer><answer>1</answer></answer>", 0, 1, 0.5),  # nested answer
    ("<think>a <answer>1</answer></think>", 0, 0, 0.75),  # answer inside think
    ("<answer>1</answer><think>a</think>", 0, 0, 0.5),  # wrong order
    ("<think><answer></think></answer>", 0, 0, 0.75),  # interleaved
    ("<think>a</think> 1", 0, 0, 0.5),
    ("<think>a", 0, 0, 0.25),
    ("<THINK>a</THINK><ANSWER>1</ANSWER>", 0, 0, 0.0),
    ("", 0, 0, 0.0),
])
def test_format_rewards_table(text, strict, soft, tags):
    assert format_reward([""], [text]) == [float(strict)]
    assert soft_format_reward([""], [text]) == [float(soft)]
    assert tag_count_reward([""], [text]) == [tags]


# ---------------------------------------------------------------- countdown


@pytest.mark.parametrize("answer,ok", [
    ("(1 + 2) * 3", True), ("3 * (2 + 1)", True), ("(1+2)*3", True), ("(1 + 2) * 3 = 9", True),
    ("(1 + 2) × 3", True), ("3 \\times (1 + 2)", True), ("-(1 - 2 - 3) + 5 * 0 + 3", False),
    ("(1 + 2) * 3 = 10", False), ("1 + 2 + 3", False), ("(1 + 2) * 3 * 1", False), ("3 * 3", False),
    ("9", False), ("", False), ("__import__('os')", False), ("(1 + 2) ** 3", False), ("1.0 * 9", False),
    ("3 / (1 - 1) + 2", False), ("(1 + 2) * 3 = 9 = 9", False), ("(" * 300 + "1", False),
    # the target on either side, the usual multiplication signs, trailing punctuation, lines
    ("9 = (1 + 2) * 3", True), ("9 = 3 * (1 + 2).", True), ("10 = (1 + 2) * 3", False), ("9 = 9", False),
    ("3 * 3 = (1 + 2) * 3", True), ("(1 + 2) * 3 = 3 * 3", True), ("(1 + 2) * 3 = 10 - 1", True),
    ("(1 + 2) · 3", True), ("(1 + 2) ⋅ 3", True), ("(1 + 2) ∙ 3", True), ("(1 + 2) ∗ 3", True),
    ("(1 + 2) x 3", True), ("3 X (1 + 2)", True), ("(1 + 2)x3", True), ("3 \\cdot (1 + 2)", True),
    ("\\left(1 + 2\\right) \\times 3", True), ("3 \\ast (2 + 1)", True), ("(2 ÷ 2 + 2) * 3", False),
    ("x * (1 + 2) * 3", False), ("(1 + 2) * 3.", True), ("(1 + 2) * 3 = 9.", True), ("(1 + 2) * 3;", True),
    ("(1 + 2) * 3 .", True), ("(1 + 2) * 3!", False), ("(1 + 2) * 3?", False),
    ("(1 + 2)\n* 3", True), ("(1 +\n2) *\n3", True), ("1 +\n2 +\n3 +\n3", False), ("3 *\n(1 + 2)\n= 9\n", True),
    ("(1 + 2) * 3" + " " * 10000, True), ("(1 + 2) * 3 " + "+ 0 " * 1000, False),
])
def test_countdown_table(answer, ok):
    assert countdown_correct(answer, [1, 2, 3], 9) is ok


def test_countdown_exact_fractions_and_columns():
    assert countdown_correct("(6 / 4) * 2", [6, 4, 2], 3)  # 1.5 * 2, exactly
    assert countdown_correct("8 / (3 - 8 / 3)", [8, 3, 8, 3], 24)
    assert evaluate_expression("2 ** 100") is None and evaluate_expression("a + 1") is None
    good = "<think>x</think><answer>(1 + 2) * 3</answer>"
    assert countdown_reward([""] * 3, [good, good, "no"], numbers=[[1, 2, 3], [1, 2, 4], [1, 2, 3]],
                            target=[9, 9, 9]) == [1.0, 0.0, 0.0]
    assert countdown_reward([""], [good], nums=[[3, 2, 1]], target=["9"]) == [1.0]  # TinyZero's names
    assert countdown_reward([""], [good]) == [None]


# ---------------------------------------------------------------- shaping


@pytest.mark.parametrize("length,expected", [(0, 0.0), (16, 0.0), (17, -0.25), (18, -0.5), (20, -1.0), (21, -1.0), (99, -1.0)])
def test_overlong_penalty_matches_dapo(length, expected):
    # L_max 20, L_cache 4: free up to 16, then ((20 - 4) - L) / 4, -1 beyond 20.
    assert overlong_penalty(length, 20, 4) == pytest.approx(expected)


def test_overlong_reward_counts_tokens_from_completion_ids_or_words():
    s = resolve_settings(RewardSettings(overlong=OverlongSettings(max_length=10, cache=5)), 99)
    fn = load_reward("overlong", s)
    assert fn(["", ""], ["a", "b"], completion_ids=[[1] * 5, [1] * 8]) == [0.0, pytest.approx(-0.6)]
    with pytest.raises(RewardError, match="no completion_ids column"):
        fn([""], ["a"])
    words = resolve_settings(RewardSettings(overlong=OverlongSettings(max_length=4, cache=2, unit="words")), 99)
    assert load_reward("overlong", words)([""], ["a b c d"]) == [-1.0]


def test_length_and_repetition_penalties():
    s = resolve_settings(RewardSettings(length=LengthSettings(unit="chars")), 10)
    assert load_reward("length", s)([""] * 3, ["", "abcde", "x" * 30]) == [0.0, -0.5, -1.0]
    assert repetition_penalty("a b c d e", 3) == 0.0
    assert repetition_penalty("a b", 3) == 0.0
    assert repetition_penalty("a a a a a a", 3) == pytest.approx(-(1 - 1 / 4))
    assert repetition_penalty("a b a b a b", 2) == pytest.approx(-(1 - 2 / 5))


def _repetition_by_tuples(text: str, n: int) -> float:
    # The formula as open-r1 writes it: a set of word n-gram tuples.
    words = text.split()
    grams = list(zip(*(words[i:] for i in range(n))))
    return len(set(grams)) / len(grams) - 1.0 if grams else 0.0


@pytest.mark.parametrize("vocab,n", [(3, 1), (3, 3), (50, 2), (50, 3), (400, 8), (9, 24), (2, 40)])
def test_repetition_penalty_counts_exactly_as_a_set_of_tuples(vocab, n):
    # (400, 8), (9, 24) and (2, 40) overflow int64 when packed, so they take the re-ranking path;
    # the separators include the Unicode spaces str.split() knows (U+2028, U+0085, U+3000).
    rng = np.random.default_rng(vocab * 100 + n)
    for length in (0, n - 1, n, 3000):
        words = [f"w{i}" for i in rng.integers(0, vocab, length)]
        text = "".join(w + str(rng.choice([" ", "\n", "\u2028", "\x85", "\u3000  "])) for w in words)
        assert repetition_penalty(text, n) == _repetition_by_tuples(text, n)


def test_repetition_penalty_does_not_wrap_around_int64():
    # Two 70-grams of {a, b} that differ only in their first word: packed in base 2 without
    # re-ranking, that word's digit would be 2**69 = 0 (mod 2**64) and the two would count as one.
    assert repetition_penalty("a" + " b" * 70, 70) == 0.0
    assert repetition_penalty("a" + " b" * 70, 70) == _repetition_by_tuples("a" + " b" * 70, 70)


def test_repetition_penalty_reads_the_first_max_words_words():
    from mlx_grpo.rewards.shaping import MAX_WORDS
    head = " ".join(f"w{i}" for i in range(MAX_WORDS))
    assert repetition_penalty(head, 3) == 0.0
    # What follows the first MAX_WORDS words is not read, repeated or not ...
    assert repetition_penalty(head + " the end" * 1000, 3) == 0.0
    # ... and a text of exactly MAX_WORDS words is read whole.
    looped = " ".join(["a"] * MAX_WORDS)
    assert repetition_penalty(looped, 3) == pytest.approx(1 / (MAX_WORDS - 2) - 1)


def test_settings_resolve_against_rollout_length_and_fail_clearly():
    s = settings_for(make_config(None, [("rollout.max_tokens", 40)]))
    assert (s.overlong.max_length, s.overlong.cache, s.length.max_length) == (40, 8, 40)
    with pytest.raises(ConfigError, match="reward_settings.overlong.cache: must be at most max_length"):
        resolve_settings(RewardSettings(overlong=OverlongSettings(max_length=4, cache=5)), 10)
    with pytest.raises(ConfigError, match="reward_settings.overlong.lenght: unknown key"):
        make_config(None, [("reward_settings.overlong.lenght", 3)])
    with pytest.raises(ConfigError, match="reward_settings.overlong.unit: must be one of"):
        make_config(None, [("reward_settings.overlong.unit", "bytes")])
    with pytest.raises(ConfigError, match="reward_settings.accuracy.extract: must be one of"):
        make_config(None, [("reward_settings.accuracy.extract", "first")])


COMPLETIONS = [
    "", "19", "<think>a</think><answer>19</answer>", "<answer>(1 + 2) * 3</answer>", "a a a a a a a a",
    "<think><think></think></think><answer>\\boxed{\\frac{1}{2}}</answer>" * 3, "x " * 200,
    "<answer>1,000%</answer>", "<answer>-0</answer>", "<think>\n</think>\n<answer>\n\u22127\n</answer>",
]


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_every_builtin_stays_in_its_documented_range(name):
    lo, hi = RANGES[name]
    n = len(COMPLETIONS)
    cols = {"answer": ["19", "19", "19", "9", "0.5", "0.5", "1", "10", "0", "-7"],
            "numbers": [[1, 2, 3]] * n, "target": [9] * n,
            "completion_ids": [list(range(len(c.split()))) for c in COMPLETIONS]}
    values = BUILTIN[name]([""] * n, COMPLETIONS, **cols)
    assert len(values) == n
    assert all(v is None or lo <= v <= hi for v in values), values
    assert set(RANGES) == set(BUILTIN)


# ---------------------------------------------------------------- user rewards, more failure cases


def test_user_reward_gets_dataset_columns_and_none_counts_zero_in_total(tmp_path):
    f = tmp_path / "cols.py"
    f.write_text(
        "def by_level(prompts, completions, level=None, answer=None, **kw):\n"
        "    return [None if l is None else float(l) for l in level]\n")
    name = f"{f}:by_level"
    rw = score(["p"] * 3, ["a", "b", "c"], {"level": [2, None, 1], "answer": ["x", "y", "z"]},
               load_rewards([name]), {name: 0.5})
    np.testing.assert_allclose(rw.total, [1.0, 0.0, 0.5])
    assert rw.means()[name] == 1.5  # (2 + 1) / 2: the None row is not in the mean
    assert np.isnan(rw.columns[name][1])


@pytest.mark.parametrize("body,msg", [
    ("def r(p, c, **k):\n    raise RuntimeError('boom')\n", "raised RuntimeError: boom"),
    ("def r(p, c, **k):\n    return [1.0]\n", "returned 1 values for 2 completions"),
    ("def r(p, c, **k):\n    return [float('nan'), 1.0]\n", "returned nan for sample 0"),
    ("def r(p, c, **k):\n    return ['x', 1.0]\n", "not a number"),
    # raises on one sample only: the message names that sample
    ("def r(p, c, **k):\n    return [1.0 / len(x) for x in c]\n", "raised ZeroDivisionError: float division by zero on sample 1 (completion '')"),
    ("def r(p, c, **k):\n    return None\n", "returned None for 2 completions"),
    ("def r(p, c, **k):\n    return [1.0, 2.0, 3.0]\n", "returned 3 values for 2 completions"),
    ("def r(p, c, **k):\n    return 1.0\n", "returned 1.0 for 2 completions"),
    ("def r(p, c, **k):\n    return [1.0, float('inf')]\n", "returned inf for sample 1"),
    ("def r(p, c, **k):\n    return [1.0, [2]]\n", "returned [2] (not a number) for sample 1"),
    ("def r(p, c, answer, **k):\n    return [1.0, 1.0]\n", "missing 1 required positional argument: 'answer'"),
    # what a reward returns or does cannot escape the contract
    ("import sys\ndef r(p, c, **k):\n    sys.exit(0)\n", "raised SystemExit: 0 on sample 0"),
    ("def r(p, c, **k):\n    raise SystemExit('done')\n", "raised SystemExit: done on sample 0"),
    ("def r(p, c, **k):\n    return {1.0: 'a', 0.0: 'b'}\n", "(a dict) for 2 completions (expected a list of 2 numbers or None)"),
    ("def r(p, c, **k):\n    return '11'\n", "returned '11' (a str) for 2 completions"),
    ("import numpy as np\ndef r(p, c, **k):\n    return np.array(1.0)\n", "returned an array of shape () for 2 completions"),
    ("import numpy as np\ndef r(p, c, **k):\n    return np.ones((2, 1))\n", "returned an array of shape (2, 1) for 2 completions"),
    ("import numpy as np\ndef r(p, c, **k):\n    return np.ones(3)\n", "returned 3 values for 2 completions"),
    ("import numpy as np\ndef r(p, c, **k):\n    return [np.ones(1), 1.0]\n", "(not a number) for sample 0"),
    ("def r(p, c, **k):\n    return ['1', 1.0]\n", "returned '1' (not a number) for sample 0"),
    ("def r(p, c, **k):\n    return (x for x in [1.0, 1.0])\n", "(a generator) for 2 completions"),
    # any BaseException of the reward's own, and numbers float() cannot hold
    ("def r(p, c, **k):\n    raise GeneratorExit('stop')\n", "raised GeneratorExit: stop on sample 0"),
    ("class Boom(BaseException):\n    pass\ndef r(p, c, **k):\n    raise Boom('x')\n", "raised Boom: x on sample 0"),
    ("def r(p, c, **k):\n    return [1.0, 10**400]\n", "returned 1000000000000000000000000000"),
    ("def r(p, c, **k):\n    return [1.0, 10**400]\n", "(not a finite number) for sample 1"),
    ("def r(p, c, **k):\n    return [10**5000, 1.0]\n", "returned <a int> (not a finite number) for sample 0"),
])
def test_user_reward_failures_name_reward_and_sample(tmp_path, body, msg):
    f = tmp_path / "bad.py"
    f.write_text(body)
    with pytest.raises(RewardError) as e:
        score(["a", "b"], ["x", ""], {}, load_rewards([f"{f}:r"]), {})
    assert str(e.value).startswith(f"reward {f}:r ") and msg in str(e.value), str(e.value)


def test_user_reward_from_installed_module_and_numpy_results(tmp_path, monkeypatch):
    pkg = tmp_path / "labpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "scores.py").write_text(
        "import numpy as np\n"
        "def longer(prompts, completions, **kw):\n    return np.array([len(c) for c in completions], float)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rw = score(["p", "p"], ["ab", "abcd"], {}, load_rewards(["labpkg.scores:longer"]), {})
    np.testing.assert_allclose(rw.columns["labpkg.scores:longer"], [2.0, 4.0])
    with pytest.raises(RewardError, match="cannot import labpkg.nosuch"):
        load_reward("labpkg.nosuch:fn")


# ---------------------------------------------------------------- user rewards: the import contract


@pytest.mark.parametrize("body,msg", [
    ("import sys\nsys.exit(0)\n", "cannot import {f}: SystemExit: 0"),
    ("raise KeyboardInterrupt\n", "cannot import {f}: KeyboardInterrupt"),
    ("raise SystemExit(3)\n", "cannot import {f}: SystemExit: 3"),
    # argparse at import sees only the file's name: a required option fails, quoting argparse
    ("import argparse\np = argparse.ArgumentParser()\np.add_argument('--scale', required=True)\n"
     "args = p.parse_args()\n",
     "cannot import {f}: SystemExit: 2 (it printed: {name}: error: the following arguments are required: --scale)"),
])
def test_user_reward_import_cannot_exit(tmp_path, capsys, body, msg):
    f = tmp_path / "escape.py"
    f.write_text(body + "def r(p, c, **k):\n    return [1.0] * len(c)\n")
    with pytest.raises(RewardError) as e:
        load_rewards([f"{f}:r"])
    assert str(e.value).startswith(f"rewards.{f}:r: ")
    assert msg.format(f=f, name=f.name) in str(e.value), str(e.value)
    out, err = capsys.readouterr()
    assert out == "" and err == ""  # what it printed is in the one error line, nowhere else


def test_user_reward_accepted_forms_and_prints_go_to_stderr(tmp_path, capsys):
    """Documented acceptances: argparse at import with optional flags parses no arguments of
    ours; tuples, 1-D arrays, bools and NumPy scalars are values; prints go to stderr."""
    f = tmp_path / "ok.py"
    f.write_text(
        "import argparse, sys\nimport numpy as np\n"
        "opts = argparse.ArgumentParser()\nopts.add_argument('--scale', type=float, default=2.0)\n"
        "SCALE = opts.parse_args().scale\nprint('loaded at import')\n"
        "def as_tuple(p, c, **k):\n    print('scoring', len(c))\n    return (True, np.float32(0.5), np.int64(1))\n"
        "def as_array(p, c, **k):\n    return np.array([SCALE, 0.0, None], dtype=object)\n"
        "def as_mixed(p, c, **k):\n    return [np.bool_(False), 2, None]\n")
    fns = load_rewards([f"{f}:as_tuple", f"{f}:as_array", f"{f}:as_mixed"])
    rw = score(["p"] * 3, ["a", "b", "c"], {}, fns, {})
    np.testing.assert_allclose(rw.columns[f"{f}:as_tuple"], [1.0, 0.5, 1.0])
    np.testing.assert_allclose(rw.columns[f"{f}:as_array"], [2.0, 0.0, np.nan])
    np.testing.assert_allclose(rw.columns[f"{f}:as_mixed"], [0.0, 2.0, np.nan])
    out, err = capsys.readouterr()
    assert out == ""
    assert "loaded at import" in err and "scoring 3" in err


def test_a_reward_that_edits_its_lists_cannot_change_the_next_rewards_input(tmp_path):
    f = tmp_path / "editor.py"
    f.write_text("def r(p, c, answer, **k):\n    n = len(c)\n    c.clear()\n    p.append('x')\n"
                 "    answer[:] = ['0'] * n\n    return [0.0] * n\n")
    fns = load_rewards([f"{f}:r", "format", "accuracy"])
    good = "<think> 2 + 3 = 5 </think>\n<answer> 5 </answer>"
    rw = score(["p", "p"], [good, "no"], {"answer": ["5", "5"]}, fns, {})
    np.testing.assert_allclose(rw.columns["format"], [1.0, 0.0])
    np.testing.assert_allclose(rw.columns["accuracy"], [1.0, 0.0])


def test_a_reward_that_edits_nested_inputs_in_place_changes_nothing_for_the_next(tmp_path):
    """Before: the copies were shallow, so ``numbers[i].clear()`` in one reward emptied the numbers
    the countdown reward saw next (its mean 0.0 instead of 0.5), and the dataset's own rows."""
    f = tmp_path / "nested.py"
    f.write_text(
        "seen = []\n"
        "def editor(p, c, numbers, meta, **k):\n"
        "    for i in range(len(c)):\n"
        "        numbers[i].clear()\n"
        "        meta[i]['tags'].append('edited')\n"
        "        meta[i]['inner']['deep'][0] = -1\n"
        "        meta[i].pop('level')\n"
        "    p[0] = 'changed'\n    c.reverse()\n"
        "    return [0.0] * len(c)\n"
        "def recorder(p, c, numbers, meta, **k):\n"
        "    seen.append((list(p), list(c), numbers, meta))\n"
        "    return [0.0] * len(c)\n")
    import copy

    columns = {
        "numbers": [[3, 5], [1, 2]],
        "target": [15, 99],
        "meta": [{"tags": ["a"], "level": 1, "inner": {"deep": [1, 2]}},
                 {"tags": [], "level": 2, "inner": {"deep": [3]}}],
    }
    prompts, completions = ["p0", "p1"], ["<answer> 3 * 5 </answer>", "<answer> 1 </answer>"]
    original = copy.deepcopy((prompts, completions, columns))
    alone = score(prompts, completions, columns, load_rewards(["countdown"]), {})
    fns = load_rewards([f"{f}:editor", "countdown", f"{f}:recorder"])
    rw = score(prompts, completions, columns, fns, {})
    np.testing.assert_allclose(rw.columns["countdown"], alone.columns["countdown"])
    assert rw.means()["countdown"] == 0.5
    seen = fns[f"{f}:recorder"].__globals__["seen"]
    assert seen == [(original[0], original[1], original[2]["numbers"], original[2]["meta"])]
    assert (prompts, completions, columns) == original  # the caller's lists (the dataset) untouched


def test_os_exit_is_ours_again_after_a_reward(tmp_path):
    """The interception of os._exit/os.abort lasts only while user code runs."""
    import os

    exit_, abort = os._exit, os.abort
    f = tmp_path / "plain.py"
    f.write_text("import os\ndef r(p, c, **k):\n    assert os._exit.__module__ != 'posix'\n    return [1.0] * len(c)\n")
    score(["a"], ["x"], {}, load_rewards([f"{f}:r"]), {})
    assert os._exit is exit_ and os.abort is abort


def test_a_rewards_own_keyboard_interrupt_is_its_error_under_any_sigint_handler(tmp_path):
    """Before: under Python's default SIGINT handler (the evaluation before the first step, the
    final one, eval, reward) a reward's own KeyboardInterrupt was taken for the user's Ctrl-C;
    under training's handler it was the reward's error. Now it is the reward's error everywhere."""
    import signal

    f = tmp_path / "kbd.py"
    f.write_text("def r(p, c, **k):\n    raise KeyboardInterrupt\n")
    fns = load_rewards([f"{f}:r"])
    previous = signal.getsignal(signal.SIGINT)
    try:
        for handler in (signal.default_int_handler, lambda *_: None, signal.SIG_IGN):
            signal.signal(signal.SIGINT, handler)
            with pytest.raises(RewardError, match=f"reward {f}:r raised KeyboardInterrupt on sample 0"):
                score(["a"], ["x"], {}, fns, {})
            assert signal.getsignal(signal.SIGINT) is handler  # put back after the reward
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("body", [
    "    os.kill(os.getpid(), signal.SIGINT)\n    time.sleep(5)\n",
    # it catches the Ctrl-C and goes on, or turns it into another error: the user still asked to stop
    "    try:\n        os.kill(os.getpid(), signal.SIGINT)\n        time.sleep(5)\n    except KeyboardInterrupt:\n"
    "        pass\n    return [1.0] * len(c)\n",
    "    try:\n        os.kill(os.getpid(), signal.SIGINT)\n        time.sleep(5)\n    except KeyboardInterrupt:\n"
    "        raise ValueError('interrupted')\n",
], ids=["raised", "swallowed", "replaced"])
def test_a_real_ctrl_c_while_a_reward_runs_is_the_users(tmp_path, body):
    """A SIGINT that arrives while a reward runs, under Python's default handler, is an interrupt
    (``guard.CtrlC``, a KeyboardInterrupt), never the reward's error; at import too."""
    import signal

    from mlx_grpo.rewards.guard import CtrlC

    f = tmp_path / "ctrl_c.py"
    f.write_text("import os, signal, time\ndef r(p, c, **k):\n" + body)
    fns = load_rewards([f"{f}:r"])
    at_import = tmp_path / "ctrl_c_import.py"
    at_import.write_text("import os, signal, time\ndef r(p, c, **k):\n" + body + "r(None, [])\n")
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(CtrlC):
            score(["a"], ["x"], {}, fns, {})
        with pytest.raises(CtrlC):
            load_rewards([f"{at_import}:r"])
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
