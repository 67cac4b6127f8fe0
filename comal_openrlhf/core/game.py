"""Tabular game lab for COMAL (Liu et al., arXiv 2410.23223: the synthetic game and the prox update).

One prompt, n responses, a preference matrix P[i][j] = P(i beats j) with P + P^T = 1. Every algorithm is the
inner step of the KL-regularised game (the paper's prox / mirror-descent update)

    mu_{k+1}(y)  ~  mu_k(y)^(1 - eta*tau) * ref(y)^(eta*tau) * exp(eta * P(y > opponent))

and they differ only in tau, the reference and the opponent:

    mwu      tau = 0: self-play multiplicative weights on the win rate; opponent mu_k. This is iterative IPO (the
             ipo loss with the previous iterate as reference solves this step exactly) and, approximately,
             SPPO. It is NOT iterative DPO: DPO's step is multiplicative weights on the Bradley-Terry reward
             (``--mode loss --prox dpo`` runs it: on the paper's game even comal with the dpo prox does not
             converge, its gap cycles between about 0.2 and 0.77; measured 0.66 / 0.68 after 5,000 steps, K 200,
             from uniform / (0.6, 0.3, 0.1)). Cycles, no last-iterate convergence.
    inpo     ref = start policy forever; opponent mu_k. Converges to the regularised Nash: constant gap.
    comal    ref <- current iterate every K steps (conceptual prox method); opponent mu_k. Gap -> 0.
    nash-md  Nash-MD (Munos et al., arXiv 2312.00886): ref = start policy forever, and the opponent is the geometric
             mixture m_k ~ mu_k^(1 - eta*tau) ref^(eta*tau), which is also the prox centre, so
             mu_{k+1} ~ m_k exp(eta * P(y > m_k)). Regularised like INPO: constant gap.

The last-iterate learners of the other papers, on the same footing (the same prox centre C_k = mu_k^(1 - eta*tau)
ref^(eta*tau), ref = the start policy unless said otherwise, the same eta and tau; tau = 0 is the unregularised game):

    omwu     optimistic mirror descent / optimistic MWU (ONPO, Zhang et al., arXiv 2502.16852): the prox step with the
             optimistic payoff g_k = 2 P(y > mu_k) - P(y > mu_{k-1}) (mu_{-1} = mu_0, so the first step is MWU's):
                 mu_{k+1} ~ C_k exp(eta * g_k).
             With entropy this one-sequence form is the two-sequence optimistic OMD (secondary iterate
             mu^_k ~ mu^_{k-1} exp(eta P(y > mu_k)), mu_{k+1} ~ mu^_k exp(eta P(y > mu_k))) written in mu alone.
             ONPO bounds the average iterate's duality gap by O(1/T); the unregularised last-iterate analysis
             (Chen et al., arXiv 2512.24818: linear after a burn-in) needs a Nash equilibrium with full support,
             Wei et al. (arXiv 2006.09517) a unique one. g_k lies in [-1, 2], not a probability: in loss mode only the
             win-rate losses take it (rebel exactly, sppo with its usual log-partition approximation); ipo and dpo,
             whose target is a pair label, are refused, and so are the pair rules (their win rates are against the
             current samples only; ONPO's also need win rates against the previous iterate's samples).
    extragradient  extragradient / mirror prox (EGPO, Zhou et al., arXiv 2503.08942): a half step from the opponent
             mu_k, then the real step from the same centre against the half-step policy:
                 mu_{k+1/2} ~ C_k exp(eta * P(y > mu_k)),   mu_{k+1} ~ C_k exp(eta * P(y > mu_{k+1/2})).
             EGPO: last-iterate linear convergence to the regularised Nash (tau > 0). Two prox problems per
             iteration; in loss mode the second one's pairs are drawn from mu_{k+1/2} (as Nash-MD's from its mixture).
    mmd      magnetic mirror descent with a periodically updated magnet (MPO, Wang et al., arXiv 2410.16714; MMD:
             Sokota et al., arXiv 2206.05825): the KL to the magnet is inside the prox problem,
                 mu_{k+1} = argmax_q eta <q, P(y > mu_k)> - eta*tau KL(q || ref) - KL(q || mu_k)
                          ~ (mu_k ref^(eta*tau) exp(eta * P(y > mu_k)))^(1 / (1 + eta*tau)),
             and the magnet ref <- mu every ``ref_every`` steps. Where it differs from COMAL's reference advance: not
             in the advance (the same rule: the magnet becomes the current iterate every K steps, MPO's outer loop
             is the same proximal-point iteration as COMAL's) but in the inner step, which treats the KL to the magnet
             implicitly: its weights 1/(1 + eta*tau) on mu_k, eta*tau/(1 + eta*tau) on ref and eta/(1 + eta*tau) on
             the win rate are COMAL's explicit step (1 - eta'*tau, eta'*tau, eta') at eta' = eta / (1 + eta*tau).
             So mmd(eta, tau, K) is exactly comal(eta / (1 + eta*tau), tau, K): the same fixed points, a smaller step,
             and no eta*tau < 1 limit (the anchor weight stays below 1 for every eta). Loss mode solves COMAL's prox
             loss at beta = (1 + eta*tau)/eta.

``--mode closed-form`` applies the formula (in log space). ``--mode loss`` solves each step by minimising the
project's prox loss (comal_openrlhf.core.losses, ``--prox``) over a softmax policy, beta = 1/eta and r = eta*tau: the
tabular check that a loss implements the step. Its pairs (``--pairs``):

    exact       the exact expectation over y, y' ~ opponent x opponent, soft labels P[y][y'], win rates
                P(y > opponent): the distribution the prox loss is derived for.
    top2 | best_worst | sampled | all_soft
                the trainer's pair rules (comal_openrlhf.core.pairs.build_pairs with a TableJudge over P): each step
                minimises the loss EXPECTED over sample sets of ``--samples`` responses drawn from the opponent,
                exactly over every multiset with its multinomial probability (3 responses x 5 samples: 21 sets;
                ``sampled``'s draw and label by their exact law) or, past MAX_EXACT_SETS multisets, by Monte Carlo
                with the per-step standard error reported. The weights are normalised by the step's total (the
                iteration's total weight, a constant). sampled and all_soft reproduce the exact step (ipo, dpo
                and rebel, whose win rates leave the pair's two samples out; sppo weighs response y by
                mu(y) (1 - mu(y)), see comal_openrlhf.core.pairs); top2 and best_worst move the fixed point away from
                the Nash (``RulePairs.flow`` measures the pull).

The command line is ``python -m comal_openrlhf.cli.game``.
"""

