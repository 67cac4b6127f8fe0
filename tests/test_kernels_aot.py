"""``python benchmarks/kernels_aot.py`` compiles every kernel a launcher uses for sm_80 and sm_90 on this (CPU)
machine, as the launcher configures it, and none of them spills."""

import json  # noqa: I001
import os
import subprocess
import sys

import pytest
import torch
from _kernels import BENCHMARKS


def test_stand_ins_specialise_like_tensors():
    """aot's stand-in tensors get the runtime specialisation Triton's JIT gives real tensors of those strides."""
    import importlib

    from kernels_aot import StandIn
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    seq = importlib.import_module("comal_openrlhf.kernels.sequence_logps")
    backend = make_backend(GPUTarget("cuda", 90, 32))
    kernel = seq._logps_fwd_kernel
    if not isinstance(kernel, JITFunction):  # interpreted in this process: the binder needs the JIT's view of it
        kernel = JITFunction(kernel.fn)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    for B, L, V in ((2, 8, 1000), (1, 3, 1001), (2, 1, 64)):
        real = torch.empty(B, L + 1, V)[:, 1:] if V % 16 == 0 else torch.empty(B, L, V)
        stand = StandIn(real.shape, real.dtype, real.stride())
        args = [seq.fwd_launch(x, *(torch.empty(B, L, dtype=t) for t in (torch.int64,) + (torch.float32,) * 3), 1.0)
                for x in (real, stand)]  # fmt: skip
        specs = [binder(*a[2], **a[3])[1] for a in args]
        # Real CPU tensors may be less aligned than device allocations; compare everything but pointer alignment.
        strip = [[s if not s[0].startswith("*") else s[0] for s in spec] for spec in specs]
        assert strip[0] == strip[1], (B, L, V)


@pytest.mark.integration
def test_every_launched_kernel_compiles_for_sm80_sm90_without_spills():
    p = subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, "kernels_aot.py"), "--arch", "80,90", "--json"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    report = json.loads(p.stdout)  # stdout is the JSON object and nothing else
    rows = report["kernels"]
    bad = [r for r in rows if r["error"] or r["spill_stores"] or r["spill_loads"]]
    assert not bad and p.returncode == 0, (bad, p.stderr[-2000:])
    assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
    kernels = {r["kernel"] for r in rows}
    assert kernels == {"_logps_fwd_kernel", "_logps_bwd_kernel", "_logratio_fwd_kernel"}, kernels
    shapes = {r["shape"] for r in rows}
    assert shapes == {"16384,128256", "16384,128256,4096"}  # the benchmark's GPU shapes, fused-linear included
    for r in rows:
        assert r["registers"] > 0 and r["blocks_per_sm"] >= 1 and r["atomics"] == 0, r
