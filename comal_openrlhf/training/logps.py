"""Sequence log-probabilities: the one function through which every log-prob of the trainer flows.

log pi(y|x) = sum over response tokens t of log softmax(z_t)[y_t] (the policy's sequence log-probability in the
prox objectives of arXiv 2410.23223), prompt and padding masked out exactly as OpenRLHF's
``DPOTrainer._get_batch_logps`` (openrlhf/trainer/dpo_trainer.py) does. Kernels:

- ``openrlhf``: ``Actor.forward(return_logprobs=True)``, OpenRLHF's own path (fp32 copy of all logits).
- ``torch`` / ``triton``: the model's bf16 logits go to ``comal_openrlhf.kernels.sequence_logps`` (chunked PyTorch
  or the fused Triton kernel), no fp32 copy of the logits. ``auto`` = triton on CUDA, torch on CPU.
- ``linear``: the model's backbone runs to the last hidden state and ``comal_openrlhf.kernels.linear_sequence_logps``
  computes the log-probs from it and the LM head's weight in token chunks, so the B x L x V logits of the micro-batch
  (the largest tensor of a step at a 128k vocabulary) never exist. Tied embeddings need nothing special (the head's
  weight is the embedding's parameter and receives both gradients); a ZeRO-3 partitioned head is gathered and
  released by DeepSpeed's hooks on the head module, through which the computation is called.
"""

import contextlib

import torch

from comal_openrlhf.errors import PlanError

LOGPS_KERNELS = ("auto", "triton", "torch", "linear", "openrlhf")


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
    temperature = getattr(actor, "temperature", 1.0)
    if kernel == "linear":
        return _linear_logps(actor.model, input_ids, attention_mask, position_ids, mask, temperature)
    logits = actor.model(input_ids, attention_mask=attention_mask, position_ids=position_ids)["logits"]
    return fused(logits[:, :-1], input_ids[:, 1:], mask, temperature=temperature, backend=kernel)


def lm_head_parts(model):
    """(backbone, head) of a Hugging Face causal LM whose logits are exactly head(backbone(...)[0]); ``model`` may be
    wrapped in a DeepSpeed engine (OpenRLHF's strategy replaces ``Actor.model`` by one)."""
    model = getattr(model, "module", model)
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if backbone is None or head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise PlanError(
            f"--comal.logps_kernel linear needs a causal LM with a backbone and a linear LM head; "
            f"{type(model).__name__} has none (use --comal.logps_kernel auto)"
        )
    config = getattr(model, "config", None)
    for attr in ("final_logit_softcapping", "logit_scale"):
        if getattr(config, attr, None) not in (None, 1, 1.0):
            raise PlanError(
                f"--comal.logps_kernel linear: {type(model).__name__} transforms its logits ({attr}="
                f"{getattr(config, attr)}), which the fused LM-head kernel does not; use --comal.logps_kernel auto"
            )
    return backbone, head


def _linear_logps(model, input_ids, attention_mask, position_ids, mask, temperature):
    from comal_openrlhf.kernels import linear_sequence_logps

    backbone, head = lm_head_parts(model)
    out = backbone(input_ids, attention_mask=attention_mask, position_ids=position_ids)
    hidden = out[0] if isinstance(out, (tuple, list)) else out.last_hidden_state
    bias = head.bias if isinstance(getattr(head, "bias", None), torch.Tensor) else None

    def head_forward(h):
        return linear_sequence_logps(h, head.weight, input_ids[:, 1:], mask, bias=bias, temperature=temperature)

    if not hasattr(head.weight, "ds_id"):
        return head_forward(hidden[:, :-1])
    # ZeRO-3: the head's weight is partitioned across ranks. Calling the head module (with this computation as its
    # forward) lets DeepSpeed's own module hooks gather the weight for the forward, gather it again before the
    # backward and release it after its gradient has been reduced, as they do for the logits path.
    with _forward_replaced(head, head_forward):
        return head(hidden[:, :-1])


@contextlib.contextmanager
def _forward_replaced(module, forward):
    had = "forward" in vars(module)
    saved = vars(module).get("forward")
    module.forward = forward
    try:
        yield module
    finally:
        if had:
            module.forward = saved
        else:
            del module.forward


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
