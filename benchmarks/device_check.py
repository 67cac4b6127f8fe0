"""The first run on a lent GPU in one prepared call: environment, ceilings, kernel tests, kernel rows, a COMAL step.

    python3 benchmarks/device_check.py                    # on the GPU machine, from the repository root
    python3 benchmarks/device_check.py --dry-run          # on a CPU: every step at tiny sizes, same JSON
    python3 benchmarks/device_check.py --steps kernel_bench,comal_step   # a rerun of some steps

Needs only what the GPU image has (python3 with torch, triton, transformers, numpy, pytest); the project need not
be installed (the kernels and ``comal_openrlhf/losses.py`` are imported from this checkout, ``_checkout.py``).
Writes ``device_check.json`` and ``device_check.log`` to ``--out`` (default: $OUT, else ./device_out).

Steps, in order, each in its own process (a step that crashes, hangs or runs out of its time is recorded with its
error and the next one starts; the JSON is rewritten atomically after every step, with every step listed):

- environment: GPU name, SM count, memory, L2, compute capability, driver, clocks (nvidia-smi, if present);
  python, torch, CUDA, triton, transformers and numpy versions.
- ceilings: this card's own limits, measured before anything is compared with them: device-to-device copy
  (bytes read + written per second), bf16 GEMM at the benchmark's logits size (N x d @ d x V) and at 8192^3,
  fp32 GEMM without TF32 at 4096^3.
- kernel_tests: pytest on the kernel test files in a subprocess (on a GPU their cases run on CUDA tensors, the
  "triton" backend compiled); pass / fail / skip counts and the failing test ids.
- kernel_bench: rows of ``kernels_bench.py`` at N=16,384, V=128,256 (bf16 and fp32) and d=4,096 (bf16, fused
  linear): ours-triton, ours-torch, openrlhf-formula (OpenRLHF 0.11.2's log_probs_from_logits without flash-attn,
  written out there) and logits+ours (materialised logits, then our row kernel), forward and forward + backward;
  p50 (p20, p80) from triton.testing.do_bench, peak memory, accuracy against openrlhf-formula, the time predicted
  by the cost model of ``kernels/config.py`` at the ceilings measured in this run and at the datasheet limits, and
  the effective rate as a fraction of the measured ceiling.
- comal_step: one COMAL prox step (forward + backward of the IPO prox loss of ``comal_openrlhf/losses.py`` with a
  cached centre) on a randomly initialised Llama-style model of about 1.2B parameters (transformers config, no hub;
  Llama-3.2-1B's shape), bf16, 8 pairs x 1,024 tokens, through three log-prob paths: linear (backbone, then
  ``linear_sequence_logps``: no logits), logits (our row kernel on the bf16 logits) and openrlhf-formula (fp32 copy
  of the logits); time over repeats and peak memory.
- train_comal: not run; records why (OpenRLHF and DeepSpeed cannot be carried to the machine, see WHEELS).
- environment_after: clocks again, after the load.

``--budget`` (default 300 s on a GPU) bounds the whole run: each step gets its own cap, cut so that the steps after
it keep their minimum, and a step that would get less than a few seconds is skipped. ``--dry-run`` runs every step
on CPU tensors at tiny sizes (Triton kernels under its interpreter). ``--inject-fail STEP`` and ``--inject-hang
STEP`` make a step raise or hang, to check that the others still run and the JSON still says what happened.
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import types

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SCHEMA = 1

# (name, cap seconds, floor seconds) on a GPU; a dry run scales both by DRY_SCALE. The floor is what a step keeps
# when the steps before it run long.
STEPS = [
    ("environment", 30, 10),
    ("ceilings", 45, 15),
    ("kernel_tests", 120, 30),
    ("kernel_bench", 120, 40),
    ("comal_step", 100, 40),
    ("train_comal", 5, 1),
    ("environment_after", 15, 5),
]
STEP_NAMES = [s[0] for s in STEPS]
DRY_SCALE = 0.5
GPU_BUDGET = 300.0
DRY_BUDGET = 150.0

KERNEL_TEST_FILES = [
    "tests/test_kernels_sequence_logps.py",
    "tests/test_kernels_logratio.py",
    "tests/test_kernels_linear.py",
    "tests/test_kernels_aot.py",
    "tests/test_kernels_bench.py",
]
DRY_TEST_SELECTION = ["tests/test_kernels_sequence_logps.py", "-k", "inplace_backward"]

# The COMAL step's model: Llama-3.2-1B's shape (tied embeddings), randomly initialised.
LLAMA_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)
LLAMA_TINY = dict(LLAMA_1B, vocab_size=1000, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2)  # fmt: skip

# What train_comal would need on the machine beyond its image, as ``pip download --no-deps`` (cp312, manylinux)
# saved it on 2026-12-07; the tree that travels to the machine is limited to 64 MiB. Sizes in bytes.
WHEELS = {
    "openrlhf-0.11.2-cp312-cp312-manylinux1_x86_64.whl": 198_360,
    "deepspeed-0.19.6.tar.gz (sdist; its CUDA ops are JIT-built at run time)": 1_923_541,
    "flash_attn-2.8.3.tar.gz (sdist; its CUDA extension must be built with nvcc)": 8_447_812,
    "ray-2.55.0-cp312-cp312-manylinux2014_x86_64.whl": 73_765_215,
    "bitsandbytes-0.42.0-py3-none-any.whl": 104_960_014,
    "wandb-0.31.0-py3-none-manylinux_2_28_x86_64.whl": 20_337_507,
    "datasets-5.2.0-py3-none-any.whl": 608_276,
}
TREE_LIMIT = 64 * 2**20


# ------------------------------------------------------------------------------------------------ parent process


def now():
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def write_json(path, obj):
    """Write obj as JSON atomically: a reader (or a killed run) sees the old file or the new one, never half."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Log:
    """The short log: each line goes to stdout and to device_check.log."""

    def __init__(self, path, t0):
        self.path, self.t0 = path, t0
        open(path, "w").close()

    def __call__(self, *parts):
        line = f"[{time.monotonic() - self.t0:6.1f}s] " + " ".join(str(p) for p in parts)
        print(line, flush=True)
        with open(self.path, "a") as f:
            f.write(line + "\n")


