"""The tabular game lab as a command (the lab itself: ``comal_openrlhf.core.game``): every algorithm of the lab on
the paper's game or a matrix file, in closed form or by minimising the project's prox losses on tabular policies,
with the duality gap of the last iterate.

    python -m comal_openrlhf.cli.game                                   # COMAL on the paper's 3-response game
    python -m comal_openrlhf.cli.game --algo inpo --init 0.6,0.3,0.1 --json
    python -m comal_openrlhf.cli.game --mode loss --prox rebel --iters 1000
    python -m comal_openrlhf.cli.game --pairs top2 --samples 5 --ref-every 50 --iters 600   # loss mode implied
    python -m comal_openrlhf.cli.game --matrix my_game.json --plot gap.png
    python -m comal_openrlhf.cli.game --algo omwu --tau 0                 # optimistic MWU (ONPO) on the game itself
    python -m comal_openrlhf.cli.game bench --plot docs/img/game_bench.png --doc docs/game-lab.md   # make game-bench

``bench``: every algorithm on the paper's game and on full-support and small-support skew-symmetric games generated
by seed (comal_openrlhf.core.game_bench), the same eta, tau and budget for all; prints a markdown table of the gap
after T steps, the steps to reach 1e-3 and 1e-6, and whether the last iterate converges or only the average does.
"""

import argparse
import os
import sys

import matplotlib
import numpy as np

from comal_openrlhf.cli.common import json_stdout
from comal_openrlhf.core.game import ALGOS, MAX_EXACT_SETS, MC_SETS, MODES, PAIR_RULES, run
from comal_openrlhf.core.game_bench import FAMILIES, THRESHOLDS, bench_games, markdown_table, run_bench, summarise
from comal_openrlhf.core.matrix import load_matrix

BENCH_BEGIN, BENCH_END = "<!-- game-bench:begin -->", "<!-- game-bench:end -->"


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


def _plot_bench(records, path):
    """Per family (columns): the median over the family's games of the gap at every step, per algorithm, of the last
    iterate (top row) and of the average iterate (bottom row). Algorithms that coincide (comal and mmd; omwu and
    extragradient) are drawn thick and dotted over each other."""
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # after choosing the backend

    fig, axes = plt.subplots(2, len(FAMILIES), figsize=(16, 8), sharey="row", sharex=True)
    labels = list(dict.fromkeys(r["label"] for r in records))
    colours = {algo: plt.cm.tab10(i % 10) for i, algo in enumerate(dict.fromkeys(r["algo"] for r in records))}
    for col, family in enumerate(FAMILIES):
        rs = [r for r in records if r["family"] == family]
        games = len({r["game"] for r in rs})
        for lab in labels:
            runs = [r for r in rs if r["label"] == lab]
            if not runs:
                continue
            algo, tau = runs[0]["algo"], runs[0]["tau"]
            regularised = tau > 0 and algo in ("omwu", "extragradient")
            style = {"mmd": ":", "extragradient": ":", "nash-md": "--"}.get(algo, "-")
            style = "-." if regularised else style
            width = 2.6 if algo in ("comal", "omwu") and not regularised else 1.3
            for row, key in enumerate(("curve", "average_curve")):
                median = np.median(np.maximum(np.array([r[key] for r in runs]), 1e-16), axis=0)
                axes[row, col].semilogy(median, style, color=colours[algo], lw=width, label=lab)
        axes[0, col].set_title(f"{family} ({games} game{'s' if games > 1 else ''}, median)")
        axes[1, col].set_xlabel("iteration")
    axes[0, 0].set_ylabel("duality gap, last iterate")
    axes[1, 0].set_ylabel("duality gap, average iterate")
    axes[0, 0].set_ylim(1e-16, 2)
    axes[1, -1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _page_parts(page):
    """(text before and including the begin marker, text from the end marker on) of ``page``; ValueError unless it
    has one begin marker followed by one end marker."""
    with open(page, encoding="utf-8") as f:
        text = f.read()
    if text.count(BENCH_BEGIN) != 1 or text.count(BENCH_END) != 1 or text.index(BENCH_BEGIN) > text.index(BENCH_END):
        raise ValueError(f"--doc {page}: needs one {BENCH_BEGIN} line followed by one {BENCH_END} line")
    head, rest = text.split(BENCH_BEGIN)
    return head + BENCH_BEGIN + "\n", BENCH_END + rest.split(BENCH_END)[1]


def bench_main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m comal_openrlhf.cli.game bench",
        description="every algorithm of the game lab on generated games and the paper's, on one footing",
    )
    ap.add_argument("--games", type=int, default=5, help="games per generated family (n evenly spaced over 3..20)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the generated games")
    ap.add_argument("--iters", type=int, default=10000, help="steps per run (T)")
    ap.add_argument("--eta", type=float, default=1.0, help="step size of every algorithm")
    ap.add_argument(
        "--tau",
        type=float,
        default=0.1,
        help="KL strength of the regularised runs (mwu, omwu, extragradient also run at tau 0)",
    )
    ap.add_argument("--ref-every", type=int, default=200, help="comal and mmd: reference / magnet advance period K")
    ap.add_argument("--md", default=None, metavar="FILE.md", help="write the table here")
    ap.add_argument(
        "--doc",
        default=None,
        metavar="PAGE.md",
        help=f"replace the table between {BENCH_BEGIN} and {BENCH_END} in PAGE",
    )
    ap.add_argument("--plot", default=None, metavar="FILE.png", help="save the median gap curves per family")
    ap.add_argument("--json", action="store_true", help="print one JSON object (per-run results and the summary)")
    args = ap.parse_args(argv)
    with json_stdout(args.json) as emit:
        try:
            if args.games < 1:
                raise ValueError(f"--games must be >= 1, got {args.games}")
            if args.doc:
                _page_parts(args.doc)  # checked before the runs, written after
            games = bench_games(args.games, args.seed)

            def progress(game, runs):
                seconds = sum(r["seconds"] for r in runs)
                print(f"[bench] {game['name']}: {len(runs)} runs, {seconds:.1f} s", file=sys.stderr, flush=True)

            records = run_bench(games, args.iters, args.eta, args.tau, args.ref_every, progress=progress)
            summary = summarise(records)
            table = markdown_table(summary, args.iters, args.eta, args.tau, args.ref_every, args.seed, args.games)
            for path in (args.md, args.plot):
                if path:
                    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            if args.md:
                with open(args.md, "w", encoding="utf-8") as f:
                    f.write(table)
            if args.doc:
                head, tail = _page_parts(args.doc)
                with open(args.doc, "w", encoding="utf-8") as f:
                    f.write(head + table + tail)
            if args.plot:
                _plot_bench(records, args.plot)
        except (ValueError, OSError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if args.json:
            keys = lambda d: {f"{thr:.0e}": v for thr, v in d.items()}
            runs = [{**{k: v for k, v in r.items() if "curve" not in k}, "steps": keys(r["steps"])} for r in records]
            emit({"runs": runs, "summary": [{**row, "steps": keys(row["steps"])} for row in summary]})
            return 0
        print(table, end="")
        seconds = sum(r["seconds"] for r in records)
        print(f"\n{len(records)} runs, {seconds:.1f} s of steps; thresholds {', '.join(f'{t:g}' for t in THRESHOLDS)}")
        return 0


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        return bench_main(argv[1:])
    ap = argparse.ArgumentParser(
        prog="python -m comal_openrlhf.cli.game",
        description=__doc__.split("\n\n")[0],
        epilog="subcommand: bench, every algorithm on generated games (python -m comal_openrlhf.cli.game bench -h)",
    )
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
