"""Judged samples -> preference pairs (COMAL spec section 5, steps 2 and 3). Plain NumPy; the judge is any object
with ``prob(prompts, a, b)`` (see ``comal_openrlhf.judges``).

Per prompt, the n sampled responses are cleaned first: invalid ones (not a string, empty or whitespace-only) are
excluded and counted, identical strings are merged into one distinct response with a count, and a prompt with fewer
than two distinct valid responses is dropped. The distinct responses u_1..u_m (counts c_i, N = sum c_i samples) are
judged pairwise, all prompts in one batched call, giving W[i][j] = P(u_i beats u_j) with W + W^T = 1. The win rate
of u_i against the current policy mu_k is the mean P against the OTHER N - 1 samples, duplicates counted as in mu_k
(a copy of itself ties at 1/2):

    winrate_i = (sum_j c_j W[i][j] - 1/2) / (N - 1).

Rules (one list of pairs per call):

- ``top2``        chosen = best win rate, rejected = second best (the official COMAL code); one pair per prompt.
- ``best_worst``  chosen = best, rejected = worst; one pair per prompt.
- ``sampled``     y, y' drawn from mu_k (the valid multiset) conditioned on being different strings (P(u_i, u_j)
                  proportional to c_i c_j), chosen = y with probability W[y][y']: an unbiased sample of the
                  pairs the prox loss assumes (spec section 4; identical pairs carry no gradient, so conditioning
                  them away keeps the minimiser). ``pairs_per_prompt`` draws per prompt.
- ``all_soft``    every unordered pair of distinct responses once, soft_label = P(chosen beats rejected) >= 1/2.

Ties in win rate keep the order of first appearance, so ``top2`` and ``best_worst`` are deterministic.
"""

import math
from dataclasses import asdict, dataclass

import numpy as np

from comal_openrlhf.judges.base import judge_pairs

RULES = ("top2", "best_worst", "sampled", "all_soft")


@dataclass(frozen=True)
class Pair:
    """One preference pair: the one pair type of the project (offline files, the online source, the judge command,
    the training record).

    ``prompt`` is the text the policy is conditioned on where the pair lives: the raw prompt in a pairs file and in
    the judge's hands, the templated prompt once ``data.RowFormatter`` has formatted it for training.
    ``soft_label`` is P(chosen beats rejected) for a soft pair and NaN for a hard pair (then the label is
    "chosen wins", with ``--model.label_smoothing`` for the dpo loss). The win rates are P(y beats mu_k) of each side
    (NaN when unknown; the sppo and rebel losses need them). ``weight`` is the pair's share of the prox loss's
    expectation over y, y' ~ mu_k (1 for a pair drawn from that distribution). ``origin`` says where it came from
    (file:line, iteration) for error messages.
    """

    prompt: str
    chosen: str
    rejected: str
    chosen_winrate: float = math.nan
    rejected_winrate: float = math.nan
    soft_label: float = math.nan
    weight: float = 1.0
    origin: str = ""

    def to_row(self, prompt_key="prompt", chosen_key="chosen", rejected_key="rejected"):
        """The JSON row of the offline pairs format (``iter_NNN.jsonl``); unknown (NaN) fields are left out."""
        row = {prompt_key: self.prompt, chosen_key: self.chosen, rejected_key: self.rejected}
        for name in ("chosen_winrate", "rejected_winrate", "soft_label"):
            value = getattr(self, name)
            if not math.isnan(value):
                row[name] = value
        if self.weight != 1.0:
            row["weight"] = self.weight
        return row


@dataclass
class PairStats:
    prompts: int = 0  # prompts given
    prompts_dropped: int = 0  # fewer than 2 distinct valid responses
    responses: int = 0  # responses given, invalid ones included
    invalid_responses: int = 0
    duplicates_merged: int = 0  # valid responses identical to an earlier one of the same prompt
    pairs: int = 0
    judge_calls: int = 0  # ordered comparisons asked of the judge (2 per pair with both orders)

    def as_dict(self):
        return asdict(self)


def is_valid(response):
    return isinstance(response, str) and response.strip() != ""


