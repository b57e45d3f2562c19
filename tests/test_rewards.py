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


@pytest.mark.parametrize("body,msg", [
    ("def r(p, c, **k):\n    raise RuntimeError('boom')\n", "raised RuntimeError: boom"),
    ("def r(p, c, **k):\n    return [1.0]\n", "returned 1 values for 2 completions"),
    ("def r(p, c, **k):\n    return [float('nan'), 1.0]\n", "returned nan for sample 0"),
    ("def r(p, c, **k):\n    return ['x', 1.0]\n", "not a number"),
])
def test_broken_rewards_stop_with_their_name(tmp_path, body, msg):
    f = tmp_path / "bad.py"
    f.write_text(body)
    fns = load_rewards([f"{f}:r"])
    with pytest.raises(RewardError) as e:
        score(["a", "b"], ["x", "y"], {}, fns, {})
    assert f"{f}:r" in str(e.value) and msg in str(e.value)


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
