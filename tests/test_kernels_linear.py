"""linear_sequence_logps (hidden states + LM head, no N x V logits) against the fp32 reference, both backends.

The reference computes fp32 logits from the given (possibly bf16) hidden states and weight. bf16 runs differ from
it by design: the torch backend rounds its chunk logits to bf16 (the LM-head matmul runs in the weight dtype) and
the triton backward rounds dz to bf16 before its dots; tolerances below are sized for that.
"""

# ruff resolves first-party modules by path and comal_openrlhf.kernels lives in kernels/ (package-dir), so it
# calls this block third-party while isort calls it first-party: keep isort's layout.
import pytest  # noqa: I001
import torch
from _kernels import BACKENDS, CUDA, DEVICE

from comal_openrlhf.kernels import linear_sequence_logps, sequence_logps
from comal_openrlhf.kernels.reference import linear_sequence_logps_reference


def make_case(B, L, D, V, dtype, bias=False, seed=0):
    """Hidden states as a non-contiguous slice; logits ~ N(0, 1); rows 0 and 1 fully masked when B > 2 (so with
    L=37 at least one token tile of the triton backward is all masked and skipped)."""
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
    w = torch.linspace(-1.0, 2.0, seq_sum.shape[0], device=seq_sum.device)
    u = torch.linspace(3.0, 0.5, seq_sum.shape[0], device=seq_sum.device)
    (w * seq_sum + u * seq_mean).sum().backward()
    return seq_sum.detach(), seq_mean.detach(), [t.grad if t is not None else None for t in leaves]


def assert_close_scaled(got, want, rel):
    """|got - want| <= rel * max|want|: gradients mix large and cancelling near-zero entries."""
    assert got.dtype == want.dtype and got.shape == want.shape
    err = (got.float() - want.float()).abs().max().item()
    assert err <= rel * want.float().abs().max().item(), f"max abs error {err} vs scale {want.abs().max().item()}"


TOL = {  # (seq_sum / seq_mean atol, gradient rel)
    (torch.float32, "torch"): (1e-4, 1e-5),
    (torch.float32, "triton"): (1e-4, 1e-5),
    (torch.bfloat16, "torch"): (5e-2, 2e-2),
    (torch.bfloat16, "triton"): (1e-3, 2e-2),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias,temperature", [(False, 1.0), (True, 0.7)])
def test_matches_reference(backend, dtype, bias, temperature):
    # d = 48 and V = 1001 are not multiples of the 64-wide tiles.
    case = make_case(3, 37, 48, 1001, dtype, bias=bias)
    s, m, grads = run(linear_sequence_logps, *case, temperature, backend=backend)
    rs, rm, rgrads = run(linear_sequence_logps_reference, *case, temperature)
    atol, rel = TOL[(dtype, backend)]
    assert s.dtype == m.dtype == torch.float32
    torch.testing.assert_close(s, rs, rtol=1e-5, atol=atol)
    torch.testing.assert_close(m, rm, rtol=1e-5, atol=atol)
    assert s[0] == 0 and m[0] == 0  # fully masked row
    for got, want in zip(grads, rgrads):
        if want is not None:
            assert_close_scaled(got, want, rel)
    assert torch.all(grads[0][0] == 0)  # masked tokens: no gradient into their hidden states


@pytest.mark.parametrize("backend", BACKENDS)
def test_equals_sequence_logps_on_materialised_logits(backend):
    hidden, weight, _, labels, mask = make_case(2, 20, 32, 300, torch.float32, seed=1)
    s, m = linear_sequence_logps(hidden, weight, labels, mask, temperature=1.5, backend=backend)
    ls, lm = sequence_logps(hidden @ weight.t(), labels, mask, temperature=1.5, backend="torch")
    torch.testing.assert_close(s, ls, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(m, lm, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_256k(backend):
    hidden, weight, bias, labels, mask = make_case(1, 3, 16, 256 * 1024, torch.float32, seed=2)
    mask[0] = torch.tensor([True, False, True])
    labels[0, 1] = -100
    case = (hidden, weight, bias, labels, mask)
    s, m, grads = run(linear_sequence_logps, *case, 1.0, backend=backend)
    rs, rm, rgrads = run(linear_sequence_logps_reference, *case, 1.0)
    torch.testing.assert_close(s, rs, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(m, rm, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads[:2], rgrads[:2]):
        assert_close_scaled(got, want, 1e-5)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_llama_sized_head():
    case = make_case(2, 200, 1024, 128256, torch.bfloat16, seed=3)
    rs, rm, rgrads = run(linear_sequence_logps_reference, *case, 1.0)
    for backend in ("triton", "torch"):
        s, m, grads = run(linear_sequence_logps, *case, 1.0, backend=backend)
        torch.testing.assert_close(s, rs, rtol=1e-4, atol=TOL[(torch.bfloat16, backend)][0])
        torch.testing.assert_close(m, rm, rtol=1e-4, atol=TOL[(torch.bfloat16, backend)][0])
        for got, want in zip(grads[:2], rgrads[:2]):
            assert_close_scaled(got, want, 2e-2)
