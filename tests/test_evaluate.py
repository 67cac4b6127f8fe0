"""python -m comal_openrlhf.cli.evaluate: win-rate matrix with bootstrap intervals, exploitability estimate, exact game
mode, caching (kill and resume), and the in-memory ``winrate`` for the trainer."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from _util import REPO, run_cmd, write_jsonl

from comal_openrlhf.cli.evaluate import parse_policy_specs
from comal_openrlhf.core.judging import Judge, TableJudge
from comal_openrlhf.errors import BadInputError, ImpossibleResultError, JudgeError
from comal_openrlhf.eval import exact as exact_module
from comal_openrlhf.eval.exact import exact_matrix, extended_game, game_report, option_ids
from comal_openrlhf.eval.report import strict_json
from comal_openrlhf.eval.winrate import bootstrap_mean, compare, exploitability, head_to_head, new_counts, winrate
from comal_openrlhf.judges.cache import CachedJudge

EPS = np.finfo(np.float64).eps
PROMPT = "question pick one ?"


def paper_judge():
    return TableJudge.load("paper")


class CountingJudge(Judge):
    """The paper's table, counting the comparisons it is asked; fails on responses listed in ``fail``."""

    name = "counting"

    def __init__(self, fail=()):
        self.inner, self.asked, self.fail = paper_judge(), 0, set(fail)

    def _prob(self, prompts, a, b):
        if self.fail & (set(a) | set(b)):
            raise JudgeError("judge 'counting' is down for this response")
        self.asked += len(a)
        return self.inner.prob(prompts, a, b)


# ----------------------------------------------------------------------------------------------- statistics


def test_bootstrap_of_constant_values_has_zero_width():
    est, lo, hi = bootstrap_mean(np.full((7, 3), 0.25), n_boot=200)
    assert est == lo == hi == 0.25


def test_bootstrap_of_complement_is_mirrored():
    rng = np.random.default_rng(3)
    v = rng.random((9, 4))
    e1, lo1, hi1 = bootstrap_mean(v, 500, 0.9, np.random.default_rng(11))
    e2, lo2, hi2 = bootstrap_mean(1 - v, 500, 0.9, np.random.default_rng(11))
    # same resampling indices: every bootstrap mean is mirrored, so are the quantiles (up to rounding of 36 terms)
    tol = 8 * EPS * math.sqrt(36)
    assert abs(e1 + e2 - 1) < tol and abs(lo1 + hi2 - 1) < tol and abs(hi1 + lo2 - 1) < tol
    assert lo1 <= e1 <= hi1


def test_bootstrap_leaves_out_missing_values_and_empty_prompts():
    v = np.array([[1.0, np.nan], [np.nan, np.nan], [0.0, 0.5]])
    est, lo, hi = bootstrap_mean(v, 300)
    assert est == (1.0 + 0.25) / 2  # the all-missing prompt is dropped, the missing sample is skipped
    assert 0.0 <= lo <= est <= hi <= 1.0
    assert all(math.isnan(x) for x in bootstrap_mean(np.full((2, 2), np.nan), 10))


def test_bootstrap_with_one_prompt_resamples_its_samples():
    v = np.array([[0.0, 1.0] * 50])
    est, lo, hi = bootstrap_mean(v, 2000, 0.95, np.random.default_rng(0))
    # binomial standard error sqrt(0.25 / 100) = 0.05: the 95% interval is about +-0.098
    assert est == 0.5 and 0.05 < est - lo < 0.15 and 0.05 < hi - est < 0.15


# --------------------------------------------------------------------------------------------- comparisons


def test_compare_counts_empty_identical_and_judge_failures():
    j = CountingJudge(fail={"c"})
    counts, errors = new_counts(), []
    a = ["b", "", "", "a", "c", "a"]
    b = ["a", "a", " ", "a", "a", "b"]
    p = compare(j, [PROMPT] * 6, a, b, both_orders=True, counts=counts, errors=errors)
    # both orders: (p(a, b) + 1 - p(b, a)) / 2, three roundings
    assert abs(p[0] - 0.9) < 4 * EPS and abs(p[5] - 0.1) < 4 * EPS
    assert p[1] == 0.0 and p[2] == 0.5 and p[3] == 0.5 and math.isnan(p[4])
    assert counts == {
        "comparisons": 6,
        "wins": 1,
        "ties": 2,
        "losses": 2,
        "judge_failures": 1,
        "empty_a": 2,
        "empty_b": 1,
        "identical": 1,
    }
    assert "down" in errors[0]
    assert j.asked == 2 * 2  # (b, a) and (a, b) in both orders; empty, identical and failing pairs not asked


