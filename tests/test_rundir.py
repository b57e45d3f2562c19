"""The run directory and output paths: nothing of the user's is touched, and an output that
cannot be written is refused before any work starts. Real subprocesses, real files."""

import json
import os

import pytest

from conftest import one_line_error, run_cli, tree_hash
from mlx_grpo.rundir import (
    MANIFEST,
    RunDirError,
    check_output_file,
    check_run_dir,
    check_writable_dir,
    prepare_run_dir,
)

NO_BLAS = {"MLX_GRPO_NO_FAST_BLAS": "1"}  # these runs fail (or finish) in seconds: no BLAS restart


def tiny_run(model, out, *extra):
    """One cheap training step into ``out``."""
    return run_cli("train", "--model", str(model), "--output", str(out), "--steps", "1",
                   "--batch-size", "2", "-G", "2", "--max-tokens", "4", "--no-progress",
                   "--set", "output.eval_size=2", *extra, env=NO_BLAS)


def mlx_lm_output(d):
    """What mlx-lm's LoRA training leaves: the same file names as ours, not ours."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapters.safetensors").write_bytes(b"mlx-lm weights")
    (d / "adapter_config.json").write_text('{"fine_tune_type": "lora"}')
    (d / "0000100_adapters.safetensors").write_bytes(b"older weights")


def test_empty_output_is_refused_and_the_current_directory_untouched(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "mine.txt").write_text("not the project's")
    before = tree_hash(tmp_path)
    r = run_cli("train", "--output", "", "--overwrite", "--steps", "1", cwd=tmp_path, env=NO_BLAS)
    one_line_error(r, "output.dir: must name a directory (an unset shell variable?)")
    assert tree_hash(tmp_path) == before


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_mlx_lm_adapters_are_never_replaced(tmp_path, small_model_dir, overwrite):
    out = tmp_path / "lora"
    mlx_lm_output(out)
    before = tree_hash(out)
    r = tiny_run(small_model_dir, out, *(["--overwrite"] if overwrite else []))
    one_line_error(r, "was not written by mlx-grpo")
    assert tree_hash(out) == before


def test_foreign_files_refused_without_overwrite_kept_with_it(tmp_path, small_model_dir):
    out = tmp_path / "mixed"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    before = tree_hash(out)
    one_line_error(tiny_run(small_model_dir, out), "holds files mlx-grpo did not write (notes.txt)")
    assert tree_hash(out) == before
    r = tiny_run(small_model_dir, out, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert (out / "notes.txt").read_text() == "mine" and (out / "metrics.jsonl").is_file()


def test_overwrite_removes_only_what_the_run_wrote(tmp_path, small_model_dir):
    out = tmp_path / "run"
    assert tiny_run(small_model_dir, out).returncode == 0
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["written_by"] == "mlx-grpo" and "adapters.safetensors" in manifest["files"]
    # The user's files next to the run and among its checkpoints.
    (out / "notes.txt").write_text("mine")
    (out / "checkpoints" / "my-best.safetensors").write_bytes(b"kept")
    old_step = next((out / "checkpoints").glob("step_*"))
    (old_step / "state.json").write_text('{"marker": "the replaced run"}')
    one_line_error(tiny_run(small_model_dir, out), "already holds a run")
    r = tiny_run(small_model_dir, out, "--overwrite", "--set", "train.seed=7")
    assert r.returncode == 0, r.stderr
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "checkpoints" / "my-best.safetensors").read_bytes() == b"kept"
    assert "marker" not in (old_step / "state.json").read_text()  # the new run's checkpoint
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()
            if json.loads(x)["kind"] == "train"] == [1]


def _plot_run(d):
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "kind": "train", "reward_mean": 0.1 * s}) + "\n" for s in (1, 2)))
    return d


# Each command with an output that cannot be written: refused in one line before any work, and
# nothing written anywhere.
UNWRITABLE = [
    (["train", "--output", "{tmp}/afile/run", "--steps", "1"], "output.dir: cannot create {tmp}/afile/run: {tmp}/afile is a file"),
    (["train", "--output", "{tmp}/afile", "--steps", "1"], "output.dir: {tmp}/afile is a file, not a directory"),
    (["plot", "{tmp}/run", "--out", "{tmp}/afile/curves.png"], "--out: cannot write {tmp}/afile/curves.png: {tmp}/afile is a file"),
    (["plot", "{tmp}/run", "--out", "{tmp}/run"], "--out: {tmp}/run is a directory, not a file"),
    (["reward", "--completions", "{tmp}/c.jsonl", "--rewards", "format", "--out", "{tmp}/afile/s.jsonl"],
     "--out: cannot write {tmp}/afile/s.jsonl: {tmp}/afile is a file"),
    (["reward", "--completions", "{tmp}/c.jsonl", "--rewards", "format", "--out", "{tmp}/./c.jsonl"],
     "--out: {tmp}/./c.jsonl is the --completions file; it would be replaced"),
    (["bench", "--quick", "--out", "{tmp}/afile/bench.json"], "--out: cannot write {tmp}/afile/bench.json: {tmp}/afile is a file"),
    # an unset shell variable: refused, not the default (plot wrote RUN/curves.png before)
    (["plot", "{tmp}/run", "--out", ""], "--out: empty path (an unset shell variable?); name a file"),
    (["reward", "--completions", "{tmp}/c.jsonl", "--rewards", "format", "--out", ""], "--out: empty path"),
    (["bench", "--quick", "--out", ""], "--out: empty path"),
]


@pytest.mark.parametrize("args,msg", UNWRITABLE, ids=[" ".join(a[:1] + a[-2:-1]) + str(i) for i, (a, _) in enumerate(UNWRITABLE)])
def test_unwritable_output_refused_before_any_work(tmp_path, args, msg):
    (tmp_path / "afile").write_text("a regular file")
    (tmp_path / "c.jsonl").write_text('{"completion": "<think>x</think><answer>1</answer>"}\n')
    _plot_run(tmp_path / "run")
    before = tree_hash(tmp_path)
    r = run_cli(*[a.replace("{tmp}", str(tmp_path)) for a in args], env=NO_BLAS)
    one_line_error(r, msg.replace("{tmp}", str(tmp_path)))
    assert tree_hash(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        r = run_cli("train", "--output", str(ro / "run"), "--steps", "1", env=NO_BLAS)
        one_line_error(r, f"output.dir: cannot write in {ro} (permission denied)")
    finally:
        ro.chmod(0o755)


def test_permission_check_consults_the_nearest_existing_folder(tmp_path, monkeypatch):
    """The read-only case where the tests run as root (root may write anywhere): the check asks
    the OS about the nearest folder that exists, and refuses when the OS says no."""
    asked = []

    def access(path, mode):
        asked.append(os.fspath(path))
        return False

    monkeypatch.setattr(os, "access", access)
    with pytest.raises(RunDirError, match=f"output.dir: cannot write in {tmp_path} \\(permission denied\\)"):
        check_writable_dir(tmp_path / "a" / "b", "output.dir")
    assert asked == [str(tmp_path)]
    with pytest.raises(RunDirError, match="--out: cannot write .*permission denied"):
        check_output_file(tmp_path / "x.json", "--out")


def test_checks_change_nothing_and_prepare_writes_the_manifest_first(tmp_path):
    out = tmp_path / "new" / "run"
    check_run_dir(out, overwrite=False)
    assert not (tmp_path / "new").exists()
    prepare_run_dir(out, overwrite=False)
    assert os.listdir(out) == [MANIFEST]
    check_run_dir(out, overwrite=False)  # only a manifest: nothing to protect
    # An edited manifest cannot make us delete what a run never writes.
    edited = {**json.loads((out / MANIFEST).read_text()), "files": ["notes.txt", "config.yaml"]}
    (out / MANIFEST).write_text(json.dumps(edited))
    (out / "notes.txt").write_text("mine")
    (out / "config.yaml").write_text("x: 1")
    prepare_run_dir(out, overwrite=True)
    assert (out / "notes.txt").exists() and not (out / "config.yaml").exists()


def test_resume_adopts_a_run_from_before_manifests(tmp_path, small_model_dir):
    """Such a run's files count as foreign for --overwrite (nothing proves them ours), but its
    checkpoint does: --resume continues it and writes the manifest."""
    out = tmp_path / "old"
    assert tiny_run(small_model_dir, out).returncode == 0
    (out / MANIFEST).unlink()
    before = tree_hash(out)
    one_line_error(tiny_run(small_model_dir, out, "--overwrite"), "was not written by mlx-grpo")
    assert tree_hash(out) == before
    r = run_cli("train", "--resume", str(out), "--steps", "2", "--no-progress", env=NO_BLAS)
    assert r.returncode == 0, r.stderr
    assert "checkpoints" in json.loads((out / MANIFEST).read_text())["files"]


@pytest.mark.parametrize("below", ["", "/run"], ids=["the link", "under it"])
def test_output_through_a_broken_symlink_refused(tmp_path, below):
    """Before: the checks passed (nothing exists there) and mkdir ended in a FileExistsError traceback."""
    (tmp_path / "link").symlink_to(tmp_path / "nowhere" / "x")
    before = tree_hash(tmp_path)
    r = run_cli("train", "--output", f"{tmp_path}/link{below}", "--steps", "1", env=NO_BLAS)
    one_line_error(r, f"output.dir: cannot create {tmp_path}/link: a broken symbolic link (to {tmp_path}/nowhere/x)")
    assert tree_hash(tmp_path) == before and not (tmp_path / "nowhere").exists()


def test_a_manifest_that_is_a_directory_is_refused(tmp_path):
    """Before: os.replace onto it ended in an IsADirectoryError traceback."""
    (tmp_path / "run" / MANIFEST).mkdir(parents=True)
    (tmp_path / "run" / MANIFEST / "inside.txt").write_text("mine")
    before = tree_hash(tmp_path)
    for extra in ([], ["--overwrite"]):
        r = run_cli("train", "--output", str(tmp_path / "run"), "--steps", "1", *extra, env=NO_BLAS)
        one_line_error(r, f"output.dir: {tmp_path / 'run' / MANIFEST} is not a file")
    assert tree_hash(tmp_path) == before


def test_overwrite_follows_no_symlink_out_of_the_run(tmp_path, small_model_dir):
    """A run's checkpoints/ and metrics.jsonl replaced by links to the user's files elsewhere:
    --overwrite removes the links, never what they point to."""
    outside = tmp_path / "elsewhere"
    (outside / "step_000001").mkdir(parents=True)
    (outside / "step_000001" / "precious.txt").write_text("keep")
    (outside / "log.txt").write_text("keep too")
    out = tmp_path / "run"
    assert tiny_run(small_model_dir, out).returncode == 0
    import shutil
    shutil.rmtree(out / "checkpoints")
    (out / "checkpoints").symlink_to(outside)
    (out / "metrics.jsonl").unlink()
    (out / "metrics.jsonl").symlink_to(outside / "log.txt")
    before = tree_hash(outside)
    r = tiny_run(small_model_dir, out, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert tree_hash(outside) == before
    assert not (out / "checkpoints").is_symlink() and not (out / "metrics.jsonl").is_symlink()


@pytest.mark.parametrize("command", ["plot", "reward"])
def test_out_through_a_broken_symlink_refused_before_the_work(tmp_path, command):
    """Before: plot drew, then failed with '[Errno 2] No such file or directory' naming no option."""
    _plot_run(tmp_path / "run")
    (tmp_path / "c.jsonl").write_text('{"completion": "<think>x</think><answer>1</answer>"}\n')
    (tmp_path / "out").symlink_to(tmp_path / "nowhere" / "x")
    before = tree_hash(tmp_path)
    args = (["plot", str(tmp_path / "run")] if command == "plot"
            else ["reward", "--completions", str(tmp_path / "c.jsonl"), "--rewards", "format"])
    r = run_cli(*args, "--out", str(tmp_path / "out"), env=NO_BLAS)
    one_line_error(r, f"--out: cannot write {tmp_path}/out: a broken symbolic link (to {tmp_path}/nowhere/x)")
    assert tree_hash(tmp_path) == before and (tmp_path / "out").is_symlink()


def test_resume_cuts_the_logs_back_only_when_every_log_is_long_enough(tmp_path):
    """Resume cuts metrics.jsonl and samples.jsonl back to the checkpoint's sizes; a log shorter
    than that (or missing) is refused before either log is touched."""
    from mlx_grpo.rundir import METRICS, SAMPLES, SUMMARY, log_sizes, resume_run_dir

    (tmp_path / METRICS).write_text('{"step": 1}\n{"step": 2}\n')
    (tmp_path / SAMPLES).write_text('{"step": 1}\n')
    (tmp_path / SUMMARY).write_text("{}\n")
    at_step_1 = {METRICS: len('{"step": 1}\n'), SAMPLES: len('{"step": 1}\n')}
    before = tree_hash(tmp_path)
    where = tmp_path / "checkpoints" / "step_000001" / "state.json"
    with pytest.raises(RunDirError, match=f"{where}: log_sizes.{SAMPLES} .*: {tmp_path / SAMPLES} is 12 bytes, "
                                          "shorter than at the checkpoint \\(99 bytes\\)"):
        resume_run_dir(tmp_path, {**at_step_1, SAMPLES: 99}, 1, where)
    with pytest.raises(RunDirError, match="is missing, shorter than at the checkpoint"):
        resume_run_dir(tmp_path / "sub", at_step_1, 1, where)
    assert tree_hash(tmp_path) == before
    resume_run_dir(tmp_path, at_step_1, 1, where)
    assert log_sizes(tmp_path) == at_step_1
    assert (tmp_path / METRICS).read_text() == '{"step": 1}\n'
    assert not (tmp_path / SUMMARY).exists()  # it described the run before the resume
    assert (tmp_path / MANIFEST).is_file()  # a run from before manifests gets one


def _owned_run(d):
    """A run with its manifest: metrics, a summary and a checkpoint's state."""
    from mlx_grpo.rundir import write_manifest

    _plot_run(d)
    write_manifest(d)
    (d / "summary.json").write_text('{"steps": 2}\n')
    (d / "checkpoints" / "step_000001").mkdir(parents=True)
    (d / "checkpoints" / "step_000001" / "state.json").write_text('{"step": 1}\n')
    return d


