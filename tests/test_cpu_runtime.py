"""OpenRLHF's own train_dpo runs on CPU through comal_openrlhf.cpu_runtime; on a CPU without native bf16 the runs
train in fp32 unless --ds.param_dtype says otherwise."""

import glob
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from _util import REPO, read_scalars, run_cmd, torchrun

from comal_openrlhf import cpu_runtime

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
    cmd = launcher + ["-m", "comal_openrlhf.cli.run", "openrlhf.cli.train_dpo"]
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


@pytest.mark.integration
@pytest.mark.parametrize("zero", [0, 2])
def test_train_dpo_one_process(tmp_path, tiny_model, dpo_jsonl, zero):
    p = _train_dpo([sys.executable], tiny_model, dpo_jsonl, tmp_path, zero)
    assert "using sdpa" in p.stdout
    _check_trained(tmp_path, tiny_model)


@pytest.mark.integration
@pytest.mark.parametrize("zero", [2, 3])
def test_train_dpo_two_processes_gloo(tmp_path, tiny_model, dpo_jsonl, zero):
    _train_dpo(torchrun(2), tiny_model, dpo_jsonl, tmp_path, zero)
    _check_trained(tmp_path, tiny_model)


@pytest.mark.integration
def test_packing_is_refused_with_a_clear_message(tmp_path, tiny_model, dpo_jsonl):
    cmd = [sys.executable, "-m", "comal_openrlhf.cli.run", "openrlhf.cli.train_dpo", "--ds.packing_samples"]
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


@pytest.mark.integration
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


@pytest.mark.integration
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


# ------------------------------------------------------------------------------------------ bf16 or fp32


def _cpuinfo(tmp_path, flags):
    path = tmp_path / "cpuinfo"
    path.write_text(f"processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: {flags}\n\n")
    return str(path)


def test_native_bf16_needs_the_cpu_flag_and_torchs_avx512_path(tmp_path):
    assert not cpu_runtime.cpu_has_native_bf16(_cpuinfo(tmp_path, "fpu sse2 avx2 avx512f avx512bw"))
    assert not cpu_runtime.cpu_has_native_bf16(str(tmp_path / "no-such-file"))
    on_avx512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    assert cpu_runtime.cpu_has_native_bf16(_cpuinfo(tmp_path, "avx2 avx512f avx512_bf16")) == on_avx512
    assert cpu_runtime.cpu_has_native_bf16(_cpuinfo(tmp_path, "avx2 avx512f amx_bf16 amx_tile")) == on_avx512


def test_native_bf16_is_false_when_onednn_is_capped_below_bf16(tmp_path, monkeypatch):
    # torch's bf16 matmuls run in oneDNN, which ignores ATEN_CPU_CAPABILITY: ONEDNN_MAX_CPU_ISA=AVX2 emulates bf16
    flags = _cpuinfo(tmp_path, "avx2 avx512f avx512_bf16")
    on_avx512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    for isa, native in (("AVX2", False), ("AVX512_CORE", False), ("AVX512_CORE_BF16", on_avx512), ("ALL", on_avx512)):
        monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", isa)
        assert cpu_runtime.cpu_has_native_bf16(flags) == native, isa


def test_native_bf16_is_false_on_torchs_avx2_path(tmp_path):
    # ATEN_CPU_CAPABILITY=avx2 pins torch's AVX2 kernels: no native bf16,
    # whatever the CPU flags say
    code = (
        "import sys, torch; from comal_openrlhf.cpu_runtime import cpu_has_native_bf16 as f; "
        "print(torch.backends.cpu.get_cpu_capability(), f(sys.argv[1]), f())"
    )
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "avx2"}
    fake = _cpuinfo(tmp_path, "avx2 avx512f avx512_bf16 amx_bf16")
    p = subprocess.run([sys.executable, "-c", code, fake], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split() == ["AVX2", "False", "False"]


def test_param_dtype_flag_takes_fp32_keeps_the_bf16_default_and_help_says_how_to_force_bf16():
    from comal_openrlhf.cli.train_comal import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if "--ds.param_dtype" in a.option_strings)
    assert action.default == "bf16" and list(action.choices) == ["bf16", "fp16", "fp32"]
    assert "pass --ds.param_dtype bf16 to force bf16" in " ".join(action.help.split())
    ns = vars(parser.parse_args([]))
    assert ns["ds.param_dtype"] == "bf16" and ns["ds.param_dtype_given"] is False
    for argv, value in ((["--ds.param_dtype", "fp32"], "fp32"), (["--ds.param_dtype=bf16"], "bf16")):
        ns = vars(parser.parse_args(argv))
        assert ns["ds.param_dtype"] == value and ns["ds.param_dtype_given"] is True


