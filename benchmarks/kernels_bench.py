"""Benchmark of the per-sequence log-prob kernels against the paths they replace.

    python -m comal_openrlhf.kernels.bench                                  # default shapes for this device
    python -m comal_openrlhf.kernels.bench --mode full --shapes 4096x32000:fp32 --repeats 5 --out runs/bench
    python -m comal_openrlhf.kernels.bench --quick                          # tiny shapes, seconds (smoke test)

Shapes are ``NxV[:dtype]`` (N tokens, vocabulary V) for ``sequence_logps`` and ``sequence_logratio`` and
``NxVxd[:dtype]`` for ``linear_sequence_logps``; the N tokens are laid out as 2 sequences of N/2 (a preference
pair), all unmasked, temperature 1.

Providers: ``torch-eager`` (fp32 log_softmax + gather, also the reference of the diff columns), ``openrlhf``
(OpenRLHF 0.11.2's path: fp32 cast of the logits, then ``openrlhf.models.utils.log_probs_from_logits``; marked
unavailable if it cannot be imported), ``ours-triton`` (CUDA only), ``ours-torch`` (chunked), and for the linear
kernel the published anchors when installed (``pip install .[bench]``): ``liger-flce`` (Liger's fused linear cross
entropy) and ``cce`` (Apple's Cut Cross-Entropy, arXiv 2411.09009; CUDA only). Ours run with
``inplace_backward=True`` where the op has it. Modes: forward (graph built, as in training), backward
(backward only; an untimed forward before each repeat) and full (forward + backward).

Every (kernel, provider, mode, shape) row runs in a fresh subprocess, so the peak memory of one row is not hidden
by the allocations of another. Peak memory is that of one forward (forward mode) or one forward + backward
(backward and full modes), as growth over the memory held once the inputs exist: on CUDA
``torch.cuda.max_memory_allocated`` minus ``memory_allocated``; on CPU the peak RSS (``ru_maxrss``) minus the RSS
right after allocating the inputs, with the peak mark reset there through /proc/self/clear_refs (tracemalloc does
not see torch's allocations). Timings: on CUDA ``triton.testing.do_bench`` (backward mode: CUDA events around
``backward()``, since each repeat needs a fresh forward); on CPU the median (p20, p80) of ``time.perf_counter``
over the repeats, one thread unless --threads says otherwise. Throughput is effective: the minimal bytes (logits
read once per pass, gradient written once) or useful FLOPs (2NdV forward, 4NdV backward) over the p50 time; the
fraction of the device limit is given on an H100 only. Accuracy columns compare with torch-eager: max_abs_diff of
the per-sequence mean log-prob, max_rel_diff of the per-sequence sums.

``--predict h100`` adds per row the HBM bytes and FLOPs of the provider's algorithm and the time they imply at H100
limits (the stage model of ``config``; ``predict`` below lists each provider's assumptions), next to the time
measured on an H100 ("not measured" on any other machine) and their ratio. ``--no-run`` skips the measurements
(predictions only). ``--json`` prints one JSON object on stdout and everything else on stderr.
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

from comal_openrlhf._cli import json_stdout

KERNELS = ("sequence_logps", "sequence_logratio", "linear_sequence_logps")
PROVIDERS = ("torch-eager", "openrlhf", "ours-triton", "ours-torch", "liger-flce", "cce")
LINEAR_ONLY = ("liger-flce", "cce")
MODES = ("forward", "backward", "full")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
H100 = {"GB/s": 3350.0, "TFLOP/s": 989.0}  # HBM3 bandwidth and dense bf16 tensor-core peak

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
PREDICT_FIELDS = ["pred_GB", "pred_TFLOP", "h100_pred_ms", "h100_measured_ms", "measured/predicted"]


def parse_shape(spec, device):
    dims, _, dtype = spec.partition(":")
    dims = tuple(int(x) for x in dims.split("x"))
    if len(dims) not in (2, 3):
        raise ValueError(f"shape {spec!r}: expected NxV or NxVxd")
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


def build_op(kernel, provider, x, device):
    """A function running the provider's forward on inputs x and returning per-sequence sums (B, fp32).

    Raises RuntimeError(reason) when the provider cannot run here."""
    if provider == "ours-triton" and device != "cuda":
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

    from comal_openrlhf import kernels as K

    backend = provider.removeprefix("ours-")
    if kernel == "sequence_logps":
        if provider.startswith("ours"):
            return lambda: K.sequence_logps(
                x["logits"], x["labels"], x["mask"], backend=backend, inplace_backward=True
            )[0]
        logps = _eager_logps if provider == "torch-eager" else _openrlhf_logps
        return lambda: logps(x["logits"], x["labels"], x["mask"])
    if kernel == "sequence_logratio":
        if provider.startswith("ours"):
            args = (x["logits"], x["ref_logits"], x["labels"], x["mask"])
            return lambda: K.sequence_logratio(*args, backend=backend, inplace_backward=True)[2]
        logps = _eager_logps if provider == "torch-eager" else _openrlhf_logps

        def logratio():
            with torch.no_grad():
                ref = logps(x["ref_logits"], x["labels"], x["mask"])
            return logps(x["logits"], x["labels"], x["mask"]) - ref

        return logratio
    h, w, labels, mask = x["hidden"], x["weight"], x["labels"], x["mask"]
    if provider.startswith("ours"):
        return lambda: K.linear_sequence_logps(h, w, labels, mask, backend=backend)[0]
    if provider == "liger-flce":
        return lambda: -(flce(w, h.reshape(-1, h.shape[-1]), labels.reshape(-1)).view_as(mask) * mask).sum(-1)
    if provider == "cce":
        return lambda: -(linear_cross_entropy(h, w, labels, reduction="none").view_as(mask) * mask).sum(-1)
    logps = _eager_logps if provider == "torch-eager" else _openrlhf_logps
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
        op = build_op(kernel, provider, x, device)
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

            q = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], grad_to_none=grads)
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
# logits; the chunks of the torch paths (64 MB of fp32 on GPU) exceed the 50 MB L2, so each pass over them counts.
#   ours-triton: read the row once; backward reads it and writes the gradient in place.
#   ours-torch:  fp32 copy (s + 4), amax (4), sub_ and exp_ in place (8 each), sum (4); backward: copy (s + 4),
#                five in-place passes (8 each), write back (4 + s).
#   torch-eager: fp32 cast (s + 4, none for fp32 logits), log_softmax (~3 passes of 4); backward: zero-filled
#                gather gradient (4), log_softmax backward (16), cast back (4 + s, none for fp32).
#   openrlhf:    modelled as torch-eager (the same fp32 cast of all logits, then a log-softmax over them).
ROW_BYTES = {
    "ours-triton": (lambda s: s, lambda s: 2 * s),
    "ours-torch": (lambda s: s + 28, lambda s: 2 * s + 48),
    "torch-eager": (lambda s: (s + 4 if s != 4 else 0) + 12, lambda s: 20 + (4 + s if s != 4 else 0)),
}
ROW_BYTES["openrlhf"] = ROW_BYTES["torch-eager"]


def predict(row):
    """(bytes, FLOPs, ms) of the provider's algorithm at H100 limits, from the cost model of ``config``; plus a
    note on what was assumed. None for a provider without a model."""
    from .config import H100, linear_chunked_stages, stage, total_ms

    dims, dtype, mode, provider = row["dims"], row["dtype"], row["mode"], row["provider"]
    s = DTYPES[dtype].itemsize
    note = ""
    if row["kernel"] != "linear_sequence_logps":
        N, V = dims
        E = N * V
        fwd_b, bwd_b = ROW_BYTES[provider]
        reads = 2 if row["kernel"] == "sequence_logratio" else 1  # the paired kernel reads policy and reference
        fwd = [stage("forward", 0.0, reads * E * fwd_b(s), dtype)]
        bwd = [stage("backward", 0.0, E * bwd_b(s), dtype)]
        stages = {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]
    else:
        from .linear_sequence_logps import chunk_schedule

        N, V, D = dims
        E, gemm, W, H = N * V, 2.0 * N * V * D, V * D * s, N * D * s
        if provider in ("ours-triton", "ours-torch"):
            chunks = chunk_schedule(N, V, D, DTYPES[dtype], "cuda")
            stages = linear_chunked_stages(N, V, D, dtype, chunks[0][1], mode)
            if provider == "ours-torch":  # the row stages run as the chunked torch passes instead
                rows = {"row kernel: lse, logp": E * ROW_BYTES["ours-torch"][0](s)}
                rows["row kernel: dz in place"] = E * ROW_BYTES["ours-torch"][1](s)
                stages = [stage(st["stage"], st["flops"], rows.get(st["stage"], st["bytes"]), dtype) for st in stages]
            note = f"chunks of {chunks[0][1]} tokens"
        elif provider in ("torch-eager", "openrlhf"):
            fwd = [stage("logits GEMM", gemm, W + H + E * s, dtype)]
            fwd += [stage("log-softmax", 0.0, E * ROW_BYTES["torch-eager"][0](s), dtype)]
            bwd = [stage("log-softmax backward", 0.0, E * ROW_BYTES["torch-eager"][1](s), dtype)]
            bwd += [stage("dh GEMM", gemm, E * s + W + H, dtype), stage("dW GEMM", gemm, E * s + H + W, dtype)]
            stages = {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]
            note = "N x V logits materialised"
        elif provider == "liger-flce":
            # Liger's fused linear cross entropy does all the gradient work in its forward, in chunks of
            # next_power_of_2(N / ceil(V / D)) tokens, accumulating dW in the weight dtype; its backward only scales.
            chunk = 1 << max(0, (math.ceil(N / math.ceil(V / D)) - 1).bit_length())
            n = math.ceil(N / chunk)
            fwd = [stage("logits GEMM", gemm, n * W + H + E * s, dtype)]
            fwd += [stage("cross-entropy kernel in place", 0.0, 2 * E * s, dtype)]
            fwd += [
                stage("dh GEMM", gemm, n * W + E * s + H, dtype),
                stage("dW GEMM", gemm, 2 * n * W + E * s + H, dtype),
            ]
            bwd = [stage("scale dh, dW", 0.0, 2 * (W + H), dtype)]
            stages = {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]
            note = f"chunks of {chunk} tokens; gradients formed in the forward"
        elif provider == "cce":
            # Cut Cross-Entropy (arXiv 2411.09009): fused kernels that never write logits; modelled at the FLOP
            # floor with h and W read once per pass; its gradient filtering (skipping vocabulary blocks whose
            # softmax is below bf16 resolution) can remove part of the backward's FLOPs, which is not credited here.
            fwd = [stage("fused logits + lse", gemm, W + H, dtype)]
            bwd = [stage("fused recompute + dh + dW", 3 * gemm, 2 * (W + H) + 4 * V * D, dtype)]
            stages = {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]
            note = "no gradient filtering credited"
        else:
            return None
    return {
        "bytes": sum(st["bytes"] for st in stages),
        "flops": sum(st["flops"] for st in stages),
        "ms": total_ms(stages),
        "device": H100["name"],
        "note": note,
    }


def throughput(row, p50_ms, device):
    dims, dt = row["dims"], DTYPES[row["dtype"]]
    passes = {"forward": 1, "backward": 2, "full": 3}[row["mode"]]  # logits reads + gradient write
    if row["kernel"] == "linear_sequence_logps":
        N, V, D = dims
        amount, unit = {"forward": 2, "backward": 4, "full": 6}[row["mode"]] * N * V * D / 1e12, "TFLOP/s"
    else:
        N, V = dims
        reads = 2 if row["kernel"] == "sequence_logratio" and row["mode"] != "backward" else 1
        amount, unit = (reads + passes - 1) * N * V * dt.itemsize / 1e9, "GB/s"
    rate = amount / (p50_ms / 1e3)
    on_h100 = device == "cuda" and "H100" in torch.cuda.get_device_name()
    return rate, unit, (f"{rate / H100[unit]:.2f}" if on_h100 else "n/a")


def unavailable_here(provider, device):
    """Skip, without starting a subprocess, the providers that cannot run here (build_op re-checks in the child)."""
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
        [sys.executable, "-m", "comal_openrlhf.kernels.bench", "--child", json.dumps(spec)],
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
        choices=["h100"],
        help="add per row the bytes and FLOPs of the provider's algorithm and the time they imply at H100 limits "
        '(3.35 TB/s, 989 TFLOP/s bf16), next to the time measured on an H100 ("not measured" elsewhere)',
    )
    ap.add_argument("--no-run", dest="no_run", action="store_true", help="measure nothing (with --predict: the model)")
    ap.add_argument("--json", action="store_true", help="print only one JSON object on stdout (all else to stderr)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        print("BENCH_RESULT " + json.dumps(run_child(json.loads(args.child))), flush=True)
        return
    with json_stdout(args.json) as emit:  # --json: descriptor 1 goes to stderr until the JSON object is printed
        return _main(args, emit)


def _main(args, emit):
    def say(*parts):
        print(*parts, file=sys.stderr if args.json else sys.stdout, flush=True)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    modes = list(MODES) if args.mode == "all" else [args.mode]
    if args.quick:
        modes = ["full"] if args.mode == "all" else modes
    shapes = args.shapes or (QUICK_SHAPES if args.quick else GPU_SHAPES if device == "cuda" else CPU_SHAPES)
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
            "Throughput is effective (minimal bytes or useful FLOPs / p50); fraction of limit on H100 only "
            "(3.35 TB/s, 989 TFLOP/s)."
        ),
        (
            "vs torch-eager: max_abs_diff of the per-sequence mean log-prob (sum / tokens), max_rel_diff of the "
            "sums (sums of ~1e4 differ by fp32 rounding of the summation order alone)."
        ),
    ]
    if device != "cuda":
        header.append("NOTE: no GPU here - Triton timings need a GPU; ours-triton rows are skipped on CPU.")
    on_h100 = device == "cuda" and "H100" in torch.cuda.get_device_name()
    if args.predict:
        header.append(
            "Predicted (H100 SXM: 3.35 TB/s HBM, 989 TFLOP/s dense bf16, 67 TFLOP/s fp32): bytes and FLOPs of each "
            "provider's algorithm, each stage max(FLOPs / peak, bytes / bandwidth), summed (kernels/config.py); a "
            'lower bound. h100_measured_ms is the p50 above when this machine is an H100, else "not measured".'
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
        if args.predict:
            pr = predict(row)
            if pr is not None:
                rec["pred_GB"], rec["pred_TFLOP"], rec["h100_pred_ms"] = (
                    pr["bytes"] / 1e9,
                    pr["flops"] / 1e12,
                    pr["ms"],
                )
                measured = on_h100 and res["status"] == "ok"
                rec["h100_measured_ms"] = res["p50_ms"] if measured else "not measured"
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
        emit({"device": where, "header": header, "rows": rows, "summary": summary})


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
