"""Damaged checkpoints and adapters: a truncated or edited file in
``--resume``, ``eval --run`` or ``generate --adapter`` is one line naming the file, exit 2, and
the run directory byte for byte as it was. Real runs, real damage, real subprocesses."""

import json
import shutil

import mlx.core as mx
import pytest

from conftest import one_line_error, run_cli, tree_hash
from mlx_grpo.checkpoint import CheckpointError, latest_checkpoint, read_state

NO_BLAS = {"MLX_GRPO_NO_FAST_BLAS": "1"}


@pytest.fixture(scope="module")
def saved_run(small_model_dir, tmp_path_factory):
    """A finished 2-step run with a checkpoint after each step."""
    out = tmp_path_factory.mktemp("damaged") / "run"
    r = run_cli("train", "--model", str(small_model_dir), "--output", str(out), "--steps", "2",
                "--batch-size", "2", "-G", "2", "--max-tokens", "4", "--no-progress",
                "--set", "output.eval_size=2", "--set", "output.save_every=1", env=NO_BLAS)
    assert r.returncode == 0, r.stderr
    assert (out / "summary.json").is_file()
    return out


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def transpose_first(path):
    """A well-formed file whose first rectangular matrix is transposed (edited, or from another model)."""
    arrays = mx.load(str(path))
    k = next(k for k in sorted(arrays) if arrays[k].ndim == 2 and arrays[k].shape[0] != arrays[k].shape[1])
    arrays[k] = arrays[k].T
    mx.save_safetensors(str(path), arrays)


def nan_first(path):
    """A well-formed file whose first floating array holds a NaN (a diverged run, saved elsewhere)."""
    arrays = mx.load(str(path))
    k = sorted(arrays)[0]
    arrays[k] = mx.full(arrays[k].shape, float("nan"), dtype=arrays[k].dtype)
    mx.save_safetensors(str(path), arrays)


def to_int32(path):
    """A well-formed file whose arrays are all int32 (names and shapes as they were)."""
    mx.save_safetensors(str(path), {k: v.astype(mx.int32) for k, v in mx.load(str(path)).items()})


def edit_state(**changes):
    def edit(path):
        state = json.loads(path.read_text())
        state.update(changes)
        path.write_text(json.dumps(state))
    return edit


DAMAGE = [
    ("optimizer.safetensors", truncate, "unreadable optimizer state"),
    ("adapters.safetensors", truncate, "unreadable adapters"),
    ("adapters.safetensors", transpose_first, "this run needs"),
    ("adapters.safetensors", nan_first, "holds NaN or infinite values"),
    ("adapters.safetensors", to_int32, "is int32["),
    ("optimizer.safetensors", transpose_first, "this run needs"),
    ("state.json", edit_state(seconds="soon"), "seconds: expected a finite number >= 0, got 'soon'"),
    ("state.json", edit_state(step=-1), "step: expected an integer >= 0, got -1"),
    ("state.json", edit_state(batches_drawn=-3), "batches_drawn: expected an integer >= 0"),
    ("state.json", edit_state(rng_key=[1, 2, 3]), "rng_key: expected null or 2 integers"),
    # resume replays batches_drawn prompt batches: an edited 10**12 stalled it for hours
    ("state.json", edit_state(batches_drawn=10**12), "batches_drawn: 1000000000000 is more than 2 steps draw"),
    ("state.json", edit_state(log_sizes={"metrics.jsonl": -5}), "log_sizes: expected {name: bytes}"),
    ("state.json", truncate, "unreadable checkpoint state"),
]


def replace_state(obj):
    def replace(path):
        path.write_text(json.dumps(obj))
    return replace


def edit_sizes(change):
    """state.json's log_sizes changed by ``change(sizes, run_dir, state_path)``."""
    def edit(path):
        state = json.loads(path.read_text())
        state["log_sizes"] = change(dict(state["log_sizes"]), path.parents[2], path)
        path.write_text(json.dumps(state))
    return edit


def _sizes_of_step_1(sizes, run, path):
    return json.loads((path.parents[1] / "step_000001" / "state.json").read_text())["log_sizes"]


def _cut_after_first_sample_of_step_2(sizes, run, path):
    data = (run / "samples.jsonl").read_bytes()
    start = _sizes_of_step_1(sizes, run, path)["samples.jsonl"]
    return {**sizes, "samples.jsonl": data.index(b"\n", start) + 1}


