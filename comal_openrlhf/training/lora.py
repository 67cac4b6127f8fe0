"""COMAL with LoRA: the anchor reference as a second, frozen adapter on the policy's own base model.

With ``--ds.lora.rank > 0`` OpenRLHF's ``Actor`` wraps the policy in a peft model whose adapter ``default`` is
trained and whose base weights are frozen. COMAL's anchor is an earlier policy iterate (arXiv 2410.23223), and with
LoRA an iterate differs from the base only by its adapter, so the anchor needs no model of its own: it is the same
base with a second adapter, ``anchor``, which never trains. Then

- the initial anchor is the base model alone: the anchor adapter's B matrices are zero, so it adds nothing;
- an anchor forward (the per-iteration cache of log ref, the checks, held-out losses) switches the active adapter of
  every LoRA layer to ``anchor`` for the duration of a ``with`` block (``active``), under no_grad by its callers;
- the advance ref <- pi copies the policy adapter into the anchor adapter, parameter by parameter, through
  ``weights.copy_pairs`` (ZeRO-3: ``GatheredParameters(..., modifier_rank=0)``): megabytes, not the model;
- a checkpoint's anchor file holds the anchor adapter only.

One base model is in memory for the whole run instead of two (policy + reference Actor). The switch sets the layers'
``_active_adapter`` directly rather than calling peft's ``set_adapter``, which also flips ``requires_grad`` (it would
make the anchor trainable and freeze the policy adapter that the DeepSpeed optimizer holds).
"""

import contextlib
import copy
import os
import shutil

import torch
from peft.tuners.tuners_utils import BaseTunerLayer

from comal_openrlhf.errors import PlanError
from comal_openrlhf.storage import guarded, publish_dir
from comal_openrlhf.weights import copy_pairs, unwrap

POLICY = "default"  # the adapter OpenRLHF's Actor creates and trains
ANCHOR = "anchor"


def peft_model(actor):
    """The peft model inside an Actor (or DeepSpeed engine), or None when it is not LoRA-wrapped."""
    module = getattr(actor, "model", actor)
    module = getattr(module, "module", module)
    return module if hasattr(module, "peft_config") and hasattr(module, "get_base_model") else None


def _adapter_of(name):
    """The adapter a LoRA parameter name belongs to (``...lora_A.<adapter>.weight``), None for a base parameter."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.startswith("lora_"):
            return parts[i + 1]
    return None


def is_anchor_param(name):
    return _adapter_of(name) == ANCHOR


def is_policy_param(name):
    return _adapter_of(name) == POLICY


def is_base_param(name):
    return _adapter_of(name) is None


def tuner_layers(actor):
    return [m for m in unwrap(actor).modules() if isinstance(m, BaseTunerLayer)]


def add_anchor_adapter(actor):
    """Give the policy's peft model the frozen ``anchor`` adapter (same config as the policy's, B = 0: the base
    model alone), before the DeepSpeed engine is built so it is partitioned like the rest of the model."""
    model = peft_model(actor)
    if model is None:
        raise PlanError("the LoRA anchor needs a LoRA-wrapped policy (--ds.lora.rank > 0)")
    if ANCHOR in model.peft_config:
        raise PlanError(f"the policy already has an adapter named {ANCHOR!r}")
    config = copy.deepcopy(model.peft_config[POLICY])
    model.add_adapter(ANCHOR, config)
    policy = {n: p for n, p in model.named_parameters() if is_policy_param(n)}
    with torch.no_grad():
        for name, q in model.named_parameters():
            if not is_anchor_param(name):
                continue
            p = policy[name.replace(f".{ANCHOR}.", f".{POLICY}.")]
            q.data = q.data.to(p.dtype)  # the anchor computes as the policy adapter does (same dtype)
            if ".lora_B." in name:
                q.data.zero_()
            q.requires_grad_(False)
        for p in policy.values():
            p.requires_grad_(True)
    for layer in tuner_layers(actor):
        layer._active_adapter = POLICY if isinstance(layer._active_adapter, str) else [POLICY]
    return model


@contextlib.contextmanager
def active(actor, adapter):
    """Run the forwards inside the block with ``adapter`` active in every LoRA layer; the previous one after it."""
    layers = tuner_layers(actor)
    saved = [layer._active_adapter for layer in layers]
    try:
        for layer in layers:
            layer._active_adapter = adapter if isinstance(layer._active_adapter, str) else [adapter]
        yield actor
    finally:
        for layer, old in zip(layers, saved):
            layer._active_adapter = old


def advance_pairs(actor):
    """(policy parameter, anchor parameter) of every adapter matrix: the copies of the advance ref <- pi."""
    params = dict(unwrap(actor).named_parameters())
    pairs = []
    for name, q in params.items():
        if is_anchor_param(name):
            pairs.append((params[name.replace(f".{ANCHOR}.", f".{POLICY}.")], q))
    if not pairs:
        raise PlanError("the policy has no anchor adapter to advance")
    return pairs


def advance(actor):
    """ref <- pi for the LoRA anchor: the policy adapter is copied into the anchor adapter (ZeRO 0/2/3)."""
    copy_pairs(advance_pairs(actor))


@torch.no_grad()
def base_fingerprint(actor):
    """Sum of squares (float64) of the frozen base weights this rank holds, summed over ranks: a number that
    changes if any base weight does (ZeRO-3 partitions are read in place, their zero padding adds nothing)."""
    import torch.distributed as dist

    total = torch.zeros((), dtype=torch.float64)
    zero3 = False
    for name, p in unwrap(actor).named_parameters():
        if not is_base_param(name):
            continue
        local = getattr(p, "ds_tensor", None)
        zero3 = zero3 or local is not None
        t = (local if local is not None else p.data).detach().reshape(-1)
        for chunk in t.split(1 << 22):  # float64 in chunks: no float64 copy of a whole embedding matrix
            total += chunk.double().pow(2).sum().cpu()
    if zero3 and dist.is_initialized():
        device = next(unwrap(actor).parameters()).device
        box = total.to(device)
        dist.all_reduce(box)
        total = box.cpu()
    return total.item()


def save_merged(base_path, adapter_dir, name="merged"):
    """``--comal.lora_save_merged`` (rank 0, after the final save): the base model with the saved policy adapter
    merged in, as a plain Hugging Face model in ``adapter_dir/name``, read from the files just written (so it does
    not depend on the ZeRO stage), written in full or not at all (``storage.publish_dir``)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = os.path.join(adapter_dir, name)
    tmp = out + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    with guarded(tmp, "save the merged LoRA model to"):
        base = AutoModelForCausalLM.from_pretrained(base_path, dtype="auto")
        merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
        merged.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(adapter_dir).save_pretrained(tmp)
    os.makedirs(out, exist_ok=True)
    publish_dir(tmp, out)
    return out
