"""Reproduce the synthetic figure of COMAL (Liu et al., arXiv 2410.23223) and show what the pair rule does to it.

Default: duality gap vs iteration on the paper's 3-response game (P(b>a) = 0.9, P(c>b) = 0.9, P(a>c) = 0.8) for
MWU (self-play on the win rate: iterative IPO/SPPO), INPO, Nash-MD and COMAL, from the uniform start and from
(0.6, 0.3, 0.1), with the closed-form inner step mu_{k+1} ~ mu_k^(1-eta*tau) ref^(eta*tau) exp(eta P mu_k),
eta = 1, tau = 0.1, and COMAL's reference advanced every K = 200 steps. Writes game_figure.png and game_figure.md
(the table of final gaps, also printed) under --out.

``--pair-rules``: COMAL in loss mode (ipo prox) with each pair rule of the trainer (comal_openrlhf.core.pairs),
every step minimising the loss expected over all sample sets of --samples samples (``python -m
comal_openrlhf.cli.game --pairs``), against the exact expectation over y, y' ~ mu_k x mu_k; K = 50 and 600 steps
unless given. Writes game_pairs.png and game_pairs.md.

    python examples/game_figure.py                  # -> examples/out/game_figure.{png,md}
    python examples/game_figure.py --out /tmp/fig --iters 2000
    python examples/game_figure.py --pair-rules     # -> examples/out/game_pairs.{png,md}
"""

import argparse
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from comal_openrlhf.core.game import paper_game, run

ALGOS = ("mwu", "inpo", "nash-md", "comal")
RULES = ("exact", "sampled", "all_soft", "top2", "best_worst")
STARTS = {"uniform": None, "(0.6, 0.3, 0.1)": [0.6, 0.3, 0.1]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="examples/out", help="output folder")
    ap.add_argument(
        "--iters", type=int, default=None, help="inner steps per run (default 5000; 600 with --pair-rules)"
    )
    ap.add_argument("--eta", type=float, default=1.0)
    ap.add_argument("--tau", type=float, default=0.1)
    ap.add_argument(
        "--ref-every",
        type=int,
        default=None,
        help="COMAL reference advance period K (default 200; 50 with --pair-rules)",
    )
    ap.add_argument("--pair-rules", action="store_true", help="compare the pair rules (COMAL, loss mode)")
    ap.add_argument("--samples", type=int, default=5, help="samples per prompt for --pair-rules")
    args = ap.parse_args()
    iters = args.iters or (600 if args.pair_rules else 5000)
    ref_every = args.ref_every or (50 if args.pair_rules else 200)
    os.makedirs(args.out, exist_ok=True)

    P, _ = paper_game()
    fig, axes = plt.subplots(1, len(STARTS), figsize=(11, 4), sharey=True)
    what = "pair rule" if args.pair_rules else "algorithm"
    rows = [f"| {what} | start | final duality gap | KL(nash \\|\\| policy) | seconds |", "|---|---|---|---|---|"]
    for ax, (start, init) in zip(axes, STARTS.items()):
        for name in RULES if args.pair_rules else ALGOS:
            kw = {"eta": args.eta, "tau": args.tau, "ref_every": ref_every, "init": init}
            if args.pair_rules:
                kw.update(algo="comal", mode="loss", prox="ipo", pairs=name, samples=args.samples)
            else:
                kw.update(algo=name)
            res = run(P, iters=iters, record_every=max(1, iters // 1000), **kw)
            it, gap = np.array(res["gaps"]).T
            style = {"sampled": "--", "all_soft": ":"}.get(name, "-")  # they overlap the exact expectation
            ax.semilogy(it, np.maximum(gap, 1e-16), style, label=name)  # the gap can round to 0 at the Nash
            rows.append(
                f"| {name} | {start} | {res['duality_gap']:.3e} | {res['kl_to_nash']:.3e} | {res['seconds']:.1f} |"
            )
        ax.set(title=f"start {start}", xlabel="iteration")
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel("duality gap  2 max(P p) - 1")
    axes[0].legend()
    setting = f"eta={args.eta}, tau={args.tau}, COMAL K={ref_every}, {iters} steps"
    if args.pair_rules:
        setting += f", loss mode (ipo), expectation over all {args.samples}-sample sets"
    fig.suptitle(f"paper game, {setting}")
    fig.tight_layout()
    stem = "game_pairs" if args.pair_rules else "game_figure"
    png = os.path.join(args.out, stem + ".png")
    fig.savefig(png, dpi=120)

    table = "\n".join(rows) + "\n"
    with open(os.path.join(args.out, stem + ".md"), "w") as f:
        f.write(f"Final duality gaps ({setting}).\n\n")
        f.write(table)
    print(table)
    print(f"wrote {png} and {os.path.join(args.out, stem + '.md')}")


if __name__ == "__main__":
    main()
