"""Evaluation of aligned policies against each other with a general preference judge (arXiv 2410.23223, section 6:
the head-to-head win-rate table of aligned models judged by a preference oracle), an exploitability estimate, and
the exact evaluation of a policy on a finite game (section 3, the duality gap of Theorem 1).

    python -m comal_openrlhf.evaluate --policies start=/ckpt/sft comal=/ckpt/comal inpo=/ckpt/inpo \\
        --data.dataset prompts.jsonl --data.prompt_key prompt --data.apply_chat_template \\
        --judge.kind table --judge.table paper --rollout.n_samples_per_prompt 8 --out eval_out [--json]

Sampled mode (any ``--judge.*``): every policy samples ``--rollout.n_samples_per_prompt`` responses per prompt
(``comal_openrlhf.sampling.generate``, or ``--rollout.backend vllm``); cell (A, B) of the matrix is the mean over
prompts of the mean over sample indices i of P(a_i beats b_i | x), the judge asked in both orders by default; the
diagonal is 50 by definition and the "avg" column is the mean over columns with self = 50, as in the paper's table.
Each value comes with a bootstrap interval (``bootstrap_mean``: prompts resampled with replacement and, within each
drawn prompt, its samples; with one sample per prompt this is the plain bootstrap over prompts).

Bookkeeping, never a silent drop: an empty (or whitespace-only) generation loses to a non-empty one (P = 0) and ties
another empty one; identical responses tie (P = 1/2) without a judge call; a comparison the judge fails on (a
``JudgeError`` after the judge's own retries) is left out of the means and counted. Wins (P > 1/2), ties (P = 1/2)
and losses are counted per cell.

Exploitability estimate: for each prompt the judge picks a best response y* among candidates (the first ``m``
samples of every evaluated policy, or with ``--eval.exploit_pool self`` of the policy itself): the one with the
highest mean win probability against the policy's ``n`` matrix samples; y* is then judged against ``k`` further,
independent samples of the policy. E = P(y* beats pi) <= max_y P(y beats pi), so 2E - 1 estimates a lower bound on
the duality gap 2 max_y P(y beats pi) - 1 (0 exactly at a Nash policy), reported with its bootstrap interval. The
bound is tight when the pool holds a best response and the n samples tell it apart from the other candidates; a
wrong pick only lowers the estimate.

Exact mode (``table`` judges, a finite game): each policy's probability of every option is read from its sequence
log-probs (``option_logps``); the report holds the exact distributions, duality gaps and head-to-head matrix. Mass on
outputs that are no option is ``invalid_mass``: the renormalised gap (``duality_gap``, as the demo reports it) ignores
it; ``duality_gap_with_invalid`` and the exact matrix treat an invalid output as the table judge does (it loses to
every option), which is the quantity the sampled estimates estimate.

Caching (``--cache``, default OUT/cache): generations are stored per (policy, prompt, sample index) and judge answers
per (prompt, response a, response b), appended line by line as they are made, so a rerun after a crash, or with one
more policy or more samples, only does the new work.

In-training use: ``winrate(policy_a, policy_b, prompts, judge, tokenizer)`` works on in-memory HF modules (or an
OpenRLHF Actor / DeepSpeed engine) and returns ``WinRate(mean, ci_low, ci_high, counts)``.
"""

import argparse
import csv
import hashlib
import io
import json
import math
import os
import sys
import warnings
from collections import namedtuple

import numpy as np
import torch

from comal_openrlhf.errors import BadInputError, ImpossibleResultError, JudgeError
from comal_openrlhf.game import duality_gap
from comal_openrlhf.storage import append_lines, guarded, write_atomic, write_json

# --------------------------------------------------------------------------------------------- exact game mode


@torch.no_grad()
def option_logps(model, tokenizer, prompt_text, labels):
    """log pi(label + EOS | prompt) for each label. ``model`` returns logits (HF module or DeepSpeed engine)."""
    return option_logps_tensor(model, tokenizer, prompt_text, labels).cpu().numpy().astype(np.float64)


