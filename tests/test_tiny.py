"""python -m comal_openrlhf.cli.tiny: a local model, prompts and pair files for a first launch."""

import json
import os
import subprocess
import sys

from _util import REPO

from comal_openrlhf.cli.tiny import main
from comal_openrlhf.core.matrix import load_matrix


def test_tiny_command_writes_model_prompts_and_pairs_of_the_paper_game(tmp_path):
    paths = main(["--out", str(tmp_path / "t"), "--iterations", "2", "--json"])
    assert os.path.exists(os.path.join(paths["model"], "config.json"))
    assert sorted(os.listdir(paths["pairs_dir"])) == ["iter_000.jsonl", "iter_001.jsonl"]
    P, labels = load_matrix("paper")
    rows = [json.loads(x) for x in open(os.path.join(paths["pairs_dir"], "iter_001.jsonl"))]
    assert len(rows) == 4 * 6
    for r in rows:
        assert r["soft_label"] == P[labels.index(r["chosen"]), labels.index(r["rejected"])]


def test_start_up_prints_no_notices_from_the_repository_root():
    # pynvml's FutureWarning and DeepSpeed's "Setting accelerator to CPU" on every command
    code = "import comal_openrlhf, torch, deepspeed"
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "pynvml" not in p.stderr and "Setting accelerator" not in p.stdout + p.stderr, p.stdout + p.stderr


def test_bad_iterations_is_one_line(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "comal_openrlhf.cli.tiny", "--out", str(tmp_path), "--iterations", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode == 2 and p.stderr.strip() == "[comal] error: --iterations must be >= 1, got 0"
