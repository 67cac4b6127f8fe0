"""Judging phase of a COMAL iteration as a command (arXiv 2410.23223, Algorithm 1, steps 2-3: the preference oracle
compares each prompt's samples, pairs are built for the prox step): samples jsonl -> per-prompt win matrices ->
``iter_NNN.jsonl`` pairs in the offline source's format (``train_comal --comal.pairs_dir``).

    python -m comal_openrlhf.cli.judge --samples samples.shard*.jsonl --iteration 3 --out_dir pairs \\
        --judge.kind reward_model --judge.path RM --rollout.pair_rule top2 --train.seed 42 [--shard 0/4]
    python -m comal_openrlhf.cli.judge --merge --iteration 3 --out_dir pairs      # after sharded runs

Input: the rows of ``python -m comal_openrlhf.cli.generate`` (``prompt``, ``response``, ``policy``, ``sample``,
``position``), from any number of files (e.g. one per generate shard). Rows are grouped per prompt position
(``position``, else the order of first appearance), responses ordered by sample index; one policy per run
(``--policy`` picks one when the files hold several); a repeated (position, sample) is counted and the first kept.

Output in ``--out_dir``: ``iter_NNN.jsonl`` (``Pair.to_row`` under ``--data.prompt_key`` / ``--data.chosen_key`` /
``--data.rejected_key``: raw prompt, chosen, rejected, both win rates against mu_k's samples, the soft label of the
soft rules and the pair weight) and ``iter_NNN.matrices.jsonl`` (per prompt: the distinct valid responses, their
counts, the win matrix W[i][j] = P(u_i beats u_j) and the win rates). The pairs are ``pairs.build_pairs`` on the
same groups, judge prompts (``PromptFormatter.judge_text``) and seed (``np.random.default_rng([seed, iteration])``)
as the online source, so with the same samples the pairs are the online source's.

Sharding: ``--shard i/n`` judges the i-th of n contiguous blocks of prompt positions and writes
``iter_NNN.shard-i-of-n.jsonl``; ``--merge`` concatenates the n shard files in order into ``iter_NNN.jsonl`` (for
``top2``, ``best_worst`` and ``all_soft`` the result equals an unsharded run; ``sampled`` draws with the generator
seeded by (seed, iteration, i, n) in each shard, another equally valid draw). ``cat`` of the shard files in
shard order does the same as ``--merge``.
"""

import argparse
import glob
import json
import os
import re
import sys

import numpy as np
from openrlhf.utils.config import hierarchize

from comal_openrlhf.cli.common import add_online_args, add_prompt_args, parse_shard, run_command
from comal_openrlhf.core.pairs import build_pairs, canonical, win_matrix
from comal_openrlhf.errors import BadInputError, PlanError
from comal_openrlhf.judges import build_judge
from comal_openrlhf.judges.cache import CachedJudge
from comal_openrlhf.storage import write_atomic
from comal_openrlhf.training.data import PromptFormatter, SkipLog, read_jsonl


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m comal_openrlhf.cli.judge",
        description="Judge sampled responses and build one iteration's preference pairs (iter_NNN.jsonl).",
    )
    p.add_argument("--samples", nargs="+", default=[], help="Samples files of comal_openrlhf.cli.generate (globs too)")
    p.add_argument("--out_dir", required=True, help="Directory of iter_NNN.jsonl (train_comal --comal.pairs_dir)")
    p.add_argument("--iteration", type=int, required=True, help="Iteration number NNN (also seeds rule 'sampled')")
    p.add_argument("--policy", default=None, help="Policy id to judge when the samples hold several")
    p.add_argument("--shard", default=None, help="i/n: judge the i-th of n blocks of prompts (then --merge)")
    p.add_argument("--merge", action="store_true", default=False, help="Concatenate the shard files of --iteration")
    p.add_argument("--train.seed", type=int, default=42, help="Seed of rule 'sampled' (train_comal's --train.seed)")
    p.add_argument("--json", action="store_true", default=False, help="Print one JSON summary object on stdout")
    add_prompt_args(p, keys=True)
    add_online_args(p)
    return p


def parse_args(argv=None):
    return hierarchize(build_parser().parse_args(argv))


def read_groups(paths, policy=None):
    """[(position, raw prompt, [responses by sample index])] in position order, and the counted skips."""
    files = []
    for pat in paths:
        hits = sorted(glob.glob(pat))
        if not hits:
            raise BadInputError(f"--samples {pat}: no such file")
        files += hits
    rows, skips, seen = [], SkipLog(), {}
    for path in files:
        for line, row in read_jsonl(path):
            origin = f"{path}:{line}"
            if not isinstance(row, dict) or any(k not in row for k in ("prompt", "response", "sample")):
                raise BadInputError(f"{origin}: a samples row needs 'prompt', 'response' and 'sample'")
            rows.append((row, origin))
    policies = sorted({str(r.get("policy")) for r, _ in rows})
    if policy is None and len(policies) > 1:
        raise PlanError(f"the samples hold policies {policies}: pick one with --policy")
    producers = {}
    for row, origin in rows:
        if policy is None or str(row.get("policy")) == policy:
            producers.setdefault(row.get("producer"), origin)
    if len(producers) > 1:
        seen_at = ", ".join(f"{k or 'not recorded'} at {v}" for k, v in producers.items())
        raise PlanError(
            f"the samples{'' if policy is None else f' of policy {policy!r}'} come from more than one checkpoint or "
            f"sampling setting (producers: {seen_at}): judge one producer's samples at a time"
        )
    groups = {}
    for row, origin in rows:
        if policy is not None and str(row.get("policy")) != policy:
            continue
        key = row.get("position")
        if key is None:
            key = seen.setdefault(json.dumps(row["prompt"], sort_keys=True), len(seen))
        g = groups.setdefault(key, {"prompt": row["prompt"], "samples": {}})
        if row["sample"] in g["samples"]:
            skips.skip("repeated (position, sample)", origin)
            continue
        g["samples"][row["sample"]] = row["response"]
    if not groups:
        raise BadInputError(f"no samples{'' if policy is None else f' of policy {policy!r}'} in {files}")
    out = [(pos, g["prompt"], [g["samples"][s] for s in sorted(g["samples"])]) for pos, g in sorted(groups.items())]
    return out, skips


