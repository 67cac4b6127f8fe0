"""Benchmark of the per-sequence log-prob kernels against the paths they replace.

    python benchmarks/kernels_bench.py                                   # default shapes for this device
    python benchmarks/kernels_bench.py --mode full --shapes 4096x32000:fp32 --repeats 5 --out runs/bench
    python benchmarks/kernels_bench.py --quick                           # tiny shapes, seconds (smoke test)

Shapes are ``NxV[:dtype]`` (N tokens, vocabulary V) for ``sequence_logps`` and ``sequence_logratio`` and
``NxVxd[:dtype]`` for ``linear_sequence_logps``; the N tokens are laid out as 2 sequences of N/2 (a preference
pair), all unmasked, temperature 1.

Providers: ``torch-eager`` (fp32 log_softmax + gather, also the reference of the diff columns), ``openrlhf``
(OpenRLHF 0.11.2's path: fp32 cast of the logits, then ``openrlhf.models.utils.log_probs_from_logits``; marked
unavailable if it cannot be imported), ``openrlhf-formula`` (the same function's path where flash-attn is absent,
written out here so that it runs without OpenRLHF: fp32 cast, gather of the label logit, logsumexp over chunks of
1024 rows), ``ours-triton`` (CUDA only), ``ours-torch`` (chunked), and for the linear kernel ``logits+ours`` (the
N x V logits materialised by one GEMM, then our row kernel) and the published anchors when installed
(``pip install .[bench]``): ``liger-flce`` (Liger's fused linear cross entropy) and ``cce`` (Apple's Cut
Cross-Entropy, arXiv 2411.09009; CUDA only). Ours run with ``inplace_backward=True`` where the op has it. Modes:
forward (graph built, as in training), backward (backward only; an untimed forward before each repeat) and full
(forward + backward).

Every (kernel, provider, mode, shape) row runs in a fresh subprocess, so the peak memory of one row is not hidden
by the allocations of another. Peak memory is that of one forward (forward mode) or one forward + backward
(backward and full modes), as growth over the memory held once the inputs exist: on CUDA
``torch.cuda.max_memory_allocated`` minus ``memory_allocated``; on CPU the peak RSS (``ru_maxrss``) minus the RSS
right after allocating the inputs, with the peak mark reset there through /proc/self/clear_refs (tracemalloc does
not see torch's allocations). Timings: on CUDA ``triton.testing.do_bench`` (backward mode: CUDA events around
``backward()``, since each repeat needs a fresh forward); on CPU the median (p20, p80) of ``time.perf_counter``
over the repeats, one thread unless --threads says otherwise. Throughput is effective: the minimal bytes (logits
read once per pass, gradient written once) or useful FLOPs (2NdV forward, 4NdV backward) over the p50 time; the
fraction of the device limit is given on an H100 or H200 only (datasheet limits of ``config``). Accuracy columns
compare with torch-eager: max_abs_diff of the per-sequence mean log-prob, max_rel_diff of the per-sequence sums.

``--predict h100`` (or ``h200``) adds per row the HBM bytes and FLOPs of the provider's algorithm and the time they
imply at that device's limits (the stage model of ``config``; ``predict`` below lists each provider's assumptions),
next to the time measured on that device ("not measured" on any other machine) and their ratio. ``--no-run`` skips
the measurements (predictions only). ``--json`` prints one JSON object on stdout and everything else on stderr.

The script runs where the project is not installed too (torch and triton suffice; see ``_checkout.py``).
"""

import argparse
import csv
import importlib.util
import json
import math
import os
import resource
import subprocess
import sys
import time

import torch
from _checkout import use_checkout

K = use_checkout()  # comal_openrlhf.kernels, installed or from this checkout; before anything imports triton

from comal_openrlhf.kernels import config  # noqa: E402 - importable from the checkout only after use_checkout()
from comal_openrlhf.kernels.linear_sequence_logps import chunk_schedule  # noqa: E402

