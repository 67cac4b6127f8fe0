"""The gpm judge (General Preference representation Model, arXiv 2410.02197) on tiny checkpoints built locally in
the authors' layout: the formula against a hand-written reference, exact antisymmetry, n forwards for all n(n-1)
ordered pairs, the mixture, the flags, the server, bad checkpoints, and a cyclic GPM whose induced game COMAL
solves while iterative IPO cycles; both block-weight formulas (--judge.gpm_weights) against a numpy reference."""

import argparse
import math
import os

import numpy as np
import pytest
import torch

from comal_openrlhf.judges import JudgeError, MixtureJudge, add_judge_args, build_judge, judge_pairs
from comal_openrlhf.judges.gpm import WEIGHTS, GPMJudge, read_heads
from comal_openrlhf.judges.tiny_gpm import build_cyclic_gpm, build_tiny_gpm, induced_matrix, save_gpm_heads

PROMPT = "question pick one ?"
OPTIONS = ["a", "b", "c"]
EPS32 = float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def gpm_dir(tmp_path_factory):
    """Random heads: value_head [6, 32] (k = 3), prompt_head [3, 32]."""
    return build_tiny_gpm(str(tmp_path_factory.mktemp("gpm")), value_head_dim=6, seed=1)


@pytest.fixture(scope="module")
def gpm_no_prompt_head(tmp_path_factory):
    return build_tiny_gpm(str(tmp_path_factory.mktemp("gpm_np")), value_head_dim=4, prompt_head=False, seed=2)


@pytest.fixture(scope="module")
def cyclic_dir(tmp_path_factory):
    return build_cyclic_gpm(str(tmp_path_factory.mktemp("gpm_cyclic")), PROMPT, OPTIONS)


def reference_block_weights(z, hidden, weights):
    """One prompt's block weights from its logits z = prompt_head(h) in numpy, written out: "softmax" is
    exp(z_i) / sum_j exp(z_j), "scaled" is k exp(z_i / sqrt(hidden)) / sum_j exp(z_j / sqrt(hidden)) (no shift by
    the max: the tiny heads' logits are far from exp's range)."""
    z = np.asarray(z, dtype=np.float64)
    assert z.ndim == 1 and np.all(np.abs(z) < 300)
    if weights == "softmax":
        e = np.exp(z)
        return e / np.sum(e)
    assert weights == "scaled"
    e = np.exp(z / math.sqrt(hidden))
    return len(z) * e / np.sum(e)


def reference_probs(path, prompts, a, b, tau, weights="softmax"):
    """The formula written out on one unpadded float64 sequence at a time, with the authors' dense matrices:
    s = v_a^T R^T v_b, R = blockdiag([[0, -w_i], [w_i, 0]]), w = reference_block_weights(prompt_head(h_prompt))
    (1 without a prompt head)."""
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    sd = load_file(os.path.join(path, "model.safetensors"))
    wv = sd["value_head.weight"].double()
    wp = sd["prompt_head.weight"].double() if "prompt_head.weight" in sd else None
    model = AutoModel.from_pretrained(path, dtype=torch.float64).eval()
    tok = AutoTokenizer.from_pretrained(path)

    def states(prompt, response):
        user = {"role": "user", "content": prompt}
        full = tok.apply_chat_template([user, {"role": "assistant", "content": response}], tokenize=False)
        ids = tok(full)["input_ids"]
        ids[-1] = tok.eos_token_id
        n_prompt = len(tok(tok.apply_chat_template([user], tokenize=False))["input_ids"])
        with torch.no_grad():
            h = model(torch.tensor([ids])).last_hidden_state[0]
        return h[-1], h[n_prompt - 1]

    out = []
    for p, x, y in zip(prompts, a, b):
        hx, hp = states(p, x)
        hy, _ = states(p, y)
        vx, vy = wv @ hx, wv @ hy
        vx, vy = vx / vx.norm(), vy / vy.norm()
        k = wv.shape[0] // 2
        if wp is not None:
            w = torch.from_numpy(reference_block_weights((wp @ hp).numpy(), hp.shape[0], weights))
        else:
            w = torch.ones(k, dtype=torch.float64)
        R = torch.zeros(2 * k, 2 * k, dtype=torch.float64)
        for i in range(k):
            R[2 * i, 2 * i + 1], R[2 * i + 1, 2 * i] = -w[i], w[i]
        s = vx @ R.T @ vy
        out.append(float(torch.sigmoid(s / tau)))
    return np.array(out)


