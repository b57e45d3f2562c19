"""The run log (runlog.py): one call per event, and each event lands in the right files and lines.
Real files in a temporary run directory, the real tripwires."""

import json

from mlx_grpo import tripwires as tw
from mlx_grpo.config import make_config
from mlx_grpo.runlog import RunLog
from mlx_grpo.runs import read_run


def open_log(tmp_path, main=True):
    cfg = make_config(None, [("output.dir", str(tmp_path)), ("output.progress", False), ("train.steps", 20)])
    said = []
    return RunLog(tmp_path, cfg, said.append, tw.Tripwires(), main=main), said


def metrics(reward=0.5, flat=0.0):
    return {"reward_mean": reward, "zero_std_groups": flat, "grad_norm": 1.0, "kl": 0.0,
            "completion_length": 3.0, "tokens_per_sec": 10.0}


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_a_step_writes_its_record_and_its_samples_tagged_with_the_step(tmp_path):
    log, said = open_log(tmp_path)
    log.step(1, metrics(0.25), [{"completion": "a"}, {"completion": "b"}])
    log.step(2, metrics(0.75), [{"completion": "c"}])
    log.close()
    assert lines(tmp_path / "metrics.jsonl") == [{"step": 1, "kind": "train", **metrics(0.25)},
                                                 {"step": 2, "kind": "train", **metrics(0.75)}]
    assert [(s["step"], s["completion"]) for s in lines(tmp_path / "samples.jsonl")] == [(1, "a"), (1, "b"), (2, "c")]
    assert said == []  # a quiet step says nothing (the progress bar, off here, shows steps)


def test_an_eval_is_recorded_and_said_unless_asked_not_to(tmp_path):
    log, said = open_log(tmp_path)
    res = {"step": 0, "n": 4, "accuracy": 0.5, "format_rate": 1.0, "lenient_accuracy": 0.75}
    log.eval(0, res)
    log.eval(5, {**res, "step": 5}, announce=False)
    rec = read_run(tmp_path)
    assert [e["step"] for e in rec.evals] == [0, 5] and rec.train == []
    assert said == ["held-out at step 0: format 1.000, accuracy 0.500, lenient accuracy 0.750 on 4 prompts"]


def test_a_tripwire_warning_goes_to_the_metrics_file_and_the_console(tmp_path):
    log, said = open_log(tmp_path)
    for step in range(1, tw.FLAT_STEPS + 1):
        log.step(step, metrics(flat=1.0), [])
    rec = read_run(tmp_path)
    assert [(w["step"], w["tripwire"]) for w in rec.warnings] == [(tw.START_STEPS, "flat_start"),
                                                                   (tw.FLAT_STEPS, "flat_groups")]
    assert said == [f"warning: {w['message']}" for w in rec.warnings]
    assert len(rec.train) == tw.FLAT_STEPS


def test_a_process_other_than_rank_0_writes_and_says_nothing(tmp_path):
    log, said = open_log(tmp_path, main=False)
    log.step(1, metrics(), [{"completion": "a"}])
    log.eval(1, {"step": 1, "n": 1, "accuracy": 0.0, "format_rate": 0.0, "lenient_accuracy": 0.0})
    log.warning({"kind": "warning", "step": 1, "tripwire": "x", "message": "m"})
    log.line("hello")
    log.close()
    assert list(tmp_path.iterdir()) == [] and said == []
