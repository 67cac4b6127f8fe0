"""The kernel benchmark runs end to end on this machine (--quick: tiny shapes, full mode, one repeat)."""

import csv  # noqa: I001
import math
import subprocess
import sys

import torch
from _kernels import EPS32, SAFETY, sum_tol


def mean_logp_tol(V, L, D=None):
    """Tolerance of |mean log-prob - eager's| for the --quick inputs (see make_inputs in the bench): logits ~ N(0, 4)
    (max |z| <= 12, 6 sigma), or z = h.w over D terms with h ~ N(0, 1), w ~ N(0, 1/D) (|h_i w_i| <= 36 / sqrt(D)).
    Per token: the lse sum over V terms, the rounding at |z| + lse, and the logit dot; a mean over L tokens divides
    the sqrt(L) growth of independent token errors by L; both sides err, hence 2x."""
    zmax = 12.0
    token = sum_tol(V, 1.0) + SAFETY * EPS32 * (2 * zmax + math.log(V))
    if D is not None:
        token += 2 * sum_tol(D, D * 36 / math.sqrt(D))
    return 2 * (token / math.sqrt(L) + sum_tol(L, 2 * zmax + math.log(V)))


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
            tol = mean_logp_tol(1000, 32, 32 if kernel == "linear_sequence_logps" else None)  # QUICK_SHAPES
            assert float(row["max_abs_diff"]) <= tol, (row, tol)
        # OpenRLHF's path either ran or says why it could not.
        assert rows[(kernel, "openrlhf")]["p50_ms"] or rows[(kernel, "openrlhf")]["note"]
    if not torch.cuda.is_available():
        assert rows[("sequence_logps", "ours-triton")]["note"] == "needs a CUDA GPU"
        assert "Triton timings need a GPU" in p.stdout
