"""--comal.logps_kernel linear (backbone to the last hidden state, then the fused LM-head kernel) gives the loss and
the gradients of every parameter of the logits path, on a tiny Llama in fp32 (untied and tied embeddings), and
gathers a ZeRO-3 partitioned head around each use."""

import contextlib  # noqa: I001
import math

import pytest
import torch
from _kernels import EPS32, SAFETY, assert_within

from comal_openrlhf.logps import LOGPS_KERNELS, lm_head_parts, sequence_logps


def make_actor(path, tie):
    from comal_openrlhf import cpu_runtime

    cpu_runtime.apply()  # OpenRLHF on a machine without CUDA (flash-attn stubs and the like)
    from openrlhf.models import Actor
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32, attn_implementation="eager")
    if tie:
        model.config.tie_word_embeddings = True
        model.lm_head.weight = model.model.embed_tokens.weight
    model.lm_head.weight.data.normal_(0, 1.0)  # logits of order 1-10, not the ~0 of a fresh init
    return Actor(model, temperature=0.9)


def batch(V):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (3, 12), generator=g)
    att = torch.ones_like(ids)
    att[1, 9:] = 0  # right padding
    att[2, 7:] = 0
    return ids, att, [3, 4, 2]


def loss_and_grads(actor, kernel, ids, att, plens):
    actor.zero_grad(set_to_none=True)
    total, mean = sequence_logps(actor, ids, att, plens, kernel)
    loss = (torch.tensor([1.0, -0.5, 2.0]) * total + torch.tensor([0.3, 1.0, -2.0]) * mean).sum()
    loss.backward()
    return (
        total.detach(),
        mean.detach(),
        {n: p.grad.clone() for n, p in actor.named_parameters() if p.grad is not None},
    )


@pytest.mark.parametrize("tie", [False, True])
def test_linear_matches_logits_path(tiny_model, tie):
    assert "linear" in LOGPS_KERNELS  # the CLI offers --comal.logps_kernel linear
    actor = make_actor(tiny_model, tie)
    V = actor.model.config.vocab_size
    ids, att, plens = batch(V)
    ref = loss_and_grads(actor, "torch", ids, att, plens)
    got = loss_and_grads(actor, "linear", ids, att, plens)
    # The two paths differ only in the LM-head step: the order of the fp32 sums over d (logits), V (logsumexp, dh)
    # and the N tokens (dW). Each is off by about eps sqrt(terms) relative to the scale of what it sums; the
    # backbone's backward is linear in dh, so every parameter's gradient carries that relative error.
    N = int(att.sum())
    D = actor.model.config.hidden_size
    rel = SAFETY * EPS32 * math.sqrt(D + V + N)
    for want, have, what in ((ref[0], got[0], "seq_sum"), (ref[1], got[1], "seq_mean")):
        assert_within(have, want, rel * (want.abs() + math.log(V)), what)
    assert ref[2].keys() == got[2].keys() and len(ref[2]) > 5
    for name, want in ref[2].items():
        assert_within(got[2][name], want, rel * want.abs().max(), name)
    if tie:  # one parameter, both gradients (embedding and head) accumulated into it
        assert "model.model.embed_tokens.weight" in got[2] and "model.lm_head.weight" not in got[2]


def test_zero3_head_is_gathered_in_forward_and_backward(tiny_model, monkeypatch):
    """A head weight carrying DeepSpeed's ds_id is used only inside GatheredParameters (forward and backward)."""
    import deepspeed

    actor = make_actor(tiny_model, tie=False)
    ids, att, plens = batch(actor.model.config.vocab_size)
    ref = loss_and_grads(actor, "linear", ids, att, plens)
    weight = actor.model.lm_head.weight
    entered = []

    @contextlib.contextmanager
    def gathered(params, modifier_rank=None):
        assert params[0] is weight and modifier_rank is None
        entered.append(torch.is_grad_enabled())
        yield

    monkeypatch.setattr(deepspeed.zero, "GatheredParameters", gathered)
    weight.ds_id = 0
    try:
        got = loss_and_grads(actor, "linear", ids, att, plens)
    finally:
        del weight.ds_id
    assert entered and False in entered  # entered again in the backward (grad mode off there)
    assert torch.equal(got[0], ref[0])
    assert torch.equal(got[2]["model.lm_head.weight"], ref[2]["model.lm_head.weight"])


def test_softcapped_logits_are_refused(tiny_model):
    actor = make_actor(tiny_model, tie=False)
    actor.model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        lm_head_parts(actor.model)
