"""Tabular game lab (comal_openrlhf/game.py): the paper's synthetic game (COMAL.md section 3), the Nash LP, the
loss-mode steps against the closed-form step (COMAL.md section 4), matrix-file errors and the CLI."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from comal_openrlhf.game import (
    MatrixError,
    duality_gap,
    kl,
    load_matrix,
    loss_step,
    main,
    paper_game,
    run,
    solve_nash,
)

SKEWED = [0.6, 0.3, 0.1]


def tv(p, q):
    return 0.5 * float(np.abs(np.asarray(p) - np.asarray(q)).sum())


def closed_form(P, mu, ref, eta, tau):
    r = eta * tau
    q = mu ** (1 - r) * ref**r * np.exp(eta * P @ mu)
    return q / q.sum()


# ---- the game, Nash, gap, KL -------------------------------------------------------------------------------------


def test_paper_game_and_its_nash():
    P, labels = paper_game()
    assert labels == ["a", "b", "c"]
    assert P[1, 0] == 0.9 and P[2, 1] == 0.9 and P[0, 2] == 0.8
    np.testing.assert_allclose(P + P.T, 1.0)
    nash = solve_nash(P)
    np.testing.assert_allclose(nash, [4 / 11, 3 / 11, 4 / 11], atol=1e-9)
    assert abs(duality_gap(P, nash)) < 1e-9


def test_duality_gap_and_kl_by_hand():
    P, _ = paper_game()
    # uniform: P u = row means = (1.4, 1.5, 1.6)/3 -> gap = 2 * 1.6/3 - 1 = 1/15
    assert duality_gap(P, np.ones(3) / 3) == pytest.approx(1 / 15)
    # pure a: best response b wins with 0.9 -> gap 0.8
    assert duality_gap(P, np.array([1.0, 0, 0])) == pytest.approx(0.8)
    # KL((1/2, 1/2) || (1/4, 3/4)) = 1/2 log 2 + 1/2 log(2/3); 0 log 0 = 0
    assert kl([0.5, 0.5], [0.25, 0.75]) == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))
    assert kl([1.0, 0.0], [0.5, 0.5]) == pytest.approx(math.log(2))


def test_nash_rock_paper_scissors_is_uniform():
    P = np.array([[0.5, 0.0, 1.0], [1.0, 0.5, 0.0], [0.0, 1.0, 0.5]])
    np.testing.assert_allclose(solve_nash(P), np.ones(3) / 3, atol=1e-9)


def test_nash_transitive_is_the_best_response():
    idx = np.arange(5)
    P = 0.5 + 0.1 * (idx[:, None] - idx[None, :])  # i beats j more the larger i - j: response 4 is best
    np.testing.assert_allclose(solve_nash(P), np.eye(5)[4], atol=1e-9)
    assert duality_gap(P, np.eye(5)[4]) == pytest.approx(0.0)


def test_first_closed_form_step_by_hand():
    # from uniform (mu = ref), eta = 1: mu_1 ~ exp(P u) = exp((1.4, 1.5, 1.6)/3)
    P, _ = paper_game()
    e = np.exp(np.array([1.4, 1.5, 1.6]) / 3)
    np.testing.assert_allclose(run(P, iters=1)["policy"], e / e.sum(), atol=1e-15)


# ---- the paper's synthetic experiment (eta = 1, tau = 0.1, K = 200, 5,000 steps) -----------------------------------


@pytest.mark.parametrize("init", [None, SKEWED])
def test_comal_converges_to_nash(init):
    P, _ = paper_game()
    res = run(P, algo="comal", iters=5000, eta=1.0, tau=0.1, ref_every=200, init=init)
    assert res["duality_gap"] <= 1e-9
    assert res["kl_to_nash"] < 1e-12
    np.testing.assert_allclose(res["policy"], [4 / 11, 3 / 11, 4 / 11], atol=1e-9)


@pytest.mark.parametrize("init,stall", [(None, 0.024), (SKEWED, 0.157)])
def test_inpo_stalls_at_a_constant_gap(init, stall):
    P, _ = paper_game()
    res = run(P, algo="inpo", iters=5000, init=init)
    late = [g for k, g in res["gaps"] if k >= 2500]
    assert res["duality_gap"] == pytest.approx(stall, abs=1e-3)
    assert max(late) - min(late) < 1e-9  # converged: to the regularised Nash, not the Nash


@pytest.mark.parametrize("init", [None, SKEWED])
def test_mwu_does_not_converge(init):
    P, _ = paper_game()
    res = run(P, algo="mwu", iters=5000, init=init, record_every=1)
    assert min(g for k, g in res["gaps"] if k >= 100) > 0.2
    assert res["duality_gap"] > 0.79  # drifts towards a pure strategy (gap 0.8)


@pytest.mark.parametrize("init", [None, SKEWED])
def test_nash_md_stalls_like_inpo(init):
    P, _ = paper_game()
    res = run(P, algo="nash-md", iters=5000, init=init)
    late = [g for k, g in res["gaps"] if k >= 2500]
    assert res["duality_gap"] > 0.01 and max(late) - min(late) < 1e-9


def test_record_every_subsamples():
    P, _ = paper_game()
    res = run(P, iters=5000)
    assert res["iterations"] == 5000 and res["gaps"][0][0] == 0 and res["gaps"][-1][0] == 5000
    assert 150 <= len(res["gaps"]) <= 250


# ---- loss mode: the prox losses against the closed-form step -------------------------------------------------------


@pytest.mark.parametrize("prox", ["ipo", "rebel"])
@pytest.mark.parametrize("algo", ["comal", "inpo", "nash-md", "mwu"])
def test_exact_losses_match_closed_form(algo, prox):
    P, _ = paper_game()
    kw = {"algo": algo, "iters": 6, "ref_every": 2, "init": SKEWED}  # ref_every=2 exercises the reference advance
    exact = run(P, mode="closed-form", **kw)
    solved = run(P, mode="loss", prox=prox, **kw)
    assert tv(exact["policy"], solved["policy"]) < 1e-4
    for (k1, g1), (k2, g2) in zip(exact["gaps"], solved["gaps"]):
        assert k1 == k2 and g1 == pytest.approx(g2, abs=1e-4)


def sppo_error(mu, ref, beta, r):
    P, _ = paper_game()
    eta = 1 / beta
    got = np.exp(loss_step(P, np.log(mu), np.log(ref), eta, r / eta, prox="sppo"))
    return tv(got, closed_form(P, mu, ref, eta, r / eta))


def test_sppo_error_shrinks_with_beta_when_r_is_0():
    mu = np.array(SKEWED)
    errors = [sppo_error(mu, mu, beta, 0.0) for beta in (0.5, 2.0, 20.0)]
    assert errors[0] > errors[1] > errors[2]
    assert errors[0] > 1e-3 and errors[2] < 1e-6  # measured: 5.0e-3, 7.1e-5, 6.5e-8


def test_sppo_keeps_an_error_floor_when_r_is_positive():
    # mu != ref: C = mu^(1-r) ref^r is unnormalised and sppo regresses log pi/C without a log-partition
    mu, ref = np.array(SKEWED), np.array([0.2, 0.3, 0.5])
    errors = [sppo_error(mu, ref, beta, 0.1) for beta in (20.0, 1000.0)]
    assert min(errors) > 1e-3  # measured: 2.0e-3, 1.9e-3
    assert errors[1] == pytest.approx(errors[0], rel=0.1)


def test_dpo_step_under_bradley_terry_is_the_reward_prox():
    rewards = np.array([0.0, 1.0, -0.5, 2.0])
    P = 1 / (1 + np.exp(-(rewards[:, None] - rewards[None, :])))
    mu, ref = np.array([0.1, 0.2, 0.3, 0.4]), np.array([0.4, 0.3, 0.2, 0.1])
    beta, r = 2.0, 0.2
    got = np.exp(loss_step(P, np.log(mu), np.log(ref), 1 / beta, r * beta, prox="dpo"))
    want = mu ** (1 - r) * ref**r * np.exp(rewards / beta)
    np.testing.assert_allclose(got, want / want.sum(), atol=1e-7)


def test_dpo_step_on_the_intransitive_game_is_not_the_prox_step():
    P, _ = paper_game()
    mu, ref = np.log(SKEWED), np.log([0.2, 0.3, 0.5])
    dpo, ipo = (np.exp(loss_step(P, mu, ref, 1.0, 0.1, prox=p)) for p in ("dpo", "ipo"))
    assert tv(dpo, ipo) > 0.1  # measured 0.25


# ---- matrix files and the CLI --------------------------------------------------------------------------------------


def write(tmp_path, obj, name="m.json"):
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


def test_load_matrix_file(tmp_path):
    P, _ = paper_game()
    path = write(tmp_path, {"P": P.tolist(), "labels": ["x", "y", "z"]})
    P2, labels2 = load_matrix(path)
    np.testing.assert_array_equal(P2, P)
    assert labels2 == ["x", "y", "z"]
    assert load_matrix(write(tmp_path, {"P": [[0.5]]}))[1] == ["0"]  # labels default to indices


@pytest.mark.parametrize(
    "content,match",
    [
        ({"P": [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]}, "square"),
        ({"P": [[0.5, 1.2], [-0.2, 0.5]]}, r"\(0, 1\).*\[0, 1\]"),
        ({"P": [[0.5, 0.7], [0.7, 0.5]]}, r"\(0, 1\).*P \+ P\^T = 1"),
        ({"P": [[0.5, 0.4], [0.6, 0.5]], "labels": ["only-one"]}, "labels"),
        ("{not json", "JSON"),
    ],
)
def test_bad_matrix_files(tmp_path, content, match):
    path = write(tmp_path, content)
    with pytest.raises(MatrixError, match=match) as err:
        load_matrix(path)
    assert isinstance(err.value, ValueError) and path in str(err.value)


def test_missing_matrix_file(tmp_path):
    with pytest.raises(MatrixError, match="no such"):
        load_matrix(str(tmp_path / "absent.json"))


def test_bad_run_arguments():
    P, _ = paper_game()
    with pytest.raises(ValueError, match="algorithm"):
        run(P, algo="sgd")
    with pytest.raises(ValueError, match="init"):
        run(P, init=[0.5, 0.5])
    with pytest.raises(ValueError, match="eta"):
        run(P, eta=10.0, tau=0.1)  # r = eta*tau = 1


def test_cli_errors_exit_2_without_traceback(tmp_path, capsys):
    bad = write(tmp_path, {"P": [[0.5, 0.7], [0.7, 0.5]]})
    for argv in (["--matrix", bad], ["--matrix", str(tmp_path / "absent.json")], ["--init", "0.5,0.5"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err


def test_cli_json_subprocess(tmp_path):
    cmd = [sys.executable, "-m", "comal_openrlhf.game", "--json", "--algo", "comal", "--init", "0.6,0.3,0.1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=True).stdout
    res = json.loads(out)
    assert {"policy", "nash", "duality_gap", "kl_to_nash", "iterations", "gaps", "labels"} <= res.keys()
    assert res["iterations"] == 5000 and res["duality_gap"] <= 1e-9 and len(res["gaps"]) > 100

    bad = write(tmp_path, {"P": [[0.5, 1.5], [-0.5, 0.5]]})
    p = subprocess.run(cmd[:3] + ["--matrix", bad], check=False, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("error: ") and "Traceback" not in p.stderr and bad in p.stderr


def test_cli_plot(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "gap.png"
    assert main(["--iters", "300", "--plot", str(out)]) == 0
    assert out.stat().st_size > 1000
