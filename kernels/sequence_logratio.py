"""Policy and reference per-sequence log-probabilities and their difference, reading both logits in one pass.

With the notation of ``sequence_logps`` (labels y_t, mask weights m_t, temperature T), for policy logits z and
reference logits r:

    policy_sum = sum_t m_t * (z_t[y_t] / T - logsumexp(z_t / T))
    ref_sum    = sum_t m_t * (r_t[y_t] / T - logsumexp(r_t / T))
    diff       = policy_sum - ref_sum                 (the log-ratio of DPO/IPO-style losses)

The reference is a constant: gradients flow to the policy logits only, exactly as in ``sequence_logps``:
dLoss/dz_t[v] = g_t * m_t * (1[v == y_t] - softmax(z_t / T)[v]) / T.

"triton": one program per token row streams the policy row and the reference row through the same V loop, keeping
two online logsumexps, so a step that has no cached reference log-probs launches one kernel instead of two. The
backward is the ``sequence_logps`` backward kernel on the policy logits. "torch": ``sequence_logps``' chunked path
applied to each tensor in turn (one fp32 chunk alive at a time).
"""

import torch
import triton
import triton.language as tl

from .config import row_block
from .sequence_logps import (
    prepare,
    resolve_backend,
    sequence_sums,
    torch_backward,
    torch_forward,
    triton_backward,
)


