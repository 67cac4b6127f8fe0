"""Reproduce the synthetic figure of COMAL (Liu et al., arXiv 2410.23223; shared/spec/COMAL.md section 3).

Duality gap vs iteration on the paper's 3-response game (P(b>a) = 0.9, P(c>b) = 0.9, P(a>c) = 0.8) for MWU
(iterative DPO/IPO self-play), INPO, Nash-MD and COMAL, from the uniform start and from (0.6, 0.3, 0.1), with the
closed-form inner step mu_{k+1} ~ mu_k^(1-eta*tau) ref^(eta*tau) exp(eta P mu_k), eta = 1, tau = 0.1, and COMAL's
reference advanced every K = 200 steps. Writes game_figure.png and game_figure.md (the table of final gaps, also
printed) under --out.

    python examples/game_figure.py                  # -> examples/out/game_figure.{png,md}
    python examples/game_figure.py --out /tmp/fig --iters 2000
"""

import argparse
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from comal_openrlhf.game import paper_game, run

ALGOS = ("mwu", "inpo", "nash-md", "comal")
STARTS = {"uniform": None, "(0.6, 0.3, 0.1)": [0.6, 0.3, 0.1]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="examples/out", help="output folder")
    ap.add_argument("--iters", type=int, default=5000, help="inner steps per run")
    ap.add_argument("--eta", type=float, default=1.0)
    ap.add_argument("--tau", type=float, default=0.1)
    ap.add_argument("--ref-every", type=int, default=200, help="COMAL reference advance period K")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)

    P, _ = paper_game()
    fig, axes = plt.subplots(1, len(STARTS), figsize=(11, 4), sharey=True)
    rows = ["| algorithm | start | final duality gap | KL(nash \\|\\| policy) |", "|---|---|---|---|"]
    for ax, (start, init) in zip(axes, STARTS.items()):
        for algo in ALGOS:
            kw = {"eta": args.eta, "tau": args.tau, "ref_every": args.ref_every, "init": init}
            res = run(P, algo, iters=args.iters, record_every=max(1, args.iters // 1000), **kw)
            it, gap = np.array(res["gaps"]).T
            ax.semilogy(it, np.maximum(gap, 1e-16), label=algo)  # the gap can round to 0 at the Nash
            rows.append(f"| {algo} | {start} | {res['duality_gap']:.3e} | {res['kl_to_nash']:.3e} |")
        ax.set(title=f"start {start}", xlabel="iteration")
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel("duality gap  2 max(P p) - 1")
    axes[0].legend()
    fig.suptitle(f"paper game, eta={args.eta}, tau={args.tau}, COMAL K={args.ref_every}")
    fig.tight_layout()
    png = os.path.join(args.out, "game_figure.png")
    fig.savefig(png, dpi=120)

    table = "\n".join(rows) + "\n"
    with open(os.path.join(args.out, "game_figure.md"), "w") as f:
        f.write(
            f"Final duality gaps after {args.iters} steps (eta={args.eta}, tau={args.tau}, K={args.ref_every}).\n\n"
        )
        f.write(table)
    print(table)
    print(f"wrote {png} and {os.path.join(args.out, 'game_figure.md')}")


if __name__ == "__main__":
    main()
