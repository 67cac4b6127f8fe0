"""COMAL training on OpenRLHF: ``python -m openrlhf.cli.train_comal`` (served from comal_openrlhf.cli.train_comal).

Launches::

    python -m openrlhf.cli.train_comal --model.model_name_or_path M --comal.algo comal --comal.pairs_dir DIR ...
    torchrun --nproc_per_node 2 -m openrlhf.cli.train_comal ...
    deepspeed --module openrlhf.cli.train_comal ...

Every flag of OpenRLHF 0.11.2's ``train_dpo`` is accepted with the same default: the parser is built by running
train_dpo's own parser statements, read from its installed source, so a new upstream flag appears here by itself.
COMAL's own flags live in the ``--comal.*``, ``--judge.*`` and ``--rollout.*`` groups (see ``--help``).
On a machine without CUDA the plugin's CPU runtime is applied first (comal_openrlhf.cpu_runtime).
"""

import argparse
import ast
import importlib.util
import math
import os
import sys
import time
from datetime import datetime  # noqa: F401  (train_dpo's parser statements use it)
from datetime import timedelta

from openrlhf.datasets.utils import blending_datasets

from comal_openrlhf import cpu_runtime
from comal_openrlhf.cli.common import add_online_args
from comal_openrlhf.core.losses import NEEDS_WIN_RATES
from comal_openrlhf.core.schedule import ALGO_HELP, PRESETS, PROXES, resolve_plan
from comal_openrlhf.errors import BadInputError, COMALError, PlanError
from comal_openrlhf.judges import build_judge
from comal_openrlhf.rundir import RunDirectory
from comal_openrlhf.storage import check_writable
from comal_openrlhf.training.data import (
    FixedPairs,
    OfflineSource,
    PairDataset,
    RowFormatter,
    SkipLog,
    StaticSource,
    check_dataset_spec,
)
from comal_openrlhf.training.logps import LOGPS_KERNELS
from comal_openrlhf.training.lora import ANCHOR, add_anchor_adapter, save_merged
from comal_openrlhf.training.online import OnlineSource
from comal_openrlhf.training.peers import DEFAULT_DIST_TIMEOUT_S, DEFAULT_SERIAL_TIMEOUT_S, Peers, is_peer_failure


def _train_dpo_main():
    """The statements of train_dpo's ``if __name__ == "__main__":`` block, split at ``parser.parse_args()``."""
    spec = importlib.util.find_spec("openrlhf.cli.train_dpo")
    with open(spec.origin, encoding="utf-8") as f:
        tree = ast.parse(f.read(), spec.origin)
    main = next(
        node
        for node in tree.body
        if isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and ast.unparse(node.test).startswith("__name__")
    )
    cut = next(
        i
        for i, st in enumerate(main.body)
        if isinstance(st, ast.Assign) and ast.unparse(st.value) == "parser.parse_args()"
    )
    post = [st for st in main.body[cut + 1 :] if not (isinstance(st, ast.Expr) and ast.unparse(st) == "train(args)")]
    return main.body[:cut], post, spec.origin


def _run(statements, namespace, origin):
    code = compile(ast.Module(body=statements, type_ignores=[]), origin, "exec")
    exec(code, namespace)  # upstream's own parser code, from the installed openrlhf package


