"""Launch configuration of every kernel in this package, in one place, and the H100 cost model that picks it.

The launchers (``sequence_logps``, ``sequence_logratio``, ``linear_sequence_logps``) and the ahead-of-time compile
check (``benchmarks/kernels_aot.py`` in the repository) both read their tile sizes, warp counts and token chunks
from here, so what it compiles for sm_80/sm_90 is exactly what a launcher would run.

Cost model: each stage of an algorithm takes max(FLOPs / peak, bytes / bandwidth) at the device limits (H100 SXM:
3.35 TB/s HBM3, 989 TFLOP/s dense bf16 on tensor cores, 67 TFLOP/s fp32 without TF32); a stage is one kernel or
one cuBLAS GEMM, and stages run one after another. Bytes are HBM traffic: tensors larger than the 50 MB L2 are
counted each time a stage reads or writes them. This is a lower bound on time (no launch overhead, no tile or
wave quantisation), used to compare algorithms and to pick the token chunk of the fused-linear path; it is not a
prediction of the fraction of the limit a kernel reaches.
"""

import math

# Row kernels (one program per token row, online logsumexp over the vocabulary in BLOCK_V blocks): V=128k takes 32
# iterations; a 4096-wide block keeps 16 fp32 values per thread in registers at 8 warps.
MAX_BLOCK_V = 4096

# Datasheet limits used by the cost model and by the benchmark's predicted columns. The H200 has the H100's compute
# with faster HBM3e (141 GB); a benchmark run on a card can pass the ceilings it measured instead (same keys).
H100 = {"name": "H100 SXM", "hbm_bytes_s": 3.35e12, "flops_s": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}}
H200 = {"name": "H200 SXM", "hbm_bytes_s": 4.8e12, "flops_s": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}}

# Fused-linear token chunks. GPU: the smallest chunk at which every GEMM of the chunked algorithm is compute-bound
# with 2x headroom under the model (see linear_chunk_rows), capped so that one chunk of logits stays under
# CHUNK_CAP_BYTES. CPU: about CPU_CHUNK_BYTES of fp32 logits per chunk: each chunk reads W and reads and writes dW
# once, so small chunks are slow, and big ones cost memory without being faster. Forward + backward at N=2048,
# V=32,000, d=256, one thread of a 2-core AMD EPYC (AVX-512), fp32 / bf16: 2 MB chunks 14.2 / 4.5 s, 8 MB
# 5.3 / 2.9 s, 16 MB 3.2 / 1.9 s, 64 MB 3.8 / 1.9 s.
MIN_CHUNK_ROWS = 128
CHUNK_CAP_BYTES = 2**30
CPU_CHUNK_BYTES = 16 * 2**20
GEMM_HEADROOM = 2.0

ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4}


def row_block(V: int) -> dict:
    """Meta-parameters of the row kernels (_logps_fwd_kernel, _logps_bwd_kernel, _logratio_fwd_kernel).

    V_BLOCKS (the trip count of their loop over the vocabulary) is a compile-time constant rather than a bound
    computed from V in the kernel: Triton 3.6's interpreter turns a runtime loop bound into a Python int with
    ``int()`` on a one-element array, which NumPy >= 2.4 refuses (Triton 3.8 squeezes it first)."""
    block = min(MAX_BLOCK_V, 1 << max(0, (V - 1).bit_length()))
    return {"BLOCK_V": block, "V_BLOCKS": math.ceil(V / block), "num_warps": 8 if block >= 2048 else 4}


def stage(name: str, flops: float, bytes_: float, dtype: str, device: dict = H100) -> dict:
    """One stage of the cost model: its FLOPs, HBM bytes and the time they imply at the device limits."""
    t_flops = flops / device["flops_s"][dtype]
    t_bytes = bytes_ / device["hbm_bytes_s"]
    bound = "compute" if t_flops >= t_bytes else "memory"
    return {"stage": name, "flops": flops, "bytes": bytes_, "ms": 1e3 * max(t_flops, t_bytes), "bound": bound}


