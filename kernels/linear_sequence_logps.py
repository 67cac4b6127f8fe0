"""Per-sequence log-probabilities straight from hidden states and the LM head, never materialising N x V logits.

For token t with hidden state h_t (d), LM head W (V x d), optional bias c (V), label y_t, mask weight m_t and
temperature T, the logits are z_t = W h_t + c and

    logp_t   = z_t[y_t] / T - logsumexp_v(z_t[v] / T)
    seq_sum  = sum_t m_t * logp_t,   seq_mean = seq_sum / sum_t m_t   (0 for a fully masked row)

Backward, with g_t = dLoss/dlogp_t and dz_t[v] = g_t * m_t * (1[v == y_t] - softmax(z_t / T)[v]) / T:

    dh_t = sum_v dz_t[v] W[v],   dW[v] = sum_t dz_t[v] h_t,   dc[v] = sum_t dz_t[v]

Algorithm (both backends): only the unmasked tokens are computed (prompt and padding rows are dropped before any
GEMM), in chunks of C tokens (``config.linear_chunk_rows``). Forward per chunk: z = h_c W^T (+ c) by one GEMM in
the weight dtype (cuBLAS on GPU), then the row kernel of ``sequence_logps`` reads z once and writes lse_t and
logp_t. Backward per chunk: recompute z by the same GEMM, the row kernel overwrites z with dz in place, then
dh_c = dz W and dW += dz^T h_c (two GEMMs; dW is accumulated in the weight dtype, one rounding per chunk, as
Liger's fused linear cross entropy does). Peak memory: one C x V chunk, the V x d dW and the N x d dh; never
N x V. "triton" uses the Triton row kernels, "torch" the chunked PyTorch ones; the GEMMs are torch matmuls in both.

Why this design (H100 cost model of ``config``: each stage max(FLOPs / 989 TFLOP/s, bytes / 3.35 TB/s), at N=16,384
tokens, V=128,256, d=4096, bf16; the FLOP floor of forward + backward, 6NdV, is 52.2 ms):

- chunked, C=2048 (this module): forward 18.7 ms (GEMM 17.4 + row kernel 1.25), backward 54.7 ms (three GEMMs of
  17.4 each + 2.5 for dz in place): 73.4 ms, 1.41x the floor. The extra 0.41x is the recomputed logits GEMM (the
  per-token upstream gradient g_t is only known in the backward, so dW cannot be formed during the forward as
  Liger does for a scalar loss) and the logits chunk's trips through HBM. Every GEMM is compute-bound with >= 2x
  headroom at C=2048 (dW's read-modify-write of V x d per chunk is what sets C).
- the replaced fused design (Triton forward with an online logsumexp over vocabulary tiles; backward with one
  program per (64-token tile, 64-vocab tile) adding its dh and dW tiles into fp32 buffers with atomics): the
  atomic read-modify-write of all of dW by each of the 256 token tiles and of dh by each of the 2,004 vocabulary
  tiles is 2.2 TB of traffic, 643 ms for the backward alone (12x the floor). Its forward's only advantage under
  the model is that the logits never reach HBM, worth at most 2.5 ms (3% of the chunked total) at equal GEMM
  efficiency, which a fixed 64/64/64 Triton tile is unlikely to reach against cuBLAS; and its fp32 logits differ
  from the bf16 logits that a cuBLAS backward recomputes (the saved lse would not match the backward's softmax).
  Compiled by ``kernels_aot``'s functions with the old launcher's configuration and specialisation (N=16,384,
  V=128,256, d=4096, bf16): forward 166 registers on sm_80 and 132 on sm_90, no spills; backward 255 registers and
  96 bytes of spills on sm_80, 150 registers on sm_90, 64 (sm_80) and 16 (sm_90) atomic instructions. Neither fused
  kernel is kept; the row kernels used now take 39-56 registers (63-64 for the paired one) and never spill.
"""

import importlib

import torch

from .config import dtype_name, linear_chunk_rows
from .sequence_logps import prepare, resolve_backend, sequence_sums

# The module, not the function of the same name that the package exports.
rows = importlib.import_module(".sequence_logps", __package__)


def chunk_schedule(n_rows, V, D, dtype, device_type):
    """Row ranges [start, stop) of the token chunks; ``kernels_aot`` reads the same schedule."""
    size = linear_chunk_rows(n_rows, V, D, dtype_name(dtype), device_type)
    return [(s, min(s + size, n_rows)) for s in range(0, n_rows, size)]


def _chunk_logits(h, weight, bias):
    """Logits of one token chunk in the weight dtype (the LM head's own GEMM), not yet divided by T."""
    return torch.addmm(bias, h, weight.t()) if bias is not None else h @ weight.t()


