"""COMAL with LoRA (``--ds.lora.rank > 0``): the anchor is a frozen second adapter on the policy's base model
(comal_openrlhf.training.lora). In process: the adapter switch, the advance as an adapter copy, the fused-linear
log-prob path through peft, the refused combinations, and a trainer under ZeRO-3 holding one base model. Launched:
two-iteration runs with an advance on two ranks under ZeRO-2 and ZeRO-3, and a resume after SIGKILL."""

import json
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from _util import kill_at_line, run_cmd, torchrun
from safetensors.torch import load_file
from test_train_comal import comal_cmd, history, make_pairs_dir
from test_trainer_unit import _hf_sequence_logps, build_in_process_trainer

from comal_openrlhf.errors import PlanError
from comal_openrlhf.training import lora

# ------------------------------------------------------------------------------------ the adapter mechanics


def _peft_tiny(path, target_modules="all-linear", rank=4):
    """The tiny Llama wrapped as OpenRLHF's Actor wraps it (get_peft_model with one adapter, "default"), fp32."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = LoraConfig(task_type=TaskType.CAUSAL_LM, r=rank, lora_alpha=8, target_modules=target_modules)
    return get_peft_model(model, config).eval()


def _batch(rows=4):
    torch.manual_seed(0)
    ids = torch.randint(3, 20, (rows, 9))  # inside the tiny vocabulary
    att = torch.ones_like(ids)
    att[1, 7:] = 0
    return ids, att, [3] * rows


def _logps(model, ids, att, prompt_lens, kernel="torch"):
    from comal_openrlhf.training.logps import sequence_logps

    with torch.no_grad():
        return sequence_logps(SimpleNamespace(model=model, temperature=1.0), ids, att, prompt_lens, kernel)[0]


def _train_policy_adapter(model):
    """Stand-in for training: move every policy adapter matrix (B = 0 at the start) away from zero."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if lora.is_policy_param(name):
                p.add_(0.05 * torch.randn_like(p))


def test_anchor_adapter_starts_as_the_base_follows_the_advance_and_never_trains(tiny_model):
    model = _peft_tiny(tiny_model)
    actor = SimpleNamespace(model=model)
    lora.add_anchor_adapter(actor)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if lora.is_base_param(n)}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(lora.is_policy_param(n) for n in trainable)  # the anchor and the base are frozen
    assert any(lora.is_anchor_param(n) for n, _ in model.named_parameters())
    ids, att, lens = _batch()
    with model.disable_adapter():
        base_logps = _logps(model, ids, att, lens)
    _train_policy_adapter(model)
    policy = _logps(model, ids, att, lens)
    with lora.active(actor, lora.ANCHOR):
        anchor = _logps(model, ids, att, lens)
    assert torch.equal(anchor, base_logps)  # a zero adapter: the base model alone
    assert (policy - anchor).abs().max() > 1e-3  # the switch really changes the adapter that computes
    assert torch.equal(_logps(model, ids, att, lens), policy)  # and the block restored the policy adapter
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable  # no requires_grad flipped

    lora.advance(actor)
    with lora.active(actor, lora.ANCHOR):
        advanced = _logps(model, ids, att, lens)
    assert torch.equal(advanced, policy)
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if lora.is_base_param(n))
    # the next "iteration" moves the policy only; the anchor stays at the advanced adapter
    _train_policy_adapter(model)
    with lora.active(actor, lora.ANCHOR):
        assert torch.equal(_logps(model, ids, att, lens), policy)


def test_linear_kernel_through_peft_matches_the_logits_path_for_both_adapters(tiny_model):
    model = _peft_tiny(tiny_model)
    actor = SimpleNamespace(model=model)
    lora.add_anchor_adapter(actor)
    _train_policy_adapter(model)
    ids, att, lens = _batch()
    for adapter in (lora.POLICY, lora.ANCHOR):
        with lora.active(actor, adapter):
            fused = _logps(model, ids, att, lens, "linear")
            logits = _logps(model, ids, att, lens, "torch")
        torch.testing.assert_close(fused, logits, rtol=1e-5, atol=1e-4)
    with lora.active(actor, lora.ANCHOR):
        anchor = _logps(model, ids, att, lens, "linear")
    assert (anchor - _logps(model, ids, att, lens, "linear")).abs().max() > 1e-3


