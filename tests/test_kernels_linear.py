"""linear_sequence_logps (hidden states + LM head, no N x V logits) against the fp32 reference, both backends.

The truth is computed in float64 from the same (possibly bf16) hidden states and weight. bf16 runs differ from it by
design: the chunk logits are rounded to bf16 (the LM-head GEMM runs in the weight dtype), dz is rounded to bf16
before the dh and dW GEMMs and dW accumulates in bf16 per chunk; every tolerance adds up those roundings and the
fp32 sums (see tests/_kernels.py).
"""

# ruff resolves first-party modules by path and comal_openrlhf.kernels lives in kernels/ (package-dir), so it
# calls this block third-party while isort calls it first-party: keep isort's layout.
import math  # noqa: I001

import pytest
import torch
from _kernels import BACKENDS, CUDA, DEVICE, EPS32, SAFETY, assert_within, eps, logps_tols, sum_tol, upstream

from comal_openrlhf.kernels import linear_sequence_logps, sequence_logps
from comal_openrlhf.kernels.linear_sequence_logps import chunk_schedule


def make_case(B, L, D, V, dtype, bias=False, seed=0):
    """Hidden states as a non-contiguous slice; logits ~ N(0, 1); rows 0 and 1 fully masked when B > 2 (the kernel
    drops masked tokens before its GEMMs)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, L + 2, D, generator=g).to(dtype).to(DEVICE)[:, 2:]
    weight = (torch.randn(V, D, generator=g) / D**0.5).to(dtype).to(DEVICE)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype).to(DEVICE) if bias else None
    labels = torch.randint(0, V, (B, L), generator=g)
    mask = torch.rand(B, L, generator=g) > 0.3
    mask[: min(2, B - 1)] = False
    labels[~mask] = -100
    return hidden, weight, b, labels.to(DEVICE), mask.to(DEVICE)


def run(fn, hidden, weight, bias, labels, mask, temperature, **kwargs):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    seq_sum, seq_mean = fn(leaves[0], leaves[1], labels, mask, bias=leaves[2], temperature=temperature, **kwargs)
    w, u = loss_weights(seq_sum.shape[0], seq_sum.device)
    (w * seq_sum + u * seq_mean).sum().backward()
    return seq_sum.detach(), seq_mean.detach(), [t.grad if t is not None else None for t in leaves]


def loss_weights(B, device):
    return torch.linspace(-1.0, 2.0, B, device=device), torch.linspace(3.0, 0.5, B, device=device)


def exact(hidden, weight, bias, labels, mask, temperature):
    """float64 reference: (seq_sum, seq_mean, [dh, dW, db], z / T, dz) from the same inputs."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    z = leaves[0] @ leaves[1].t()
    if bias is not None:
        z = z + leaves[2]
    z = z / temperature
    z.retain_grad()
    safe = labels.masked_fill(~mask, 0)
    logp = torch.log_softmax(z, -1).gather(-1, safe.unsqueeze(-1)).squeeze(-1) * mask
    seq_sum = logp.sum(-1)
    seq_mean = seq_sum / mask.sum(-1).clamp(min=1)
    w, u = loss_weights(seq_sum.shape[0], seq_sum.device)
    (w.double() * seq_sum + u.double() * seq_mean).sum().backward()
    grads = [t.grad if t is not None else None for t in leaves]
    return seq_sum.detach(), seq_mean.detach(), grads, z.detach(), z.grad / temperature


def check_against_exact(case, temperature, s, m, grads):
    """Compare a kernel's outputs with the float64 truth; every tolerance from the arithmetic (see _kernels)."""
    hidden, weight, bias, labels, mask = case
    dtype = weight.dtype
    es, em, egrads, z, dz = exact(*case, temperature)
    D, V = weight.shape[1], weight.shape[0]
    h64, w64 = hidden.double().reshape(-1, D), weight.double()
    # Logits: an fp32 dot over d (plus the bias add), then rounded to the weight dtype (bf16: eps_bf16 |z|).
    absdot = h64.abs() @ w64.abs().t()
    if bias is not None:
        absdot = absdot + bias.double().abs()
    rounding = eps(dtype) * (z.reshape(-1, V) * temperature).abs() if dtype != torch.float32 else 0.0
    zerr = (sum_tol(D + 1, absdot) + rounding).amax(-1).view(mask.shape) / temperature
    tol_sum, tol_mean = logps_tols(z, labels, mask, logit_err=zerr)
    assert_within(s, es, tol_sum, "seq_sum")
    assert_within(m, em, tol_mean, "seq_mean")
    # dz = (g / T)(onehot - p): p carries the lse error and 2 zerr (z_v and lse); bf16 rounds dz once more.
    w, u = loss_weights(mask.shape[0], mask.device)
    g = upstream(mask, w, u).reshape(-1)
    zf = z.reshape(-1, V)
    lse = torch.logsumexp(zf, -1)
    p = (zf - lse[:, None]).exp()
    rel = sum_tol(V, 1.0) + SAFETY * EPS32 * (zf.abs().amax(-1) + lse.abs()) + 2 * zerr.reshape(-1)
    dzf = dz.reshape(-1, V)
    ddz = (g.abs() / temperature * rel)[:, None] * p + (eps(dtype) if dtype != torch.float32 else 0.0) * dzf.abs()
    out_eps = eps(dtype)
    n_chunks = len(chunk_schedule(int(mask.sum()), V, D, dtype, hidden.device.type))
    tol_dh = sum_tol(V, dzf.abs() @ w64.abs()) + ddz @ w64.abs() + out_eps * egrads[0].abs().reshape(-1, D)
    tol_dw = sum_tol(g.numel(), dzf.abs().t() @ h64.abs()) + ddz.t() @ h64.abs()
    tol_dw = tol_dw + out_eps * math.sqrt(n_chunks + 1) * (dzf.abs().t() @ h64.abs())  # dW accumulates in dtype
    assert_within(grads[0].reshape(-1, D), egrads[0].reshape(-1, D), tol_dh, "dh")
    assert_within(grads[1], egrads[1], tol_dw, "dW")
    if bias is not None:
        tol_db = sum_tol(g.numel(), dzf.abs().sum(0)) + ddz.sum(0) + eps(bias.dtype) * egrads[2].abs()
        assert_within(grads[2], egrads[2], tol_db, "db")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias,temperature", [(False, 1.0), (True, 0.7)])