def add_comal_args(parser):
    g = parser.add_argument_group("COMAL", "Iterations, prox loss and reference advances (arXiv 2410.23223)")
    g.add_argument("--comal.algo", type=str, default=None, choices=list(PRESETS), help=ALGO_HELP)
    g.add_argument(
        "--comal.prox",
        type=str,
        default=None,
        choices=list(PROXES),
        help="Prox loss overriding the preset: ipo (the exact prox step for any preference), dpo (the prox of a "
        "Bradley-Terry reward), sppo (approximate: assumes a zero log-partition), rebel (exact)",
    )
    g.add_argument(
        "--comal.ref_weight",
        type=float,
        default=None,
        help="r = eta * tau in [0, 1): weight of the anchor in the prox centre log C = (1-r) log mu + r log ref",
    )
    g.add_argument(
        "--comal.ref_update_interval",
        type=int,
        default=None,
        help="K: the anchor reference takes the policy's weights every K iterations (0 = never)",
    )
    g.add_argument(
        "--comal.iterations",
        type=int,
        default=None,
        help="Number of iterations (default: the number of files in --comal.pairs_dir, 1 for --data.dataset pairs, "
        "else 24)",
    )
    g.add_argument(
        "--comal.beta_schedule",
        type=str,
        default=None,
        help="Beta per round of --comal.round_length iterations, comma separated (e.g. 0.002,0.1 as the paper's "
        "Llama-3 recipe); the last value holds for later rounds; a schedule with more betas than rounds is refused. "
        "Default: --model.beta (the preset's when not given) in every round",
    )
    g.add_argument(
        "--comal.source",
        type=str,
        default="auto",
        choices=["auto", "offline", "static", "online"],
        help="Where each iteration's pairs come from: offline = --comal.pairs_dir files, static = --data.dataset "
        "pairs every iteration, online = sample + --judge.*; auto picks from the flags given",
    )
    g.add_argument(
        "--comal.pairs_dir",
        type=str,
        default=None,
        help="Offline source: directory with iter_000.jsonl, iter_001.jsonl, ... (prompt/chosen/rejected, "
        "optional chosen_winrate, rejected_winrate, soft_label)",
    )
    g.add_argument(
        "--comal.logps_kernel",
        type=str,
        default="auto",
        choices=list(LOGPS_KERNELS),
        help="Sequence log-prob path: auto = fused Triton kernel on CUDA, chunked torch kernel on CPU (no fp32 copy "
        "of the logits); triton; torch; linear = backbone to the hidden states, then the LM head fused with the "
        "log-probs in token chunks (no B x L x V logits at all); openrlhf = OpenRLHF's own path (fp32 copy of all "
        "logits)",
    )
    g.add_argument(
        "--comal.precompute_batch_size",
        type=int,
        default=None,
        help="Micro-batch (pairs per rank) of the no-grad precompute pass that fills each iteration's cache of mu_k "
        "and anchor log-probs; it can be larger than --train.micro_batch_size since no activations are kept for a "
        "backward (both models' logits of a micro-batch are alive at once). Default: --train.micro_batch_size",
    )
    g.add_argument(
        "--comal.optimistic_previous",
        choices=("reuse", "fresh"),
        default="reuse",
        help="--comal.algo optimistic: the samples of mu_(k-1) that iteration k judges its responses against for "
        "the payoff 2 P(y > mu_k) - P(y > mu_(k-1)). reuse = the samples iteration k-1 trained on (prompts outside "
        "its window sampled once more), so the payoff's second term is the estimate the previous step used, as "
        "stochastic optimistic mirror descent needs (its noise telescopes); fresh = a second, independent sample set "
        "of mu_(k-1) (unbiased given mu_k, but its noise accumulates: docs/game-lab.md)",
    )
    parser.add_argument(
        "--comal.mass_coef",
        type=float,
        default=0.0,
        help="Weight of a term keeping the policy's total mass on each prompt's sampled responses equal to mu_k's "
        "(not in the paper: the prox step only reweights within them, but the pair losses see only differences, so "
        "Adam can leak mass to never-sampled outputs; the CPU demo sets 1.0); 0 = off, as in the official code",
    )
    g.add_argument(
        "--comal.round_length",
        type=int,
        default=None,
        help="Iterations per beta round of --comal.beta_schedule (default: K, --comal.ref_update_interval, when the "
        "anchor advances; else all iterations form one round)",
    )
    g.add_argument(
        "--comal.batch_unit",
        type=str,
        default=None,
        choices=["prompts", "pairs"],
        help="What --train.batch_size counts. prompts (default with --comal.algo and an online source): an optimizer "
        "step takes the pairs of batch_size prompts (gradient accumulation grows with the pairs per prompt), so "
        "all_soft's ~N(N-1)/2 pairs per prompt make as many optimizer steps of the same size as the official top2 "
        "pipeline's one pair per prompt; pairs (default otherwise, OpenRLHF's meaning): batch_size pairs per step",
    )
    g.add_argument(
        "--comal.keep_optimizer_state",
        action="store_true",
        default=False,
        help="Carry Adam's moments from one iteration to the next (default: a fresh optimizer state per iteration, "
        "as the official pipeline: each iteration is its own prox problem)",
    )
    g.add_argument(
        "--comal.keep_best",
        action="store_true",
        default=False,
        help="The official model selection: within each iteration, at every epoch end and every --eval.steps "
        "optimizer steps, score the policy by the prox loss around that iteration's centre on held-out pairs of "
        "the iteration's own source, and end the iteration with the best-scoring weights. Held-out pairs: online, "
        "--comal.heldout_prompts prompts of --comal.heldout (default --eval.dataset) sampled from mu_k and judged "
        "each iteration; offline, the file iter_NNN.jsonl of the folder --comal.heldout; static, --eval.dataset",
    )
    g.add_argument(
        "--comal.heldout",
        type=str,
        default=None,
        help="Held-out data of --comal.keep_best: a prompt dataset (online source; default --eval.dataset, split "
        "--eval.split) or a folder of held-out pair files iter_000.jsonl, ... (offline source)",
    )
    g.add_argument(
        "--comal.heldout_prompts",
        type=int,
        default=32,
        help="Held-out prompts sampled and judged per iteration for --comal.keep_best (online source)",
    )
    g.add_argument(
        "--comal.round_rollback",
        action="store_true",
        default=False,
        help="Not the official selection: with --eval.dataset, at the end of each round (of --comal.round_length "
        "iterations) the policy returns to the round's iterate with the lowest anchor-centred held-out loss on "
        "--eval.dataset's fixed pairs, rolling back up to round_length - 1 iterations (the kept iterate then "
        "becomes mu_k+1 and, at an advance, the anchor)",
    )
    g.add_argument(
        "--eval.winrate_every",
        type=int,
        default=0,
        help="Every N iterations, sample the policy, the start policy and the current anchor on --eval.dataset's "
        "prompts and log the judge's win rate of the policy against each (eval/winrate_vs_start, "
        "eval/winrate_vs_anchor, with bootstrap intervals; needs --judge.kind). 0 = off",
    )
    g.add_argument(
        "--eval.winrate_prompts", type=int, default=32, help="Prompts of --eval.dataset used by --eval.winrate_every"
    )
    g.add_argument(
        "--eval.winrate_samples", type=int, default=2, help="Samples per prompt and policy for --eval.winrate_every"
    )
    g.add_argument(
        "--comal.accept_plan_change",
        action="store_true",
        default=False,
        help="With --ckpt.load_enable: continue a checkpoint written with other COMAL settings (the change is "
        "recorded in the history); without it such a resume is refused, naming each differing setting",
    )
    g.add_argument(
        "--comal.overwrite",
        action="store_true",
        default=False,
        help="Start a fresh run even where --ckpt.path / --ckpt.output_dir hold an earlier run: its history, "
        "checkpoints and COMAL state are moved aside (renamed *.old-TIME), not deleted",
    )
    g.add_argument(
        "--comal.no_iteration_ckpt",
        action="store_true",
        default=False,
        help="Do not save a DeepSpeed checkpoint at the end of every iteration (then a crash loses iterations)",
    )
    g.add_argument(
        "--comal.lora_save_merged",
        action="store_true",
        default=False,
        help="With --ds.lora.rank > 0: besides the policy adapter in --ckpt.output_dir, write the base model with the "
        "adapter merged into --ckpt.output_dir/merged (a plain Hugging Face model)",
    )
    g.add_argument(
        "--comal.dist_timeout",
        type=float,
        default=DEFAULT_DIST_TIMEOUT_S,
        help="Seconds a collective waits for a peer rank before the run stops with an error naming the lost rank "
        "and node (the torch.distributed process-group timeout; OpenRLHF's own is 60 minutes). A peer that dies "
        "closes its connections and is reported at once; this bounds a hung peer or a host cut off the network",
    )
    g.add_argument(
        "--comal.serial_timeout",
        type=float,
        default=DEFAULT_SERIAL_TIMEOUT_S,
        help="Seconds the other ranks wait for rank 0's serial phases (vLLM sampling and judging of an online "
        "iteration) before the run stops as for --comal.dist_timeout",
    )
    return parser