def _forward(hidden, weight, bias, labels, mask, temperature, backend, active):
    N, D = hidden.shape
    V = weight.shape[0]
    logp = torch.zeros(N, dtype=torch.float32, device=hidden.device)
    lse = torch.zeros_like(logp)
    row_forward = rows.triton_forward if backend == "triton" else rows.torch_forward
    for s, e in chunk_schedule(active.numel(), V, D, weight.dtype, hidden.device.type):
        idx = active[s:e]
        z = _chunk_logits(hidden.index_select(0, idx), weight, bias)
        c_logp, c_lse = row_forward(z.unsqueeze(0), labels[idx].unsqueeze(0), mask[idx].unsqueeze(0), temperature)
        logp.index_copy_(0, idx, c_logp[0])
        lse.index_copy_(0, idx, c_lse[0])
        del z  # free this chunk before the next one is allocated
    return logp, lse


def _backward(hidden, weight, bias, labels, lse, g, temperature, backend, active, need=(True, True, True)):
    """(dh, dW, db); ``need`` says which of them autograd wants (a frozen head, as under LoRA, skips the dW GEMM)."""
    N, D = hidden.shape
    V = weight.shape[0]
    dh = torch.zeros(N, D, dtype=weight.dtype, device=hidden.device) if need[0] else None
    dw = torch.zeros(V, D, dtype=weight.dtype, device=hidden.device) if need[1] else None
    db = torch.zeros(V, dtype=torch.float32, device=hidden.device) if bias is not None and need[2] else None
    row_backward = rows.triton_backward if backend == "triton" else rows.torch_backward
    for s, e in chunk_schedule(active.numel(), V, D, weight.dtype, hidden.device.type):
        idx = active[s:e]
        h = hidden.index_select(0, idx)
        z = _chunk_logits(h, weight, bias).unsqueeze(0)
        row_backward(z, labels[idx].unsqueeze(0), lse[idx].unsqueeze(0), g[idx].unsqueeze(0), temperature, z)
        dz = z[0]
        if dh is not None:
            dh.index_copy_(0, idx, dz @ weight)
        if dw is not None:
            dw.addmm_(dz.t(), h)
        if db is not None:
            db += dz.float().sum(0)
        del z, dz
    return dh, dw, db


class LinearSequenceLogpsFunction(torch.autograd.Function):
    """(hidden N x d, weight V x d, bias) -> masked token log-probs (N, fp32); see the module docstring."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, mask, temperature, backend):
        active = mask.nonzero().squeeze(1)  # one device sync: the GEMMs skip prompt and padding rows
        logp, lse = _forward(hidden, weight, bias, labels, mask, temperature, backend, active)
        ctx.save_for_backward(hidden, labels, mask, lse, active)
        # Weight and bias are kept as attributes, not saved tensors: a partitioned parameter (DeepSpeed ZeRO-3)
        # swaps its storage between the forward and the backward, and is gathered again before the backward.
        ctx.weight, ctx.bias = weight, bias
        ctx.temperature, ctx.backend = temperature, backend
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, labels, mask, lse, active = ctx.saved_tensors
        g = (grad_logp.float() * mask).contiguous()
        weight, bias = ctx.weight, ctx.bias
        need = ctx.needs_input_grad[:3]
        dh, dw, db = _backward(hidden, weight, bias, labels, lse, g, ctx.temperature, ctx.backend, active, need)
        dh = dh.to(hidden.dtype) if dh is not None else None
        db = db.to(bias.dtype) if db is not None else None
        return dh, dw, db, None, None, None, None


def linear_sequence_logps(hidden, weight, labels, mask, bias=None, temperature=1.0, backend="auto"):
    """Per-sequence sum and mean of masked token log-probs of softmax((hidden @ weight^T + bias) / T).

    Args:
        hidden: B x L x d final hidden states (cast to the weight dtype if it differs).
        weight: V x d LM head; bias: optional V.
        labels, mask, temperature, backend: as in ``sequence_logps``.

    Returns:
        (seq_sum, seq_mean), each a length-B fp32 tensor, differentiable w.r.t. hidden, weight and bias.
    """
    if hidden.dim() != 3 or weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"expected hidden B x L x d and weight V x d, got {hidden.shape} and {weight.shape}")
    B, L, D = hidden.shape
    backend = resolve_backend(backend, hidden.device)
    labels, mask = prepare(hidden, labels, mask)
    # hidden (N x d) is small next to the N x V logits, so a contiguous copy of it is cheap.
    h2 = hidden.to(weight.dtype).reshape(B * L, D).contiguous()
    logp = LinearSequenceLogpsFunction.apply(
        h2, weight, bias, labels.reshape(-1), mask.reshape(-1), float(temperature), backend
    )
    return sequence_sums(logp.view(B, L), mask)
