"""The documentation cannot drift from the repository: every relative link in README.md and
docs/ resolves (the file exists; a ``#anchor`` into a Markdown file names one of its headings, by
GitHub's anchor rules), every ``python cli.py COMMAND ...`` line in a code block uses only options
that the command's ``--help`` shows, and docs/config.md lists every config key with its default."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import typing
from functools import lru_cache
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import yaml

from mlx_grpo.config import Config

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").rglob("*.md"))

FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
INLINE_CODE = re.compile(r"(`+)(?:(?!\1)[^\n]|\n(?!\n))+?\1")  # a code span may wrap, not cross a paragraph


def _split(text: str) -> Tuple[List[str], List[str]]:
    """(prose lines, code-block lines) of a Markdown text."""
    prose, code, fence = [], [], None
    for line in text.splitlines():
        m = FENCE.match(line.strip())
        if m and (fence is None or line.strip().startswith(fence)):
            fence = m.group(1) if fence is None else None
            continue
        (code if fence else prose).append(line)
    return prose, code


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lowercase, punctuation other than '-' and '_' removed
    (inline code and link targets reduced to their text), spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())
    text = text.lower()
    text = "".join(c for c in text if c.isalnum() or c in " -_")
    return text.replace(" ", "-")


@lru_cache(maxsize=None)
def anchors(path: Path) -> frozenset:
    prose, _ = _split(path.read_text(encoding="utf-8"))
    seen: Dict[str, int] = {}
    out = set()
    for line in prose:
        m = re.match(r"^(#{1,6})\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        a = anchor(m.group(2))
        n = seen.get(a, 0)
        seen[a] = n + 1
        out.add(a if n == 0 else f"{a}-{n}")
    return frozenset(out)


def links(path: Path) -> List[str]:
    prose, _ = _split(path.read_text(encoding="utf-8"))
    text = INLINE_CODE.sub("", "\n".join(prose))
    return LINK.findall(text)


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc):
    bad = []
    for target in links(doc):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, frag = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            bad.append(f"{target}: {dest.relative_to(ROOT) if ROOT in dest.parents else dest} does not exist")
            continue
        if frag and dest.suffix == ".md" and frag not in anchors(dest):
            bad.append(f"{target}: no heading with anchor #{frag} in {dest.relative_to(ROOT)}")
    assert not bad, f"{doc.relative_to(ROOT)}:\n" + "\n".join(bad)


def test_the_link_checker_reads_github_anchors():
    assert anchor("The rewards lab: `cli.py reward`") == "the-rewards-lab-clipy-reward"
    assert anchor("Memory and `micro_batch`") == "memory-and-micro_batch"
    assert anchor("Memory on paper: Qwen2.5-0.5B 4-bit, G = 8, on a 16 GB Mac") == (
        "memory-on-paper-qwen25-05b-4-bit-g--8-on-a-16-gb-mac")
    assert links(ROOT / "README.md")  # the pattern finds links at all


# ---------------------------------------------------------------- commands in code blocks


def cli_lines() -> List[Tuple[str, str, str]]:
    """(document, command, the rest of the line) of every ``python cli.py COMMAND`` line in a
    code block; backslash continuations and indented synopsis continuations are joined."""
    out = []
    for doc in DOCS:
        _, code = _split(doc.read_text(encoding="utf-8"))
        joined: List[str] = []
        for line in code:
            if joined and (joined[-1].endswith("\\") or (line.startswith(" ") and "python cli.py" in joined[-1])):
                joined[-1] = joined[-1].rstrip("\\") + " " + line.strip()
            else:
                joined.append(line)
        for line in joined:
            line = re.sub(r"\s#.*$", "", line)  # a shell comment
            for m in re.finditer(r"python cli\.py\s+([a-z][a-z-]*)(.*?)(?=python cli\.py|$)", line):
                out.append((str(doc.relative_to(ROOT)), m.group(1), m.group(2)))
    return out


@lru_cache(maxsize=None)
def cli_help(command: str) -> str:
    r = subprocess.run([sys.executable, str(ROOT / "cli.py"), command, "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, f"cli.py {command} --help: {r.stderr.strip()}"
    return r.stdout


def test_every_readme_command_parses_with_the_cli():
    lines = cli_lines()
    assert any(doc == "README.md" for doc, _, _ in lines)
    bad = []
    for doc, command, rest in lines:
        shown = cli_help(command)
        for option in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest):
            if not re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", shown):
                bad.append(f"{doc}: python cli.py {command} ... {option}: not in `cli.py {command} --help`")
    assert not bad, "\n".join(sorted(set(bad)))


# ---------------------------------------------------------------- docs/config.md


def _defaults(obj: Any = None, prefix: str = "") -> Dict[str, Tuple[Any, Any]]:
    """Every key of the config: dotted name -> (default, type)."""
    obj = Config() if obj is None else obj
    hints = typing.get_type_hints(type(obj))
    out: Dict[str, Tuple[Any, Any]] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out.update(_defaults(value, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = (value, hints[f.name])
    return out


def _choices(tp: Any) -> Tuple[str, ...]:
    if typing.get_origin(tp) is typing.Literal:
        return typing.get_args(tp)
    for arg in typing.get_args(tp):  # Optional[...], List[Literal[...]]
        found = _choices(arg)
        if found:
            return found
    return ()


def test_config_reference_lists_every_key_with_its_default():
    rows = {}
    for line in (ROOT / "docs" / "config.md").read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\| `([a-z_.]+)` \| `(.*?)` \|(.*)\|$", line)
        if m:
            rows[m.group(1)] = (m.group(2), line)
    defaults = _defaults()
    assert sorted(set(defaults) - set(rows)) == [], "keys missing from docs/config.md"
    assert sorted(set(rows) - set(defaults)) == [], "docs/config.md lists keys the config does not have"
    for key, (value, tp) in defaults.items():
        shown, line = rows[key]
        documented = yaml.safe_load(shown)
        if key == "model.path":  # the embedded model, shown relative to the repository
            documented = str(ROOT / documented)
        assert documented == value, f"docs/config.md: {key} shows {shown}, the default is {value!r}"
        missing = [c for c in _choices(tp) if f"`{c}`" not in line]
        assert not missing, f"docs/config.md: {key} does not name its choices {missing}"