@pytest.mark.parametrize(
    "native, dtype, given, expected, note",
    [
        (False, "bf16", False, "fp32", True),  # the default on a CPU without native bf16: fp32, one line
        (False, "bf16", True, "bf16", False),  # --ds.param_dtype bf16 given: kept
        (False, "fp32", True, "fp32", False),
        (False, "fp16", True, "fp32", False),  # fp16 cannot run on CPU: the fast dtype of this CPU
        (True, "bf16", False, "bf16", False),  # native bf16: upstream's default stays
        (True, "fp16", True, "bf16", False),
    ],
)
def test_adapt_args_chooses_the_dtype(monkeypatch, capsys, native, dtype, given, expected, note):
    monkeypatch.setattr(cpu_runtime, "cpu_has_native_bf16", lambda *a, **k: native)
    monkeypatch.setenv("RANK", "0")
    ds = SimpleNamespace(param_dtype=dtype, param_dtype_given=given)
    cpu_runtime.adapt_args(SimpleNamespace(ds=ds))
    assert ds.param_dtype == expected
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "no native bf16" in line]
    assert len(lines) == (1 if note else 0), out
    if note:
        assert "training in fp32" in lines[0] and "--ds.param_dtype bf16" in lines[0]


def test_fp32_is_a_torch_dtype_for_openrlhf():
    cpu_runtime.apply()
    from openrlhf.utils.utils import convert_to_torch_dtype

    assert convert_to_torch_dtype("fp32") is torch.float32
    assert convert_to_torch_dtype("bf16") is torch.bfloat16


@pytest.mark.integration
def test_train_comal_trains_in_fp32_on_the_avx2_path(tmp_path, tiny_model, dpo_jsonl):
    from safetensors import safe_open

    cmd = [sys.executable, "-m", "openrlhf.cli.train_comal", "--model.model_name_or_path", tiny_model]
    cmd += ["--data.dataset", dpo_jsonl, "--ds.zero_stage", "2"] + TINY_FLAGS
    cmd += ["--ckpt.output_dir", str(tmp_path / "final"), "--ckpt.path", str(tmp_path / "ckpt")]
    p = run_cmd(cmd, cwd=str(tmp_path), env={"ATEN_CPU_CAPABILITY": "avx2"})
    notes = [line for line in p.stdout.splitlines() if "no native bf16" in line]
    assert len(notes) == 1 and "training in fp32" in notes[0] and "--ds.param_dtype bf16" in notes[0], p.stdout
    assert "bf16_optimizer" not in p.stdout  # DeepSpeed's bf16 wrapper is not built
    files = glob.glob(str(tmp_path / "final" / "*.safetensors"))
    assert files
    for path in files:
        with safe_open(path, "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], "fp32"),
        (["--ds.param_dtype", "bf16"], "bf16"),
        (["--ds.param_dtype=bf16"], "bf16"),
        (["--ds.param_dt", "bf16"], "bf16"),  # argparse accepts unique abbreviations
        (["--ds.packing_samples_x"], "fp32"),
    ],
)
def test_upstream_parser_reads_the_flag_from_argv(monkeypatch, argv, expected):
    # OpenRLHF's own train_dpo through comal_openrlhf.cli.run: its parser does not record whether the flag was given
    monkeypatch.setattr(cpu_runtime, "cpu_has_native_bf16", lambda *a, **k: False)
    monkeypatch.setattr(sys, "argv", ["openrlhf.cli.train_dpo", "--model.model_name_or_path", "m"] + argv)
    ds = SimpleNamespace(param_dtype="bf16")
    cpu_runtime.adapt_args(SimpleNamespace(ds=ds))
    assert ds.param_dtype == expected