# prompts of different lengths and responses of different lengths: the batch is left padded
PROMPTS = [PROMPT, PROMPT, "is the answer good or bad ?", "is the answer good or bad ?", PROMPT]
A = ["yes good", "one two three four five", "good", "bad", "no"]
B = ["no bad", "yes", "the answer is bad", "good", "no"]
# float64 forwards: rounding (eps64 = 2.2e-16) grows with the depth, sqrt(hidden) and 1/tau = 10 by far less than
# 1e5, so the batched, padded judge and the one-at-a-time reference agree to 1e-10
TOL64 = 1e-10


def test_probabilities_equal_reference_formula(gpm_dir, gpm_no_prompt_head):
    for path in (gpm_dir, gpm_no_prompt_head):
        judge = GPMJudge(path, device="cpu", dtype=torch.float64, batch_size=3)
        assert judge.temperature == 0.1  # the authors' tau
        p = judge.prob(PROMPTS, A, B)
        np.testing.assert_allclose(p, reference_probs(path, PROMPTS, A, B, 0.1), rtol=0, atol=TOL64)
        assert np.ptp(p) > 0.05  # random heads tell responses apart (the comparison is not vacuous)
        assert p[-1] == 0.5  # a response against itself
    judge = GPMJudge(gpm_dir, temperature=0.7, device="cpu", dtype=torch.float64)
    np.testing.assert_allclose(
        judge.prob(PROMPTS, A, B), reference_probs(gpm_dir, PROMPTS, A, B, 0.7), rtol=0, atol=TOL64
    )


# ---- the block weights' two formulas (--judge.gpm_weights) ----


def test_both_block_weight_formulas_equal_numpy_reference(gpm_dir):
    """Each formula against the numpy reference on the same hidden states and the heads read back from the weights
    file, then the whole probability against the one-sequence-at-a-time reference."""
    from safetensors.torch import load_file

    assert WEIGHTS.keys() == {"softmax", "scaled"}
    head = load_file(os.path.join(gpm_dir, "model.safetensors"))["prompt_head.weight"].double().numpy()  # [3, 32]
    k, hidden = head.shape
    h_prompt = None
    for weights in WEIGHTS:
        judge = GPMJudge(gpm_dir, device="cpu", dtype=torch.float64, batch_size=3, gpm_weights=weights)
        assert judge.gpm_weights == weights
        if h_prompt is None:
            _, h_prompt = judge.hidden_states(PROMPTS, A)
        w = judge.block_weights(h_prompt)
        want = np.stack([reference_block_weights(head @ h, hidden, weights) for h in h_prompt])
        np.testing.assert_allclose(w, want, rtol=1e-13, atol=0)
        np.testing.assert_allclose(w.sum(-1), 1.0 if weights == "softmax" else k, rtol=1e-13)
        p = judge.prob(PROMPTS, A, B)
        np.testing.assert_allclose(p, reference_probs(gpm_dir, PROMPTS, A, B, 0.1, weights), rtol=0, atol=TOL64)
        assert np.ptp(p) > 0.05 and p[-1] == 0.5
    # the default is the released checkpoints' formula
    assert GPMJudge(gpm_dir, device="cpu").gpm_weights == "softmax"


