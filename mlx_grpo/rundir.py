"""The run directory: every file name of a run, the checks before a run writes into it, its
preparation, log truncation on resume (only where a checkpoint's state agrees with the logs), and
the summary. Also the check of any other output file (never an input or a run's file) and its
writing (``atomic_write``: a FIFO, a device or a link is written through, never replaced).

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
* ``--overwrite`` removes only what the manifest lists;
* a manifest proves only its own directory: it names it (the resolved path, and the device and
  inode, which a rename keeps), so one copied into another directory (with or without a run's
  files) is not trusted there, and the files it lists count as files we did not write;
* a filesystem root or the user's home directory is never a run directory.

Every check here changes nothing on disk, so a refused run leaves the directory as it was.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from .errors import UserError, shown

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
STEP_DIR = re.compile(r"^step_(\d+)$")  # a complete checkpoint in checkpoints/: step_NNNNNN


class RunDirError(UserError, ValueError):
    """An output path that cannot be used; the message names the path and what to do."""


def _nearest_existing(path: Path, key: str) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        if path.is_symlink():  # mkdir would fail on it, after the checks said yes
            raise RunDirError(f"{key}: cannot create {path}: a broken symbolic link (to {os.readlink(path)})")
        path = path.parent
    return path


def check_path_length(path: str | Path, key: str) -> None:
    """Raise RunDirError (naming ``key``) when a name in ``path`` or the whole of it is longer than
    the filesystem allows (NAME_MAX, PATH_MAX of its nearest existing folder): before it, even
    ``Path.exists`` raises ENAMETOOLONG. Says the lengths, not the path (it may be kilobytes)."""
    full = os.path.abspath(path)
    name_max, path_max = _length_limits(full)
    for part in Path(full).parts:
        if len(os.fsencode(part)) > name_max:
            raise RunDirError(f"{key}: a name in the path is {len(os.fsencode(part))} bytes long, the "
                              f"filesystem allows {name_max} ({shown(part)})")
    if len(os.fsencode(full)) >= path_max:
        raise RunDirError(f"{key}: the path is {len(os.fsencode(full))} bytes long, the filesystem "
                          f"allows {path_max - 1} ({shown(full)})")


def _length_limits(full: str) -> Tuple[int, int]:
    """NAME_MAX and PATH_MAX where ``full`` would be created; POSIX's usual 255 and 4096 where
    the system will not say."""
    base = full
    while not os.path.isdir(base) and base != os.path.dirname(base):  # isdir: False on ENAMETOOLONG
        base = os.path.dirname(base)
    try:
        return os.pathconf(base, "PC_NAME_MAX"), os.pathconf(base, "PC_PATH_MAX")
    except (OSError, ValueError):
        return 255, 4096


def check_named(path: str | Path, key: str, what: str) -> None:
    """Raise RunDirError naming ``key`` when ``path`` is empty or blank: an unset shell variable
    (``--config "$CFG"``), which would otherwise read as no path given. ``what`` says what to name
    ("a file", "a directory"). Every path a command takes is asked here (``cli.PathText``)."""
    if not str(path).strip():
        raise RunDirError(f"{key}: empty path (an unset shell variable?); name {what}")


def check_writable_dir(path: str | Path, key: str) -> None:
    """Raise RunDirError (naming ``key``) unless ``path`` is, or can be created as, a directory
    this process may write in. Creates nothing."""
    check_named(path, key, "a directory")
    check_path_length(path, key)
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise RunDirError(f"{key}: {p} is a file, not a directory")
    base = _nearest_existing(p, key)
    if not base.is_dir():
        raise RunDirError(f"{key}: cannot create {p}: {base} is a file, not a directory")
    # To create in a folder needs write and search; to look into the directory itself, read too.
    mode = os.W_OK | os.X_OK | (os.R_OK if p.is_dir() else 0)
    if not os.access(base, mode):
        raise RunDirError(f"{key}: cannot write in {base} ({_why_not_writable(base)})")


def _why_not_writable(path: Path) -> str:
    """Why ``os.access`` said no: a read-only filesystem (root included) or the permissions."""
    try:
        read_only = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    return "read-only file system" if read_only else "permission denied"


def check_output_file(path: str | Path, key: str, inputs: Sequence[Tuple[str, Optional[str | Path]]] = ()) -> None:
    """Raise RunDirError unless ``path`` can be written as a file (its folders created as needed)
    without replacing what the command reads (``inputs``: (what, path) pairs, e.g. ("the
    --completions file", PATH)) or a file a run owns (``owning_run``). Called before any work (and
    before any input is read), so a long job never ends unable to save its result, or having
    written over what it read."""
    check_named(path, key, "a file")
    check_path_length(path, key)
    p = Path(path)
    if p.is_dir():
        raise RunDirError(f"{key}: {p} is a directory, not a file")
    if p.is_symlink() and not p.exists():  # writing through it fails, after the work
        raise RunDirError(f"{key}: cannot write {p}: a broken symbolic link (to {os.readlink(p)})")
    for what, source in inputs:
        if source and _same_file(p, source):
            raise RunDirError(f"{key}: {path} is {what}; it would be replaced")  # (as given: ./ kept)
    owner = owning_run(p)
    if owner is not None:
        raise RunDirError(f"{key}: {path} belongs to the run in {owner[0]} (a run owns its {owner[1]}); writing "
                          "it would replace the run's file; choose another path")
    # A link's target is what atomic_write replaces (beside it); a FIFO or device is written through.
    target = Path(os.path.realpath(p)) if p.is_symlink() else p
    if target.exists() and not target.is_file():
        if not os.access(target, os.W_OK):
            raise RunDirError(f"{key}: cannot write {p} (permission denied)")
        return
    try:
        check_writable_dir(target.parent, key)
    except RunDirError as e:  # the same reason, said of the file asked for
        raise RunDirError(f"{key}: cannot write {p}: {str(e).split(': ', 1)[1]}") from None


def _same_file(a: str | Path, b: str | Path) -> bool:
    """Whether ``a`` and ``b`` are one file (through links, hard links included); False when
    either does not exist."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def owning_run(path: str | Path) -> Optional[Tuple[Path, str]]:
    """The run directory that owns ``path`` and the entry it owns it by (a file or folder its
    manifest lists, or the manifest), or None. Checked as written and through symbolic links: a
    run's files are only ever written by the run."""
    for p in {Path(os.path.abspath(path)), Path(os.path.realpath(path))}:
        for d in p.parents:
            name = p.relative_to(d).parts[0]
            if name in _owned_names(d):
                return d, name
    return None


def _owned_names(d: Path) -> List[str]:
    """The entries of ``d`` a run owns: those its manifest lists and the manifest; for a run from
    before manifests, or whose manifest proves nothing here (copied with the run), every name a
    run writes, where a checkpoint shows it is a run (as for --resume)."""
    names = read_manifest(d)
    if not names and _holds_checkpoint(d):
        names = list(RUN_FILES)
    return [MANIFEST, *names] if names else []


def _holds_checkpoint(d: Path) -> bool:
    """Whether ``d`` holds a complete checkpoint (checkpoints/step_N/): a run's directory."""
    try:
        return any(STEP_DIR.match(e.name) and e.is_dir() for e in os.scandir(d / CHECKPOINTS))
    except OSError:  # no checkpoints/ (or not readable): not a run
        return False


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> None:
    """Write ``path`` by ``write(p)``, replacing only regular files: a regular file (or a new path)
    is written to a temporary file beside it, then renamed over it, so it is never half-written; a
    symbolic link gets its target written that way (the link stays a link); a FIFO or a device node
    (``/dev/null``) is written through, by ``write(path)`` itself, since a rename would replace the
    node with a regular file."""
    target = Path(os.path.realpath(path))
    if target.exists() and not target.is_file():
        write(Path(path))
        return
    # The temporary name keeps the suffix: mx.save_safetensors appends one when it is missing.
    tmp = target.with_name(f".tmp{os.getpid()}-{target.name}")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def _manifest(out: Path) -> Optional[Dict[str, Any]]:
    """The manifest in ``out`` when it is one of ours (whatever directory it names); None when there
    is none, or it is unreadable or not ours."""
    try:
        data = json.loads((Path(out) / MANIFEST).read_text())
    except (OSError, ValueError, RecursionError):  # (RecursionError: 100 k nested brackets)
        return None
    return data if isinstance(data, dict) and data.get("written_by") == "mlx-grpo" else None


def _identity(out: Path) -> Dict[str, Any]:
    """What names a directory in its manifest: its resolved path, and its device and inode (a
    rename or a move within the filesystem keeps them; a copy gets new ones)."""
    st = os.stat(out)
    return {"dir": os.path.realpath(out), "device": st.st_dev, "inode": st.st_ino}


def _names_here(data: Mapping[str, Any], out: Path) -> bool:
    """Whether the manifest ``data`` found in ``out`` was written for ``out``: its path, or its
    device and inode (a run directory renamed or moved), are ``out``'s."""
    if "dir" not in data:
        # A manifest from before manifests named their directory cannot tell a copy from the
        # original. It is trusted only where a complete checkpoint shows a run lives here (the
        # proof --resume takes for a run from before manifests); elsewhere it is foreign, since a
        # copied one must not let --overwrite delete the user's files. Such a run's own files are
        # then refused by --overwrite, never deleted; --resume writes it a new manifest.
        return _holds_checkpoint(out)
    try:
        here = _identity(out)
    except OSError:
        return False
    return data.get("dir") == here["dir"] or (
        [data.get("device"), data.get("inode")] == [here["device"], here["inode"]])


def read_manifest(out: Path) -> List[str]:
    """The names the run in ``out`` wrote, per its manifest; [] when there is none, or it is not
    ours (an unreadable manifest proves nothing), or it was written for another directory (a
    copied manifest proves nothing either)."""
    data = _manifest(out)
    if data is None or not _names_here(data, Path(out)):
        return []
    files = data.get("files")
    return [f for f in files if f in RUN_FILES] if isinstance(files, list) else []


def _distrusted(out: Path) -> Optional[str]:
    """Why a manifest of ours in ``out`` proves nothing there (for an error message), or None."""
    data = _manifest(out)
    if data is None or _names_here(data, Path(out)):
        return None
    if "dir" not in data:
        return f"its {MANIFEST} names no directory (an older one) and no checkpoint shows a run here"
    return f"its {MANIFEST} was written for {data['dir']}: a copy proves nothing"


def write_manifest(out: Path) -> None:
    """Record that the run in ``out`` owns RUN_FILES, naming ``out`` itself (atomically; before it
    writes any of them)."""
    from . import __version__

    tmp = Path(out) / f"{MANIFEST}.tmp{os.getpid()}"
    data = {"written_by": "mlx-grpo", "version": __version__, "files": list(RUN_FILES), **_identity(Path(out))}
    tmp.write_text(json.dumps(data) + "\n")
    os.replace(tmp, Path(out) / MANIFEST)


def _homes() -> List[Path]:
    """The user's home directory, resolved: as ``$HOME`` says and as the password database says."""
    found = {os.path.realpath(os.path.expanduser("~"))}
    try:
        import pwd

        found.add(os.path.realpath(pwd.getpwuid(os.getuid()).pw_dir))
    except (ImportError, KeyError, OSError):  # no pwd (Windows), or a uid without an entry
        pass
    return [Path(h) for h in found]


def check_own_directory(path: str | Path, key: str) -> None:
    """Raise RunDirError (naming ``key`` and ``path``) when ``path`` resolves to a filesystem root
    or the user's home directory: a run writes its files at the top of its directory and
    ``--overwrite`` removes them there, so it needs a directory of its own."""
    real = Path(os.path.realpath(path))
    if real.parent == real:
        what = "the filesystem root"
    elif real in _homes():
        what = "your home directory"
    else:
        return
    shown_as = str(path) if str(path) == str(real) else f"{path} ({real})"
    raise RunDirError(f"{key}: {shown_as} is {what}; a run needs a directory of its own, e.g. "
                      f"{real / 'runs' / 'NAME'}")


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
    check_own_directory(out, "output.dir")
    out = Path(out)
    if not out.is_dir():
        return
    manifest = out / MANIFEST
    if manifest.exists() and not manifest.is_file():  # ours to replace only when it is a file
        raise RunDirError(f"output.dir: {manifest} is not a file (mlx-grpo's manifest is); choose another --output")
    foreign = foreign_files(out)
    clash = [f for f in foreign if f in RUN_FILES]
    why = _distrusted(out) or f"no {MANIFEST} lists it"
    if clash:
        raise RunDirError(
            f"output.dir: {out / clash[0]} was not written by mlx-grpo ({why}) and a run "
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
    """A resumed run gets a manifest naming its directory when it has none (it predates them), one
    that names no directory (from before they did) or one written for another directory (a copied
    run): its checkpoint, which the resume loads, shows that the run is ours."""
    data = _manifest(Path(out))  # (None too for one that is not ours, or not a file: kept as it is)
    stale = data is not None and ("dir" not in data or not _names_here(data, Path(out)))
    if not (Path(out) / MANIFEST).exists() or stale:
        write_manifest(Path(out))
        return Path(out) / MANIFEST
    return None


def log_sizes(out: Path) -> Dict[str, int]:
    """The bytes of each log now (a checkpoint stores them: resume cuts the logs back to them)."""
    return {n: (Path(out) / n).stat().st_size if (Path(out) / n).exists() else 0 for n in LOGS}


def _step_of(line: bytes) -> Optional[int]:
    """The step of a training-step record (a train line of metrics.jsonl, any line of
    samples.jsonl); None for an evaluation or warning record, or a line that is no record."""
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        return None
    step = obj.get("step") if isinstance(obj, dict) and obj.get("kind", "train") == "train" else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def _steps_around(data: bytes, cut: int) -> Tuple[Optional[int], Optional[int]]:
    """The step of the last training-step record before byte ``cut`` (a line boundary) of a log,
    and of the first one after it; None where there is none."""
    before, end = None, cut
    while before is None and end > 0:
        start = data.rfind(b"\n", 0, end - 1) + 1
        before, end = _step_of(data[start:end]), start
    after, start = None, cut
    while after is None and start < len(data):
        end = data.find(b"\n", start)
        end = len(data) if end < 0 else end + 1
        after, start = _step_of(data[start:end]), end
    return before, after


def _cut_disagrees(path: Path, size: int, step: int) -> Optional[str]:
    """Why cutting the log ``path`` back to ``size`` bytes would not leave exactly the records of
    steps 1..``step`` (None when it would): the file is shorter, the cut falls inside a line, the
    part kept does not reach ``step`` or goes past it, or a record of ``step`` lies after the cut."""
    data = path.read_bytes() if path.exists() else b""
    if size > len(data):
        what = "missing" if not path.exists() else f"{len(data)} bytes"
        return f"{path} is {what}, shorter than at the checkpoint ({size} bytes)"
    if size and data[size - 1 : size] != b"\n":
        return f"{size} bytes of {path} end in the middle of a line"
    before, after = _steps_around(data, size)
    if (before or 0) != step:
        reached = f"end at step {before}" if before is not None else "hold no training step"
        return f"the first {size} bytes of {path} {reached}; the checkpoint is at step {step}"
    if after is not None and after <= step:
        return f"{path} holds a record of step {after} after byte {size}: the cut would drop part of step {after}"
    return None


def check_log_sizes(out: Path, sizes: Mapping[str, int], step: int, where: str | Path) -> None:
    """Raise RunDirError (naming ``where``, the checkpoint's state.json, and the log) unless cutting
    each log back to ``sizes`` keeps exactly the steps 1..``step`` the checkpoint holds: a state
    that disagrees with the logs it describes (no size for a log, a size past its end or inside a
    line, a step the kept part does not reach) would erase the run's history. Changes nothing."""
    for name in LOGS:
        if name not in sizes:
            raise RunDirError(f"{where}: log_sizes has no size for {name}, so resume cannot tell where "
                              f"to cut {Path(out) / name}; nothing was changed")
        why = _cut_disagrees(Path(out) / name, sizes[name], step)
        if why:
            raise RunDirError(f"{where}: log_sizes.{name} disagrees with the log: {why}; nothing was changed")


def truncate_logs(out: Path, sizes: Mapping[str, int], step: int, where: str | Path) -> None:
    """Cut metrics.jsonl and samples.jsonl back to ``sizes`` (their size at the checkpoint of
    ``step``, whose state.json is ``where``), so the steps the resumed run repeats (and any
    half-written line of a killed run) are not in them twice.

    Every log is checked before any is cut (``check_log_sizes``), so a refused resume changes
    nothing, and no cut ever falls inside a line or below the checkpoint's own step."""
    check_log_sizes(out, sizes, step, where)
    for name in LOGS:
        if (Path(out) / name).exists():
            os.truncate(Path(out) / name, sizes[name])


def resume_run_dir(out: Path, sizes: Mapping[str, int], step: int, where: str | Path) -> None:
    """Make ``out`` ready to continue from the checkpoint of ``step`` (state file ``where``): logs cut
    back to ``sizes``, a manifest for a directory that predates them, and no summary (it described
    the run before this resume)."""
    truncate_logs(out, sizes, step, where)
    adopt_run_dir(out)
    (Path(out) / SUMMARY).unlink(missing_ok=True)


def write_summary(out: Path, summary: Dict[str, Any]) -> None:
    """summary.json: the finished run's figures (its presence marks the run as done)."""
    (Path(out) / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")