# A state.json that disagrees with the logs it describes (issue: resume cut metrics.jsonl to 0 bytes,
# or mid-line, and went on): refused before anything is cut, whatever the disagreement.
DISAGREES = [
    (replace_state({"step": 2}), "log_sizes has no size for metrics.jsonl"),
    (edit_sizes(lambda s, run, p: {"metrics.jsonl": s["metrics.jsonl"]}), "log_sizes has no size for samples.jsonl"),
    (edit_sizes(lambda s, run, p: {**s, "metrics.jsonl": s["metrics.jsonl"] + 10_000}),
     "shorter than at the checkpoint"),
    (edit_sizes(lambda s, run, p: {**s, "metrics.jsonl": s["metrics.jsonl"] - 7}), "end in the middle of a line"),
    (edit_sizes(lambda s, run, p: {**s, "samples.jsonl": s["samples.jsonl"] - 1}), "end in the middle of a line"),
    (edit_sizes(lambda s, run, p: {"metrics.jsonl": 0, "samples.jsonl": 0}),
     "hold no training step; the checkpoint is at step 2"),
    (edit_sizes(_sizes_of_step_1), "end at step 1; the checkpoint is at step 2"),
    (edit_sizes(_cut_after_first_sample_of_step_2), "holds a record of step 2 after byte"),
]


@pytest.mark.parametrize("damage,msg", DISAGREES, ids=range(len(DISAGREES)))
def test_state_that_disagrees_with_the_logs_is_refused_and_nothing_cut(saved_run, tmp_path, damage, msg):
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    path = latest_checkpoint(run) / "state.json"
    damage(path)
    before = tree_hash(run)
    r = run_cli("train", "--resume", str(run), "--steps", "3", "--no-progress", env=NO_BLAS)
    one_line_error(r, f"{path}: ")
    assert msg in r.stderr, r.stderr
    assert tree_hash(run) == before  # no log cut, summary.json kept


def test_a_checkpoint_whose_sizes_hold_later_steps_is_refused(saved_run, tmp_path):
    """Step 1's checkpoint with sizes past step 1 (the logs through step 2): the resumed run would
    log step 2 twice. Its own sizes resume."""
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    shutil.rmtree(run / "checkpoints" / "step_000002")
    path = run / "checkpoints" / "step_000001" / "state.json"
    good = path.read_text()
    edit_sizes(lambda s, r, p: {n: (r / n).stat().st_size for n in s})(path)
    before = tree_hash(run)
    r = run_cli("train", "--resume", str(run), "--steps", "2", "--no-progress", env=NO_BLAS)
    one_line_error(r, f"{path}: log_sizes.metrics.jsonl disagrees with the log: the first ")
    assert "end at step 2; the checkpoint is at step 1" in r.stderr
    assert tree_hash(run) == before
    path.write_text(good)
    r = run_cli("train", "--resume", str(run), "--steps", "2", "--no-progress", env=NO_BLAS)
    assert r.returncode == 0, r.stderr
    steps = [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(x).get("kind") == "train"]
    assert steps == [1, 2]


def test_cut_logs_keep_every_line_whole_and_every_step_of_the_checkpoint(tmp_path):
    """The last guard, below the resume's own check: truncate_logs cuts only at a line boundary
    that keeps exactly steps 1..step (eval and warning records are not steps; a cut-off line after
    the cut is dropped)."""
    from mlx_grpo.rundir import RunDirError, truncate_logs

    lines = [{"kind": "eval", "step": 0}, {"step": 1, "kind": "train"}, {"step": 2, "kind": "train"},
             {"kind": "warning", "step": 2}, {"step": 3, "kind": "train"}]
    text = "".join(json.dumps(x) + "\n" for x in lines)
    (tmp_path / "metrics.jsonl").write_text(text + '{"step": 4, "ki')  # a killed run's half line
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 1, 2, 2, 3)))
    at = lambda n, name: sum(len(x) + 1 for x in (tmp_path / name).read_text().split("\n")[:n])  # noqa: E731
    where = tmp_path / "state.json"
    good = {"metrics.jsonl": at(4, "metrics.jsonl"), "samples.jsonl": at(4, "samples.jsonl")}
    before = tree_hash(tmp_path)
    for sizes, step, msg in [
        (good, 3, "end at step 2; the checkpoint is at step 3"),
        (good, 1, "end at step 2; the checkpoint is at step 1"),
        ({**good, "samples.jsonl": at(3, "samples.jsonl")}, 2, "holds a record of step 2 after byte"),
        ({**good, "metrics.jsonl": good["metrics.jsonl"] - 2}, 2, "in the middle of a line"),
        ({"samples.jsonl": good["samples.jsonl"]}, 2, "log_sizes has no size for metrics.jsonl"),
    ]:
        with pytest.raises(RunDirError) as e:
            truncate_logs(tmp_path, sizes, step, where)
        assert str(e.value).startswith(f"{where}: ") and msg in str(e.value), str(e.value)
    assert tree_hash(tmp_path) == before
    truncate_logs(tmp_path, good, 2, where)
    assert (tmp_path / "metrics.jsonl").read_text() == "".join(json.dumps(x) + "\n" for x in lines[:4])
    assert [json.loads(x)["step"] for x in (tmp_path / "samples.jsonl").read_text().splitlines()] == [1, 1, 2, 2]


@pytest.mark.parametrize("name,damage,msg", DAMAGE,
                         ids=[f"{n}-{getattr(d, '__name__', 'edit')}-{i}" for i, (n, d, _) in enumerate(DAMAGE)])
