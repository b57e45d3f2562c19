import json

import pytest

from mlx_grpo.config import DataConfig, ModelConfig
from mlx_grpo.tasks import DataError, columns, load_task, read_jsonl
from mlx_grpo.tasks.arithmetic import make_splits
from mlx_grpo.tasks.templates import R1_ZERO_PREAMBLE, PromptFormat, render_prompt


def test_arithmetic_splits_never_overlap_and_are_seeded():
    train, held = make_splits(29, 400, seed=0)
    assert len(held) == 400 and len(train) == 900 - 400
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert make_splits(29, 400, seed=0) == (train, held)
    assert make_splits(29, 400, seed=1)[1] != held
    a, b = map(int, held[0]["prompt"].split()[2::2][:2])
    assert held[0]["answer"] == str(a + b)


def test_r1_template_word_for_word():
    text = render_prompt("What is 1 + 2 ?", PromptFormat())
    assert text == R1_ZERO_PREAMBLE + " User: What is 1 + 2 ? Assistant: <think>"
    assert render_prompt("Solve x", PromptFormat(response_prefix="")).endswith("User: Solve x. Assistant:")


def test_chat_template(small_model_dir):
    from mlx_grpo.models import load_model

    _, tok = load_model(ModelConfig(path=str(small_model_dir)))
    text = render_prompt("What is 1 + 2 ?", PromptFormat(kind="chat", response_prefix=""), tok)
    assert text.startswith(R1_ZERO_PREAMBLE) and text.endswith("User: What is 1 + 2 ? Assistant:")
    bare = render_prompt("What is 1 + 2 ?", PromptFormat(kind="chat", system_prompt=""), tok)
    assert bare == "User: What is 1 + 2 ? Assistant: <think>"


def test_chat_without_template_is_a_clear_error():
    class NoTemplate:
        chat_template = None

    with pytest.raises(ValueError, match="no chat template"):
        render_prompt("q", PromptFormat(kind="chat"), NoTemplate())


def test_jsonl_fields_delimiter_and_split(tmp_path):
    p = tmp_path / "gsm.jsonl"
    rows = [{"question": f"q{i}", "answer": f"work {i} #### {i * 2}", "level": i % 3} for i in range(20)]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    data = load_task(DataConfig(task="jsonl", path=str(p), prompt_field="question",
                                answer_delimiter="####", eval_size=4))
    assert len(data.train) == 16 and len(data.held_out) == 4
    assert data.train[3] == {"prompt": "q3", "answer": "6", "level": 0}
    assert columns(data.train[:2]) == {"answer": ["0", "2"], "level": [0, 1]}


@pytest.mark.parametrize("text,msg", [
    ('{"prompt": "a"}\n[1, 2]\n', ":2: expected a JSON object"),
    ('{"question": "a"}\n', ":1: missing field 'prompt'"),
    ("\n\n", "no rows (empty dataset)"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, text, msg):
    p = tmp_path / "d.jsonl"
    p.write_text(text)
    with pytest.raises(DataError) as e:
        read_jsonl(str(p), "prompt", "answer")
    assert str(p) in str(e.value) and msg in str(e.value)
