"""Pair building on hand-made win matrices (table judges), with the win-rate arithmetic written out."""

import itertools
import math

import numpy as np
import pytest

from comal_openrlhf.judges.base import Judge
from comal_openrlhf.judges.table import TableJudge
from comal_openrlhf.pairs import RULES, Pair, build_pairs, sampled_law, win_matrix

# P[i][j] = P(i beats j) over w, x, y, z
P4 = [
    [0.5, 0.6, 0.8, 0.9],
    [0.4, 0.5, 0.7, 0.6],
    [0.2, 0.3, 0.5, 0.55],
    [0.1, 0.4, 0.45, 0.5],
]
JUDGE = TableJudge(P4, ["w", "x", "y", "z"])
# one sample of each: winrate_i = (sum_j P[i][j] - 1/2) / 3
#   w: (0.6 + 0.8 + 0.9) / 3 = 0.7667   x: (0.4 + 0.7 + 0.6) / 3 = 0.5667
#   y: (0.2 + 0.3 + 0.55) / 3 = 0.35    z: (0.1 + 0.4 + 0.45) / 3 = 0.3167
WINRATE = {"w": 2.3 / 3, "x": 1.7 / 3, "y": 1.05 / 3, "z": 0.95 / 3}


class CountingJudge(Judge):
    """Wraps a judge and records the batch size of every call."""

    def __init__(self, inner):
        self.inner, self.calls, self.name = inner, [], "counting"

    def _prob(self, prompts, a, b):
        self.calls.append(len(prompts))
        return self.inner.prob(prompts, a, b)


def test_win_matrix():
    W = win_matrix(JUDGE, "q", ["z", "w", "y"])
    np.testing.assert_allclose(W, [[0.5, 0.1, 0.45], [0.9, 0.5, 0.8], [0.55, 0.2, 0.5]], atol=1e-12)
    np.testing.assert_allclose(W + W.T, 1.0)


@pytest.mark.parametrize("rule, chosen, rejected", [("top2", "w", "x"), ("best_worst", "w", "z")])
def test_hard_rules(rule, chosen, rejected):
    pairs, stats = build_pairs([("q", ["y", "z", "x", "w"])], JUDGE, rule)
    assert pairs == [
        Pair(
            "q",
            chosen,
            rejected,
            chosen_winrate=pytest.approx(WINRATE[chosen]),
            rejected_winrate=pytest.approx(WINRATE[rejected]),
            soft_label=pytest.approx(float("nan"), nan_ok=True),
        )
    ]
    assert stats.pairs == 1 and stats.judge_calls == 12  # 6 unordered pairs, both orders


def test_all_soft_labels_are_judge_probabilities():
    pairs, stats = build_pairs([("q", ["z", "w", "y"])], JUDGE, "all_soft")
    got = {(p.chosen, p.rejected): p.soft_label for p in pairs}
    assert got == {("w", "z"): pytest.approx(0.9), ("y", "z"): pytest.approx(0.55), ("w", "y"): pytest.approx(0.8)}
    assert all(p.weight == pytest.approx(1 / 3) for p in pairs)
    assert stats.pairs == 3


def test_duplicates_invalid_and_dropped_prompts():
    groups = [
        ("q1", ["x", "w", "x", "x", "   ", None, ""]),  # 3 invalid; x x x -> one x (2 merged)
        ("q2", ["y", "y", "\n"]),  # one distinct valid response: dropped
        ("q3", [None, ""]),  # none valid: dropped
        ("q4", ["z", "y"]),
    ]
    judge = CountingJudge(JUDGE)
    pairs, stats = build_pairs(groups, judge, "top2")
    assert stats.as_dict() == {
        "prompts": 4,
        "prompts_dropped": 2,
        "responses": 14,
        "invalid_responses": 6,
        "duplicates_merged": 3,
        "pairs": 2,
        "judge_calls": 4,  # one unordered pair in q1 and one in q4, both orders
    }
    assert judge.calls == [4]  # every prompt in one batched call
    # q1 samples: x, w, x, x (N = 4). Duplicates count as in mu_k, a copy of itself ties at 1/2:
    #   w: 3 * P(w>x) / 3 = 0.6;   x: (P(x>w) + 2 * 0.5) / 3 = 1.4 / 3
    assert (pairs[0].chosen, pairs[0].rejected) == ("w", "x")
    assert pairs[0].chosen_winrate == pytest.approx(0.6) and pairs[0].rejected_winrate == pytest.approx(1.4 / 3)
    assert (pairs[1].prompt, pairs[1].chosen, pairs[1].rejected) == ("q4", "y", "z")


