"""Dataset rows from files: a JSONL or Parquet file, a folder laid out like a Hub dataset, or a Hub
dataset id (fetched by huggingface_hub into its cache, then read as that same folder).

No ``datasets`` library: a Hub dataset is a Git repository of data files, e.g. ``openai/gsm8k``
holds ``main/train-00000-of-00001.parquet`` and ``main/test-00000-of-00001.parquet``. A split's
files are those named after it (``train-*.parquet``, ``train.jsonl``) or kept in a folder named
after it (``train/0000.parquet``); ``subset`` picks the folder of one configuration (``main``).
Parquet needs the optional ``pyarrow`` (``pip install 'mlx-grpo[parquet]'``).

Errors are ``DataError`` with the file and line (JSONL), row (Parquet) or Hub id.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

from .. import hub
from ..errors import UserError, first_line

Row = Dict[str, Any]
DATA_SUFFIXES = (".jsonl", ".parquet")
_HUB_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


class DataError(UserError, ValueError):
    """Unusable data; the message names the file and line or the missing field."""


@dataclass(frozen=True)
class Fields:
    """Where a row keeps its question and reference answer.

    delimiter: keep only the text after its last occurrence in the answer (GSM8K's "####").
    """

    prompt: str = "prompt"
    answer: str = "answer"
    delimiter: Optional[str] = None


def iter_jsonl(path: str) -> Iterator[Tuple[int, Dict[str, Any]]]:
    """(line number, object) for every non-blank line of a JSONL file; errors name file:line."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{path}: data file not found")
    try:
        # Only \n ends a JSONL line: str.splitlines also splits at U+2028, U+0085 and other
        # characters a JSON string may hold as they are.
        # (utf-8-sig: a byte-order mark, as Windows editors write, is not part of line 1's JSON)
        lines = p.read_text(encoding="utf-8-sig").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: malformed JSON ({e.msg})") from None
        except RecursionError:  # json's parser recurses once per nested bracket
            raise DataError(f"{path}:{n}: malformed JSON (nested too deeply)") from None
        except ValueError as e:  # Python reads no int of over 4300 digits (not a JSONDecodeError)
            raise DataError(f"{path}:{n}: cannot read a number ({first_line(e)})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{n}: expected a JSON object")
        yield n, obj


def read_parquet(path: str) -> List[Dict[str, Any]]:
    """The rows of a Parquet file as dicts (needs pyarrow)."""
    if not Path(path).is_file():
        raise DataError(f"{path}: data file not found")
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"{path}: reading Parquet needs pyarrow: pip install 'mlx-grpo[parquet]' (or pyarrow)"
        ) from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # not Parquet, truncated, ...: one line, named
        first = first_line(e)
        raise DataError(f"{path}: cannot read Parquet ({first})") from None


def iter_records(path: str) -> Iterator[Tuple[str, Dict[str, Any]]]:
    """(where, object) for each record of a JSONL or Parquet file; ``where`` is file:line or
    "file: row N", for error messages. Files not named .parquet are read as JSONL."""
    if str(path).endswith(".parquet"):
        for i, obj in enumerate(read_parquet(path), start=1):
            yield f"{path}: row {i}", obj
    else:
        for n, obj in iter_jsonl(path):
            yield f"{path}:{n}", obj


def _text(value: Any, where: str, field: str, key: str) -> str:
    """A prompt or an answer as text: a string as it is, a finite number as Python writes it; any
    other value (null, an object, a list, true, NaN) a DataError naming the row and the field,
    which would otherwise become the question "None" or a Python repr."""
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and math.isfinite(value):  # (json reads NaN, Infinity and 1e400)
        return str(value)
    raise DataError(f"{where}: field {field!r} ({key}) must be a string or a number, got {_json_kind(value)}")


