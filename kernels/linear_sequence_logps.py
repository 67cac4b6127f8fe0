"""Per-sequence log-probabilities straight from hidden states and the LM head, never materialising N x V logits.

For token t with hidden state h_t (d), LM head W (V x d), optional bias c (V), label y_t, mask weight m_t and
temperature T, the logits are z_t = W h_t + c and

    logp_t   = z_t[y_t] / T - logsumexp_v(z_t[v] / T)
    seq_sum  = sum_t m_t * logp_t,   seq_mean = seq_sum / sum_t m_t   (0 for a fully masked row)

Backward, with g_t = dLoss/dlogp_t and dz_t[v] = g_t * m_t * (1[v == y_t] - softmax(z_t / T)[v]) / T:

    dh_t = sum_v dz_t[v] W[v],   dW[v] = sum_t dz_t[v] h_t,   dc[v] = sum_t dz_t[v]

"triton" (fused, after Cut Cross-Entropy's layout): the forward gives each program a tile of BLOCK_M tokens and
walks the vocabulary in BLOCK_N tiles, computing each logits tile with ``tl.dot`` over d and folding it into an
online logsumexp; only lse_t and logp_t (N floats each) are written. The backward launches one program per
(token tile, vocabulary tile), recomputes that logits tile, forms dz in registers and adds dz @ W_tile into dh and
dz^T @ h_tile into dW with fp32 atomics (so dW is accumulated in an fp32 V x d buffer, then cast). Token tiles
whose gradient is all zero (masked prompt/padding) skip the recompute and the atomics. fp32 inputs use IEEE fp32
dots (matching the reference to ~1e-5; slow on tensor cores), bf16 inputs use bf16 dots with fp32 accumulation.
The block sizes are fixed, not autotuned: correctness is tested (interpreter and, where present, GPU) but the
speed of this kernel has not been measured or tuned on a GPU yet. Expected cost caveat: the backward issues
N*d*V/BLOCK_N + V*d*N/BLOCK_M fp32 atomic adds (2.7e11 at N=16k, d=4096, V=128k with 64-wide tiles), which will
likely dominate its time; Cut Cross-Entropy makes this layout fast by skipping vocabulary tiles whose softmax is
negligible, which is not done here. If it measures slow, backend="torch" (token chunks, cuBLAS matmuls) is the
alternative.

"torch": chunks of tokens (about 64 MB of fp32 logits each): chunk logits by matmul in the weight dtype, fp32
logsumexp; the backward recomputes each chunk's logits and accumulates dW in fp32.
"""

import torch
import triton
import triton.language as tl

from .sequence_logps import prepare, resolve_backend, sequence_sums

# (tokens, vocabulary, d) tile sizes: conservative fixed GPU tiles (not autotuned); under the CPU interpreter every
# tile op has a fixed Python cost, so there fewer, wider vocabulary tiles keep a 256k vocabulary testable.
BLOCKS = {"cuda": (64, 64, 64), "cpu": (16, 512, 64)}
# Torch backend: fp32 logits bytes per token chunk. Unlike the from-logits op, a chunk needs a few hundred tokens so
# that each read of W serves enough rows of the LM-head matmul.
CHUNK_BYTES = 64 * 2**20


@triton.jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # Triton 3.8's interpreter multiplies bf16 tiles as their raw uint16 bits, so there (UPCAST) they go through
    # fp32 first: bf16 products are exact in fp32, which is what the GPU's bf16 dot with fp32 accumulate gives.
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def _linear_fwd_kernel(
    h_ptr,
    w_ptr,
    bias_ptr,
    labels_ptr,
    mask_ptr,
    logp_ptr,
    lse_ptr,
    N,
    V,
    D,
    inv_temp,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    row_ok = rows < N
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=0)
    m = tl.load(mask_ptr + rows, mask=row_ok, other=0.0)
    ks = tl.arange(0, BLOCK_K)
    run_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_M], tl.float32)
    target = tl.zeros([BLOCK_M], tl.float32)
    for n0 in range(0, V, BLOCK_N):
        cols = (n0 + tl.arange(0, BLOCK_N)).to(tl.int64)
        col_ok = cols < V
        acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for k0 in range(0, D, BLOCK_K):
            k = k0 + ks
            h = tl.load(h_ptr + rows[:, None] * D + k[None, :], mask=row_ok[:, None] & (k[None, :] < D), other=0.0)
            wt = tl.load(w_ptr + cols[None, :] * D + k[:, None], mask=col_ok[None, :] & (k[:, None] < D), other=0.0)
            acc = _dot(h, wt, acc, DOT_PRECISION, UPCAST)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        z = tl.where(col_ok[None, :], acc * inv_temp, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z, 1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), 1)
        run_max = new_max
        target += tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), 1)
    lse = run_max + tl.log(run_sum)
    tl.store(logp_ptr + rows, tl.where(m != 0, (target - lse) * m, 0.0), mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)