def test_scaled_and_softmax_weights_differ_beyond_a_temperature(gpm_dir, gpm_no_prompt_head, cyclic_dir, tmp_path):
    """With k >= 2 and unequal logits the two formulas give other probabilities, even with the scaled judge's
    temperature k times larger (which undoes its factor k): the weights' proportions differ. With equal logits,
    k = 1, or no prompt head, that temperature makes them agree."""
    tau = 0.1

    def pair(path, k):
        soft = GPMJudge(path, temperature=tau, device="cpu", dtype=torch.float64, gpm_weights="softmax")
        scaled = GPMJudge(path, temperature=k * tau, device="cpu", dtype=torch.float64, gpm_weights="scaled")
        return soft, scaled

    # a designed k = 2 GPM: the value head's second block is zero, so s = w_1 c_1 with c_1 the first block's cross
    # term: at temperatures tau and 2 tau, logit(P) = w_1 c_1 / tau against (w_1' / 2) c_1 / tau, where
    # w_1 = sigmoid(d) and w_1' / 2 = sigmoid(d / sqrt(hidden)), d = z_1 - z_2: equal only if d = 0 or c_1 = 0
    path = build_tiny_gpm(str(tmp_path / "k2"), value_head_dim=4, seed=3)
    value, prompt_head = read_heads(path)
    value[2:] = 0.0
    save_gpm_heads(path, value, prompt_head)
    soft, scaled = pair(path, 2)
    a, b = ["yes good", "one two three four five", "good"], ["no bad", "yes", "the answer is bad"]
    prompts = [PROMPT, PROMPT, "is the answer good or bad ?"]
    _, h_prompt = soft.hidden_states(prompts, a)
    z = h_prompt @ soft.prompt_head.T
    d = z[:, 0] - z[:, 1]
    assert np.all(np.abs(d) > 0.5)  # unequal logits
    p_soft, p_scaled = soft.prob(prompts, a, b), scaled.prob(prompts, a, b)
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    assert np.all(np.abs(logit(p_soft)) > 0.05)  # c_1 != 0: the pairs are not ties (the least is 0.11)
    sig = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    ratio = sig(d) / sig(d / math.sqrt(soft.prompt_head.shape[1]))
    assert np.all(np.abs(ratio - 1) > 0.05)
    np.testing.assert_allclose(logit(p_soft) / logit(p_scaled), ratio, rtol=1e-9)
    assert np.max(np.abs(p_soft - p_scaled)) > 0.01
    # equal logits (identical prompt-head rows): the proportions agree and only the factor k is left
    save_gpm_heads(path, value, np.stack([prompt_head[0], prompt_head[0]]))
    soft, scaled = pair(path, 2)
    np.testing.assert_allclose(scaled.prob(prompts, a, b), soft.prob(prompts, a, b), rtol=0, atol=1e-12)

    # the random k = 3 heads: other probabilities too, at k tau and at the default temperature alike (the tiny
    # model's responses lie close together, so P stays near 1/2: compare the logits, the last pair is a tie)
    soft, scaled = pair(gpm_dir, 3)
    plain = GPMJudge(gpm_dir, device="cpu", dtype=torch.float64, gpm_weights="scaled")
    x = logit(soft.prob(PROMPTS, A, B)[:-1])
    for other in (scaled, plain):
        assert np.max(np.abs(logit(other.prob(PROMPTS, A, B)[:-1]) - x)) > 0.1 * np.max(np.abs(x))
    # k = 1 (the cyclic GPM) or no prompt head: the weights are 1 either way
    for path, k in ((cyclic_dir, 1), (gpm_no_prompt_head, 2)):
        soft, scaled = pair(path, 1)
        np.testing.assert_allclose(scaled.prob(PROMPTS, A, B), soft.prob(PROMPTS, A, B), rtol=0, atol=1e-15)
        np.testing.assert_array_equal(scaled.block_weights(np.ones((2, 32))), np.ones((2, k)))