@triton.jit
def _logratio_fwd_kernel(
    pol_ptr,
    pol_stride_b,
    pol_stride_l,
    ref_ptr,
    ref_stride_b,
    ref_stride_l,
    labels_ptr,
    mask_ptr,
    pol_logp_ptr,
    pol_lse_ptr,
    ref_logp_ptr,
    L,
    V,
    inv_temp,
    BLOCK_V: tl.constexpr,
    V_BLOCKS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // L
    t = row % L
    pol = pol_ptr + b * pol_stride_b + t * pol_stride_l
    ref = ref_ptr + b * ref_stride_b + t * ref_stride_l
    m = tl.load(mask_ptr + row)
    p_max = tl.full((), float("-inf"), tl.float32)
    p_sum = tl.zeros((), tl.float32)
    r_max = tl.full((), float("-inf"), tl.float32)
    r_sum = tl.zeros((), tl.float32)
    if m != 0:  # masked rows read nothing
        for i in range(V_BLOCKS):
            cols = i * BLOCK_V + tl.arange(0, BLOCK_V)
            x = tl.load(pol + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_temp
            y = tl.load(ref + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_temp
            new_p = tl.maximum(p_max, tl.max(x, 0))
            new_r = tl.maximum(r_max, tl.max(y, 0))
            p_sum = p_sum * tl.exp(p_max - new_p) + tl.sum(tl.exp(x - new_p), 0)
            r_sum = r_sum * tl.exp(r_max - new_r) + tl.sum(tl.exp(y - new_r), 0)
            p_max = new_p
            r_max = new_r
    label = tl.load(labels_ptr + row)
    p_target = tl.load(pol + label, mask=m != 0, other=0.0).to(tl.float32) * inv_temp
    r_target = tl.load(ref + label, mask=m != 0, other=0.0).to(tl.float32) * inv_temp
    p_lse = tl.where(m != 0, p_max + tl.log(tl.where(m != 0, p_sum, 1.0)), 0.0)
    r_lse = tl.where(m != 0, r_max + tl.log(tl.where(m != 0, r_sum, 1.0)), 0.0)
    tl.store(pol_logp_ptr + row, tl.where(m != 0, (p_target - p_lse) * m, 0.0))
    tl.store(pol_lse_ptr + row, p_lse)
    tl.store(ref_logp_ptr + row, tl.where(m != 0, (r_target - r_lse) * m, 0.0))


def fwd_launch(policy_logits, ref_logits, labels, mask, pol_logp, pol_lse, ref_logp, temperature):
    """(kernel, grid, args, meta) of the paired forward kernel: triton_forward launches it, kernels_aot compiles it."""
    B, L, V = policy_logits.shape
    args = (
        policy_logits,
        policy_logits.stride(0),
        policy_logits.stride(1),
        ref_logits,
        ref_logits.stride(0),
        ref_logits.stride(1),
        labels,
        mask,
        pol_logp,
        pol_lse,
        ref_logp,
        L,
        V,
        1.0 / temperature,
    )
    return _logratio_fwd_kernel, (B * L,), args, row_block(V)


def triton_forward(policy_logits, ref_logits, labels, mask, temperature):
    B, L, V = policy_logits.shape
    pol_logp = torch.empty(B, L, dtype=torch.float32, device=policy_logits.device)
    pol_lse = torch.empty_like(pol_logp)
    ref_logp = torch.empty_like(pol_logp)
    if B * L:
        kernel, grid, args, meta = fwd_launch(
            policy_logits, ref_logits, labels, mask, pol_logp, pol_lse, ref_logp, temperature
        )
        kernel[grid](*args, **meta)
    return pol_logp, pol_lse, ref_logp


class SequenceLogratioFunction(torch.autograd.Function):
    """(policy logits, reference logits) -> masked token log-probs of each (B x L fp32); grad to policy only."""

    @staticmethod
    def forward(ctx, policy_logits, ref_logits, labels, mask, temperature, backend, inplace_backward):
        if backend == "triton":
            pol_logp, pol_lse, ref_logp = triton_forward(policy_logits, ref_logits, labels, mask, temperature)
        else:
            pol_logp, pol_lse = torch_forward(policy_logits, labels, mask, temperature)
            ref_logp, _ = torch_forward(ref_logits, labels, mask, temperature)
        ctx.mark_non_differentiable(ref_logp)
        ctx.save_for_backward(policy_logits, labels, mask, pol_lse)
        ctx.temperature, ctx.backend, ctx.inplace = temperature, backend, inplace_backward
        return pol_logp, ref_logp

    @staticmethod
    def backward(ctx, grad_pol, _grad_ref):
        logits, labels, mask, lse = ctx.saved_tensors
        g = (grad_pol.float() * mask).contiguous()
        grad = logits.detach() if ctx.inplace else torch.empty_like(logits)  # detach: see sequence_logps
        backward = triton_backward if ctx.backend == "triton" else torch_backward
        backward(logits, labels, lse, g, ctx.temperature, grad)
        return grad, None, None, None, None, None, None


def sequence_logratio(
    policy_logits, ref_logits, labels, mask, temperature=1.0, backend="auto", inplace_backward=False
):
    """Per-sequence policy and reference log-prob sums and their difference, fp32.

    Args:
        policy_logits, ref_logits: B x L x V each (bf16 or fp32, dtypes and batch/seq strides may differ; the
            vocabulary dim must be contiguous). Only policy_logits receives a gradient.
        labels, mask, temperature, backend, inplace_backward: as in ``sequence_logps`` (in-place overwrites the
            policy logits with their gradient on backward).

    Returns:
        (policy_sum, ref_sum, diff), each a length-B fp32 tensor; ref_sum carries no gradient.
    """
    if ref_logits.shape != policy_logits.shape:
        raise ValueError(f"policy and reference logits differ in shape: {policy_logits.shape} vs {ref_logits.shape}")
    if policy_logits.stride(-1) != 1 or ref_logits.stride(-1) != 1:
        raise ValueError("the vocabulary dim of both logits tensors must be contiguous (stride 1)")
    backend = resolve_backend(backend, policy_logits.device)
    labels, mask = prepare(policy_logits, labels, mask)
    pol_logp, ref_logp = SequenceLogratioFunction.apply(
        policy_logits, ref_logits.detach(), labels, mask, float(temperature), backend, inplace_backward
    )
    policy_sum, _ = sequence_sums(pol_logp, mask)
    ref_sum = ref_logp.sum(-1)
    return policy_sum, ref_sum, policy_sum - ref_sum
