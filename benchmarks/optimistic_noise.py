"""The optimistic preset's estimator on the paper's game, tabular: how far sampling noise keeps it from the Nash.

    python benchmarks/optimistic_noise.py [--seeds 10] [--steps 24] [--eta 2]

Each step does what ``train_comal --comal.algo optimistic`` does with one prompt and the table judge, with the prox
step solved exactly instead of by a language model: N samples of mu_k, ``build_pairs`` (all_soft), the previous
iterate's samples judged with ``cross_winrates`` (``reuse``: the samples step k - 1 trained on; ``fresh``: a second
draw of mu_{k-1}), ``optimistic_pairs``, then the rebel regression's weighted least-squares minimiser (weights
mu_k(y) mu_k(y'), the demo's ``--rollout.pair_weighting policy``) added to log mu_k. Prints the median and the spread
over seeds of the final duality gap per sample count, beside the noiseless closed form (exact win rates).
"""

import argparse

import numpy as np

from comal_openrlhf.core.game import duality_gap, paper_game
from comal_openrlhf.core.judging import TableJudge
from comal_openrlhf.core.pairs import build_pairs, cross_winrates, optimistic_pairs


def simulate(P, labels, eta, n, steps, previous, seed, init=(0.6, 0.3, 0.1)):
    judge = TableJudge(P, labels)
    rng = np.random.default_rng(seed)
    mu, prev = np.array(init, dtype=np.float64), None
    for k in range(steps):
        samples = list(rng.choice(labels, size=n, p=mu))
        pairs, _ = build_pairs([("q", samples)], judge, "all_soft")
        if k > 0:
            us = sorted({y for p in pairs for y in (p.chosen, p.rejected)})
            (rates,), _ = cross_winrates(judge, [("q", us, prev)])
            pairs = optimistic_pairs(pairs, {("q", u): r for u, r in zip(us, rates)})
        prev = samples if previous == "reuse" else list(rng.choice(labels, size=n, p=mu))
        rows, targets, weights = [], [], []
        for p in pairs:
            i, j = labels.index(p.chosen), labels.index(p.rejected)
            row = np.zeros(len(labels))
            row[i], row[j] = 1.0, -1.0
            rows.append(row)
            targets.append(eta * (p.chosen_winrate - p.rejected_winrate))
            weights.append(mu[i] * mu[j])
        sw = np.sqrt(np.array(weights))
        f = np.linalg.lstsq(np.array(rows) * sw[:, None], np.array(targets) * sw, rcond=None)[0] if rows else 0.0
        x = np.log(mu) + f
        mu = np.exp(x - x.max())
        mu /= mu.sum()
    return duality_gap(P, mu)


def closed_form(P, eta, steps, init=(0.6, 0.3, 0.1)):
    mu, prev = np.array(init, dtype=np.float64), None
    for _ in range(steps):
        w = P @ mu
        x = np.log(mu) + eta * (2 * w - (w if prev is None else prev))
        prev = w
        mu = np.exp(x - x.max())
        mu /= mu.sum()
    return duality_gap(P, mu)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--eta", type=float, default=2.0)
    ap.add_argument("--samples", default="64,256,1024")
    a = ap.parse_args(argv)
    P, labels = paper_game()
    P = np.asarray(P, dtype=np.float64)
    print(f"paper game, eta {a.eta}, {a.steps} steps from (0.6, 0.3, 0.1), {a.seeds} seeds")
    print("| samples | previous | median final gap | min | max |\n|---|---|---|---|---|")
    for n in (int(x) for x in a.samples.split(",")):
        for previous in ("reuse", "fresh"):
            gaps = [simulate(P, labels, a.eta, n, a.steps, previous, s) for s in range(a.seeds)]
            print(f"| {n} | {previous} | {np.median(gaps):.3f} | {min(gaps):.3f} | {max(gaps):.3f} |")
    print(f"| exact win rates | | {closed_form(P, a.eta, a.steps):.3f} | | |")


if __name__ == "__main__":
    main()