def test_head_to_head_matrix_is_exact_on_fixed_samples():
    s = {"x": [["b", "b"], ["a", "c"]], "y": [["a", "a"], ["a", "b"]], "z": [["c", "c"], ["c", "c"]]}
    m = head_to_head(s, [PROMPT, PROMPT], paper_judge(), n_boot=300)
    cells = m["cells"]
    P = paper_judge().P
    ix = {"a": 0, "b": 1, "c": 2}

    def exact(r, c):
        per = [np.mean([P[ix[s[r][p][i]], ix[s[c][p][i]]] for i in range(2)]) for p in range(2)]
        return float(np.mean(per))

    for r in s:
        assert cells[r][r]["winrate"] == 0.5
        for c in s:
            if r != c:
                assert abs(cells[r][c]["winrate"] - exact(r, c)) < 8 * EPS
                assert abs(cells[r][c]["winrate"] + cells[c][r]["winrate"] - 1) < 8 * EPS
                assert abs(cells[r][c]["ci_low"] + cells[c][r]["ci_high"] - 1) < 8 * EPS
        row = [0.5] + [exact(r, c) for c in s if c != r]
        assert abs(m["avg"][r]["winrate"] - np.mean(row)) < 8 * EPS


def test_exploitability_picks_the_best_candidate():
    # scores against the reference a, b, a, c: a 0.475, b 0.6, c 0.45, so b; opponents fixed, so E is exact
    cands = [["a", "b", "a", "c"]]
    opps = [["a", "a", "b", "c"]]
    e = exploitability(paper_judge(), [PROMPT], cands, cands, opps, n_boot=200)
    assert e["best_of_m_winrate"] == pytest.approx((0.9 + 0.9 + 0.5 + 0.1) / 4, abs=8 * EPS)  # b ties b
    assert e["gap_estimate"] == pytest.approx(2 * e["best_of_m_winrate"] - 1, abs=8 * EPS)
    assert e["m"] == 4 and e["opponents"] == 4 and e["best_responses"] == ["b"]


def test_exploitability_of_a_deterministic_policy_needs_other_candidates():
    """A policy that always answers a: its own samples hold no better response (estimate 0), the pool of another
    policy's samples holds b, the best response: 2 * 0.9 - 1 = 0.8, the exact gap."""
    own = [["a"] * 4]
    alone = exploitability(paper_judge(), [PROMPT], own, own, own, n_boot=100)
    assert alone["gap_estimate"] == 0.0
    pooled = exploitability(paper_judge(), [PROMPT], [["a"] * 4 + ["c", "b", "a", "c"]], own, own, n_boot=100)
    assert pooled["best_responses"] == ["b"] and abs(pooled["gap_estimate"] - 0.8) < 8 * EPS


def test_exact_matrix_of_the_extended_game():
    P = paper_judge().P
    Q = extended_game(P)
    assert np.allclose(Q + Q.T, 1.0)
    q = {"u": [[0.5, 0.3, 0.1, 0.1]], "v": [[0.2, 0.2, 0.6, 0.0]]}
    m = exact_matrix(q, P)
    expect = np.array(q["u"][0]) @ Q @ np.array(q["v"][0])
    assert abs(m["u"]["v"] - expect) < 8 * EPS and abs(m["u"]["v"] + m["v"]["u"] - 1) < 8 * EPS
    assert abs(m["u"]["u"] - 0.5) < 8 * EPS


def test_option_sequences_must_extend_the_prompt_by_the_label():
    # without the chat template the demo's prompt ends in "?" and "?a" is one unknown token for every label:
    # each option then read the same sequence's probability, the total exceeded 1 and a win rate of 448% came out
    from comal_openrlhf.tiny import DEFAULT_WORDS, build_tokenizer

    tok = build_tokenizer(tuple(DEFAULT_WORDS) + ("b", "c"))
    with pytest.raises(BadInputError, match=r"option 'a' after the prompt 'question pick one \?'.*not a prefix"):
        option_ids(tok, PROMPT, ["a", "b", "c"])
    with pytest.raises(BadInputError, match=r"option 'zebra'.*not the label then EOS.*--data.apply_chat_template"):
        option_ids(tok, PROMPT + " ", ["a", "zebra"])
    prompt_ids, seqs = option_ids(tok, PROMPT + " ", ["a", "b", "c"])
    assert all(s[: len(prompt_ids)] == prompt_ids and s[-1] == tok.eos_token_id for s in seqs)
    templated = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
    )
    option_ids(tok, templated, ["a", "b", "c"])