def option_ids(tokenizer, prompt_text, labels):
    """(prompt ids, [ids of prompt + label + " " + EOS for each label]), checked: the prompt's tokens must be a
    prefix of every option's and the option's own tokens must read back as the label followed by EOS. Otherwise the
    log-prob is that of another sequence (e.g. a prompt ending in "?" and the label "a" joined into the one unknown
    token "?a" for every label), and the options' masses no longer sum to at most 1."""
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    seqs = []
    for lab in labels:
        ids = tokenizer(prompt_text + lab + " " + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        tail = ids[len(prompt_ids) :]
        if ids[: len(prompt_ids)] != prompt_ids:
            why = "the prompt's tokens are not a prefix of prompt + label (the tokenizer joins them across the seam)"
        elif not tail or tail[-1] != tokenizer.eos_token_id or tokenizer.decode(tail[:-1]).strip() != lab.strip():
            why = f"prompt + label tokenises to {tokenizer.decode(tail)!r} after the prompt, not the label then EOS"
        else:
            seqs.append(ids)
            continue
        raise BadInputError(
            f"exact mode: option {lab!r} after the prompt {prompt_text[-60:]!r}: {why}; use the prompt format the "
            "policies were trained with (e.g. --data.apply_chat_template, or --data.input_template ending in a space)"
        )
    return prompt_ids, seqs


def option_logps_tensor(model, tokenizer, prompt_text, labels):
    """``option_logps`` as a float32 tensor on the model's device, differentiable when grad is enabled."""
    prompt_ids, seqs = option_ids(tokenizer, prompt_text, labels)
    n = max(map(len, seqs))
    ids = torch.full((len(seqs), n), tokenizer.pad_token_id, dtype=torch.long)
    att = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        att[i, : len(s)] = 1
    device = next(model.parameters()).device
    ids, att = ids.to(device), att.to(device)
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    logits = model(ids, attention_mask=att, position_ids=pos)["logits"].float()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    mask = att[:, 1:].bool().clone()
    mask[:, : len(prompt_ids) - 1] = False
    return (logp * mask).sum(-1)


MASS_TOLERANCE = 1e-3  # float32 log-softmax sums: a total above 1 + this is no rounding


def option_masses(model, tokenizer, prompt_text, labels):
    """pi(label + EOS | prompt) for each label, checked to be a sub-distribution (ImpossibleResultError otherwise)."""
    mass = np.exp(option_logps(model, tokenizer, prompt_text, labels))
    if not (np.isfinite(mass).all() and mass.sum() <= 1 + MASS_TOLERANCE):
        raise ImpossibleResultError(
            f"exact mode: the options {list(labels)} after the prompt {prompt_text[-60:]!r} have total probability "
            f"{mass.sum():.4f} > 1, which no distribution has: their sequences overlap or the log-probs are broken"
        )
    return mass


def checked_gap(gap, what):
    """A duality gap is in [0, 1]; anything else is a computation gone wrong, never a result to print."""
    if not (-1e-9 <= gap <= 1 + 1e-9):
        raise ImpossibleResultError(f"{what}: duality gap {gap:.4f} is outside [0, 1]")
    return gap


def game_report(model, tokenizer, prompt_text, P, labels):
    """{'policy', 'invalid_mass', 'duality_gap'} of the model on one prompt of the game P."""
    mass = option_masses(model, tokenizer, prompt_text, labels)
    total = mass.sum()
    p = mass / total
    gap = checked_gap(duality_gap(np.asarray(P, dtype=np.float64), p), f"prompt {prompt_text[-60:]!r}")
    return {"policy": p.tolist(), "invalid_mass": float(max(0.0, 1.0 - total)), "duality_gap": gap}


def extended_game(P):
    """The game with one more option, "invalid" (any output that is no label), played as the table judge plays it:
    it loses to every label and ties itself."""
    P = np.asarray(P, dtype=np.float64)
    n = P.shape[0]
    Q = np.zeros((n + 1, n + 1))
    Q[:n, :n] = P
    Q[:n, n] = 1.0
    Q[n, n] = 0.5
    return Q


def exact_policy(model, tokenizer, prompt_texts, P, labels):
    """Exact distribution of ``model`` over the game's options on each prompt text: {'per_prompt': [[q_1..q_n,
    invalid]...], 'policy' (renormalised, mean over prompts), 'invalid_mass', 'duality_gap' (renormalised),
    'duality_gap_with_invalid'} (gaps are means over prompts of the per-prompt gaps)."""
    P = np.asarray(P, dtype=np.float64)
    Q = extended_game(P)
    rows, gaps, gaps_ext = [], [], []
    for text in prompt_texts:
        mass = option_masses(model, tokenizer, text, labels)
        q = np.append(mass, max(0.0, 1.0 - mass.sum()))
        rows.append(q)
        gaps.append(checked_gap(duality_gap(P, mass / mass.sum()), f"prompt {text[-60:]!r}"))
        # the best response is a label: Q's last row (invalid) is never it
        gaps_ext.append(checked_gap(2 * np.max((Q @ q)[:-1]) - 1, f"prompt {text[-60:]!r} (with invalid outputs)"))
    rows = np.array(rows)
    pol = rows[:, :-1] / rows[:, :-1].sum(1, keepdims=True)
    return {
        "per_prompt": rows.tolist(),
        "policy": pol.mean(0).tolist(),
        "invalid_mass": float(rows[:, -1].mean()),
        "duality_gap": float(np.mean(gaps)),
        "duality_gap_with_invalid": float(np.mean(gaps_ext)),
    }


def exact_matrix(per_prompt, P):
    """{row: {col: P(row beats col)}} from each policy's per-prompt distributions over options + invalid."""
    Q = extended_game(P)
    names = list(per_prompt)
    out = {}
    for r in names:
        out[r] = {}
        for c in names:
            v = float(np.mean(np.einsum("pi,ij,pj->p", np.array(per_prompt[r]), Q, np.array(per_prompt[c]))))
            if not -1e-9 <= v <= 1 + 1e-9:
                raise ImpossibleResultError(f"exact mode: P({r} beats {c}) = {v:.4f} is not a probability")
            out[r][c] = v
    return out


# ------------------------------------------------------------------------------------------------- statistics


def bootstrap_mean(values, n_boot=1000, level=0.95, rng=None):
    """(estimate, low, high) of the mean over prompts of the per-prompt mean of ``values`` ([prompts, samples],
    NaN = missing), with a percentile bootstrap interval at ``level``: prompts are drawn with replacement, then
    within each drawn prompt its samples. Prompts with no value are left out; no value at all gives NaNs."""
    V = np.asarray(values, dtype=np.float64)
    if V.ndim == 1:
        V = V[:, None]
    V = V[~np.all(np.isnan(V), axis=1)] if V.size else V.reshape(0, 1)
    if V.shape[0] == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(0) if rng is None else rng
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of a resample that drew only missing values
        est = float(np.mean(np.nanmean(V, axis=1)))
        if n_boot <= 0:
            return est, math.nan, math.nan
        n_p, n_s = V.shape
        chunk = max(1, int(4_000_000 // (n_p * n_s)))
        stats = []
        for s in range(0, n_boot, chunk):
            b = min(chunk, n_boot - s)
            ip = rng.integers(n_p, size=(b, n_p))
            X = V[ip[:, :, None], rng.integers(n_s, size=(b, n_p, n_s))]
            stats.append(np.nanmean(np.nanmean(X, axis=2), axis=1))
        stats = np.concatenate(stats)
        lo, hi = np.nanquantile(stats, [(1 - level) / 2, (1 + level) / 2])
    return est, float(lo), float(hi)


# ------------------------------------------------------------------------------------------------------ judging


def _key(*parts):
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()[:32]


def _repair_tail(path):
    """Cut a final line left half-written by a killed process, so appends start on a fresh line."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)


def _read_cache(path):
    out = []
    if not os.path.exists(path):
        return out
    _repair_tail(path)
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise BadInputError(f"{path}:{i}: broken cache line ({e.msg}); delete the file to rebuild it")
    return out


class CachedJudge:
    """A judge whose answers P(a beats b | prompt) are remembered per ordered (prompt, a, b), in memory and, with
    ``path``, in an append-only JSON-lines file. ``calls`` counts the comparisons actually sent to the judge."""

    def __init__(self, judge, path=None):
        self.judge = judge
        self.name = getattr(judge, "name", "judge")
        self.antisymmetric = bool(getattr(judge, "antisymmetric", False))
        self.path = path
        self.memo = {}
        self.calls = 0
        self.hits = 0
        if path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            for row in _read_cache(path):
                self.memo[row["k"]] = row["p"]

    def prob(self, prompts, a, b):
        keys = [_key(p, x, y) for p, x, y in zip(prompts, a, b)]
        todo = sorted({k: i for i, k in enumerate(keys) if k not in self.memo}.values())
        self.hits += len(keys) - len(todo)
        if todo:
            got = self.judge.prob([prompts[i] for i in todo], [a[i] for i in todo], [b[i] for i in todo])
            self.calls += len(todo)
            new = {keys[i]: float(p) for i, p in zip(todo, got)}
            self.memo.update(new)
            if self.path:
                append_lines(self.path, [json.dumps({"k": k, "p": p}) for k, p in new.items()])
        return np.array([self.memo[k] for k in keys], dtype=np.float64)


def new_counts():
    return {
        "comparisons": 0,
        "wins": 0,
        "ties": 0,
        "losses": 0,
        "judge_failures": 0,
        "empty_a": 0,
        "empty_b": 0,
        "identical": 0,
    }


def compare(judge, prompts, a, b, both_orders=True, batch_size=256, counts=None, errors=None):
    """P(a[i] beats b[i] | prompts[i]) as float64 with NaN where the judge failed. Empty responses and identical
    pairs are decided without the judge (module docstring); ``counts`` (``new_counts()``) is updated in place and
    ``errors`` (a list) receives the first judge error messages."""
    from comal_openrlhf.judges import judge_pairs
    from comal_openrlhf.pairs import is_valid

    n = len(prompts)
    out = np.full(n, np.nan)
    c = new_counts() if counts is None else counts
    ask = []
    for i in range(n):
        va, vb = is_valid(a[i]), is_valid(b[i])
        c["empty_a"] += not va
        c["empty_b"] += not vb
        if not va or not vb:
            out[i] = 0.5 if va == vb else float(va)
        elif a[i] == b[i]:
            out[i] = 0.5
            c["identical"] += 1
        else:
            ask.append(i)
    for s in range(0, len(ask), batch_size):
        idx = ask[s : s + batch_size]
        args = ([prompts[i] for i in idx], [a[i] for i in idx], [b[i] for i in idx])
        try:
            out[idx] = judge_pairs(judge, *args, both_orders=both_orders)
        except JudgeError:  # find the comparisons that fail, keep the others
            for i in idx:
                try:
                    out[i] = judge_pairs(judge, [prompts[i]], [a[i]], [b[i]], both_orders=both_orders)[0]
                except JudgeError as e:
                    c["judge_failures"] += 1
                    if errors is not None and len(errors) < 5:
                        errors.append(str(e))
    ok = out[~np.isnan(out)]
    c["comparisons"] += n
    c["wins"] += int((ok > 0.5).sum())
    c["ties"] += int((ok == 0.5).sum())
    c["losses"] += int((ok < 0.5).sum())
    return out


def _flip(counts):
    f = dict(counts)
    f["wins"], f["losses"] = counts["losses"], counts["wins"]
    f["empty_a"], f["empty_b"] = counts["empty_b"], counts["empty_a"]
    return f


def head_to_head(samples, judge_prompts, judge, both_orders=True, n_boot=1000, level=0.95, seed=0, progress=None):
    """The win-rate matrix of the policies in ``samples`` ({name: [[response] * n per prompt]}), row beats column.

    Returns {"names", "cells": {row: {col: {winrate, ci_low, ci_high, prompts, counts}}}, "avg": {row: {...}},
    "errors"}: cell (A, B) compares sample i of A with sample i of B on each prompt (``compare``); (B, A) is its
    complement with the mirrored interval; the diagonal is 1/2. ``avg`` is the mean over columns, self = 1/2.
    """
    names = list(samples)
    n_prompts = len(judge_prompts)
    n = min(len(r) for s in samples.values() for r in s) if n_prompts else 0
    values, cells, errors = {}, {nm: {} for nm in names}, []
    for ia, A in enumerate(names):
        cells[A][A] = {"winrate": 0.5, "ci_low": 0.5, "ci_high": 0.5, "prompts": n_prompts, "counts": None}
        for B in names[ia + 1 :]:
            ps, xs, ys = [], [], []
            for p in range(n_prompts):
                for i in range(n):
                    ps.append(judge_prompts[p])
                    xs.append(samples[A][p][i])
                    ys.append(samples[B][p][i])
            counts = new_counts()
            v = compare(judge, ps, xs, ys, both_orders, counts=counts, errors=errors).reshape(n_prompts, n)
            values[A, B] = v
            est, lo, hi = bootstrap_mean(v, n_boot, level, np.random.default_rng([seed, ia, names.index(B)]))
            kept = int((~np.all(np.isnan(v), axis=1)).sum()) if v.size else 0
            cells[A][B] = {"winrate": est, "ci_low": lo, "ci_high": hi, "prompts": kept, "counts": counts}
            cells[B][A] = {"winrate": 1 - est, "ci_low": 1 - hi, "ci_high": 1 - lo, "prompts": kept}
            cells[B][A]["counts"] = _flip(counts)
            if progress is not None:
                progress(1)
    avg = {}
    for ia, A in enumerate(names):
        cols = [np.full((n_prompts, n), 0.5)]
        cols += [values[A, B] if (A, B) in values else 1.0 - values[B, A] for B in names if B != A]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            mean_over_cols = np.nanmean(np.stack(cols), axis=0) if n_prompts else np.zeros((0, 1))
        est, lo, hi = bootstrap_mean(mean_over_cols, n_boot, level, np.random.default_rng([seed, ia, len(names)]))
        avg[A] = {"winrate": est, "ci_low": lo, "ci_high": hi}
    return {"names": names, "cells": cells, "avg": avg, "errors": errors}


def best_of_m(judge, judge_prompts, candidates, reference, both_orders=True, counts=None, errors=None):
    """Per prompt, the index of the candidate with the highest mean P(candidate beats r) over the policy's samples r
    in ``reference`` (stable: ties keep the first). Distinct candidates are judged once."""
    ps, xs, ys, where = [], [], [], []
    for p, (cands, refs) in enumerate(zip(candidates, reference)):
        distinct = list(dict.fromkeys(cands))
        ps += [judge_prompts[p]] * (len(distinct) * len(refs))
        xs += [c for c in distinct for _ in refs]
        ys += [r for _ in distinct for r in refs]
        where.append((distinct, len(refs)))
    probs = compare(judge, ps, xs, ys, both_orders, counts=counts, errors=errors)
    best, s = [], 0
    for (distinct, n_ref), cands in zip(where, candidates):
        block = probs[s : s + len(distinct) * n_ref].reshape(len(distinct), max(n_ref, 1)) if n_ref else None
        s += len(distinct) * n_ref
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            score = np.nanmean(block, axis=1) if block is not None else np.zeros(len(distinct))
        best.append(cands.index(distinct[int(np.argmax(np.nan_to_num(score, nan=-1.0)))]))
    return best


def exploitability(
    judge, judge_prompts, candidates, reference, opponents, both_orders=True, n_boot=1000, level=0.95, seed=0
):
    """Win rate E of the judge's best response among ``candidates`` (per prompt; chosen by its mean win probability
    against ``reference``, m samples of the policy) against ``opponents`` (k further samples of the policy,
    independent of the choice), and the duality-gap lower-bound estimate 2E - 1, each with its bootstrap interval.
    The candidates are the policy's own m samples, or (``--eval.exploit_pool all``) those of every evaluated policy:
    any response y gives P(y beats pi) <= max_y' P(y' beats pi), so every pool gives a lower bound."""
    counts, errors = new_counts(), []
    best = best_of_m(judge, judge_prompts, candidates, reference, both_orders, counts=new_counts(), errors=errors)
    k = min(map(len, opponents)) if opponents else 0
    ps = [judge_prompts[p] for p in range(len(opponents)) for _ in range(k)]
    xs = [candidates[p][best[p]] for p in range(len(opponents)) for _ in range(k)]
    ys = [opponents[p][j] for p in range(len(opponents)) for j in range(k)]
    v = compare(judge, ps, xs, ys, both_orders, counts=counts, errors=errors).reshape(len(opponents), k)
    est, lo, hi = bootstrap_mean(v, n_boot, level, np.random.default_rng([seed, 7]))
    return {
        "best_of_m_winrate": est,
        "ci_low": lo,
        "ci_high": hi,
        "gap_estimate": 2 * est - 1,
        "gap_ci_low": 2 * lo - 1,
        "gap_ci_high": 2 * hi - 1,
        "candidates": min(map(len, candidates)) if candidates else 0,
        "m": min(map(len, reference)) if reference else 0,
        "opponents": k,
        "best_responses": [candidates[p][best[p]] for p in range(min(len(candidates), 5))],
        "counts": counts,
        "errors": errors,
    }


# ------------------------------------------------------------------------------------------ in-memory win rate


WinRate = namedtuple("WinRate", "mean ci_low ci_high counts")


def winrate(
    policy_a,
    policy_b,
    prompts,
    judge,
    tokenizer,
    tokenizer_b=None,
    judge_prompts=None,
    n_samples=1,
    temperature=1.0,
    top_p=1.0,
    max_new_tokens=256,
    batch_size=16,
    both_orders=True,
    n_boot=1000,
    level=0.95,
    seed=0,
    generate_kwargs=None,
):
    """P(policy_a beats policy_b) on ``prompts`` (policy-formatted texts, e.g. ``PromptFormatter.policy_text``),
    judged by ``judge`` (any ``build_judge`` judge) on ``judge_prompts`` (default: ``prompts``).

    ``policy_a`` / ``policy_b``: an HF causal LM, an OpenRLHF Actor or DeepSpeed engine (sampled with
    ``sampling.generate``, ``n_samples`` per prompt), or already sampled responses (a list per prompt of at least
    ``n_samples`` strings; e.g. the start policy's samples kept from an earlier call). ``generate_kwargs`` go to
    ``sampling.generate`` (``synced_gpus``, ``min_calls`` under ZeRO-3). Returns
    ``WinRate(mean, ci_low, ci_high, counts)`` with the bootstrap interval of ``bootstrap_mean`` and the counts of
    ``compare`` (wins, ties, losses, judge failures, empty responses), plus ``counts["samples_a"]`` /
    ``["samples_b"]``, the responses used (reuse them to skip sampling a fixed opponent again).
    """
    from comal_openrlhf.sampling import generate

    def responses(policy, tok):
        if isinstance(policy, (list, tuple)):
            if len(policy) != len(prompts) or any(len(r) < n_samples for r in policy):
                raise BadInputError(f"precomputed samples must hold {n_samples} responses for each of the prompts")
            return [list(r[:n_samples]) for r in policy]
        kw = dict(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, batch_size=batch_size)
        return generate(policy, tok, list(prompts), n_samples, **kw, **(generate_kwargs or {}))

    judge_prompts = list(prompts) if judge_prompts is None else list(judge_prompts)
    sa = responses(policy_a, tokenizer)
    sb = responses(policy_b, tokenizer_b or tokenizer)
    counts = new_counts()
    ps = [judge_prompts[p] for p in range(len(prompts)) for _ in range(n_samples)]
    xs = [r for rs in sa for r in rs]
    ys = [r for rs in sb for r in rs]
    v = compare(judge, ps, xs, ys, both_orders, counts=counts).reshape(len(prompts), n_samples)
    est, lo, hi = bootstrap_mean(v, n_boot, level, np.random.default_rng(seed))
    counts["samples_a"], counts["samples_b"] = sa, sb
    return WinRate(est, lo, hi, counts)


# -------------------------------------------------------------------------------------------- the command line


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


def _fingerprint(path):
    """What identifies a checkpoint's weights: its absolute path and its files' sizes and modification times."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        return [path]
    files = sorted(f for f in os.listdir(path) if os.path.isfile(os.path.join(path, f)))
    return [path] + [
        [f, os.path.getsize(os.path.join(path, f)), os.path.getmtime(os.path.join(path, f))] for f in files
    ]


def build_parser():
    from comal_openrlhf.generate import add_prompt_args
    from comal_openrlhf.online import add_online_args

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
    from openrlhf.utils.config import hierarchize

    return hierarchize(build_parser().parse_args(argv))


def _load_tokenizer(path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise BadInputError(f"cannot load the tokenizer of {path}: {e}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _load_policy(path, dtype):
    from transformers import AutoModelForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = checkpoint_dtype(path) if dtype == "auto" else dtype
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    tok = _load_tokenizer(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device)
    except (OSError, ValueError) as e:
        raise BadInputError(f"cannot load the policy {path}: {e}") from None
    model.eval()
    model.comal_dtype = dtype  # reported with the results: an exact gap depends on it (bf16 vs fp32 log-probs)
    return model, tok


def checkpoint_dtype(path):
    """The dtype the checkpoint was saved in (config.json's ``torch_dtype`` / ``dtype``): bf16, fp16 or fp32 (the
    default when the config says nothing). ``--dtype auto`` evaluates in it, so a policy trained and saved in bf16
    (the demo on a CPU with native bf16) is measured as it was trained."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return "fp32"
    name = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    return {"bfloat16": "bf16", "float16": "fp16"}.get(name, "fp32")


def vllm_sampler(a, path, seed):
    """``rollout_vllm.VLLMSampler`` for checkpoint ``path`` from a phase command's flags (``--vllm.*``,
    ``--rollout.*``, ``--dtype``); the engines load the checkpoint themselves."""
    from types import SimpleNamespace

    from comal_openrlhf.rollout_vllm import VLLMSampler

    dtype = {"auto": "bf16", "fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}[a.dtype]
    args = SimpleNamespace(
        vllm=a.vllm,
        rollout=a.rollout,
        ds=SimpleNamespace(param_dtype=dtype, zero_stage=0),
        train=SimpleNamespace(seed=seed),
        model=SimpleNamespace(model_name_or_path=path),
        data=a.data,
    )
    return VLLMSampler(args, path, a.data.max_len)


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
    key = _key(_fingerprint(path), ro.temperature, ro.top_p, ro.max_new_tokens, ro.backend, a.seed, a.dtype)
    cache_path = os.path.join(cache_dir, "generations", f"{name}-{key[:16]}.jsonl") if cache_dir else None
    model = tok = None
    if a._need_model:
        model, tok = _load_policy(path, a.dtype)
    else:
        tok = _load_tokenizer(path)
    formatter = formatter_of(tok)
    texts = [formatter.policy_text(r) for r in prompts]
    have = {}
    if cache_path:
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        for row in _read_cache(cache_path):
            have[row["prompt"], row["sample"]] = row["response"]
    tkeys = [_key(t) for t in texts]
    missing = {}  # number of missing samples -> prompt indices
    for p, tk in enumerate(tkeys):
        m = [i for i in range(total) if (tk, i) not in have]
        work.generated_cached += total - len(m)
        if m:
            missing.setdefault(len(m), []).append(p)
    if missing:
        if model is None and ro.backend != "vllm":  # vLLM engines load the checkpoint themselves
            model, tok = _load_policy(path, a.dtype)
        torch.manual_seed(int(_key(a.seed, name)[:8], 16))
        sampler = None
        if ro.backend == "vllm":
            sampler = vllm_sampler(a, path, a.seed)
        bs = max(1, ro.generate_batch_size)
        for count, idx in sorted(missing.items()):
            for s in range(0, len(idx), bs):
                chunk = idx[s : s + bs]
                if sampler is not None:
                    out = sampler.generate(
                        tok, [texts[p] for p in chunk], count, ro.temperature, ro.top_p, ro.max_new_tokens
                    )
                else:
                    from comal_openrlhf.sampling import generate

                    out = generate(
                        model,
                        tok,
                        [texts[p] for p in chunk],
                        count,
                        ro.temperature,
                        ro.top_p,
                        ro.max_new_tokens,
                        batch_size=bs,
                    )
                rows = []
                for p, resp in zip(chunk, out):
                    slots = [i for i in range(total) if (tkeys[p], i) not in have]
                    for i, r in zip(slots, resp):
                        have[tkeys[p], i] = r
                        rows.append({"prompt": tkeys[p], "sample": i, "response": r})
                work.generated += len(rows)
                if cache_path:
                    append_lines(cache_path, [json.dumps(r, ensure_ascii=False) for r in rows])
                progress(len(chunk))
        if sampler is not None and hasattr(sampler, "close"):
            sampler.close()
    samples = [[have[tk, i] for i in range(total)] for tk in tkeys]
    return samples, model, tok, texts


def _fmt(cell):
    if cell["winrate"] != cell["winrate"]:
        return "n/a"
    if cell["ci_low"] != cell["ci_low"]:
        return f"{100 * cell['winrate']:.1f}"
    return f"{100 * cell['winrate']:.1f} [{100 * cell['ci_low']:.1f}, {100 * cell['ci_high']:.1f}]"


def markdown(report):
    m = report["matrix"]
    names = m["names"]
    lines = [
        f"Win rate (%) of row against column, judge {report['judge']}, {report['prompts']} prompts x "
        f"{report['samples_per_prompt']} samples, {int(100 * report['level'])}% bootstrap intervals",
        "",
        "| | " + " | ".join(names) + " | avg |",
        "|---" * (len(names) + 2) + "|",
    ]
    for r in names:
        lines.append(f"| {r} | " + " | ".join(_fmt(m["cells"][r][c]) for c in names) + f" | {_fmt(m['avg'][r])} |")
    t = report["totals"]
    lines += [
        "",
        f"Comparisons {t['comparisons']}: ties {t['ties']}, judge failures {t['judge_failures']}, empty responses "
        f"{t['empty_responses']} (generations: {report['work']['generated']} new, {report['work']['generated_cached']}"
        f" cached; judge: {report['work']['judged']} new, {report['work']['judged_cached']} cached)",
    ]
    if report.get("exploitability"):
        lines += ["", "| policy | best-of-m win rate (%) | gap estimate 2E-1 (lower bound) |", "|---|---|---|"]
        for name, e in report["exploitability"].items():
            gap = f"{e['gap_estimate']:.3f} [{e['gap_ci_low']:.3f}, {e['gap_ci_high']:.3f}]"
            lines.append(f"| {name} | {_fmt({'winrate': e['best_of_m_winrate'], **e})} | {gap} |")
    if report.get("exact"):
        ex = report["exact"]
        lines += [
            "",
            f"Exact (game over {ex['labels']}):",
            "",
            "| policy | distribution | invalid mass | duality gap | dtype |",
        ]
        lines.append("|---|---|---|---|---|")
        for name, e in ex["policies"].items():
            lines.append(
                f"| {name} | {np.round(e['policy'], 3).tolist()} | {e['invalid_mass']:.3f} | {e['duality_gap']:.4f} "
                f"(with invalid: {e['duality_gap_with_invalid']:.4f}) | {e.get('dtype', '?')} |"
            )
        lines += ["", "| exact | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for r in names:
            lines.append(f"| {r} | " + " | ".join(f"{100 * ex['matrix'][r][c]:.1f}" for c in names) + " |")
    return "\n".join(lines)


def strict_json(obj):
    """``obj`` with NaN / inf floats replaced by None, so the JSON is standard (no ``NaN`` tokens)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def check_report(report):
    """Every win rate and interval bound of the report is a probability and every gap estimate 2E - 1 is in
    [-1, 1]: an impossible figure is an ImpossibleResultError naming the cell, never a number in a table."""

    def prob(v, what):
        if v is not None and not (isinstance(v, float) and math.isnan(v)) and not -1e-9 <= v <= 1 + 1e-9:
            raise ImpossibleResultError(f"{what} = {v:.4f} is not a probability (a bug: please report it)")

    m = report["matrix"]
    for r in m["names"]:
        for c in list(m["names"]) + ["avg"]:
            cell = m["avg"][r] if c == "avg" else m["cells"][r][c]
            for k in ("winrate", "ci_low", "ci_high"):
                prob(cell.get(k), f"win rate of {r} against {c} ({k})")
    for name, e in (report.get("exploitability") or {}).items():
        prob(e.get("best_of_m_winrate"), f"best-of-m win rate against {name}")
        for k in ("gap_estimate", "gap_ci_low", "gap_ci_high"):
            v = e.get(k)
            if isinstance(v, float) and not math.isnan(v) and not -1 - 1e-9 <= v <= 1 + 1e-9:
                raise ImpossibleResultError(f"exploitability of {name} ({k}) = {v:.4f} is outside [-1, 1]")


def write_outputs(report, out):
    check_report(report)
    os.makedirs(out, exist_ok=True)
    m = report["matrix"]
    buf = io.StringIO(newline="")
    w = csv.writer(buf)
    keys = list(new_counts())
    w.writerow(["row", "column", "winrate", "ci_low", "ci_high", "prompts"] + keys)
    for r in m["names"]:
        for c in m["names"]:
            cell = m["cells"][r][c]
            counts = cell["counts"] or {}
            w.writerow(
                [r, c, cell["winrate"], cell["ci_low"], cell["ci_high"], cell["prompts"]]
                + [counts.get(k, "") for k in keys]
            )
        a = m["avg"][r]
        w.writerow([r, "avg", a["winrate"], a["ci_low"], a["ci_high"], ""] + [""] * len(keys))
    write_atomic(os.path.join(out, "matrix.csv"), buf.getvalue())
    write_json(os.path.join(out, "results.json"), strict_json(report), indent=1)
    write_atomic(os.path.join(out, "matrix.md"), markdown(report) + "\n")
    with guarded(os.path.join(out, "heatmap.png")):
        heatmap(report, os.path.join(out, "heatmap.png"))


def heatmap(report, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = report["matrix"]
    names = m["names"]
    cols = names + ["avg"]
    M = np.array([[m["cells"][r][c]["winrate"] for c in names] + [m["avg"][r]["winrate"]] for r in names]) * 100
    fig, ax = plt.subplots(figsize=(1.6 + 1.25 * len(cols), 1.0 + 0.8 * len(names)))
    im = ax.imshow(M, cmap="RdBu", vmin=0, vmax=100)
    for i, r in enumerate(names):
        for j, c in enumerate(cols):
            cell = m["avg"][r] if c == "avg" else m["cells"][r][c]
            text = (
                f"{M[i, j]:.0f}"
                if cell["ci_low"] != cell["ci_low"]
                else (f"{M[i, j]:.0f}\n[{100 * cell['ci_low']:.0f}, {100 * cell['ci_high']:.0f}]")
            )
            ax.text(j, i, text, ha="center", va="center", fontsize=8, color="black")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("column (opponent)")
    ax.set_ylabel("row")
    ax.set_title(f"win rate % (row beats column), {int(100 * report['level'])}% CI", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate(a):
    """Run the evaluation described by the parsed flags ``a``; returns the report (a JSON-able dict)."""
    from tqdm import tqdm

    from comal_openrlhf.data import PromptFormatter
    from comal_openrlhf.generate import load_prompts
    from comal_openrlhf.judges import build_judge

    policies = parse_policy_specs(a.policies)
    ev, ro = a.eval, a.rollout
    if ro.n_samples_per_prompt < 1:
        raise BadInputError("--rollout.n_samples_per_prompt must be >= 1")
    if ev.exploit_m < 0 or (ev.exploit_m and ev.exploit_samples < 1):
        raise BadInputError("--eval.exploit_m must be 0 (off) or >= 1, with --eval.exploit_samples >= 1")
    raw_prompts, skips = load_prompts(a)
    judge_prompts = [PromptFormatter.judge_text(r) for r in raw_prompts]
    base_judge = build_judge(a.judge)
    both = not a.judge.single_order
    table = a.judge.kind == "table" and getattr(base_judge, "labels", None) is not None
    exact_on = ev.exact == "on" or (ev.exact == "auto" and table)
    if exact_on and not table:
        raise BadInputError("--eval.exact on needs --judge.kind table (a finite game)")
    cache_dir = None if a.no_cache else (a.cache or os.path.join(a.out, "cache"))
    jkey = _key(
        {k: v for k, v in sorted(vars(a.judge).items()) if k not in ("token", "timeout", "retries")},
        [_fingerprint(x) for x in (a.judge.path, a.judge.table, a.judge.mixture) if x and os.path.exists(x)],
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
    from comal_openrlhf._cli import run_command

    a = parse_args(argv)
    report = run_command(lambda: evaluate(a), a.json, to_json=strict_json)
    if not a.json:
        print(markdown(report))
    return report


if __name__ == "__main__":
    main()