def test_gpm_weights_flag_and_a_bad_value(gpm_dir, capsys):
    from openrlhf.utils.config import hierarchize

    parser = add_judge_args(argparse.ArgumentParser())
    flag = next(x for x in parser._actions if x.dest == "judge.gpm_weights")
    assert tuple(flag.choices) == tuple(WEIGHTS) and flag.default == "softmax"
    assert "GPM-Llama-3.1-8B" in flag.help and "sqrt(hidden_size)" in flag.help
    base = ["--judge.kind", "gpm", "--judge.path", gpm_dir, "--judge.device", "cpu"]
    assert build_judge(hierarchize(parser.parse_args(base)).judge).gpm_weights == "softmax"
    args = hierarchize(parser.parse_args(base + ["--judge.gpm_weights", "scaled"]))
    assert build_judge(args.judge).gpm_weights == "scaled"
    mix = build_judge({"kind": "mixture", "mixture": f"gpm:{gpm_dir}:1", "gpm_weights": "scaled", "device": "cpu"})
    assert mix.judges[0].gpm_weights == "scaled"  # sub-judges inherit it
    with pytest.raises(SystemExit):
        parser.parse_args(base + ["--judge.gpm_weights", "sqrt"])
    assert "invalid choice: 'sqrt'" in capsys.readouterr().err
    # one clear error, before the checkpoint is read
    for path in (gpm_dir, "/no/such/checkpoint"):
        with pytest.raises(JudgeError, match=r"--judge.gpm_weights must be one of 'softmax', 'scaled' .*got 'sqrt'"):
            build_judge({"kind": "gpm", "path": path, "gpm_weights": "sqrt"})
    with pytest.raises(JudgeError, match="got None"):
        GPMJudge(gpm_dir, gpm_weights=None)


def test_heads_read_from_weights_shapes(gpm_dir, gpm_no_prompt_head):
    value, prompt = read_heads(gpm_dir)
    assert value.shape == (6, 32) and prompt.shape == (3, 32)
    value, prompt = read_heads(gpm_no_prompt_head)
    assert value.shape == (4, 32) and prompt is None
    assert GPMJudge(gpm_dir, device="cpu").dim == 6


def test_antisymmetric_in_float32(gpm_dir):
    judge = build_judge({"kind": "gpm", "path": gpm_dir, "device": "cpu"})  # the training default: fp32 forward
    assert judge.antisymmetric and judge.model.dtype == torch.float32
    p_ab, p_ba = judge.prob(PROMPTS, A, B), judge.prob(PROMPTS, B, A)
    # s(a, b) = -s(b, a) term by term in float64; what is left is the rounding of two sigmoids (~1e-16)
    np.testing.assert_allclose(p_ab + p_ba, 1.0, rtol=0, atol=1e-7)
    np.testing.assert_array_equal(judge.prob(PROMPTS, A, A), 0.5)


def test_all_ordered_pairs_cost_one_forward_per_response(gpm_dir):
    from comal_openrlhf.core.pairs import win_matrix

    judge = GPMJudge(gpm_dir, device="cpu", batch_size=4)
    responses = ["yes", "no", "yes good", "no bad", "one two", "the answer is good"]
    n = len(responses)
    i, j = np.where(~np.eye(n, dtype=bool))
    asked = []
    prob = judge.prob
    judge.prob = lambda p, a, b: asked.append(len(p)) or prob(p, a, b)
    q = judge_pairs(judge, [PROMPT] * len(i), [responses[x] for x in i], [responses[y] for y in j])
    assert judge.forwards == n  # n forwards for all n(n-1) ordered pairs
    assert asked == [n * (n - 1)]  # one order only: both orders would ask 2 n(n-1)
    P = np.full((n, n), 0.5)
    P[i, j] = q
    np.testing.assert_allclose(P + P.T, 1.0, rtol=0, atol=1e-12)
    W = win_matrix(judge, PROMPT, responses)  # the COMAL loop's path: upper triangle, both orders requested
    np.testing.assert_allclose(W, P, rtol=0, atol=1e-12)
    assert judge.forwards == 2 * n