def run_child(step, config, timeout, scratch):
    """Run one step in a fresh process (its own process group, killed whole at the timeout). Returns (status,
    result, error, stderr tail); the child writes its result file after each part, so a killed step keeps what it
    finished."""
    result_path = os.path.join(scratch, f"{step}.json")
    config_path = os.path.join(scratch, f"{step}.config.json")
    write_json(config_path, config)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", step, "--config", config_path]
    cmd += ["--result", result_path]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if config["dry_run"]:
        env["CUDA_VISIBLE_DEVICES"] = ""  # CPU tensors (Triton under its interpreter), even on a GPU machine
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    status, error = "ok", None
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        status, error = "timeout", f"stopped after its {timeout:.0f} s"
    result = {}
    if os.path.exists(result_path):
        with open(result_path) as f:
            result = json.load(f)
    if status == "ok" and proc.returncode != 0:
        status = "error"
        error = result.pop("_error", None) or f"exit status {proc.returncode}"
    result.pop("_error", None)
    return status, result, error, (output or "")[-3000:]


def plan(args):
    """[(name, cap, floor)] scaled for a dry run, and which steps were asked for."""
    scale = DRY_SCALE if args.dry_run else 1.0
    chosen = STEP_NAMES if not args.steps else [s.strip() for s in args.steps.split(",") if s.strip()]
    unknown = set(chosen) - set(STEP_NAMES)
    if unknown:
        raise SystemExit(f"--steps: unknown {sorted(unknown)}; steps are {', '.join(STEP_NAMES)}")
    return [(n, cap * scale, floor * scale) for n, cap, floor in STEPS], set(chosen)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or "device_out", help="folder (default $OUT, ./device_out)")
    ap.add_argument("--budget", type=float, default=None, help=f"seconds for the whole run (GPU {GPU_BUDGET:.0f})")
    ap.add_argument("--dry-run", dest="dry_run", action="store_true", help="CPU tensors, tiny sizes, same JSON")
    ap.add_argument("--steps", help=f"comma-separated subset of: {', '.join(STEP_NAMES)}")
    ap.add_argument("--inject-fail", dest="inject_fail", choices=STEP_NAMES, help="make this step raise")
    ap.add_argument("--inject-hang", dest="inject_hang", choices=STEP_NAMES, help="make this step hang")
    ap.add_argument("--child", choices=STEP_NAMES, help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child_main(args.child, args.config, args.result)

    t0 = time.monotonic()
    budget = args.budget or (DRY_BUDGET if args.dry_run else GPU_BUDGET)
    steps, chosen = plan(args)
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "device_check.json")
    log = Log(os.path.join(args.out, "device_check.log"), t0)
    report = {
        "schema": SCHEMA,
        "started": now(),
        "finished": None,
        "dry_run": args.dry_run,
        "budget_s": budget,
        "elapsed_s": 0.0,
        "argv": sys.argv[1:] if argv is None else list(argv),
        "host": platform.node(),
        "steps": {n: {"status": "pending", "seconds": 0.0, "timeout_s": None, "error": None, "result": {}}
                  for n, _, _ in steps},  # fmt: skip
        "summary": {},
    }
    write_json(json_path, report)
    log(f"device_check: budget {budget:.0f} s, dry run {args.dry_run}, out {os.path.abspath(args.out)}")
    scratch = tempfile.mkdtemp(prefix="device_check_")
    context = {}  # results that later steps read (the measured ceilings)
    try:
        for i, (name, cap, floor) in enumerate(steps):
            entry = report["steps"][name]
            remaining = budget - (time.monotonic() - t0)
            keep = sum(f for n, _, f in steps[i + 1 :] if n in chosen)
            timeout = min(cap, remaining - keep)
            if name not in chosen:
                entry.update(status="skipped", error="not in --steps")
            elif timeout < min(floor, 5.0):
                entry.update(
                    status="skipped", error=f"time budget: {remaining:.0f} s left, {keep:.0f} s kept for later"
                )
            else:
                config = {"dry_run": args.dry_run, "deadline_s": timeout, "context": context}
                config["inject"] = "fail" if args.inject_fail == name else "hang" if args.inject_hang == name else None
                log(f"{name}: start (cap {timeout:.0f} s)")
                t = time.monotonic()
                status, result, error, tail = run_child(name, config, timeout, scratch)
                entry.update(status=status, seconds=round(time.monotonic() - t, 2), timeout_s=round(timeout, 1))
                entry.update(result=result, error=error)
                if status != "ok":
                    entry["output_tail"] = tail
                    log(f"{name}: {status}: {error}")
                    log("  " + "\n  ".join(tail.strip().splitlines()[-15:]))
                if name == "ceilings" and "limits" in result:
                    context["limits"] = result["limits"]
            log(f"{name}: {entry['status']} ({entry['seconds']:.1f} s)" + describe(name, entry))
            report["elapsed_s"] = round(time.monotonic() - t0, 2)
            report["summary"] = summarise(report["steps"])
            write_json(json_path, report)
    finally:
        report["finished"] = now()
        report["elapsed_s"] = round(time.monotonic() - t0, 2)
        report["summary"] = summarise(report["steps"])
        write_json(json_path, report)
        shutil.rmtree(scratch, ignore_errors=True)
    for line in table(report):
        log(line)
    log(f"wrote {json_path} ({report['elapsed_s']:.0f} s)")
    return 0