def test_linear_kernel_refuses_an_adapter_on_the_lm_head(tiny_model):
    model = _peft_tiny(tiny_model, target_modules=["q_proj", "lm_head"])
    ids, att, lens = _batch()
    with pytest.raises(PlanError, match="LM head"):
        _logps(model, ids, att, lens, "linear")


def _args(tiny_model, tmp_path, *extra):
    from comal_openrlhf.cli.train_comal import parse_args

    pairs = make_pairs_dir(tmp_path / "pairs", 1)
    argv = ["--model.model_name_or_path", tiny_model, "--comal.pairs_dir", pairs, "--ds.lora.rank", "4"]
    return parse_args(argv + ["--ckpt.path", str(tmp_path / "c"), "--ckpt.output_dir", str(tmp_path / "o"), *extra])


def test_lora_with_another_reference_model_or_vllm_is_refused(tiny_model, tmp_path):
    from comal_openrlhf.cli.train_comal import check_lora

    say = SimpleNamespace(print=print)
    check_lora(_args(tiny_model, tmp_path), say)  # the plain LoRA launch passes
    with pytest.raises(PlanError, match="--ref.model_name_or_path"):
        check_lora(_args(tiny_model, tmp_path, "--ref.model_name_or_path", str(tmp_path)), say)
    online = ("--comal.source", "online", "--judge.kind", "table", "--rollout.backend", "vllm")
    with pytest.raises(PlanError, match="--rollout.backend vllm"):
        check_lora(_args(tiny_model, tmp_path, *online), say)


@pytest.mark.parametrize("algo", ["iter-dpo", "iter-ipo", "sppo", "inpo", "comal"])
def test_every_preset_accepts_lora(tiny_model, tmp_path, algo):
    from comal_openrlhf.cli.train_comal import check_settings, resolve

    args = _args(tiny_model, tmp_path, "--comal.algo", algo, "--comal.ref_update_interval", "1")
    plan, _ = resolve(args, 1)
    assert plan.ref_update_interval == 1  # the advance, the step that used to refuse LoRA, is in the plan
    check_settings(args, plan, SimpleNamespace(print=print))


# ------------------------------------------------------------------- the trainer, in process, under ZeRO-3


@pytest.fixture(scope="module")
def lora_trainer(tmp_path_factory, tiny_model):
    """A LoRA COMALTrainer built by train_comal's own build_trainer (ZeRO-3, fp32, one process), with the number of
    OpenRLHF Actors it constructed."""
    from comal_openrlhf import cpu_runtime

    cpu_runtime.apply()  # before OpenRLHF's first import
    import openrlhf.models

    built = []
    init = openrlhf.models.Actor.__init__

    def counting(self, *a, **kw):
        built.append(a[0] if a else kw.get("pretrain_or_model"))
        init(self, *a, **kw)

    openrlhf.models.Actor.__init__ = counting
    try:
        tmp = tmp_path_factory.mktemp("lora_unit")
        extra = ["--train.max_epochs", 2, "--ds.lora.rank", 8, "--ds.lora.alpha", 16]
        trainer = build_in_process_trainer(tmp, tiny_model, *extra)
    finally:
        openrlhf.models.Actor.__init__ = init
    return trainer, built


def test_a_lora_run_loads_one_base_model(lora_trainer, tiny_model):
    from transformers import AutoConfig, AutoModelForCausalLM

    trainer, built = lora_trainer
    assert built == [tiny_model] and trainer.ref_model is None and trainer.lora_anchor
    with torch.device("meta"):
        n_base = sum(
            p.numel() for p in AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_model)).parameters()
        )
    # every parameter in memory: the base once, plus two adapters (each a small fraction of it)
    sizes = {"base": 0, lora.POLICY: 0, lora.ANCHOR: 0}
    for name, p in trainer.model.model.module.named_parameters():
        kind = lora._adapter_of(name) or "base"
        sizes[kind] += p.ds_numel if hasattr(p, "ds_numel") else p.numel()
    assert sizes["base"] == n_base
    assert sizes[lora.POLICY] == sizes[lora.ANCHOR] > 0 and sizes[lora.ANCHOR] < n_base / 2


