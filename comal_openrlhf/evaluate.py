"""Exact evaluation of a policy on a finite game (the ``table`` judge): its distribution over the options and its
duality gap 2 max_i (P p)_i - 1 (COMAL.md section 1).

The policy's probability of option i is pi(label_i + EOS | prompt), the product of the token probabilities of the
sequence OpenRLHF trains on (``prompt + label + " " + eos``, as RewardDataset builds it). Probabilities are
renormalised over the options; the mass left for every other output is reported separately as ``invalid_mass``.
"""

import numpy as np
import torch


@torch.no_grad()
def option_logps(model, tokenizer, prompt_text, labels):
    """log pi(label + EOS | prompt) for each label. ``model`` returns logits (HF module or DeepSpeed engine)."""
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    seqs = [
        tokenizer(prompt_text + lab + " " + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
        for lab in labels
    ]
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
    return (logp * mask).sum(-1).cpu().numpy().astype(np.float64)


def game_report(model, tokenizer, prompt_text, P, labels):
    """{'policy', 'invalid_mass', 'duality_gap'} of the model on one prompt of the game P."""
    lp = option_logps(model, tokenizer, prompt_text, labels)
    mass = np.exp(lp)
    total = mass.sum()
    p = mass / total
    gap = float(2 * np.max(np.asarray(P) @ p) - 1)
    return {"policy": p.tolist(), "invalid_mass": float(max(0.0, 1.0 - total)), "duality_gap": gap}