def build_parser():
    build, _post, origin = _train_dpo_main()
    namespace = {"argparse": argparse, "datetime": datetime, "__name__": "train_comal"}
    _run(build, namespace, origin)
    parser = namespace["parser"]
    cpu_runtime.allow_fp32(parser)  # --ds.param_dtype also takes fp32 (default kept: bf16)
    parser.prog = "python -m openrlhf.cli.train_comal"
    parser.description = (
        "COMAL (convergent meta-algorithm for general preferences) on OpenRLHF. Accepts every flag of "
        "openrlhf.cli.train_dpo; COMAL, judge and rollout flags are grouped below."
    )
    parser.set_defaults(**{"logger.wandb.project": "openrlhf_train_comal", "ckpt.path": "./ckpt/checkpoints_comal"})
    add_comal_args(parser)
    add_online_args(parser)
    return parser


_UNSET = object()


def explicit_dests(parser, argv):
    """The flags (dotted dests) given on the command line: a second parse with every default set to a sentinel."""
    saved = {a.dest: a.default for a in parser._actions}
    try:
        for a in parser._actions:
            if a.dest != "help":
                a.default = _UNSET
        ns = parser.parse_args(argv)
    finally:
        for a in parser._actions:
            a.default = saved[a.dest]
    return {k for k, v in vars(ns).items() if v is not _UNSET}


def joined_negative_numbers(argv):
    """``--flag -1e-5`` as ``--flag=-1e-5``: argparse takes a token in scientific notation that starts with '-' for
    an option ("expected one argument"), so a negative learning rate typed with a space never reached the check
    that names the flag and its rule."""
    out = []
    for token in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and token.startswith("-") and _is_number(token):
            out[-1] = f"{out[-1]}={token}"
        else:
            out.append(token)
    return out


def _is_number(token):
    try:
        float(token)
    except ValueError:
        return False
    return True


def parse_args(argv=None):
    parser = build_parser()
    argv = joined_negative_numbers(sys.argv[1:] if argv is None else list(argv))
    args = parser.parse_args(argv)
    given = explicit_dests(parser, argv)
    filled = fill_official_training(args, given)
    _build, post, origin = _train_dpo_main()
    namespace = {"args": args, "__name__": "train_comal"}
    _run(post, namespace, origin)  # train_dpo's own post-processing (hierarchize, ref path default, checks)
    args = namespace["args"]
    args.given = given
    args.preset_filled = filled
    if args.comal.batch_unit is None:  # prompts where the pair rule makes several pairs per prompt: online sources
        online = "comal.algo" in given and source_kind(args) == "online"
        args.comal.batch_unit = "prompts" if online else "pairs"
        if online:
            filled.add("comal.batch_unit")
    return args


def fill_official_training(args, given):
    """With an explicit ``--comal.algo`` every training flag the user did not pass takes the official COMAL
    pipeline's value (OFFICIAL_TRAINING); without it an unchanged train_dpo launch keeps OpenRLHF's defaults.
    Returns the dests filled (shown as "preset" in the start table). ``--comal.batch_unit`` then defaults to prompts
    for an online source (its pair rule makes the pairs) and to pairs for files and datasets (parse_args)."""
    filled = set()
    if "comal.algo" not in given:
        return filled
    for flag, value in OFFICIAL_TRAINING.items():
        if flag not in given:
            setattr(args, flag, list(value) if isinstance(value, tuple) else value)
            filled.add(flag)
    return filled


def resolve(args, source_iterations):
    """The run's Plan and the provenance of each setting (flag, preset, source, OpenRLHF default)."""
    given = args.given
    rollout = getattr(args, "rollout", None)
    return resolve_plan(
        algo=args.comal.algo,
        prox=args.comal.prox,
        ref_weight=args.comal.ref_weight,
        ref_update_interval=args.comal.ref_update_interval,
        iterations=args.comal.iterations,
        beta=args.model.beta if "model.beta" in given else None,
        beta_schedule=args.comal.beta_schedule,
        ipo_enable=args.model.ipo_enable,
        default_iterations=source_iterations,
        round_length=args.comal.round_length,
        pair_rule=getattr(rollout, "pair_rule", None),
        openrlhf_beta=args.model.beta,
    )


def source_kind(args):
    kind = args.comal.source
    if kind == "auto":
        if args.comal.pairs_dir:
            return "offline"
        return "online" if getattr(args.judge, "kind", None) else "static"
    return kind


