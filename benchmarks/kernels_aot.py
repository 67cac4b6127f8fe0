"""Compile every Triton kernel of comal_openrlhf.kernels for NVIDIA GPUs on a machine without one, and report its
resources.

    python benchmarks/kernels_aot.py                                     # benchmark shapes, bf16 + fp32, sm_80/90
    python benchmarks/kernels_aot.py --shape 16384,128256,4096 --dtype bf16 --arch 90 --json

For each shape (``N,V`` for the from-logits kernels, ``N,V,D`` for the fused-linear path), dtype and architecture,
the launch list is built by the launchers' own argument functions (``fwd_launch`` / ``bwd_launch``) on stand-in
tensors with the given shapes and strides, with the meta-parameters of ``config``, so the compiled kernels are the
ones a launcher would run: the same BLOCK_V and num_warps, and the same runtime specialisation that Triton's JIT
applies at launch (integers equal to 1 become constants, integers and pointers divisible by 16 are marked so; device
allocations are at least 256-byte aligned, so the stand-in pointers are too). Each launch goes through
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``; ``ptxas -v`` (with the flags Triton uses)
and ``cuobjdump -sass`` from the Triton wheel then give, per kernel: registers per thread, spill stores/loads and
stack frame (bytes), shared memory per block, resident blocks per SM (the minimum over the register file, shared
memory, thread and block limits), and the instruction mix: 128-bit global loads (LDG.E.128), tensor-core MMAs
(HMMA on sm_80, HGMMA = wgmma on sm_90) and atomics (ATOM/RED). Exit status 1 on a compile error or a spill.

Triton kernels cannot be compiled in a process where the package turned on Triton's CPU interpreter (see the
package docstring); then this command re-runs itself with TRITON_INTERPRET=0. Torch and triton suffice: where the
project is not installed, the kernels are imported from this checkout (``_checkout.py``).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

from _checkout import use_checkout

# (registers per SM, max resident threads, max resident blocks, shared memory per SM usable by blocks, per block)
SM_LIMITS = {80: (65536, 2048, 32, 164 * 1024, 163 * 1024), 90: (65536, 2048, 32, 228 * 1024, 227 * 1024)}
SMEM_RESERVED_PER_BLOCK = 1024  # the driver reserves 1 KB of shared memory per resident block (sm_80 and later)
DEFAULT_SHAPES = ["16384,128256", "16384,128256,4096"]  # the benchmark's GPU shapes (N tokens, V, d)
DEFAULT_DTYPES = ["bf16", "fp32"]


class StandIn:
    """What a launcher and Triton's JIT read of a tensor: shape, strides, dtype and a (256-byte aligned) pointer."""

    def __init__(self, shape, dtype, strides=None):
        self.shape = tuple(shape)
        self.dtype = dtype
        if strides is None:
            strides, acc = [], 1
            for n in reversed(self.shape):
                strides.insert(0, acc)
                acc *= n
        self._strides = tuple(strides)

    def stride(self, dim=None):
        return self._strides if dim is None else self._strides[dim]

    def data_ptr(self):
        return 1 << 20


