"""Pair building on hand-made win matrices (table judges), with the win-rate arithmetic written out."""

import itertools
import math

import numpy as np
import pytest

from comal_openrlhf.core.judging import Judge, TableJudge
from comal_openrlhf.core.pairs import (
    EMPTY,
    RULES,
    Pair,
    build_pairs,
    canonical,
    pair_winrates,
    sampled_law,
    win_matrix,
)

# P[i][j] = P(i beats j) over w, x, y, z
P4 = [
    [0.5, 0.6, 0.8, 0.9],
    [0.4, 0.5, 0.7, 0.6],
    [0.2, 0.3, 0.5, 0.55],
    [0.1, 0.4, 0.45, 0.5],
]
JUDGE = TableJudge(P4, ["w", "x", "y", "z"])
# one sample of each: score_i = (sum_j P[i][j] - 1/2) / 3 ranks them
#   w: (0.6 + 0.8 + 0.9) / 3 = 0.7667   x: (0.4 + 0.7 + 0.6) / 3 = 0.5667
#   y: (0.2 + 0.3 + 0.55) / 3 = 0.35    z: (0.1 + 0.4 + 0.45) / 3 = 0.3167
# a pair's win rates are leave-two-out: the mean P against the two samples outside the pair
#   top2 (w, x): w vs {y, z} (0.8 + 0.9) / 2 = 0.85, x vs {y, z} (0.7 + 0.6) / 2 = 0.65
#   best_worst (w, z): w vs {x, y} (0.6 + 0.8) / 2 = 0.7, z vs {x, y} (0.4 + 0.45) / 2 = 0.425
WINRATES = {"top2": (0.85, 0.65), "best_worst": (0.7, 0.425)}


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
            chosen_winrate=pytest.approx(WINRATES[rule][0]),
            rejected_winrate=pytest.approx(WINRATES[rule][1]),
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


def test_duplicates_invalid_empty_and_dropped_prompts():
    groups = [
        ("q1", ["x", "w", "x", "x", "   ", None, ""]),  # 1 invalid (None); 2 empty -> one ""; x x x -> one x
        ("q2", ["y", "y", "\n"]),  # y and the empty response: a pair, no judge call
        ("q3", [None, ""]),  # only the empty response: dropped
        ("q4", ["z", "y"]),
    ]
    judge = CountingJudge(JUDGE)
    pairs, stats = build_pairs(groups, judge, "top2")
    assert stats.as_dict() == {
        "prompts": 4,
        "prompts_dropped": 1,
        "responses": 14,
        "invalid_responses": 2,
        "empty_responses": 4,
        "duplicates_merged": 3,
        "pairs": 3,
        "judge_calls": 4,  # {w, x} in q1 and {y, z} in q4, both orders; the empty response is never judged
    }
    assert judge.calls == [4]  # every prompt in one batched call
    # q1 samples: x, w, x, x, "", "" (N = 6). Duplicates count as in mu_k, a copy of itself ties at 1/2, the empty
    # response loses to both: scores w (3 * 0.6 + 2) / 5 = 0.76, x (0.4 + 2 * 0.5 + 2) / 5 = 0.68, "" 0.5 / 5.
    # Win rates of the pair (w, x) against the other 4 samples x, x, "", "": w (2 * 0.6 + 2) / 4 = 0.8,
    # x (2 * 0.5 + 2) / 4 = 0.75
    assert (pairs[0].chosen, pairs[0].rejected) == ("w", "x")
    assert pairs[0].chosen_winrate == pytest.approx(0.8) and pairs[0].rejected_winrate == pytest.approx(0.75)
    # q2: y, y, "" (N = 3): the one other sample is y: y ties it (1/2), "" loses to it (0)
    assert (pairs[1].prompt, pairs[1].chosen, pairs[1].rejected) == ("q2", "y", EMPTY)
    assert (pairs[1].chosen_winrate, pairs[1].rejected_winrate) == (0.5, 0.0)
    # q4: N = 2, no sample outside the pair: win rates unknown (sppo and rebel refuse the pair)
    assert (pairs[2].prompt, pairs[2].chosen, pairs[2].rejected) == ("q4", "y", "z")
    assert math.isnan(pairs[2].chosen_winrate) and math.isnan(pairs[2].rejected_winrate)


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


# ---- leave-two-out win rates and the empty response ----------------------------------------------------------------


class NoEmptyJudge(Judge):
    """A table judge that fails if asked about an empty response (build_pairs decides those itself)."""

    name = "no-empty"

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def _prob(self, prompts, a, b):
        assert all(r.strip() for r in list(a) + list(b)), "the judge was asked about an empty response"
        self.calls.append(len(prompts))
        return self.inner.prob(prompts, a, b)


def test_canonical_and_win_matrix_with_an_empty_response():
    assert canonical(None) is None and canonical(3) is None
    assert canonical("") == canonical(" \n\t") == EMPTY and canonical(" w ") == " w "
    judge = NoEmptyJudge(JUDGE)
    W = win_matrix(judge, "q", ["w", "  ", "x", ""])
    # the empty response loses to w and x (P = 0) and ties the other empty one; only {w, x} is judged
    want = [[0.5, 1.0, 0.6, 1.0], [0.0, 0.5, 0.0, 0.5], [0.4, 1.0, 0.5, 1.0], [0.0, 0.5, 0.0, 0.5]]
    np.testing.assert_allclose(W, want, atol=1e-15)
    assert judge.calls == [2]  # one unordered pair, both orders


