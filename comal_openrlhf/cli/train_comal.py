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
import os
from datetime import datetime  # noqa: F401  (train_dpo's parser statements use it)

from comal_openrlhf.logps import LOGPS_KERNELS
from comal_openrlhf.schedule import PRESETS, PROXES

ALGO_HELP = (
    "Preset of (prox loss, r, K): iter-dpo = (dpo, 0, never), iter-ipo = (ipo, 0, never), sppo = (sppo, 0, never), "
    "inpo = (ipo, 1/3, never), comal = (ipo, 1/3, 12). Default: iter-ipo with --model.ipo_enable, else iter-dpo, "
    "so an unchanged train_dpo launch keeps its meaning."
)


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
        help="Prox loss (COMAL.md sec. 4) overriding the preset: ipo (exact for any preference), dpo, sppo, rebel",
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
        help="Number of iterations (default: the number of files in --comal.pairs_dir, else 24)",
    )
    g.add_argument(
        "--comal.beta_schedule",
        type=str,
        default=None,
        help="Beta per round, comma separated (e.g. 0.002,0.1); the last value holds for later rounds. "
        "Default: --model.beta in every round",
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
        "of the logits); triton; torch; openrlhf = OpenRLHF's own path (fp32 copy of all logits)",
    )
    g.add_argument(
        "--comal.mass_coef",
        type=float,
        default=0.0,
        help="Weight of a term keeping the policy's total mass on each prompt's sampled responses equal to mu_k's "
        "(the prox step only reweights within them); 0 = off, as in the official code",
    )
    g.add_argument(
        "--comal.no_iteration_ckpt",
        action="store_true",
        default=False,
        help="Do not save a DeepSpeed checkpoint at the end of every iteration (then a crash loses iterations)",
    )
    return parser


def build_parser():
    build, _post, origin = _train_dpo_main()
    namespace = {"argparse": argparse, "datetime": datetime, "__name__": "train_comal"}
    _run(build, namespace, origin)
    parser = namespace["parser"]
    parser.prog = "python -m openrlhf.cli.train_comal"
    parser.description = (
        "COMAL (convergent meta-algorithm for general preferences) on OpenRLHF. Accepts every flag of "
        "openrlhf.cli.train_dpo; COMAL, judge and rollout flags are grouped below."
    )
    parser.set_defaults(**{"logger.wandb.project": "openrlhf_train_comal", "ckpt.path": "./ckpt/checkpoints_comal"})
    add_comal_args(parser)
    try:  # the online source's groups (issue "Online COMAL")
        from comal_openrlhf.online import add_online_args

        add_online_args(parser)
    except ImportError:
        pass
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    _build, post, origin = _train_dpo_main()
    namespace = {"args": args, "__name__": "train_comal"}
    _run(post, namespace, origin)  # train_dpo's own post-processing (hierarchize, ref path default, checks)
    return namespace["args"]


def make_source(args, strategy, tokenizer, plan_prox):
    from comal_openrlhf.data import OfflineSource, RowFormatter, StaticSource
    from comal_openrlhf.losses import NEEDS_WIN_RATES

    kind = args.comal.source
    if kind == "auto":
        kind = (
            "offline"
            if args.comal.pairs_dir
            else ("online" if getattr(getattr(args, "judge", None), "kind", None) else "static")
        )
    if kind == "online":
        from comal_openrlhf.online import OnlineSource

        return OnlineSource(args, strategy, tokenizer)
    formatter = RowFormatter(args.data, tokenizer, args.data.max_len, need_winrates=plan_prox in NEEDS_WIN_RATES)
    if kind == "offline":
        if not args.comal.pairs_dir:
            raise SystemExit("[comal] --comal.source offline needs --comal.pairs_dir")
        return OfflineSource(args.comal.pairs_dir, formatter)
    if not args.data.dataset:
        raise SystemExit("[comal] no pairs: give --comal.pairs_dir (offline), --data.dataset (static) or --judge.kind")
    return StaticSource(args, strategy, formatter)


def make_eval_dataset(args, strategy, tokenizer, prox):
    """``--eval.dataset`` (split ``--eval.split``) as a PairDataset, validated like the training pairs."""
    from openrlhf.datasets.utils import blending_datasets

    from comal_openrlhf.data import PairDataset, RowFormatter, SkipLog
    from comal_openrlhf.losses import NEEDS_WIN_RATES

    data = blending_datasets(args.eval.dataset, None, strategy, dataset_split=args.eval.split)
    formatter = RowFormatter(args.data, tokenizer, args.data.max_len, need_winrates=prox in NEEDS_WIN_RATES)
    skips = SkipLog()
    rows = [r for r in (formatter(row, f"{args.eval.dataset}:row {i}", skips) for i, row in enumerate(data)) if r]
    if skips.total():
        strategy.print(f"[comal] eval pairs skipped: {skips.summary()}")
    if not rows:
        raise SystemExit(f"[comal] --eval.dataset {args.eval.dataset}: no usable pairs")
    return PairDataset(rows, tokenizer, args.data.max_len)