def test_sampled_follows_counts_and_judge_probability():
    # samples w, w, x, y: unordered pairs drawn with weight c_i c_j: {w,x} 2, {w,y} 2, {x,y} 1 -> 0.4, 0.4, 0.2;
    # within a pair the chosen one is drawn with the judge probability, e.g. P(w beats x) = 0.6
    n = 4000
    pairs, stats = build_pairs(
        [("q", ["w", "w", "x", "y"])], JUDGE, "sampled", np.random.default_rng(0), pairs_per_prompt=n
    )
    assert stats.pairs == n and all(math.isnan(p.soft_label) and p.chosen != p.rejected for p in pairs)
    assert all(p.weight == pytest.approx(5 / 6 / n) for p in pairs)  # (16 - 6) / 12 split over n draws
    freq = {}
    for p in pairs:
        key = frozenset((p.chosen, p.rejected))
        freq.setdefault(key, []).append(p.chosen)
    expect = {("w", "x"): (0.4, 0.6), ("w", "y"): (0.4, 0.8), ("x", "y"): (0.2, 0.7)}
    for (u, v), (share, p_win) in expect.items():
        chosen = freq[frozenset((u, v))]
        # binomial standard errors are below 0.01 (share) and 0.02 (win): 0.05 is a loose bound
        assert abs(len(chosen) / n - share) < 0.05
        assert abs(np.mean([c == u for c in chosen]) - p_win) < 0.05


def test_all_soft_weights_by_hand():
    # q1: z, w, y once each (N = 3): 2 * 1 * 1 / (3 * 2) = 1/3 per unordered pair.
    # q2: w, w, x, y (N = 4, counts 2, 1, 1): {w,x} 2*2*1/12 = 1/3, {w,y} 1/3, {x,y} 2*1*1/12 = 1/6.
    # q3: w, w, w, x (N = 4): {w,x} 2*3*1/12 = 1/2. No per-prompt normalisation: the sums are 1, 5/6 and 1/2,
    # the share of ordered pairs of sample positions that hold distinct strings.
    groups = [("q1", ["z", "w", "y"]), ("q2", ["w", "w", "x", "y"]), ("q3", ["w", "w", "w", "x"])]
    pairs, _ = build_pairs(groups, JUDGE, "all_soft")
    got = {(p.prompt, p.chosen, p.rejected): p.weight for p in pairs}
    assert got == {
        ("q1", "w", "z"): pytest.approx(1 / 3),
        ("q1", "y", "z"): pytest.approx(1 / 3),
        ("q1", "w", "y"): pytest.approx(1 / 3),
        ("q2", "w", "x"): pytest.approx(1 / 3),
        ("q2", "w", "y"): pytest.approx(1 / 3),
        ("q2", "x", "y"): pytest.approx(1 / 6),
        ("q3", "w", "x"): pytest.approx(1 / 2),
    }


def test_sampled_weights_by_hand():
    # one draw of weight (N^2 - sum c^2) / (N (N - 1)) per prompt, split over pairs_per_prompt draws:
    #   w, w, x, y: (16 - 6) / 12 = 5/6;  w, w, w, x: (16 - 10) / 12 = 1/2;  z, w, y: (9 - 3) / 6 = 1
    groups = [("q2", ["w", "w", "x", "y"]), ("q3", ["w", "w", "w", "x"]), ("q1", ["z", "w", "y"])]
    for m in (1, 3):
        pairs, _ = build_pairs(groups, JUDGE, "sampled", np.random.default_rng(1), pairs_per_prompt=m)
        assert [p.prompt for p in pairs] == ["q2"] * m + ["q3"] * m + ["q1"] * m
        assert [p.weight for p in pairs] == pytest.approx([5 / 6 / m] * m + [1 / 2 / m] * m + [1 / m] * m)
    with pytest.raises(ValueError, match="pairs_per_prompt"):
        build_pairs(groups, JUDGE, "sampled", np.random.default_rng(1), pairs_per_prompt=0)