def win_matrix(judge, prompt, responses, both_orders=True, batch_size=512):
    """n x n matrix W[i][j] = P(responses[i] beats responses[j]), diagonal 1/2, W + W^T = 1."""
    return _win_matrices(judge, [(prompt, list(responses))], both_orders, batch_size)[0]


def _win_matrices(judge, groups, both_orders, batch_size):
    """One W per (prompt, responses) group, every upper-triangle comparison in one batched judge call."""
    prompts, a, b, where = [], [], [], []
    for g, (prompt, responses) in enumerate(groups):
        iu, ju = np.triu_indices(len(responses), k=1)
        prompts += [prompt] * len(iu)
        a += [responses[i] for i in iu]
        b += [responses[j] for j in ju]
        where.append((iu, ju))
    p = judge_pairs(judge, prompts, a, b, both_orders=both_orders, batch_size=batch_size)
    out, s = [], 0
    for (iu, ju), (_, responses) in zip(where, groups):
        W = np.full((len(responses), len(responses)), 0.5)
        W[iu, ju] = p[s : s + len(iu)]
        W[ju, iu] = 1.0 - W[iu, ju]
        out.append(W)
        s += len(iu)
    return out


def build_pairs(groups, judge, rule, rng=None, both_orders=True, pairs_per_prompt=1, batch_size=512):
    """``groups``: list of (prompt, [responses]) -> (list[Pair], PairStats). ``rng`` (np.random.Generator) is needed
    by ``sampled`` only."""
    if rule not in RULES:
        raise ValueError(f"unknown pair rule {rule!r}; choose one of {', '.join(RULES)}")
    if rule == "sampled" and rng is None:
        raise ValueError("rule 'sampled' needs rng (a numpy Generator)")
    stats = PairStats(prompts=len(groups))
    kept = []  # (prompt, distinct responses, counts)
    for prompt, responses in groups:
        stats.responses += len(responses)
        valid = [r for r in responses if is_valid(r)]
        stats.invalid_responses += len(responses) - len(valid)
        counts = {}
        for r in valid:
            counts[r] = counts.get(r, 0) + 1  # dicts keep first-appearance order
        stats.duplicates_merged += len(valid) - len(counts)
        if len(counts) < 2:
            stats.prompts_dropped += 1
            continue
        kept.append((prompt, list(counts), np.array(list(counts.values()), dtype=np.float64)))

    matrices = _win_matrices(judge, [(p, u) for p, u, _ in kept], both_orders, batch_size)
    stats.judge_calls = sum(len(u) * (len(u) - 1) // 2 for _, u, _ in kept) * (2 if both_orders else 1)

    pairs = []
    for (prompt, u, c), W in zip(kept, matrices):
        winrate = (W @ c - 0.5) / (c.sum() - 1)
        order = np.argsort(-winrate, kind="stable")
        if rule == "top2":
            picks = [(order[0], order[1], math.nan)]
        elif rule == "best_worst":
            picks = [(order[0], order[-1], math.nan)]
        elif rule == "all_soft":
            iu, ju = np.triu_indices(len(u), k=1)
            picks = [(i, j, W[i, j]) if W[i, j] >= 0.5 else (j, i, W[j, i]) for i, j in zip(iu, ju)]
            cc = c[iu] * c[ju]
            weights = dict(zip(zip(iu, ju), cc / cc.sum()))
        else:  # sampled: (i, j), i != j, with probability proportional to c_i c_j
            weights = np.outer(c, c)
            np.fill_diagonal(weights, 0.0)
            picks = []
            for k in rng.choice(weights.size, size=pairs_per_prompt, p=weights.ravel() / weights.sum()):
                i, j = divmod(int(k), len(u))
                picks.append((i, j, math.nan) if rng.random() < W[i, j] else (j, i, math.nan))
        if rule != "all_soft":
            weights = {}
        pairs += [
            Pair(
                prompt,
                u[i],
                u[j],
                chosen_winrate=float(winrate[i]),
                rejected_winrate=float(winrate[j]),
                soft_label=float(lab),
                weight=float(weights.get((min(i, j), max(i, j)), 1.0)),
            )
            for i, j, lab in picks
        ]
    stats.pairs = len(pairs)
    return pairs, stats
