"""Judged samples -> preference pairs (arXiv 2410.23223: the pairs of one iteration). Plain NumPy; the judge is any
object with ``prob(prompts, a, b)`` (see ``comal_openrlhf.judges``).

Per prompt, the n sampled responses are cleaned first: invalid ones (not a string, empty or whitespace-only) are
excluded and counted, identical strings are merged into one distinct response with a count, and a prompt with fewer
than two distinct valid responses is dropped. The distinct responses u_1..u_m (counts c_i, N = sum c_i samples) are
judged pairwise, all prompts in one batched call, giving W[i][j] = P(u_i beats u_j) with W + W^T = 1. The win rate
of u_i against the current policy mu_k is the mean P against the OTHER N - 1 samples, duplicates counted as in mu_k
(a copy of itself ties at 1/2):

    winrate_i = (sum_j c_j W[i][j] - 1/2) / (N - 1).

Rules (one list of pairs per call):

- ``top2``        chosen = best win rate, rejected = second best (the official COMAL code); one pair per prompt,
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
expectation. Grouping positions by string, the ordered pairs (u_i, u_j), i != j, occur c_i c_j times, and the
pairs of positions holding the same string (c_i (c_i - 1) of them) carry no gradient for the pair losses (h = 0:
the ipo, dpo and rebel losses of a tie are constants; sppo is the exception, a sum of per-response regressions whose
ties do pull, so for sppo these weights under-count frequent responses). The pair losses are symmetric
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
iteration, so only the relative weights across prompts above matter. A prompt with fewer than two distinct valid
responses contributes only ties: dropping it changes nothing but that constant.

Ties in win rate keep the order of first appearance, so ``top2`` and ``best_worst`` are deterministic.
"""

import math
from dataclasses import asdict, dataclass

import numpy as np

from comal_openrlhf.judges.base import is_antisymmetric, judge_pairs

RULES = ("top2", "best_worst", "sampled", "all_soft")


@dataclass(frozen=True)
class Pair:
    """One preference pair: the one pair type of the project (offline files, the online source, the judge command,
    the training record).

    ``prompt`` is the text the policy is conditioned on where the pair lives: the raw prompt in a pairs file and in
    the judge's hands, the templated prompt once ``data.RowFormatter`` has formatted it for training.
    ``soft_label`` is P(chosen beats rejected) for a soft pair and NaN for a hard pair (then the label is "chosen
    wins", with ``--model.label_smoothing`` for the dpo loss). The win rates are P(y beats mu_k) of each side (NaN
    when unknown; the sppo and rebel losses need them). ``weight`` is the pair's share of the prox loss's expectation
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
    prompts_dropped: int = 0  # fewer than 2 distinct valid responses
    responses: int = 0  # responses given, invalid ones included
    invalid_responses: int = 0
    duplicates_merged: int = 0  # valid responses identical to an earlier one of the same prompt
    pairs: int = 0
    judge_calls: int = 0  # ordered comparisons asked of the judge (2 per pair with both orders, unless antisymmetric)

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


def sampled_law(counts, W):
    """The ``sampled`` rule for one prompt with sample counts ``counts`` (c) and win matrix ``W``:
    (law, weight), law[i][j] = P(a draw gives chosen u_i, rejected u_j) = 2 c_i c_j W[i][j] / (N^2 - sum c^2) for
    i != j (the unordered pair with probability 2 c_i c_j / (N^2 - sum c^2), then the judge's label), zero on the
    diagonal; weight = (N^2 - sum c^2) / (N (N - 1)), the weight of one draw per prompt (module docstring).
    ``build_pairs`` draws from it; the game lab (comal_openrlhf.game) takes its exact expectation."""
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
        valid = [r for r in responses if is_valid(r)]
        stats.invalid_responses += len(responses) - len(valid)
        counts = {}
        for r in valid:
            counts[r] = counts.get(r, 0) + 1  # dicts keep first-appearance order
        stats.duplicates_merged += len(valid) - len(counts)
        if len(counts) < 2:
            stats.prompts_dropped += 1
            continue
        judge_prompt = prompt if judge_prompts is None else judge_prompts[g]
        kept.append((prompt, list(counts), np.array(list(counts.values()), dtype=np.float64), judge_prompt))

    matrices = _win_matrices(judge, [(jp, u) for _, u, _, jp in kept], both_orders, batch_size)
    orders = 2 if both_orders and not is_antisymmetric(judge) else 1  # judge_pairs asks one order then
    stats.judge_calls = sum(len(u) * (len(u) - 1) // 2 for _, u, _, _ in kept) * orders

    pairs = []
    for (prompt, u, c, _), W in zip(kept, matrices):
        winrate = (W @ c - 0.5) / (c.sum() - 1)
        order = np.argsort(-winrate, kind="stable")
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
                chosen_winrate=float(winrate[i]),
                rejected_winrate=float(winrate[j]),
                soft_label=float(lab),
                weight=float(w),
                origin=origin,
            )
            for i, j, lab, w in picks
        ]
    stats.pairs = len(pairs)
    return pairs, stats
