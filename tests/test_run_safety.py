"""What users do to a run directory and to input files: resume with other settings, a second run on the same
directories, a fresh run into a used directory, bad bytes, huge lines, plans that cannot finish, judges that fail.
Unit tests run in-process; the launches are marked integration."""

import json
import os
import socket
import subprocess
import sys

import pytest
from _util import run_cmd, write_jsonl
from test_train_comal import ROW, comal_cmd, history, make_pairs_dir

from comal_openrlhf.core.schedule import plan_differences
from comal_openrlhf.errors import DataError, PlanError, RunLockError
from comal_openrlhf.rundir import RunDirectory
from comal_openrlhf.training.data import OfflineSource, RowFormatter, SkipLog, read_jsonl


def _failed(cmd, cwd):
    p = subprocess.run(
        cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert p.returncode != 0, p.stdout[-2000:]
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    return p.stdout + p.stderr


# --------------------------------------------------------------------------------------------- unit tests


def test_non_utf8_byte_names_file_line_and_column(tmp_path):
    path = tmp_path / "iter_000.jsonl"
    path.write_bytes(json.dumps(ROW).encode() + b"\n" + b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"iter_000.jsonl:2: not UTF-8 \(byte 0xe9 at column 16\)"):
        list(read_jsonl(str(path)))


def test_an_over_long_line_is_skipped_unparsed(tmp_path):
    path = tmp_path / "iter_000.jsonl"
    huge = {**ROW, "chosen": "yes " * 2_000_000}  # an 8 MB line: skipped on its byte count, never decoded
    path.write_text(json.dumps(ROW) + "\n" + json.dumps(huge) + "\n" + json.dumps(ROW) + "\n")
    skips = SkipLog()
    rows = list(read_jsonl(str(path), max_line_bytes=64 * 1024, skips=skips))
    assert [i for i, _ in rows] == [1, 3]
    assert skips.counts == {"line over 65536 bytes": 1} and skips.examples["line over 65536 bytes"] == [f"{path}:2"]


class _Tok:
    """Whitespace 'tokenizer' counting calls: enough for RowFormatter without a chat template."""

    def __init__(self):
        self.calls = 0

    def __call__(self, text, add_special_tokens=False):
        self.calls += 1
        return {"input_ids": text.split()}


def _formatter(max_len=64, **data):
    from types import SimpleNamespace

    args = SimpleNamespace(prompt_key="prompt", chosen_key="chosen", rejected_key="rejected", **data)
    return RowFormatter(args, _Tok(), max_len)


def test_probabilities_must_be_numbers_in_0_1_not_booleans():
    f = _formatter()
    for bad in ({"chosen_winrate": True, "rejected_winrate": 0.2}, {"soft_label": 1.5}, {"soft_label": "0.9"}):
        skips = SkipLog()
        assert f({**ROW, **bad}, "f:1", skips) is None
        assert skips.counts == {"win rate or soft label not a probability": 1}
    skips = SkipLog()
    assert f({**ROW, "weight": -1}, "f:2", skips) is None and skips.counts == {"weight not a positive number": 1}
    pair = f({**ROW, "soft_label": 0.7, "weight": 2}, "f:3", SkipLog())
    assert pair.soft_label == 0.7 and pair.weight == 2.0 and pair.origin == "f:3"


def test_a_null_key_is_the_missing_key_error_of_every_source():
    # a tabular (parquet / HF) dataset fills a key some rows lack with None: the same stop as a missing key, with the
    # row's 1-based origin, for static rows as for offline files (it was a "non-string" skip, 0-based)
    f = _formatter()
    with pytest.raises(DataError, match=r"data.jsonl:row 3: missing key\(s\) \['rejected'\]; the row has"):
        f({**ROW, "rejected": None}, "data.jsonl:row 3", SkipLog())
    skips = SkipLog()
    assert f({**ROW, "rejected": 3}, "data.jsonl:row 4", skips) is None  # a value of the wrong type stays a skip
    assert skips.counts == {"non-string rejected": 1}


def test_huge_pair_weights_normalise_without_overflow():
    import torch

    from comal_openrlhf.core.record import weights_normalised

    w = weights_normalised(torch.tensor([1e308, 1e308, 5e307], dtype=torch.float64))
    assert torch.allclose(w, torch.tensor([1.2, 1.2, 0.6]))


def test_a_huge_response_is_cut_before_it_is_tokenised():
    f = _formatter(max_len=8)
    skips = SkipLog()
    pair = f({**ROW, "chosen": "yes " * 100_000}, "f:1", skips)
    assert len(pair.chosen) == 8 * 64 and skips.truncated == 1  # max_len * MAX_BYTES_PER_TOKEN characters kept


def test_offline_plan_is_validated_before_training(tmp_path):
    make_pairs_dir(tmp_path / "pairs", 2)
    source = OfflineSource(str(tmp_path / "pairs"), _formatter())
    with pytest.raises(PlanError, match="--comal.iterations 3 needs 3 files.*has 2"):
        source.validate(3)
    source.validate(2)
    (tmp_path / "pairs" / "iter_001.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="iter_001.jsonl: no pairs"):
        source.validate(2)
    (tmp_path / "pairs" / "iter_001.jsonl").write_text(json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
    with pytest.raises(DataError, match=r"iter_001.jsonl:1: missing key\(s\) \['rejected'\]"):
        source.validate(2)


def test_plan_differences_name_each_setting():
    old = {"algo": "iter-dpo", "prox": "dpo", "ref_weight": 0.0, "betas": [0.1], "iterations": 1}
    new = {"algo": "comal", "prox": "ipo", "ref_weight": 1 / 3, "betas": (0.1,), "iterations": 1}
    assert [d[0] for d in plan_differences(old, new)] == ["algo", "prox", "ref_weight"]


def test_run_lock_refuses_a_live_holder_and_takes_over_a_dead_one(tmp_path):
    first = RunDirectory(str(tmp_path / "ckpt"), str(tmp_path / "out"))
    first.lock()
    with pytest.raises(RunLockError, match=f"another run \\(process {os.getpid()}"):
        RunDirectory(str(tmp_path / "ckpt"), str(tmp_path / "out")).lock()
    first.unlock()
    # a lock left by a process that has exited (same host)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with open(first.lock_path, "w") as f:
        json.dump({"pid": dead.pid, "host": socket.gethostname(), "started": "earlier"}, f)
    said = []
    second = RunDirectory(str(tmp_path / "ckpt"), str(tmp_path / "out"))
    second.lock(say=said.append)
    assert said and f"process {dead.pid}" in said[0] and "no longer running" in said[0]
    second.unlock()
    # another host's lock cannot be checked: refused with the file to delete
    with open(first.lock_path, "w") as f:
        json.dump({"pid": 1, "host": "elsewhere", "started": "earlier"}, f)
    with pytest.raises(RunLockError, match="on host elsewhere.*delete the lock file"):
        RunDirectory(str(tmp_path / "ckpt"), str(tmp_path / "out")).lock()


def test_the_lock_covers_the_output_folder_too(tmp_path):
    # two runs with their own --ckpt.path but one --ckpt.output_dir both ran, the history listing every
    # iteration twice; the second is now refused on the output folder's lock
    first = RunDirectory(str(tmp_path / "ckpt_a"), str(tmp_path / "out"))
    first.lock()
    assert os.path.exists(tmp_path / "out" / ".comal_run.lock")
    with pytest.raises(RunLockError, match=r"another run \(process .* is using --ckpt.output_dir .*out "):
        RunDirectory(str(tmp_path / "ckpt_b"), str(tmp_path / "out")).lock()
    first.unlock()
    assert not os.path.exists(tmp_path / "out" / ".comal_run.lock")
    second = RunDirectory(str(tmp_path / "ckpt_b"), str(tmp_path / "out"))
    second.lock()
    second.unlock()


def test_fresh_run_into_a_used_directory_is_refused_or_moved_aside(tmp_path):
    d = RunDirectory(str(tmp_path / "ckpt"), str(tmp_path / "out"))
    d.prepare_fresh()  # nothing there: fine
    os.makedirs(tmp_path / "out")
    write_jsonl(tmp_path / "out" / "comal_iterations.jsonl", [{"iteration": 0}, {"iteration": 1}])
    os.makedirs(tmp_path / "ckpt" / "global_step2")
    with pytest.raises(PlanError, match="history of 2 finished iteration.*--comal.overwrite"):
        d.prepare_fresh()
    said = []
    d.prepare_fresh(overwrite=True, say=said.append)
    assert not (tmp_path / "out" / "comal_iterations.jsonl").exists() and not (tmp_path / "ckpt").exists()
    assert len(said) == 2 and all("moved" in s for s in said)
    assert len(list((tmp_path / "out").glob("comal_iterations.old-*.jsonl"))) == 1


# -------------------------------------------------------------------------------------------- launches


@pytest.mark.integration
def test_resume_with_other_settings_is_refused_then_accepted_and_recorded(tmp_path, tiny_model):
    pairs = make_pairs_dir(tmp_path / "pairs", 4)
    base = comal_cmd([sys.executable], tiny_model, tmp_path, "--comal.pairs_dir", pairs, "--comal.iterations", "1")
    run_cmd(base, cwd=str(tmp_path))  # iter-dpo by default, one iteration
    changed = [x if x != "1" else "4" for x in base]  # --comal.iterations 4
    changed += ["--comal.algo", "comal", "--comal.ref_update_interval", "2", "--ckpt.load_enable"]
    out = _failed(changed, str(tmp_path))
    assert "other settings" in out
    for setting in ("algo: checkpoint 'iter-dpo', this run 'comal'", "prox: checkpoint 'dpo', this run 'ipo'"):
        assert setting in out, out[-3000:]
    assert "ref_update_interval" in out and "iterations" in out and "--comal.accept_plan_change" in out
    assert len(history(tmp_path)) == 1  # nothing was trained
    run_cmd(changed + ["--comal.accept_plan_change"], cwd=str(tmp_path))
    h = history(tmp_path)
    assert [r.get("iteration") for r in h] == [0, None, 1, 2, 3]
    assert h[1]["plan_change_at_iteration"] == 1 and h[1]["changes"]["algo"] == ["iter-dpo", "comal"]


@pytest.mark.integration
def test_second_fresh_run_into_the_same_directories_is_refused(tmp_path, tiny_model):
    pairs = make_pairs_dir(tmp_path / "pairs", 1)
    cmd = comal_cmd([sys.executable], tiny_model, tmp_path, "--comal.pairs_dir", pairs)
    run_cmd(cmd, cwd=str(tmp_path))
    out = _failed(cmd, str(tmp_path))
    assert "a fresh run would mix with an earlier run" in out and "history of 1 finished iteration" in out
    p = run_cmd(cmd + ["--comal.overwrite"], cwd=str(tmp_path))
    assert "--comal.overwrite: moved" in p.stdout
    assert [r["iteration"] for r in history(tmp_path)] == [0]  # a new history, not iteration 0 twice


@pytest.mark.integration
def test_plan_that_cannot_finish_fails_before_the_first_step(tmp_path, tiny_model):
    pairs = make_pairs_dir(tmp_path / "pairs", 2)
    cmd = comal_cmd([sys.executable], tiny_model, tmp_path, "--comal.pairs_dir", pairs, "--comal.iterations", "3")
    out = _failed(cmd, str(tmp_path))
    assert "[comal] error: --comal.iterations 3 needs 3 files" in out
    assert "checkpoint saved" not in out and not (tmp_path / "final" / "comal_iterations.jsonl").exists()
    for flags, message in [
        (["--model.beta", "inf"], "--model.beta must be a finite number > 0"),
        (["--model.ipo_enable", "--comal.prox", "dpo"], "--model.ipo_enable selects the IPO loss"),
        (["--comal.algo", "inpo", "--comal.beta_schedule", "1.0,0.1"], "would never apply"),
    ]:
        base = comal_cmd([sys.executable], tiny_model, tmp_path, "--comal.pairs_dir", pairs)
        assert message in _failed(base + flags, str(tmp_path))


@pytest.mark.integration
def test_judge_failure_inside_training_is_one_clear_message(tmp_path, tiny_model):
    judge = tmp_path / "judge.py"
    judge.write_text("def judge(prompts, a, b):\n    raise RuntimeError('judge backend down')\n")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "question pick one ?"}])
    cmd = comal_cmd([sys.executable], tiny_model, tmp_path, "--comal.source", "online", "--data.dataset", prompts)
    cmd += ["--judge.kind", "python", "--judge.path", str(judge), "--judge.allow_python_code"]
    cmd += ["--rollout.n_samples_per_prompt", "4", "--rollout.max_new_tokens", "3", "--comal.iterations", "1"]
    out = _failed(cmd, str(tmp_path))
    assert "[comal] error: judge 'python:" in out and "judge backend down" in out