def test_options_with_more_than_all_the_mass_are_an_error(monkeypatch):
    monkeypatch.setattr(exact_module, "option_logps", lambda *a: np.log([0.6, 0.6, 0.6]))
    with pytest.raises(ImpossibleResultError, match=r"total probability 1.8000 > 1"):
        game_report(None, None, PROMPT, paper_judge().P, ["a", "b", "c"])
    monkeypatch.setattr(exact_module, "option_logps", lambda *a: np.log([0.3, 0.3, 0.3]))
    rep = game_report(None, None, PROMPT, paper_judge().P, ["a", "b", "c"])
    assert rep["invalid_mass"] == pytest.approx(0.1) and 0 <= rep["duality_gap"] <= 1


def test_exact_matrix_refuses_rows_that_are_not_distributions():
    P = paper_judge().P
    good = {"x": [[0.5, 0.3, 0.1, 0.1]], "y": [[0.2, 0.2, 0.2, 0.4]]}
    exact_matrix(good, P)
    with pytest.raises(ImpossibleResultError, match="is not a probability"):
        exact_matrix({"x": [[3.0, 0.0, 0.0, 0.0]], "y": [[0.0, 3.0, 0.0, 0.0]]}, P)


def test_cached_judge_answers_from_disk_and_repairs_a_torn_line(tmp_path):
    path = str(tmp_path / "j.jsonl")
    inner = CountingJudge()
    cj = CachedJudge(inner, path)
    cj.prob([PROMPT] * 3, ["a", "b", "a"], ["b", "c", "b"])
    assert inner.asked == 2 and cj.calls == 2 and cj.hits == 1
    with open(path, "a") as f:
        f.write('{"k": "torn')  # a process killed mid-write
    inner2 = CountingJudge()
    cj2 = CachedJudge(inner2, path)
    assert list(cj2.prob([PROMPT], ["b"], ["c"])) == [0.1] and inner2.asked == 0  # the table's entry, stored
    cj2.prob([PROMPT], ["c"], ["a"])
    assert inner2.asked == 1 and all(json.loads(x) for x in open(path))


def test_strict_json_has_no_nan_tokens():

    out = json.dumps(strict_json({"a": [math.nan, 1.0, {"b": math.inf}], "c": "x"}), allow_nan=False)
    assert out == '{"a": [null, 1.0, {"b": null}], "c": "x"}'


def test_policy_specs():
    assert parse_policy_specs(["a=/x/y", "/m/sft/"]) == [("a", "/x/y"), ("sft", "/m/sft/")]
    with pytest.raises(ValueError, match="duplicate"):
        parse_policy_specs(["/a/m", "/b/m"])


# ------------------------------------------------------------------------------- tiny game models (integration)


@pytest.fixture(scope="module")
def game_models(tmp_path_factory):
    """SFT'd tiny Llamas on the paper game: skewed (0.6, 0.3, 0.1), Nash (4/11, 3/11, 4/11), and a prompts file."""
    from comal_openrlhf.cli.demo import sft_warm_start
    from comal_openrlhf.tiny import DEFAULT_WORDS, build_tiny_llama

    root = tmp_path_factory.mktemp("game_models")
    out = {}
    for name, target in (("skew", [0.6, 0.3, 0.1]), ("nash", [4 / 11, 3 / 11, 4 / 11])):
        path = build_tiny_llama(str(root / name), words=tuple(DEFAULT_WORDS) + ("b", "c"), seed=0)
        sft_warm_start(path, ["a", "b", "c"], target, 0)
        out[name] = path
    out["prompts"] = write_jsonl(root / "prompts.jsonl", [{"prompt": PROMPT}])
    return out


def _eval_cmd(models, out, *extra, policies=("skew", "nash"), prompts=None):
    cmd = [sys.executable, "-m", "comal_openrlhf.cli.evaluate", "--policies"]
    cmd += [f"{p}={models[p]}" for p in policies]
    cmd += ["--data.dataset", prompts or models["prompts"], "--data.apply_chat_template"]
    cmd += ["--judge.kind", "table", "--judge.table", "paper", "--rollout.max_new_tokens", "3"]
    cmd += ["--rollout.temperature", "1.0", "--rollout.top_p", "1.0", "--out", str(out), "--json"]
    return cmd + [str(x) for x in extra]