def linear_chunked_stages(
    N: int, V: int, D: int, dtype: str, chunk: int, mode: str = "full", device: dict = H100
) -> list:
    """Stages of the chunked fused-linear algorithm (this package's) for N unmasked tokens.

    Forward per chunk: z = h W^T (GEMM, logits written in the weight dtype), row kernel -> lse, logp (reads z).
    Backward per chunk: recompute z (GEMM), row kernel writes dz into z in place (read + write), dh = dz W (GEMM),
    dW += dz^T h (GEMM; dW accumulated in the weight dtype, read and written once per chunk)."""
    s = ITEMSIZE[dtype]
    n_chunks = math.ceil(N / chunk)
    gemm = 2.0 * N * D * V
    w_reads = n_chunks * V * D * s  # each chunk's GEMM reads all of W
    logits = N * V * s
    hid = N * D * s
    fwd = [
        stage("logits GEMM", gemm, w_reads + hid + logits, dtype, device),
        stage("row kernel: lse, logp", 0.0, logits, dtype, device),
    ]
    bwd = [
        stage("logits GEMM (recompute)", gemm, w_reads + hid + logits, dtype, device),
        stage("row kernel: dz in place", 0.0, 2 * logits, dtype, device),
        stage("dh = dz W", gemm, w_reads + logits + hid, dtype, device),
        stage("dW += dz^T h", gemm, 2 * w_reads + logits + hid, dtype, device),
    ]
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


def linear_fused_atomic_stages(N: int, V: int, D: int, dtype: str, block=(64, 64, 64), mode: str = "full") -> list:
    """Stages of the replaced design (fused Triton forward; backward with one program per (token tile, vocab tile)
    adding its dh and dW tiles into fp32 buffers with atomics). Kept for the comparison in the docstring of
    ``linear_sequence_logps`` and the benchmark; no launcher runs it."""
    bm, bn, _ = block
    s = ITEMSIZE[dtype]
    gemm = 2.0 * N * D * V
    token_tiles, vocab_tiles = math.ceil(N / bm), math.ceil(V / bn)
    fwd = [stage("fused logits + online lse", gemm, V * D * s + N * D * s, dtype)]
    # fp32 atomic read-modify-write of all of dW (V x D) by every token tile and of all of dh by every vocab tile.
    atomics = token_tiles * V * D * 4 * 2 + vocab_tiles * N * D * 4 * 2
    bwd = [stage("fused recompute + dz + atomic dh, dW", 3 * gemm, atomics + V * D * s + N * D * s, dtype)]
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


def total_ms(stages) -> float:
    return sum(st["ms"] for st in stages)


def linear_chunk_rows(N: int, V: int, D: int, dtype: str, device_type: str) -> int:
    """Tokens per chunk of the fused-linear path (the only place this is decided).

    CUDA: the smallest power of two >= MIN_CHUNK_ROWS at which each GEMM of one chunk has memory time at most
    1/GEMM_HEADROOM of its compute time under the H100 model (a GEMM of C tokens has arithmetic intensity of about
    C FLOP/byte; the dW update also reads and writes V x D once per chunk), capped at CHUNK_CAP_BYTES of logits per
    chunk and at N. CPU: about CPU_CHUNK_BYTES of fp32 logits."""
    N = max(N, 1)
    if device_type != "cuda":
        return max(1, min(N, CPU_CHUNK_BYTES // (4 * V)))
    s = ITEMSIZE[dtype]
    cap = max(1, CHUNK_CAP_BYTES // (s * V))
    chunk = MIN_CHUNK_ROWS
    while chunk < min(N, cap):
        gemms = [st for st in linear_chunked_stages(chunk, V, D, dtype, chunk) if st["flops"]]
        peak = H100["flops_s"][dtype]
        if all(st["bytes"] / H100["hbm_bytes_s"] * GEMM_HEADROOM <= st["flops"] / peak for st in gemms):
            break
        chunk *= 2
    return max(1, min(chunk, N, cap))


def dtype_name(dtype) -> str:
    """'bf16' / 'fp16' / 'fp32' for a torch dtype (or such a name)."""
    name = str(dtype).removeprefix("torch.")
    return {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(name, name)
