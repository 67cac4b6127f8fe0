"""Plain PyTorch references for the fused kernels: fp32 log_softmax + gather + masked sum/mean.

They materialise everything (a full fp32 copy of the logits, its log_softmax, and for the linear op the N x V
logits), which is exactly what the kernels avoid; use them for tests only. Formulas as in ``sequence_logps``:

    logp_t = log_softmax(z_t / T)[y_t],  seq_sum = sum_t m_t logp_t,  seq_mean = seq_sum / sum_t m_t (0 if all m_t = 0)
"""

import torch


def token_logps_reference(logits, labels, mask, temperature=1.0):
    """Masked token log-probs (B x L fp32); labels where mask is 0 are replaced by 0 before the gather."""
    mask = mask.to(torch.float32)
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)
    safe = labels.long().masked_fill(mask == 0, 0)
    return logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1) * mask


def sequence_logps_reference(logits, labels, mask, temperature=1.0):
    mask = mask.to(torch.float32)
    seq_sum = token_logps_reference(logits, labels, mask, temperature).sum(-1)
    count = mask.sum(-1)
    return seq_sum, seq_sum / torch.where(count > 0, count, 1.0)


def sequence_logratio_reference(policy_logits, ref_logits, labels, mask, temperature=1.0):
    policy_sum, _ = sequence_logps_reference(policy_logits, labels, mask, temperature)
    ref_sum, _ = sequence_logps_reference(ref_logits.detach(), labels, mask, temperature)
    return policy_sum, ref_sum, policy_sum - ref_sum


def linear_sequence_logps_reference(hidden, weight, labels, mask, bias=None, temperature=1.0):
    """Logits computed in fp32 from the given (possibly bf16) hidden states and weight."""
    logits = hidden.float() @ weight.float().t()
    if bias is not None:
        logits = logits + bias.float()
    return sequence_logps_reference(logits, labels, mask, temperature)
