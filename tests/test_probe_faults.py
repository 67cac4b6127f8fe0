"""scripts/probe_faults.py: the fault cases a new user hit, replayed as processes. The probe runs once with
--json; each case is one test here: passed, or a known failure (its xfail reason), or skipped where this machine
cannot set it up (a read-only folder)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from _util import REPO

SCRIPT = os.path.join(REPO, "scripts", "probe_faults.py")


def _case_names():
    spec = importlib.util.spec_from_file_location("probe_faults", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # cheap: the script imports the package only when it builds its inputs
    return list(module.CASES)


@pytest.fixture(scope="module")
def probe():
    p = subprocess.run(
        [sys.executable, SCRIPT, "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=1500,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1, f"--json prints one line, got:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    report = json.loads(lines[0])
    return report, p.returncode, p.stderr


@pytest.mark.integration
@pytest.mark.timeout(1600)
@pytest.mark.parametrize("name", _case_names())
def test_fault_case(probe, name):
    report, _rc, stderr = probe
    result = next((r for r in report["cases"] if r["case"] == name), None)
    assert result is not None, f"the probe did not report {name}:\n{stderr[-3000:]}"
    if result["status"] == "skipped":
        pytest.skip(result["skipped"])
    if result["status"] == "xfail":
        pytest.xfail(f"{result['xfail']} ({'; '.join(result['problems'])})")
    assert result["ok"] and result["passed"], (
        f"{name}: " + "; ".join(result["problems"]) + f"\nerror line: {result['error_line']}\n{result['output_tail']}"
    )


@pytest.mark.integration
@pytest.mark.timeout(1600)
def test_probe_exit_status_says_whether_every_case_is_ok(probe):
    report, rc, stderr = probe
    assert report["ok"] == all(r["ok"] for r in report["cases"])
    assert rc == (0 if report["ok"] else 1), stderr[-3000:]
    assert {r["case"] for r in report["cases"]} == set(_case_names())
