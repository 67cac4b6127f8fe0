"""Benchmark: the cost of judging all pairs of n samples per prompt with gpm, pairwise_lm and reward_model.

    python benchmarks/judges.py [--n 4,8,16] [--prompts 4] [--repeats 3] [--hidden 128] [--layers 4] [--json]

The three judges share one tiny Llama configuration (``comal_openrlhf.tiny``; built locally, fp32, CPU): a reward
model (scalar head, arXiv 2410.23223's Bradley-Terry oracle), a generative pairwise judge reading the A/B label
logits (the official COMAL code's kind of judge), and a GPM (arXiv 2410.02197: value head of dimension 2k = 8 and a
prompt head). For each prompt with n distinct sampled responses the win matrix is asked the way the COMAL loop asks
it (``comal_openrlhf.core.pairs.win_matrix``, both orders requested): pairwise_lm then runs one forward per ordered
pair, n(n-1) in all; the reward model and the GPM are antisymmetric and embed each response once, n forwards. Reported
per (judge, n): the median wall time per prompt over ``--prompts`` x ``--repeats`` measurements after a warm-up,
the forwards per prompt (sequences the model ran, counted), and the ratio to pairwise_lm measured in the same run.
"""

import argparse
import os
import platform
import statistics
import tempfile
import time

REPRESENTS = {
    "gpm": "general (cycles: skew-symmetric R_x)",
    "pairwise_lm": "general (any P, position bias averaged out)",
    "reward_model": "transitive only (Bradley-Terry)",
}


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", default="4,8,16", help="samples per prompt, comma-separated")
    p.add_argument("--prompts", type=int, default=4, help="prompts measured per n")
    p.add_argument("--repeats", type=int, default=3, help="measurements per prompt")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--words", type=int, default=24, help="words per response (the prompt has half as many)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=8, help="sequences per forward")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (the table goes to stderr)")
    a = p.parse_args(argv)
    from comal_openrlhf.cli.common import json_stdout

    with json_stdout(a.json) as emit:  # with --json, whatever a library prints goes to stderr
        report = run(a)
        if a.json:
            emit(report)
    return report


def run(a):
    ns = [int(x) for x in a.n.split(",") if x.strip()]
    say = lambda *m: print(*m, flush=True)  # noqa: E731 (stderr under --json)

    import numpy as np
    import torch

    from comal_openrlhf.core.pairs import win_matrix
    from comal_openrlhf.judges import build_judge
    from comal_openrlhf.judges.tiny_gpm import build_tiny_gpm
    from comal_openrlhf.tiny import DEFAULT_WORDS, build_tiny_llama

    torch.set_num_threads(a.threads)
    tmp = tempfile.mkdtemp(prefix="comal_bench_judges_")
    words = list(DEFAULT_WORDS) + [f"w{i}" for i in range(200)] + ["A", "B"]
    shape = dict(
        hidden_size=a.hidden,
        num_layers=a.layers,
        num_heads=max(1, a.hidden // 32),
        intermediate_size=4 * a.hidden,
        max_positions=4 * a.words + 256,
    )
    paths = {
        "gpm": build_tiny_gpm(os.path.join(tmp, "gpm"), value_head_dim=8, words=words, seed=a.seed, **shape),
        "pairwise_lm": build_tiny_llama(os.path.join(tmp, "lm"), words=words, seed=a.seed, **shape),
        "reward_model": build_tiny_llama(os.path.join(tmp, "rm"), words=words, seed=a.seed, reward_head=True, **shape),
    }
    common = {"device": "cpu", "batch_size": a.batch_size}
    judges = {kind: build_judge({"kind": kind, "path": path, **common}) for kind, path in paths.items()}

    # forwards counters: sequences each model ran
    counts = {kind: 0 for kind in judges}
    for kind, judge in judges.items():
        model = judge.model.model if kind == "reward_model" else judge.model

        def hook(_module, args, kwargs, kind=kind):
            ids = kwargs.get("input_ids", args[0] if args else None)
            counts[kind] += int(ids.shape[0])

        model.register_forward_pre_hook(hook, with_kwargs=True)

    rng = np.random.default_rng(a.seed)
    vocab = [w for w in words if w not in ("A", "B")]

    def text(k):
        return " ".join(rng.choice(vocab, size=k))

    results = []
    for n in ns:
        groups = [(text(a.words // 2) + " ?", [text(a.words) for _ in range(n)]) for _ in range(a.prompts)]
        for kind, judge in judges.items():
            win_matrix(judge, *groups[0])  # warm-up
            times, fwd = [], []
            for prompt, responses in groups:
                for _ in range(a.repeats):
                    c0, t0 = counts[kind], time.perf_counter()
                    W = win_matrix(judge, prompt, responses)
                    times.append(time.perf_counter() - t0)
                    fwd.append(counts[kind] - c0)
                    assert np.allclose(W + W.T, 1.0, atol=1e-9)
            results.append(
                {
                    "judge": kind,
                    "n": n,
                    "seconds_per_prompt": statistics.median(times),
                    "p20": float(np.percentile(times, 20)),
                    "p80": float(np.percentile(times, 80)),
                    "forwards_per_prompt": statistics.median(fwd),
                    "represents": REPRESENTS[kind],
                }
            )
    base = {r["n"]: r["seconds_per_prompt"] for r in results if r["judge"] == "pairwise_lm"}
    for r in results:
        r["ratio_to_pairwise_lm"] = r["seconds_per_prompt"] / base[r["n"]]

    device = f"CPU: {cpu_name()}, {a.threads} torch thread(s), torch {torch.__version__}"
    say(f"# judge cost per prompt, all pairs of n samples ({device})")
    say(
        f"tiny Llama: hidden {a.hidden}, {a.layers} layers, fp32; prompts {a.words // 2} words, responses {a.words} "
        f"words; {a.batch_size} sequences per forward; median (p20-p80) of {a.prompts} prompts x {a.repeats} runs\n"
    )
    say("| judge | represents | n | forwards / prompt | ms / prompt (p20-p80) | ratio to pairwise_lm |")
    say("|---|---|---|---|---|---|")
    for r in results:
        say(
            f"| {r['judge']} | {r['represents']} | {r['n']} | {r['forwards_per_prompt']:.0f} | "
            f"{1e3 * r['seconds_per_prompt']:.1f} ({1e3 * r['p20']:.1f}-{1e3 * r['p80']:.1f}) | "
            f"{r['ratio_to_pairwise_lm']:.3f} |"
        )
    return {"device": device, "shape": shape, "dtype": "float32", "results": results}


if __name__ == "__main__":
    main()
