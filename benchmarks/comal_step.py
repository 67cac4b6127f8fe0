"""Benchmark: one COMAL training step (cached log-probs) against OpenRLHF's DPOTrainer step (reference recomputed).

    python benchmarks/comal_step.py [--repeats 20] [--hidden 256] [--layers 4] [--vocab 8192] [--seq 128]

Both steps run in one process on the same model, batch and DeepSpeed strategy (OpenRLHF's, through train_comal's
argument parser): the DPO step is upstream's per-step work (``concatenated_forward`` of the policy with grad, of the
reference without, ``DPOLoss``, backward, optimizer step); the COMAL step is ``COMALTrainer._train_step`` (policy
forward/backward and the prox loss on cached mu/ref log-probs). The COMAL step runs with each log-prob path
(``--comal.logps_kernel``): openrlhf (fp32 copy of the logits), torch (chunked kernel on the bf16 logits) and
linear (backbone to the hidden states, then the chunked LM-head kernel: no B x L x V logits). The precompute pass
that fills the cache (policy + reference forward over every pair, no gradient, once per iteration:
``COMALTrainer._cached``; its cold first call, which also tokenises the pairs, is printed apart) is timed per pair
against a training step per pair with the same log-prob path, shapes and run (medians; target: precompute per pair
<= 0.8x a training step per pair). Prints a markdown table: medians (p20/p80) over ``--repeats`` steps after
warm-up, tokens/s, the peak memory of one step (whole, and up to its optimizer step) and the COMAL/DPO ratio
(target <= 0.75). Then a whole iteration, timed end to end in the same run (``--iteration-pairs`` pairs, ``--epochs``
passes, micro-batches of ``--micro-batch``, ``--iteration-repeats`` times, interleaved): COMAL's precompute pass and
its epochs of training steps with each log-prob path, against OpenRLHF's DPOTrainer doing the same epochs with its
reference recomputed in every step; printed with the split (precompute, training), the ratio to DPO's iteration
(target <= 0.30 at V >= 32k) and the peak memory of the iteration (the larger of its precompute pass's and its
step's). Peak memory is the growth of live tensor memory during one step over what was held before it: on
CUDA ``torch.cuda.max_memory_allocated``, on CPU the running sum of torch.profiler's memory events (each tensor
allocation and free).
"""

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--seq", type=int, default=128, help="response words per sequence")
    p.add_argument("--micro-batch", dest="micro_batch", type=int, default=4, help="pairs per step")
    p.add_argument("--pairs", type=int, default=64, help="pairs in the iteration (precompute pass)")
    p.add_argument("--precompute-batch", dest="precompute_batch", type=int, default=None,
                   help="--comal.precompute_batch_size: pairs per micro-batch of the precompute pass (default: "
                   "--micro-batch)")  # fmt: skip
    p.add_argument("--iteration-pairs", dest="iteration_pairs", type=int, default=None,
                   help="pairs of the whole-iteration timing (at most --pairs; default: 16, or --pairs if "
                   "fewer)")  # fmt: skip
    p.add_argument("--epochs", type=int, default=3, help="passes over the pairs per iteration (official COMAL: 3)")
    p.add_argument("--iteration-repeats", dest="iteration_repeats", type=int, default=3,
                   help="whole iterations timed per row (0: skip the iteration table)")  # fmt: skip
    p.add_argument("--zero-stage", dest="zero_stage", type=int, default=2)
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="--ds.param_dtype. auto: bf16 on CUDA or a CPU with native bf16, else fp32 (emulated bf16 is "
                   "many times slower), said in one line; --dtype bf16 forces bf16")  # fmt: skip
    a = p.parse_args()
    if a.iteration_pairs is None:
        a.iteration_pairs = min(16, a.pairs)
    if not 1 <= a.iteration_pairs <= a.pairs:
        p.error(f"--iteration-pairs {a.iteration_pairs}: must be between 1 and --pairs ({a.pairs})")

    from comal_openrlhf import cpu_runtime

    cpu_runtime.apply()
    import torch

    from comal_openrlhf.cli.train_comal import parse_args
    from comal_openrlhf.core.pairs import Pair
    from comal_openrlhf.core.schedule import resolve_plan
    from comal_openrlhf.tiny import build_tiny_llama
    from comal_openrlhf.training.data import IterationSource

    tmp = tempfile.mkdtemp(prefix="comal_bench_")
    words = tuple(f"w{i}" for i in range(a.vocab - 10))
    model_path = build_tiny_llama(
        os.path.join(tmp, "model"),
        words=words,
        hidden_size=a.hidden,
        num_layers=a.layers,
        num_heads=max(1, a.hidden // 64),
        intermediate_size=4 * a.hidden,
        max_positions=2 * a.seq + 64,
    )
    mb = a.micro_batch
    args = parse_args(
        ["--model.model_name_or_path", model_path, "--ds.zero_stage", str(a.zero_stage)]
        + ["--train.micro_batch_size", str(mb), "--train.batch_size", str(mb), "--data.max_len", str(2 * a.seq + 32)]
        + ["--ckpt.path", os.path.join(tmp, "ckpt"), "--ckpt.output_dir", os.path.join(tmp, "out")]
        + ["--model.ipo_enable", "--comal.algo", "iter-ipo"]
        + ([] if a.dtype == "auto" else ["--ds.param_dtype", a.dtype])
        + ([] if a.precompute_batch is None else ["--comal.precompute_batch_size", str(a.precompute_batch)])
    )
    from openrlhf.models import Actor, DPOLoss
    from openrlhf.utils import get_strategy, get_tokenizer

    from comal_openrlhf.training.trainer import COMALTrainer, TrainerSettings

    strategy = get_strategy(args)
    strategy.setup_distributed()
    ds = args.ds
    model = Actor(model_path, attn_implementation=ds.attn_implementation, param_dtype=ds.param_dtype,
                  ds_config=strategy.get_ds_train_config())  # fmt: skip
    tok = get_tokenizer(model_path, model.model, "right", strategy)
    ref = Actor(model_path, attn_implementation=ds.attn_implementation, param_dtype=ds.param_dtype,
                ds_config=strategy.get_ds_eval_config())  # fmt: skip
    sched = dict(lr_scheduler="constant", lr_warmup_ratio=0.0, min_lr_ratio=0.1)
    cfg = dict(optim="adam", muon=vars(args.muon), adam=vars(args.adam), max_norm=1.0, scheduler_steps=10**6, **sched)
    (model, optim, scheduler), ref = strategy.prepare((model, cfg), ref)
    plan, _ = resolve_plan("iter-ipo", beta=0.1)
    trainer = COMALTrainer(model, ref, strategy, tok, optim, scheduler, IterationSource(), plan, sched,
                           TrainerSettings(logps_kernel="openrlhf", iteration_ckpt=False))  # fmt: skip

    g = torch.Generator().manual_seed(0)

    def text(n):
        return " ".join(words[i] for i in torch.randint(len(words), (n,), generator=g).tolist())

    rows = [Pair(text(16) + " ", text(a.seq), text(a.seq)) for _ in range(a.pairs)]
    t = time.perf_counter()
    record = trainer.precompute(0, rows, {})
    precompute_s = time.perf_counter() - t
    dataset = trainer._dataset(record.pairs)
    batch = dataset.collate_fn([dataset[i] for i in range(mb)])
    tokens = int(batch[1].sum() + batch[3].sum())
    dpo_loss = DPOLoss(0.1, 0.0, True)

    def dpo_step(batch=batch):
        chosen_ids, c_mask, reject_ids, r_mask, plens, _ = batch
        pw, pl, _, _ = trainer.concatenated_forward(model, chosen_ids, c_mask, reject_ids, r_mask, plens)
        with torch.no_grad():
            rw, rl, _, _ = trainer.concatenated_forward(ref, chosen_ids, c_mask, reject_ids, r_mask, plens)
        loss, _, _ = dpo_loss(pw, pl, rw, rl)
        strategy.backward(loss, model, optim)
        strategy.optimizer_step(optim, model, scheduler)

    def comal_step():
        trainer._train_step(batch, record)

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def timed(fn, repeats=a.repeats, warmup=a.warmup):
        for _ in range(warmup):
            fn()
        out = []
        for _ in range(repeats):
            sync()
            t = time.perf_counter()
            fn()
            sync()
            out.append(time.perf_counter() - t)
        return out

    def with_kernel(kernel):
        def step():
            trainer.settings.logps_kernel = kernel
            try:
                trainer._train_step(batch, record)
            finally:
                trainer.settings.logps_kernel = "openrlhf"

        return step

    comal_kernel_step, comal_linear_step = with_kernel("torch"), with_kernel("linear")

    def precompute_pass(kernel):
        """The precompute pass over the iteration's pairs (warm: the dataset is tokenised once, by the cold call)."""

        def run():
            trainer.settings.logps_kernel = kernel
            try:
                trainer._cached(record, dataset, "bench precompute")
            finally:
                trainer.settings.logps_kernel = "openrlhf"

        return run

    # (precompute pass, training step) pairs compared per pair: OpenRLHF's path (two forwards, two calls) and the
    # chunked torch kernel (two forwards, one sequence_logratio call reading both logits)
    passes = {"pre": ("comal", precompute_pass("openrlhf")), "pre_kernel": ("comal_kernel", precompute_pass("torch"))}
    pass_repeats = max(3, a.repeats // 4)  # a pass is pairs / precompute batch micro-batches

    # ZeRO 1/2 allocate their gradient-reduction bucket (reduce_bucket_size elements of the gradient dtype) in every
    # step of every row alike; on CPU it would be most of each row's peak, so it is left out there and printed apart.
    bucket = getattr(getattr(model.model, "optimizer", None), "reduce_bucket_size", 0) or 0
    bucket_bytes = int(bucket) * (2 if ds.param_dtype in ("bf16", "fp16") else 4)

    def peak_mb(fn):
        """Growth of memory during one call of fn over what was held before it (see the module docstring)."""
        optimizer_step, marks = strategy.optimizer_step, []

        def labelled(*args, **kwargs):  # marks where the optimizer step starts
            if torch.cuda.is_available():
                torch.cuda.synchronize()
                marks.append(torch.cuda.max_memory_allocated())
            with torch.profiler.record_function("bench:optimizer_step"):
                return optimizer_step(*args, **kwargs)

        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            strategy.optimizer_step = labelled
            try:
                fn()
            finally:
                strategy.optimizer_step = optimizer_step
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - base) / 2**20, (marks[0] - base) / 2**20
        # CPU: torch.profiler's memory events (every allocation and free of a tensor, in time order); their running
        # sum peaks at the step's largest live-tensor footprint, whatever the allocator keeps cached.
        from torch.profiler import ProfilerActivity, profile

        strategy.optimizer_step = labelled
        try:
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                fn()
        finally:
            strategy.optimizer_step = optimizer_step
        events = list(prof.profiler.kineto_results.events())
        opt_start = min((e.start_ns() for e in events if e.name() == "bench:optimizer_step"), default=None)
        live = peak = peak_fwd_bwd = 0
        for e in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
            if abs(e.nbytes()) != bucket_bytes:  # DeepSpeed's reduce bucket: the same in every row, reported apart
                live += e.nbytes()
                peak = max(peak, live)
                if opt_start is None or e.start_ns() < opt_start:
                    peak_fwd_bwd = max(peak_fwd_bwd, live)
        return peak / 2**20, peak_fwd_bwd / 2**20

    steps = {
        "dpo": dpo_step,
        "comal": comal_step,
        "comal_kernel": comal_kernel_step,
        "comal_linear": comal_linear_step,
    }
    peak = {name: peak_mb(fn) for name, fn in steps.items()}
    # interleave so that drift of the machine hits all alike
    res = {name: [] for name in steps}
    res.update({name: [] for name in passes})
    for _ in range(2):
        for name, fn in steps.items():
            res[name] += timed(fn)
        for name, (_, fn) in passes.items():
            res[name] += timed(fn, pass_repeats, warmup=1)

    def q(xs, f):
        return statistics.quantiles(xs, n=10)[int(f * 10) - 1] if len(xs) > 1 else xs[0]

    print(f"device: CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
          f"torch {torch.__version__}, dtype {ds.param_dtype}, ZeRO {a.zero_stage}")  # fmt: skip
    print(f"model: Llama hidden {a.hidden}, {a.layers} layers, vocab {len(tok)}; batch {mb} pairs, "
          f"{tokens} tokens per step (chosen + rejected, incl. prompt)\n")  # fmt: skip
    print("| step | median ms | p20 ms | p80 ms | tokens/s | peak MB (one step) | peak MB (forward + backward) |\n"
          "|---|---|---|---|---|---|---|")  # fmt: skip
    med = {}
    rows = (
        ("dpo", "OpenRLHF DPOTrainer step (reference recomputed)"),
        ("comal", "COMAL step (cached log-probs, OpenRLHF log-prob path)"),
        ("comal_kernel", "COMAL step (cached log-probs, chunked torch kernel)"),
        ("comal_linear", "COMAL step (cached log-probs, fused LM-head kernel: no logits)"),
    )
    for name, label in rows:
        xs = res[name]
        med[name] = statistics.median(xs)
        print(f"| {label} | {1e3 * med[name]:.1f} | {1e3 * q(xs, 0.2):.1f} | {1e3 * q(xs, 0.8):.1f} | "
              f"{tokens / med[name]:.0f} | {peak[name][0]:.1f} | {peak[name][1]:.1f} |")  # fmt: skip
    if bucket_bytes and not torch.cuda.is_available():
        print(f"peak MB: live tensor memory added during one step (and before its optimizer step), not counting "
              f"DeepSpeed's reduce bucket ({bucket_bytes / 2**20:.0f} MB, allocated in every step of every "
              "row)")  # fmt: skip
    for name in ("comal", "comal_kernel", "comal_linear"):
        ratio = med[name] / med["dpo"]
        verdict = "reached" if ratio <= 0.75 else "NOT reached"
        print(f"{name}/DPO step time ratio: {ratio:.3f} (target <= 0.75: {verdict})")
    per_pair = precompute_s / a.pairs
    print(f"precompute pass, first (cold) call: {precompute_s:.2f} s for {a.pairs} pairs ({1e3 * per_pair:.1f} ms "
          f"per pair; includes tokenising the pairs and saving the record), paid once per iteration")  # fmt: skip
    pb = trainer._precompute_batch_size()
    print(f"\nprecompute pass (warm, {a.pairs} pairs in micro-batches of {pb}; medians of {2 * pass_repeats} passes) "
          f"against a training step ({mb} pairs), per pair:\n")  # fmt: skip
    print("| per pair | precompute median ms | p20 ms | p80 ms | training step median ms | ratio |\n"
          "|---|---|---|---|---|---|")  # fmt: skip
    labels = {
        "pre": "OpenRLHF log-prob path (two calls)",
        "pre_kernel": "chunked torch kernel (one sequence_logratio)",
    }
    ratios = {}
    for name, (step, _) in passes.items():
        xs = [x / a.pairs for x in res[name]]
        train_pp = med[step] / mb
        ratios[name] = statistics.median(xs) / train_pp
        print(f"| {labels[name]} | {1e3 * statistics.median(xs):.2f} | {1e3 * q(xs, 0.2):.2f} | "
              f"{1e3 * q(xs, 0.8):.2f} | {1e3 * train_pp:.2f} | {ratios[name]:.3f} |")  # fmt: skip
    for name, ratio in ratios.items():
        verdict = "met" if ratio <= 0.8 else "NOT met"
        print(f"precompute per pair / training step per pair ({labels[name]}): {ratio:.3f} (target: precompute per "
              f"pair <= 0.8x a training step per pair: {verdict})")  # fmt: skip
    if a.iteration_repeats > 0:
        iteration_table(a, trainer, tok, args, record.pairs, dpo_step, peak_mb, peak, q)
    return 0


def iteration_table(a, trainer, tok, args, all_pairs, dpo_step, peak_mb, step_peak, q):
    """A whole iteration, end to end: COMAL's precompute pass + ``--epochs`` passes of training steps on the cached
    log-probs (each log-prob path), against DPOTrainer's ``--epochs`` passes with the reference recomputed."""
    # imported after cpu_runtime.apply(), as in main()
    from comal_openrlhf.core.record import IterationRecord
    from comal_openrlhf.training.data import PairDataset

    pairs = all_pairs[: a.iteration_pairs]
    dataset = PairDataset(pairs, tok, args.data.max_len)
    fresh = IterationRecord.from_pairs(pairs)

    def batches(epoch):
        return trainer._loader(dataset, True, epoch=epoch)

    def comal_iteration(kernel):
        def run():
            trainer.settings.logps_kernel = kernel
            try:
                t = time.perf_counter()
                record = trainer._cached(fresh, dataset, "bench iteration")
                mid = time.perf_counter()
                for epoch in range(a.epochs):
                    for b in batches(epoch):
                        trainer._train_step(b, record)
                return mid - t, time.perf_counter() - mid
            finally:
                trainer.settings.logps_kernel = "openrlhf"

        return run

    def dpo_iteration():
        t = time.perf_counter()
        for epoch in range(a.epochs):
            for b in batches(epoch):
                dpo_step(b)
        return 0.0, time.perf_counter() - t

    runs = {
        "dpo": ("OpenRLHF DPOTrainer (reference recomputed each step)", dpo_iteration, "dpo"),
        "comal": ("COMAL, OpenRLHF log-prob path", comal_iteration("openrlhf"), "comal"),
        "comal_kernel": ("COMAL, chunked torch kernel", comal_iteration("torch"), "comal_kernel"),
        "comal_linear": ("COMAL, fused LM-head kernel (precompute: two linear calls)", comal_iteration("linear"),
                         "comal_linear"),
    }  # fmt: skip
    kernels = {"comal": "openrlhf", "comal_kernel": "torch", "comal_linear": "linear"}
    pre_peak = {}
    for name, kernel in kernels.items():
        trainer.settings.logps_kernel = kernel
        try:
            pre_peak[name] = peak_mb(lambda: trainer._cached(fresh, dataset, "bench peak"))[0]
        finally:
            trainer.settings.logps_kernel = "openrlhf"
    for _, fn, _ in runs.values():  # warm-up: one iteration each
        fn()
    times = {name: [] for name in runs}
    for _ in range(a.iteration_repeats):  # interleaved, so that drift of the machine hits all alike
        for name, (_, fn, _) in runs.items():
            times[name].append(fn())
    steps = a.epochs * len(batches(0))
    print(f"\nwhole iteration: {a.iteration_pairs} pairs, {a.epochs} epochs, micro-batches of {a.micro_batch} pairs "
          f"({steps} training steps); medians of {a.iteration_repeats} iterations after a warm-up each\n")  # fmt: skip
    print("| iteration | median s | p20 s | p80 s | precompute s | training s | ratio to DPO | peak MB |\n"
          "|---|---|---|---|---|---|---|---|")  # fmt: skip
    med = {}
    for name, (label, _, step) in runs.items():
        total = [p + t for p, t in times[name]]
        med[name] = statistics.median(total)
        pre = statistics.median(p for p, _ in times[name])
        train = statistics.median(t for _, t in times[name])
        peak = max(step_peak[step][0], pre_peak.get(name, 0.0))
        print(f"| {label} | {med[name]:.2f} | {q(total, 0.2):.2f} | {q(total, 0.8):.2f} | {pre:.2f} | {train:.2f} | "
              f"{med[name] / med['dpo']:.3f} | {peak:.1f} |")  # fmt: skip
    for name in kernels:
        pre = statistics.median(p for p, _ in times[name])
        train = statistics.median(t for _, t in times[name])
        ratio = med[name] / med["dpo"]
        verdict = "met" if ratio <= 0.30 else "NOT met"
        term = "precompute" if pre > train else "training steps"
        print(f"{name}/DPO iteration ratio: {ratio:.3f} (target <= 0.30 at V >= 32k: {verdict}); dominant term: "
              f"{term} ({max(pre, train) / (pre + train):.0%} of the iteration)")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