# An --out that is what the command reads, or a file a run owns: refused before anything is read
# (the inputs here are malformed, so reading them first would fail differently) or written.
REWARD_OUT = ["reward", "--completions", "{tmp}/bad.jsonl", "--rewards", "format", "--out"]
ONTO_INPUTS = [
    (["plot", "{tmp}/run", "--out", "{tmp}/run/metrics.jsonl"],
     "--out: {tmp}/run/metrics.jsonl is the metrics file of {tmp}/run, an input; it would be replaced"),
    (["plot", "{tmp}/run", "--out", "{tmp}/owned/summary.json"],
     "--out: {tmp}/owned/summary.json belongs to the run in {tmp}/owned (a run owns its summary.json)"),
    (["plot", "{tmp}/run", "--out", "{tmp}/owned/checkpoints/step_000001/state.json"],
     "belongs to the run in {tmp}/owned (a run owns its checkpoints)"),
    ([*REWARD_OUT, "{tmp}/owned/metrics.jsonl"],
     "--out: {tmp}/owned/metrics.jsonl belongs to the run in {tmp}/owned (a run owns its metrics.jsonl)"),
    ([*REWARD_OUT, "{tmp}/owned/.mlx-grpo-run"],
     "belongs to the run in {tmp}/owned (a run owns its .mlx-grpo-run)"),
    ([*REWARD_OUT, "{tmp}/owned/adapters.safetensors"],
     "belongs to the run in {tmp}/owned (a run owns its adapters.safetensors)"),
    # through a symbolic link, and a run from before manifests (its checkpoint shows it is one)
    ([*REWARD_OUT, "{tmp}/into-run"],
     "--out: {tmp}/into-run belongs to the run in {tmp}/owned (a run owns its metrics.jsonl)"),
    ([*REWARD_OUT, "{tmp}/old/samples.jsonl"],
     "belongs to the run in {tmp}/old (a run owns its samples.jsonl)"),
    ([*REWARD_OUT, "{tmp}/to-completions"],
     "--out: {tmp}/to-completions is the --completions file; it would be replaced"),
    (["reward", "--completions", "{tmp}/bad.jsonl", "--config", "{tmp}/c.yaml", "--out", "{tmp}/c.yaml"],
     "--out: {tmp}/c.yaml is the --config file; it would be replaced"),
    (["bench", "--quick", "--config", "{tmp}/c.yaml", "--out", "{tmp}/c.yaml"],
     "--out: {tmp}/c.yaml is the --config file; it would be replaced"),
]