def test_lora_trainer_precompute_train_advance_keep_the_base(lora_trainer, tiny_model):
    from comal_openrlhf.training.logps import pair_logps
    from comal_openrlhf.weights import state_dict_on_rank0

    trainer, _ = lora_trainer
    start = lora.base_fingerprint(trainer.model)
    pairs, stats = trainer.collect_pairs(0)
    record = trainer.precompute(0, pairs, stats)
    # at the start the policy adapter is zero too, and the anchor is the saved model itself
    assert torch.equal(record.logp_mu_chosen, record.logp_ref_chosen)
    expected = _hf_sequence_logps(tiny_model, record.pairs[0])
    assert [record.logp_ref_chosen[0].item(), record.logp_ref_rejected[0].item()] == pytest.approx(expected, abs=1e-4)

    trainer.train(0, record)
    batch = next(iter(trainer._loader(trainer._dataset(record.pairs), shuffle=False)))
    pad = trainer.tokenizer.pad_token_id
    with torch.no_grad():
        pi_w, _, _ = pair_logps(trainer.model, batch, pad, "torch")
        with trainer.anchor() as ref:
            ref_w, _, _ = pair_logps(ref, batch, pad, "torch")
    assert (pi_w - ref_w).abs().max() > 1e-3  # the policy adapter trained; the anchor adapter did not
    assert torch.allclose(ref_w, record.logp_ref_chosen[batch[-1]], atol=1e-5)

    advanced, err = trainer.advance_if_due(0, record)
    assert advanced and err == 0.0 and trainer.anchor_version == 1
    policy = state_dict_on_rank0(trainer.model, lora.is_policy_param)
    anchor = state_dict_on_rank0(trainer.model, lora.is_anchor_param)
    assert len(policy) == len(anchor) > 0
    assert all(torch.equal(p, anchor[n.replace(".default.", ".anchor.")]) for n, p in policy.items())
    saved = torch.load(trainer.anchor_path(1), map_location="cpu", weights_only=True)
    assert saved.keys() == anchor.keys()  # the anchor file holds the anchor adapter only
    assert lora.base_fingerprint(trainer.model) == start


# ---------------------------------------------------------------------------------------------- launched


def _base_fingerprints_on_disk(path):
    """The fingerprint ``lora.base_fingerprint`` records, computed from the saved model in fp32 and in bf16 (the run
    holds its weights in one of them, depending on the device and the CPU runtime)."""
    from transformers import AutoModelForCausalLM

    out = []
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        out.append(sum(p.detach().double().pow(2).sum().item() for p in model.parameters()))
    return out


@pytest.mark.parametrize("zero, kernel", [(2, "auto"), (3, "linear")])  # ZeRO-3: the fused LM-head path too
@pytest.mark.integration
def test_two_rank_lora_comal_advances_the_anchor_adapter(tmp_path, tiny_model, zero, kernel):
    pairs = make_pairs_dir(tmp_path / "pairs", 2)
    cmd = comal_cmd(torchrun(2), tiny_model, tmp_path, "--comal.pairs_dir", pairs, "--comal.algo", "comal")
    cmd += ["--lr_scheduler", "constant", "--lr_warmup_ratio", "0", "--comal.ref_update_interval", "1"]
    cmd += ["--ds.zero_stage", str(zero), "--ds.lora.rank", "8", "--ds.lora.alpha", "16", "--ckpt.save_hf"]
    cmd += ["--comal.logps_kernel", kernel]
    p = run_cmd(cmd, cwd=str(tmp_path))
    assert "no reference model is loaded" in p.stdout
    h = history(tmp_path)
    assert [r["iteration"] for r in h] == [0, 1] and [r["anchor_version"] for r in h] == [1, 2]
    assert all(r["advanced"] and r["advance_max_abs_diff"] <= 1e-5 for r in h), h
    # mu_0 == anchor (both adapters zero) and mu_1 == the advanced anchor: their cached log-probs agree
    assert all(abs(r["logratio_mu_to_anchor"]) < 1e-5 for r in h)
    assert h[0]["margin"] > 1e-3 and abs(h[0]["logratio_to_anchor"]) > 0  # the policy adapter trained
    # the base weights at the end of each iteration are the saved model's (fp32 and bf16 sums differ by ~3e-6)
    got = [r["lora_base_fingerprint"] for r in h]
    assert any(got == pytest.approx([fp] * 2, rel=1e-9) for fp in _base_fingerprints_on_disk(tiny_model)), got
    final = tmp_path / "final"
    assert os.path.exists(final / "adapter_config.json") and not os.path.exists(final / "model.safetensors")
    assert not os.path.exists(final / lora.ANCHOR)  # the policy adapter only
    with open(final / "adapter_config.json") as f:
        assert json.load(f)["r"] == 8
    anchor = torch.load(tmp_path / "ckpt_comal" / "anchor_v002.pt", map_location="cpu", weights_only=True)
    assert anchor and all(lora.is_anchor_param(n) for n in anchor)
    assert any(name.endswith("_hf") for name in os.listdir(tmp_path / "ckpt"))  # --ckpt.save_hf's adapters