import itertools
import math
import time

import numpy as np
import torch
from scipy.optimize import linprog
from scipy.special import gammaln

from comal_openrlhf.core.judging import TableJudge
from comal_openrlhf.core.losses import ProxLoss
from comal_openrlhf.core.matrix import load_matrix
from comal_openrlhf.core.pairs import RULES, build_pairs, pair_winrates, sampled_law
from comal_openrlhf.core.record import PairBatch

ALGOS = ("mwu", "inpo", "comal", "nash-md", "omwu", "extragradient", "mmd")
ADVANCING = ("comal", "mmd")  # the algorithms whose reference (magnet) advances every ref_every steps
WIN_RATE_PROX = ("rebel", "sppo")  # the losses that read a per-response payoff, which may leave [0, 1]
MODES = ("closed-form", "loss")
PAIR_RULES = ("exact",) + RULES
MAX_EXACT_SETS = 5000  # above this many multisets a rule's expectation is taken by Monte Carlo
MC_SETS = 2000  # sample sets per step in Monte Carlo


def paper_game():
    """The paper's synthetic game (arXiv 2410.23223): P(b>a) = 0.9, P(c>b) = 0.9, P(a>c) = 0.8."""
    return load_matrix("paper")


def solve_nash(P):
    """Exact symmetric Nash by LP: minimise t s.t. P p <= t, p in the simplex (optimum t = 1/2)."""
    n = len(P)
    c = np.zeros(n + 1)
    c[-1] = 1.0
    res = linprog(
        c,
        A_ub=np.hstack([P, -np.ones((n, 1))]),
        b_ub=np.zeros(n),
        A_eq=np.append(np.ones(n), 0.0)[None],
        b_eq=[1.0],
        bounds=[(0, None)] * n + [(None, None)],
        method="highs",
    )
    if not res.success:
        raise RuntimeError(f"Nash LP failed: {res.message}")
    p = np.clip(res.x[:n], 0.0, None)
    return p / p.sum()


