"""Tabular game lab for COMAL (Liu et al., arXiv 2410.23223; shared/spec/COMAL.md sections 1-4).

One prompt, n responses, a preference matrix P[i][j] = P(i beats j) with P + P^T = 1. Every algorithm is the
inner step of the KL-regularised game (COMAL.md section 2, the paper's prox / mirror-descent update)

    mu_{k+1}(y)  ~  mu_k(y)^(1 - eta*tau) * ref(y)^(eta*tau) * exp(eta * P(y > opponent))

and they differ only in tau, the reference and the opponent:

    mwu      tau = 0 (iterative DPO/IPO/SPPO self-play); opponent mu_k. Cycles, no last-iterate convergence.
    inpo     ref = start policy forever; opponent mu_k. Converges to the regularised Nash: constant gap.
    comal    ref <- current iterate every K steps (conceptual prox method); opponent mu_k. Gap -> 0.
    nash-md  Nash-MD (Munos et al. 2023): ref = start policy forever, and the opponent is the geometric mixture
             m_k ~ mu_k^(1 - eta*tau) ref^(eta*tau), which is also the prox centre, so
             mu_{k+1} ~ m_k exp(eta * P(y > m_k)). Regularised like INPO: constant gap.

``--mode closed-form`` applies the formula (in log space). ``--mode loss`` solves each step by minimising the
project's prox loss (comal_openrlhf.losses, ``--prox``) over a softmax policy, with the exact expectation over
pairs y, y' ~ opponent, soft labels P[y][y'] and win rates P(y > opponent), beta = 1/eta and r = eta*tau: the
tabular check that a loss implements the step (COMAL.md section 4).

    python -m comal_openrlhf.game                                   # COMAL on the paper's 3-response game
    python -m comal_openrlhf.game --algo inpo --init 0.6,0.3,0.1 --json
    python -m comal_openrlhf.game --mode loss --prox rebel --iters 1000
    python -m comal_openrlhf.game --matrix my_game.json --plot gap.png
"""

import argparse
import json
import os
import sys
import time

import numpy as np
from scipy.optimize import linprog

ALGOS = ("mwu", "inpo", "comal", "nash-md")
MODES = ("closed-form", "loss")


class MatrixError(ValueError):
    """A preference-matrix file that cannot be used (missing, unreadable or not a preference matrix)."""


def paper_game():
    """The paper's synthetic game (COMAL.md section 3): P(b>a) = 0.9, P(c>b) = 0.9, P(a>c) = 0.8."""
    P = np.array([[0.5, 0.1, 0.8], [0.9, 0.5, 0.1], [0.2, 0.9, 0.5]])
    return P, ["a", "b", "c"]


def load_matrix(spec):
    """``"paper"`` or a JSON file ``{"P": [[...]], "labels": [...]}`` -> (P, labels). Raises MatrixError."""
    if spec == "paper":
        return paper_game()
    try:
        with open(spec) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise MatrixError(f"{spec}: no such matrix file") from None
    except (OSError, ValueError) as e:
        raise MatrixError(f"{spec}: cannot read JSON ({e})") from None
    if not isinstance(data, dict) or "P" not in data:
        raise MatrixError(f'{spec}: expected an object {{"P": [[...]], "labels": [...]}}')
    try:
        P = np.array(data["P"], dtype=float)
    except (TypeError, ValueError):
        raise MatrixError(f"{spec}: P must be a square list of lists of numbers") from None
    if P.ndim != 2 or P.shape[0] != P.shape[1] or P.shape[0] < 1:
        raise MatrixError(f"{spec}: P must be square, got shape {P.shape}")
    bad = np.argwhere(~((P >= 0) & (P <= 1)))  # also catches NaN
    if len(bad):
        i, j = bad[0]
        raise MatrixError(f"{spec}: entry ({i}, {j}) = {P[i, j]} is not a probability in [0, 1]")
    bad = np.argwhere(np.abs(P + P.T - 1) > 1e-6)
    if len(bad):
        i, j = bad[0]
        raise MatrixError(
            f"{spec}: entries ({i}, {j}) = {P[i, j]} and ({j}, {i}) = {P[j, i]} break P + P^T = 1 (tolerance 1e-6)"
        )
    labels = data.get("labels", [str(i) for i in range(len(P))])
    if not isinstance(labels, list) or len(labels) != len(P):
        raise MatrixError(f"{spec}: labels must be a list of {len(P)} names")
    return P, [str(x) for x in labels]


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
    """2 max_i (P p)_i - 1: zero exactly at a Nash (COMAL.md section 1)."""
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