@pytest.mark.integration
def test_lora_sigkill_mid_iteration_then_resume_restores_the_anchor_adapter(tmp_path, tiny_model):
    pairs = make_pairs_dir(tmp_path / "pairs", 3, n=16)
    cmd = comal_cmd([sys.executable], tiny_model, tmp_path, "--comal.pairs_dir", pairs, "--comal.algo", "comal")
    cmd += ["--comal.ref_update_interval", "1", "--ckpt.save_steps", "2", "--train.max_epochs", "2"]
    cmd += ["--ds.lora.rank", "8", "--ds.lora.alpha", "16"]
    kill_at_line(cmd, str(tmp_path), "checkpoint saved (step): iteration 1")  # mid iteration 1, after an advance
    p = run_cmd(cmd + ["--ckpt.load_enable", "--comal.lora_save_merged"], cwd=str(tmp_path))
    assert "resumed: iteration 1, micro-step" in p.stdout and "anchor v1" in p.stdout
    # the restored anchor adapter (v1, the policy after iteration 0) reproduces iteration 1's cached anchor
    # log-probs; a zero adapter (the base) or the policy's adapter (trained past v1) would not
    assert "resume check: anchor log-probs match the cache" in p.stdout
    h = history(tmp_path)
    assert [r["iteration"] for r in h] == [0, 1, 2] and [r["anchor_version"] for r in h] == [1, 2, 3]
    assert len({r["lora_base_fingerprint"] for r in h}) == 1
    # --comal.lora_save_merged: a plain HF model, the base with the trained adapter merged into the adapted layers
    merged = load_file(str(tmp_path / "final" / "merged" / "model.safetensors"))
    base = load_file(os.path.join(tiny_model, "model.safetensors"))
    assert merged.keys() == base.keys()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(merged[q].float(), base[q].float())
    assert torch.equal(merged["model.embed_tokens.weight"].float(), base["model.embed_tokens.weight"].float())


@pytest.mark.integration
def test_demo_with_lora_moves_comal_towards_the_nash(tmp_path):
    # the demo's game (Nash (4/11, 3/11, 4/11), start gap 0.40) with half the demo's iterations (3 advances): the
    # LoRA policy's exact duality gap must fall well below the start's. The full demo (24 iterations, --lora 16)
    # reaches 0.0016 on the machine of the README's figure.
    cmd = [sys.executable, "-m", "comal_openrlhf.cli.demo", "--out", str(tmp_path / "demo"), "--json", "--algos"]
    cmd += ["comal", "--lora", "16", "--iterations", "12"]
    p = run_cmd(cmd, cwd=str(tmp_path), timeout=600)
    report = json.loads(p.stdout)
    start, comal = report["start"]["duality_gap"], report["algorithms"]["comal"]
    assert start > 0.3 and comal["duality_gap"] < 0.1, (start, comal["gaps"])
    assert comal["invalid_mass"] < 0.1
