"""``python -m openrlhf.cli.train_comal`` end to end on CPU: flags, advances under ZeRO 0/2/3, resume after SIGKILL,
bad input. Tiny Llama + tokenizer built locally."""

import ast
import importlib.util
import json
import os
import subprocess
import sys

import pytest
from _util import REPO, free_port, kill_at_line, read_scalars, run_cmd, torchrun, write_jsonl

FLAGS = [
    "--train.micro_batch_size", "2",
    "--train.batch_size", "4",
    "--adam.lr", "1e-3",
    "--train.max_epochs", "1",  # a --comal.algo preset would fill the official 3
    "--model.beta", "1.0",
    "--data.prompt_key", "prompt",
    "--data.max_len", "64",
    "--logger.logging_steps", "1",
]  # fmt: skip
ROW = {"prompt": "question pick one ?", "chosen": "yes good", "rejected": "no bad"}


def make_pairs_dir(path, iterations, n=8, rows=None):
    os.makedirs(path, exist_ok=True)
    for k in range(iterations):
        write_jsonl(os.path.join(path, f"iter_{k:03d}.jsonl"), rows or [ROW] * n)
    return str(path)


def comal_cmd(launcher, model, out, *extra):
    cmd = launcher + ["-m", "openrlhf.cli.train_comal", "--model.model_name_or_path", model]
    cmd += FLAGS + ["--ckpt.output_dir", str(out / "final"), "--ckpt.path", str(out / "ckpt")]
    return cmd + ["--logger.tensorboard_dir", str(out / "tb")] + [str(x) for x in extra]


def history(out):
    with open(out / "final" / "comal_iterations.jsonl") as f:
        return [json.loads(line) for line in f]


# ------------------------------------------------------------------------------------------------- flags


def _upstream_flags():
    """Option -> (default, kwargs source) read straight from train_dpo's source, independently of the plugin."""
    spec = importlib.util.find_spec("openrlhf.cli.train_dpo")
    tree = ast.parse(open(spec.origin).read())
    flags = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            opts = [a.value for a in node.args if isinstance(a, ast.Constant)]
            kw = {k.arg: k.value for k in node.keywords}
            try:
                default = ast.literal_eval(kw["default"]) if "default" in kw else None
            except ValueError:
                default = "<expr>"  # e.g. the wandb run name built from the clock
            for o in opts:
                flags[o] = (default, ast.unparse(kw["action"]) if "action" in kw else None)
    return flags


def test_accepts_every_train_dpo_flag_with_the_same_default():
    from comal_openrlhf.cli.train_comal import build_parser

    upstream = _upstream_flags()
    assert len(upstream) > 80  # the AST walk found train_dpo's parser
    actions = build_parser()._option_string_actions
    changed = {"--logger.wandb.project", "--ckpt.path"}  # COMAL's own run name and checkpoint folder
    for opt, (default, action) in upstream.items():
        assert opt in actions, f"train_comal lacks train_dpo's {opt}"
        if default != "<expr>" and opt not in changed and opt != "--muon.no_nesterov":
            got = actions[opt].default
            assert (list(got) if isinstance(got, tuple) else got) == (
                list(default) if isinstance(default, tuple) else default
            ), opt
    assert actions["--ckpt.path"].default == "./ckpt/checkpoints_comal"


@pytest.mark.integration
def test_help_groups_and_explains_comal_flags(tmp_path):
    p = run_cmd([sys.executable, "-m", "openrlhf.cli.train_comal", "--help"], cwd=str(tmp_path))
    assert "COMAL:" in p.stdout and "--comal.ref_update_interval" in p.stdout and "--model.beta" in p.stdout
    assert "anchor reference takes the policy" in p.stdout


# ------------------------------------------------------------------------------ training + advances


@pytest.mark.parametrize("nproc, zero", [(1, 0), (1, 2), (2, 3)])
@pytest.mark.integration
def test_offline_comal_advances_reference_under_each_zero_stage(tmp_path, tiny_model, nproc, zero):
    pairs = make_pairs_dir(tmp_path / "pairs", 2)
    launcher = torchrun(nproc) if nproc > 1 else [sys.executable]
    cmd = comal_cmd(launcher, tiny_model, tmp_path, "--comal.pairs_dir", pairs, "--comal.algo", "comal")
    cmd += ["--lr_scheduler", "constant", "--lr_warmup_ratio", "0"]  # the first optimizer step already moves pi
    run_cmd(cmd + ["--comal.ref_update_interval", "1", "--ds.zero_stage", str(zero)], cwd=str(tmp_path))
    h = history(tmp_path)
    assert [r["iteration"] for r in h] == [0, 1]
    assert all(r["advanced"] for r in h) and [r["anchor_version"] for r in h] == [1, 2]
    # right after ref <- pi both give the same sequence log-probs (fp32 sums of identical bf16 computations)
    assert all(r["advance_max_abs_diff"] <= 1e-5 for r in h), h
    # iteration 1 starts from the advanced anchor: mu_1 == ref, so their cached log-probs agree
    assert abs(h[1]["logratio_mu_to_anchor"]) < 1e-5
    # the policy learned to prefer the chosen responses: micro-steps 3-4 come after one Adam step of lr 1e-3 (a margin
    # of order 1e-2), far above the rounding of fp32/bf16 sequence sums (1e-6 / 1e-3 of log-probs near 10)
    assert h[0]["margin"] > 1e-3, h[0]
    losses = read_scalars(str(tmp_path / "tb"), "train/loss")
    assert len(losses) == 4 and all(v == v for v in losses)
    assert len(read_scalars(str(tmp_path / "tb"), "iter/advanced")) == 2
    assert os.path.exists(tmp_path / "final" / "config.json")


