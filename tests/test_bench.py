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
    assert r["greedy"] == {"rows": 2, "mismatched": 0, "identical": True}
    st = r["step"]
    for k in ("generate", "reward", "score", "update", "step_time"):
        assert st[k] >= 0, k
    assert st["generate"] + st["reward"] + st["score"] + st["update"] <= st["step_time"] * 1.01 + 1e-6
    assert st["score"] > 0 and st["update"] > 0 and st["rows_updated"] == 8  # beta > 0: a reference pass
    assert 0 < st["tokens"] <= 8 * r["settings"]["max_tokens"]
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
