"""The kernel benchmark runs end to end on this machine (--quick: tiny shapes, full mode, one repeat)."""

import csv  # noqa: I001
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from _kernels import BENCHMARKS, EPS32, SAFETY, sum_tol

BENCH = [sys.executable, os.path.join(BENCHMARKS, "kernels_bench.py")]


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


@pytest.mark.integration
def test_bench_quick_runs(tmp_path):
    cmd = BENCH + ["--quick", "--out", str(tmp_path)]
    cmd += ["--kernels", "sequence_logps", "linear_sequence_logps"]  # the logratio rows reuse the same machinery
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    with open(tmp_path / "bench.csv") as f:
        rows = {(r["kernel"], r["provider"]): r for r in csv.DictReader(f)}
    assert (tmp_path / "bench.md").read_text().startswith("# Kernel benchmark")
    for kernel in ("sequence_logps", "linear_sequence_logps"):
        for provider in ("torch-eager", "ours-torch", "openrlhf-formula"):
            row = rows[(kernel, provider)]
            assert float(row["p50_ms"]) > 0 and float(row["peak_mem_mb"]) >= 0, row
            tol = mean_logp_tol(1000, 32, 32 if kernel == "linear_sequence_logps" else None)  # QUICK_SHAPES
            assert float(row["max_abs_diff"]) <= tol, (row, tol)
        # OpenRLHF's path either ran or says why it could not.
        assert rows[(kernel, "openrlhf")]["p50_ms"] or rows[(kernel, "openrlhf")]["note"]
    if not torch.cuda.is_available():
        assert rows[("sequence_logps", "ours-triton")]["note"] == "needs a CUDA GPU"
        assert "Triton timings need a GPU" in p.stdout


@pytest.mark.integration
def test_predict_json_is_one_object_with_h100_predictions(tmp_path):
    """--json: stdout is exactly one JSON object; --predict h100: bytes, FLOPs and predicted ms on every row, and
    "not measured" where no H100 ran the row."""
    cmd = BENCH + ["--predict", "h100", "--no-run", "--json"]
    cmd += ["--shapes", "16384x128256:bf16", "16384x128256x4096:bf16", "--out", str(tmp_path)]
    p = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    report = json.loads(p.stdout)
    rows = {(r["kernel"], r["provider"], r["mode"]): r for r in report["rows"]}
    assert len(rows) == len(report["rows"]) >= 30
    for r in report["rows"]:
        assert r["pred_ms"] > 0 and r["pred_GB"] > 0 and r["measured_ms"] == "not measured", r
        assert r["pred_device"] == "H100 SXM", r
    # The from-logits kernel moves the minimum: one read forward, read + in-place write backward (bf16 logits).
    E = 16384 * 128256 * 2
    assert rows[("sequence_logps", "ours-triton", "full")]["pred_GB"] * 1e9 == 3 * E
    linear = rows[("linear_sequence_logps", "ours-triton", "full")]
    assert linear["pred_TFLOP"] * 1e12 == 8 * 16384 * 128256 * 4096  # forward, recompute, dh, dW GEMMs
    for provider in ("liger-flce", "cce"):  # anchors are listed even where they cannot run
        assert rows[("linear_sequence_logps", provider, "full")]["pred_ms"] > 0


def test_linear_model_time_within_1_5x_of_flop_floor():
    """At N=16k, V=128k, d=4096 bf16 the chunked fused-linear path's H100 model time (forward + backward) is within
    1.5x of the FLOP floor 6NdV / 989 TFLOP/s, with one chunk of logits as its only N x V-like transient."""
    from comal_openrlhf.kernels import config
    from comal_openrlhf.kernels.linear_sequence_logps import chunk_schedule

    N, V, D = 16384, 128256, 4096
    chunks = chunk_schedule(N, V, D, torch.bfloat16, "cuda")
    C = chunks[0][1]
    assert C < N and C * V * 2 <= config.CHUNK_CAP_BYTES
    floor_ms = 6 * N * V * D / config.H100["flops_s"]["bf16"] * 1e3
    model_ms = config.total_ms(config.linear_chunked_stages(N, V, D, "bf16", C))
    assert 51 < floor_ms < 53
    assert model_ms <= 1.5 * floor_ms, (model_ms, floor_ms)
    # The replaced atomic design is an order of magnitude off under the same model.
    assert config.total_ms(config.linear_fused_atomic_stages(N, V, D, "bf16")) > 10 * floor_ms
