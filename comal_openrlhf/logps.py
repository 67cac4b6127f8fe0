"""Sequence log-probabilities: the one function through which every log-prob of the trainer flows.

log pi(y|x) = sum over response tokens t of log softmax(z_t)[y_t] (COMAL.md section 4), prompt and padding masked
out exactly as OpenRLHF's ``DPOTrainer._get_batch_logps`` does. Kernels:

- ``openrlhf``: ``Actor.forward(return_logprobs=True)``, OpenRLHF's own path (fp32 copy of all logits).
- ``torch`` / ``triton``: the model's bf16 logits go to ``comal_openrlhf.kernels.sequence_logps`` (chunked PyTorch
  or the fused Triton kernel), no fp32 copy of the logits. ``auto`` = triton on CUDA, torch on CPU.
"""

import torch

LOGPS_KERNELS = ("auto", "triton", "torch", "openrlhf")


def response_mask(attention_mask, prompt_lens):
    """Mask of the label positions (shifted by one) that belong to the response: B x (L - 1)."""
    mask = attention_mask.clone().bool()
    for row, n in zip(mask, prompt_lens):
        row[:n] = False
    return mask[:, 1:]


def sequence_logps(actor, input_ids, attention_mask, prompt_lens, kernel="openrlhf"):
    """(sum, mean) of the response-token log-probs of each row, fp32, shape [B] each."""
    mask = response_mask(attention_mask, prompt_lens)
    if kernel == "openrlhf":
        logp = actor(input_ids, attention_mask=attention_mask, return_logprobs=True)
        total = (logp * mask).sum(-1)
        return total, total / mask.sum(-1).clamp(min=1)
    from comal_openrlhf.kernels import sequence_logps as fused

    position_ids = attention_mask.long().cumsum(-1) - 1
    position_ids.masked_fill_(attention_mask == 0, 1)
    logits = actor.model(input_ids, attention_mask=attention_mask, position_ids=position_ids)["logits"]
    temperature = getattr(actor, "temperature", 1.0)
    return fused(logits[:, :-1], input_ids[:, 1:], mask, temperature=temperature, backend=kernel)


def pad_cat(a, b, value):
    """Concatenate two right-padded batches along dim 0, padding the shorter to the longer length."""
    n = max(a.shape[1], b.shape[1])

    def pad(t):
        return torch.nn.functional.pad(t, (0, n - t.shape[1]), value=value)

    return torch.cat([pad(a), pad(b)], dim=0)


def pair_logps(actor, batch, pad_token_id, kernel="openrlhf"):
    """Chosen and rejected sequence log-probs of a PairDataset batch in one concatenated forward.

    Returns (chosen_sum, rejected_sum, chosen_mean); the mean feeds OpenRLHF's optional NLL term.
    """
    chosen_ids, c_mask, reject_ids, r_mask, prompt_lens = batch[:5]
    device = next(actor.parameters()).device
    ids = pad_cat(chosen_ids.squeeze(1), reject_ids.squeeze(1), pad_token_id).to(device)
    att = pad_cat(c_mask.squeeze(1), r_mask.squeeze(1), 0).to(device)
    total, mean = sequence_logps(actor, ids, att, list(prompt_lens) * 2, kernel)
    n = chosen_ids.shape[0]
    return total[:n], total[n:], mean[:n]