def train(args):
    from openrlhf.models import Actor
    from openrlhf.utils import get_strategy, get_tokenizer

    from comal_openrlhf.data import DataError
    from comal_openrlhf.schedule import resolve_plan
    from comal_openrlhf.trainer import COMALTrainer, NonFiniteLossError

    strategy = get_strategy(args)
    strategy.setup_distributed()

    model = Actor(
        args.model.model_name_or_path,
        attn_implementation=args.ds.attn_implementation,
        experts_implementation=args.ds.experts_implementation,
        param_dtype=args.ds.param_dtype,
        load_in_4bit=args.ds.load_in_4bit,
        lora_rank=args.ds.lora.rank,
        lora_alpha=args.ds.lora.alpha,
        lora_dropout=args.ds.lora.dropout,
        target_modules=args.ds.lora.target_modules,
        ds_config=strategy.get_ds_train_config(),
        packing_samples=args.ds.packing_samples,
        use_liger_kernel=args.ds.use_liger_kernel,
    )
    tokenizer = get_tokenizer(
        args.model.model_name_or_path, model.model, "right", strategy, use_fast=not args.data.disable_fast_tokenizer
    )
    ref_model = Actor(
        args.ref.model_name_or_path,
        attn_implementation=args.ds.attn_implementation,
        experts_implementation=args.ds.experts_implementation,
        param_dtype=args.ds.param_dtype,
        load_in_4bit=args.ds.load_in_4bit,
        ds_config=strategy.get_ds_eval_config(offload=args.ref.offload),
        packing_samples=args.ds.packing_samples,
    )
    if args.ref.offload:
        ref_model._offload = True
    get_tokenizer(
        args.model.model_name_or_path,
        ref_model.model,
        "right",
        strategy,
        use_fast=not args.data.disable_fast_tokenizer,
    )
    if args.model.gradient_checkpointing_enable:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": args.model.gradient_checkpointing_reentrant}
        )

    try:
        plan = resolve_plan(
            args.comal.algo,
            args.comal.prox,
            args.comal.ref_weight,
            args.comal.ref_update_interval,
            args.comal.iterations,
            args.model.beta,
            args.comal.beta_schedule,
            args.model.ipo_enable,
        )
        source = make_source(args, strategy, tokenizer, plan.prox)
        if args.comal.iterations is None and source.num_iterations is not None:
            plan.iterations = source.num_iterations  # one iteration per file of the offline source
    except (ValueError, DataError) as e:
        raise SystemExit(f"[comal] {e}") from None
    if args.ds.ring_attn_size > 1:
        raise SystemExit("[comal] ring attention (--ds.ring_attn_size > 1) is not supported by train_comal yet")
    if args.model.aux_loss_coef > 0:
        raise SystemExit("[comal] --model.aux_loss_coef (MoE balancing loss) is not supported by train_comal yet")
    eval_dataset = None
    if getattr(args.eval, "dataset", None):
        eval_dataset = make_eval_dataset(args, strategy, tokenizer, plan.prox)
    if plan.ref_update_interval > 0 and args.ds.lora.rank > 0:
        raise SystemExit("[comal] reference advances copy full weights; LoRA (--ds.lora.rank > 0) is not supported")
    if args.comal.algo is None:
        strategy.print(f"[comal] no --comal.algo given: running {plan.algo} (pass --comal.algo comal for COMAL)")
    strategy.print(f"[comal] plan: {plan.as_dict()}")
    kernel = args.comal.logps_kernel

    sched = dict(lr_scheduler=args.lr_scheduler, lr_warmup_ratio=args.lr_warmup_ratio, min_lr_ratio=args.min_lr_ratio)
    cfg = dict(
        optim=args.optim,
        muon=vars(args.muon),
        adam=vars(args.adam),
        max_norm=args.max_norm,
        scheduler_steps=1,  # restarted per iteration by the trainer
        **sched,
    )
    (model, optim, scheduler), ref_model = strategy.prepare((model, cfg), ref_model)

    trainer = COMALTrainer(
        model=model,
        ref_model=ref_model,
        strategy=strategy,
        tokenizer=tokenizer,
        optim=optim,
        scheduler=scheduler,
        source=source,
        plan=plan,
        scheduler_cfg=sched,
        max_norm=args.max_norm,
        max_epochs=args.train.max_epochs,
        save_hf_ckpt=args.ckpt.save_hf,
        disable_ds_ckpt=args.ckpt.disable_ds,
        logps_kernel=kernel,
        iteration_ckpt=not args.comal.no_iteration_ckpt,
        mass_coef=args.comal.mass_coef,
        eval_dataset=eval_dataset,
        policy_weighting=getattr(getattr(args, "rollout", None), "pair_weighting", "count") == "policy",
    )
    if args.ckpt.load_enable and os.path.exists(args.ckpt.path):
        load_path, states = strategy.load_ckpt(model.model, args.ckpt.path)
        if load_path is not None:
            trainer.restore(states)
    os.makedirs(args.ckpt.output_dir, exist_ok=True)
    try:
        trainer.fit()
    except DataError as e:
        raise SystemExit(f"[comal] {e}") from None
    except NonFiniteLossError as e:
        raise SystemExit(str(e)) from None
    strategy.save_model(model, tokenizer, args.ckpt.output_dir)


def main(argv=None):
    from comal_openrlhf import cpu_runtime

    cpu_runtime.apply()
    train(parse_args(argv))


if __name__ == "__main__":
    main()