KERNELS = ("sequence_logps", "sequence_logratio", "linear_sequence_logps")
PROVIDERS = ("torch-eager", "openrlhf", "openrlhf-formula", "ours-triton", "ours-torch", "logits+ours")
PROVIDERS += ("liger-flce", "cce")
LINEAR_ONLY = ("logits+ours", "liger-flce", "cce")
MODES = ("forward", "backward", "full")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEVICES = {"h100": config.H100, "h200": config.H200}  # --predict

GPU_SHAPES = ["16384x128256:bf16", "16384x128256:fp32", "16384x128256x4096:bf16"]
CPU_SHAPES = ["4096x32000:fp32", "1024x32000:bf16", "1024x32000x256:fp32"]
QUICK_SHAPES = ["64x1000:fp32", "64x1000x32:fp32"]
FIELDS = [
    "kernel",
    "provider",
    "mode",
    "dtype",
    "shape",
    "p50_ms",
    "p20_ms",
    "p80_ms",
    "peak_mem_mb",
    "throughput",
    "unit",
    "frac_of_limit",
    "max_abs_diff",
    "max_rel_diff",
    "note",
]
PREDICT_FIELDS = ["pred_device", "pred_GB", "pred_TFLOP", "pred_ms", "measured_ms", "measured/predicted"]


def parse_shape(spec, device):
    dims, _, dtype = spec.partition(":")
    try:
        dims = tuple(int(x) for x in dims.split("x"))
    except ValueError:
        dims = ()
    if len(dims) not in (2, 3) or min(dims) < 1 or dtype not in ("", "fp32", "bf16"):
        raise ValueError(f"shape {spec!r}: expected NxV[:dtype] or NxVxd[:dtype], positive integers, fp32 or bf16")
    return dims, dtype or ("bf16" if device == "cuda" else "fp32")


def cases(shapes, modes, kernels, device):
    for spec in shapes:
        dims, dtype = parse_shape(spec, device)
        for kernel in kernels:
            if (kernel == "linear_sequence_logps") != (len(dims) == 3):
                continue
            for provider in PROVIDERS:
                if provider in LINEAR_ONLY and kernel != "linear_sequence_logps":
                    continue
                for mode in modes:
                    yield {"kernel": kernel, "provider": provider, "mode": mode, "dims": dims, "dtype": dtype}


# ----------------------------------------------------------------------------------------------- child process


def make_inputs(kernel, dims, dtype, device):
    """Inputs on device; the tensors the gradient is taken w.r.t. come first in the returned dict."""
    torch.manual_seed(0)
    dt = DTYPES[dtype]
    N, V = dims[:2]
    B = 2 if N % 2 == 0 else 1
    L = N // B
    x = {}
    if kernel == "linear_sequence_logps":
        D = dims[2]
        x["hidden"] = torch.randn(B, L, D, device=device).to(dt).requires_grad_()
        x["weight"] = (torch.randn(V, D, device=device) / math.sqrt(D)).to(dt).requires_grad_()
    else:
        x["logits"] = torch.randn(B, L, V, device=device).mul_(2).to(dt).requires_grad_()
        if kernel == "sequence_logratio":
            x["ref_logits"] = torch.randn(B, L, V, device=device).mul_(2).to(dt)
    x["labels"] = torch.randint(0, V, (B, L), device=device)
    x["mask"] = torch.ones(B, L, dtype=torch.bool, device=device)
    return x


def _eager_logps(logits, labels, mask):
    logp = torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1)


def _openrlhf_logps(logits, labels, mask):
    from openrlhf.models.utils import log_probs_from_logits

    return (log_probs_from_logits(logits.to(torch.float32), labels) * mask).sum(-1)


def _openrlhf_formula_logps(logits, labels, mask, rows_per_chunk=1024):
    """What ``openrlhf.models.utils.log_probs_from_logits`` (OpenRLHF 0.11.2) computes for the fp32 logits that
    OpenRLHF's Actor passes it, on a machine without flash-attn: the label logit by a gather over all fp32 logits,
    minus a logsumexp taken over chunks of 1024 token rows. Written here so it runs where OpenRLHF is absent."""
    z = logits.to(torch.float32)
    target = z.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    flat = z.reshape(-1, z.shape[-1])
    lse = torch.zeros(flat.shape[0], dtype=z.dtype, device=z.device)
    for s in range(0, flat.shape[0], rows_per_chunk):
        lse[s : s + rows_per_chunk] = torch.logsumexp(flat[s : s + rows_per_chunk], dim=-1)
    return ((target - lse.view_as(target)) * mask).sum(-1)


