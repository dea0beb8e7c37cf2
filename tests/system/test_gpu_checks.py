"""benchmarks/gpu_checks.py, the GPU checks prepared for a lent GPU, run here in its quick CPU
mode: every part runs, every number it reports is there and positive, and a part that runs
out of time is recorded without stopping the call."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_checks.py"


def run(out, *flags):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--out", str(out), *flags],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((out / "gpu_checks.json").read_text())


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_quick_cpu_run_reports_every_number(tmp_path):
    report = run(tmp_path)
    head = report["header"]
    assert {"card", "torch", "cuda", "commit", "device", "limits_s"} <= set(head) and head["quick"]
    assert set(report["parts"]) == {"step", "collect", "sweep", "stack"}
    for name, part in report["parts"].items():
        assert part["status"] == "ok" and part["error"] is None, (name, part["error"])
        assert 0 < part["seconds"] <= part["limit_s"]

    step = report["parts"]["step"]["results"]
    assert all(positive(v) for v in step["matmul_flops"].values()) and set(step["matmul_flops"]) == {"fp32", "bf16"}
    got = {(r["variant"], r["dtype"], r["mode"]) for r in step["rows"]}
    assert got == {(v, d, m) for v in ("relu", "topk") for d in ("fp32", "bf16") for m in ("eager", "compiled")} | \
        {("topk", d, "dense") for d in ("fp32", "bf16")}
    for r in step["rows"]:
        assert all(positive(r[k]) for k in ("step_s", "samples_per_s", "of_roofline")), r
        assert r["compile_s"] >= 0
        assert r["samples_per_s"] == pytest.approx(step["shape"]["B"] / r["step_s"])

    collect = report["parts"]["collect"]["results"]
    assert collect["weights"].startswith("random") and len(collect["rows"]) == 2
    for r in collect["rows"]:
        assert all(positive(r[k]) for k in ("seconds", "tokens_per_s", "forward_tokens_per_s", "kept_tokens")), r
        assert r["tokens_per_s"] == pytest.approx(collect["n_contexts"] * (collect["ctx_len"] - 1) / r["seconds"])

    sweep = report["parts"]["sweep"]["results"]
    assert sweep["n_saes"] == 5 and len(sweep["saes"]) == 5 and sweep["weights"].startswith("random")
    assert all(positive(v) for v in [*sweep["phases"].values(), *sweep["rates"].values()]), sweep
    assert sum(sweep["phases"].values()) == pytest.approx(sweep["total_s"])
    assert positive(sweep["projected_full_s"]) and positive(sweep["collected_tokens"])

    stack = report["parts"]["stack"]["results"]
    assert stack["n_saes"] == 10 and len(stack["saes"]) == 10  # two SAEs of each of the sweep's 5 variants
    assert set(stack["modes"]) == {"unstacked", "stacked"}
    for mode, r in stack["modes"].items():
        assert r["steps"] == stack["steps"] and r["n_saes"] == stack["n_saes"], mode
        assert all(positive(r[k]) for k in ("seconds", "sae_steps_per_s", "samples_per_s_per_sae",
                                            "pass_samples_per_s")), (mode, r)
        assert r["sae_steps_per_s"] == pytest.approx(r["n_saes"] * r["steps"] / r["seconds"])
        assert r["samples_per_s_per_sae"] == pytest.approx(r["sae_steps_per_s"] * stack["shape"]["B"])
    assert positive(stack["speed_up"])
    modes = stack["modes"]
    assert stack["speed_up"] == pytest.approx(modes["unstacked"]["seconds"] / modes["stacked"]["seconds"])
    assert stack["n_stacks"] >= 1 and stack["n_stacks"] == len(stack["stacks"])
    assert all(s["n_saes"] >= 2 for s in stack["stacks"])
    assert sum(s["n_saes"] for s in stack["stacks"]) + stack["n_singles"] == stack["n_saes"]
    diff = stack["w_dec_max_abs_diff"]  # recorded, not checked: bf16 and another order of additions
    assert math.isfinite(diff) and diff >= 0 and diff == max(stack["w_dec_max_abs_diff_by_variant"].values())

    assert len(report["targets"]) == 4
    for t in report["targets"]:
        assert positive(t["value"]) and isinstance(t["met"], bool), t
    log = (tmp_path / "gpu_checks.txt").read_text()
    assert "targets:" in log and "== sweep: ok" in log and "== stack: ok" in log and "stacked" in log


def test_a_part_out_of_time_is_recorded_and_the_rest_runs(tmp_path):
    report = run(tmp_path, "--parts", "step,collect", "--limits", "0.5,60,60,60")  # step: 0.5 s, not enough to start
    step, collect = report["parts"]["step"], report["parts"]["collect"]
    assert step["status"] == "timed out" and "timed out" in step["error"] and step["results"] == {}
    assert collect["status"] == "ok" and len(collect["results"]["rows"]) == 2
    by_name = {t["name"].split()[0]: t for t in report["targets"]}
    assert by_name["relu"]["value"] is None and by_name["relu"]["met"] is None
    assert isinstance(by_name["collection"]["met"], bool)