def describe(name, entry):
    """A few words of a step's result for the log line."""
    r = entry.get("result") or {}
    if name == "environment" and r:
        return f": {r.get('device_name')}, torch {r.get('torch')}, triton {r.get('triton')}"
    if name == "ceilings" and "copy" in r:
        g = r.get("gemm_bf16_bench", {})
        return f": copy {r['copy']['bytes_s'] / 1e12:.2f} TB/s, bf16 GEMM {g.get('flops_s', 0) / 1e12:.0f} TFLOP/s"
    if name == "kernel_tests" and "counts" in r:
        return ": " + ", ".join(f"{v} {k}" for k, v in r["counts"].items())
    if name == "kernel_bench" and "rows" in r:
        return f": {sum(x['status'] == 'ok' for x in r['rows'])}/{len(r['rows'])} rows"
    if name == "comal_step" and "paths" in r:
        return ": " + ", ".join(f"{p['path']} {p.get('p50_ms', float('nan')):.0f} ms" for p in r["paths"])
    return ""


def summarise(steps):
    """Headline numbers of the run (the rest is in each step's result)."""
    out = {"status": {n: s["status"] for n, s in steps.items()}}
    ceil = steps.get("ceilings", {}).get("result", {})
    if "limits" in ceil:
        out["copy_TB_s"] = ceil["limits"]["hbm_bytes_s"] / 1e12
        out["gemm_bf16_TFLOP_s"] = ceil["limits"]["flops_s"]["bf16"] / 1e12
    tests = steps.get("kernel_tests", {}).get("result", {})
    if "counts" in tests:
        out["kernel_tests"] = tests["counts"]
    rows = steps.get("kernel_bench", {}).get("result", {}).get("rows", [])
    out["kernel_rows"] = {
        f"{r['kernel']}/{r['provider']}/{r['mode']}/{r['dtype']}": {
            k: r.get(k) for k in ("p50_ms", "peak_mem_mb", "measured/predicted", "frac_of_ceiling")
        }
        for r in rows
        if r["status"] == "ok"
    }
    paths = steps.get("comal_step", {}).get("result", {}).get("paths", [])
    out["comal_step"] = {p["path"]: {k: p.get(k) for k in ("p50_ms", "peak_mem_gb")} for p in paths if "p50_ms" in p}
    return out


