"""sequence_logps against the fp32 log_softmax + gather reference, both backends.

Without CUDA the "triton" backend runs in Triton's interpreter (slow), so its shapes stay tiny; it needs
comal_openrlhf.kernels to be imported before anything imports triton (see the package docstring).
"""

# ruff resolves first-party modules by path and comal_openrlhf.kernels lives in kernels/ (package-dir), so it
# calls this block third-party while isort calls it first-party: keep isort's layout.
import math  # noqa: I001

import pytest
import torch
from _kernels import BACKENDS, CUDA, DEVICE, assert_within, logits_grad_tol, logps_tols, upstream

from comal_openrlhf.kernels import resolve_backend, sequence_logps
from comal_openrlhf.kernels.reference import sequence_logps_reference

DTYPES = [torch.float32, torch.bfloat16]


def make_case(B, L, V, dtype, seed=0, fully_masked_row=1):
    """Logits that are a non-contiguous view (a slice along L), garbage labels where masked, one row all masked."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, L + 1, V, generator=g) * 3).to(dtype).to(DEVICE)[:, 1:]
    labels = torch.randint(0, V, (B, L), generator=g)
    mask = torch.rand(B, L, generator=g) > 0.3
    if fully_masked_row is not None:
        mask[fully_masked_row] = False
    labels[~mask] = torch.where(torch.rand(B, L, generator=g) > 0.5, -100, V + 7)[~mask]  # must never be indexed
    return logits, labels.to(DEVICE), mask.to(DEVICE)


def loss_weights(B, device):
    return torch.linspace(-1.0, 2.0, B, device=device), torch.linspace(3.0, 0.5, B, device=device)


def run(fn, logits, *args, **kwargs):
    """Forward, then backward of sum_b (w_b seq_sum_b + u_b seq_mean_b) for fixed w, u."""
    x = logits.detach().clone().requires_grad_()
    seq_sum, seq_mean = fn(x, *args, **kwargs)
    w, u = loss_weights(seq_sum.shape[0], seq_sum.device)
    (w * seq_sum + u * seq_mean).sum().backward()
    return seq_sum.detach(), seq_mean.detach(), x.grad


def assert_logps_close(s, m, want_s, want_m, logits, labels, mask, temperature):
    """Both sides read the same logits: the tolerance is that of two fp32 evaluations (see _kernels.logps_tols)."""
    tol_sum, tol_mean = logps_tols(logits.float() / temperature, labels, mask)
    assert_within(s, want_s, 2 * tol_sum, "seq_sum")
    assert_within(m, want_m, 2 * tol_mean, "seq_mean")


def assert_grad_close(g, want, logits, mask, temperature):
    w, u = loss_weights(mask.shape[0], mask.device)
    tol = logits_grad_tol(logits.float() / temperature, upstream(mask, w, u), temperature, want, logits.dtype)
    assert_within(g, want, 2 * tol, "d logits")


def check(logits, labels, mask, backend, temperature=1.0, inplace=False):
    s, m, g = run(sequence_logps, logits, labels, mask, temperature, backend=backend, inplace_backward=inplace)
    rs, rm, rg = run(sequence_logps_reference, logits, labels, mask, temperature)
    assert s.dtype == m.dtype == torch.float32
    assert_logps_close(s, m, rs, rm, logits, labels, mask, temperature)
    # Gradients are written in the logits dtype: bf16 ones may differ by one bf16 rounding (eps_bf16 |value|).
    assert g.dtype == logits.dtype
    assert_grad_close(g, rg, logits, mask, temperature)
    return s, m, g


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_reference_odd_shape(backend, dtype, temperature):
    # V = 1001 is not a multiple of any block size; row 1 is fully masked.
    logits, labels, mask = make_case(3, 37, 1001, dtype)
    s, m, g = check(logits, labels, mask, backend, temperature)
    assert s[1] == 0 and m[1] == 0  # fully masked row: zero, not NaN
    assert torch.all(g[~mask] == 0)  # masked positions get no gradient
    assert torch.isfinite(m).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_inplace_backward_writes_into_logits(backend, dtype):
    logits, labels, mask = make_case(2, 9, 300, dtype, seed=1)
    _, _, rg = run(sequence_logps_reference, logits, labels, mask, 1.3)
    x = logits.detach().clone().requires_grad_()
    seq_sum, seq_mean = sequence_logps(x, labels, mask, 1.3, backend=backend, inplace_backward=True)
    w, u = loss_weights(2, DEVICE)
    (w * seq_sum + u * seq_mean).sum().backward()
    assert_grad_close(x.grad, rg, logits, mask, 1.3)
    assert x.grad.data_ptr() == x.data_ptr()  # no new buffer: the logits now hold their gradient
    assert torch.equal(x.detach(), x.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_fails_loudly_when_logits_are_reused(backend):
    logits, labels, mask = make_case(2, 5, 64, torch.float32, seed=2)
    base = logits.detach().clone().requires_grad_()
    x = base * 1.0  # non-leaf logits, as a model produces them
    other_use = (x**2).sum()  # saves x for its own backward
    seq_sum, _ = sequence_logps(x, labels, mask, backend=backend, inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (seq_sum.sum() + other_use).backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_256k(backend):
    logits, labels, mask = make_case(1, 3, 256 * 1024, torch.float32, seed=3, fully_masked_row=None)
    mask[0, 1] = False
    check(logits, labels, mask, backend, temperature=0.9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int64_offsets(backend):
    """Row offsets past 2^31 elements: a strided view into a 4.3 GB buffer of which only two rows are touched.

    Position t of the view starts at element t * 2^22, so the last position (t = 512) starts at exactly 2^31, an
    offset that wraps in int32 arithmetic. Only the last two positions are unmasked: masked rows are never read,
    and the untouched pages of the buffer are never backed by memory (CPU: lazily mapped zero pages)."""
    L, V, stride = 513, 1000, 2**22
    buf = torch.empty(L * stride, dtype=torch.bfloat16, device=DEVICE)
    logits = buf.as_strided((1, L, V), (L * stride, stride, 1))
    g = torch.Generator().manual_seed(4)
    logits[0, -2:] = (torch.randn(2, V, generator=g) * 3).to(torch.bfloat16).to(DEVICE)
    labels = torch.randint(0, V, (1, L), generator=g).to(DEVICE)
    mask = torch.zeros(1, L, dtype=torch.bool, device=DEVICE)
    mask[0, -2:] = True
    s, m = sequence_logps(logits, labels, mask, backend=backend)
    rs, rm = sequence_logps_reference(logits[:, -2:], labels[:, -2:], mask[:, -2:])
    assert_logps_close(s, m, rs, rm, logits[:, -2:], labels[:, -2:], mask[:, -2:], 1.0)


def test_hand_computed_example():
    # V = 2, logits (0, ln 3): softmax = (1/4, 3/4). Token 0 has label 1: log(3/4); token 1 has label 0: log(1/4);
    # token 2 is masked (label -100). seq_sum = log(3/16), seq_mean = seq_sum / 2.
    logits = torch.tensor([[[0.0, math.log(3)]] * 3])
    labels = torch.tensor([[1, 0, -100]])
    mask = torch.tensor([[1, 1, 0]])
    s, m = sequence_logps(logits, labels, mask, backend="torch")
    # ln 3 itself is rounded to fp32 (|error| <= eps/2 * ln 3, moving each log-prob by at most that).
    tol_sum, tol_mean = logps_tols(logits, labels, mask, logit_err=torch.finfo(torch.float32).eps * math.log(3))
    assert_within(s, torch.tensor([math.log(3 / 16)], dtype=torch.float64), tol_sum, "seq_sum")
    assert_within(m, torch.tensor([math.log(3 / 16) / 2], dtype=torch.float64), tol_mean, "seq_mean")


def test_fractional_mask_weights():
    # Weights 0.25 and 0.25 on two tokens: seq_mean = (0.25 a + 0.25 b) / 0.5 = (a + b) / 2, no clamping to 1.
    logits = torch.randn(1, 2, 50, device=DEVICE)
    labels = torch.tensor([[3, 41]], device=DEVICE)
    weights = torch.tensor([[0.25, 0.25]], device=DEVICE)
    s, m = sequence_logps(logits, labels, weights, backend="torch")
    full_s, _ = sequence_logps(logits, labels, torch.ones_like(weights), backend="torch")
    # Scaling by powers of two is exact in binary floating point, and the per-token arithmetic is the same.
    assert torch.equal(s, 0.25 * full_s)
    assert torch.equal(m, full_s / 2)


def test_resolve_backend():
    assert resolve_backend("auto", torch.device("cpu")) == "torch"
    if CUDA:
        assert resolve_backend("auto", torch.device("cuda")) == "triton"
    with pytest.raises(ValueError):
        resolve_backend("cuda", torch.device("cpu"))


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_llama3_vocab(dtype):
    """Native GPU run at the Llama-3 vocabulary with both backends."""
    logits, labels, mask = make_case(2, 256, 128256, dtype, seed=5)
    for backend in ("triton", "torch"):
        check(logits, labels, mask, backend, temperature=0.8, inplace=True)