@pytest.mark.integration
def test_evaluate_brackets_the_exact_gap_and_resumes_from_cache(tmp_path, game_models):
    out = tmp_path / "ev"
    extra = ["--rollout.n_samples_per_prompt", 32, "--eval.exploit_m", 32, "--eval.exploit_samples", 400]
    # 99.9% intervals: a check that fails by chance once in a thousand runs, not once in twenty
    extra += ["--eval.level", 0.999, "--eval.bootstrap", 2000]
    p = run_cmd(_eval_cmd(game_models, out, *extra), cwd=REPO, timeout=600)
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1, p.stdout[-2000:]  # --json: one JSON object, nothing else
    rep = json.loads(lines[0])
    exact = rep["exact"]["policies"]
    assert exact["skew"]["duality_gap"] == pytest.approx(0.4, abs=0.02)  # SFT to (0.6, 0.3, 0.1)
    assert exact["nash"]["duality_gap"] < 0.02
    for name in ("skew", "nash"):
        e = rep["exploitability"][name]
        assert e["gap_ci_low"] <= exact[name]["duality_gap_with_invalid"] <= e["gap_ci_high"], (name, e, exact[name])
    cell = rep["matrix"]["cells"]["skew"]["nash"]
    assert cell["ci_low"] <= rep["exact"]["matrix"]["skew"]["nash"] <= cell["ci_high"]
    assert cell["counts"]["comparisons"] == 32 and cell["prompts"] == 1
    for f in ("matrix.csv", "results.json", "heatmap.png", "matrix.md"):
        assert (out / f).stat().st_size > 100
    csv_rows = (out / "matrix.csv").read_text().splitlines()
    assert len(csv_rows) == 1 + 2 * 3  # header, then per row: 2 columns + avg
    total = rep["work"]["generated"]
    assert total == 2 * (32 + 400) and rep["work"]["generated_cached"] == 0

    # a rerun does no new work; one more policy generates only its own samples and judges only its new pairs
    rep2 = json.loads(run_cmd(_eval_cmd(game_models, out, *extra), cwd=REPO).stdout)
    assert rep2["work"]["generated"] == 0 and rep2["work"]["judged"] == 0
    assert rep2["matrix"]["cells"] == rep["matrix"]["cells"]
    more = {**game_models, "copy": game_models["skew"]}  # a third policy (same weights, its own samples)
    cmd3 = _eval_cmd(more, out, *extra, policies=("skew", "nash", "copy"))
    rep3 = json.loads(run_cmd(cmd3, cwd=REPO).stdout)
    assert rep3["work"]["generated"] == 32 + 400 and rep3["work"]["generated_cached"] == total


@pytest.mark.integration
def test_killed_evaluate_resumes_from_its_cache(tmp_path, game_models):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": PROMPT} for _ in range(40)])
    out = tmp_path / "ev"
    extra = ["--rollout.n_samples_per_prompt", 4, "--rollout.generate_batch_size", 1, "--eval.exploit_m", 0]
    cmd = _eval_cmd(game_models, out, *extra, prompts=prompts)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    gen_dir = out / "cache" / "generations"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        files = list(gen_dir.glob("*.jsonl")) if gen_dir.exists() else []
        if files and sum(len(f.read_text().splitlines()) for f in files) >= 8:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "evaluate finished before it could be killed"
    done = sum(len(f.read_text().splitlines()) for f in gen_dir.glob("*.jsonl"))
    assert 0 < done < 2 * 40 * 4
    rep = json.loads(run_cmd(cmd, cwd=REPO).stdout)
    w = rep["work"]
    assert w["generated_cached"] >= done - 4 and w["generated"] + w["generated_cached"] == 2 * 40 * 4
    assert rep["matrix"]["cells"]["skew"]["nash"]["counts"]["comparisons"] == 40 * 4


@pytest.mark.integration
def test_winrate_on_in_memory_models(game_models):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(game_models["skew"])
    skew = AutoModelForCausalLM.from_pretrained(game_models["skew"])
    text = tok.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True)
    torch.manual_seed(0)
    # against fixed opponent samples (all "a"): P(skew beats a) = 0.6 * 0.5 + 0.3 * 0.9 + 0.1 * 0.2 = 0.59 exactly
    opp = [["a"] * 200]
    r = winrate(
        skew,
        opp,
        [text],
        paper_judge(),
        tok,
        judge_prompts=[PROMPT],
        n_samples=200,
        max_new_tokens=3,
        level=0.999,
        n_boot=2000,
    )
    assert r.ci_low <= 0.59 <= r.ci_high and r.ci_high - r.ci_low < 0.2
    assert r.counts["comparisons"] == 200 and len(r.counts["samples_a"][0]) == 200
    fixed = winrate([["b"] * 3], [["a"] * 3], [text], paper_judge(), tok, n_samples=3)
    assert fixed.mean == fixed.ci_low == fixed.ci_high and abs(fixed.mean - 0.9) < 4 * EPS  # both orders averaged


@pytest.mark.integration
def test_bad_input_is_one_message_not_a_traceback(tmp_path, tiny_model):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"question": PROMPT}])
    cmd = [sys.executable, "-m", "comal_openrlhf.cli.evaluate", "--policies", tiny_model, "--data.dataset", prompts]
    cmd += ["--judge.kind", "table", "--judge.table", "paper", "--out", str(tmp_path / "ev"), "--json"]
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stdout == ""
    assert "missing prompt key 'prompt'" in p.stderr and "Traceback" not in p.stderr
