"""The exact evaluation of a policy on a finite game (arXiv 2410.23223, section 3: the duality gap of Theorem 1).

A ``table`` judge names the game's options; each policy's probability of every option is read from its sequence
log-probs (``option_logps``: the label's tokens must extend the prompt's own tokens, else an error names the label,
the prompt and the fix). Mass on outputs that are no option is ``invalid_mass``: the renormalised gap
(``duality_gap``, as the demo reports it) ignores it; ``duality_gap_with_invalid`` and the exact matrix treat an
invalid output as the table judge does (it loses to every option), the quantity the sampled estimates estimate. A
probability above 1 or a gap outside [0, 1] is an ``ImpossibleResultError``, never a number in a report.
"""

import numpy as np
import torch

from comal_openrlhf.core.game import duality_gap
from comal_openrlhf.errors import BadInputError, ImpossibleResultError


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
        gaps_ext.append(checked_gap(duality_gap(Q[:-1], q), f"prompt {text[-60:]!r} (with invalid outputs)"))
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