def launches(shape, dtype_name):
    """[(name, kernel, args, meta)]: the distinct launches the launchers make for one shape and dtype."""
    import importlib

    import torch

    # The modules, not the functions of the same names that the package exports.
    package = use_checkout().__name__
    lin, seq, ratio = (
        importlib.import_module(f"{package}.{m}")
        for m in ("linear_sequence_logps", "sequence_logps", "sequence_logratio")
    )

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[dtype_name]
    out = []

    def row_launches(B, L, V, tag, logratio):
        logits = StandIn((B, L, V), dtype)
        labels = StandIn((B, L), torch.int64)
        f32 = StandIn((B, L), torch.float32)
        out.append((f"{tag}fwd", *seq.fwd_launch(logits, labels, f32, f32, f32, 1.0)))
        out.append((f"{tag}bwd", *seq.bwd_launch(logits, labels, f32, f32, 1.0, logits)))  # in place
        if logratio:
            out.append((f"{tag}logratio", *ratio.fwd_launch(logits, logits, labels, f32, f32, f32, f32, 1.0)))

    if len(shape) == 2:
        N, V = shape
        B = 2 if N % 2 == 0 else 1  # the benchmark's layout: a preference pair of N/2 tokens each
        row_launches(B, N // B, V, "sequence_logps/", logratio=True)
    else:
        N, V, D = shape
        lengths = sorted({e - s for s, e in lin.chunk_schedule(N, V, D, dtype, "cuda")}, reverse=True)
        for C in lengths:
            row_launches(1, C, V, f"linear_sequence_logps[chunk {C}]/", logratio=False)
    # Launches that compile to the same kernel (same specialisation and meta) are listed once.
    seen, unique = set(), []
    for name, kernel, grid, args, meta in out:
        key = (kernel.__name__, _spec_key(args), tuple(sorted(meta.items())))
        if key not in seen:
            seen.add(key)
            unique.append((name, kernel, args, meta))
    return unique


def _spec_key(args):
    key = []
    for a in args:
        if hasattr(a, "data_ptr"):
            key.append(str(a.dtype))
        elif isinstance(a, int):
            key.append("1" if a == 1 else "d16" if a % 16 == 0 else "i")
        else:
            key.append(type(a).__name__)
    return tuple(key)


def compile_launch(kernel, args, meta, arch):
    """triton.compile of one launch for sm_<arch>, specialised as the JIT would; returns the CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **meta)
    options, signature, constexprs, attrs = kernel._pack_args(backend, meta, bound, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def _tools():
    from triton.backends.nvidia import compiler as nv

    ptxas = nv.get_ptxas(90).path
    return ptxas, os.path.join(os.path.dirname(ptxas), "cuobjdump")


def analyse(compiled, arch, num_warps):
    """Resources and instruction mix of one compiled kernel (ptxas -v on its PTX, cuobjdump -sass on its cubin)."""
    ptxas, cuobjdump = _tools()
    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        ptx, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        cmd = [ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", ptx, "-o", ptx + ".o"]
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
        sass = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True, check=True).stdout

    def grab(pattern):
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    regs = grab(r"Used (\d+) registers")
    static_smem = grab(r"(\d+) bytes smem")
    smem = static_smem + int(compiled.metadata.shared)
    opcodes = [m.group(1) for m in re.finditer(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", sass)]
    regs_sm, max_threads, max_blocks, smem_sm, _ = SM_LIMITS[arch]
    threads = 32 * num_warps
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256  # allocated per warp in units of 256 registers
    by_regs = (regs_sm // regs_per_warp) // num_warps
    by_smem = smem_sm // (smem + SMEM_RESERVED_PER_BLOCK)
    blocks = min(by_regs, by_smem, max_threads // threads, max_blocks)
    return {
        "registers": regs,
        "spill_stores": grab(r"(\d+) bytes spill stores"),
        "spill_loads": grab(r"(\d+) bytes spill loads"),
        "stack_frame": grab(r"(\d+) bytes stack frame"),
        "shared_mem": smem,
        "num_warps": num_warps,
        "blocks_per_sm": blocks,
        "occupancy_warps": f"{blocks * num_warps}/{max_threads // 32}",
        "ldg128": sum(op.startswith("LDG") and ".128" in op for op in opcodes),
        "mma": sum(op.startswith(("HMMA", "HGMMA")) for op in opcodes),
        "atomics": sum(op.startswith(("ATOM", "RED")) for op in opcodes),
        "local_ld_st": sum(op.startswith(("LDL", "STL")) for op in opcodes),
        "instructions": len(opcodes),
    }


def run(shapes, dtypes, archs):
    rows = []
    for spec in shapes:
        shape = tuple(int(x) for x in spec.split(","))
        if len(shape) not in (2, 3):
            raise ValueError(f"--shape {spec!r}: expected N,V or N,V,D")
        for dtype in dtypes:
            for name, kernel, args, meta in launches(shape, dtype):
                for arch in archs:
                    row = {"shape": spec, "dtype": dtype, "arch": f"sm_{arch}", "launch": name}
                    row.update(kernel=kernel.__name__, meta={k: v for k, v in meta.items() if k != "num_warps"})
                    row["specialisation"] = " ".join(_spec_key(args))
                    try:
                        compiled = compile_launch(kernel, args, meta, arch)
                        row.update(analyse(compiled, arch, meta.get("num_warps", 4)), error="")
                    except Exception as e:  # noqa: BLE001 - reported per kernel; the exit status says it failed
                        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e) else ''}"
                    rows.append(row)
    return rows


COLUMNS = ["arch", "dtype", "shape", "launch", "registers", "spill_stores", "spill_loads", "stack_frame"]
COLUMNS += ["shared_mem", "num_warps", "blocks_per_sm", "ldg128", "mma", "atomics", "error"]


def table(rows):
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shape", action="append", help="N,V or N,V,D (repeatable; default: the benchmark's shapes)")
    ap.add_argument("--dtype", default=",".join(DEFAULT_DTYPES), help="comma-separated: bf16, fp16, fp32")
    ap.add_argument("--arch", default="80,90", help="comma-separated compute capabilities (default 80,90)")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = ap.parse_args(argv)

    if use_checkout().triton_runs_on_cpu():  # the interpreter is on in this process: compile in a fresh one without it
        env = {**os.environ, "TRITON_INTERPRET": "0"}
        argv = sys.argv[1:] if argv is None else argv
        cmd = [sys.executable, os.path.abspath(__file__), *argv]
        return subprocess.run(cmd, env=env, check=False).returncode

    archs = [int(a) for a in args.arch.split(",")]
    for a in archs:
        if a not in SM_LIMITS:
            print(f"--arch {a}: supported are {sorted(SM_LIMITS)}", file=sys.stderr)
            return 2
    rows = run(args.shape or DEFAULT_SHAPES, args.dtype.split(","), archs)
    failed = [r for r in rows if r["error"] or r.get("spill_stores") or r.get("spill_loads")]
    if args.json:
        json.dump({"kernels": rows, "failed": len(failed)}, sys.stdout)
        print()
    else:
        import triton

        print(f"Triton {triton.__version__}: kernels as their launchers configure them, compiled for sm_{args.arch}")
        print(table(rows))
        for r in failed:
            print(f"FAILED: {r['arch']} {r['launch']} ({r['dtype']}, {r['shape']}): {r['error'] or 'spills'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
