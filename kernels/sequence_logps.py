"""Per-sequence log-probabilities from logits in one pass per row, without an fp32 copy of the logits.

For sequence b, token t (the caller shifts labels so that logits[b, t] predicts labels[b, t]), label y_t, mask
weight m_t (bool/int masks become 0/1) and temperature T:

    logp_t   = z_t[y_t] / T - logsumexp_v(z_t[v] / T)
    seq_sum  = sum_t m_t * logp_t
    seq_mean = seq_sum / sum_t m_t                     (0 for a fully masked row, never NaN)

Backward, with g_t = dLoss/dlogp_t (autograd builds it from the seq_sum / seq_mean gradients):

    dLoss/dz_t[v] = g_t * m_t * (1[v == y_t] - softmax(z_t / T)[v]) / T

Labels at masked positions are never used as an index (they are often -100 or padding); labels where the mask is
non-zero must lie in [0, V) (not checked: that would cost a device sync).

Backends (``resolve_backend``):
- "triton": one program per token row. The forward loops over V in blocks keeping a running max and a rescaled
  running sum (online logsumexp) in fp32 and saves lse_t; masked rows are not read at all. The backward reads the
  row once more and writes g_t * m_t * (onehot - exp(z/T - lse_t)) / T in the logits dtype, optionally into the
  logits buffer itself (``inplace_backward=True``). Offsets are int64: row * stride passes 2^31 at 256k vocab.
- "torch": the same maths over chunks of tokens, each chunk upcast to fp32 (1 MB on CPU, 64 MB on GPU), so the
  transient memory is one chunk rather than a full fp32 copy of the logits. The backward is chunked the same way
  and writes in place if asked.
- "auto": "triton" for CUDA tensors, "torch" otherwise.

On a machine without CUDA the Triton kernels can only run in Triton's interpreter; the package ``__init__`` turns
it on for these kernels (see there), so backend="triton" then works on CPU tensors, slowly (tests only).
"""

import torch
import triton
import triton.language as tl

from .config import row_block

BACKENDS = ("auto", "triton", "torch")

# Bytes of one fp32 chunk of logits in the torch backend, by device type. On CPU a chunk that stays in cache is ~3x
# faster than 64 MB chunks (N=4096, V=32k, one thread: 145 vs 419 ms forward); on GPUs bigger chunks amortise the
# kernel launches.
CHUNK_BYTES = {"cpu": 2**20, "cuda": 64 * 2**20}


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map "auto" to "triton" on CUDA and "torch" elsewhere; refuse "triton" where it cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    if backend == "triton" and device.type != "cuda" and not triton_runs_on_cpu():
        raise ValueError(
            "backend='triton' on CPU tensors needs Triton's interpreter: TRITON_INTERPRET=1 before triton is first "
            "imported (comal_openrlhf.kernels sets it when imported before triton); use backend='torch' or CUDA"
        )
    return backend


def triton_runs_on_cpu() -> bool:
    """True when the kernels below and triton's own ``tl.*`` helpers were built by the interpreter (which executes
    them on CPU tensors); see the package ``__init__`` for why both matter."""
    return all(type(f).__name__ == "InterpretedFunction" for f in (_logps_fwd_kernel, tl.standard.sum))


