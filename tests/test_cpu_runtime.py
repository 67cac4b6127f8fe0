"""OpenRLHF's own train_dpo runs on CPU through comal_openrlhf.cpu_runtime (issue 2, section 2)."""

import os
import subprocess
import sys

import pytest
import torch
from _util import REPO, read_scalars, run_cmd, torchrun

TINY_FLAGS = [
    "--train.micro_batch_size", "2",
    "--train.batch_size", "4",
    "--adam.lr", "1e-3",
    "--data.prompt_key", "prompt",
    "--data.max_len", "64",
    "--logger.logging_steps", "1",
    "--ckpt.save_hf",
]  # fmt: skip


def _train_dpo(launcher, tiny_model, dpo_jsonl, out, zero):
    cmd = launcher + ["-m", "comal_openrlhf.run", "openrlhf.cli.train_dpo"]
    cmd += ["--model.model_name_or_path", tiny_model, "--data.dataset", dpo_jsonl, "--ds.zero_stage", str(zero)]
    # flash_attention_2 is the upstream default: the runtime must swap it for sdpa by itself
    cmd += TINY_FLAGS + ["--ckpt.output_dir", str(out / "final"), "--logger.tensorboard_dir", str(out / "tb")]
    return run_cmd(cmd, cwd=str(out))


def _check_trained(out, tiny_model):
    from transformers import AutoModelForCausalLM

    losses = read_scalars(str(out / "tb"), "train/loss")
    assert len(losses) >= 3, losses
    assert losses[-1] < losses[0] - 0.02, f"loss did not decrease: {losses}"
    trained = AutoModelForCausalLM.from_pretrained(str(out / "final"))
    initial = AutoModelForCausalLM.from_pretrained(tiny_model)
    diff = sum((a.float() - b.float()).abs().sum().item() for a, b in zip(trained.parameters(), initial.parameters()))
    assert diff > 0, "saved HF checkpoint equals the initial weights"
    ids = torch.tensor([[2, 5, 6, 7]])
    assert torch.isfinite(trained(ids).logits).all()


@pytest.mark.parametrize("zero", [0, 2])
def test_train_dpo_one_process(tmp_path, tiny_model, dpo_jsonl, zero):
    p = _train_dpo([sys.executable], tiny_model, dpo_jsonl, tmp_path, zero)
    assert "using sdpa" in p.stdout
    _check_trained(tmp_path, tiny_model)


@pytest.mark.parametrize("zero", [2, 3])
def test_train_dpo_two_processes_gloo(tmp_path, tiny_model, dpo_jsonl, zero):
    _train_dpo(torchrun(2), tiny_model, dpo_jsonl, tmp_path, zero)
    _check_trained(tmp_path, tiny_model)


def test_packing_is_refused_with_a_clear_message(tmp_path, tiny_model, dpo_jsonl):
    cmd = [sys.executable, "-m", "comal_openrlhf.run", "openrlhf.cli.train_dpo", "--ds.packing_samples"]
    cmd += ["--model.model_name_or_path", tiny_model, "--data.dataset", dpo_jsonl]
    p = subprocess.run(cmd, cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert p.returncode != 0
    assert "packing_samples" in p.stderr + p.stdout and "CUDA" in p.stderr + p.stdout


def test_runtime_changes_nothing_when_cuda_is_present():
    # A fresh interpreter where CUDA reports available: apply() must leave torch, flash_attn and OpenRLHF alone.
    code = r"""
import os, sys, torch
torch.cuda.is_available = lambda: True
before = (torch.cuda.set_device, torch.cuda.synchronize, torch.cuda.current_device)
env_before = dict(os.environ)
from comal_openrlhf import cpu_runtime
assert cpu_runtime.apply() is False
assert (torch.cuda.set_device, torch.cuda.synchronize, torch.cuda.current_device) == before
assert "flash_attn" not in sys.modules
assert dict(os.environ) == env_before
print("UNCHANGED")
"""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "UNCHANGED" in p.stdout


def test_flash_attn_stand_in_has_a_spec_and_no_triton_ce():
    code = r"""
import importlib.util
from comal_openrlhf import cpu_runtime
assert cpu_runtime.apply() is True
spec = importlib.util.find_spec("flash_attn")
assert spec is not None and spec.name == "flash_attn"
import openrlhf.models  # needs flash_attn.bert_padding at import time
try:
    from flash_attn.ops.triton.cross_entropy import cross_entropy_loss  # noqa
    raise SystemExit("flash-attn Triton CE must not import on CPU")
except ImportError:
    pass
from transformers.utils import is_flash_attn_2_available
assert not is_flash_attn_2_available()
print("OK")
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "OK" in p.stdout


def test_openrlhf_bundled_suite_passes_with_plugin_installed(tmp_path):
    # OpenRLHF 0.11.2 ships its CPU tests as the top-level package `tests`; the plugin's .pth is active here.
    p = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--pyargs", "tests"],
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert p.returncode == 0, p.stdout[-4000:]
    assert " passed" in p.stdout and " failed" not in p.stdout