@pytest.mark.parametrize("args,msg", ONTO_INPUTS, ids=[f"{a[0]}-{i}" for i, (a, _) in enumerate(ONTO_INPUTS)])
def test_out_onto_an_input_or_a_runs_file_refused_before_anything_is_read(tmp_path, args, msg):
    """Before: plot read the run's metrics, then wrote the PNG over them; reward --out replaced a
    run's own files."""
    _plot_run(tmp_path / "run")
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "kind": "train"}\nnot json\n{"step": 3}\n')
    _owned_run(tmp_path / "owned")
    _owned_run(tmp_path / "old")
    (tmp_path / "old" / MANIFEST).unlink()
    (tmp_path / "into-run").symlink_to(tmp_path / "owned" / "metrics.jsonl")
    (tmp_path / "bad.jsonl").write_text("not json\n")
    (tmp_path / "to-completions").symlink_to(tmp_path / "bad.jsonl")
    (tmp_path / "c.yaml").write_text("train: [unclosed\n")
    before = tree_hash(tmp_path)
    r = run_cli(*[a.replace("{tmp}", str(tmp_path)) for a in args], env=NO_BLAS)
    one_line_error(r, msg.replace("{tmp}", str(tmp_path)))
    assert tree_hash(tmp_path) == before and (tmp_path / "into-run").is_symlink()


