"""`cli.py bench --quick --json` as a real subprocess: the result's structure and sane values
(no timing thresholds: speed goals are read from the full bench, not asserted in tests)."""

import json
import math

from conftest import run_cli


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_bench_quick_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cli("bench", "--quick", "--processes", "2", "--json", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == r
    assert r["device"] in {"cpu", "metal", "cuda"}
    assert r["parameters"] > 1e6 and r["settings"]["group_size"] == 4 and r["settings"]["prompts"] == 2
    ro = r["rollout"]
    for k in ("ours_tokens_per_sec", "ours_uncompiled_tokens_per_sec", "batch_generate_tokens_per_sec",
              "ratio_vs_batch_generate", "ratio_compiled_vs_uncompiled"):
        assert _positive(ro[k]), k
    assert abs(ro["ratio_vs_batch_generate"] - ro["ours_tokens_per_sec"] / ro["batch_generate_tokens_per_sec"]) < 1e-9
    # which engine "ours" is, and where it is C, MLX's compiled step beside it
    assert ro["engine"] in {"C decode step", "compiled MLX step"}
    assert (ro["engine"] == "C decode step") == ("ours_mlx_tokens_per_sec" in ro) == ("ratio_c_vs_mlx" in ro)
    # where each pass ran, the same answer for the rollout as its engine
    e = r["engines"]
    assert set(e) == {"prefill_and_decode", "score", "update"}
    assert e["update"] == e["score"]  # a llama-shaped float32 model with LoRA (no dropout): both in C, or neither
    assert (e["prefill_and_decode"] == "C") == (ro["engine"] == "C decode step") and e["score"] in {"C", "MLX"}
    assert r["greedy"] == {"rows": 2, "mismatched": 0, "identical": True}
    st = r["step"]
    for k in ("generate", "reward", "score", "update", "step_time"):
        assert st[k] >= 0, k
    assert st["generate"] + st["reward"] + st["score"] + st["update"] <= st["step_time"] * 1.01 + 1e-6
    assert st["score"] > 0 and st["update"] > 0 and st["rows_updated"] == 8  # beta > 0: a reference pass
    assert 0 < st["tokens"] <= 8 * r["settings"]["max_tokens"]
    # How far each stage is from the machine's limits, measured in the same run.
    assert set(r["limits"]) == {"bandwidth_gbs", "matmul_gflops"} and all(map(_positive, r["limits"].values()))
    for stage in ("generate", "score", "update"):  # beta > 0: scoring runs the reference pass
        b = r["bounds"][stage]
        assert b["measured_s"] == st[stage], stage
        assert _positive(b["bound_s"]) and _positive(b["gflop"]) and _positive(b["gb"]), stage
        assert abs(b["ratio"] - b["measured_s"] / b["bound_s"]) < 1e-9 and b["limited_by"] in {"matmul", "bandwidth"}
    # The update's forward + backward through the activations: twice the scoring pass's FLOPs.
    assert abs(r["bounds"]["update"]["gflop"] - 2 * r["bounds"]["score"]["gflop"]) < 1e-12
    mem = r["memory"]
    assert mem["beta"] > 0 and mem["beta0_bytes"] > 0 and mem["beta_bytes"] > 0
    assert abs(mem["ratio"] - mem["beta_bytes"] / mem["beta0_bytes"]) < 1e-9
    bl = r["blas"]
    if "skipped" in bl:
        assert isinstance(bl["skipped"], str) and bl["skipped"]
    else:
        assert _positive(bl["fast_step_s"]) and _positive(bl["bundled_step_s"])
        assert abs(bl["ratio"] - bl["bundled_step_s"] / bl["fast_step_s"]) < 1e-9
    one, two = r["distributed"]["runs"]  # training under mlx.launch -n 2 against one process
    assert (one["processes"], two["processes"]) == (1, 2)
    assert _positive(one["steps_per_s"]) and _positive(two["steps_per_s"])
    assert abs(r["distributed"]["speedup_steps_per_s"] - two["steps_per_s"] / one["steps_per_s"]) < 1e-9


def test_bench_table_shows_each_stage_against_the_limits():
    from mlx_grpo.bench import table

    r = {"model": "m", "parameters": 1e6, "backend": "cpu", "mlx_version": "0",
         "settings": {"prompts": 2, "group_size": 4, "max_tokens": 8, "temperature": 1.0, "adapter": "lora",
                      "rank": 8, "beta": 0.0, "reps": 1, "steps": 1},
         "rollout": {"ours_tokens_per_sec": 1.0, "ours_uncompiled_tokens_per_sec": 1.0,
                     "batch_generate_tokens_per_sec": 1.0, "ratio_vs_batch_generate": 1.0,
                     "ratio_compiled_vs_uncompiled": 1.0},
         "greedy": {"rows": 2, "mismatched": 0, "identical": True},
         "step": {"generate": 0.5, "reward": 0.0, "score": 0.001, "update": 0.3, "step_time": 0.9,
                  "tokens": 40, "rows_updated": 8},
         "limits": {"bandwidth_gbs": 12.5, "matmul_gflops": 250.0},
         "bounds": {"generate": {"measured_s": 0.5, "bound_s": 0.01, "ratio": 50.0, "gflop": 0.1, "gb": 0.1,
                                 "limited_by": "bandwidth"},
                    "score": {"measured_s": 0.001, "bound_s": 0.0, "ratio": None, "gflop": 0.0, "gb": 0.0,
                              "limited_by": None},
                    "update": {"measured_s": 0.3, "bound_s": 0.03, "ratio": 10.0, "gflop": 7.5, "gb": 0.01,
                               "limited_by": "matmul"}},
         "memory": {"beta": 0.1, "beta0_bytes": 1e6, "beta_bytes": 1e6, "ratio": 1.0},
         "blas": {"skipped": "not here"}}
    lines = table(r).splitlines()
    at = next(i for i, x in enumerate(lines) if x.startswith("| machine limits"))
    assert "12.5 GB/s" in lines[at] and "250 GFLOP/s" in lines[at]
    assert lines[at + 1].startswith("| generate: measured / bound") and "**50.0x**" in lines[at + 1]
    assert "no pass to count" in lines[at + 2] and "**10.0x**" in lines[at + 3]


def test_bench_table_and_bad_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout:\n  temprature: 0.5\n")
    proc = run_cli("bench", "--quick", "--config", str(bad))
    assert proc.returncode == 2
    assert "temprature" in proc.stderr and "Traceback" not in proc.stderr


def test_bench_config_reward_settings_reach_the_rewards(tmp_path):
    # bench --config builds its policy as train does: the config's reward_settings shape the
    # rewards it times (its own copy once built them with the defaults).
    from mlx_grpo.bench import QUICK, Session, bench_config

    conf = tmp_path / "lenient.yaml"
    conf.write_text("reward_settings:\n  accuracy:\n    extract: last_number\n")
    judged = ["<think> so </think> the sum is 7"]  # no <answer> tag: only last_number finds the 7
    lenient = Session(bench_config(str(conf), None, QUICK)).policy.reward_fns["accuracy"]
    default = Session(bench_config(None, None, QUICK)).policy.reward_fns["accuracy"]
    assert lenient([""], judged, answer=["7"]) == [1.0]
    assert default([""], judged, answer=["7"]) == [0.0]
