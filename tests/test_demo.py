"""The CPU demo and the ``--json`` command lines: stdout is one JSON object, the default start fits any game, and a
seed fixes the demo's result on one machine."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from _util import REPO

from comal_openrlhf.cli.demo import default_init, parse_args, run_demo

EPS64 = np.finfo(np.float64).eps
# small settings: the checks are about plumbing and reproducibility, not convergence
TINY = ["--iterations", "2", "--samples", "8", "--steps", "2", "--jobs", "2"]


def _python(code, env=None, timeout=120):
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=full_env, timeout=timeout
    )


def _demo(out, *flags, timeout=900):
    cmd = [sys.executable, "-m", "comal_openrlhf.cli.demo", "--out", str(out), "--json", *TINY, *flags]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # cwd outside the repository: its kernels/ folder would shadow the PyPI package of that name
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=str(out.parent), env=env, timeout=timeout)
    assert p.returncode == 0, (p.stdout + p.stderr)[-5000:]
    return p


def _write_game(path, n):
    """A cyclic n-option game: option i+1 beats option i with 0.8 (indices mod n), all other pairs tie."""
    P = np.full((n, n), 0.5)
    for i in range(n):
        j = (i + 1) % n
        P[j, i], P[i, j] = 0.8, 0.2
    path.write_text(json.dumps({"P": P.tolist(), "labels": [f"o{i}" for i in range(n)]}))
    return str(path)


# ---------------------------------------------------------------------------------------- --json stdout


def test_json_stdout_sends_every_other_write_to_stderr():
    # Python prints, raw writes to descriptor 1 (C libraries) and child processes all land on stderr; stdout holds
    # exactly the JSON line, and after the block stdout works again.
    code = r"""
import os, subprocess, sys
from comal_openrlhf.cli.common import json_stdout
with json_stdout(True) as emit:
    print("python print")
    os.write(1, b"raw descriptor write\n")
    subprocess.run([sys.executable, "-c", "print('child process')"], check=True)
    emit({"ok": 1, "x": [1.5, 2]})
print("after the block")
"""
    p = _python(code)
    assert p.returncode == 0, p.stderr
    first, rest = p.stdout.split("\n", 1)
    assert json.loads(first) == {"ok": 1, "x": [1.5, 2]}
    assert rest == "after the block\n"
    for line in ("python print", "raw descriptor write", "child process"):
        assert line in p.stderr


def test_json_stdout_restores_stdout_after_an_error():
    code = r"""
import os
from comal_openrlhf.cli.common import json_stdout
try:
    with json_stdout(True):
        raise RuntimeError("boom")
except RuntimeError:
    pass
os.write(1, b"stdout again\n")
"""
    p = _python(code)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "stdout again\n"


def test_game_lab_json_stdout_parses():
    cmd = [sys.executable, "-m", "comal_openrlhf.cli.game", "--algo", "comal", "--iters", "200", "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert p.returncode == 0, p.stderr
    result = json.loads(p.stdout)
    assert len(result["policy"]) == 3 and result["labels"] == ["a", "b", "c"]


# ---------------------------------------------------------------------------------------- default --init


def test_default_init_is_the_readme_start_for_three_options():
    # T(3), T(2), T(1) = 6, 3, 1 over 10: exactly the README's (0.6, 0.3, 0.1) (each a correctly rounded quotient)
    assert default_init(3) == [0.6, 0.3, 0.1]
    assert default_init(4) == [0.5, 0.3, 0.15, 0.05]


@pytest.mark.parametrize("n", [2, 4, 6, 11])
def test_default_init_fits_any_number_of_options(n):
    p = np.array(default_init(n))
    w = np.array([k * (k + 1) / 2 for k in range(n, 0, -1)])
    assert p.shape == (n,) and (p > 0).all() and (np.diff(p) < 0).all()
    # n correctly rounded quotients: the sum is 1 up to n half-ulps
    assert abs(p.sum() - 1) <= n * EPS64
    np.testing.assert_allclose(p, w / w.sum(), rtol=EPS64, atol=0)


def test_help_names_the_default_start_and_the_dtype_rule(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "T(k) = k(k+1)/2" in text and "0.6,0.3,0.1 for 3" in text
    assert "--dtype bf16 forces bf16" in text


def test_init_of_the_wrong_length_is_refused(tmp_path):
    from comal_openrlhf.cli.demo import main
    from comal_openrlhf.errors import BadInputError

    a = parse_args(["--out", str(tmp_path / "o"), "--init", "0.5,0.5"])
    with pytest.raises(BadInputError, match="--init needs 3 positive numbers"):
        run_demo(a)
    a = parse_args(["--out", str(tmp_path / "o"), "--init", "a,b,c"])
    with pytest.raises(BadInputError, match="--init needs 3 positive numbers"):
        run_demo(a)
    with pytest.raises(SystemExit, match="error: --init needs 3 positive numbers"):  # the command line's message
        main(["--out", str(tmp_path / "o"), "--init", "0.5,0.5"])


# ---------------------------------------------------------------------------------------- demo runs


def _without_timings(report):
    report = json.loads(json.dumps(report))
    report.pop("seconds")
    for r in report["algorithms"].values():
        r.pop("seconds")
    return report


@pytest.mark.integration
def test_demo_json_is_one_object_and_a_seed_fixes_the_result(tmp_path):
    # Two runs with one seed, the two algorithms in parallel: every process runs one thread with torch's
    # deterministic algorithms and seeded sampling, so the runs do the same floating-point operations in the same
    # order and the reports are equal exactly (timings aside).
    runs = []
    for i in range(2):
        p = _demo(tmp_path / f"run{i}", "--algos", "comal,inpo", "--seed", "3")
        runs.append(json.loads(p.stdout))  # stdout is exactly one JSON object (DeepSpeed's warning went to stderr)
        assert "[demo] SFT warm start" in p.stderr and "| algorithm | final duality gap |" in p.stderr
    a, b = (_without_timings(r) for r in runs)
    assert set(a["algorithms"]) == {"comal", "inpo"}
    assert a["settings"]["seed"] == 3 and a["settings"]["param_dtype"] in ("bf16", "fp32")
    assert a == b


@pytest.mark.integration
@pytest.mark.parametrize("n", [4, 6])
def test_demo_runs_an_n_option_game_without_init(tmp_path, n):
    game = _write_game(tmp_path / f"game{n}.json", n)
    p = _demo(tmp_path / "run", "--game", game, "--algos", "comal")
    report = json.loads(p.stdout)
    assert report["labels"] == [f"o{i}" for i in range(n)]
    assert report["settings"]["init"] == default_init(n)
    assert len(report["start"]["policy"]) == n and len(report["algorithms"]["comal"]["policy"]) == n
    # p_i = m_i / sum(m): rounding of the n - 1 additions in sum(m), the n quotients and the n - 1 additions here
    assert abs(sum(report["algorithms"]["comal"]["policy"]) - 1) <= 2 * n * EPS64
