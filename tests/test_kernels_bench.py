"""The kernel benchmark runs end to end on this machine (--quick: tiny shapes, full mode, one repeat)."""

import csv
import subprocess
import sys

import torch


def test_bench_quick_runs(tmp_path):
    cmd = [sys.executable, "-m", "comal_openrlhf.kernels.bench", "--quick", "--out", str(tmp_path)]
    cmd += ["--kernels", "sequence_logps", "linear_sequence_logps"]  # the logratio rows reuse the same machinery
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    with open(tmp_path / "bench.csv") as f:
        rows = {(r["kernel"], r["provider"]): r for r in csv.DictReader(f)}
    assert (tmp_path / "bench.md").read_text().startswith("# Kernel benchmark")
    for kernel in ("sequence_logps", "linear_sequence_logps"):
        for provider in ("torch-eager", "ours-torch"):
            row = rows[(kernel, provider)]
            assert float(row["p50_ms"]) > 0 and float(row["peak_mem_mb"]) >= 0, row
            assert float(row["max_abs_diff"]) < 1e-5, row
        # OpenRLHF's path either ran or says why it could not.
        assert rows[(kernel, "openrlhf")]["p50_ms"] or rows[(kernel, "openrlhf")]["note"]
    if not torch.cuda.is_available():
        assert rows[("sequence_logps", "ours-triton")]["note"] == "needs a CUDA GPU"
        assert "Triton timings need a GPU" in p.stdout