def make_source(args, strategy, tokenizer, plan):
    """The iteration source named by --comal.source (or picked from the flags given)."""
    kind = source_kind(args)
    if kind == "online":
        return OnlineSource(args, strategy, tokenizer, plan.pair_rule, optimistic=plan.algo == "optimistic")
    formatter = RowFormatter(args.data, tokenizer, args.data.max_len, need_winrates=plan.prox in NEEDS_WIN_RATES)
    if kind == "offline":
        if not args.comal.pairs_dir:
            raise BadInputError("--comal.source offline needs --comal.pairs_dir")
        return OfflineSource(args.comal.pairs_dir, formatter)
    if not args.data.dataset:
        if args.comal.pairs_dir:
            raise BadInputError(
                f"--comal.source static reads the pairs of --data.dataset, which is not given; --comal.pairs_dir "
                f"{args.comal.pairs_dir} is read by --comal.source offline"
            )
        raise BadInputError("no pairs: give --comal.pairs_dir (offline), --data.dataset (static) or --judge.kind")
    return StaticSource(args, strategy, formatter)


def make_heldout_source(args, strategy, tokenizer, plan, source, eval_pairs):
    """The held-out pairs of ``--comal.keep_best``, from the iteration's own kind of source (None without it)."""
    if not args.comal.keep_best:
        return None
    if isinstance(source, OnlineSource):
        return OnlineSource(args, strategy, tokenizer, plan.pair_rule, heldout_of=source)
    if isinstance(source, OfflineSource):
        formatter = RowFormatter(args.data, tokenizer, args.data.max_len, need_winrates=plan.prox in NEEDS_WIN_RATES)
        heldout = OfflineSource(args.comal.heldout, formatter, flag="--comal.heldout")
        heldout.validate(plan.iterations)
        return heldout
    if eval_pairs is None:
        raise PlanError("--comal.keep_best with a static source scores --eval.dataset's pairs: give --eval.dataset")
    return FixedPairs(eval_pairs, args.eval.dataset)


def load_eval_pairs(args, strategy, tokenizer, prox):
    """``--eval.dataset`` (split ``--eval.split``) as pairs, validated like the training pairs; None for an online
    source's prompt-only dataset (rows without ``--data.chosen_key``)."""
    data = blending_datasets(args.eval.dataset, None, strategy, dataset_split=args.eval.split)
    if source_kind(args) == "online" and args.data.chosen_key not in data.column_names:
        return None  # prompts only: the held-out prompts of --comal.keep_best and --eval.winrate_every
    formatter = RowFormatter(args.data, tokenizer, args.data.max_len, need_winrates=prox in NEEDS_WIN_RATES)
    skips = SkipLog()
    pairs = [p for p in (formatter(row, f"{args.eval.dataset}:row {i + 1}", skips) for i, row in enumerate(data)) if p]
    if skips.total():
        strategy.print(f"[comal] eval pairs skipped: {skips.summary()}")
    if not pairs:
        raise BadInputError(f"--eval.dataset {args.eval.dataset}: no usable pairs")
    return pairs


# OpenRLHF flag -> the official COMAL pipeline's value (its train_dpo-style launch for each iteration)
OFFICIAL_TRAINING = {
    "train.max_epochs": 3,
    "train.batch_size": 32,
    "adam.lr": 5e-7,
    "lr_warmup_ratio": 0.1,
    "lr_scheduler": "linear",
    "adam.betas": (0.9, 0.999),
    "max_norm": 0.0,
    "adam.weight_decay": 0.01,  # the official trainer's AdamW default (OpenRLHF's is 0)
    "eval.steps": 500,  # --comal.keep_best checks the held-out prox loss every 500 steps and at each epoch end
}


def settings_table(args, plan, provenance, source):
    """The effective algorithm settings with the source of each, and the training settings beside the official
    recipe's values (where they differ a ``*`` marks the row)."""
    rows = [
        ("algo", plan.algo, provenance["algo"]),
        ("prox loss", plan.prox, provenance["prox"]),
        ("r = eta * tau (anchor weight)", f"{plan.ref_weight:.4g}", provenance["ref_weight"]),
        ("K (anchor advance every)", plan.ref_update_interval or "never", provenance["ref_update_interval"]),
        ("iterations", plan.iterations, provenance["iterations"]),
        ("beta per round", ",".join(f"{b:g}" for b in plan.betas), provenance["beta"]),
        ("round length", plan.round_length, provenance["round_length"]),
        ("source", source.describe(), "flag" if "comal.source" in args.given else "default (from the flags)"),
    ]
    if isinstance(source, OnlineSource):
        rows.append(("pair rule", plan.pair_rule, provenance["pair_rule"]))
    unit = args.comal.batch_unit
    rows.append(
        (
            "--train.batch_size counts",
            unit,
            (
                "flag"
                if "comal.batch_unit" in args.given
                else (
                    "preset"
                    if "comal.batch_unit" in args.preset_filled
                    else "default (no --comal.algo: OpenRLHF's meaning)"
                )
            ),
        )
    )
    lines = ["| setting | value | from |", "|---|---|---|"] + [f"| {a} | {b} | {c} |" for a, b, c in rows]
    lines += ["", "| training flag | value | from | official COMAL |", "|---|---|---|---|"]
    for flag, official in OFFICIAL_TRAINING.items():
        node = args
        for part in flag.split("."):
            node = getattr(node, part)
        value = tuple(node) if isinstance(node, list) else node
        mark = "" if value == official else " *"
        where = "flag" if flag in args.given else "preset" if flag in args.preset_filled else "OpenRLHF default"
        lines.append(f"| --{flag} | {value}{mark} | {where} | {official} |")
    return "\n".join(lines)