def test_matches_reference(backend, dtype, bias, temperature):
    # d = 48 and V = 1001 are not multiples of any tile size.
    case = make_case(3, 37, 48, 1001, dtype, bias=bias)
    s, m, grads = run(linear_sequence_logps, *case, temperature, backend=backend)
    assert s.dtype == m.dtype == torch.float32
    assert [g.dtype for g in grads if g is not None] == [dtype] * (3 if bias else 2)
    check_against_exact(case, temperature, s, m, grads)
    assert s[0] == 0 and m[0] == 0  # fully masked row
    assert torch.all(grads[0][0] == 0)  # masked tokens: no gradient into their hidden states


@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_sequence_logps_on_materialised_logits(backend):
    hidden, weight, _, labels, mask = make_case(2, 20, 32, 300, torch.float32, seed=1)
    s, m = linear_sequence_logps(hidden, weight, labels, mask, temperature=1.5, backend=backend)
    ls, lm = sequence_logps(hidden @ weight.t(), labels, mask, temperature=1.5, backend="torch")
    # Same fp32 arithmetic except the order of the d-term dots of the logits (chunk GEMM vs one GEMM).
    z = (hidden.double() @ weight.double().t()) / 1.5
    zerr = sum_tol(32, (hidden.double().abs() @ weight.double().abs().t()).amax(-1)) / 1.5
    tol_sum, tol_mean = logps_tols(z, labels, mask, logit_err=2 * zerr)
    assert_within(s, ls, tol_sum, "seq_sum")
    assert_within(m, lm, tol_mean, "seq_mean")


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_256k(backend):
    hidden, weight, bias, labels, mask = make_case(1, 3, 16, 256 * 1024, torch.float32, seed=2)
    mask[0] = torch.tensor([True, False, True])
    labels[0, 1] = -100
    case = (hidden, weight, bias, labels, mask)
    s, m, grads = run(linear_sequence_logps, *case, 1.0, backend=backend)
    check_against_exact(case, 1.0, s, m, grads)


def test_frozen_head_gets_no_gradient():
    """A head that does not require grad (frozen, as under LoRA) gets None; dh is unchanged."""
    hidden, weight, _, labels, mask = make_case(3, 37, 48, 1001, torch.float32)
    s, m, grads = run(linear_sequence_logps, hidden, weight, None, labels, mask, 1.0, backend="torch")
    h = hidden.detach().clone().requires_grad_()
    s2, m2 = linear_sequence_logps(h, weight, labels, mask, backend="torch")
    w, u = loss_weights(3, h.device)
    (w * s2 + u * m2).sum().backward()
    assert weight.grad is None
    assert torch.equal(h.grad, grads[0]) and torch.equal(s2, s)


def test_chunks_and_masked_rows_skipped(monkeypatch):
    """Several chunks (CPU chunk budget shrunk to 3 rows' worth) give the same result as one."""
    from comal_openrlhf.kernels import config

    case = make_case(3, 37, 48, 1001, torch.float32, bias=True)
    s1, m1, g1 = run(linear_sequence_logps, *case, 0.7, backend="torch")
    monkeypatch.setattr(config, "CPU_CHUNK_BYTES", 3 * 4 * 1001)
    assert len(chunk_schedule(int(case[4].sum()), 1001, 48, torch.float32, "cpu")) > 5
    s, m, grads = run(linear_sequence_logps, *case, 0.7, backend="torch")
    check_against_exact(case, 0.7, s, m, grads)
    torch.testing.assert_close(s, s1, rtol=0, atol=0)  # chunks are rows: the per-row arithmetic is unchanged


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_llama_sized_head():
    case = make_case(2, 200, 1024, 128256, torch.bfloat16, seed=3)
    for backend in ("triton", "torch"):
        s, m, grads = run(linear_sequence_logps, *case, 1.0, backend=backend)
        check_against_exact(case, 1.0, s, m, grads)
