"""GSM8K: grade-school math word problems (``openai/gsm8k`` on the Hub, or local files in its shape).

Rows are ``{"question": ..., "answer": "reasoning ... #### 72"}``; the reference is the number after
``####``. From the Hub (no ``data.path``), the ``main`` subset's ``train`` split trains and its
``test`` split is held out. ``data.path`` may instead name a local JSONL/Parquet file or a folder in
the Hub's layout (``main/train-00000-of-00001.parquet``), read by the same code.
"""

from __future__ import annotations

from ..config import DataConfig
from .files import DataError, Fields

HUB_ID = "openai/gsm8k"
FIELDS = Fields(prompt="question", answer="answer", delimiter="####")


def check_fields(cfg: DataConfig) -> None:
    """GSM8K's fields are fixed: a config naming others wants task ``dataset`` instead."""
    given = {"prompt_field": (cfg.prompt_field, "prompt"), "answer_field": (cfg.answer_field, "answer"),
             "answer_delimiter": (cfg.answer_delimiter, None)}
    wanted = {"prompt_field": FIELDS.prompt, "answer_field": FIELDS.answer, "answer_delimiter": FIELDS.delimiter}
    for key, (value, default) in given.items():
        if value not in (default, wanted[key]):
            raise DataError(
                f"data.{key}: task gsm8k reads question / answer / ####, got {value!r}; "
                "use data.task=dataset for other field names"
            )