def check_lora(args, strategy):
    """--ds.lora.rank > 0: the anchor is a second adapter on the policy's base model (training.lora), so the anchor
    starts as the base model itself; what cannot be combined with that is refused, naming the flags."""
    if args.ds.lora.rank <= 0:
        return
    ref = args.ref.model_name_or_path
    if ref and ref != args.model.model_name_or_path:
        raise PlanError(
            f"--ds.lora.rank {args.ds.lora.rank} with --ref.model_name_or_path {ref}: with LoRA the anchor is a "
            "second adapter on the policy's base model and starts as that base; drop --ref.model_name_or_path, or "
            "train without LoRA to start from another reference model"
        )
    rollout = getattr(args, "rollout", None)
    if source_kind(args) == "online" and getattr(rollout, "backend", None) == "vllm":
        raise PlanError(
            f"--ds.lora.rank {args.ds.lora.rank} with --rollout.backend vllm: the vLLM engines are fed full weights, "
            "not adapters; use --rollout.backend hf with LoRA"
        )
    if args.ref.offload:
        strategy.print("[comal] warning: --ref.offload has no effect with LoRA (no reference model is loaded)")


def check_merged_flag(args):
    if args.comal.lora_save_merged and args.ds.lora.rank <= 0:
        raise PlanError("--comal.lora_save_merged merges a LoRA adapter: it needs --ds.lora.rank > 0")


def check_settings(args, plan, strategy):
    """Combinations that cannot work are errors; meaningful ones where one setting wins get a logged warning."""
    if args.ds.ring_attn_size > 1:
        raise PlanError("ring attention (--ds.ring_attn_size > 1) is not supported by train_comal yet")
    if args.model.aux_loss_coef > 0:
        raise PlanError("--model.aux_loss_coef (MoE balancing loss) is not supported by train_comal yet")
    check_lora(args, strategy)
    check_merged_flag(args)
    if args.comal.round_rollback and not getattr(args.eval, "dataset", None):
        raise PlanError("--comal.round_rollback picks iterates by their held-out loss: it needs --eval.dataset")
    if args.comal.keep_best:
        kind = source_kind(args)
        if kind == "offline" and not args.comal.heldout:
            raise PlanError("--comal.keep_best with an offline source needs --comal.heldout DIR (held-out pair files)")
        if kind != "offline" and not (args.comal.heldout if kind == "online" else None) and not args.eval.dataset:
            raise PlanError(
                "--comal.keep_best needs held-out data: --eval.dataset (pairs for a static source, prompts for an "
                "online one) or --comal.heldout"
            )
        if args.comal.heldout_prompts < 1:
            raise PlanError(f"--comal.heldout_prompts must be >= 1, got {args.comal.heldout_prompts}")
    algo = getattr(plan, "algo", None)
    if algo == "optimistic" and source_kind(args) != "online":
        raise PlanError(
            "--comal.algo optimistic judges mu_k's samples against mu_(k-1)'s, so it needs the online source "
            "(--comal.source online with --judge.kind); pair files that already carry the optimistic payoff as "
            "their win rates train with --comal.prox rebel"
        )
    if algo == "optimistic" and args.comal.keep_best:
        raise PlanError(
            "--comal.algo optimistic with --comal.keep_best: the held-out pairs' targets would need the held-out "
            "prompts judged against mu_(k-1)'s samples as well, which is not implemented; drop --comal.keep_best"
        )
    if algo == "extragradient":
        if args.ref.model_name_or_path != args.model.model_name_or_path:
            raise PlanError(
                "--comal.algo extragradient centres the real step on the anchor, which must start as the policy "
                f"(mu_0); --ref.model_name_or_path {args.ref.model_name_or_path} differs from the model"
            )
        if args.comal.round_rollback:
            raise PlanError("--comal.algo extragradient cannot roll back inside a step: drop --comal.round_rollback")
    # a pair's win-rate targets leave the pair's two samples out (comal_openrlhf.core.pairs): 2 samples leave none
    n = args.rollout.n_samples_per_prompt
    if source_kind(args) == "online" and plan.prox in NEEDS_WIN_RATES and n < 3:
        raise PlanError(
            f"the {plan.prox} loss needs --rollout.n_samples_per_prompt >= 3, got {n}: a pair's win rates are "
            "estimated from the prompt's samples other than the pair's two"
        )
    if args.eval.winrate_every < 0 or args.eval.winrate_prompts < 1 or args.eval.winrate_samples < 1:
        raise PlanError("--eval.winrate_every must be >= 0, --eval.winrate_prompts and _samples >= 1")
    if args.eval.winrate_every and not (getattr(args.eval, "dataset", None) and args.judge.kind):
        raise PlanError("--eval.winrate_every samples --eval.dataset's prompts and needs a judge: --judge.kind")
    if args.model.label_smoothing > 0 and plan.prox != "dpo":
        strategy.print(
            f"[comal] warning: --model.label_smoothing {args.model.label_smoothing} has no effect on the "
            f"{plan.prox} loss (only dpo smooths hard labels, as in OpenRLHF's DPOLoss)"
        )
    if source_kind(args) != "online" and "rollout.pair_rule" in args.given:
        strategy.print("[comal] warning: --rollout.pair_rule applies to the online source only; ignored")
    note = sampling_note(args) if source_kind(args) == "online" else None
    if note:
        strategy.print(note)


