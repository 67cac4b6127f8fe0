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
  released by DeepSpeed's hooks on the head module, through which the computation is called. A LoRA-wrapped
  policy (peft) runs its base model, whose layers carry the adapters; an adapter on the LM head itself is refused.

The no-grad precompute pass (policy mu_k and anchor log-probs of every pair, once per iteration) goes through
``pair_logps_both``: with ``torch`` / ``triton`` / ``auto`` both models run on the same batch and one call of
``comal_openrlhf.kernels.sequence_logratio`` reads both logits (one kernel launch on CUDA instead of two).
"""

import contextlib

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer

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
    # imported here, not at the top: importing the kernels sets TRITON_INTERPRET when there is no GPU (see
    # kernels/__init__.py), which must not happen merely because this module was imported
    from comal_openrlhf.kernels import sequence_logps as fused

    temperature = getattr(actor, "temperature", 1.0)
    if kernel == "linear":
        position_ids = _position_ids(attention_mask)
        return _linear_logps(actor.model, input_ids, attention_mask, position_ids, mask, temperature)
    logits = _logits(actor, input_ids, attention_mask)
    return fused(logits[:, :-1], input_ids[:, 1:], mask, temperature=temperature, backend=kernel)


def _position_ids(attention_mask):
    position_ids = attention_mask.long().cumsum(-1) - 1
    position_ids.masked_fill_(attention_mask == 0, 1)
    return position_ids


def _logits(actor, input_ids, attention_mask):
    """The model's own B x L x V logits (its dtype, no fp32 copy), positions as OpenRLHF's Actor computes them."""
    position_ids = _position_ids(attention_mask)
    return actor.model(input_ids, attention_mask=attention_mask, position_ids=position_ids)["logits"]


def lm_head_parts(model):
    """(backbone, head) of a Hugging Face causal LM whose logits are exactly head(backbone(...)[0]); ``model`` may be
    wrapped in a DeepSpeed engine (OpenRLHF's strategy replaces ``Actor.model`` by one)."""
    model = getattr(model, "module", model)
    if isinstance(model, PeftModel):  # LoRA: the HF model whose layers carry the adapters (the active one computes)
        model = model.get_base_model()
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, BaseTunerLayer):
        raise PlanError(
            "--comal.logps_kernel linear with a LoRA adapter on the LM head (--ds.lora.target_modules includes it): "
            "the fused kernel reads the head's base weight only; use --comal.logps_kernel auto"
        )
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
    ids, att, prompt_lens, n = _pair_inputs(batch, pad_token_id, next(actor.parameters()).device)
    total, mean = sequence_logps(actor, ids, att, prompt_lens, kernel)
    return total[:n], total[n:], mean[:n]


def _pair_inputs(batch, pad_token_id, device):
    """(ids, attention mask, prompt lengths, n): the chosen rows then the rejected rows of a PairDataset batch."""
    chosen_ids, c_mask, reject_ids, r_mask, prompt_lens = batch[:5]
    ids = pad_cat(chosen_ids.squeeze(1), reject_ids.squeeze(1), pad_token_id).to(device)
    att = pad_cat(c_mask.squeeze(1), r_mask.squeeze(1), 0).to(device)
    return ids, att, list(prompt_lens) * 2, chosen_ids.shape[0]


PAIRED_KERNELS = ("auto", "triton", "torch")  # the kernels whose precompute reads both logits in one call


@torch.no_grad()
def pair_logps_both(policy, anchor, batch, pad_token_id, kernel="auto"):
    """Chosen and rejected sequence log-probs of a PairDataset batch under the policy and the anchor, no gradient:
    (mu_chosen, mu_rejected, ref_chosen, ref_rejected), fp32, on the models' device.

    With ``kernel`` in PAIRED_KERNELS both models run their forward on the same concatenated batch and one call of
    ``comal_openrlhf.kernels.sequence_logratio`` reads the two logits tensors (the Triton kernel streams both rows
    through one V loop: one launch instead of two); both B x L x V logits are alive at once, which a no-grad pass
    affords. ``openrlhf`` and ``linear`` (which never materialises the logits), and models that differ in device,
    temperature or vocabulary, take two ``pair_logps`` calls.
    """
    device = next(policy.parameters()).device
    temperature = getattr(policy, "temperature", 1.0)
    paired = (
        kernel in PAIRED_KERNELS
        and next(anchor.parameters()).device == device
        and getattr(anchor, "temperature", 1.0) == temperature
    )
    if not paired:
        mu_w, mu_l, _ = pair_logps(policy, batch, pad_token_id, kernel)
        ref_w, ref_l, _ = pair_logps(anchor, batch, pad_token_id, kernel)
        return mu_w, mu_l, ref_w, ref_l
    # imported here for the reason given in sequence_logps
    from comal_openrlhf.kernels import sequence_logps as fused
    from comal_openrlhf.kernels import sequence_logratio

    ids, att, prompt_lens, n = _pair_inputs(batch, pad_token_id, device)
    mask = response_mask(att, prompt_lens)
    labels = ids[:, 1:]
    pol = _logits(policy, ids, att)[:, :-1]
    ref = _logits(anchor, ids, att)[:, :-1]
    if pol.shape == ref.shape:
        mu, ref_sum, _ = sequence_logratio(pol, ref, labels, mask, temperature=temperature, backend=kernel)
    else:  # vocabularies of different sizes (e.g. a padded embedding): one call per model
        mu, _ = fused(pol, labels, mask, temperature=temperature, backend=kernel)
        ref_sum, _ = fused(ref, labels, mask, temperature=temperature, backend=kernel)
    return mu[:n], mu[n:], ref_sum[:n], ref_sum[n:]