FROM_LOGITS = {"torch-eager": _eager_logps, "openrlhf": _openrlhf_logps, "openrlhf-formula": _openrlhf_formula_logps}


def build_op(kernel, provider, x, device, interpret=False):
    """A function running the provider's forward on inputs x and returning per-sequence sums (B, fp32).

    ``interpret``: let the Triton backend run on CPU tensors under Triton's interpreter (tiny shapes only).
    Raises RuntimeError(reason) when the provider cannot run here."""
    triton_here = device == "cuda" or (interpret and K.triton_runs_on_cpu())
    if provider == "ours-triton" and not triton_here:
        raise RuntimeError("needs a CUDA GPU")
    if provider == "openrlhf":
        try:
            import comal_openrlhf.cpu_runtime as rt

            rt.apply()
            from openrlhf.models.utils import log_probs_from_logits  # noqa: F401
        except Exception as e:  # noqa: BLE001 - any import failure makes the provider unavailable
            raise RuntimeError(f"openrlhf import failed: {type(e).__name__}: {e}") from None
    if provider == "liger-flce":
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except ImportError:
            raise RuntimeError("liger-kernel not installed") from None
        flce = LigerFusedLinearCrossEntropyLoss(reduction="none")
    if provider == "cce":
        if device != "cuda":
            raise RuntimeError("needs a CUDA GPU")
        try:
            from cut_cross_entropy import linear_cross_entropy
        except ImportError:
            raise RuntimeError("cut-cross-entropy not installed") from None

    backend = provider.removeprefix("ours-") if provider.startswith("ours") else "triton" if triton_here else "torch"
    if kernel == "sequence_logps":
        if provider.startswith("ours"):
            return lambda: K.sequence_logps(
                x["logits"], x["labels"], x["mask"], backend=backend, inplace_backward=True
            )[0]
        logps = FROM_LOGITS[provider]
        return lambda: logps(x["logits"], x["labels"], x["mask"])
    if kernel == "sequence_logratio":
        if provider.startswith("ours"):
            args = (x["logits"], x["ref_logits"], x["labels"], x["mask"])
            return lambda: K.sequence_logratio(*args, backend=backend, inplace_backward=True)[2]
        logps = FROM_LOGITS[provider]

        def logratio():
            with torch.no_grad():
                ref = logps(x["ref_logits"], x["labels"], x["mask"])
            return logps(x["logits"], x["labels"], x["mask"]) - ref

        return logratio
    h, w, labels, mask = x["hidden"], x["weight"], x["labels"], x["mask"]
    if provider.startswith("ours"):
        return lambda: K.linear_sequence_logps(h, w, labels, mask, backend=backend)[0]
    if provider == "logits+ours":  # the N x V logits materialised, then our row kernel (in-place backward)
        return lambda: K.sequence_logps(h @ w.t(), labels, mask, backend=backend, inplace_backward=True)[0]
    if provider == "liger-flce":
        return lambda: -(flce(w, h.reshape(-1, h.shape[-1]), labels.reshape(-1)).view_as(mask) * mask).sum(-1)
    if provider == "cce":
        return lambda: -(linear_cross_entropy(h, w, labels, reduction="none").view_as(mask) * mask).sum(-1)
    logps = FROM_LOGITS[provider]
    return lambda: logps(h @ w.t(), labels, mask)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def _grad_inputs(x):
    return [t for t in x.values() if t.requires_grad]