@triton.jit
def _linear_bwd_kernel(
    h_ptr,
    w_ptr,
    bias_ptr,
    labels_ptr,
    g_ptr,
    lse_ptr,
    dh_ptr,
    dw_ptr,
    dbias_ptr,
    N,
    V,
    D,
    inv_temp,
    HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    cols = (tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    row_ok = rows < N
    col_ok = cols < V
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)  # upstream gradient already times mask weight
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=0)
    # A tile of masked tokens has nothing to add: both d loops then run zero iterations.
    d_end = tl.where(tl.max(tl.abs(g), 0) > 0, D, 0)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, d_end, BLOCK_K):
        k = k0 + ks
        h = tl.load(h_ptr + rows[:, None] * D + k[None, :], mask=row_ok[:, None] & (k[None, :] < D), other=0.0)
        wt = tl.load(w_ptr + cols[None, :] * D + k[:, None], mask=col_ok[None, :] & (k[:, None] < D), other=0.0)
        acc = _dot(h, wt, acc, DOT_PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    p = tl.exp(acc * inv_temp - lse[:, None])
    onehot = tl.where(cols[None, :] == labels[:, None], 1.0, 0.0)
    dz = tl.where(row_ok[:, None] & col_ok[None, :] & (g[:, None] != 0), (g * inv_temp)[:, None] * (onehot - p), 0.0)
    if HAS_BIAS:
        tl.atomic_add(dbias_ptr + cols, tl.sum(dz, 0), mask=col_ok)
    dz = dz.to(h_ptr.dtype.element_ty)
    for k0 in range(0, d_end, BLOCK_K):
        k = k0 + ks
        k_ok = k[None, :] < D
        w = tl.load(w_ptr + cols[:, None] * D + k[None, :], mask=col_ok[:, None] & k_ok, other=0.0)
        dh = _dot(dz, w, tl.zeros([BLOCK_M, BLOCK_K], tl.float32), DOT_PRECISION, UPCAST)
        tl.atomic_add(dh_ptr + rows[:, None] * D + k[None, :], dh, mask=row_ok[:, None] & k_ok)
        h = tl.load(h_ptr + rows[:, None] * D + k[None, :], mask=row_ok[:, None] & k_ok, other=0.0)
        dw = _dot(tl.trans(dz), h, tl.zeros([BLOCK_N, BLOCK_K], tl.float32), DOT_PRECISION, UPCAST)
        tl.atomic_add(dw_ptr + cols[:, None] * D + k[None, :], dw, mask=col_ok[:, None] & k_ok)


def _dot_precision(dtype):
    return "ieee" if dtype == torch.float32 else "tf32"


def triton_forward(hidden, weight, bias, labels, mask, temperature):
    N, D = hidden.shape
    V = weight.shape[0]
    logp = torch.empty(N, dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(logp)
    if N:
        BLOCK_M, BLOCK_N, BLOCK_K = BLOCKS.get(hidden.device.type, BLOCKS["cuda"])
        _linear_fwd_kernel[(triton.cdiv(N, BLOCK_M),)](
            hidden,
            weight,
            bias if bias is not None else hidden,  # an unused pointer when HAS_BIAS is False
            labels,
            mask,
            logp,
            lse,
            N,
            V,
            D,
            1.0 / temperature,
            HAS_BIAS=bias is not None,
            DOT_PRECISION=_dot_precision(hidden.dtype),
            UPCAST=hidden.device.type != "cuda",
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
            BLOCK_K=BLOCK_K,
            num_warps=4,
        )
    return logp, lse


def triton_backward(hidden, weight, bias, labels, lse, g, temperature):
    N, D = hidden.shape
    V = weight.shape[0]
    dh = torch.zeros(N, D, dtype=torch.float32, device=hidden.device)
    dw = torch.zeros(V, D, dtype=torch.float32, device=hidden.device)
    db = torch.zeros(V, dtype=torch.float32, device=hidden.device) if bias is not None else None
    if N:
        BLOCK_M, BLOCK_N, BLOCK_K = BLOCKS.get(hidden.device.type, BLOCKS["cuda"])
        _linear_bwd_kernel[(triton.cdiv(N, BLOCK_M), triton.cdiv(V, BLOCK_N))](
            hidden,
            weight,
            bias if bias is not None else hidden,
            labels,
            g,
            lse,
            dh,
            dw,
            db if db is not None else dh,
            N,
            V,
            D,
            1.0 / temperature,
            HAS_BIAS=bias is not None,
            DOT_PRECISION=_dot_precision(hidden.dtype),
            UPCAST=hidden.device.type != "cuda",
            BLOCK_M=BLOCK_M,
            BLOCK_N=BLOCK_N,
            BLOCK_K=BLOCK_K,
            num_warps=4,
        )
    return dh, dw, db


def _chunk_logits(h, weight, bias, temperature):
    """fp32 logits / T of one token chunk (the matmul runs in the weight dtype, as the LM head would)."""
    z = (h @ weight.t()).float()
    if bias is not None:
        z += bias.float()
    return z.mul_(1.0 / temperature)


def torch_forward(hidden, weight, bias, labels, mask, temperature):
    N, V = hidden.shape[0], weight.shape[0]
    logp = torch.empty(N, dtype=torch.float32, device=hidden.device)
    lse = torch.empty_like(logp)
    rows = max(1, CHUNK_BYTES // (4 * V))
    for s in range(0, N, rows):
        c = slice(s, s + rows)
        z = _chunk_logits(hidden[c], weight, bias, temperature)
        target = z.gather(-1, labels[c].unsqueeze(-1)).squeeze(-1)
        lse[c] = torch.logsumexp(z, -1)
        logp[c] = torch.where(mask[c] != 0, (target - lse[c]) * mask[c], 0.0)
        del z  # free this chunk before the next one is allocated
    return logp, lse


def torch_backward(hidden, weight, bias, labels, lse, g, temperature):
    N, D = hidden.shape
    V = weight.shape[0]
    dh = torch.empty(N, D, dtype=torch.float32, device=hidden.device)
    dw = torch.zeros(V, D, dtype=torch.float32, device=hidden.device)
    db = torch.zeros(V, dtype=torch.float32, device=hidden.device) if bias is not None else None
    rows = max(1, CHUNK_BYTES // (4 * V))
    for s in range(0, N, rows):
        c = slice(s, s + rows)
        # dz = (onehot - softmax) * g / T, built in place on the recomputed chunk logits.
        dz = _chunk_logits(hidden[c], weight, bias, temperature).sub_(lse[c].unsqueeze(-1)).exp_().neg_()
        dz.scatter_add_(-1, labels[c].unsqueeze(-1), torch.ones_like(dz[:, :1]))
        dz.mul_((g[c] / temperature).unsqueeze(-1))
        dh[c] = dz.to(weight.dtype) @ weight
        dw.addmm_(dz.t(), hidden[c].float())
        if db is not None:
            db += dz.sum(0)
        del dz
    return dh, dw, db


class LinearSequenceLogpsFunction(torch.autograd.Function):
    """(hidden N x d, weight V x d, bias) -> masked token log-probs (N, fp32); see the module docstring."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, mask, temperature, backend):
        forward = triton_forward if backend == "triton" else torch_forward
        logp, lse = forward(hidden, weight, bias, labels, mask, temperature)
        ctx.save_for_backward(hidden, weight, bias, labels, mask, lse)
        ctx.temperature, ctx.backend = temperature, backend
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, bias, labels, mask, lse = ctx.saved_tensors
        g = (grad_logp.float() * mask).contiguous()
        backward = triton_backward if ctx.backend == "triton" else torch_backward
        dh, dw, db = backward(hidden, weight, bias, labels, lse, g, ctx.temperature)
        db = db.to(bias.dtype) if db is not None else None
        return dh.to(hidden.dtype), dw.to(weight.dtype), db, None, None, None, None


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
    # hidden (N x d) and W are small next to the N x V logits, so contiguous copies of them are cheap.
    h2 = hidden.to(weight.dtype).reshape(B * L, D).contiguous()
    logp = LinearSequenceLogpsFunction.apply(
        h2,
        weight.contiguous(),
        bias.contiguous() if bias is not None else None,
        labels.reshape(-1),
        mask.reshape(-1),
        float(temperature),
        backend,
    )
    return sequence_sums(logp.view(B, L), mask)