def sampling_note(args):
    """One line when the online samples do not come from mu_k, the policy whose log-probs the loss uses (T = 1 and
    top-p = 1 sample mu_k itself); None when they do."""
    ro = args.rollout
    if ro.temperature == 1.0 and ro.top_p == 1.0:
        return None
    return (
        f"[comal] note: sampling at --rollout.temperature {ro.temperature:g} / --rollout.top_p {ro.top_p:g} draws "
        "from a tempered or truncated policy while the loss uses mu_k's own log-probs: the run trains, but the "
        "convergence guarantee does not hold for it (its fixed point is the Nash of the sampled policy); 1.0 / 1.0 "
        "samples mu_k"
    )


def train(args, clock=None):
    from openrlhf.utils import get_strategy

    clock = clock or StartupClock()
    strategy = get_strategy(args)
    strategy.setup_distributed(timeout=timedelta(seconds=args.comal.dist_timeout))
    peers = Peers.gather(args.comal.dist_timeout, args.comal.serial_timeout)
    if len(peers.table) > 1:
        strategy.print(peers.describe())
    run_dir = RunDirectory(args.ckpt.path, args.ckpt.output_dir, is_rank_0=strategy.is_rank_0())
    try:
        on_all_ranks(lambda: run_dir.lock(say=strategy.print), strategy)  # a second run here is refused
        clock.mark("distributed set-up and run lock")
        try:
            trainer = build_trainer(args, strategy, run_dir, clock)
            strategy.print(clock.line())
            trainer.fit()
            trainer.save_final(args.ckpt.output_dir)
            if args.comal.lora_save_merged:
                on_all_ranks(lambda: save_merged(args.model.model_name_or_path, args.ckpt.output_dir), strategy)
        finally:
            run_dir.unlock()
    except Exception as e:  # a peer lost mid-collective: one error naming it, not the transport's traceback
        if isinstance(e, COMALError) or not is_peer_failure(e):
            raise
        raise peers.error(e) from None


class StartupClock:
    """Where a run's start-up goes, printed in one line before the first iteration: process start and imports (from
    the kernel's start time of the process, Linux /proc; omitted elsewhere), then each stage since the last mark."""

    def __init__(self):
        self.marks, self.last = [], time.perf_counter()
        age = process_age()
        if age is not None:
            self.marks.append(("process start and imports", age))

    def mark(self, label):
        now = time.perf_counter()
        self.marks.append((label, now - self.last))
        self.last = now

    def line(self):
        total = sum(s for _, s in self.marks)
        return f"[comal] start-up {total:.1f} s: " + ", ".join(f"{label} {s:.1f}" for label, s in self.marks)


def process_age():
    """Seconds since this process started (Linux: /proc/self/stat's start time against /proc/uptime), else None."""
    try:
        with open("/proc/self/stat") as f:
            start = int(f.read().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        with open("/proc/uptime") as f:
            return max(0.0, float(f.read().split()[0]) - start)
    except (OSError, ValueError, IndexError):
        return None


def on_all_ranks(fn, strategy):
    """Run ``fn`` on rank 0 and raise its COMALError on every rank (so every rank exits with the message)."""
    import torch.distributed as dist

    error = None
    if strategy.is_rank_0():
        try:
            fn()
        except COMALError as e:
            error = e
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error is not None:
        raise error


def build_trainer(args, strategy, run_dir, clock=None):
    """Models, tokenizer, plan, source and trainer of a run, resumed from its checkpoint where asked; ready to fit.
    The stages follow the data: the run directory, the models, the iteration source (and the held-out data), the
    optimizer, the evaluation probes, the trainer, the resume."""
    # openrlhf.models (and so the trainer) imports flash_attn at import time: on a CPU-only machine the CPU runtime
    # (applied by main) must come first, so this import stays here rather than at the top of the module
    from comal_openrlhf.training.trainer import COMALTrainer, TrainerSettings

    # a fresh run must not write into an earlier run's files: checked before anything slow starts (e.g. vLLM engines)
    will_resume = args.ckpt.load_enable and os.path.isfile(os.path.join(args.ckpt.path, "latest"))
    if not will_resume:
        on_all_ranks(lambda: run_dir.prepare_fresh(overwrite=args.comal.overwrite, say=strategy.print), strategy)
    clock = clock or StartupClock()
    model, ref_model, tokenizer = _setup_models(args, strategy)
    clock.mark("models")
    plan, source, evaluation = _setup_source(args, strategy, tokenizer)
    clock.mark("data source")
    (model, optim, scheduler), ref_model = _setup_optimizer(args, strategy, model, ref_model)
    clock.mark("DeepSpeed engines")
    winrate_probe = _setup_winrate_probe(args, strategy, tokenizer, plan, source, evaluation)
    rollout = getattr(args, "rollout", None)
    settings = TrainerSettings(
        logps_kernel=args.comal.logps_kernel,
        iteration_ckpt=not args.comal.no_iteration_ckpt,
        policy_weighting=getattr(rollout, "pair_weighting", "count") == "policy",
        mass_coef=args.comal.mass_coef,
        keep_optimizer_state=args.comal.keep_optimizer_state,
        keep_best=args.comal.keep_best,
        round_rollback=args.comal.round_rollback,
        eval_steps=args.eval.steps,
        batch_unit=args.comal.batch_unit,
    )
    trainer = COMALTrainer(
        model=model,
        ref_model=ref_model,
        strategy=strategy,
        tokenizer=tokenizer,
        optim=optim,
        scheduler=scheduler,
        source=source,
        plan=plan,
        scheduler_cfg=_scheduler_settings(args),
        settings=settings,
        max_norm=args.max_norm,
        max_epochs=args.train.max_epochs,
        save_hf_ckpt=args.ckpt.save_hf,
        disable_ds_ckpt=args.ckpt.disable_ds,
        eval_dataset=evaluation["dataset"],
        winrate_probe=winrate_probe,
        heldout_source=evaluation["heldout"],
    )
    if will_resume:
        load_path, states = strategy.load_ckpt(model.model, args.ckpt.path)
        if load_path is None:
            raise PlanError(f"--ckpt.load_enable: no loadable checkpoint in {args.ckpt.path}")
        trainer.restore(states, accept_plan_change=args.comal.accept_plan_change)
    os.makedirs(args.ckpt.output_dir, exist_ok=True)
    clock.mark("trainer" + (" and resume" if will_resume else ""))
    return trainer


def _setup_models(args, strategy):
    """The policy (trained, with LoRA and Liger as asked) and the anchor (ref) as OpenRLHF Actors, and the tokenizer,
    as train_dpo builds them. With LoRA the anchor is an adapter on the policy (training.lora) and ref is None."""
    from openrlhf.models import Actor  # after the CPU runtime: see build_trainer
    from openrlhf.utils import get_tokenizer

    def actor(path, ds_config, **train_only):
        return Actor(
            path,
            attn_implementation=args.ds.attn_implementation,
            experts_implementation=args.ds.experts_implementation,
            param_dtype=args.ds.param_dtype,
            load_in_4bit=args.ds.load_in_4bit,
            ds_config=ds_config,
            packing_samples=args.ds.packing_samples,
            **train_only,
        )

    lora = args.ds.lora
    model = actor(
        args.model.model_name_or_path,
        strategy.get_ds_train_config(),
        lora_rank=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_liger_kernel=args.ds.use_liger_kernel,
    )
    if lora.rank > 0:  # the anchor is a frozen second adapter on the policy's base: no reference model is loaded
        add_anchor_adapter(model)
        ref_model = None
        strategy.print(
            f"[comal] LoRA rank {lora.rank}: the anchor is the adapter '{ANCHOR}' on the policy's base model "
            "(zero at the start: the base model alone); no reference model is loaded"
        )
    else:
        ref_model = actor(args.ref.model_name_or_path, strategy.get_ds_eval_config(offload=args.ref.offload))
        if args.ref.offload:
            ref_model._offload = True
    fast = not args.data.disable_fast_tokenizer
    tokenizer = get_tokenizer(args.model.model_name_or_path, model.model, "right", strategy, use_fast=fast)
    if ref_model is not None:
        get_tokenizer(args.model.model_name_or_path, ref_model.model, "right", strategy, use_fast=fast)
    if args.model.gradient_checkpointing_enable:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": args.model.gradient_checkpointing_reentrant}
        )
    return model, ref_model, tokenizer