@pytest.mark.integration
def test_deepspeed_launcher_runs_the_module(tmp_path, tiny_model):
    pairs = make_pairs_dir(tmp_path / "pairs", 1)
    deepspeed = [os.path.join(os.path.dirname(sys.executable), "deepspeed"), "--num_gpus", "1"]
    cmd = comal_cmd(deepspeed + ["--master_port", str(free_port()), "--module"], tiny_model, tmp_path)
    cmd.remove("-m")
    run_cmd(cmd + ["--comal.pairs_dir", pairs], cwd=str(tmp_path))
    assert [r["iteration"] for r in history(tmp_path)] == [0]


@pytest.mark.integration
def test_unchanged_train_dpo_launch_runs_as_one_dpo_iteration(tmp_path, tiny_model, dpo_jsonl):
    p = run_cmd(comal_cmd([sys.executable], tiny_model, tmp_path, "--data.dataset", dpo_jsonl), cwd=str(tmp_path))
    assert "| algo | iter-dpo | default |" in p.stdout and "| beta per round | 1 | flag |" in p.stdout
    h = history(tmp_path)
    assert len(h) == 1 and h[0]["pairs"] == 16 and not h[0]["advanced"]


# -------------------------------------------------------------------------------------------- resume


@pytest.mark.integration
def test_sigkill_mid_iteration_then_resume(tmp_path, tiny_model):
    pairs = make_pairs_dir(tmp_path / "pairs", 3, n=16)
    cmd = comal_cmd([sys.executable], tiny_model, tmp_path, "--comal.pairs_dir", pairs, "--comal.algo", "comal")
    cmd += ["--comal.ref_update_interval", "1", "--ckpt.save_steps", "2", "--train.max_epochs", "2"]
    # killed in the middle of iteration 1 (8 micro-steps per epoch, 2 epochs)
    kill_at_line(cmd, str(tmp_path), "checkpoint saved (step): iteration 1")
    assert [r["iteration"] for r in history(tmp_path)] == [0]

    p = run_cmd(cmd + ["--ckpt.load_enable"], cwd=str(tmp_path))
    assert "resumed: iteration 1, micro-step" in p.stdout and "anchor v1" in p.stdout
    assert "taking over a stale lock" in p.stdout  # the killed run's lock: reported, then taken over
    assert "resume check: anchor log-probs match the cache" in p.stdout
    h = history(tmp_path)
    assert [r["iteration"] for r in h] == [0, 1, 2]  # none lost, none run twice
    assert [r["anchor_version"] for r in h] == [1, 2, 3]


# ------------------------------------------------------------------------------------------- bad input


def _fails(cmd, cwd):
    p = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert p.returncode != 0
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    return p.stdout + p.stderr


@pytest.mark.integration
def test_missing_key_and_broken_json_name_file_and_line(tmp_path, tiny_model):
    bad = tmp_path / "bad"
    make_pairs_dir(bad, 1, rows=[ROW, ROW, {"prompt": "question ?", "chosen": "yes"}])
    out = _fails(comal_cmd([sys.executable], tiny_model, tmp_path, "--comal.pairs_dir", bad), str(tmp_path))
    assert "iter_000.jsonl:3" in out and "missing key" in out and "rejected" in out
    with open(bad / "iter_000.jsonl", "a") as f:
        f.write('{"prompt": "x", \n')
    (bad / "iter_000.jsonl").write_text(json.dumps(ROW) + "\n" + '{"prompt": "x",\n')
    out = _fails(comal_cmd([sys.executable], tiny_model, tmp_path, "--comal.pairs_dir", bad), str(tmp_path))
    assert "iter_000.jsonl:2" in out and "not valid JSON" in out