def loss_step(P, log_mu, log_ref, eta, tau, prox="ipo", opponent=None):
    """One inner step by minimising the prox loss ``prox`` over a softmax policy; returns log mu_{k+1}.

    Exact expectation over all ordered pairs (y, y') with weight s(y) s(y'), s = opponent (default mu): soft
    label P[y][y'] and win rates (P s)_y. beta = 1/eta, r = eta*tau. Solved with L-BFGS in float64 from the prox
    centre; the ipo and rebel objectives are quadratic in the logits, dpo is convex, sppo is smooth.
    """
    import torch

    from comal_openrlhf.losses import ProxLoss
    from comal_openrlhf.record import PairBatch

    n = len(P)
    s = np.exp(log_mu) if opponent is None else opponent
    i, j = (a.ravel() for a in np.meshgrid(np.arange(n), np.arange(n), indexing="ij"))
    t = lambda a: torch.as_tensor(np.asarray(a), dtype=torch.float64)
    log_mu_t, log_ref_t, wins = t(log_mu), t(log_ref), t(P @ s)
    pairs = PairBatch(
        logp_mu_chosen=log_mu_t[i],
        logp_mu_rejected=log_mu_t[j],
        logp_ref_chosen=log_ref_t[i],
        logp_ref_rejected=log_ref_t[j],
        chosen_winrate=wins[i],
        rejected_winrate=wins[j],
        soft_label=t(P[i, j]),
        weight=t(s[i] * s[j]),  # the exact expectation over ordered pairs y, y' ~ s (weights sum to 1)
    )
    loss_fn = ProxLoss(prox, beta=1 / eta, ref_weight=eta * tau)
    theta = ((1 - eta * tau) * log_mu_t + eta * tau * log_ref_t).clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [theta], lr=1, max_iter=200, tolerance_grad=1e-13, tolerance_change=0.0, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        logp = torch.log_softmax(theta, 0)
        loss = loss_fn(logp[i], logp[j], pairs, reduction_size=1)[0]
        loss.backward()
        return loss

    opt.step(closure)
    return torch.log_softmax(theta.detach(), 0).numpy()


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
):
    """Run one algorithm from ``init`` (default uniform); returns the JSON-ready result dict.

    ``gaps`` holds [iteration, duality gap] every ``record_every`` steps (default ~200 points), plus the last one.
    """
    P = np.asarray(P, dtype=float)
    n = len(P)
    if algo not in ALGOS:
        raise ValueError(f"unknown algorithm {algo!r}; choose one of {', '.join(ALGOS)}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if algo == "mwu":
        tau = 0.0  # self-play: no regularisation
    if eta <= 0 or tau < 0 or not eta * tau < 1:
        raise ValueError(f"need eta > 0, tau >= 0 and eta*tau < 1, got eta={eta}, tau={tau}")
    if iters < 0 or ref_every < 1:
        raise ValueError(f"need iters >= 0 and ref_every >= 1, got {iters}, {ref_every}")
    mu = np.full(n, 1.0 / n) if init is None else np.asarray(init, dtype=float)
    if mu.shape != (n,) or not np.all(mu > 0):
        raise ValueError(f"init must be {n} positive numbers (a Nash must lie in its support), got {init}")
    log_mu, mu = _normalise_log(np.log(mu))
    log_ref = log_mu.copy()
    record_every = record_every or max(1, iters // 200)

    r = eta * tau
    gaps = [[0, duality_gap(P, mu)]]
    start = time.perf_counter()
    for k in range(1, iters + 1):
        log_c = (1 - r) * log_mu + r * log_ref  # prox centre (unnormalised)
        opp = _normalise_log(log_c)[1] if algo == "nash-md" else mu
        if mode == "closed-form":
            log_mu, mu = _normalise_log(log_c + eta * (P @ opp))
        else:
            log_mu, mu = _normalise_log(loss_step(P, log_mu, log_ref, eta, tau, prox, opp))
        if algo == "comal" and k % ref_every == 0:
            log_ref = log_mu.copy()  # reference advance: next round's regularised game is centred here
        if k % record_every == 0 or k == iters:
            gaps.append([k, duality_gap(P, mu)])
    seconds = time.perf_counter() - start

    nash = solve_nash(P)
    return {
        "algo": algo,
        "mode": mode,
        "prox": prox if mode == "loss" else None,
        "eta": eta,
        "tau": tau,
        "ref_every": ref_every if algo == "comal" else None,
        "iterations": iters,
        "policy": mu.tolist(),
        "nash": nash.tolist(),
        "duality_gap": duality_gap(P, mu),
        "kl_to_nash": kl(nash, mu),
        "gaps": gaps,
        "seconds": seconds,
    }


def _plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    it, gap = np.array(result["gaps"]).T
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogy(it, np.maximum(gap, 1e-16))
    ax.set(xlabel="iteration", ylabel="duality gap", title=f"{result['algo']} ({result['mode']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m comal_openrlhf.game", description=__doc__.split("\n\n")[0])
    ap.add_argument("--algo", choices=ALGOS, default="comal", help="update rule (mwu ignores --tau)")
    ap.add_argument("--matrix", default="paper", help='"paper" or a JSON file {"P": [[...]], "labels": [...]}')
    ap.add_argument("--mode", choices=MODES, default="closed-form", help="apply the formula or minimise --prox")
    ap.add_argument("--prox", choices=("ipo", "dpo", "sppo", "rebel"), default="ipo", help="loss for --mode loss")
    ap.add_argument("--iters", type=int, default=5000, help="inner steps")
    ap.add_argument("--eta", type=float, default=1.0, help="step size (beta = 1/eta)")
    ap.add_argument("--tau", type=float, default=0.1, help="KL strength towards the reference (r = eta*tau)")
    ap.add_argument("--ref-every", type=int, default=200, help="COMAL: advance the reference every K steps")
    ap.add_argument("--init", default=None, help="start policy p1,p2,... (default uniform; normalised)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--plot", default=None, metavar="FILE.png", help="save the duality gap vs iteration")
    args = ap.parse_args(argv)

    try:
        P, labels = load_matrix(args.matrix)
        try:
            init = None if args.init is None else [float(x) for x in args.init.split(",")]
        except ValueError:
            raise ValueError(f"--init must be comma-separated numbers, got {args.init!r}") from None
        result = run(P, args.algo, args.mode, args.prox, args.iters, args.eta, args.tau, args.ref_every, init)
        if args.plot:
            os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
            _plot(result, args.plot)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    result["labels"] = labels
    if args.json:
        print(json.dumps(result))
        return 0
    fmt = lambda p: ", ".join(f"{lab}={x:.6f}" for lab, x in zip(labels, p))
    it = result["iterations"]
    print(f"{args.algo} ({args.mode}{', ' + args.prox if args.mode == 'loss' else ''}), {it} steps, eta={args.eta}")
    print(f"  policy       {fmt(result['policy'])}")
    print(f"  Nash (LP)    {fmt(result['nash'])}")
    print(f"  duality gap  {result['duality_gap']:.3e}   KL(nash||policy) {result['kl_to_nash']:.3e}")
    print(f"  time         {result['seconds']:.3f} s ({result['seconds'] / max(it, 1) * 1e6:.1f} us/step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