def shard_path(out_dir, k, shard=None, kind=""):
    suffix = "" if shard is None else f".shard-{shard[0]}-of-{shard[1]}"
    return os.path.join(out_dir, f"iter_{k:03d}{kind}{suffix}.jsonl")


def _write(path, rows):
    write_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def judge_iteration(a):
    if not a.samples:
        raise BadInputError("--samples: give the samples file(s) of comal_openrlhf.cli.generate")
    if a.rollout.pair_weighting != "count":
        raise BadInputError(
            "--rollout.pair_weighting policy needs the policy's log-probs; the judge command uses count"
        )
    shard = parse_shard(a.shard) if a.shard else None
    groups, skips = read_groups(a.samples, a.policy)
    if shard is not None:
        groups = [groups[i] for i in np.array_split(np.arange(len(groups)), shard[1])[shard[0]]]
    judge = CachedJudge(build_judge(a.judge))  # the matrices reuse build_pairs' judge answers
    both = not a.judge.single_order
    seed = [a.train.seed, a.iteration] + ([] if shard is None else list(shard))
    pairs, stats = build_pairs(
        [(raw, responses) for _, raw, responses in groups],
        judge,
        a.rollout.pair_rule,
        rng=np.random.default_rng(seed),
        both_orders=both,
        judge_prompts=[PromptFormatter.judge_text(raw) for _, raw, _ in groups],
        origin=f"iteration {a.iteration}",
    )
    matrices = []
    for pos, raw, responses in groups:
        counts = {}
        for r in map(canonical, responses):  # as build_pairs counts them: the empty response "" included
            if r is not None:
                counts[r] = counts.get(r, 0) + 1
        if len(counts) < 2:
            continue
        u, c = list(counts), np.array(list(counts.values()), dtype=np.float64)
        W = win_matrix(judge, PromptFormatter.judge_text(raw), u, both_orders=both)
        matrices.append(
            {
                "position": pos,
                "prompt": raw,
                "responses": u,
                "counts": c.astype(int).tolist(),
                "W": W.tolist(),
                "winrates": ((W @ c - 0.5) / (c.sum() - 1)).tolist(),
            }
        )
    d = a.data
    os.makedirs(a.out_dir, exist_ok=True)
    out = shard_path(a.out_dir, a.iteration, shard)
    _write(out, [p.to_row(d.prompt_key, d.chosen_key, d.rejected_key) for p in pairs])
    _write(shard_path(a.out_dir, a.iteration, shard, ".matrices"), matrices)
    return {
        "output": os.path.abspath(out),
        "iteration": a.iteration,
        "shard": a.shard,
        "rule": a.rollout.pair_rule,
        "pairs": len(pairs),
        **stats.as_dict(),
        "judge_queries": judge.calls,
        "samples_skipped": skips.as_dict() if skips.total() else {},
    }


def merge(a):
    pat = re.compile(rf"^iter_{a.iteration:03d}\.shard-(\d+)-of-(\d+)\.jsonl$")
    found = [tuple(map(int, m.groups())) for m in map(pat.match, sorted(os.listdir(a.out_dir))) if m]
    if not found:
        raise BadInputError(f"--merge: no iter_{a.iteration:03d}.shard-I-of-N.jsonl in {a.out_dir}")
    ns = {n for _, n in found}
    if len(ns) != 1:
        raise PlanError(f"--merge: shard files of different counts {sorted(ns)} in {a.out_dir}")
    n = ns.pop()
    missing = sorted(set(range(n)) - {i for i, _ in found})
    if missing:
        raise PlanError(f"--merge: shards {missing} of {n} are missing in {a.out_dir}")
    total = 0
    for kind in ("", ".matrices"):
        rows = []
        for i in range(n):
            path = shard_path(a.out_dir, a.iteration, (i, n), kind)
            if os.path.exists(path):
                with open(path, encoding="utf-8") as f:
                    rows += [json.loads(line) for line in f if line.strip()]
        _write(shard_path(a.out_dir, a.iteration, None, kind), rows)
        if not kind:
            total = len(rows)
    return {"output": os.path.abspath(shard_path(a.out_dir, a.iteration)), "shards": n, "pairs": total}


def main(argv=None):
    a = parse_args(argv)
    summary = run_command(lambda: merge(a) if a.merge else judge_iteration(a), a.json)
    if not a.json:
        print(json.dumps(summary, indent=1), file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