def test_gpm_in_mixture_and_flags(gpm_dir, tmp_path):
    from openrlhf.utils.config import hierarchize

    from comal_openrlhf.tiny import build_tiny_llama

    rm = build_tiny_llama(str(tmp_path / "rm"), reward_head=True)
    parser = add_judge_args(argparse.ArgumentParser())
    args = hierarchize(parser.parse_args(["--judge.kind", "gpm", "--judge.path", gpm_dir, "--judge.device", "cpu"]))
    gpm = build_judge(args.judge)
    assert isinstance(gpm, GPMJudge) and gpm.temperature == 0.1  # the kind's default tau
    args = parser.parse_args(["--judge.kind", "gpm", "--judge.path", gpm_dir, "--judge.temperature", "0.5"])
    assert build_judge(hierarchize(args).judge).temperature == 0.5

    mix = build_judge({"kind": "mixture", "mixture": f"gpm:{gpm_dir}:1,reward_model:{rm}:3", "device": "cpu"})
    assert isinstance(mix, MixtureJudge) and mix.antisymmetric  # both parts are antisymmetric
    assert mix.judges[0].temperature == 0.1 and mix.judges[1].temperature == 1.0  # each kind's own default
    want = 0.25 * mix.judges[0].prob(PROMPTS, A, B) + 0.75 * mix.judges[1].prob(PROMPTS, A, B)
    np.testing.assert_allclose(mix.prob(PROMPTS, A, B), want, rtol=0, atol=1e-12)
    assert not build_judge({"kind": "mixture", "mixture": f"gpm:{gpm_dir}:1,table:paper:1"}).antisymmetric


