"""sequence_logratio (policy and reference read in one pass) against the reference, both backends."""

# ruff resolves first-party modules by path and comal_openrlhf.kernels lives in kernels/ (package-dir), so it
# calls this block third-party while isort calls it first-party: keep isort's layout.
import pytest  # noqa: I001
import torch
from _kernels import BACKENDS, CUDA, DEVICE, assert_within, logits_grad_tol, logps_tols, upstream

from comal_openrlhf.kernels import sequence_logps, sequence_logratio
from comal_openrlhf.kernels.reference import sequence_logratio_reference


def make_case(B, L, V, pol_dtype, ref_dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    policy = (torch.randn(B, L, V + 5, generator=g) * 3).to(pol_dtype).to(DEVICE)[..., :V]  # non-contiguous rows
    ref = (torch.randn(B, L, V, generator=g) * 3).to(ref_dtype).to(DEVICE)
    labels = torch.randint(0, V, (B, L), generator=g)
    mask = torch.rand(B, L, generator=g) > 0.3
    mask[-1] = False  # a fully masked row
    labels[~mask] = -100
    return policy, ref, labels.to(DEVICE), mask.to(DEVICE)


def run(fn, policy, ref, labels, mask, temperature, **kwargs):
    x = policy.detach().clone().requires_grad_()
    r = ref.detach().clone().requires_grad_()  # must receive no gradient
    pol_sum, ref_sum, diff = fn(x, r, labels, mask, temperature, **kwargs)
    w = torch.linspace(-1.0, 2.0, pol_sum.shape[0], device=pol_sum.device)
    (w * diff).sum().backward()
    return pol_sum.detach(), ref_sum, diff.detach(), x.grad, r.grad


def assert_sums_close(p, r, d, want_p, want_r, want_d, policy, ref, labels, mask, temperature):
    """Two fp32 evaluations of the same logits each side (see _kernels.logps_tols); d = p - r adds both."""
    tol_p, _ = logps_tols(policy.float() / temperature, labels, mask)
    tol_r, _ = logps_tols(ref.float() / temperature, labels, mask)
    assert_within(p, want_p, 2 * tol_p, "policy_sum")
    assert_within(r, want_r, 2 * tol_r, "ref_sum")
    assert_within(d, want_d, 2 * (tol_p + tol_r), "diff")


def assert_grad_close(g, want, policy, mask, temperature):
    w = torch.linspace(-1.0, 2.0, mask.shape[0], device=mask.device)
    tol = logits_grad_tol(policy.float() / temperature, upstream(mask, w, 0 * w), temperature, want, policy.dtype)
    assert_within(g, want, 2 * tol, "d policy logits")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)]
)
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_matches_reference(backend, dtypes, temperature):
    policy, ref, labels, mask = make_case(3, 37, 1001, *dtypes)
    p, r, d, g, rg = run(sequence_logratio, policy, ref, labels, mask, temperature, backend=backend)
    ep, er, ed, eg, _ = run(sequence_logratio_reference, policy, ref, labels, mask, temperature)
    assert p.dtype == r.dtype == d.dtype == torch.float32
    assert_sums_close(p, r, d, ep, er, ed, policy, ref, labels, mask, temperature)
    assert torch.equal(d, p - r)  # the same subtraction
    assert p[-1] == 0 and r[-1] == 0
    assert rg is None  # the reference is a constant
    assert not r.requires_grad
    assert g.dtype == policy.dtype
    assert_grad_close(g, eg, policy, mask, temperature)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_and_consistent_with_sequence_logps(backend):
    policy, ref, labels, mask = make_case(2, 7, 200, torch.float32, torch.float32, seed=1)
    _, _, _, eg, _ = run(sequence_logratio_reference, policy, ref, labels, mask, 1.0)
    x = policy.detach().clone().requires_grad_()
    p, r, d = sequence_logratio(x, ref, labels, mask, backend=backend, inplace_backward=True)
    w = torch.linspace(-1.0, 2.0, 2, device=DEVICE)
    (w * d).sum().backward()
    assert_grad_close(x.grad, eg, policy, mask, 1.0)
    assert x.grad.data_ptr() == x.data_ptr()
    # The paired pass gives the same numbers as two separate sequence_logps calls (up to two fp32 evaluations).
    tol_p, _ = logps_tols(policy, labels, mask)
    tol_r, _ = logps_tols(ref, labels, mask)
    assert_within(r, sequence_logps(ref, labels, mask, backend=backend)[0], 2 * tol_r, "ref_sum")
    assert_within(p, sequence_logps(policy, labels, mask, backend=backend)[0], 2 * tol_p, "policy_sum")


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_256k(backend):
    policy, ref, labels, mask = make_case(2, 2, 256 * 1024, torch.bfloat16, torch.bfloat16, seed=2)
    p, r, d, g, _ = run(sequence_logratio, policy, ref, labels, mask, 1.0, backend=backend)
    ep, er, ed, eg, _ = run(sequence_logratio_reference, policy, ref, labels, mask, 1.0)
    assert_sums_close(p, r, d, ep, er, ed, policy, ref, labels, mask, 1.0)
    assert_grad_close(g, eg, policy, mask, 1.0)


def test_shape_mismatch_is_refused():
    policy, ref, labels, mask = make_case(2, 3, 10, torch.float32, torch.float32)
    with pytest.raises(ValueError, match="differ in shape"):
        sequence_logratio(policy, ref[:, :2], labels, mask)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_llama3_vocab():
    policy, ref, labels, mask = make_case(2, 128, 128256, torch.bfloat16, torch.bfloat16, seed=3)
    ep, er, ed, eg, _ = run(sequence_logratio_reference, policy, ref, labels, mask, 0.8)
    for backend in ("triton", "torch"):
        p, r, d, g, _ = run(sequence_logratio, policy, ref, labels, mask, 0.8, backend=backend)
        assert_sums_close(p, r, d, ep, er, ed, policy, ref, labels, mask, 0.8)
        assert_grad_close(g, eg, policy, mask, 0.8)
