"""Head-to-head win rates of policies under a general preference judge (arXiv 2410.23223, section 6: the win-rate
table of aligned models judged by a preference oracle), with bootstrap intervals and an exploitability estimate.

Cell (A, B) is the mean over prompts of the mean over sample indices i of P(a_i beats b_i | x), the judge asked in
both orders by default. ``bootstrap_mean`` resamples prompts with replacement and, within each drawn prompt, its
samples. Bookkeeping, never a silent drop: an empty (or whitespace-only) generation loses to a non-empty one (P = 0)
and ties another empty one; identical responses tie (P = 1/2) without a judge call; a comparison the judge fails on
(a ``JudgeError`` after the judge's own retries) is left out of the means and counted.

Exploitability: for each prompt the judge picks a best response y* among candidates, the one with the highest mean
win probability against the policy's samples; y* is judged against further independent samples. E = P(y* beats pi)
<= max_y P(y beats pi), so 2E - 1 estimates a lower bound on the duality gap 2 max_y P(y beats pi) - 1.

``winrate(policy_a, policy_b, prompts, judge, tokenizer)`` works on in-memory HF modules (or an OpenRLHF Actor /
DeepSpeed engine) during training and returns ``WinRate(mean, ci_low, ci_high, counts)``.
"""

import math
import warnings
from collections import namedtuple

import numpy as np

from comal_openrlhf.core.judging import judge_pairs
from comal_openrlhf.core.pairs import is_valid
from comal_openrlhf.errors import BadInputError, JudgeError
from comal_openrlhf.rollout.sampling import generate


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
