"""--comal.logps_kernel linear (backbone to the last hidden state, then the fused LM-head kernel) gives the loss and
the gradients of every parameter of the logits path, on a tiny Llama in fp32 (untied and tied embeddings), and
runs under ZeRO-3, where the head's weight is partitioned and gathered by DeepSpeed's module hooks."""

import math  # noqa: I001

import pytest
import torch
from _kernels import EPS32, SAFETY, assert_within

from comal_openrlhf.training.logps import LOGPS_KERNELS, lm_head_parts, sequence_logps


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


def test_zero3_head_is_called_as_a_module(tiny_model):
    """With a partitioned (ZeRO-3) head the computation runs as the head module's forward, so that DeepSpeed's module
    hooks gather its weight; the module's own forward is restored afterwards and the results do not change."""
    actor = make_actor(tiny_model, tie=False)
    ids, att, plens = batch(actor.model.config.vocab_size)
    ref = loss_and_grads(actor, "linear", ids, att, plens)
    head = actor.model.lm_head
    calls = []
    handle = head.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape))
    head.weight.ds_id = 0
    try:
        got = loss_and_grads(actor, "linear", ids, att, plens)
    finally:
        del head.weight.ds_id
        handle.remove()
    assert calls == [(3, 11, actor.model.config.hidden_size)]  # hidden states of every position but the last
    assert "forward" not in vars(head)  # the class's forward is back
    assert torch.equal(got[0], ref[0])
    assert all(torch.equal(got[2][n], ref[2][n]) for n in ref[2])


def test_softcapped_logits_are_refused(tiny_model):
    actor = make_actor(tiny_model, tie=False)
    actor.model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        lm_head_parts(actor.model)


ZERO3_SCRIPT = r"""
import json, math, os, sys, tempfile
from comal_openrlhf import cpu_runtime

cpu_runtime.apply()
import torch
from deepspeed.utils import safe_get_full_grad
from openrlhf.models import Actor
from openrlhf.utils import get_strategy

from comal_openrlhf.cli.train_comal import parse_args
from comal_openrlhf.training.logps import sequence_logps

path, out = sys.argv[1], sys.argv[2]
tmp = tempfile.mkdtemp()
args = parse_args(["--model.model_name_or_path", path, "--ds.zero_stage", "3", "--ds.param_dtype", "fp32",
                   "--train.micro_batch_size", "3", "--train.batch_size", "3",
                   "--ckpt.path", os.path.join(tmp, "c"), "--ckpt.output_dir", os.path.join(tmp, "o")])
strategy = get_strategy(args)
strategy.setup_distributed()
torch.manual_seed(0)
model = Actor(path, attn_implementation=args.ds.attn_implementation, param_dtype="fp32",
              ds_config=strategy.get_ds_train_config(), temperature=0.9)
cfg = dict(optim="adam", muon=vars(args.muon), adam=vars(args.adam), max_norm=0.0, scheduler_steps=10,
           lr_scheduler="constant", lr_warmup_ratio=0.0, min_lr_ratio=0.1)
model, optim, scheduler = strategy.prepare((model, cfg))
hf = model.model.module  # OpenRLHF's strategy made Actor.model a DeepSpeed engine around the HF model
head = hf.get_output_embeddings().weight
assert hasattr(head, "ds_id") and head.numel() == 0, "the head should be ZeRO-3 partitioned"
g = torch.Generator().manual_seed(1)
V = hf.config.vocab_size
ids = torch.randint(3, V, (3, 12), generator=g)
att = torch.ones_like(ids)
att[1, 9:] = 0
att[2, 7:] = 0
res = {}
for kernel in ("torch", "linear"):
    total, mean = sequence_logps(model, ids, att, [3, 4, 2], kernel)
    loss = (torch.tensor([1.0, -0.5, 2.0]) * total + torch.tensor([0.3, 1.0, -2.0]) * mean).sum()
    strategy.backward(loss, model, optim)
    grads = {n: safe_get_full_grad(p).clone() for n, p in model.named_parameters()}
    optim.zero_grad()
    res[kernel] = (total.detach(), grads)
rel = 4 * torch.finfo(torch.float32).eps * math.sqrt(hf.config.hidden_size + V + int(att.sum()))
scale = rel * (res["torch"][0].abs() + math.log(V))
worst = {"seq_sum": ((res["linear"][0] - res["torch"][0]).abs() / scale).max().item()}
for n, want in res["torch"][1].items():
    worst[n] = ((res["linear"][1][n] - want).abs().max() / (rel * want.abs().max())).item()
nonzero = sum(bool(g.abs().max() > 0) for g in res["linear"][1].values())
json.dump({"worst": worst, "n_grads": len(worst) - 1, "nonzero": nonzero}, open(out, "w"))
"""


@pytest.mark.integration
def test_zero3_linear_matches_logits_path(tiny_model, tmp_path):
    """Under DeepSpeed ZeRO-3 (one rank: parameters are still partitioned and only gathered on use) the linear
    path gives the log-probs and the full gradient of every parameter of the logits path, with the fp32 tolerance of
    test_linear_matches_logits_path."""
    import json
    import subprocess
    import sys

    from _util import free_port

    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1"}
    env.update(LOCAL_RANK="0", OMP_NUM_THREADS="1")
    out = tmp_path / "zero3.json"
    cmd = [sys.executable, "-c", ZERO3_SCRIPT, tiny_model, str(out)]
    p = subprocess.run(cmd, cwd=tmp_path, env={**__import__("os").environ, **env}, capture_output=True, text=True,
                       timeout=600, check=False)  # fmt: skip
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    report = json.loads(out.read_text())
    assert report["n_grads"] > 5 and report["nonzero"] == report["n_grads"]
    assert max(report["worst"].values()) <= 1.0, report


@pytest.mark.integration
def test_train_comal_with_linear_kernel_under_zero3_on_two_ranks(tiny_model, tmp_path):
    """The CLI end to end: two COMAL iterations with --comal.logps_kernel linear, ZeRO-3 across two ranks (each
    holds half of the head's weight), every logged loss finite."""
    import os
    import sys

    from _util import read_scalars, run_cmd, torchrun, write_jsonl

    row = {"prompt": "question pick one ?", "chosen": "yes good", "rejected": "no bad"}
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    for k in range(2):
        write_jsonl(pairs / f"iter_{k:03d}.jsonl", [row] * 8)
    cmd = torchrun(2) + ["-m", "openrlhf.cli.train_comal", "--model.model_name_or_path", tiny_model]
    cmd += ["--train.micro_batch_size", "2", "--train.batch_size", "4", "--adam.lr", "1e-3", "--model.beta", "1.0"]
    cmd += ["--train.max_epochs", "1"]  # the preset would fill the official 3
    cmd += ["--data.prompt_key", "prompt", "--data.max_len", "64", "--logger.logging_steps", "1"]
    cmd += ["--comal.pairs_dir", str(pairs), "--comal.algo", "comal", "--comal.logps_kernel", "linear"]
    cmd += ["--ds.zero_stage", "3", "--ckpt.output_dir", str(tmp_path / "final"), "--ckpt.path", str(tmp_path / "c")]
    cmd += ["--logger.tensorboard_dir", str(tmp_path / "tb")]
    run_cmd([c for c in cmd if c is not None], cwd=str(tmp_path), env={"PYTHONPATH": os.pathsep.join(sys.path)})
    losses = read_scalars(str(tmp_path / "tb"), "train/loss")
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses), losses