def test_gpm_served_over_http(gpm_dir):
    import threading

    from comal_openrlhf.cli.serve_judge import make_server

    judge = GPMJudge(gpm_dir, device="cpu", dtype=torch.float64)  # requests of 2 pad differently: float64
    server = make_server(judge, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        host, port = server.server_address[:2]
        remote = build_judge({"kind": "remote", "url": f"http://{host}:{port}/prob", "batch_size": 2})
        np.testing.assert_allclose(remote.prob(PROMPTS, A, B), judge.prob(PROMPTS, A, B), rtol=0, atol=TOL64)
    finally:
        server.shutdown()
        server.server_close()


def test_bad_checkpoints_name_the_problem(tmp_path):
    from comal_openrlhf.tiny import build_tiny_llama

    plain = build_tiny_llama(str(tmp_path / "plain"))
    with pytest.raises(JudgeError, match="has no 'value_head.weight'"):
        build_judge({"kind": "gpm", "path": plain})
    with pytest.raises(JudgeError, match="needs --judge.path"):
        build_judge({"kind": "gpm"})
    with pytest.raises(JudgeError, match="checkpoint directory"):
        build_judge({"kind": "gpm", "path": str(tmp_path / "missing")})
    save_gpm_heads(plain, np.ones((3, 32)))
    with pytest.raises(JudgeError, match=r"value_head.weight has shape \[3, 32\]"):
        build_judge({"kind": "gpm", "path": plain})
    save_gpm_heads(plain, np.ones((4, 32)), np.ones((3, 32)))
    with pytest.raises(JudgeError, match=r"prompt_head.weight has shape \[3, 32\], need \[2, 32\]"):
        build_judge({"kind": "gpm", "path": plain})
    save_gpm_heads(plain, np.ones((4, 16)))
    with pytest.raises(JudgeError, match="hidden size is 32"):
        build_judge({"kind": "gpm", "path": plain})
    with pytest.raises(JudgeError, match="temperature"):
        GPMJudge(plain, temperature=0.0)


# ---- the cyclic GPM ----


def test_cyclic_gpm_induces_the_cycle(cyclic_dir):
    from comal_openrlhf.core.game import solve_nash

    tau = 0.5
    P = induced_matrix(cyclic_dir, PROMPT, OPTIONS, temperature=tau)
    np.testing.assert_allclose(P + P.T, 1.0, rtol=0, atol=1e-12)
    # the embeddings sit at 0, 120, 240 degrees up to the float32 storage of the value head: a relative error of
    # eps32 per weight, amplified by the conditioning of the options' hidden states
    judge = GPMJudge(cyclic_dir, device="cpu", dtype=torch.float64)
    h_last, _ = judge.hidden_states([PROMPT] * 3, OPTIONS)
    kappa = np.linalg.cond(h_last)
    angle = np.rad2deg(np.arctan2(*judge.embed(h_last).T[::-1]))
    np.testing.assert_allclose(angle, [0.0, 120.0, -120.0], rtol=0, atol=np.rad2deg(10 * EPS32 * kappa))
    edge = 1 / (1 + np.exp(-np.sin(np.deg2rad(120)) / tau))  # sigmoid(sin(120 deg) / tau) = 0.8497
    want = np.array([[0.5, edge, 1 - edge], [1 - edge, 0.5, edge], [edge, 1 - edge, 0.5]])
    np.testing.assert_allclose(P, want, rtol=0, atol=10 * EPS32 * kappa / (4 * tau))
    assert P[0, 1] > 0.5 and P[1, 2] > 0.5 and P[2, 0] > 0.5  # a beats b beats c beats a: no reward fits it
    np.testing.assert_allclose(solve_nash(P), [1 / 3] * 3, atol=1e-6)  # a symmetric cycle: the uniform Nash
    # the training judge (float32 forward) sees the same matrix up to float32 rounding
    fp32 = build_judge({"kind": "gpm", "path": cyclic_dir, "temperature": tau, "device": "cpu"})
    np.testing.assert_allclose(fp32.preference_matrix(PROMPT, OPTIONS), P, rtol=0, atol=1e3 * EPS32 * kappa)


def test_cyclic_gpm_other_angles(tmp_path):
    from comal_openrlhf.core.game import solve_nash

    path = build_cyclic_gpm(str(tmp_path / "g"), PROMPT, ["yes", "no", "good", "bad"], angles=(0, 80, 170, 260))
    P = induced_matrix(path, PROMPT, ["yes", "no", "good", "bad"], temperature=1.0)
    nash = solve_nash(P)
    assert np.max(P @ nash) <= 0.5 + 1e-6 and np.ptp(nash) > 0.01  # a non-uniform Nash of the induced game


def _tabular_run(judge, algo, iters=24, eta=4.0, r=0.6, K=4, init=(0.6, 0.3, 0.1)):
    """A softmax policy over the options trained by the project's ipo prox loss (exact expectation over pairs),
    the soft labels asked from ``judge`` every iteration through the COMAL loop's win matrix."""
    from comal_openrlhf.core.game import loss_step
    from comal_openrlhf.core.pairs import win_matrix

    r = r if algo == "comal" else 0.0
    log_mu = np.log(np.asarray(init))
    log_ref = log_mu.copy()
    policies = []
    for k in range(1, iters + 1):
        P = win_matrix(judge, PROMPT, OPTIONS)
        log_mu = loss_step(P, log_mu, log_ref, eta, r / eta, prox="ipo")
        if algo == "comal" and k % K == 0:
            log_ref = log_mu.copy()
        policies.append(np.exp(log_mu))
    return np.array(policies)


def test_comal_reaches_the_induced_nash_iterative_ipo_cycles(cyclic_dir):
    from comal_openrlhf.core.game import duality_gap

    judge = build_judge({"kind": "gpm", "path": cyclic_dir, "temperature": 0.5, "device": "cpu"})
    P = induced_matrix(cyclic_dir, PROMPT, OPTIONS, temperature=0.5)
    comal = _tabular_run(judge, "comal")
    ipo = _tabular_run(judge, "iter-ipo")
    gap_comal = [duality_gap(P, p) for p in comal]
    gap_ipo = [duality_gap(P, p) for p in ipo]
    assert gap_comal[-1] < 1e-3 and max(gap_comal[-8:]) < 1e-2
    np.testing.assert_allclose(comal[-1], [1 / 3] * 3, atol=1e-2)
    # iterative IPO (r = 0) keeps cycling: a large gap to the end, and the favourite option goes round the cycle
    assert min(gap_ipo[-8:]) > 0.1 and np.mean(gap_ipo[-8:]) > 0.3
    assert set(np.argmax(ipo[4:], axis=1)) == {0, 1, 2}


@pytest.mark.integration
def test_train_comal_with_the_cyclic_gpm_reaches_its_nash(tmp_path):
    """The whole loop through ``python -m openrlhf.cli.train_comal``: a tiny policy warm-started at (0.6, 0.3, 0.1)
    samples 64 responses per iteration, the cyclic GPM judges them (tau = 0.5), all pairs with soft labels train the
    ipo prox loss (the demo's settings). COMAL reaches the Nash of the induced matrix; iterative IPO does not."""
    import json
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from comal_openrlhf.cli.demo import PROMPT as DEMO_PROMPT
    from comal_openrlhf.cli.demo import sft_warm_start
    from comal_openrlhf.eval.exact import game_report
    from comal_openrlhf.tiny import DEFAULT_WORDS, build_tiny_llama

    tau = 0.5
    gpm = build_cyclic_gpm(str(tmp_path / "gpm"), DEMO_PROMPT, OPTIONS)
    P = induced_matrix(gpm, DEMO_PROMPT, OPTIONS, temperature=tau)
    policy = build_tiny_llama(str(tmp_path / "sft"), words=tuple(DEFAULT_WORDS) + tuple(OPTIONS))
    sft_warm_start(policy, OPTIONS, [0.6, 0.3, 0.1], 0)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": DEMO_PROMPT}) + "\n")

    def launch(algo, extra):
        work = tmp_path / algo
        cmd = [sys.executable, "-m", "openrlhf.cli.train_comal", "--model.model_name_or_path", policy]
        cmd += [
            "--comal.source",
            "online",
            "--judge.kind",
            "gpm",
            "--judge.path",
            gpm,
            "--judge.temperature",
            str(tau),
        ]
        cmd += ["--judge.device", "cpu", "--data.dataset", str(prompts), "--data.prompt_key", "prompt"]
        cmd += ["--data.apply_chat_template", "--data.max_len", "32", "--rollout.prompts_per_iteration", "1"]
        cmd += ["--rollout.n_samples_per_prompt", "64", "--rollout.temperature", "1.0", "--rollout.top_p", "1.0"]
        cmd += ["--rollout.max_new_tokens", "3", "--rollout.pair_rule", "all_soft"]
        cmd += ["--rollout.pair_weighting", "policy", "--model.beta", "0.25", "--train.micro_batch_size", "16"]
        cmd += ["--train.batch_size", "16", "--train.max_epochs", "30", "--adam.lr", "1e-2"]
        cmd += ["--lr_scheduler", "constant", "--lr_warmup_ratio", "0", "--max_norm", "10", "--ds.zero_stage", "0"]
        cmd += ["--ds.param_dtype", "fp32", "--train.seed", "0", "--comal.mass_coef", "1.0"]
        # the demo's own optimiser, as comal_openrlhf.cli.demo passes it (the presets' official recipe is for LLM runs)
        cmd += ["--comal.batch_unit", "pairs", "--adam.betas", "0.9", "0.95", "--adam.weight_decay", "0"]
        cmd += ["--ckpt.output_dir", str(work / "final"), "--ckpt.path", str(work / "ckpt")]
        cmd += ["--comal.algo", algo, "--comal.iterations", "24"] + extra
        # the demo's optimizer setting: at lr 1e-2 a fresh Adam state per iteration can throw the tiny policy's mass
        # off the options (its first steps move every weight by about lr, whatever the gradient)
        cmd += ["--comal.keep_optimizer_state"]
        work.mkdir()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        log = open(work / "train.log", "w")
        return subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT), work

    runs = {
        "comal": launch("comal", ["--comal.ref_weight", "0.6", "--comal.ref_update_interval", "4"]),
        "iter-ipo": launch("iter-ipo", []),
    }
    tok = AutoTokenizer.from_pretrained(policy)
    text = tok.apply_chat_template(
        [{"role": "user", "content": DEMO_PROMPT}], tokenize=False, add_generation_prompt=True
    )
    gaps = {}
    for algo, (proc, work) in runs.items():
        assert proc.wait(timeout=1200) == 0, (work / "train.log").read_text()[-4000:]
        model = AutoModelForCausalLM.from_pretrained(str(work / "final"))
        rep = game_report(model, tok, text, P, OPTIONS)
        gaps[algo] = rep["duality_gap"]
        assert rep["invalid_mass"] < 0.1, rep
    print(f"final duality gaps on the induced game: {gaps}")
    assert gaps["comal"] < 0.05, gaps  # the induced Nash is uniform; the start (0.6, 0.3, 0.1) has gap 0.36
    assert gaps["iter-ipo"] > 0.2, gaps