def duality_gap(P, p):
    """2 max_i (P p)_i - 1: zero exactly at a Nash (the exploitability of p)."""
    return float(2 * np.max(P @ p) - 1)


def kl(p, q):
    """KL(p || q) with 0 log 0 = 0 (the paper's Lyapunov function is KL(nash || iterate))."""
    p, q = np.asarray(p, dtype=float), np.asarray(q, dtype=float)
    s = p > 0
    return float(np.sum(p[s] * (np.log(p[s]) - np.log(q[s]))))


def _normalise_log(x):
    """Log-space normalisation: (log p, p) for p ~ exp(x)."""
    x = x - x.max()
    e = np.exp(x)
    s = e.sum()
    return x - np.log(s), e / s


def exact_pairs(P, s):
    """The exact expectation over ordered pairs y, y' ~ s x s (rule ``exact``): every ordered pair (i, j) with weight
    s(i) s(j), soft label P[i][j] and the exact win rates (P s)_y. Returns the pair table (dict of arrays)."""
    n = len(P)
    i, j = (a.ravel() for a in np.meshgrid(np.arange(n), np.arange(n), indexing="ij"))
    wins = P @ s
    return {"i": i, "j": j, "wi": wins[i], "wj": wins[j], "soft": P[i, j], "weight": s[i] * s[j]}


def loss_step(P, log_mu, log_ref, eta, tau, prox="ipo", opponent=None, pairs=None):
    """One inner step by minimising the prox loss ``prox`` over a softmax policy; returns log mu_{k+1}.

    ``pairs`` is a weighted pair table (``exact_pairs``, ``RulePairs.expected``); default: the exact expectation
    over all ordered pairs (y, y') with weight s(y) s(y'), s = ``opponent`` (default mu). beta = 1/eta,
    r = eta*tau. The table's weights are scaled to sum 1 (the iteration's total weight: a constant, so the
    minimiser does not change). Solved with L-BFGS in float64 from the prox centre; the ipo and rebel objectives
    are quadratic in the logits, dpo is convex, sppo is smooth.
    """
    if pairs is None:
        pairs = exact_pairs(P, np.exp(log_mu) if opponent is None else opponent)
    return _solve(log_mu, log_ref, eta, tau, prox, pairs)[0]


def _solve(log_mu, log_ref, eta, tau, prox, table, set_of_pair=None, set_counts=None):
    """Minimise the weighted prox loss of ``table`` (weights scaled to sum 1) -> (log policy, stderr or None).

    With ``set_of_pair`` (the distinct Monte Carlo sample set of each pair) and ``set_counts`` (how many of the M
    draws gave each distinct set) it also returns the largest delta-method standard error of the returned
    log-probabilities: per-set gradients g_s at the solution, Cov(theta) = H^+ Cov(g_s) H^+ / M, mapped through the
    log-softmax (first order; the normaliser's own noise is left out).
    """
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float64)
    i, j = torch.as_tensor(table["i"], dtype=torch.long), torch.as_tensor(table["j"], dtype=torch.long)
    weight = np.asarray(table["weight"], dtype=np.float64)
    total = weight.sum()
    log_mu_t, log_ref_t = t(log_mu), t(log_ref)
    pairs = PairBatch(
        logp_mu_chosen=log_mu_t[i],
        logp_mu_rejected=log_mu_t[j],
        logp_ref_chosen=log_ref_t[i],
        logp_ref_rejected=log_ref_t[j],
        chosen_winrate=t(table["wi"]),
        rejected_winrate=t(table["wj"]),
        soft_label=t(table["soft"]),
        weight=t(weight / total if total > 0 else weight),
    )
    loss_fn = ProxLoss(prox, beta=1 / eta, ref_weight=eta * tau)
    theta = ((1 - eta * tau) * log_mu_t + eta * tau * log_ref_t).clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [theta], lr=1, max_iter=200, tolerance_grad=1e-13, tolerance_change=0.0, line_search_fn="strong_wolfe"
    )

    def objective(th):
        logp = torch.log_softmax(th, 0)
        return loss_fn(logp[i], logp[j], pairs, reduction_size=1)[0]

    def closure():
        opt.zero_grad()
        loss = objective(theta)
        loss.backward()
        return loss

    if len(weight):
        opt.step(closure)
    theta = theta.detach()
    logp = torch.log_softmax(theta, 0)
    if set_of_pair is None or set_counts.sum() < 2:
        return logp.numpy(), None
    # per-pair gradients with respect to the two log-probs (each pair's term depends on its own only), then to theta
    lw, ll = logp[i].clone().requires_grad_(True), logp[j].clone().requires_grad_(True)
    loss_fn(lw, ll, pairs, reduction_size=1)[0].backward()
    p = logp.exp()
    eye = torch.eye(len(p), dtype=torch.float64)
    per_pair = lw.grad[:, None] * (eye[i] - p) + ll.grad[:, None] * (eye[j] - p)
    m = torch.as_tensor(set_counts, dtype=torch.float64)
    M = m.sum()
    per_set = torch.zeros(len(m), len(p), dtype=torch.float64).index_add_(0, torch.as_tensor(set_of_pair), per_pair)
    per_set = per_set * (M / m)[:, None]  # a set's pairs carry weight m_s / M: g_s is one draw's gradient
    centred = per_set - (m[:, None] * per_set).sum(0) / M
    cov_g = (m[:, None, None] * centred[:, :, None] * centred[:, None, :]).sum(0) / (M - 1) / M
    H = torch.autograd.functional.hessian(objective, theta)
    Hp = torch.linalg.pinv(H, hermitian=True)
    J = eye - p[None, :]  # d log softmax / d theta
    cov = J @ Hp @ cov_g @ Hp @ J.T
    return logp.numpy(), float(torch.sqrt(torch.clamp(torch.diagonal(cov), min=0)).max())


