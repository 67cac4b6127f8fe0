"""Judged samples -> preference pairs (arXiv 2410.23223: the pairs of one iteration). Plain NumPy; the judge is any
object with ``prob(prompts, a, b)`` (see ``comal_openrlhf.judges``).

Per prompt, the n sampled responses are cleaned first (``canonical``): a non-string is invalid, excluded and
counted; an empty or whitespace-only string is the empty response "" (the policy stopped at once). The empty
response is a response of mu_k like any other: it counts in N and in the weights, and it loses to every non-empty
response (P = 0, and 1/2 against itself; the judge is not asked about it), so the loss pushes its mass down instead
of training on mu_k conditioned on a non-empty output. Identical strings are merged into one distinct response with
a count (every empty one is the one response ""), and a prompt with fewer than two distinct responses is dropped.
The distinct responses u_1..u_m (counts c_i, N = sum c_i samples) are judged pairwise, all prompts in one batched
call, giving W[i][j] = P(u_i beats u_j) with W + W^T = 1. The score of u_i, which ranks the responses for ``top2``
and ``best_worst``, is its mean P against the OTHER N - 1 samples, duplicates counted as in mu_k (a copy of itself
ties at 1/2):

    score_i = (sum_m c_m W[i][m] - 1/2) / (N - 1).

Win-rate targets (the P(y > mu_k) that the sppo and rebel losses regress on) are per pair and leave both of the
pair's samples out: for the pair at sample positions a, b holding u_i and u_j, the win rate of u_i is its mean P
against the other N - 2 samples,

    winrate_i|j = (sum_m c_m W[i][m] - 1/2 - W[i][j]) / (N - 2),

and likewise winrate_j|i. The N - 2 other samples are i.i.d. from mu_k and independent of y_a, y_b, so
E[winrate_i|j | y_a = u_i, y_b = u_j] = P(u_i beats mu_k) exactly. The score as a target would count the partner:
E[p_w - p_l | y_w, y_l] = ((N - 2)(P_w - P_l) + (2 W_wl - 1)) / (N - 1), and as the partner ranges over mu_k the
second term averages to 2 P_w - 1, so the rebel regression's minimiser moves log pi / C by eta N / (N - 1) times the
win rate (1.25 eta at N = 5) instead of eta. With N = 2 there is no other sample: the win rates are NaN (unknown),
the sppo and rebel losses refuse such pairs (and the trainer's preflight refuses fewer than 3 samples with them),
while ipo and dpo read the soft label only.

Rules (one list of pairs per call):

- ``top2``        chosen = best score, rejected = second best (the official COMAL code); one pair per prompt,
                  weight 1. Not a sample of y, y' ~ mu_k: it gives up the convergence guarantee (see below).
- ``best_worst``  chosen = best, rejected = worst; one pair per prompt, weight 1. Same caveat.
- ``sampled``     an ordered pair of distinct responses drawn with probability proportional to c_i c_j, chosen =
                  the first with probability W[i][j] (a hard label drawn from the judge); ``pairs_per_prompt`` draws
                  per prompt, each of weight (N^2 - sum_i c_i^2) / (N (N - 1) pairs_per_prompt).
- ``all_soft``    every unordered pair {u_i, u_j} of distinct responses once, oriented so that
                  soft_label = P(chosen beats rejected) >= 1/2, weight 2 c_i c_j / (N (N - 1)).

Why these weights (the prox loss of arXiv 2410.23223, INPO's loss of arXiv 2407.00617 with the prox centre):
the prox loss of an iteration is an expectation over a prompt x and a pair y, y' ~ mu_k x mu_k labelled by P,
L = E_x E_{y, y'} l(y, y'). With N i.i.d. samples y_1..y_N of a prompt, the U-statistic over ordered pairs of
distinct sample positions, (1 / (N (N - 1))) sum_{a != b} l(y_a, y_b), is an unbiased estimate of the inner
expectation (with the leave-two-out targets above: each term's targets are unbiased given its own two samples).
Grouping positions by string, the ordered pairs (u_i, u_j), i != j, occur c_i c_j times, and the
pairs of positions holding the same string (c_i (c_i - 1) of them) carry no gradient for the pair losses (h = 0:
the ipo, dpo and rebel losses of a tie are constants; sppo is the exception, a sum of per-response regressions whose
ties do pull: its expected loss weighs the regression of y by mu_k(y) (1 - mu_k(y)) instead of mu_k(y), the same
minimiser only when log pi / C can meet every target, i.e. a zero log-partition). The pair losses are symmetric
under swapping chosen and rejected together with the label (l(u_i, u_j) with label W[i][j] equals l(u_j, u_i) with
label W[j][i]), so the two orders merge into the unordered pair of ``all_soft`` with weight 2 c_i c_j / (N (N - 1)):
the pairs of a prompt sum to the U-statistic exactly, up to a constant. ``sampled`` replaces that sum by draws: a
draw is (u_i, u_j) with probability c_i c_j / (N^2 - sum c^2) and its hard label has expectation W[i][j] (the soft
loss is the hard loss's expectation over the label), so weight (N^2 - sum c^2) / (N (N - 1)) = the share of
ordered position pairs that hold distinct strings makes the expected weighted loss the same U-statistic. That factor
is not a constant: a prompt whose samples are mostly copies (a policy close to deterministic there) must count
less, and dropping it (weight 1 per draw) biases the estimate just as renormalising each prompt's weights to sum 1
does (in the game lab either moves the fixed point away from the Nash). There is no per-prompt normalisation;
the trainer divides by the iteration's total weight (mean 1 over every pair of the iteration), a constant of the
iteration, so only the relative weights across prompts above matter. A prompt with fewer than two distinct
responses contributes only ties: dropping it changes nothing but that constant.

Ties in score keep the order of first appearance, so ``top2`` and ``best_worst`` are deterministic.
"""

