"""Backend parameters and numeric tolerances shared by the kernel test modules.

Tolerances come from the arithmetic, not from what one CPU printed (a CPU with other SIMD widths sums in another
order): a sum of n fp32 terms computed in any order is off by about eps * sqrt(n) * (sum of |terms|) (rounding
errors of the partial sums as a random walk, Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed.,
section 2.8), and a value rounded to bf16 by up to eps_bf16 * |value|. Both the kernel and the fp32 reference make
such errors; SAFETY covers their sum at about four standard deviations.
"""

import math
import os
import sys

import pytest
import torch

# benchmarks/ (its scripts, and _checkout: comal_openrlhf.kernels from this checkout where the project is not
# installed, as on the lent GPU machine and in scripts/device_compat.sh's environment; see benchmarks/_checkout.py).
BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.append(BENCHMARKS)
from _checkout import use_checkout  # noqa: E402

use_checkout()  # before anything imports triton (see the package docstring)

from comal_openrlhf.kernels import triton_runs_on_cpu  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
TRITON = pytest.param(
    "triton",
    marks=pytest.mark.skipif(
        not CUDA and not triton_runs_on_cpu(),
        reason="no CUDA and triton was imported before comal_openrlhf.kernels, so its interpreter is off",
    ),
)
BACKENDS = ["torch", TRITON]

EPS32 = torch.finfo(torch.float32).eps  # 2^-23
SAFETY = 4.0


def eps(dtype):
    """Machine epsilon of a dtype (bf16: 2^-7, the largest relative gap between neighbouring bf16 numbers)."""
    return torch.finfo(dtype).eps


def sum_tol(n_terms, abs_sum):
    """fp32 error of a sum of n_terms terms whose absolute values add up to abs_sum (tensor or float)."""
    return SAFETY * EPS32 * math.sqrt(max(n_terms, 1)) * abs_sum


def logps_tols(z, labels, mask, logit_err=0.0):
    """(seq_sum, seq_mean) tolerances, per sequence, of masked token log-probs of scaled logits z (B x L x V fp32,
    already divided by T) computed in fp32 against an fp32 reference.

    Per token: the logsumexp adds V positive terms of at most 1 after the max shift (relative error
    sum_tol(V, 1) of the sum, i.e. the same absolute error in lse); the arguments z - max and the final
    max + log(sum) round at the scale |z| + |lse|; an error logit_err in the logits themselves (e.g. their bf16
    rounding) moves z_y and lse by up to logit_err each. Per sequence: L such independent token errors (sqrt(L))
    plus the rounding of the sum of the token log-probs."""
    V = z.shape[-1]
    m = mask.float()
    lse = torch.logsumexp(z.double(), -1)
    logp = z.double().gather(-1, labels.long().clamp(0, V - 1).unsqueeze(-1)).squeeze(-1) - lse
    scale = z.double().abs().amax(-1) + lse.abs()
    token = sum_tol(V, 1.0) + SAFETY * EPS32 * scale + 2 * logit_err
    count = m.sum(-1).double()
    seq = (token * m).pow(2).sum(-1).sqrt() + sum_tol(count.max().item(), (logp.abs() * m).sum(-1))
    return seq.float(), (seq / count.clamp(min=1)).float()


def assert_within(got, want, tol, what=""):
    """|got - want| <= tol elementwise (tol broadcasts); reports the worst element."""
    assert got.shape == want.shape, (got.shape, want.shape)
    excess = (got.double() - want.double()).abs() - torch.as_tensor(tol, dtype=torch.float64, device=got.device)
    worst = excess.argmax()
    assert excess.max().item() <= 0, (
        f"{what}: |got - want| exceeds its tolerance by {excess.max().item():.3g} at flat index {worst.item()} "
        f"(got {got.flatten()[worst].item():.9g}, want {want.flatten()[worst].item():.9g})"
    )


def upstream(mask, w, u):
    """g_t = d/d logp_t of sum_b (w_b seq_sum_b + u_b seq_mean_b), the loss the kernel tests differentiate."""
    m = mask.double()
    count = m.sum(-1, keepdim=True).clamp(min=1)
    return (w.double()[:, None] + u.double()[:, None] / count) * m


def logits_grad_tol(z, g, temperature, grad_ref, dtype):
    """Tolerance of d loss / d logits = (g_t / T) (onehot - softmax(z_t)), elementwise; z are the scaled fp32 logits
    (divided by T), g the upstream gradient per token.

    softmax(z)_v = exp(z_v - lse) carries the lse error (sum_tol(V, 1)) and the rounding of z_v - lse as a
    relative error of at most that size for every v, so each entry is off by |g_t / T| times it; the gradient is then
    written in the logits dtype (one rounding, eps(dtype) * |value|)."""
    V = z.shape[-1]
    zd = z.double()
    lse = torch.logsumexp(zd, -1)
    rel = sum_tol(V, 1.0) + SAFETY * EPS32 * (zd.abs().amax(-1) + lse.abs())
    return (rel * g.double().abs() / temperature)[..., None] + eps(dtype) * grad_ref.double().abs()
