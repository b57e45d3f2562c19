"""The run directory: every file name of a run, the checks before a run writes into it, its
preparation, log truncation on resume, and the summary. Also the check of any other output file.

A run's directory holds (``RUN_FILES``; the names below are the only place they are spelled):

    .mlx-grpo-run                              the manifest: which of these names this run owns
    config.yaml                                the resolved config
    metrics.jsonl, samples.jsonl               the logs (runlog.py writes them)
    summary.json                               written when the run finishes
    adapters.safetensors, adapter_config.json  the trained weights (mlx-lm's layout)
    checkpoints/step_NNNNNN/                   checkpoints (checkpoint.py)
    tensorboard/, wandb/                       the optional trackers' files (loggers.py)

A run records what it owns in the manifest, written before any other file of the run. A file in
an output directory is ours only when that manifest lists its name: names alone prove nothing,
since mlx-lm's LoRA training writes ``adapters.safetensors`` and ``adapter_config.json`` too. So:

* a directory holding files the manifest does not list is refused without ``--overwrite``; with
  it, those files are kept and the run is written next to them;
* a file we did not write that a run would replace (an mlx-lm ``adapters.safetensors``) is
  refused even with ``--overwrite``;
* ``--overwrite`` removes only what the manifest lists.

Every check here changes nothing on disk, so a refused run leaves the directory as it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

from .errors import UserError

MANIFEST = ".mlx-grpo-run"
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SAMPLES = "samples.jsonl"
SUMMARY = "summary.json"
ADAPTERS = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
CHECKPOINTS = "checkpoints"
LOGS = (METRICS, SAMPLES)  # appended to step by step; cut back to a checkpoint's sizes on resume
# Everything a run writes at the top of its directory (the trainer, checkpoints and trackers).
RUN_FILES = (CONFIG, METRICS, SAMPLES, SUMMARY, ADAPTERS, ADAPTER_CONFIG, CHECKPOINTS, "tensorboard", "wandb")


class RunDirError(UserError, ValueError):
    """An output path that cannot be used; the message names the path and what to do."""


def _nearest_existing(path: Path, key: str) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        if path.is_symlink():  # mkdir would fail on it, after the checks said yes
            raise RunDirError(f"{key}: cannot create {path}: a broken symbolic link (to {os.readlink(path)})")
        path = path.parent
    return path


def check_writable_dir(path: str | Path, key: str) -> None:
    """Raise RunDirError (naming ``key``) unless ``path`` is, or can be created as, a directory
    this process may write in. Creates nothing."""
    if not str(path).strip():
        raise RunDirError(f"{key}: empty path (an unset shell variable?); name a directory")
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise RunDirError(f"{key}: {p} is a file, not a directory")
    base = _nearest_existing(p, key)
    if not base.is_dir():
        raise RunDirError(f"{key}: cannot create {p}: {base} is a file, not a directory")
    # To create in a folder needs write and search; to look into the directory itself, read too.
    mode = os.W_OK | os.X_OK | (os.R_OK if p.is_dir() else 0)
    if not os.access(base, mode):
        raise RunDirError(f"{key}: cannot write in {base} (permission denied)")


def check_output_file(path: str | Path, key: str) -> None:
    """Raise RunDirError unless ``path`` can be written as a file (its folders created as needed).
    Called before any work, so a long job never ends unable to save its result."""
    if not str(path).strip():
        raise RunDirError(f"{key}: empty path (an unset shell variable?); name a file")
    p = Path(path)
    if p.is_dir():
        raise RunDirError(f"{key}: {p} is a directory, not a file")
    if p.is_symlink() and not p.exists():  # writing through it fails, after the work
        raise RunDirError(f"{key}: cannot write {p}: a broken symbolic link (to {os.readlink(p)})")
    try:
        check_writable_dir(p.parent, key)
    except RunDirError as e:  # the same reason, said of the file asked for
        raise RunDirError(f"{key}: cannot write {p}: {str(e).split(': ', 1)[1]}") from None


def read_manifest(out: Path) -> List[str]:
    """The names the run in ``out`` wrote, per its manifest; [] when there is none (or it is not
    ours: an unreadable manifest proves nothing)."""
    try:
        data = json.loads((Path(out) / MANIFEST).read_text())
    except (OSError, ValueError):
        return []
    files = data.get("files") if isinstance(data, dict) and data.get("written_by") == "mlx-grpo" else None
    return [f for f in files if f in RUN_FILES] if isinstance(files, list) else []


def write_manifest(out: Path) -> None:
    """Record that the run in ``out`` owns RUN_FILES (atomically; before it writes any of them)."""
    from . import __version__

    tmp = Path(out) / f"{MANIFEST}.tmp{os.getpid()}"
    tmp.write_text(json.dumps({"written_by": "mlx-grpo", "version": __version__, "files": list(RUN_FILES)}) + "\n")
    os.replace(tmp, Path(out) / MANIFEST)


def foreign_files(out: Path) -> List[str]:
    """Entries of ``out`` that no manifest says we wrote, sorted."""
    ours = set(read_manifest(out)) | {MANIFEST}
    return sorted(e for e in os.listdir(out) if e not in ours)


def _listing(names: Sequence[str], limit: int = 4) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_run_dir(out: str | Path, overwrite: bool) -> None:
    """Refuse an output directory that cannot take a new run (changes nothing):

    not writable; holds a run of ours (unless ``overwrite``); holds files we did not write
    (unless ``overwrite``); holds a file we did not write under a name the run would replace
    (always: ``--overwrite`` never touches other files).
    """
    check_writable_dir(out, "output.dir")
    out = Path(out)
    if not out.is_dir():
        return
    manifest = out / MANIFEST
    if manifest.exists() and not manifest.is_file():  # ours to replace only when it is a file
        raise RunDirError(f"output.dir: {manifest} is not a file (mlx-grpo's manifest is); choose another --output")
    foreign = foreign_files(out)
    clash = [f for f in foreign if f in RUN_FILES]
    if clash:
        raise RunDirError(
            f"output.dir: {out / clash[0]} was not written by mlx-grpo (no {MANIFEST} lists it) and a run "
            "would replace it; choose another --output (--overwrite never removes files it did not write)"
        )
    if overwrite:
        return
    if any((out / name).exists() for name in read_manifest(out)):
        raise RunDirError(
            f"output.dir: {out} already holds a run; continue it with --resume {out}, "
            "replace it with --overwrite, or choose another --output"
        )
    if foreign:
        raise RunDirError(
            f"output.dir: {out} holds files mlx-grpo did not write ({_listing(foreign)}); choose a new "
            "or empty --output, or pass --overwrite to write the run next to them (they are kept)"
        )


def prepare_run_dir(out: str | Path, overwrite: bool) -> None:
    """Create the run directory and its manifest; with ``overwrite``, first remove what the
    previous run wrote (so a later --resume cannot pick up a checkpoint of the replaced run)."""
    check_run_dir(out, overwrite)
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # what no check foresees (/proc, a full disk, a race)
        raise RunDirError(f"output.dir: cannot create {out}: {e.strerror or e}") from None
    if overwrite:
        for name in read_manifest(out):
            _remove(out / name, only=_CHECKPOINT_ENTRY if name == CHECKPOINTS else None)
    write_manifest(out)


# What a run writes inside checkpoints/: step directories and the hidden ones of a save in progress.
_CHECKPOINT_ENTRY = re.compile(r"^(step_\d+|\.tmp-step_\d+-\d+|\.old-step_\d+-\d+)$")


def _remove(path: Path, only: Optional[re.Pattern] = None) -> None:
    """Delete ``path``; with ``only``, a directory keeps the entries it does not match (a file a
    user put among our checkpoints stays, and so does the directory then)."""
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        path.unlink()
    elif path.is_dir() and only is None:
        shutil.rmtree(path)
    elif path.is_dir():
        for entry in path.iterdir():
            if only.match(entry.name):
                _remove(entry)
        if not any(path.iterdir()):
            path.rmdir()


def adopt_run_dir(out: str | Path) -> Optional[Path]:
    """A resumed run whose directory predates manifests gets one (its checkpoint shows it is ours)."""
    if not (Path(out) / MANIFEST).exists():
        write_manifest(Path(out))
        return Path(out) / MANIFEST
    return None


def log_sizes(out: Path) -> Dict[str, int]:
    """The bytes of each log now (a checkpoint stores them: resume cuts the logs back to them)."""
    return {n: (Path(out) / n).stat().st_size if (Path(out) / n).exists() else 0 for n in LOGS}


def truncate_logs(out: Path, sizes: Mapping[str, int]) -> None:
    """Cut metrics.jsonl and samples.jsonl back to ``sizes`` (their size at the checkpoint), so the
    steps the resumed run repeats (and any half-written line of a killed run) are not in them twice.

    Every log is checked before any is cut, so a refused resume changes nothing."""
    for name in LOGS:
        path = Path(out) / name
        size = sizes.get(name, 0)
        if not path.exists():
            if size:
                raise RunDirError(f"{path}: missing, but the checkpoint expects {size} bytes of it")
            continue
        if path.stat().st_size < size:
            raise RunDirError(f"{path}: shorter ({path.stat().st_size} bytes) than at the checkpoint ({size} bytes)")
    for name in LOGS:
        if (Path(out) / name).exists():
            os.truncate(Path(out) / name, sizes.get(name, 0))


def resume_run_dir(out: Path, sizes: Mapping[str, int]) -> None:
    """Make ``out`` ready to continue from a checkpoint: logs cut back to ``sizes``, a manifest for
    a directory that predates them, and no summary (it described the run before this resume)."""
    truncate_logs(out, sizes)
    adopt_run_dir(out)
    (Path(out) / SUMMARY).unlink(missing_ok=True)


def write_summary(out: Path, summary: Dict[str, Any]) -> None:
    """summary.json: the finished run's figures (its presence marks the run as done)."""
    (Path(out) / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