def sample_sets(n, N):
    """Every multiset of N samples over n responses, as count vectors in lexicographic order
    (C(N + n - 1, n - 1) of them: 21 for 3 responses and 5 samples)."""
    out = []
    for bars in itertools.combinations(range(N + n - 1), n - 1):
        edges = (-1,) + bars + (N + n - 1,)
        out.append(tuple(edges[k + 1] - edges[k] - 1 for k in range(n)))
    return out


def _log_multinomial(counts, log_s):
    """log P(sample set with these counts) for N i.i.d. draws from s; counts is [sets, n]."""
    counts = np.asarray(counts, dtype=np.float64)
    coef = gammaln(counts.sum(1) + 1) - gammaln(counts + 1).sum(1)
    return coef + (counts * np.where(counts > 0, log_s, 0.0)).sum(1)


class RulePairs:
    """The pairs a rule builds from one sample set of the game, by ``comal_openrlhf.core.pairs.build_pairs`` with a
    TableJudge over P (one source of truth for the rules), cached per multiset of counts.

    A sample set is N responses; its pairs depend on the order of the samples only through ties in score (top2
    and best_worst keep the first appearance), so a multiset with tied scores is expanded over every order of
    first appearance of its distinct responses, each with its probability under a uniformly random order of the
    samples (the size-biased order: the next new response is u with probability c_u / (remaining samples)).
    ``sampled`` is not drawn: its exact law (``pairs.sampled_law``: every ordered pair with its probability and
    a hard label) replaces the draw, so the expectation over the draw and the judge's label is exact.
    """

    def __init__(self, P, rule, samples):
        if rule not in RULES:
            raise ValueError(f"unknown pair rule {rule!r}; choose one of {', '.join(PAIR_RULES)}")
        if not (isinstance(samples, int) and samples >= 2):
            raise ValueError(f"--samples must be an integer >= 2 (pairs need two samples), got {samples!r}")
        self.P, self.rule, self.samples = np.asarray(P, dtype=float), rule, samples
        self.labels = [f"y{k}" for k in range(len(self.P))]
        self.index = {lab: k for k, lab in enumerate(self.labels)}
        self.judge = TableJudge(self.P, self.labels, name="game")
        self.cache = {}

    def _build(self, sequence, rule=None):
        """build_pairs on one sample set (response indices in sample order) -> rows."""
        responses = [self.labels[k] for k in sequence]
        pairs, _ = build_pairs([("x", responses)], self.judge, rule or self.rule, both_orders=False)
        return [
            (
                self.index[p.chosen],
                self.index[p.rejected],
                p.chosen_winrate,
                p.rejected_winrate,
                p.soft_label,
                p.weight,
            )
            for p in pairs
        ]

    def of(self, counts):
        """Rows (i, j, win rate i, win rate j, soft label, weight) of one multiset: the expected pairs of a sample
        set with these counts (weights include the probability of each order of first appearance)."""
        counts = tuple(int(c) for c in counts)
        if counts in self.cache:
            return self.cache[counts]
        present = [k for k, c in enumerate(counts) if c]
        rows = []
        if len(present) >= 2:
            c = np.array([counts[k] for k in present], dtype=np.float64)
            W = self.P[np.ix_(present, present)]
            sequence = [k for k in present for _ in range(counts[k])]
            if self.rule == "all_soft":
                rows = self._build(sequence)
            elif self.rule == "sampled":
                law, weight = sampled_law(c, W)
                winrate = pair_winrates(c, W)  # per pair, leave-two-out, as build_pairs has it
                rows = [
                    (present[a], present[b], winrate[a, b], winrate[b, a], math.nan, weight * law[a, b])
                    for a in range(len(present))
                    for b in range(len(present))
                    if law[a, b] > 0
                ]
            elif len({round(x, 12) for x in W @ c}) == len(c):
                rows = self._build(sequence)  # no tie in score: the order of the samples does not matter
            else:
                for order in itertools.permutations(range(len(present))):
                    prob, left = 1.0, c.sum()
                    for a in order:
                        prob *= c[a] / left
                        left -= c[a]
                    sequence = [present[a] for a in order for _ in range(int(c[a]))]
                    rows += [(*r[:5], r[5] * prob) for r in self._build(sequence)]
        self.cache[counts] = rows
        return rows

    def table(self, count_rows, probs):
        """The pair table of a mixture of distinct sample sets (count vectors with probabilities): each pair's weight
        times its set's probability, and the set (row of ``count_rows``) of each pair."""
        blocks = [self._array(counts) for counts in count_rows]
        sizes = np.array([len(b) for b in blocks])
        rows = np.concatenate(blocks) if len(blocks) else np.zeros((0, 6))
        set_of_pair = np.repeat(np.arange(len(blocks)), sizes)
        weight = rows[:, 5] * np.asarray(probs, dtype=np.float64)[set_of_pair]
        i, j = rows[:, 0].astype(int), rows[:, 1].astype(int)
        return {"i": i, "j": j, "wi": rows[:, 2], "wj": rows[:, 3], "soft": rows[:, 4], "weight": weight}, set_of_pair

    def _array(self, counts):
        key = ("array",) + tuple(int(c) for c in counts)
        if key not in self.cache:
            self.cache[key] = np.array(self.of(counts), dtype=np.float64).reshape(-1, 6)
        return self.cache[key]

    def flow(self, s, sets=None):
        """Expected net chosen-minus-rejected frequency of each response per sample set under the policy s (a soft
        pair counts p for its chosen side and 1 - p for the other): zero for every response at a fixed point of the
        rule's expected pairs. Exact over all multisets unless ``sets`` (count vectors) is given."""
        sets = sample_sets(len(self.P), self.samples) if sets is None else sets
        probs = np.exp(_log_multinomial(sets, np.log(s)))
        out = np.zeros(len(self.P))
        for counts, prob in zip(sets, probs):
            for i, j, _, _, soft, w in self.of(counts):
                p = 1.0 if math.isnan(soft) else soft
                out[i] += prob * w * (2 * p - 1)
                out[j] -= prob * w * (2 * p - 1)
        return out


