"""The tabular game lab as a command (the lab itself: ``comal_openrlhf.core.game``): every algorithm of the lab on
the paper's game or a matrix file, in closed form or by minimising the project's prox losses on tabular policies,
with the duality gap of the last iterate.

    python -m comal_openrlhf.cli.game                                   # COMAL on the paper's 3-response game
    python -m comal_openrlhf.cli.game --algo inpo --init 0.6,0.3,0.1 --json
    python -m comal_openrlhf.cli.game --mode loss --prox rebel --iters 1000
    python -m comal_openrlhf.cli.game --pairs top2 --samples 5 --ref-every 50 --iters 600   # loss mode implied
    python -m comal_openrlhf.cli.game --matrix my_game.json --plot gap.png
    python -m comal_openrlhf.cli.game --algo omwu --tau 0                 # optimistic MWU (ONPO) on the game itself
"""

import argparse
import os
import sys

import matplotlib
import numpy as np

from comal_openrlhf.cli.common import json_stdout
from comal_openrlhf.core.game import ALGOS, MAX_EXACT_SETS, MC_SETS, MODES, PAIR_RULES, run
from comal_openrlhf.core.matrix import load_matrix


def _plot(result, path):
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the backend

    it, gap = np.array(result["gaps"]).T
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.semilogy(it, np.maximum(gap, 1e-16))
    ax.set(xlabel="iteration", ylabel="duality gap", title=f"{result['algo']} ({result['mode']})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m comal_openrlhf.cli.game", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--algo",
        choices=ALGOS,
        default="comal",
        help="update rule; mwu = self-play MWU on the win rate (iterative IPO/SPPO, not iterative DPO), ignores --tau",
    )
    ap.add_argument("--matrix", default="paper", help='"paper" or a JSON file {"P": [[...]], "labels": [...]}')
    ap.add_argument(
        "--mode", choices=MODES, default=None, help="apply the formula or minimise --prox (default: loss with --pairs)"
    )
    ap.add_argument("--prox", choices=("ipo", "dpo", "sppo", "rebel"), default="ipo", help="loss for --mode loss")
    ap.add_argument(
        "--pairs",
        choices=PAIR_RULES,
        default="exact",
        help="pairs of each step: exact expectation over y, y' ~ mu_k x mu_k, or a pair rule of the trainer, its loss "
        "expected over sample sets of --samples samples",
    )
    ap.add_argument("--samples", type=int, default=5, help="samples per prompt for --pairs RULE (official: 5)")
    ap.add_argument(
        "--mc-sets",
        type=int,
        default=None,
        help=f"sample sets per step by Monte Carlo (0 = exact; default exact up to {MAX_EXACT_SETS} multisets, "
        f"else {MC_SETS})",
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the Monte Carlo sample sets")
    ap.add_argument(
        "--sample-temperature",
        type=float,
        default=1.0,
        help="sample the opponent at this temperature while training at 1 (a trainer's --rollout.temperature "
        "other than 1): the tempered policy, not the trained one, goes to the Nash",
    )
    ap.add_argument("--iters", type=int, default=5000, help="inner steps")
    ap.add_argument("--eta", type=float, default=1.0, help="step size (beta = 1/eta)")
    ap.add_argument("--tau", type=float, default=0.1, help="KL strength towards the reference (r = eta*tau)")
    ap.add_argument(
        "--ref-every", type=int, default=200, help="comal, mmd: advance the reference (magnet) every K steps"
    )
    ap.add_argument("--init", default=None, help="start policy p1,p2,... (default uniform; normalised)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--plot", default=None, metavar="FILE.png", help="save the duality gap vs iteration")
    args = ap.parse_args(argv)
    with json_stdout(args.json) as emit:  # --json: stdout holds the JSON object only, any other print goes to stderr
        return _main(args, emit)


def _main(args, emit):
    try:
        P, labels = load_matrix(args.matrix)
        try:
            init = None if args.init is None else [float(x) for x in args.init.split(",")]
        except ValueError:
            raise ValueError(f"--init must be comma-separated numbers, got {args.init!r}") from None
        mode = args.mode or ("closed-form" if args.pairs == "exact" else "loss")
        result = run(
            P,
            args.algo,
            mode,
            args.prox,
            args.iters,
            args.eta,
            args.tau,
            args.ref_every,
            init,
            pairs=args.pairs,
            samples=args.samples,
            mc_sets=args.mc_sets,
            seed=args.seed,
            sample_temperature=args.sample_temperature,
        )
        if args.plot:
            os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
            _plot(result, args.plot)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    result["labels"] = labels
    if args.json:
        emit(result)
        return 0
    fmt = lambda p: ", ".join(f"{lab}={x:.6f}" for lab, x in zip(labels, p))
    it = result["iterations"]
    how = f"{mode}, {args.prox}" if mode == "loss" else mode
    if result["sample_sets"]:
        how += f", pairs {args.pairs} over {args.samples}-sample sets ({result['sample_sets']})"
    print(f"{args.algo} ({how}), {it} steps, eta={args.eta}")
    print(f"  policy       {fmt(result['policy'])}")
    print(f"  Nash (LP)    {fmt(result['nash'])}")
    print(f"  duality gap  {result['duality_gap']:.3e}   KL(nash||policy) {result['kl_to_nash']:.3e}")
    print(f"  average iterate's duality gap {result['average_duality_gap']:.3e}")
    if args.sample_temperature != 1.0:
        print(f"  sampled at T={args.sample_temperature}: its duality gap {result['sampled_duality_gap']:.3e}")
    if result["mc_stderr"] is not None:
        print(f"  Monte Carlo  largest per-step standard error of log mu_k+1: {result['mc_stderr']:.1e}")
    print(f"  time         {result['seconds']:.3f} s ({result['seconds'] / max(it, 1) * 1e6:.1f} us/step)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