def _setup_source(args, strategy, tokenizer):
    """The whole plan, resolved and validated before the first step, the iteration source, and the evaluation data
    ({"pairs", "dataset", "heldout"}: --eval.dataset's pairs and their dataset, keep_best's held-out source)."""
    from comal_openrlhf.training.trainer import eval_record  # after the CPU runtime: see build_trainer

    fixed = 1 if source_kind(args) == "static" else None
    if source_kind(args) == "offline" and args.comal.pairs_dir and os.path.isdir(args.comal.pairs_dir):
        fixed = len([f for f in os.listdir(args.comal.pairs_dir) if OfflineSource.PATTERN.match(f)]) or None
    plan, provenance = resolve(args, fixed)
    check_settings(args, plan, strategy)
    source = make_source(args, strategy, tokenizer, plan)
    source.validate(plan.iterations)
    evaluation = {"pairs": None, "dataset": None}
    if args.eval.dataset:
        evaluation["pairs"] = pairs = load_eval_pairs(args, strategy, tokenizer, plan.prox)
        if pairs is not None:
            evaluation["dataset"] = (PairDataset(pairs, tokenizer, args.data.max_len), eval_record(pairs))
    if args.comal.round_rollback and evaluation["dataset"] is None:
        raise PlanError("--comal.round_rollback scores fixed held-out pairs: --eval.dataset must hold pairs")
    evaluation["heldout"] = make_heldout_source(args, strategy, tokenizer, plan, source, evaluation["pairs"])
    strategy.print("[comal] effective settings:\n" + settings_table(args, plan, provenance, source))
    return plan, source, evaluation


def _scheduler_settings(args):
    return dict(lr_scheduler=args.lr_scheduler, lr_warmup_ratio=args.lr_warmup_ratio, min_lr_ratio=args.min_lr_ratio)


def _setup_optimizer(args, strategy, model, ref_model):
    """DeepSpeed engines for both models and the policy's optimizer; the schedule is restarted per iteration by the
    trainer (each iteration is its own prox problem)."""
    cfg = dict(
        optim=args.optim,
        muon=vars(args.muon),
        adam=vars(args.adam),
        max_norm=args.max_norm,
        scheduler_steps=1,
        **_scheduler_settings(args),
    )
    return strategy.prepare((model, cfg), ref_model)


def _setup_winrate_probe(args, strategy, tokenizer, plan, source, evaluation):
    """``--eval.winrate_every``: the policy against the start policy and the anchor on held-out prompts (None when
    off)."""
    from comal_openrlhf.training.trainer import WinrateProbe  # after the CPU runtime: see build_trainer

    if not args.eval.winrate_every:
        return None
    judge = source.judge if isinstance(source, OnlineSource) else build_judge(args.judge)
    if evaluation["pairs"] is not None:
        prompts = list(dict.fromkeys(p.prompt for p in evaluation["pairs"]))
    else:
        heldout = evaluation["heldout"]
        prompts = (heldout or OnlineSource(args, strategy, tokenizer, plan.pair_rule, heldout_of=source)).texts
    prompts = prompts[: args.eval.winrate_prompts]
    return WinrateProbe(
        judge, prompts, args.eval.winrate_every, args.eval.winrate_samples, args.rollout, args.judge.single_order
    )