def test_damaged_checkpoint_refused_and_run_unchanged(saved_run, tmp_path, name, damage, msg):
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    path = latest_checkpoint(run) / name
    damage(path)
    before = tree_hash(run)
    r = run_cli("train", "--resume", str(run), "--steps", "3", "--no-progress", env=NO_BLAS)
    one_line_error(r, f"{path}: ")
    assert msg in r.stderr, r.stderr
    assert tree_hash(run) == before  # logs not cut, summary.json not deleted


@pytest.mark.parametrize("command", ["eval", "generate"])
@pytest.mark.parametrize("damage", [truncate, transpose_first])
def test_damaged_adapter_refused_by_eval_and_generate(saved_run, small_model_dir, tmp_path, command, damage):
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    damage(run / "adapters.safetensors")
    before = tree_hash(run)
    args = (["eval", "--run", str(run), "--n", "2"] if command == "eval" else
            ["generate", "--model", str(small_model_dir), "--adapter", str(run), "-p", "1 + 1", "--max-tokens", "2"])
    r = run_cli(*args, env=NO_BLAS)
    one_line_error(r, f"--adapter: {run / 'adapters.safetensors'}: cannot load adapters")
    assert tree_hash(run) == before


@pytest.mark.parametrize("command", ["eval", "generate", "reward"])
@pytest.mark.parametrize("damage,why", [(nan_first, "holds NaN or infinite values"),
                                        (to_int32, "is int32[")])
def test_nan_or_integer_adapters_are_refused_wherever_adapters_load(saved_run, small_model_dir, tmp_path, command,
                                                                     damage, why):
    """Before: resume refused them, while eval, generate and reward loaded them (mlx-lm checks names
    and shapes only) and reported the accuracy of noise. One check (models.weights_problem) now."""
    run = tmp_path / "run"
    shutil.copytree(saved_run, run)
    damage(run / "adapters.safetensors")
    before = tree_hash(run)
    args = {"eval": ["eval", "--run", str(run), "--n", "2"],
            "generate": ["generate", "--model", str(small_model_dir), "--adapter", str(run), "-p", "1 + 1",
                         "--max-tokens", "2"],
            "reward": ["reward", "--model", str(small_model_dir), "--adapter", str(run), "--samples", "1",
                       "--max-tokens", "2"]}[command]
    r = run_cli(*args, env=NO_BLAS)
    one_line_error(r, f"--adapter: {run / 'adapters.safetensors'}: cannot load adapters (")
    assert why in r.stderr, r.stderr
    assert tree_hash(run) == before


def test_missing_adapter_file_named(saved_run, small_model_dir, tmp_path):
    r = run_cli("generate", "--model", str(small_model_dir), "--adapter", str(tmp_path), "-p", "1 + 1", env=NO_BLAS)
    one_line_error(r, f"--adapter: {tmp_path / 'adapter_config.json'} not found")


@pytest.mark.parametrize("changes,msg", [
    ({"tokens": 1.5}, "tokens: expected an integer >= 0"),
    ({"step": True}, "step: expected an integer >= 0"),
    ({"seconds": float("nan")}, "seconds: expected a finite number >= 0"),
    ({"seconds": -1}, "seconds: expected a finite number >= 0"),
    ({"reward_last": "high"}, "reward_last: expected a finite number or null"),
    ({"eval_end": [1]}, "eval_end: expected null or an object"),
    # the end-of-run line reads these: before, {} passed here and the finished run crashed on a KeyError
    ({"eval_start": {}}, "eval_start: expected null or an object with numbers n, accuracy, format_rate"),
    ({"eval_end": {"n": 2, "accuracy": "0.5", "format_rate": 1, "lenient_accuracy": 1}}, "eval_end: expected null or an object"),
    ({"rng_key": [1, 2 ** 32]}, "rng_key: expected null or 2 integers in [0, 2**32)"),
    ({"log_sizes": {"other.log": 3}}, "log_sizes: expected {name: bytes}"),
    ({"surprise": 1}, "unknown key 'surprise'"),
    ({"step": 7}, "step: 7 in a checkpoint of step 2"),
])
def test_state_json_checked_field_by_field(saved_run, tmp_path, changes, msg):
    ckpt = tmp_path / "step_000002"
    shutil.copytree(latest_checkpoint(saved_run), ckpt)
    edit_state(**changes)(ckpt / "state.json")
    with pytest.raises(CheckpointError) as e:
        read_state(ckpt)
    assert str(e.value).startswith(f"{ckpt / 'state.json'}: ") and msg in str(e.value), str(e.value)


def test_state_json_nested_too_deep_is_unreadable_not_a_traceback(saved_run, tmp_path):
    ckpt = tmp_path / "step_000002"
    shutil.copytree(latest_checkpoint(saved_run), ckpt)
    (ckpt / "state.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match="state.json: unreadable checkpoint state"):
        read_state(ckpt)


def test_untouched_state_reads_back(saved_run):
    state = read_state(latest_checkpoint(saved_run))
    assert state.step == 2 and len(state.rng_key) == 2 and state.log_sizes["metrics.jsonl"] > 0