import math
from dataclasses import asdict, dataclass, replace

import numpy as np

from comal_openrlhf.core.judging import is_antisymmetric, judge_pairs

RULES = ("top2", "best_worst", "sampled", "all_soft")
EMPTY = ""  # the one empty response: every empty or whitespace-only sample (the policy stopped at once)


@dataclass(frozen=True)
class Pair:
    """One preference pair: the one pair type of the project (offline files, the online source, the judge command,
    the training record).

    ``prompt`` is the text the policy is conditioned on where the pair lives: the raw prompt in a pairs file and in
    the judge's hands, the templated prompt once ``data.RowFormatter`` has formatted it for training.
    ``soft_label`` is P(chosen beats rejected) for a soft pair and NaN for a hard pair (then the label is "chosen
    wins", with ``--model.label_smoothing`` for the dpo loss). The win rates estimate P(y beats mu_k) of each side
    (``build_pairs``: from the prompt's samples other than the pair's two; NaN when unknown, e.g. with 2 samples;
    the sppo and rebel losses need them). ``weight`` is the pair's share of the prox loss's expectation
    over y, y' ~ mu_k, only relative across the iteration (``build_pairs``: c_i c_j / (N (N - 1)) per order; 1 for
    the rules that do not sample that distribution and for a file without weights). ``origin`` says where it came
    from (file:line, iteration) for error messages.
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
    prompts_dropped: int = 0  # fewer than 2 distinct responses
    responses: int = 0  # responses given, invalid ones included
    invalid_responses: int = 0  # not a string: excluded
    empty_responses: int = 0  # empty or whitespace-only strings: kept, all merged into the one response ""
    duplicates_merged: int = 0  # non-empty responses identical to an earlier one of the same prompt
    pairs: int = 0
    judge_calls: int = 0  # ordered comparisons asked of the judge (2 per pair with both orders, unless antisymmetric)

    def as_dict(self):
        return asdict(self)


def is_valid(response):
    """A non-empty string (the evaluation's rule; ``build_pairs`` keeps empty strings as EMPTY, see ``canonical``)."""
    return isinstance(response, str) and response.strip() != ""


def canonical(response):
    """A sample as ``build_pairs`` counts it: None for an invalid one (not a string), EMPTY for an empty or
    whitespace-only string (the policy stopped at once), else the string itself."""
    if not isinstance(response, str):
        return None
    return response if response.strip() else EMPTY


def win_matrix(judge, prompt, responses, both_orders=True, batch_size=512):
    """n x n matrix W[i][j] = P(responses[i] beats responses[j]), diagonal 1/2, W + W^T = 1. An empty or
    whitespace-only response loses to every non-empty one and ties another empty one; the judge is not asked."""
    return _win_matrices(judge, [(prompt, list(responses))], both_orders, batch_size)[0]


def _win_matrices(judge, groups, both_orders, batch_size):
    """One W per (prompt, responses) group, every upper-triangle comparison of two non-empty responses in one
    batched judge call; a comparison with an empty response is decided here (it loses, or ties another empty)."""
    prompts, a, b, where = [], [], [], []
    for g, (prompt, responses) in enumerate(groups):
        full = np.array([canonical(r) != EMPTY for r in responses], dtype=bool)
        iu, ju = np.triu_indices(len(responses), k=1)
        ask = full[iu] & full[ju]
        prompts += [prompt] * int(ask.sum())
        a += [responses[i] for i in iu[ask]]
        b += [responses[j] for j in ju[ask]]
        where.append((iu, ju, ask, full))
    p = judge_pairs(judge, prompts, a, b, both_orders=both_orders, batch_size=batch_size)
    out, s = [], 0
    for (iu, ju, ask, full), (_, responses) in zip(where, groups):
        W = np.full((len(responses), len(responses)), 0.5)
        W[iu[ask], ju[ask]] = p[s : s + int(ask.sum())]
        W[iu[~ask], ju[~ask]] = np.where(full[iu[~ask]] == full[ju[~ask]], 0.5, full[iu[~ask]].astype(float))
        W[ju, iu] = 1.0 - W[iu, ju]
        out.append(W)
        s += int(ask.sum())
    return out


def pair_winrates(counts, W):
    """T[i][j] = the win-rate target of u_i in a pair with u_j: its mean P against the N - 2 samples other than the
    pair's two (leave-two-out, module docstring), unbiased for P(u_i beats mu_k); all NaN when N = 2."""
    c = np.asarray(counts, dtype=np.float64)
    W = np.asarray(W, dtype=np.float64)
    n = c.sum()
    if n < 3:
        return np.full(W.shape, math.nan)
    return ((W @ c - 0.5)[:, None] - W) / (n - 2)


def sampled_law(counts, W):
    """The ``sampled`` rule for one prompt with sample counts ``counts`` (c) and win matrix ``W``:
    (law, weight), law[i][j] = P(a draw gives chosen u_i, rejected u_j) = 2 c_i c_j W[i][j] / (N^2 - sum c^2) for
    i != j (the unordered pair with probability 2 c_i c_j / (N^2 - sum c^2), then the judge's label), zero on the
    diagonal; weight = (N^2 - sum c^2) / (N (N - 1)), the weight of one draw per prompt (module docstring).
    ``build_pairs`` draws from it; the game lab (comal_openrlhf.core.game) takes its exact expectation."""
    c = np.asarray(counts, dtype=np.float64)
    n = c.sum()
    distinct = n * n - np.sum(c * c)  # sum over i != j of c_i c_j
    law = 2 * np.outer(c, c) * np.asarray(W, dtype=np.float64) / distinct
    np.fill_diagonal(law, 0.0)
    return law, distinct / (n * (n - 1))


def build_pairs(
    groups, judge, rule, rng=None, both_orders=True, pairs_per_prompt=1, batch_size=512, judge_prompts=None, origin=""
):
    """``groups``: list of (prompt, [responses]) -> (list[Pair], PairStats). ``rng`` (np.random.Generator) is needed
    by ``sampled`` only. ``judge_prompts`` (one per group) is what the judge sees as the prompt when it differs from
    the pair's prompt (e.g. the user's text where the pair holds the chat-templated prompt); ``origin`` is written
    into every pair."""
    if judge_prompts is not None and len(judge_prompts) != len(groups):
        raise ValueError(f"judge_prompts has {len(judge_prompts)} entries for {len(groups)} groups")
    if rule not in RULES:
        raise ValueError(f"unknown pair rule {rule!r}; choose one of {', '.join(RULES)}")
    if rule == "sampled" and rng is None:
        raise ValueError("rule 'sampled' needs rng (a numpy Generator)")
    if not (isinstance(pairs_per_prompt, int) and pairs_per_prompt >= 1):
        raise ValueError(f"pairs_per_prompt must be an integer >= 1, got {pairs_per_prompt!r}")
    stats = PairStats(prompts=len(groups))
    kept = []  # (prompt, distinct responses, counts, judge prompt)
    for g, (prompt, responses) in enumerate(groups):
        stats.responses += len(responses)
        valid = [r for r in map(canonical, responses) if r is not None]
        stats.invalid_responses += len(responses) - len(valid)
        counts = {}
        for r in valid:
            counts[r] = counts.get(r, 0) + 1  # dicts keep first-appearance order
        empty = counts.get(EMPTY, 0)
        stats.empty_responses += empty
        stats.duplicates_merged += len(valid) - len(counts) - max(empty - 1, 0)  # empties are counted above
        if len(counts) < 2:
            stats.prompts_dropped += 1
            continue
        judge_prompt = prompt if judge_prompts is None else judge_prompts[g]
        kept.append((prompt, list(counts), np.array(list(counts.values()), dtype=np.float64), judge_prompt))

    matrices = _win_matrices(judge, [(jp, u) for _, u, _, jp in kept], both_orders, batch_size)
    orders = 2 if both_orders and not is_antisymmetric(judge) else 1  # judge_pairs asks one order then
    asked = [len(u) - (EMPTY in u) for _, u, _, _ in kept]  # the empty response is not judged
    stats.judge_calls = sum(m * (m - 1) // 2 for m in asked) * orders

    pairs = []
    for (prompt, u, c, _), W in zip(kept, matrices):
        score = (W @ c - 0.5) / (c.sum() - 1)
        winrate = pair_winrates(c, W)  # winrate[i, j]: u_i's target in its pair with u_j
        order = np.argsort(-score, kind="stable")
        if rule == "top2":
            picks = [(order[0], order[1], math.nan, 1.0)]
        elif rule == "best_worst":
            picks = [(order[0], order[-1], math.nan, 1.0)]
        elif rule == "all_soft":
            n = c.sum()
            iu, ju = np.triu_indices(len(u), k=1)
            weight = 2 * c[iu] * c[ju] / (n * (n - 1))  # both orders of the U-statistic
            picks = [(i, j, W[i, j], w) if W[i, j] >= 0.5 else (j, i, W[j, i], w) for i, j, w in zip(iu, ju, weight)]
        else:  # sampled
            law, weight = sampled_law(c, W)
            draws = rng.choice(law.size, size=pairs_per_prompt, p=law.ravel())
            picks = [(*divmod(int(k), len(u)), math.nan, weight / pairs_per_prompt) for k in draws]
        pairs += [
            Pair(
                prompt,
                u[i],
                u[j],
                chosen_winrate=float(winrate[i, j]),
                rejected_winrate=float(winrate[j, i]),
                soft_label=float(lab),
                weight=float(w),
                origin=origin,
            )
            for i, j, lab, w in picks
        ]
    stats.pairs = len(pairs)
    return pairs, stats


def cross_winrates(judge, groups, both_orders=True, batch_size=512):
    """``groups``: list of (judge prompt, [responses u], [samples v]) -> one array per group, the mean P(u beats v)
    of each response u over the samples v (their multiplicity counted; invalid samples, not strings, left out). The
    same rules as ``win_matrix``: an empty response loses to a non-empty one and ties another empty one, identical
    strings tie at 1/2, and the judge is asked only about two distinct non-empty strings. Returns (list of arrays,
    judge calls). With v i.i.d. from a policy q and independent of u, the mean is unbiased for P(u beats q)."""
    prompts, a, b, where = [], [], [], []
    for prompt, us, vs in groups:
        us = [canonical(u) for u in us]
        vs = [v for v in map(canonical, vs) if v is not None]
        if not vs:
            raise ValueError("cross_winrates: a group has no valid sample to compare against")
        known = np.full((len(us), len(vs)), math.nan)
        for i, u in enumerate(us):
            for j, v in enumerate(vs):
                if u == v:
                    known[i, j] = 0.5
                elif u == EMPTY or v == EMPTY:
                    known[i, j] = float(v == EMPTY)
                else:
                    prompts.append(prompt)
                    a.append(u)
                    b.append(v)
        where.append(known)
    p = judge_pairs(judge, prompts, a, b, both_orders=both_orders, batch_size=batch_size)
    out, s = [], 0
    for known in where:
        ask = np.isnan(known)
        known[ask] = p[s : s + int(ask.sum())]
        s += int(ask.sum())
        out.append(known.mean(axis=1))
    orders = 2 if both_orders and not is_antisymmetric(judge) else 1
    return out, len(prompts) * orders


def optimistic_pairs(pairs, previous_rate):
    """The optimistic payoff as the win-rate targets (ONPO, arXiv 2502.16852; optimistic MWU): each side's target
    2 winrate - previous_rate[(prompt, response)], where winrate is ``build_pairs``' leave-two-out estimate of
    P(y beats mu_k) and previous_rate the mean P(y beats v) over an independent sample set of mu_{k-1}
    (``cross_winrates``). Given the pair's two responses both are unbiased, so the target is unbiased for
    2 P(y beats mu_k) - P(y beats mu_{k-1}), a number in [-1, 2]. Pairs without win rates (N = 2) are refused."""
    out = []
    for p in pairs:
        if math.isnan(p.chosen_winrate) or math.isnan(p.rejected_winrate):
            raise ValueError(f"{p.origin}: the optimistic payoff needs the pair's win rates (3 or more samples)")
        out.append(
            replace(
                p,
                chosen_winrate=2 * p.chosen_winrate - previous_rate[(p.prompt, p.chosen)],
                rejected_winrate=2 * p.rejected_winrate - previous_rate[(p.prompt, p.rejected)],
            )
        )
    return out
