"""CPU demo: COMAL converges to the Nash policy of an intransitive game; iterative IPO/DPO do not.

    python -m comal_openrlhf.cli.demo [--game paper|FILE.json] [--algos comal,inpo,iter-ipo,iter-dpo] [--out DIR]

1. A tiny Llama and a word-level tokenizer whose words include the game's options are built locally (no hub).
2. SFT warm start: the model is fitted to a skewed distribution over the options (``--init``; by default weights
   proportional to the triangular numbers T(n), ..., T(2), T(1) for n options, T(k) = k(k+1)/2: (0.6, 0.3, 0.1) for
   three options, (0.5, 0.3, 0.15, 0.05) for four) for the prompt "question pick one ?".
3. Each algorithm runs ``python -m openrlhf.cli.train_comal`` (the same code path as any user's run) with the online
   source: every iteration samples ``--samples`` responses from the current policy, the ``table`` judge gives
   P(y beats y') from the game matrix, all pairs with soft labels (``all_soft``) weighted by mu_k(y) mu_k(y'), the
   ipo prox loss. Presets: comal = (ipo, r, advance every K), inpo = (ipo, r, never), iter-ipo = (ipo, 0),
   iter-dpo = (dpo, 0), optimistic = (rebel on the optimistic payoff, 0, eta ``--optimistic-eta``), extragradient =
   (ipo, two iterations per step); beta = 1/eta.
4. Report: each final policy's exact distribution over the options (sequence log-probs, renormalised; the mass on
   any other output as ``invalid_mass``), its duality gap 2 max(P p) - 1, a head-to-head win-rate table, and a
   gap-versus-iteration plot (PNG) plus JSON in ``--out``.

Defaults (eta = 4, r = eta*tau = 0.6, K = 4, 24 iterations) were chosen with the tabular game lab
(``python -m comal_openrlhf.cli.game``), where the same schedule reaches a gap below 1e-4 from both of the paper's
starts.

Reproducibility: a seed fixes the result on a given machine. Every process runs one CPU thread, with torch's
deterministic algorithms (``--train.full_determinism_enable`` in the training runs); the SFT warm start, the model's
initial weights and each run's sampling are seeded; the algorithms run as separate processes, so their order and
parallelism (``--jobs``) change nothing. Across CPUs results differ: torch picks its kernels (AVX2, AVX512, native
bf16) from the CPU, and their rounding differs. Training runs in bf16 where the CPU has native bf16, else in fp32
(``--dtype``).
"""

import argparse
import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import shlex
import sys
import time
import traceback

import numpy as np

from comal_openrlhf.cli import train_comal
from comal_openrlhf.cli.common import json_stdout
from comal_openrlhf.core.game import duality_gap, solve_nash
from comal_openrlhf.core.matrix import load_matrix
from comal_openrlhf.cpu_runtime import cpu_has_native_bf16
from comal_openrlhf.errors import BadInputError
from comal_openrlhf.eval.exact import game_report, option_logps, option_logps_tensor
from comal_openrlhf.judges.tiny_gpm import build_cyclic_gpm, induced_matrix
from comal_openrlhf.storage import write_json
from comal_openrlhf.tiny import DEFAULT_WORDS, build_tiny_llama

PROMPT = "question pick one ?"
ALGOS = ("comal", "inpo", "iter-ipo", "iter-dpo", "optimistic", "extragradient")
DEFAULT_ALGOS = ALGOS[:4]  # the README's table; the last-iterate presets on request (each adds a run)


def default_init(n):
    """The default SFT target for n options: weights T(n), ..., T(2), T(1) with T(k) = k(k+1)/2, normalised.

    Skewed, full support, and (0.6, 0.3, 0.1) for n = 3.
    """
    w = np.array([k * (k + 1) / 2 for k in range(n, 0, -1)], dtype=np.float64)
    return (w / w.sum()).tolist()


@contextlib.contextmanager
def deterministic_torch(seed, threads=1):
    """One CPU thread, torch's deterministic algorithms, seeded RNG; the previous settings come back afterwards."""
    import torch

    prev_threads, prev_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)