def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak_rss():
    """Reset the peak-RSS mark (ru_maxrss / VmHWM) to the current RSS, so that transients of building the inputs
    (and, after a vfork+exec, the parent's peak) do not mask the op's peak. Linux >= 4.0; False if refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def run_child(spec):
    """Run one (kernel, provider, mode, shape) row; returns the result dict (printed as JSON by main)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kernel, provider, mode = spec["kernel"], spec["provider"], spec["mode"]
    x = make_inputs(kernel, tuple(spec["dims"]), spec["dtype"], device)
    try:
        op = build_op(kernel, provider, x, device, interpret=spec.get("interpret", False))
    except RuntimeError as e:
        return {"status": "unavailable", "note": str(e)}
    grads = _grad_inputs(x)
    note = ""

    def zero():
        for t in grads:
            t.grad = None

    def forward():
        return op()

    def full():
        op().sum().backward()

    # Peak memory of one call first, in a process that has done nothing else with the inputs.
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        if not _reset_peak_rss():
            note = "peak RSS mark could not be reset: peak may be understated"
        base = _rss_mb()
    out = op()
    if mode != "forward":
        out.sum().backward()
    _sync(device)
    if device == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base  # ru_maxrss is in KiB on Linux
    sums = out.detach().float().cpu()
    means = sums / x["mask"].sum(-1).clamp(min=1).cpu()
    result = {"status": "ok", "peak_mem_mb": peak_mb, "sums": sums.tolist(), "means": means.tolist(), "note": note}
    del out
    zero()

    repeats = spec["repeats"]
    if mode == "backward":
        times = []
        for _ in range(repeats + 1):  # the first repeat is a warm-up
            zero()
            y = op().sum()
            _sync(device)
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                y.backward()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                y.backward()
                times.append((time.perf_counter() - t0) * 1e3)
        times = sorted(times[1:])
        q = [times[round(p * (len(times) - 1))] for p in (0.5, 0.2, 0.8)]
    else:
        fn = forward if mode == "forward" else full
        if device == "cuda":
            import triton.testing

            q = triton.testing.do_bench(fn, rep=spec.get("rep_ms", 100), quantiles=[0.5, 0.2, 0.8], grad_to_none=grads)
        else:
            fn()
            times = []
            for _ in range(repeats):
                zero()
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            times.sort()
            q = [times[round(p * (len(times) - 1))] for p in (0.5, 0.2, 0.8)]
    result.update(p50_ms=q[0], p20_ms=q[1], p80_ms=q[2])
    return result


# ---------------------------------------------------------------------------------------------- parent process


# ------------------------------------------------------------------------------------------- predicted times


# HBM bytes per logits element of each from-logits provider, per (forward, backward) pass, at itemsize s of the
# logits and n token rows; the chunks of the torch paths (64 MB of fp32 on GPU) exceed the 50 MB L2, so each pass
# over them counts.
#   ours-triton: read the row once; backward reads it and writes the gradient in place.
#   ours-torch:  fp32 copy (s + 4), amax (4), sub_ and exp_ in place (8 each), sum (4); backward: copy (s + 4),
#                five in-place passes (8 each), write back (4 + s).
#   torch-eager: fp32 cast (s + 4, none for fp32 logits), log_softmax (~3 passes of 4); backward: zero-filled
#                gather gradient (4), log_softmax backward (16), cast back (4 + s, none for fp32).
#   openrlhf:    modelled as torch-eager (the same fp32 cast of all logits, then a log-softmax over them).
#   openrlhf-formula: fp32 cast, then per 1024-row chunk torch.logsumexp: amax (4), z - max (8), exp_ (8), sum (4);
#                backward: exp(z - lse) * g per chunk (24), autograd's slice backward gives each of the c chunks a
#                zero-filled gradient of all N x V elements (4 c) with the chunk copied in (8), each added into the
#                accumulated gradient (12 c, with the gather's); the gather's zero-filled gradient (4); cast back.
def _cast(s):
    return s + 4 if s != 4 else 0


ROW_BYTES = {
    "ours-triton": (lambda s, n: s, lambda s, n: 2 * s),
    "ours-torch": (lambda s, n: s + 28, lambda s, n: 2 * s + 48),
    "torch-eager": (lambda s, n: _cast(s) + 12, lambda s, n: 20 + _cast(s)),
    "openrlhf-formula": (lambda s, n: _cast(s) + 24, lambda s, n: 36 + 16 * math.ceil(n / 1024) + _cast(s)),
}
ROW_BYTES["openrlhf"] = ROW_BYTES["torch-eager"]


