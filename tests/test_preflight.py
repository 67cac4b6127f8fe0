"""train_comal's preflight: every check that needs no model runs before anything loads and raises one COMALError
naming the flag (the command prints it as one ``[comal] error:`` line, exit 2; scripts/probe_faults.py runs the
command). Each case below ended in a traceback before."""

import os

import pytest
from _util import write_jsonl

from comal_openrlhf.cli.train_comal import joined_negative_numbers, parse_args, preflight
from comal_openrlhf.errors import COMALError, PlanError


@pytest.fixture
def base(tmp_path, tiny_model):
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    write_jsonl(pairs / "iter_000.jsonl", [{"prompt": "q ?", "chosen": "a", "rejected": "b"}])
    return [
        "--model.model_name_or_path", tiny_model, "--comal.pairs_dir", str(pairs),
        "--train.micro_batch_size", "2", "--train.batch_size", "4", "--data.prompt_key", "prompt",
        "--ckpt.path", str(tmp_path / "ckpt"), "--ckpt.output_dir", str(tmp_path / "out"),
    ]  # fmt: skip


def check(argv, match):
    args = parse_args(argv)
    with pytest.raises(COMALError, match=match):
        preflight(args)


def test_a_good_launch_passes(base):
    preflight(parse_args(base))


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--train.batch_size", "0"], r"--train.batch_size must be an integer >= 1, got 0"),
        (["--train.batch_size", "5"], r"--train.batch_size 5 must be a multiple of --train.micro_batch_size 2"),
        (["--adam.lr=-1e-5"], r"--adam.lr must be a finite number >= 0, got -1e-05"),
        (["--adam.lr", "nan"], r"--adam.lr must be .*, got nan"),
        (["--model.label_smoothing", "1.5"], r"--model.label_smoothing must be in \[0, 0.5\), got 1.5"),
        (["--max_norm", "-1"], r"--max_norm must be .*, got -1"),
        (["--lr_warmup_ratio", "2"], r"--lr_warmup_ratio must be in \[0, 1\], got 2"),
    ],
)
def test_numbers_out_of_range_name_the_flag(base, extra, match):
    check(base + extra, match)


def test_model_path_that_does_not_exist(base, tmp_path):
    check(base + ["--model.model_name_or_path", str(tmp_path / "nope")], r"--model.model_name_or_path .*nope: no such")


def test_model_folder_without_config(base, tmp_path):
    (tmp_path / "empty_model").mkdir()
    check(base + ["--model.model_name_or_path", str(tmp_path / "empty_model")], r"config.json")


def test_missing_and_empty_datasets(base, tmp_path):
    static = base[:2] + base[4:] + ["--comal.source", "static"]
    check(static + ["--data.dataset", str(tmp_path / "missing.jsonl")], r"--data.dataset .*missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    check(static + ["--data.dataset", str(tmp_path / "empty.jsonl")], r"--data.dataset .*empty.jsonl.* empty")
    check(base + ["--eval.dataset", str(tmp_path / "empty.jsonl")], r"--eval.dataset .*empty")


def test_missing_pairs_dir(base, tmp_path):
    argv = list(base)
    argv[argv.index("--comal.pairs_dir") + 1] = str(tmp_path / "nowhere")
    check(argv, r"--comal.pairs_dir .*nowhere: no such directory")


def test_online_rollout_numbers(base, tmp_path):
    online = base[:2] + base[4:] + ["--comal.source", "online", "--judge.kind", "table", "--data.dataset", "x.jsonl"]
    write_jsonl(tmp_path / "x.jsonl", [{"prompt": "q ?"}])
    online[-1] = str(tmp_path / "x.jsonl")
    check(
        online + ["--rollout.temperature", "-0.5"],
        r"--rollout.temperature must be a number > 0 \(HF sampling\), got -0.5",
    )
    check(online + ["--rollout.top_p", "0"], r"--rollout.top_p must be in \(0, 1\], got 0")


@pytest.mark.skipif(os.geteuid() != 0, reason="the read-only folder is a read-only bind mount, which needs root")
def test_read_only_output_folder(base, tmp_path):
    import subprocess

    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "--bind", "-o", "ro", str(ro), str(ro)], capture_output=True).returncode:
        pytest.skip("cannot bind-mount read-only here")
    try:
        argv = list(base)
        argv[argv.index("--ckpt.output_dir") + 1] = str(ro / "final")
        check(argv, r"--ckpt.output_dir .*ro/final is not writable")
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)


def test_a_negative_number_after_a_space_reaches_the_check(base):
    """``--adam.lr -1e-5`` (a space, scientific notation): argparse alone reads '-1e-5' as an option and says
    "expected one argument"; the launch must reach the check that names the flag and its rule."""
    assert joined_negative_numbers(["--adam.lr", "-1e-5", "--x", "y"]) == ["--adam.lr=-1e-5", "--x", "y"]
    with pytest.raises(PlanError, match=r"--adam.lr must be a finite number >= 0, got -1e-05"):
        preflight(parse_args(base + ["--adam.lr", "-1e-5"]))