def test_out_next_to_a_runs_files_is_allowed(tmp_path):
    """What a run does not own stays writable: plot's default RUN/curves.png, scores beside a run."""
    _owned_run(tmp_path / "owned")
    (tmp_path / "c.jsonl").write_text('{"completion": "<think>x</think><answer>1</answer>"}\n')
    r = run_cli("reward", "--completions", str(tmp_path / "c.jsonl"), "--rewards", "format",
                "--out", str(tmp_path / "owned" / "scores.jsonl"), env=NO_BLAS)
    assert r.returncode == 0, r.stderr
    r = run_cli("plot", str(tmp_path / "owned"), env=NO_BLAS)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "owned" / "curves.png").read_bytes()[:4] == b"\x89PNG"


def _read_fifo_in_a_thread(fifo):
    """Start a reader of ``fifo``; returns (thread, what it read: a list filled when done)."""
    import threading

    got = []
    t = threading.Thread(target=lambda: got.append(open(fifo, "rb").read()), daemon=True)
    t.start()
    return t, got


def test_reward_out_to_a_fifo_writes_through_it(tmp_path):
    """Before: PATH.tmp + rename replaced the FIFO with a regular file (as root, --out /dev/null
    would have replaced the system's /dev/null)."""
    import stat

    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"completion": "<answer>1</answer>", "i": i}) + "\n"
                                              for i in range(3)))
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader, got = _read_fifo_in_a_thread(fifo)
    r = run_cli("reward", "--completions", str(tmp_path / "c.jsonl"), "--rewards", "format", "--out", str(fifo),
                env=NO_BLAS, timeout=120)
    reader.join(timeout=30)
    assert r.returncode == 0, r.stderr
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)  # still the FIFO
    assert [json.loads(x)["i"] for x in got[0].decode().splitlines()] == [0, 1, 2]
    assert sorted(os.listdir(tmp_path)) == ["c.jsonl", "pipe"]  # no temporary file left