def predict(row, device=config.H100):
    """(bytes, FLOPs, ms) of the provider's algorithm at the limits of ``device`` (a dict like ``config.H100``:
    datasheet limits, or ceilings measured on the card), from the cost model of ``config``; plus a note on what was
    assumed. None for a provider without a model."""
    dims, dtype, mode, provider = row["dims"], row["dtype"], row["mode"], row["provider"]
    s = DTYPES[dtype].itemsize
    note = ""

    def stage(name, flops, bytes_):
        return config.stage(name, flops, bytes_, dtype, device)

    if row["kernel"] != "linear_sequence_logps":
        N, V = dims
        E = N * V
        if provider not in ROW_BYTES:
            return None
        fwd_b, bwd_b = ROW_BYTES[provider]
        reads = 2 if row["kernel"] == "sequence_logratio" else 1  # the paired kernel reads policy and reference
        fwd = [stage("forward", 0.0, reads * E * fwd_b(s, N))]
        bwd = [stage("backward", 0.0, E * bwd_b(s, N))]
        stages = {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]
    else:
        N, V, D = dims
        E, gemm, W, H = N * V, 2.0 * N * V * D, V * D * s, N * D * s
        if provider in ("ours-triton", "ours-torch"):
            chunks = chunk_schedule(N, V, D, DTYPES[dtype], "cuda")
            stages = config.linear_chunked_stages(N, V, D, dtype, chunks[0][1], mode, device)
            if provider == "ours-torch":  # the row stages run as the chunked torch passes instead
                rows = {"row kernel: lse, logp": E * ROW_BYTES["ours-torch"][0](s, N)}
                rows["row kernel: dz in place"] = E * ROW_BYTES["ours-torch"][1](s, N)
                stages = [stage(st["stage"], st["flops"], rows.get(st["stage"], st["bytes"])) for st in stages]
            note = f"chunks of {chunks[0][1]} tokens"
        elif provider in ("torch-eager", "openrlhf", "openrlhf-formula", "logits+ours"):
            rows = ROW_BYTES["ours-triton" if provider == "logits+ours" else provider]
            fwd = [stage("logits GEMM", gemm, W + H + E * s), stage("log-probs", 0.0, E * rows[0](s, N))]
            bwd = [stage("log-probs backward", 0.0, E * rows[1](s, N))]
            bwd += [stage("dh GEMM", gemm, E * s + W + H), stage("dW GEMM", gemm, E * s + H + W)]
            stages = {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]
            note = "N x V logits materialised"
        elif provider == "liger-flce":
            # Liger's fused linear cross entropy does all the gradient work in its forward, in chunks of
            # next_power_of_2(N / ceil(V / D)) tokens, accumulating dW in the weight dtype; its backward only scales.
            chunk = 1 << max(0, (math.ceil(N / math.ceil(V / D)) - 1).bit_length())
            n = math.ceil(N / chunk)
            fwd = [stage("logits GEMM", gemm, n * W + H + E * s)]
            fwd += [stage("cross-entropy kernel in place", 0.0, 2 * E * s)]
            fwd += [stage("dh GEMM", gemm, n * W + E * s + H), stage("dW GEMM", gemm, 2 * n * W + E * s + H)]
            bwd = [stage("scale dh, dW", 0.0, 2 * (W + H))]
            stages = {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]
            note = f"chunks of {chunk} tokens; gradients formed in the forward"
        elif provider == "cce":
            # Cut Cross-Entropy (arXiv 2411.09009): fused kernels that never write logits; modelled at the FLOP
            # floor with h and W read once per pass; its gradient filtering (skipping vocabulary blocks whose
            # softmax is below bf16 resolution) can remove part of the backward's FLOPs, which is not credited here.
            fwd = [stage("fused logits + lse", gemm, W + H)]
            bwd = [stage("fused recompute + dh + dW", 3 * gemm, 2 * (W + H) + 4 * V * D)]
            stages = {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]
            note = "no gradient filtering credited"
        else:
            return None
    return {
        "bytes": sum(st["bytes"] for st in stages),
        "flops": sum(st["flops"] for st in stages),
        "ms": config.total_ms(stages),
        "device": device["name"],
        "note": note,
    }


