"""Evaluation of aligned policies against each other with a general preference judge (arXiv 2410.23223, section 6:
the head-to-head win-rate table of aligned models judged by a preference oracle), an exploitability estimate, and
the exact evaluation of a policy on a finite game (section 3, the duality gap of Theorem 1).

    python -m comal_openrlhf.cli.evaluate --policies start=/ckpt/sft comal=/ckpt/comal inpo=/ckpt/inpo \
        --data.dataset prompts.jsonl --data.prompt_key prompt --data.apply_chat_template \
        --judge.kind table --judge.table paper --rollout.n_samples_per_prompt 8 --out eval_out [--json]

Sampled mode (any ``--judge.*``): every policy samples ``--rollout.n_samples_per_prompt`` responses per prompt
(``comal_openrlhf.rollout.sampling.generate``, or ``--rollout.backend vllm``); cell (A, B) of the matrix is the
mean over prompts of the mean over sample indices i of P(a_i beats b_i | x), the judge asked in both orders by
default; the diagonal is 50 by definition and the "avg" column is the mean over columns with self = 50, as in the
paper's table. Each value comes with a bootstrap interval (``bootstrap_mean``: prompts resampled with replacement
and, within each drawn prompt, its samples; with one sample per prompt this is the plain bootstrap over prompts).

Bookkeeping, never a silent drop: an empty (or whitespace-only) generation loses to a non-empty one (P = 0) and ties
another empty one; identical responses tie (P = 1/2) without a judge call; a comparison the judge fails on (a
``JudgeError`` after the judge's own retries) is left out of the means and counted. Wins (P > 1/2), ties (P = 1/2)
and losses are counted per cell.

Exploitability estimate: see ``comal_openrlhf.eval.winrate``.

Exact mode (``table`` judges, a finite game): each policy's probability of every option is read from its sequence
log-probs (``option_logps``); the report holds the exact distributions, duality gaps and head-to-head matrix. Mass on
outputs that are no option is ``invalid_mass``: the renormalised gap (``duality_gap``, as the demo reports it) ignores
it; ``duality_gap_with_invalid`` and the exact matrix treat an invalid output as the table judge does (it loses to
every option), which is the quantity the sampled estimates estimate.

Caching (``--cache``, default OUT/cache): generations are stored per (policy, prompt, sample index) and judge answers
per (prompt, response a, response b), appended line by line as they are made, so a rerun after a crash, or with one
more policy or more samples, only does the new work.

The pieces: ``comal_openrlhf.eval.exact`` (exact mode), ``comal_openrlhf.eval.winrate`` (matrix, bootstrap,
exploitability, the in-training ``winrate``), ``comal_openrlhf.eval.report`` (markdown, CSV, JSON, heatmap) and
``comal_openrlhf.judges.cache`` (the judge cache).
"""

import argparse
import json
import os
import sys

import torch
from openrlhf.utils.config import hierarchize
from tqdm import tqdm

from comal_openrlhf.cli.common import add_online_args, add_prompt_args, run_command
from comal_openrlhf.cli.policies import (
    PolicySampler,
    checkpoint_fingerprint,
    load_policy,
    load_prompts,
    load_tokenizer,
    sample_missing,
)
from comal_openrlhf.errors import BadInputError
from comal_openrlhf.eval.exact import exact_matrix, exact_policy
from comal_openrlhf.eval.report import markdown, strict_json, write_outputs
from comal_openrlhf.eval.winrate import exploitability, head_to_head, new_counts
from comal_openrlhf.judges import build_judge
from comal_openrlhf.judges.cache import CachedJudge
from comal_openrlhf.storage import append_lines, content_key, read_cache
from comal_openrlhf.training.data import PromptFormatter