def token_blocks(B: int, L: int, V: int, device: torch.device):
    """(batch slice, seq slice) pairs covering B x L with about CHUNK_BYTES / (4 V) tokens each.

    Slicing a B x L x V tensor with them gives views, so a logits tensor whose (B, L) dims cannot be merged (e.g.
    ``logits[:, :-1]``) is never copied whole."""
    rows = max(1, CHUNK_BYTES.get(device.type, CHUNK_BYTES["cuda"]) // (4 * V))
    if rows >= L:
        step = rows // L
        for b0 in range(0, B, step):
            yield slice(b0, b0 + step), slice(None)
    else:
        for b in range(B):
            for l0 in range(0, L, rows):
                yield slice(b, b + 1), slice(l0, l0 + rows)


@triton.jit
def _logps_fwd_kernel(
    logits_ptr,
    stride_b,
    stride_l,
    labels_ptr,
    mask_ptr,
    logp_ptr,
    lse_ptr,
    L,
    V,
    inv_temp,
    BLOCK_V: tl.constexpr,
    V_BLOCKS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + (row // L) * stride_b + (row % L) * stride_l
    m = tl.load(mask_ptr + row)
    run_max = tl.full((), float("-inf"), tl.float32)
    run_sum = tl.zeros((), tl.float32)
    # A masked row skips the loop: its logits are never read and its (garbage) label never used.
    if m != 0:
        for i in range(V_BLOCKS):
            cols = i * BLOCK_V + tl.arange(0, BLOCK_V)
            x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_temp
            new_max = tl.maximum(run_max, tl.max(x, 0))
            run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(x - new_max), 0)
            run_max = new_max
    label = tl.load(labels_ptr + row)
    target = tl.load(base + label, mask=m != 0, other=0.0).to(tl.float32) * inv_temp
    # Masked rows get lse = 0 without evaluating log(0) (the interpreter would warn about it).
    lse = tl.where(m != 0, run_max + tl.log(tl.where(m != 0, run_sum, 1.0)), 0.0)
    tl.store(logp_ptr + row, tl.where(m != 0, (target - lse) * m, 0.0))
    tl.store(lse_ptr + row, lse)


@triton.jit
def _logps_bwd_kernel(
    logits_ptr,
    stride_b,
    stride_l,
    grad_ptr,
    gstride_b,
    gstride_l,
    labels_ptr,
    g_ptr,
    lse_ptr,
    L,
    V,
    inv_temp,
    BLOCK_V: tl.constexpr,
    V_BLOCKS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + (row // L) * stride_b + (row % L) * stride_l
    gbase = grad_ptr + (row // L) * gstride_b + (row % L) * gstride_l
    g = tl.load(g_ptr + row)  # upstream gradient already times mask weight
    lse = tl.load(lse_ptr + row)
    label = tl.load(labels_ptr + row)
    scale = g * inv_temp
    # Rows with g == 0 (masked) read nothing and write zeros; the outer where() also keeps 0 * inf out.
    n_read = tl.where(g != 0, V, 0)
    for i in range(V_BLOCKS):
        cols = i * BLOCK_V + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < n_read, other=0.0).to(tl.float32) * inv_temp
        p = tl.exp(x - lse)
        grad = tl.where(g != 0, scale * (tl.where(cols == label, 1.0, 0.0) - p), 0.0)
        tl.store(gbase + cols, grad.to(grad_ptr.dtype.element_ty), mask=cols < V)


def fwd_launch(logits, labels, mask, logp, lse, temperature):
    """(kernel, grid, args, meta) of the forward row kernel; triton_forward launches it, kernels_aot compiles it."""
    B, L, V = logits.shape
    args = (logits, logits.stride(0), logits.stride(1), labels, mask, logp, lse, L, V, 1.0 / temperature)
    return _logps_fwd_kernel, (B * L,), args, row_block(V)


def bwd_launch(logits, labels, lse, g, temperature, grad):
    """(kernel, grid, args, meta) of the backward row kernel; triton_backward launches it, kernels_aot compiles it."""
    B, L, V = logits.shape
    args = (logits, logits.stride(0), logits.stride(1), grad, grad.stride(0), grad.stride(1), labels, g, lse, L, V)
    return _logps_bwd_kernel, (B * L,), args + (1.0 / temperature,), row_block(V)


def triton_forward(logits, labels, mask, temperature):
    """Token log-probs and lse (both B x L fp32); labels must be safe indices, mask fp32 B x L contiguous."""
    B, L, V = logits.shape
    logp = torch.empty(B, L, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    if B * L:
        kernel, grid, args, meta = fwd_launch(logits, labels, mask, logp, lse, temperature)
        kernel[grid](*args, **meta)
    return logp, lse


def triton_backward(logits, labels, lse, g, temperature, grad):
    """Write g * (onehot - softmax) / T for every row into grad (B x L x V, any strides, last dim contiguous)."""
    B, L, V = logits.shape
    if B * L:
        kernel, grid, args, meta = bwd_launch(logits, labels, lse, g, temperature, grad)
        kernel[grid](*args, **meta)
    if grad.data_ptr() == logits.data_ptr():
        # The kernel wrote behind autograd's back: bump the version so a later reader of the logits fails loudly.
        torch.autograd.graph.increment_version(logits)
    return grad


def torch_forward(logits, labels, mask, temperature):
    """Chunked torch version of triton_forward: one fp32 chunk of logits alive at a time."""
    B, L, V = logits.shape
    logp = torch.empty(B, L, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logp)
    for bs, ls in token_blocks(B, L, V, logits.device):
        z = logits[bs, ls].to(torch.float32, copy=True)
        if temperature != 1.0:
            z.mul_(1.0 / temperature)
        target = z.gather(-1, labels[bs, ls].unsqueeze(-1)).squeeze(-1)
        # logsumexp in place on the chunk copy, so the chunk is the only transient.
        zmax = z.amax(-1, keepdim=True)
        c_lse = z.sub_(zmax).exp_().sum(-1).log_() + zmax.squeeze(-1)
        m = mask[bs, ls]
        logp[bs, ls] = torch.where(m != 0, (target - c_lse) * m, 0.0)
        lse[bs, ls] = c_lse
        del z  # else the next chunk is allocated while this one is still alive: two chunks at peak
    return logp, lse


def torch_backward(logits, labels, lse, g, temperature, grad):
    """Chunked torch version of triton_backward (grad may be the logits buffer itself)."""
    B, L, V = logits.shape
    for bs, ls in token_blocks(B, L, V, logits.device):
        p = logits[bs, ls].to(torch.float32, copy=True)
        p.mul_(1.0 / temperature).sub_(lse[bs, ls].unsqueeze(-1)).exp_()
        # p <- (onehot - p) * g / T, built in place on the chunk.
        p.neg_().scatter_add_(-1, labels[bs, ls].unsqueeze(-1), torch.ones_like(p[..., :1]))
        p.mul_((g[bs, ls] / temperature).unsqueeze(-1))
        grad[bs, ls] = p
        del p
    return grad


class SequenceLogpsFunction(torch.autograd.Function):
    """logits (B x L x V) -> masked token log-probs (B x L, fp32); see the module docstring."""

    @staticmethod
    def forward(ctx, logits, labels, mask, temperature, backend, inplace_backward):
        forward = triton_forward if backend == "triton" else torch_forward
        logp, lse = forward(logits, labels, mask, temperature)
        ctx.save_for_backward(logits, labels, mask, lse)
        ctx.temperature, ctx.backend, ctx.inplace = temperature, backend, inplace_backward
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        logits, labels, mask, lse = ctx.saved_tensors
        g = (grad_logp.float() * mask).contiguous()
        # detach(): a new handle on the same storage, which AccumulateGrad may keep as .grad of a leaf instead of
        # cloning it (it clones a gradient that is also referenced elsewhere, e.g. the logits variable itself).
        grad = logits.detach() if ctx.inplace else torch.empty_like(logits)
        backward = triton_backward if ctx.backend == "triton" else torch_backward
        backward(logits, labels, lse, g, ctx.temperature, grad)
        return grad, None, None, None, None, None


def prepare(logits, labels, mask):
    """Check shapes (``logits`` may also be hidden states B x L x d). Returns labels that are safe indices (0 where
    masked) and fp32 mask weights, both contiguous B x L."""
    if logits.dim() != 3 or labels.shape != logits.shape[:2] or mask.shape != logits.shape[:2]:
        raise ValueError(
            f"expected B x L x V logits, B x L labels and mask; got {logits.shape}, {labels.shape}, {mask.shape}"
        )
    mask = mask.to(device=logits.device, dtype=torch.float32).contiguous()
    labels = labels.to(device=logits.device, dtype=torch.int64).masked_fill(mask == 0, 0).contiguous()
    return labels, mask


def sequence_sums(logp, mask):
    """(seq_sum, seq_mean) from masked token log-probs; the mean of a fully masked row is 0."""
    seq_sum = logp.sum(-1)
    count = mask.sum(-1)
    return seq_sum, seq_sum / torch.where(count > 0, count, 1.0)  # not clamp(min=1): masks may be fractional weights


def sequence_logps(logits, labels, mask, temperature=1.0, backend="auto", inplace_backward=False):
    """Per-sequence sum and mean of masked token log-probs, fp32, differentiable w.r.t. logits.

    Args:
        logits: B x L x V, bf16 or fp32; batch/seq strides may be arbitrary, the vocabulary dim must be contiguous.
        labels: B x L int64, already shifted (logits[:, t] predicts labels[:, t]); ignored where mask is 0.
        mask: B x L bool/int/float (used as weights).
        temperature: logits are divided by it before the softmax.
        backend: "auto", "triton" or "torch".
        inplace_backward: write the gradient into the logits buffer instead of a new tensor. Saves one
            B x L x V buffer, but the logits hold the gradient afterwards: do not reuse them (other autograd users
            of the same logits then fail with a version-counter error).

    Returns:
        (seq_sum, seq_mean), each a length-B fp32 tensor.
    """
    if logits.stride(-1) != 1:
        raise ValueError("the vocabulary dim of the logits must be contiguous (stride 1)")
    backend = resolve_backend(backend, logits.device)
    labels, mask = prepare(logits, labels, mask)
    logp = SequenceLogpsFunction.apply(logits, labels, mask, float(temperature), backend, inplace_backward)
    return sequence_sums(logp, mask)