def effective(row, p50_ms):
    """(rate, unit): the minimal bytes (logits read once per pass, gradient written once) or useful FLOPs (2NdV
    forward, 4NdV backward) of the row over its p50 time."""
    dims, dt = row["dims"], DTYPES[row["dtype"]]
    passes = {"forward": 1, "backward": 2, "full": 3}[row["mode"]]  # logits reads + gradient write
    if row["kernel"] == "linear_sequence_logps":
        N, V, D = dims
        amount, unit = {"forward": 2, "backward": 4, "full": 6}[row["mode"]] * N * V * D / 1e12, "TFLOP/s"
    else:
        N, V = dims
        reads = 2 if row["kernel"] == "sequence_logratio" and row["mode"] != "backward" else 1
        amount, unit = (reads + passes - 1) * N * V * dt.itemsize / 1e9, "GB/s"
    return amount / (p50_ms / 1e3), unit


def limit(row, unit, device):
    """The device's limit for a rate in ``unit`` (GB/s: HBM bandwidth; TFLOP/s: dense peak of the row's dtype)."""
    return device["hbm_bytes_s"] / 1e9 if unit == "GB/s" else device["flops_s"][row["dtype"]] / 1e12


def datasheet(device):
    """config's datasheet limits of this machine's GPU (H100 or H200), else None."""
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((d for key, d in DEVICES.items() if key.upper() in name), None)


def throughput(row, p50_ms, device):
    rate, unit = effective(row, p50_ms)
    sheet = datasheet(device)
    return rate, unit, (f"{rate / limit(row, unit, sheet):.2f}" if sheet else "n/a")


def unavailable_here(provider, device):
    """Skip, without starting a subprocess, the providers that cannot run here (build_op re-checks in the child)."""
    if provider == "openrlhf" and importlib.util.find_spec("openrlhf") is None:
        return {"status": "unavailable", "note": "openrlhf not installed"}
    if provider == "ours-triton" and device != "cuda":
        return {"status": "unavailable", "note": "needs a CUDA GPU"}
    if provider == "liger-flce" and importlib.util.find_spec("liger_kernel") is None:
        return {"status": "unavailable", "note": "liger-kernel not installed"}
    if provider == "cce":
        if device != "cuda":
            return {"status": "unavailable", "note": "needs a CUDA GPU"}
        if importlib.util.find_spec("cut_cross_entropy") is None:
            return {"status": "unavailable", "note": "cut-cross-entropy not installed"}
    return None


def run_row(row, repeats, threads, out_dir):
    spec = {**row, "repeats": repeats}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    # cwd = out_dir: from the repository root our kernels/ folder would shadow the PyPI package `kernels`.
    p = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=env,
        cwd=out_dir,
        check=False,
    )
    for line in p.stdout.splitlines():
        if line.startswith("BENCH_RESULT "):
            return json.loads(line[len("BENCH_RESULT ") :])
    return {"status": "error", "note": f"exit {p.returncode}: " + (p.stderr.strip().splitlines() or [""])[-1][:200]}