def parse_policy_specs(specs):
    """``name=path`` or ``path`` (name = the directory's base name) -> [(name, path)]; names must be unique."""
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = os.path.basename(os.path.normpath(spec)), spec
        if not name or not path:
            raise BadInputError(f"--policies: {spec!r} is not NAME=PATH or PATH")
        out.append((name, path))
    names = [n for n, _ in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise BadInputError(f"--policies: duplicate policy names {dup}; name them with NAME=PATH")
    return out


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m comal_openrlhf.evaluate",
        description="Head-to-head win rates of policies under a preference judge, with bootstrap intervals and an "
        "exploitability estimate (exact evaluation for table judges).",
    )
    p.add_argument("--policies", nargs="+", required=True, help="Policies: HF checkpoint dirs or NAME=PATH")
    add_prompt_args(p)
    add_online_args(p)
    g = p.add_argument_group("eval", "Win-rate matrix and exploitability")
    g.add_argument("--eval.bootstrap", type=int, default=1000, help="Bootstrap resamples for the intervals")
    g.add_argument("--eval.level", type=float, default=0.95, help="Confidence level of the intervals")
    g.add_argument(
        "--eval.exploit_m",
        type=int,
        default=8,
        help="Samples per policy and prompt used as best-response candidates, scored against the policy's "
        "--rollout.n_samples_per_prompt samples (0 = no exploitability estimate)",
    )
    g.add_argument(
        "--eval.exploit_samples",
        type=int,
        default=16,
        help="Further samples of the policy (independent of the choice) that the best response plays",
    )
    g.add_argument(
        "--eval.exploit_pool",
        choices=("all", "self"),
        default="all",
        help="Candidates of the best response: the first m samples of every evaluated policy (all) or of the "
        "policy itself (self)",
    )
    g.add_argument(
        "--eval.exact",
        choices=("auto", "on", "off"),
        default="auto",
        help="Exact evaluation on the game (table judge only); auto = on with a table judge",
    )
    g.add_argument("--eval.exact_prompts", type=int, default=16, help="Prompts used by the exact mode (the first N)")
    p.add_argument("--seed", type=int, default=0, help="Sampling and bootstrap seed")
    p.add_argument(
        "--dtype",
        choices=("auto", "bf16", "fp16", "fp32"),
        default="auto",
        help="auto: the dtype each checkpoint was saved in (config.json), as the demo trains and measures it; the "
        "dtype used is reported per policy",
    )
    p.add_argument("--out", default="eval_out", help="Directory for matrix.csv, results.json, heatmap.png")
    p.add_argument("--cache", default=None, help="Cache directory (default: OUT/cache)")
    p.add_argument("--no_cache", action="store_true", default=False, help="Neither read nor write the cache")
    p.add_argument("--json", action="store_true", default=False, help="Print one JSON object on stdout")
    return p


def parse_args(argv=None):
    return hierarchize(build_parser().parse_args(argv))


class _Work:
    """Counters of what was done and what came from the cache."""

    def __init__(self):
        self.generated = 0
        self.generated_cached = 0


def sample_policy(name, path, prompts, formatter_of, total, a, cache_dir, work, progress):
    """``total`` responses per prompt for one policy: [[str] * total] per prompt, from the cache where possible.
    Returns (samples, model, tokenizer, prompt texts); the model is loaded only when something has to be generated
    or the caller needs it (``a._need_model``), else it is None."""
    ro = a.rollout
    key = content_key(
        checkpoint_fingerprint(path), ro.temperature, ro.top_p, ro.max_new_tokens, ro.backend, a.seed, a.dtype
    )
    cache_path = os.path.join(cache_dir, "generations", f"{name}-{key[:16]}.jsonl") if cache_dir else None
    model = tok = None
    if a._need_model:
        model, tok = load_policy(path, a.dtype)
    else:
        tok = load_tokenizer(path)
    formatter = formatter_of(tok)
    texts = [formatter.policy_text(r) for r in prompts]
    have = {}
    if cache_path:
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        for row in read_cache(cache_path):
            have[row["prompt"], row["sample"]] = row["response"]
    tkeys = [content_key(t) for t in texts]
    work.generated_cached += sum((tk, i) in have for tk in tkeys for i in range(total))
    need = [(p, texts[p], sum((tk, i) not in have for i in range(total))) for p, tk in enumerate(tkeys)]
    if any(count for _, _, count in need):
        if model is None and ro.backend != "vllm":  # vLLM engines load the checkpoint themselves
            model, tok = load_policy(path, a.dtype)
        torch.manual_seed(int(content_key(a.seed, name)[:8], 16))
        sampler = PolicySampler(a, path, model, tok, a.seed)

        def record(batch):
            rows = []
            for p, responses in batch:
                slots = [i for i in range(total) if (tkeys[p], i) not in have]
                for i, r in zip(slots, responses):
                    have[tkeys[p], i] = r
                    rows.append({"prompt": tkeys[p], "sample": i, "response": r})
            work.generated += len(rows)
            if cache_path:
                append_lines(cache_path, [json.dumps(r, ensure_ascii=False) for r in rows])
            progress(len(batch))

        try:
            sample_missing(sampler, need, max(1, ro.generate_batch_size), record)
        finally:
            sampler.close()
    samples = [[have[tk, i] for i in range(total)] for tk in tkeys]
    return samples, model, tok, texts