def sft_warm_start(path, labels, target, seed, steps=400):
    """Fit the tiny model so that pi(label_i + EOS | prompt) ~ target_i (exact expected NLL, full batch)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with deterministic_torch(seed):
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
        )
        q = torch.tensor(target, dtype=torch.float32)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        model.train()
        for _ in range(steps):
            with torch.enable_grad():
                loss = -(q * option_logps_tensor(model, tok, prompt, labels)).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
        model.eval()
        lp = option_logps(model, tok, prompt, labels)
        model.save_pretrained(path)
    mass = np.exp(lp)
    return (mass / mass.sum()).tolist(), float(1 - mass.sum())


def training_dtype(choice):
    """(dtype, note): bf16 with CUDA or a CPU with native bf16, else fp32; an explicit bf16/fp32 is kept."""
    if choice != "auto":
        return choice, None
    import torch

    if torch.cuda.is_available() or cpu_has_native_bf16():
        return "bf16", None
    cap = torch.backends.cpu.get_cpu_capability()
    return "fp32", (
        f"[demo] no native bf16 on this CPU (torch CPU path {cap}): training in fp32, as bf16 would be emulated "
        "and many times slower; --dtype bf16 forces bf16"
    )


def algo_flags(algo, a):
    flags = ["--comal.algo", algo, "--comal.iterations", a.iterations]
    if a.optimizer_state == "keep":
        flags += ["--comal.keep_optimizer_state"]
    if algo == "comal":
        flags += ["--comal.ref_weight", a.ref_weight, "--comal.ref_update_interval", a.ref_every]
    elif algo == "inpo":
        flags += ["--comal.ref_weight", a.ref_weight]
    elif algo == "optimistic":  # rebel loss on the optimistic payoff, at its own step size
        flags += ["--model.beta", 1.0 / a.optimistic_eta]
    return [str(f) for f in flags]


def judge_flags(a, game_spec, gpm_dir):
    """The training runs' judge: the game's table, or the GPM checkpoint with the game it induces for the gap."""
    if a.judge == "gpm":
        return ["--judge.kind", "gpm", "--judge.path", gpm_dir, "--judge.temperature", str(a.gpm_temperature)] + [
            "--rollout.exact_game",
            game_spec,
        ]
    return ["--judge.kind", "table", "--judge.table", game_spec]


def train_argv(algo, a, model_dir, prompts, game_spec, work, out):
    """The ``train_comal`` flags of one algorithm's run (the README's command line for it, less the launcher)."""
    cmd = ["--model.model_name_or_path", model_dir]
    cmd += ["--comal.source", "online"] + judge_flags(a, game_spec, os.path.join(out, "gpm"))
    cmd += ["--data.dataset", prompts, "--data.prompt_key", "prompt", "--data.apply_chat_template"]
    cmd += ["--data.max_len", "32", "--rollout.prompts_per_iteration", "1"]
    cmd += ["--rollout.n_samples_per_prompt", str(a.samples), "--rollout.temperature", "1.0", "--rollout.top_p", "1.0"]
    cmd += ["--rollout.max_new_tokens", "3", "--rollout.pair_rule", "all_soft", "--rollout.pair_weighting", "policy"]
    cmd += ["--model.beta", str(1.0 / a.eta)] if algo != "optimistic" else []
    cmd += ["--train.micro_batch_size", "16", "--train.batch_size", "16"]
    cmd += ["--train.max_epochs", str(a.steps), "--adam.lr", str(a.lr), "--lr_scheduler", "constant"]
    cmd += ["--lr_warmup_ratio", "0", "--max_norm", "10", "--ds.zero_stage", "0", "--train.seed", str(a.seed)]
    cmd += ["--train.full_determinism_enable", "--ds.param_dtype", a.dtype]
    # the demo's own optimiser (one prompt, all its pairs in one micro-batch, full-batch steps): the presets' official
    # recipe (batch counted in prompts, Adam betas (0.9, 0.999), weight decay 0.01) is for LLM runs, and the demo's
    # table in the README was measured with these
    cmd += ["--comal.batch_unit", "pairs", "--adam.betas", "0.9", "0.95", "--adam.weight_decay", "0"]
    cmd += ["--ckpt.output_dir", os.path.join(work, "final"), "--ckpt.path", os.path.join(work, "ckpt")]
    cmd += [
        "--comal.mass_coef",
        "1.0",
        "--comal.no_iteration_ckpt",
        "--comal.overwrite",  # the demo owns --out: a second `make demo` replaces the first run
        "--logger.tensorboard_dir",
        os.path.join(out, "tb"),
    ]
    cmd += ["--logger.wandb.run_name", algo] + algo_flags(algo, a)
    if a.lora:  # the policy trains a LoRA adapter; the anchor is a second adapter on the same base
        cmd += ["--ds.lora.rank", str(a.lora), "--ds.lora.alpha", str(a.lora_alpha or 2 * a.lora)]
    return cmd


# One process per algorithm, forked from a server that imported train_comal's modules once (torch, transformers,
# DeepSpeed, OpenRLHF: about 8 s of CPU per process on 2 cores, which was half of each demo run). Each run is still a
# fresh process of its own running train_comal's main() - the code path of `python -m openrlhf.cli.train_comal` - so
# the algorithms' order and --jobs change nothing. The server imports but computes nothing, so forking it is safe.
PRELOAD = ["comal_openrlhf.cli.train_comal", "deepspeed", "openrlhf.utils", "openrlhf.trainer.dpo_trainer"]
RUN_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _train_process(argv, work):
    """In the forked process: cwd ``work``, stdout and stderr into ``work/train.log``, train_comal's main(argv)."""
    os.chdir(work)
    log = os.open(os.path.join(work, "train.log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for fd in (1, 2):
        os.dup2(log, fd)
    sys.stdout.reconfigure(line_buffering=True)
    sys.argv = ["train_comal"] + argv
    print("$ python -m openrlhf.cli.train_comal " + shlex.join(argv), flush=True)
    try:
        train_comal.main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    except BaseException:  # the log gets the traceback; the demo names the log
        traceback.print_exc()
        return 1
    return 0


def train_pool(jobs):
    """A process pool whose workers fork from a preloaded server, one fresh process per algorithm."""
    os.environ.update(RUN_ENV)  # read by the server when it starts (torch's thread pools are sized at import)
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return concurrent.futures.ProcessPoolExecutor(max_workers=max(1, jobs), mp_context=ctx, max_tasks_per_child=1)


def run_algo(pool, algo, a, model_dir, prompts, game_spec, out):
    """Submit one algorithm's train_comal run to ``pool``; returns a future of (work dir, history, seconds)."""
    work = os.path.join(out, algo)
    os.makedirs(work, exist_ok=True)
    argv = train_argv(algo, a, model_dir, prompts, game_spec, work, out)
    t0 = time.time()
    fut = pool.submit(_train_process, argv, work)

    def finish():
        code = fut.result()
        if code != 0:
            tail = open(os.path.join(work, "train.log")).read()[-3000:]
            raise RuntimeError(f"{algo}: train_comal failed ({code}); log {work}/train.log:\n{tail}")
        with open(os.path.join(work, "final", "comal_iterations.jsonl")) as f:
            hist = [json.loads(line) for line in f]
        return work, hist, time.time() - t0

    return fut, finish


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m comal_openrlhf.cli.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--game", default="paper", help="paper (3-option cycle of the paper) or a matrix JSON file")
    p.add_argument(
        "--algos",
        default=",".join(DEFAULT_ALGOS),
        help=f"comma-separated subset of {','.join(ALGOS)} (default: the first four)",
    )
    p.add_argument("--out", default="comal_demo", help="output directory (plot, JSON, logs, models)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout (progress goes to stderr)")
    p.add_argument(
        "--seed", type=int, default=0, help="fixes the result on a given machine (it varies across CPUs and dtypes)"
    )
    p.add_argument(
        "--init",
        default=None,
        help="SFT target distribution over the options, comma-separated positive numbers (normalised). Default: "
        "proportional to T(n), ..., T(2), T(1) with T(k) = k(k+1)/2 for a game of n options: 0.6,0.3,0.1 for 3, "
        "0.5,0.3,0.15,0.05 for 4",
    )
    p.add_argument("--iterations", type=int, default=24)
    p.add_argument("--eta", type=float, default=4.0, help="step size eta = 1/beta")
    p.add_argument(
        "--optimistic-eta",
        dest="optimistic_eta",
        type=float,
        default=2.0,
        help="eta of the optimistic preset (optimistic MWU cycles on the paper's game at eta 4 and converges at 2: "
        "docs/game-lab.md)",
    )
    p.add_argument("--ref-weight", dest="ref_weight", type=float, default=0.6, help="r = eta * tau (comal, inpo)")
    p.add_argument("--ref-every", dest="ref_every", type=int, default=4, help="K: COMAL advances the anchor every K")
    p.add_argument("--samples", type=int, default=64, help="responses sampled per iteration")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per iteration (passes over the pairs)")
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument(
        "--judge",
        choices=("table", "gpm"),
        default="table",
        help="table = the game's matrix; gpm = a tiny General Preference Model (arXiv 2410.02197) built locally with "
        "the game's options evenly spread on a circle (a cyclic preference): the runs are judged by the GPM and the "
        "gap is measured on the matrix it induces (--game then only names the options)",
    )
    p.add_argument("--gpm-temperature", dest="gpm_temperature", type=float, default=0.5, help="tau of --judge gpm")
    p.add_argument(
        "--optimizer-state",
        dest="optimizer_state",
        choices=("keep", "fresh"),
        default="keep",
        help="keep = carry Adam's moments across iterations (--comal.keep_optimizer_state; the demo's default: a "
        "fresh "
        "Adam's first steps move every weight by about --lr whatever its gradient, which at the demo's lr 1e-2 can "
        "throw the tiny model's mass off the options); fresh = train_comal's default, a new state per iteration",
    )
    p.add_argument(
        "--lora",
        type=int,
        default=0,
        help="LoRA rank of the training runs (--ds.lora.rank; 0 = full weights): the policy trains an adapter and "
        "COMAL's anchor is a second, frozen adapter on the same base model",
    )
    p.add_argument(
        "--lora-alpha", dest="lora_alpha", type=int, default=None, help="--ds.lora.alpha (default 2 x rank)"
    )
    p.add_argument(
        "--jobs", type=int, default=2, help="algorithms trained in parallel (the results do not depend on it)"
    )
    p.add_argument(
        "--dtype",
        choices=("auto", "bf16", "fp32"),
        default="auto",
        help="training dtype (--ds.param_dtype). auto: bf16 on CUDA or on a CPU with native bf16 (avx512_bf16 or "
        "amx_bf16 and torch on its AVX512 path), else fp32, said in one line; --dtype bf16 forces bf16",
    )
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    # --json: stdout carries the one JSON object; every other line, whoever prints it, goes to stderr
    with json_stdout(a.json) as emit:
        try:
            report = run_demo(a)
        except BadInputError as e:
            raise SystemExit(f"error: {e}") from None
        if a.json:
            emit(report)
    return report


def run_demo(a):
    def say(*m):
        print(*m, flush=True)

    try:
        P, labels = load_matrix(a.game)
    except (ValueError, OSError) as e:  # MatrixError is a ValueError
        raise BadInputError(str(e)) from None
    P = np.asarray(P, dtype=np.float64)
    algos = [x.strip() for x in a.algos.split(",") if x.strip()]
    bad = [x for x in algos if x not in ALGOS]
    if bad or not algos:
        raise BadInputError(f"--algos takes a comma-separated subset of {','.join(ALGOS)}, got {a.algos!r}")
    if any(not lab.isalnum() for lab in labels):
        raise BadInputError(f"option labels must be single words for the demo's tokenizer, got {labels}")
    if a.init is None:
        init = default_init(len(labels))
    else:
        try:
            init = [float(x) for x in a.init.split(",")]
        except ValueError:
            init = []
        if len(init) != len(labels) or not all(np.isfinite(x) and x > 0 for x in init):
            raise BadInputError(f"--init needs {len(labels)} positive numbers (full support), got {a.init!r}")
        init = (np.array(init) / sum(init)).tolist()
    a.dtype, note = training_dtype(a.dtype)
    if note:
        say(note)

    out = os.path.abspath(a.out)
    os.makedirs(out, exist_ok=True)
    if a.judge == "gpm":  # a GPM judge with the options evenly spread on a circle: a cyclic preference

        angles = [360.0 * i / len(labels) for i in range(len(labels))]
        gpm_dir = build_cyclic_gpm(os.path.join(out, "gpm"), PROMPT, labels, angles=angles, seed=a.seed)
        P = np.asarray(induced_matrix(gpm_dir, PROMPT, labels, temperature=a.gpm_temperature), dtype=np.float64)
        say(f"[demo] GPM judge {gpm_dir}: induced P over {labels} = {np.round(P, 4).tolist()}")
    game_spec = os.path.join(out, "game.json")
    with open(game_spec, "w") as f:
        json.dump({"P": P.tolist(), "labels": labels}, f)
    prompts = os.path.join(out, "prompts.jsonl")
    with open(prompts, "w") as f:
        f.write(json.dumps({"prompt": PROMPT}) + "\n")
    nash = solve_nash(P)

    t0 = time.time()
    model_dir = build_tiny_llama(os.path.join(out, "sft"), words=tuple(DEFAULT_WORDS) + tuple(labels), seed=a.seed)
    start, invalid0 = sft_warm_start(model_dir, labels, init, a.seed)
    say(
        f"[demo] SFT warm start: policy {np.round(start, 3).tolist()} (target {np.round(init, 3).tolist()}), "
        f"gap {duality_gap(P, np.array(start)):.4f}, invalid mass {invalid0:.2e}"
    )

    results = {}
    with train_pool(a.jobs) as pool:
        runs = {algo: run_algo(pool, algo, a, model_dir, prompts, game_spec, out) for algo in algos}
        futures = {fut: algo for algo, (fut, _) in runs.items()}
        for fut in concurrent.futures.as_completed(futures):
            algo = futures[fut]
            work, hist, secs = runs[algo][1]()
            results[algo] = (work, hist, secs)
            say(f"[demo] {algo}: {len(hist)} iterations in {secs:.0f} s")

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    prompt_text = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
    )
    report = {"game": a.game, "labels": labels, "nash": nash.tolist(), "start": {"policy": start}, "algorithms": {}}
    report["settings"] = {"seed": a.seed, "init": init, "param_dtype": a.dtype, "cpu_capability": _capability()}
    report["start"]["duality_gap"] = float(duality_gap(P, np.array(start)))
    for algo in algos:
        work, hist, secs = results[algo]
        with deterministic_torch(a.seed):
            model = load_final(os.path.join(work, "final"), model_dir)
            rep = game_report(model, tok, prompt_text, P, labels)
        curve = [[h["iteration"], h["game_gap"]] for h in hist] + [[len(hist), rep["duality_gap"]]]
        report["algorithms"][algo] = {**rep, "gaps": curve, "seconds": round(secs, 1)}
    names = ["start"] + algos
    pols = [np.array(start)] + [np.array(report["algorithms"][x]["policy"]) for x in algos]
    report["head_to_head"] = {
        r: {c: round(float(pr @ P @ pc), 4) for c, pc in zip(names, pols)} for r, pr in zip(names, pols)
    }
    report["seconds"] = round(time.time() - t0, 1)
    write_json(os.path.join(out, "demo.json"), report, indent=1)
    _plot(report, os.path.join(out, "gap.png"))

    say(f"\nGame {a.game}: Nash {np.round(nash, 4).tolist()} over {labels}")
    say("| algorithm | final duality gap | policy | invalid mass |\n|---|---|---|---|")
    for algo in algos:
        r = report["algorithms"][algo]
        say(f"| {algo} | {r['duality_gap']:.4f} | {np.round(r['policy'], 3).tolist()} | {r['invalid_mass']:.1e} |")
    say("\nHead-to-head P(row beats column):\n| | " + " | ".join(names) + " |\n|" + "---|" * (len(names) + 1))
    for r in names:
        say(f"| {r} | " + " | ".join(f"{report['head_to_head'][r][c]:.3f}" for c in names) + " |")
    say(f"\n[demo] {report['seconds']} s; plot {out}/gap.png, JSON {out}/demo.json")
    return report


def load_final(final, base_dir):
    """A run's final policy: the saved model, or (LoRA) the base with the saved policy adapter merged in."""
    from transformers import AutoModelForCausalLM

    if not os.path.exists(os.path.join(final, "adapter_config.json")):
        return AutoModelForCausalLM.from_pretrained(final)
    from peft import PeftModel

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), final).merge_and_unload()


def _capability():
    import torch

    return "cuda" if torch.cuda.is_available() else torch.backends.cpu.get_cpu_capability()


def _plot(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for algo, r in report["algorithms"].items():
        it, gap = zip(*r["gaps"])
        ax.semilogy(it, np.maximum(gap, 1e-6), marker="o", ms=3, label=algo)
    ax.set_xlabel("iteration")
    ax.set_ylabel("duality gap of the policy")
    ax.set_title(f"COMAL demo on the {report['game']} game (tiny Llama, CPU)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