def _json_kind(value: Any) -> str:
    """How a value that is not text reads in JSON terms: null, an object, a list, true, NaN."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, float):
        return json.dumps(value)  # NaN, Infinity, -Infinity
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, (list, tuple)):
        return "a list"
    return f"a {type(value).__name__}"  # Parquet: bytes, a date...


def make_row(obj: Dict[str, Any], where: str, fields: Fields) -> Row:
    """One record renamed to {"prompt", "answer", ...other fields}. The prompt and the answer are
    strings or numbers; a null (or absent) answer is a row without a reference answer (a Parquet
    column holds null where a row has none): the accuracy reward leaves it unscored."""
    if fields.prompt not in obj:
        raise DataError(f"{where}: missing field {fields.prompt!r} (data.prompt_field)")
    row = {k: v for k, v in obj.items() if k not in (fields.prompt, fields.answer)}
    row["prompt"] = _text(obj[fields.prompt], where, fields.prompt, "data.prompt_field")
    if fields.answer in obj:
        answer = obj[fields.answer]
        if answer is not None:
            answer = _text(answer, where, fields.answer, "data.answer_field")
            if fields.delimiter and fields.delimiter in answer:
                answer = answer.rsplit(fields.delimiter, 1)[1].strip()
        row["answer"] = answer
    return row


def read_rows(path: str, fields: Fields) -> List[Row]:
    """The rows of one JSONL or Parquet file; an empty file is an error."""
    rows = [make_row(obj, where, fields) for where, obj in iter_records(path)]
    if not rows:
        raise DataError(f"{path}: no rows (empty dataset)")
    return rows


def read_jsonl(
    path: str, prompt_field: str, answer_field: str, answer_delimiter: Optional[str] = None
) -> List[Row]:
    """Rows of a JSONL (or Parquet) file, renamed to prompt/answer; errors name the file and line.

    With ``answer_delimiter`` (GSM8K's "####"), the reference is the text after its last occurrence.
    """
    return read_rows(path, Fields(prompt_field, answer_field, answer_delimiter))


def is_hub_id(path: str) -> bool:
    """``owner/name`` that is not a local path or a data file name."""
    return (
        not Path(path).exists()
        and _HUB_ID_RE.fullmatch(path) is not None
        and not path.endswith(DATA_SUFFIXES)
    )


def hub_snapshot(repo_id: str, revision: Optional[str] = None, subset: Optional[str] = None) -> Path:
    """The local folder of a Hub dataset's data files (only ``subset``'s when given), downloaded
    by huggingface_hub (or found in its cache; HF_HUB_OFFLINE=1 uses the cache only)."""
    from huggingface_hub import snapshot_download

    where = [f"{subset}/", f"*/{subset}/"] if subset else [""]
    try:
        with hub.contacting(f"dataset {repo_id}"):
            folder = snapshot_download(
                repo_id, repo_type="dataset", revision=revision,
                allow_patterns=[f"{w}*{s}" for w in where for s in DATA_SUFFIXES],
            )
    except Exception as e:  # offline, unknown repo, gated, no answer: one line, named
        first = hub.unreachable(e) or first_line(e)
        raise DataError(f"data.path: cannot load Hub dataset {repo_id}: {first}") from None
    return Path(folder)


def split_files(root: Path, split: str, subset: Optional[str], where: str) -> List[Path]:
    """The data files of ``split`` (of configuration ``subset``) in a folder laid out like a Hub
    dataset; errors name ``where`` (the folder or Hub id) and what was found."""
    files = sorted(
        p for p in root.rglob("*")
        if p.is_file() and p.name.endswith(DATA_SUFFIXES)
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if subset:
        files = [p for p in files if subset in p.relative_to(root).parts[:-1]]

    def in_split(p: Path) -> bool:
        rel = p.relative_to(root)
        stem = p.name.split(".")[0]
        return split in rel.parts[:-1] or stem == split or stem.startswith(f"{split}-")

    chosen = [p for p in files if in_split(p)]
    if not chosen:
        names = ", ".join(str(p.relative_to(root)) for p in files[:8]) or "no .jsonl/.parquet files"
        of = f" of subset {subset!r}" if subset else ""
        raise DataError(f"{where}: no files for split {split!r}{of} (found: {names})")
    tops = {p.relative_to(root).parts[0] for p in chosen if len(p.relative_to(root).parts) > 1}
    if not subset and len(tops) > 1 and split not in tops:
        raise DataError(
            f"{where}: split {split!r} is in several subsets ({', '.join(sorted(tops))}); "
            "choose one with data.subset"
        )
    return chosen


def dataset_root(path: str, revision: Optional[str], subset: Optional[str] = None) -> Optional[Path]:
    """The folder to look for split files in: ``path`` itself, a Hub snapshot, or None for a file."""
    if Path(path).is_dir():
        return Path(path)
    if is_hub_id(path):
        return hub_snapshot(path, revision, subset)
    return None


def read_split(root: Path, split: str, subset: Optional[str], fields: Fields, where: str) -> List[Row]:
    """All rows of one split of a dataset folder."""
    return [row for f in split_files(root, split, subset, where) for row in read_rows(str(f), fields)]