def evaluate(a):
    """Run the evaluation described by the parsed flags ``a``; returns the report (a JSON-able dict)."""
    policies = parse_policy_specs(a.policies)
    ev, ro = a.eval, a.rollout
    if ro.n_samples_per_prompt < 1:
        raise BadInputError("--rollout.n_samples_per_prompt must be >= 1")
    if ev.exploit_m < 0 or (ev.exploit_m and ev.exploit_samples < 1):
        raise BadInputError("--eval.exploit_m must be 0 (off) or >= 1, with --eval.exploit_samples >= 1")
    prompts, skips = load_prompts(a)
    raw_prompts = [raw for _, raw in prompts]
    judge_prompts = [PromptFormatter.judge_text(r) for r in raw_prompts]
    base_judge = build_judge(a.judge)
    both = not a.judge.single_order
    table = a.judge.kind == "table" and getattr(base_judge, "labels", None) is not None
    exact_on = ev.exact == "on" or (ev.exact == "auto" and table)
    if exact_on and not table:
        raise BadInputError("--eval.exact on needs --judge.kind table (a finite game)")
    cache_dir = None if a.no_cache else (a.cache or os.path.join(a.out, "cache"))
    jkey = content_key(
        {k: v for k, v in sorted(vars(a.judge).items()) if k not in ("token", "timeout", "retries")},
        [checkpoint_fingerprint(x) for x in (a.judge.path, a.judge.table, a.judge.mixture) if x and os.path.exists(x)],
    )
    judge = CachedJudge(base_judge, os.path.join(cache_dir, "judgements", f"{jkey[:16]}.jsonl") if cache_dir else None)
    n, m, k = ro.n_samples_per_prompt, ev.exploit_m, ev.exploit_samples if ev.exploit_m else 0
    first_opponent = max(n, m)  # opponents are drawn after every sample the choice of y* looked at
    total = first_opponent + k
    a._need_model = exact_on

    def formatter_of(tok):
        return PromptFormatter(a.data, tok)

    work = _Work()
    samples, exact = {}, {}
    bar = tqdm(total=len(policies) * len(raw_prompts), desc="generate", file=sys.stderr, mininterval=1.0)
    for name, path in policies:
        s, model, tok, texts = sample_policy(
            name, path, raw_prompts, formatter_of, total, a, cache_dir, work, bar.update
        )
        samples[name] = s
        if exact_on:
            exact[name] = exact_policy(model, tok, texts[: ev.exact_prompts], base_judge.P, base_judge.labels)
            exact[name]["dtype"] = getattr(model, "comal_dtype", a.dtype)
        del model
    bar.close()

    pairs = len(policies) * (len(policies) - 1) // 2
    bar = tqdm(total=pairs + (len(policies) if m else 0), desc="judge", file=sys.stderr, mininterval=1.0)
    matrix = head_to_head(
        {nm: [r[:n] for r in s] for nm, s in samples.items()},
        judge_prompts,
        judge,
        both_orders=both,
        n_boot=ev.bootstrap,
        level=ev.level,
        seed=a.seed,
        progress=bar.update,
    )
    expl = {}
    if m:
        for name in samples:
            s = samples[name]
            pool = [name] if ev.exploit_pool == "self" else list(samples)
            cands = [[x for nm in pool for x in samples[nm][p][:m]] for p in range(len(raw_prompts))]
            expl[name] = exploitability(
                judge,
                judge_prompts,
                cands,
                [r[:n] for r in s],
                [r[first_opponent:total] for r in s],
                both,
                ev.bootstrap,
                ev.level,
                a.seed,
            )
            bar.update(1)
    bar.close()

    cells = [matrix["cells"][r][c]["counts"] for r in matrix["names"] for c in matrix["names"] if r < c]
    cells = [c for c in cells if c]
    totals = {key: sum(c[key] for c in cells) for key in new_counts()}
    totals["empty_responses"] = sum(
        sum(not (isinstance(x, str) and x.strip()) for r in s for x in r[:n]) for s in samples.values()
    )
    report = {
        "policies": {nm: os.path.abspath(p) for nm, p in policies},
        "judge": getattr(base_judge, "name", a.judge.kind),
        "both_orders": both,
        "prompts": len(raw_prompts),
        "prompts_skipped": skips.as_dict() if skips.total() else {},
        "samples_per_prompt": n,
        "level": ev.level,
        "bootstrap": ev.bootstrap,
        "seed": a.seed,
        "matrix": matrix,
        "totals": totals,
        "exploitability": expl,
        "work": {
            "generated": work.generated,
            "generated_cached": work.generated_cached,
            "judged": judge.calls,
            "judged_cached": judge.hits,
        },
    }
    if exact_on:
        report["exact"] = {
            "labels": list(base_judge.labels),
            "prompts": min(len(raw_prompts), ev.exact_prompts),
            "policies": {nm: {k2: v for k2, v in e.items() if k2 != "per_prompt"} for nm, e in exact.items()},
            "matrix": exact_matrix({nm: e["per_prompt"] for nm, e in exact.items()}, base_judge.P),
        }
    write_outputs(report, a.out)
    report["files"] = {
        x: os.path.join(os.path.abspath(a.out), x) for x in ("matrix.csv", "results.json", "heatmap.png")
    }
    return report


def main(argv=None):
    a = parse_args(argv)
    report = run_command(lambda: evaluate(a), a.json, to_json=strict_json)
    if not a.json:
        print(markdown(report))
    return report


if __name__ == "__main__":
    main()