@pytest.mark.parametrize("command", ["reward", "plot"])
def test_out_to_a_symlink_keeps_the_link_and_writes_its_target(tmp_path, command):
    _plot_run(tmp_path / "run")
    (tmp_path / "c.jsonl").write_text('{"completion": "<answer>1</answer>"}\n')
    (tmp_path / "elsewhere").mkdir()
    target = tmp_path / "elsewhere" / "result"
    target.write_text("old")
    (tmp_path / "link").symlink_to(target)
    args = (["plot", str(tmp_path / "run")] if command == "plot"
            else ["reward", "--completions", str(tmp_path / "c.jsonl"), "--rewards", "format"])
    r = run_cli(*args, "--out", str(tmp_path / "link"), env=NO_BLAS)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "link").is_symlink() and os.readlink(tmp_path / "link") == str(target)
    data = target.read_bytes()
    assert data.startswith(b"\x89PNG") if command == "plot" else json.loads(data)["rewards"] == {"format": 0.0}
    assert os.listdir(tmp_path / "elsewhere") == ["result"]


def test_atomic_write_replaces_only_regular_files(tmp_path):
    """The one writer of every --out (and of the adapters): a regular or new file by a temporary
    file and a rename; a link's target the same way (the link stays); a FIFO written through."""
    import stat

    from mlx_grpo.rundir import atomic_write

    write = lambda text: lambda p: p.write_text(text)  # noqa: E731
    atomic_write(tmp_path / "new.txt", write("new"))
    (tmp_path / "old.txt").write_text("old")
    os.link(tmp_path / "old.txt", tmp_path / "hard.txt")
    atomic_write(tmp_path / "old.txt", write("replaced"))
    assert (tmp_path / "old.txt").read_text() == "replaced" and (tmp_path / "hard.txt").read_text() == "old"
    (tmp_path / "link.txt").symlink_to(tmp_path / "new.txt")
    atomic_write(tmp_path / "link.txt", write("through the link"))
    assert (tmp_path / "link.txt").is_symlink() and (tmp_path / "new.txt").read_text() == "through the link"
    os.mkfifo(tmp_path / "pipe")
    reader, got = _read_fifo_in_a_thread(tmp_path / "pipe")
    atomic_write(tmp_path / "pipe", write("into the pipe"))
    reader.join(timeout=30)
    assert got == [b"into the pipe"] and stat.S_ISFIFO(os.lstat(tmp_path / "pipe").st_mode)
    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "old.txt", lambda p: (p.write_text("half"), (_ for _ in ()).throw(RuntimeError())))
    assert (tmp_path / "old.txt").read_text() == "replaced"  # a failed write leaves the file as it was
    assert sorted(os.listdir(tmp_path)) == ["hard.txt", "link.txt", "new.txt", "old.txt", "pipe"]