def table(report):
    rows = report["steps"].get("kernel_bench", {}).get("result", {}).get("rows", [])
    if not rows:
        return []
    cols = ["kernel", "provider", "mode", "dtype", "p50_ms", "peak_mem_mb", "pred_ms", "measured/predicted"]
    cols += ["frac_of_ceiling", "max_abs_diff"]
    lines = ["| " + " | ".join(cols + ["note"]) + " |", "|" + "---|" * (len(cols) + 1)]
    for r in rows:
        cells = [f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols]
        lines.append("| " + " | ".join(cells + [r.get("note", "")]) + " |")
    return lines


# ------------------------------------------------------------------------------------------------- child process


class Partial:
    """A step's result dict, rewritten to its file after each part (so a killed step keeps what it finished)."""

    def __init__(self, path):
        self.path, self.data = path, {}

    def save(self, **items):
        self.data.update(items)
        write_json(self.path, self.data)


def child_main(step, config_path, result_path):
    with open(config_path) as f:
        config = json.load(f)
    out = Partial(result_path)
    deadline = time.monotonic() + config["deadline_s"] - 3.0  # a margin to write the result before the kill
    try:
        if config.get("inject") == "fail":
            raise RuntimeError(f"injected failure in step {step} (--inject-fail)")
        if config.get("inject") == "hang":
            time.sleep(10**6)
        STEP_FUNCTIONS[step](out, config, deadline)
    except BaseException as e:  # noqa: BLE001 - recorded in the JSON, and the exit status says it failed
        out.save(_error=f"{type(e).__name__}: {e}")
        traceback.print_exc()
        return 1
    return 0


def _device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"  # a dry run hides the GPUs (CUDA_VISIBLE_DEVICES)