def _number_error(flag, value, rule):
    return PlanError(f"{flag} must be {rule}, got {value}")


def check_model_path(path, flag):
    """A model folder with a config.json, or a name the hub cache resolves; BadInputError naming the flag."""
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise BadInputError(f"{flag} {path}: the folder has no config.json (not a Hugging Face model folder)")
        return
    if os.path.exists(path):
        raise BadInputError(f"{flag} {path}: a file, not a model folder")
    if path.startswith(("/", "./", "../", "~")) or path.count("/") != 1:  # a hub id is exactly ORG/NAME
        raise BadInputError(f"{flag} {path}: no such folder")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - hub/cache failures come in many types; the reason is kept
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise BadInputError(f"{flag} {path}: no such folder, and not loadable as a hub model ({reason})") from None


def preflight(args):
    """Every check that needs no model, run on every rank before anything loads: numbers in range, the batch
    arithmetic, input files present and not empty, model folders present, output folders writable. Raises a
    COMALError naming the flag (one line at the command line)."""
    t, ro = args.train, getattr(args, "rollout", None)
    for flag, value in (("--train.batch_size", t.batch_size), ("--train.micro_batch_size", t.micro_batch_size),
                        ("--train.max_epochs", t.max_epochs), ("--data.max_len", args.data.max_len)):  # fmt: skip
        if not (isinstance(value, int) and value >= 1):
            raise _number_error(flag, value, "an integer >= 1")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dp = max(1, world // max(1, args.ds.ring_attn_size) // max(1, getattr(args.ds, "tensor_parallel_size", 1)))
    if t.batch_size % (t.micro_batch_size * dp):
        raise PlanError(
            f"--train.batch_size {t.batch_size} must be a multiple of --train.micro_batch_size {t.micro_batch_size} "
            f"x {dp} data-parallel rank(s) = {t.micro_batch_size * dp} (the rest becomes gradient accumulation)"
        )
    pb = args.comal.precompute_batch_size
    if pb is not None and not (isinstance(pb, int) and pb >= 1):
        raise _number_error("--comal.precompute_batch_size", pb, "an integer >= 1")
    if not (math.isfinite(args.adam.lr) and args.adam.lr >= 0):
        raise _number_error("--adam.lr", args.adam.lr, "a finite number >= 0")
    if not (math.isfinite(args.model.label_smoothing) and 0 <= args.model.label_smoothing < 0.5):
        raise _number_error("--model.label_smoothing", args.model.label_smoothing, "in [0, 0.5)")
    if not (math.isfinite(args.max_norm) and args.max_norm >= 0):
        raise _number_error("--max_norm", args.max_norm, "a finite number >= 0 (0 = no clipping)")
    if not (math.isfinite(args.lr_warmup_ratio) and 0 <= args.lr_warmup_ratio <= 1):
        raise _number_error("--lr_warmup_ratio", args.lr_warmup_ratio, "in [0, 1]")
    for flag, value in (("--comal.dist_timeout", args.comal.dist_timeout),
                        ("--comal.serial_timeout", args.comal.serial_timeout)):  # fmt: skip
        if not (math.isfinite(value) and value > 0):
            raise _number_error(flag, value, "a number of seconds > 0")
    if ro is not None and source_kind(args) == "online":
        low = 0.0 if ro.backend == "vllm" else None  # vLLM: temperature 0 is greedy; HF sampling needs T > 0
        if not (math.isfinite(ro.temperature) and (ro.temperature > 0 or ro.temperature == low)):
            rule = "a number >= 0" if low is not None else "a number > 0 (HF sampling)"
            raise _number_error("--rollout.temperature", ro.temperature, rule)
        if not (math.isfinite(ro.top_p) and 0 < ro.top_p <= 1):
            raise _number_error("--rollout.top_p", ro.top_p, "in (0, 1]")
        for flag, value in (("--rollout.max_new_tokens", ro.max_new_tokens),
                            ("--rollout.prompts_per_iteration", ro.prompts_per_iteration),
                            ("--rollout.generate_batch_size", ro.generate_batch_size)):  # fmt: skip
            if value < 1:
                raise _number_error(flag, value, "an integer >= 1")
    if args.comal.pairs_dir and source_kind(args) == "offline" and not os.path.isdir(args.comal.pairs_dir):
        raise BadInputError(f"--comal.pairs_dir {args.comal.pairs_dir}: no such directory")
    if args.data.dataset and source_kind(args) != "offline":  # the offline source reads --comal.pairs_dir only
        check_dataset_spec(args.data.dataset, "--data.dataset")
    if getattr(args.eval, "dataset", None):
        check_dataset_spec(args.eval.dataset, "--eval.dataset")
    check_model_path(args.model.model_name_or_path, "--model.model_name_or_path")
    if args.ref.model_name_or_path != args.model.model_name_or_path:
        check_model_path(args.ref.model_name_or_path, "--ref.model_name_or_path")
    if not args.ckpt.disable_ds:
        check_writable(args.ckpt.path, "--ckpt.path")
    check_writable(args.ckpt.path.rstrip("/") + "_comal", "the COMAL state folder (--ckpt.path + _comal)")
    check_writable(args.ckpt.output_dir, "--ckpt.output_dir")


def main(argv=None):
    clock = StartupClock()
    cpu_runtime.apply()
    clock.mark("CPU runtime")
    args = parse_args(argv)
    try:
        preflight(args)
        clock.mark("flags and checks")
        train(args, clock)
    except COMALError as e:  # every rank raises the same typed error: one clear message and exit 2 on each
        print(f"[comal] error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
