"""Judges: every kind behind the one interface P(a beats b | prompt), its checks and its flags."""

import argparse
import json

import numpy as np
import pytest

from comal_openrlhf.core.judging import TableJudge, load_table
from comal_openrlhf.judges import JudgeError, MixtureJudge, add_judge_args, build_judge, check_probs, judge_pairs

# P[i][j] = P(label i beats label j): x > y > z but z > x (a cycle, not Bradley-Terry)
XYZ = {"P": [[0.5, 0.7, 0.4], [0.3, 0.5, 0.6], [0.6, 0.4, 0.5]], "labels": ["x", "y", "z"]}


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def python_judge(tmp_path, body, name="judge.py"):
    path = write(tmp_path, name, "import math\n\ndef judge(prompts, responses_a, responses_b):\n" + body)
    return build_judge({"kind": "python", "path": path, "allow_python_code": True}), path


# ---- base checks ----


def test_check_probs_clips_within_tolerance_and_names_the_judge():
    np.testing.assert_array_equal(check_probs("j", [0.0, 1 + 1e-9, -1e-9, 0.25], 4), [0.0, 1.0, 0.0, 0.25])
    for bad, what in [([0.5, float("nan")], "non-finite"), ([0.5, 1.1], "outside"), ([0.5], "expected 2")]:
        with pytest.raises(JudgeError, match=f"'my-judge'.*{what}"):
            check_probs("my-judge", bad, 2)


def test_judge_pairs_batches_and_orders():
    judge = TableJudge(XYZ["P"], XYZ["labels"])
    a, b = ["x", "y", "z", "x", "y"], ["y", "z", "x", "z", "x"]
    want = [0.7, 0.6, 0.6, 0.4, 0.3]
    for both in (True, False):
        np.testing.assert_allclose(judge_pairs(judge, ["q"] * 5, a, b, both_orders=both, batch_size=2), want)


def test_both_orders_cancels_position_bias_exactly(tmp_path):
    # a toy judge that adds 0.1 for whoever sits in position a: p(a, b) = P(a > b) + 0.1
    body = "    t = {('x','y'): .7, ('y','x'): .3, ('x','z'): .4, ('z','x'): .6}\n"
    body += "    return [t[(a, b)] + 0.1 for a, b in zip(responses_a, responses_b)]\n"
    judge, _ = python_judge(tmp_path, body)
    a, b = ["x", "y", "x", "z"], ["y", "x", "z", "x"]
    np.testing.assert_allclose(judge_pairs(judge, ["q"] * 4, a, b, both_orders=False), [0.8, 0.4, 0.5, 0.7])
    # (p(a,b) + 1 - p(b,a)) / 2 = (t + 0.1 + 1 - (1 - t + 0.1)) / 2 = t
    np.testing.assert_allclose(judge_pairs(judge, ["q"] * 4, a, b), [0.7, 0.3, 0.4, 0.6], atol=1e-12)


# ---- table ----


def test_table_judge_matches_matrix_and_invalid_responses_lose(tmp_path):
    path = write(tmp_path, "game.json", json.dumps(XYZ))
    judge = build_judge({"kind": "table", "table": path})
    a = ["x", " y\n", "z", "x", "nonsense", "", "nonsense"]
    b = ["y", "z", "x", "x", "x", "z", "other"]
    np.testing.assert_allclose(judge.prob(["q"] * 7, a, b), [0.7, 0.6, 0.6, 0.5, 0.0, 0.0, 0.5])
    np.testing.assert_allclose(judge.prob(["q"], ["y"], [None]), [1.0])


def test_paper_table():
    judge = build_judge({"kind": "table", "table": "paper"})
    np.testing.assert_allclose(judge.prob(["q"] * 3, ["b", "c", "a"], ["a", "b", "c"]), [0.9, 0.9, 0.8])


@pytest.mark.parametrize(
    "table, match",
    [
        ({"P": [[0.5, 0.7]], "labels": ["x"]}, "square"),
        ({"P": [[0.5, 1.2], [-0.2, 0.5]], "labels": ["x", "y"]}, r"P\[0\]\[1\] = 1.2"),
        ({"P": [[0.5, 0.7], [0.4, 0.5]], "labels": ["x", "y"]}, r"P\[0\]\[1\] \+ P\[1\]\[0\]"),
        ({"P": [[0.5, 0.7], [0.3, 0.5]], "labels": ["x", "x"]}, "unique"),
        ({"P": [[0.5, 0.7], [0.3, 0.5]], "labels": ["x"]}, "1 labels"),
        ({"labels": ["x"]}, "'P'"),
    ],
)
def test_table_validation_names_the_entry(tmp_path, table, match):
    path = write(tmp_path, "bad.json", json.dumps(table))
    with pytest.raises(JudgeError, match=match):
        load_table(path)


# ---- python ----


def test_python_judge_runs_user_file(tmp_path):
    judge, _ = python_judge(
        tmp_path, "    return [0.5 + 0.1 * (len(a) > len(b)) for a, b in zip(responses_a, responses_b)]\n"
    )
    np.testing.assert_allclose(judge.prob(["q", "q"], ["long", "s"], ["s", "long"]), [0.6, 0.5])


def test_python_judge_refused_without_opt_in(tmp_path):
    path = write(tmp_path, "judge.py", "raise SystemExit('must not run')\n")
    with pytest.raises(JudgeError, match="allow_python_code"):
        build_judge({"kind": "python", "path": path})