def nvidia_smi():
    """One dict per GPU from nvidia-smi (clocks in MHz, power in W), or {"error": ...} where it cannot answer."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return {"error": "nvidia-smi not found"}
    fields = "name,driver_version,pstate,clocks.sm,clocks.mem,clocks.max.sm,clocks.max.mem,temperature.gpu,power.draw"
    try:
        p = subprocess.run([exe, f"--query-gpu={fields}", "--format=csv,noheader,nounits"], capture_output=True,
                           text=True, timeout=20, check=True)  # fmt: skip
    except (subprocess.SubprocessError, OSError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    keys = fields.split(",")
    return {"gpus": [dict(zip(keys, (v.strip() for v in line.split(",")))) for line in p.stdout.strip().splitlines()]}


def step_environment(out, config, deadline):
    from _checkout import use_checkout

    use_checkout()  # before triton: on a CPU the kernels package turns on Triton's interpreter
    import importlib.metadata as md

    import torch
    import triton

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton.__version__,
        "transformers": version("transformers"),
        "numpy": version("numpy"),
        "pytest": version("pytest"),
        "openrlhf": version("openrlhf"),
        "cuda_available": torch.cuda.is_available(),
        "device": _device(),
        "nvidia_smi": nvidia_smi(),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device_name=p.name, sm_count=p.multi_processor_count, capability=f"sm_{p.major}{p.minor}")
        info.update(memory_gb=p.total_memory / 1e9, l2_cache_mb=getattr(p, "L2_cache_size", 0) / 2**20)
    else:
        info.update(device_name=f"CPU ({platform.processor() or platform.machine()})", sm_count=None)
    out.save(**info)


def step_environment_after(out, config, deadline):
    out.save(nvidia_smi=nvidia_smi())


def _median_ms(fn, device, rep_ms=200, min_reps=3, max_reps=50):
    """(p50, p20, p80) in ms: triton.testing.do_bench on CUDA (it warms up and flushes L2), else perf_counter."""
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    fn()
    times = []
    t_end = time.perf_counter() + rep_ms / 1e3
    while len(times) < min_reps or (time.perf_counter() < t_end and len(times) < max_reps):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return [times[round(q * (len(times) - 1))] for q in (0.5, 0.2, 0.8)]


def step_ceilings(out, config, deadline):
    """Copy bandwidth and GEMM rates of this device, measured the way the benchmark rows are timed."""
    from _checkout import use_checkout

    use_checkout()
    import torch

    device = _device()
    dry = device == "cpu"
    torch.manual_seed(0)

    def copy(n_bytes):
        src = torch.empty(n_bytes // 2, dtype=torch.bfloat16, device=device).normal_()
        dst = torch.empty_like(src)
        q = _median_ms(lambda: dst.copy_(src), device)
        return {
            "bytes": n_bytes,
            "p50_ms": q[0],
            "p20_ms": q[1],
            "p80_ms": q[2],
            "bytes_s": 2 * n_bytes / (q[0] / 1e3),
        }

    copy = copy(8 * 2**20 if dry else 2 * 2**30)  # bytes read + written per second
    out.save(copy=copy)

    def gemm(M, K, N, dtype):
        a = torch.randn(M, K, device=device).to(dtype)
        b = torch.randn(K, N, device=device).to(dtype)
        q = _median_ms(lambda: a @ b, device, rep_ms=300)
        flops = 2.0 * M * K * N
        return {"shape": [M, K, N], "dtype": str(dtype).removeprefix("torch."), "p50_ms": q[0], "p20_ms": q[1],
                "p80_ms": q[2], "flops_s": flops / (q[0] / 1e3)}  # fmt: skip

    bench = (64, 32, 1000) if dry else (16384, 4096, 128256)  # N tokens x d @ d x V: the benchmark's logits GEMM
    square = (64, 64, 64) if dry else (8192, 8192, 8192)
    square32 = (64, 64, 64) if dry else (4096, 4096, 4096)
    res = {"gemm_bf16_bench": gemm(*bench, torch.bfloat16)}
    out.save(**res)
    if device == "cuda":
        torch.cuda.empty_cache()
    res["gemm_bf16_8192"] = gemm(*square, torch.bfloat16)
    out.save(**res)
    torch.backends.cuda.matmul.allow_tf32 = False
    res["gemm_fp32_4096"] = gemm(*square32, torch.float32)
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    bf16 = res["gemm_bf16_bench"]["flops_s"]
    limits = {
        "name": f"{name} (ceilings measured in this run)",
        "hbm_bytes_s": copy["bytes_s"],
        "flops_s": {"bf16": bf16, "fp16": bf16, "fp32": res["gemm_fp32_4096"]["flops_s"]},
    }
    out.save(**res, limits=limits, tf32="off (torch.backends.cuda.matmul.allow_tf32 = False)")


def step_kernel_tests(out, config, deadline):
    """pytest on the kernel test files, in a subprocess; counts from its verbose lines (so a run stopped at the
    deadline still counts what finished)."""
    dry = config["dry_run"]
    selection = DRY_TEST_SELECTION if dry else KERNEL_TEST_FILES
    cmd = [sys.executable, "-m", "pytest", "-v", "-rfE", "-p", "no:cacheprovider", "-m", "not integration"]
    cmd += ["-o", "timeout=0"] + selection  # pytest-timeout, where installed: the deadline below rules
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    timeout = max(5.0, deadline - time.monotonic())
    status = "finished"
    try:
        p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
        output, rc = p.stdout + p.stderr, p.returncode
    except subprocess.TimeoutExpired as e:
        output = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        rc, status = None, f"stopped at the step's deadline ({timeout:.0f} s)"
    outcomes = re.findall(r"^(tests/\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)", output, re.M)
    counts = {}
    for _, outcome in outcomes:
        counts[outcome.lower()] = counts.get(outcome.lower(), 0) + 1
    gpu = {t: o.lower() for t, o in outcomes if "::test_cuda_" in t}  # the tests marked gpu are named test_cuda_*
    failed = [t for t, o in outcomes if o in ("FAILED", "ERROR")]
    failed += re.findall(r"^ERROR (tests/\S+)", output, re.M)  # collection errors
    summary = [ln for ln in output.splitlines() if re.match(r"^=+ .*(passed|failed|error|skipped).* =+$", ln)]
    out.save(command=" ".join(cmd[1:]), returncode=rc, status=status, counts=counts, failed=sorted(set(failed)))
    out.save(gpu_marked=gpu)
    out.save(summary_line=summary[-1] if summary else None, output_tail=output[-2500:] if failed or rc else "")
    if rc not in (0, None) and not failed:
        raise RuntimeError(f"pytest exited {rc} without a failing test (collection or usage error)")


def bench_rows(dry):
    """(kernel, dims, dtype, provider, mode) of the kernel_bench step; the reference provider of each shape first."""
    logits = (64, 1000) if dry else (16384, 128256)
    linear = (64, 1000, 32) if dry else (16384, 128256, 4096)
    rows = []
    for dtype in ("bf16", "fp32"):
        for provider in ("openrlhf-formula", "ours-triton", "ours-torch"):
            rows += [("sequence_logps", logits, dtype, provider, mode) for mode in ("forward", "full")]
    for provider in ("openrlhf-formula", "ours-triton", "logits+ours"):
        rows += [("linear_sequence_logps", linear, "bf16", provider, mode) for mode in ("forward", "full")]
    return rows


def step_kernel_bench(out, config, deadline):
    import kernels_bench as kb  # imports the kernels (from this checkout if needed) before triton
    import torch

    device = _device()
    measured = config["context"].get("limits")
    sheet = kb.datasheet(device) or kb.config.H200
    rows, refs = [], {}
    out.save(device=torch.cuda.get_device_name() if device == "cuda" else "CPU", rows=rows,
             reference="openrlhf-formula (fp32) of the same shape and dtype", datasheet=sheet["name"],
             measured_limits=measured)  # fmt: skip
    for kernel, dims, dtype, provider, mode in bench_rows(device == "cpu"):
        row = {"kernel": kernel, "provider": provider, "mode": mode, "dims": list(dims), "dtype": dtype}
        rec = {**row, "shape": "x".join(map(str, dims))}
        if time.monotonic() > deadline - 8:
            rec.update(status="skipped", note="step deadline")
            rows.append(rec)
            out.save(rows=rows)
            continue
        t = time.monotonic()
        try:
            res = kb.run_child({**row, "repeats": 1 if device == "cpu" else 3, "rep_ms": 500, "interpret": True})
        except Exception as e:  # noqa: BLE001 - one failing row (e.g. out of memory) must not stop the others
            res = {"status": "error", "note": f"{type(e).__name__}: {str(e)[:300]}"}
        if device == "cuda":
            torch.cuda.empty_cache()
        rec.update(status=res["status"], note=res.get("note", ""), seconds=round(time.monotonic() - t, 1))
        if res["status"] == "ok":
            rec.update({k: res[k] for k in ("p50_ms", "p20_ms", "p80_ms", "peak_mem_mb")})
            key = (kernel, rec["shape"], dtype)
            means = torch.tensor(res["means"], dtype=torch.float64)
            if provider == "openrlhf-formula":
                refs[key] = means
            if key in refs:
                rec["max_abs_diff"] = (means - refs[key]).abs().max().item()
            rate, unit = kb.effective(row, res["p50_ms"])
            rec.update(rate=rate, unit=unit)
            if measured:
                rec["frac_of_ceiling"] = rate / kb.limit(row, unit, measured)
            for tag, limits in (("", measured), ("datasheet_", sheet)):
                pr = kb.predict(row, limits) if limits else None
                if pr is not None:
                    rec[f"{tag}pred_ms"] = pr["ms"]
                    rec[f"{tag}pred_GB"] = pr["bytes"] / 1e9
                    rec["measured/predicted" if not tag else "measured/datasheet_predicted"] = res["p50_ms"] / pr["ms"]
        rows.append(rec)
        out.save(rows=rows)


def _load_losses():
    """The prox losses, ``comal_openrlhf/core/losses.py``, from this checkout where the project is not installed.
    The core imports torch and NumPy only (tests/test_layout.py), so it needs no OpenRLHF."""
    import importlib

    from _checkout import use_checkout

    use_checkout()
    return importlib.import_module("comal_openrlhf.core.losses")


def step_comal_step(out, config, deadline):
    import kernels_bench as kb  # the kernels (from this checkout if needed), and the inline OpenRLHF formula
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    K = kb.K
    losses = _load_losses()
    device = _device()
    dry = device == "cpu"
    pairs, seq, prompt = (2, 32, 8) if dry else (8, 1024, 256)
    shape = LLAMA_TINY if dry else LLAMA_1B
    torch.manual_seed(0)
    t = time.monotonic()
    with torch.device(device):
        model = LlamaForCausalLM(LlamaConfig(**shape, attn_implementation="sdpa", use_cache=False))
    model = model.to(torch.bfloat16).train()
    n_params = sum(p.numel() for p in model.parameters())
    out.save(model={**shape, "parameters": n_params, "dtype": "bf16", "attention": "sdpa", "init": "random"},
             batch={"pairs": pairs, "tokens_per_sequence": seq, "prompt_tokens": prompt,
                    "sequences": 2 * pairs, "response_tokens": 2 * pairs * (seq - prompt)},
             build_s=round(time.monotonic() - t, 1), paths=[])  # fmt: skip

    # Chosen rows then rejected rows, sharing each pair's prompt; label t+1 is predicted at t, prompt masked out.
    V = shape["vocab_size"]
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (2 * pairs, seq), generator=g)
    ids[pairs:, :prompt] = ids[:pairs, :prompt]
    ids = ids.to(device)
    labels = ids[:, 1:]
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, prompt - 1 :] = True
    backend = "triton" if device == "cuda" or K.triton_runs_on_cpu() else "torch"
    head = model.get_output_embeddings().weight

    def logps(path):
        if path == "linear":
            hidden = model.model(input_ids=ids).last_hidden_state
            return K.linear_sequence_logps(hidden[:, :-1], head, labels, mask, backend=backend)[0]
        logits = model(input_ids=ids).logits
        if path == "logits":
            return K.sequence_logps(logits[:, :-1], labels, mask, backend=backend, inplace_backward=True)[0]
        # OpenRLHF's Actor: all logits to fp32, then log_probs_from_logits on the shifted slice.
        return kb._openrlhf_formula_logps(logits.to(torch.float32)[:, :-1], labels, mask)

    # The cached centre (log mu_k and log ref of each response), as the precompute pass would store it.
    with torch.no_grad():
        cached = logps("linear").float()
    nan = torch.full((pairs,), float("nan"), device=device)
    batch = types.SimpleNamespace(
        logp_mu_chosen=cached[:pairs] + 0.5, logp_mu_rejected=cached[pairs:] - 0.5, logp_ref_chosen=cached[:pairs],
        logp_ref_rejected=cached[pairs:], soft_label=nan, chosen_winrate=nan, rejected_winrate=nan,
        weight=torch.ones(pairs, device=device),
    )  # fmt: skip
    prox = losses.ProxLoss("ipo", beta=0.1, ref_weight=0.5)

    def step(path):
        model.zero_grad(set_to_none=True)
        seq_logps = logps(path)
        loss, _, _ = prox(seq_logps[:pairs], seq_logps[pairs:], batch)
        loss.backward()
        return loss.detach().float().item(), seq_logps.detach().float()

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    paths, seq_logps_of = [], {}
    for path in ("linear", "logits", "openrlhf-formula"):  # the one that needs most memory last
        rec = {"path": path}
        paths.append(rec)
        if time.monotonic() > deadline - 10:
            rec.update(status="skipped", note="step deadline")
            out.save(paths=paths)
            continue
        try:
            model.zero_grad(set_to_none=True)
            sync()
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            loss, seq_logps = step(path)  # also the warm-up (Triton compiles here)
            sync()
            if device == "cuda":
                rec["peak_mem_gb"] = (torch.cuda.max_memory_allocated() - base) / 1e9
            rec["loss"] = loss
            seq_logps_of[path] = seq_logps
            times = []
            for _ in range(2 if dry else 5):
                if time.monotonic() > deadline - 5:
                    break
                sync()
                t = time.perf_counter()
                step(path)
                sync()
                times.append((time.perf_counter() - t) * 1e3)
            if times:
                rec.update(p50_ms=statistics.median(times), min_ms=min(times), max_ms=max(times), repeats=len(times))
                rec["tokens_s"] = 2 * pairs * seq / (rec["p50_ms"] / 1e3)
            rec["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - e.g. out of memory on one path; the others still run
            rec.update(status="error", note=f"{type(e).__name__}: {str(e)[:300]}")
            model.zero_grad(set_to_none=True)
        out.save(paths=paths)
    ref = seq_logps_of.get("openrlhf-formula")
    for rec in paths:
        if ref is not None and rec["path"] in seq_logps_of:
            rec["max_abs_seq_logp_diff_vs_formula"] = (seq_logps_of[rec["path"]] - ref).abs().max().item()
    out.save(paths=paths)


def step_train_comal(out, config, deadline):
    total = sum(WHEELS.values())
    out.save(
        status="skipped",
        reason=(
            "the two-iteration train_comal step needs OpenRLHF 0.11.2 and DeepSpeed, which the GPU image lacks and "
            f"which cannot be carried: their pip download --no-deps files come to {total / 2**20:.1f} MiB against "
            f"the {TREE_LIMIT / 2**20:.0f} MiB limit of the tree that travels (ray alone is "
            f"{WHEELS['ray-2.55.0-cp312-cp312-manylinux2014_x86_64.whl'] / 2**20:.1f} MiB), and flash-attn's CUDA "
            "extension would have to be compiled there"
        ),
        wheels_bytes=WHEELS,
        total_mib=total / 2**20,
        tree_limit_mib=TREE_LIMIT / 2**20,
    )


STEP_FUNCTIONS = {
    "environment": step_environment,
    "ceilings": step_ceilings,
    "kernel_tests": step_kernel_tests,
    "kernel_bench": step_kernel_bench,
    "comal_step": step_comal_step,
    "train_comal": step_train_comal,
    "environment_after": step_environment_after,
}

if __name__ == "__main__":
    sys.exit(main())