def test_pair_winrates_by_hand():
    # counts w 2, x 1, y 1 (N = 4); the pair (w, x) leaves one w and the x out: w vs {w, y} = (0.5 + 0.8) / 2,
    # x vs {w, y} = (0.4 + 0.7) / 2; the pair (x, y): x vs {w, w} = 0.4, y vs {w, w} = 0.2
    W = win_matrix(JUDGE, "q", ["w", "x", "y"])
    T = pair_winrates([2, 1, 1], W)
    assert (T[0, 1], T[1, 0]) == pytest.approx((0.65, 0.55))
    assert (T[1, 2], T[2, 1]) == pytest.approx((0.4, 0.2))
    assert np.isnan(pair_winrates([1, 1], W[:2, :2])).all()  # N = 2: no sample outside the pair


def test_two_samples_give_pairs_without_win_rates():
    for rule in RULES:
        pairs, _ = build_pairs([("q", ["x", "w"])], JUDGE, rule, np.random.default_rng(0))
        assert len(pairs) == 1 and {pairs[0].chosen, pairs[0].rejected} == {"w", "x"}
        assert math.isnan(pairs[0].chosen_winrate) and math.isnan(pairs[0].rejected_winrate)
    assert pairs[0].soft_label == pytest.approx(0.6)  # all_soft: ipo and dpo still have their label


def test_all_soft_keeps_empty_responses_as_rejected():
    # samples w, "", x, "  ", w: u = w (2), "" (2), x (1), N = 5 and weights 2 c_i c_j / 20:
    #   {w, ""} 0.4, chosen w with P = 1;  {w, x} 0.2, chosen w with P = 0.6;  {x, ""} 0.2, chosen x with P = 1.
    # Win rates against the 3 samples outside each pair:
    #   (w, ""): others w, "", x: w (0.5 + 1 + 0.6) / 3 = 0.7,   "" (0 + 0.5 + 0) / 3 = 1/6
    #   (w, x):  others w, "", "": w (0.5 + 1 + 1) / 3 = 5/6,    x (0.4 + 1 + 1) / 3 = 0.8
    #   (x, ""): others w, w, "":  x (0.4 + 0.4 + 1) / 3 = 0.6,  "" (0 + 0 + 0.5) / 3 = 1/6
    judge = NoEmptyJudge(JUDGE)
    pairs, stats = build_pairs([("q", ["w", "", "x", "  ", "w"])], judge, "all_soft")
    got = {(p.chosen, p.rejected): (p.soft_label, p.weight, p.chosen_winrate, p.rejected_winrate) for p in pairs}
    assert got == {
        ("w", EMPTY): pytest.approx((1.0, 0.4, 0.7, 1 / 6)),
        ("w", "x"): pytest.approx((0.6, 0.2, 5 / 6, 0.8)),
        ("x", EMPTY): pytest.approx((1.0, 0.2, 0.6, 1 / 6)),
    }
    assert (stats.responses, stats.empty_responses, stats.invalid_responses, stats.duplicates_merged) == (5, 2, 0, 1)
    assert stats.judge_calls == 2 and judge.calls == [2]


@pytest.mark.parametrize("n_samples", [3, 4])
def test_pair_winrates_are_unbiased_targets(n_samples):
    # Over every sequence of N samples from mu (the empty response among the options, losing to both others), the
    # expected weighted win-rate target of u_i in its pairs with u_j is 2 mu_i mu_j P(u_i beats mu): the target is
    # unbiased given the pair, so the sppo and rebel regressions see E[target | pair] = P(y beats mu_k).
    mu = np.array([0.5, 0.3, 0.2])
    labels = ["w", "x", EMPTY]
    P = np.array([[0.5, 0.6, 1.0], [0.4, 0.5, 1.0], [0.0, 0.0, 0.5]])
    idx = {lab: i for i, lab in enumerate(labels)}
    seqs = list(itertools.product(range(3), repeat=n_samples))
    pairs, _ = build_pairs([(str(s), [labels[i] for i in s]) for s in seqs], NoEmptyJudge(JUDGE), "all_soft")
    prob = {str(s): float(np.prod(mu[list(s)])) for s in seqs}
    got = np.zeros((3, 3))
    for p in pairs:
        i, j, w = idx[p.chosen], idx[p.rejected], prob[p.prompt] * p.weight
        got[i, j] += w * p.chosen_winrate
        got[j, i] += w * p.rejected_winrate
    want = 2 * np.outer(mu, mu) * (P @ mu)[:, None]
    np.fill_diagonal(want, 0.0)
    np.testing.assert_allclose(got, want, atol=1e-14)


@pytest.mark.parametrize(
    "prox, n, refused", [("rebel", 2, True), ("sppo", 2, True), ("sppo", 3, False), ("ipo", 2, False)]
)
def test_preflight_refuses_two_samples_with_win_rate_losses(prox, n, refused):
    from types import SimpleNamespace

    from comal_openrlhf.cli.train_comal import check_settings, parse_args
    from comal_openrlhf.errors import PlanError

    args = parse_args(
        ["--comal.source", "online", "--judge.kind", "table", "--judge.table", "paper"]
        + ["--rollout.n_samples_per_prompt", str(n), "--comal.prox", prox]
    )
    plan = SimpleNamespace(prox=prox, ref_update_interval=0)
    strategy = SimpleNamespace(print=lambda *m: None)
    if refused:
        with pytest.raises(PlanError, match=f"{prox} loss needs --rollout.n_samples_per_prompt >= 3"):
            check_settings(args, plan, strategy)
    else:
        check_settings(args, plan, strategy)