def test_sampled_law_by_hand():
    # counts w 2, x 1, y 1 (N = 4): N^2 - sum c^2 = 10; P(draw {w,x}) = 2*2*1/10 = 0.4, then w wins with 0.6
    W = win_matrix(JUDGE, "q", ["w", "x", "y"])
    law, weight = sampled_law([2, 1, 1], W)
    want = [[0, 0.4 * 0.6, 0.4 * 0.8], [0.4 * 0.4, 0, 0.2 * 0.7], [0.4 * 0.2, 0.2 * 0.3, 0]]
    np.testing.assert_allclose(law, want, atol=1e-15)
    assert weight == pytest.approx(10 / 12)


@pytest.mark.parametrize("n_samples", [2, 3, 4])
def test_weighted_pairs_are_unbiased_for_mu_times_mu(n_samples):
    # Over every sequence of N samples from mu (probability prod mu), the expected weighted "a beats b" mass of the
    # pairs must equal that of y, y' ~ mu x mu labelled by P: 2 mu_a mu_b P[a][b] for a != b (both orders). Every
    # pair loss (ipo, dpo, rebel) is linear in that mass, so the expected weighted loss is the prox loss's.
    mu = np.array([0.5, 0.3, 0.2])
    labels = ["w", "x", "y"]
    P = np.array(P4)[:3, :3]
    seqs = list(itertools.product(range(3), repeat=n_samples))
    prob = {str(s): float(np.prod(mu[list(s)])) for s in seqs}  # by prompt name
    want = 2 * np.outer(mu, mu) * P
    np.fill_diagonal(want, 0.0)
    idx = {lab: i for i, lab in enumerate(labels)}

    pairs, _ = build_pairs([(str(s), [labels[i] for i in s]) for s in seqs], JUDGE, "all_soft")
    got = np.zeros((3, 3))
    for p in pairs:
        i, j = idx[p.chosen], idx[p.rejected]
        got[i, j] += prob[p.prompt] * p.weight * p.soft_label
        got[j, i] += prob[p.prompt] * p.weight * (1 - p.soft_label)
    np.testing.assert_allclose(got, want, atol=1e-13)  # 81 terms < 1, a few roundings each

    got = np.zeros((3, 3))
    for s in seqs:
        counts = np.bincount(s, minlength=3)
        present = [i for i in range(3) if counts[i]]
        if len(present) < 2:
            continue
        law, weight = sampled_law(counts[present], P[np.ix_(present, present)])
        got[np.ix_(present, present)] += prob[str(s)] * weight * law
    np.testing.assert_allclose(got, want, atol=1e-13)  # 81 terms < 1, a few roundings each


def test_single_order_keeps_position_bias():
    class Biased(Judge):
        name = "biased"

        def _prob(self, prompts, a, b):
            return JUDGE.prob(prompts, a, b) + 0.1  # whoever sits in position a gets +0.1

    assert win_matrix(Biased(), "q", ["w", "x"], both_orders=False)[0, 1] == pytest.approx(0.7)
    # (p(w, x) + 1 - p(x, w)) / 2 = (0.7 + 1 - 0.5) / 2 = 0.6 = P(w > x)
    assert win_matrix(Biased(), "q", ["w", "x"])[0, 1] == pytest.approx(0.6)


def test_bad_rule_and_missing_rng():
    assert RULES == ("top2", "best_worst", "sampled", "all_soft")
    with pytest.raises(ValueError, match="unknown pair rule"):
        build_pairs([("q", ["w", "x"])], JUDGE, "best_of_n")
    with pytest.raises(ValueError, match="needs rng"):
        build_pairs([("q", ["w", "x"])], JUDGE, "sampled")