def rule_step(rp, log_mu, log_ref, eta, tau, prox, sampling, exact_sets=None, mc_sets=None, rng=None):
    """One inner step for a pair rule: minimise the loss expected over sample sets of ``rp.samples`` samples drawn
    from ``sampling`` (the policy the samples come from), exactly over ``exact_sets`` (all multisets) or by Monte
    Carlo over ``mc_sets`` sets drawn with ``rng``. Returns (log mu_{k+1}, Monte Carlo stderr of it or None)."""
    if exact_sets is not None:
        probs = np.exp(_log_multinomial(exact_sets, np.log(sampling)))
        table, _ = rp.table(exact_sets, probs)
        return _solve(log_mu, log_ref, eta, tau, prox, table)
    sets, set_counts = np.unique(rng.multinomial(rp.samples, sampling, size=mc_sets), axis=0, return_counts=True)
    table, set_of_pair = rp.table(sets, set_counts / mc_sets)
    return _solve(log_mu, log_ref, eta, tau, prox, table, set_of_pair, set_counts)


def run(
    P,
    algo="comal",
    mode="closed-form",
    prox="ipo",
    iters=5000,
    eta=1.0,
    tau=0.1,
    ref_every=200,
    init=None,
    record_every=None,
    pairs="exact",
    samples=5,
    mc_sets=None,
    seed=0,
    sample_temperature=1.0,
):
    """Run one algorithm from ``init`` (default uniform); returns the JSON-ready result dict.

    ``sample_temperature`` T: the opponent (the policy the samples and win rates come from) is the trained policy
    tempered, mu^(1/T) normalised, while the prox centre and the trained policy stay mu: what a trainer does when it
    samples at temperature T but takes every log-prob at 1. The fixed point is then a policy whose tempered version
    is a Nash (``sampled_duality_gap`` -> 0), not the trained policy itself (``duality_gap`` stalls).

    ``gaps`` holds [iteration, duality gap] every ``record_every`` steps (default ~200 points), plus the last one;
    ``average_gaps`` the same for the average iterate (1/k) sum_{j=1..k} mu_j (for extragradient the mu_j, not the
    half steps), the policy whose gap the no-regret bounds speak of.
    ``pairs`` (loss mode): ``exact`` is the exact expectation over y, y' ~ mu_k x mu_k; a rule of
    comal_openrlhf.core.pairs makes each step minimise the loss expected over sample sets of ``samples`` samples from
    the sampling policy, exactly over all multisets when there are at most MAX_EXACT_SETS of them (or ``mc_sets``
    is 0), else by Monte Carlo over ``mc_sets`` (default MC_SETS) sets per step drawn with ``seed``; the result then
    states ``mc_stderr``, the largest per-step standard error of log mu_{k+1} (delta method).
    """
    P = np.asarray(P, dtype=float)
    n = len(P)
    if algo not in ALGOS:
        raise ValueError(f"unknown algorithm {algo!r}; choose one of {', '.join(ALGOS)}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if algo == "mwu":
        tau = 0.0  # self-play: no regularisation
    if eta <= 0 or tau < 0 or not (algo == "mmd" or eta * tau < 1):  # mmd's anchor weight is below 1 for every eta
        raise ValueError(f"need eta > 0, tau >= 0 and eta*tau < 1, got eta={eta}, tau={tau}")
    if not (math.isfinite(sample_temperature) and sample_temperature > 0):
        raise ValueError(f"need a sample temperature > 0, got {sample_temperature}")
    if iters < 0 or ref_every < 1:
        raise ValueError(f"need iters >= 0 and ref_every >= 1, got {iters}, {ref_every}")
    if pairs not in PAIR_RULES:
        raise ValueError(f"unknown pair rule {pairs!r}; choose one of {', '.join(PAIR_RULES)}")
    if pairs != "exact" and mode != "loss":
        raise ValueError(f"pair rule {pairs!r} needs --mode loss (the closed form is the exact expectation)")
    if algo == "omwu" and mode == "loss":
        if prox not in WIN_RATE_PROX:
            raise ValueError(
                f"omwu in loss mode needs --prox rebel or sppo, got {prox!r}: its optimistic payoff "
                "2 P(y > mu_k) - P(y > mu_k-1) lies in [-1, 2], a regression target but not a pair label"
            )
        if pairs != "exact":
            raise ValueError(
                f"omwu does not model the pair rule {pairs!r} (its win rates against the previous iterate's samples "
                "are not built by the rules); use --pairs exact or --mode closed-form"
            )
    rp = exact_sets = rng = None
    if pairs != "exact":
        rp = RulePairs(P, pairs, samples)
        if prox in ("sppo", "rebel") and samples < 3:  # a pair's win rates need a sample outside the pair
            raise ValueError(f"--prox {prox} needs --samples >= 3 (leave-two-out win rates), got {samples}")
        n_sets = math.comb(samples + n - 1, n - 1)
        if mc_sets is None:
            mc_sets = 0 if n_sets <= MAX_EXACT_SETS else MC_SETS
        if not (isinstance(mc_sets, int) and (mc_sets == 0 or mc_sets >= 2)):
            raise ValueError(f"--mc-sets must be 0 (exact) or an integer >= 2, got {mc_sets!r}")
        if mc_sets == 0:
            exact_sets = sample_sets(n, samples)
        else:
            rng = np.random.default_rng(seed)
    mu = np.full(n, 1.0 / n) if init is None else np.asarray(init, dtype=float)
    if mu.shape != (n,) or not np.all(mu > 0):
        raise ValueError(f"init must be {n} positive numbers (a Nash must lie in its support), got {init}")
    log_mu, mu = _normalise_log(np.log(mu))
    log_ref = log_mu.copy()
    record_every = record_every or max(1, iters // 200)

    # mmd's implicit magnet step is COMAL's explicit step at eta / (1 + eta*tau) (module docstring)
    step_eta = eta / (1 + eta * tau) if algo == "mmd" else eta
    r = step_eta * tau

    def temper(s):  # sampled at T, trained at 1 (docstring)
        return s if sample_temperature == 1.0 else _normalise_log(np.log(s) / sample_temperature)[1]

    def prox_step(opp):
        """One prox step from the centre C_k against the opponent ``opp`` (whose samples the pairs are)."""
        nonlocal mc_stderr
        if mode == "closed-form":
            return _normalise_log(log_c + step_eta * (P @ opp))
        if rp is None:
            return _normalise_log(loss_step(P, log_mu, log_ref, step_eta, tau, prox, opp))
        step, se = rule_step(rp, log_mu, log_ref, step_eta, tau, prox, opp, exact_sets, mc_sets, rng)
        mc_stderr = max(mc_stderr, se or 0.0)
        return _normalise_log(step)

    mc_stderr = 0.0
    total = np.zeros(n)  # sum of the iterates, for the average iterate
    gaps = [[0, duality_gap(P, mu)]]
    average_gaps = [[0, duality_gap(P, mu)]]
    wins_prev = None  # omwu: P(y > mu_{k-1}) of the (tempered) previous opponent
    start = time.perf_counter()
    for k in range(1, iters + 1):
        log_c = (1 - r) * log_mu + r * log_ref  # prox centre (unnormalised)
        opp = temper(_normalise_log(log_c)[1] if algo == "nash-md" else mu)
        if algo == "omwu":
            wins = P @ opp
            payoff = 2 * wins - (wins if wins_prev is None else wins_prev)  # mu_{-1} = mu_0: the first step is MWU's
            wins_prev = wins
            if mode == "closed-form":
                log_mu, mu = _normalise_log(log_c + step_eta * payoff)
            else:  # rebel / sppo on the exact pairs y, y' ~ mu_k, the payoff in place of the win rates
                table = exact_pairs(P, opp)
                table["wi"], table["wj"] = payoff[table["i"]], payoff[table["j"]]
                log_mu, mu = _normalise_log(loss_step(P, log_mu, log_ref, step_eta, tau, prox, pairs=table))
        elif algo == "extragradient":
            half = prox_step(opp)[1]  # mu_{k+1/2}, from the centre C_k against mu_k
            log_mu, mu = prox_step(temper(half))  # mu_{k+1}, from the same centre against mu_{k+1/2}
        else:
            log_mu, mu = prox_step(opp)
        if algo in ADVANCING and k % ref_every == 0:
            log_ref = log_mu.copy()  # reference advance: next round's regularised game is centred here
        total += mu
        if k % record_every == 0 or k == iters:
            gaps.append([k, duality_gap(P, mu)])
            average_gaps.append([k, duality_gap(P, total / k)])
    seconds = time.perf_counter() - start

    nash = solve_nash(P)
    tempered = _normalise_log(log_mu / sample_temperature)[1]  # from the log-probs: finite where mu underflowed to 0
    return {
        "algo": algo,
        "mode": mode,
        "prox": prox if mode == "loss" else None,
        "eta": eta,
        "tau": tau,
        "ref_every": ref_every if algo in ADVANCING else None,
        "pairs": pairs,
        "samples": samples if rp else None,
        "sample_sets": None if rp is None else (f"monte carlo, {mc_sets} per step" if mc_sets else "exact"),
        "mc_stderr": mc_stderr if rp is not None and mc_sets else None,
        "iterations": iters,
        "policy": mu.tolist(),
        "nash": nash.tolist(),
        "duality_gap": duality_gap(P, mu),
        "sample_temperature": sample_temperature,
        "sampled_duality_gap": duality_gap(P, tempered),
        "kl_to_nash": kl(nash, mu),
        "gaps": gaps,
        "average_duality_gap": average_gaps[-1][1],
        "average_gaps": average_gaps,
        "seconds": seconds,
    }