@pytest.mark.parametrize(
    "body, match",
    [
        ("    return [math.nan] * len(prompts)\n", "non-finite"),
        ("    return [1.5] * len(prompts)\n", "outside"),
        ("    return [0.5]\n", "expected 3"),
        ("    raise KeyError('boom')\n", "KeyError"),
    ],
)
def test_python_judge_bad_output_names_the_judge(tmp_path, body, match):
    judge, path = python_judge(tmp_path, body)
    with pytest.raises(JudgeError, match=match) as e:
        judge.prob(["q"] * 3, ["a"] * 3, ["b"] * 3)
    assert path in str(e.value)


# ---- mixture ----


def test_mixture_weights_are_normalised(tmp_path):
    const = write(tmp_path, "const.json", json.dumps({"P": [[0.5, 0.2], [0.8, 0.5]], "labels": ["a", "b"]}))
    # the paper game gives P(a > b) = 0.1, const.json gives 0.2: weights 1:3 -> 0.25 * 0.1 + 0.75 * 0.2 = 0.175
    inline = build_judge({"kind": "mixture", "mixture": f"table:paper:1,table:{const}:3"})
    spec = [{"kind": "table", "table": "paper", "weight": 1}, {"kind": "table", "table": const, "weight": 3}]
    from_file = build_judge({"kind": "mixture", "mixture": write(tmp_path, "mix.json", json.dumps(spec))})
    for judge in (inline, from_file):
        assert isinstance(judge, MixtureJudge) and judge.weights == [0.25, 0.75]
        np.testing.assert_allclose(judge.prob(["q", "q"], ["a", "b"], ["b", "a"]), [0.175, 0.825])


def test_mixture_rejects_bad_weights():
    judge = build_judge({"kind": "table", "table": "paper"})
    for w in (0.0, -1.0, float("nan")):
        with pytest.raises(JudgeError, match="must be > 0"):
            MixtureJudge([judge, judge], [1.0, w])
    with pytest.raises(JudgeError, match="KIND:TARGET:WEIGHT"):
        build_judge({"kind": "mixture", "mixture": "table:paper"})


# ---- flags ----


def test_flags_hierarchize_into_args_judge(tmp_path):
    from openrlhf.utils.config import hierarchize

    parser = add_judge_args(argparse.ArgumentParser())
    args = hierarchize(parser.parse_args(["--judge.kind", "table", "--judge.table", "paper", "--judge.single_order"]))
    assert args.judge.kind == "table" and args.judge.single_order and args.judge.labels == "A,B"
    assert build_judge(args.judge).name == "table:paper"
    with pytest.raises(JudgeError, match="--judge.kind must be one of"):
        build_judge({})
    with pytest.raises(JudgeError, match="unknown judge settings"):
        build_judge({"kind": "table", "tabel": "paper"})


# ---- model judges (tiny models built locally) ----


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory):
    from comal_openrlhf.tiny import build_tiny_llama

    return build_tiny_llama(str(tmp_path_factory.mktemp("tiny_rm")), reward_head=True)


PROMPTS = ["question pick one ?"] * 3
A = ["yes good", "no bad", "one two three four"]
B = ["no bad", "yes good", "yes"]


def test_reward_model_judge_is_sigmoid_of_reward_differences(tiny_rm):
    judge = build_judge({"kind": "reward_model", "path": tiny_rm, "temperature": 0.01, "device": "cpu"})
    assert judge.text(PROMPTS[0], "yes good").endswith("good </s>")  # chat template, one EOS
    r_a, r_b = judge.scores(PROMPTS, A), judge.scores(PROMPTS, B)
    assert np.ptp(np.concatenate([r_a, r_b])) > 0  # a random head still tells texts apart
    p = judge.prob(PROMPTS, A, B)
    np.testing.assert_allclose(p, 1 / (1 + np.exp(-(r_a - r_b) / 0.01)), rtol=1e-6)
    np.testing.assert_allclose(p + judge.prob(PROMPTS, B, A), 1.0, atol=1e-12)
    np.testing.assert_allclose(judge_pairs(judge, PROMPTS, A, B), p, atol=1e-12)  # already antisymmetric

    calls = []
    scores = judge.scores
    judge.scores = lambda prompts, responses: calls.append(len(prompts)) or scores(prompts, responses)
    judge_pairs(judge, PROMPTS, A, B)
    assert calls == [4]  # 12 comparisons, 4 unique (prompt, response): each scored once


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    from comal_openrlhf.tiny import DEFAULT_WORDS, build_tiny_llama

    return build_tiny_llama(str(tmp_path_factory.mktemp("tiny_judge_lm")), words=list(DEFAULT_WORDS) + ["A", "B"])


def test_pairwise_lm_judge(tiny_lm):
    judge = build_judge({"kind": "pairwise_lm", "path": tiny_lm, "device": "cpu", "batch_size": 2})
    p = judge.prob(PROMPTS, A, B)
    assert p.shape == (3,) and np.all((p > 0) & (p < 1))
    # batching with left padding gives the same numbers as one sequence at a time
    np.testing.assert_allclose(
        [judge.prob(PROMPTS[i : i + 1], A[i : i + 1], B[i : i + 1])[0] for i in range(3)], p, rtol=1e-5
    )
    q_ab, q_ba = judge_pairs(judge, PROMPTS, A, B), judge_pairs(judge, PROMPTS, B, A)
    np.testing.assert_allclose(q_ab + q_ba, 1.0, atol=1e-12)


def test_pairwise_lm_judge_rejects_multi_token_labels_and_bad_templates(tiny_lm):
    with pytest.raises(JudgeError, match="'yes good' is not a single token"):
        build_judge({"kind": "pairwise_lm", "path": tiny_lm, "labels": "A,yes good", "device": "cpu"})
    with pytest.raises(JudgeError, match="lacks {response_b}"):
        build_judge({"kind": "pairwise_lm", "path": tiny_lm, "template": "{prompt} {response_a}", "device": "cpu"})