@pytest.mark.integration
def test_bad_rows_are_counted_skips_reported_in_log(tmp_path, tiny_model):
    long_prompt = " ".join(["question"] * 80)
    rows = [ROW] * 8 + [
        {**ROW, "chosen": "  "},
        {**ROW, "rejected": 3},
        {**ROW, "chosen": "no bad"},
        {**ROW, "prompt": long_prompt},
    ]
    pairs = make_pairs_dir(tmp_path / "pairs", 1, rows=rows)
    p = run_cmd(comal_cmd([sys.executable], tiny_model, tmp_path, "--comal.pairs_dir", pairs), cwd=str(tmp_path))
    assert "8 pairs kept" in p.stdout and "iter_000.jsonl:9" in p.stdout
    h = history(tmp_path)[0]
    assert h["pairs"] == 8
    assert h["skipped_empty_response"] == 1 and h["skipped_non-string_rejected"] == 1
    assert h["skipped_chosen_==_rejected"] == 1 and h["skipped_prompt_longer_than_--data.max_len_64"] == 1


@pytest.mark.integration
def test_non_finite_loss_stops_with_a_clear_message(tmp_path, tiny_model):
    pairs = make_pairs_dir(tmp_path / "pairs", 2, n=16)
    cmd = comal_cmd([sys.executable], tiny_model, tmp_path, "--comal.pairs_dir", pairs, "--comal.algo", "comal")
    cmd += ["--adam.lr", "1e30", "--lr_scheduler", "constant"]
    out = _fails(cmd, str(tmp_path))
    assert "non-finite loss" in out and "last good checkpoint" in out


# ------------------------------------------------------------------------------------------ kernels


@pytest.mark.integration
def test_fused_logps_kernel_trains_like_openrlhf_path(tmp_path, tiny_model):
    """--comal.logps_kernel torch (bf16 logits into the chunked kernel) against OpenRLHF's fp32-copy path."""
    pairs = make_pairs_dir(tmp_path / "pairs", 2)
    curves = {}
    for kernel in ("openrlhf", "torch"):
        out = tmp_path / kernel
        out.mkdir()
        cmd = comal_cmd([sys.executable], tiny_model, out, "--comal.pairs_dir", pairs, "--comal.algo", "comal")
        run_cmd(cmd + ["--comal.ref_update_interval", "1", "--comal.logps_kernel", kernel], cwd=str(out))
        curves[kernel] = read_scalars(str(out / "tb"), "train/loss")
    assert len(curves["torch"]) == len(curves["openrlhf"]) == 4
    for a, b in zip(curves["openrlhf"], curves["torch"]):
        assert abs(a - b) <= 1e-2 * max(1.0, abs(a)), curves


@pytest.mark.integration
def test_step_benchmark_runs_and_reports_ratios(tmp_path):
    cmd = [sys.executable, os.path.join(REPO, "benchmarks", "comal_step.py"), "--repeats", "2", "--warmup", "1"]
    cmd += ["--hidden", "32", "--layers", "1", "--vocab", "512", "--seq", "16", "--pairs", "8"]
    p = run_cmd(cmd, cwd=str(tmp_path))
    assert "| OpenRLHF DPOTrainer step (reference recomputed) |" in p.stdout
    assert "comal/DPO step time ratio" in p.stdout and "precompute pass" in p.stdout
    # the whole iteration (precompute + 3 epochs) against DPOTrainer's, on the 8 pairs: 3 x 2 micro-batches of 4
    assert "whole iteration: 8 pairs, 3 epochs, micro-batches of 4 pairs (6 training steps)" in p.stdout
    for row in ("OpenRLHF DPOTrainer (reference recomputed each step)", "COMAL, fused LM-head kernel"):
        assert f"| {row}" in p.stdout
    assert p.stdout.count("/DPO iteration ratio: ") == 3


@pytest.mark.integration
def test_eval_dataset_is_evaluated_after_each_iteration(tmp_path, tiny_model, dpo_jsonl):
    pairs = make_pairs_dir(tmp_path / "pairs", 2)
    cmd = comal_cmd([sys.executable], tiny_model, tmp_path, "--comal.pairs_dir", pairs, "--comal.algo", "comal")
    run_cmd(cmd + ["--eval.dataset", dpo_jsonl, "--eval.split", "train"], cwd=str(tmp_path))
    h = history(tmp_path)
    assert all("eval_loss" in r and 0.0 <= r["eval_accuracy"] <= 1.0 for r in h)
    assert len(read_scalars(str(tmp_path / "tb"), "eval/eval_loss")) == 2


def test_startup_clock_splits_the_start_up_from_the_process_start():
    # the first mark is the process's age (this pytest process started before the test: positive, and no older
    # than the machine's uptime); each later mark is the time since the previous one; the line sums them
    import time

    from comal_openrlhf.cli.train_comal import StartupClock, process_age

    age = process_age()
    assert age is not None and age > 0
    with open("/proc/uptime") as f:
        assert age <= float(f.read().split()[0])
    clock = StartupClock()
    time.sleep(0.05)
    clock.mark("models")
    (first, a), (label, b) = clock.marks
    assert first == "process start and imports" and a >= age
    assert label == "models" and 0.05 <= b < 5
    line = clock.line()
    assert line.startswith(f"[comal] start-up {a + b:.1f} s: process start and imports ") and "models 0." in line