def fmt(v, digits=3):
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--mode", choices=MODES + ("all",), default="all")
    ap.add_argument("--shapes", nargs="+", help="NxV[:dtype] or NxVxd[:dtype] (dtype fp32 or bf16)")
    ap.add_argument("--kernels", nargs="+", choices=KERNELS, default=list(KERNELS))
    ap.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats on CPU (default 5, quick 1)")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads per run (default 1 on CPU)")
    ap.add_argument("--out", default="runs/kernel_bench", help="folder for bench.md and bench.csv")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, full mode, 1 repeat: a smoke test")
    ap.add_argument(
        "--predict",
        choices=sorted(DEVICES),
        help="add per row the bytes and FLOPs of the provider's algorithm and the time they imply at that device's "
        'datasheet limits (kernels/config.py), next to the time measured on such a device ("not measured" elsewhere)',
    )
    ap.add_argument("--no-run", dest="no_run", action="store_true", help="measure nothing (with --predict: the model)")
    ap.add_argument("--json", action="store_true", help="print only one JSON object on stdout (all else to stderr)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        print("BENCH_RESULT " + json.dumps(run_child(json.loads(args.child))), flush=True)
        return
    # Only this process writes to stdout here (the rows run in child processes, whose output is read, not passed
    # on), so --json needs no redirect: everything but the final JSON object goes to stderr.

    def say(*parts):
        print(*parts, file=sys.stderr if args.json else sys.stdout, flush=True)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    modes = list(MODES) if args.mode == "all" else [args.mode]
    if args.quick:
        modes = ["full"] if args.mode == "all" else modes
    shapes = args.shapes or (QUICK_SHAPES if args.quick else GPU_SHAPES if device == "cuda" else CPU_SHAPES)
    for spec in shapes:  # every shape checked before the first row runs: one error line, never a traceback
        try:
            parse_shape(spec, device)
        except ValueError as e:
            ap.error(f"--shapes: {e}")
    repeats = args.repeats or (1 if args.quick else 5)
    threads = args.threads or (1 if device == "cpu" else None)
    out_dir = os.path.abspath(args.out)
    os.makedirs(out_dir, exist_ok=True)

    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({threads} thread(s))"
    if device == "cuda":
        memory = "torch.cuda.max_memory_allocated - memory_allocated"
        timing = "triton.testing.do_bench (backward mode: CUDA events), ms"
    else:
        memory = (
            "peak RSS (getrusage ru_maxrss, its mark reset via /proc/self/clear_refs once the inputs exist) - RSS "
            "at that point"
        )
        timing = f"time.perf_counter, median (p20/p80) of {repeats} repeats, ms"
    header = [
        f"# Kernel benchmark on {where}, torch {torch.__version__}",
        "",
        (
            "Peak memory of one forward (forward mode) or forward + backward (backward, full), as growth over the "
            f"memory held once the inputs exist, each row in a fresh subprocess: {memory}."
        ),
        f"Timing: {timing}.",
        (
            "Throughput is effective (minimal bytes or useful FLOPs / p50); fraction of the datasheet limit on an "
            "H100 (3.35 TB/s, 989 TFLOP/s) or H200 (4.8 TB/s, 989 TFLOP/s) only."
        ),
        (
            "vs torch-eager: max_abs_diff of the per-sequence mean log-prob (sum / tokens), max_rel_diff of the "
            "sums (sums of ~1e4 differ by fp32 rounding of the summation order alone)."
        ),
    ]
    if device != "cuda":
        header.append("NOTE: no GPU here - Triton timings need a GPU; ours-triton rows are skipped on CPU.")
    target = DEVICES.get(args.predict)
    on_target = target is not None and datasheet(device) is target
    if target:
        header.append(
            f"Predicted ({target['name']}: {target['hbm_bytes_s'] / 1e12:.2f} TB/s HBM, "
            f"{target['flops_s']['bf16'] / 1e12:.0f} TFLOP/s dense bf16, {target['flops_s']['fp32'] / 1e12:.0f} "
            "TFLOP/s fp32): bytes and FLOPs of each provider's algorithm, each stage max(FLOPs / peak, bytes / "
            "bandwidth), summed (kernels/config.py); a lower bound. measured_ms is the p50 above when this machine is "
            f'an {args.predict.upper()}, else "not measured".'
        )
    say("\n".join(header))

    rows, ref = [], {}
    for row in cases(shapes, modes, args.kernels, device):
        if row["provider"] not in args.providers:
            continue
        t0 = time.time()
        if args.no_run:
            res = {"status": "not run", "note": "--no-run"}
        else:
            res = unavailable_here(row["provider"], device) or run_row(row, repeats, threads, out_dir)
        shape = "x".join(map(str, row["dims"]))
        rec = {k: row[k] for k in ("kernel", "provider", "mode", "dtype")}
        rec.update(shape=shape, note=res.get("note", ""))
        if res["status"] == "ok":
            rate, unit, frac = throughput(row, res["p50_ms"], device)
            rec.update({k: res[k] for k in ("p50_ms", "p20_ms", "p80_ms", "peak_mem_mb")})
            rec.update(throughput=rate, unit=unit, frac_of_limit=frac)
            key = (row["kernel"], shape, row["dtype"])
            if row["provider"] == "torch-eager":
                ref[key] = {k: torch.tensor(res[k], dtype=torch.float64) for k in ("sums", "means")}
            if key in ref:
                rec["max_abs_diff"] = (torch.tensor(res["means"]) - ref[key]["means"]).abs().max().item()
                rel = (torch.tensor(res["sums"]) - ref[key]["sums"]).abs() / ref[key]["sums"].abs().clamp(min=1e-30)
                rec["max_rel_diff"] = rel.max().item()
        if target:
            pr = predict(row, target)
            if pr is not None:
                rec.update(pred_device=pr["device"], pred_GB=pr["bytes"] / 1e9, pred_TFLOP=pr["flops"] / 1e12)
                rec["pred_ms"] = pr["ms"]
                measured = on_target and res["status"] == "ok"
                rec["measured_ms"] = res["p50_ms"] if measured else "not measured"
                rec["measured/predicted"] = res["p50_ms"] / pr["ms"] if measured else ""
                if pr["note"]:
                    rec["note"] = "; ".join(x for x in (rec["note"], pr["note"]) if x)
        rows.append(rec)
        say(
            f"  {rec['kernel']:22s} {rec['provider']:12s} {rec['mode']:8s} {shape:18s} {rec['dtype']} "
            f"{res['status']} ({time.time() - t0:.1f}s) {rec['note']}"
        )

    fields = FIELDS[:-1] + (PREDICT_FIELDS if args.predict else []) + FIELDS[-1:]
    table = ["| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
    table += ["| " + " | ".join(fmt(r.get(k, "")) for k in fields) + " |" for r in rows]
    summary = target_check(rows)
    text = "\n".join(header + [""] + table + [""] + summary) + "\n"
    with open(os.path.join(out_dir, "bench.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out_dir, "bench.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows({k: r.get(k, "") for k in fields} for r in rows)
    say("\n" + "\n".join(table + [""] + summary))
    say(f"\nwrote {out_dir}/bench.md and bench.csv")
    if args.json:
        print(json.dumps({"device": where, "header": header, "rows": rows, "summary": summary}), flush=True)


def target_check(rows):
    """The CPU target: ours-torch peak <= 1/3 of OpenRLHF's at N=4096, V=32000 fp32; means within 1e-5 of eager."""
    case = ("sequence_logps", "4096x32000", "fp32")
    found = {(r["provider"], r["mode"]): r for r in rows if (r["kernel"], r["shape"], r["dtype"]) == case}
    lines = []
    for mode in MODES:
        ours, theirs = found.get(("ours-torch", mode), {}), found.get(("openrlhf", mode), {})
        if "peak_mem_mb" not in ours or "peak_mem_mb" not in theirs:
            continue
        ratio = ours["peak_mem_mb"] / max(theirs["peak_mem_mb"], 1e-9)
        diffs = [r.get("max_abs_diff", float("nan")) for r in (ours, theirs)]
        ok = ratio <= 1 / 3 and all(d <= 1e-5 for d in diffs)
        lines.append(
            f"target sequence_logps {mode} N=4096 V=32000 fp32: ours-torch {ours['peak_mem_mb']:.0f} MB vs openrlhf "
            f"{theirs['peak_mem_mb']:.0f} MB (ratio {ratio:.3f}, target <= 0.333); max |mean log-prob diff| vs "
            f"eager: ours {diffs[0]:.2e}, openrlhf {diffs[1]:.2e} -> {'PASS' if ok else 'FAIL'}"
        )
    return lines


if __name__ == "__main__":
    main()
