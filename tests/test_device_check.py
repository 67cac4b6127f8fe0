"""benchmarks/device_check.py, the prepared first run on a lent GPU, proven on this CPU: its dry run goes through
every step at tiny sizes and writes the JSON the GPU run will write; a step that fails or hangs is recorded with its
error while the other steps still run; steps left out or past the time budget are listed as skipped."""

import json
import os
import subprocess
import sys

import pytest
from _kernels import BENCHMARKS

sys.path.append(BENCHMARKS)
import device_check  # noqa: E402

SCRIPT = os.path.join(BENCHMARKS, "device_check.py")
STEP_KEYS = {"status", "seconds", "timeout_s", "error", "result"}


def run(out, *args, timeout=300):
    p = subprocess.run([sys.executable, SCRIPT, "--out", str(out), *args], capture_output=True, text=True,
                       timeout=timeout, check=False)  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    with open(out / "device_check.json") as f:
        return json.load(f), p.stdout


@pytest.mark.integration  # seven child processes, about 35 s on one core
def test_dry_run_records_every_step_and_survives_a_failing_and_a_hanging_one(tmp_path):
    report, stdout = run(tmp_path, "--dry-run", "--inject-fail", "environment", "--inject-hang", "train_comal")
    steps = report["steps"]
    assert list(steps) == device_check.STEP_NAMES  # every step, in order, even the failed ones
    assert all(STEP_KEYS <= set(s) for s in steps.values())
    assert report["dry_run"] is True and report["finished"] and report["elapsed_s"] < report["budget_s"]
    assert set(os.listdir(tmp_path)) == {"device_check.json", "device_check.log"}

    # The injected failure and hang: recorded with their error; the steps after them ran.
    assert steps["environment"]["status"] == "error"
    assert "injected failure" in steps["environment"]["error"]
    assert steps["train_comal"]["status"] == "timeout" and "stopped after" in steps["train_comal"]["error"]
    assert steps["train_comal"]["seconds"] < steps["train_comal"]["timeout_s"] + 5
    ok = [n for n in device_check.STEP_NAMES if n not in ("environment", "train_comal")]
    assert {n: steps[n]["status"] for n in ok} == {n: "ok" for n in ok}, {n: steps[n]["error"] for n in ok}
    assert report["summary"]["status"] == {n: s["status"] for n, s in steps.items()}

    ceilings = steps["ceilings"]["result"]
    assert ceilings["copy"]["bytes_s"] > 0 and ceilings["gemm_bf16_bench"]["flops_s"] > 0
    assert set(ceilings["limits"]) == {"name", "hbm_bytes_s", "flops_s"}

    tests = steps["kernel_tests"]["result"]
    assert tests["counts"].get("passed", 0) >= 2 and not tests["failed"], tests

    rows = steps["kernel_bench"]["result"]["rows"]
    assert len(rows) == len(device_check.bench_rows(dry=True)) == 18
    for r in rows:
        assert r["status"] == "ok", r
        assert r["p50_ms"] > 0 and r["pred_ms"] > 0 and r["datasheet_pred_ms"] > 0 and r["frac_of_ceiling"] > 0, r
        # fp32 rows agree with the fp32 reference to float rounding; bf16 rows were fed the same bf16 logits
        assert r["max_abs_diff"] <= (1e-5 if r["dtype"] == "fp32" else 1e-2), r
    assert {r["provider"] for r in rows} == {"openrlhf-formula", "ours-triton", "ours-torch", "logits+ours"}

    paths = {p["path"]: p for p in steps["comal_step"]["result"]["paths"]}
    assert set(paths) == {"linear", "logits", "openrlhf-formula"}
    for p in paths.values():
        assert p["status"] == "ok" and p["p50_ms"] > 0 and p["max_abs_seq_logp_diff_vs_formula"] < 1e-2, p
    assert steps["environment_after"]["result"]["nvidia_smi"]
    assert "wrote" in stdout and "kernel_bench: ok" in stdout


@pytest.mark.integration  # one child process, about a second
def test_steps_not_asked_for_are_listed_as_skipped(tmp_path):
    report, _ = run(tmp_path, "--dry-run", "--steps", "train_comal")
    statuses = {n: s["status"] for n, s in report["steps"].items()}
    assert statuses == {n: ("ok" if n == "train_comal" else "skipped") for n in device_check.STEP_NAMES}
    why = report["steps"]["train_comal"]["result"]
    assert why["status"] == "skipped" and why["total_mib"] > why["tree_limit_mib"] == 64


def test_steps_past_the_budget_are_skipped_not_started(tmp_path):
    assert device_check.main(["--out", str(tmp_path), "--dry-run", "--budget", "1"]) == 0
    with open(tmp_path / "device_check.json") as f:
        report = json.load(f)
    assert {s["status"] for s in report["steps"].values()} == {"skipped"}
    assert all(s["error"].startswith("time budget") for s in report["steps"].values())
