"""Moving weights between the policy and the anchor reference under DeepSpeed ZeRO 0, 2 and 3.

The reference advance of COMAL (ref <- pi every K iterations, arXiv 2410.23223) is a parameter copy. Under ZeRO 0
and 2 every rank holds full parameters and copies locally. Under ZeRO-3 parameters are partitioned: each copy sits
inside ``deepspeed.zero.GatheredParameters([p, q], modifier_rank=0)`` so rank 0's write is re-partitioned to every
rank; without ``modifier_rank`` the write is silently lost (the flaw of openrlhf/utils/deepspeed/deepspeed.py
``moving_average``, which gathers without it).
"""

import torch
import torch.distributed as dist
from transformers import PreTrainedModel


def _is_zero3(param):
    return hasattr(param, "ds_id")


def _rank():
    return dist.get_rank() if dist.is_initialized() else 0


def unwrap(model):
    """The HF module inside an OpenRLHF Actor / DeepSpeed engine; a bare HF model is returned as it is (its own
    ``.model`` attribute is the backbone without the LM head, not a wrapper)."""
    if isinstance(model, PreTrainedModel):
        return model
    model = getattr(model, "model", model)  # Actor -> engine or HF model
    return getattr(model, "module", model)  # engine -> HF model


@torch.no_grad()
def copy_weights(src, dst):
    """dst <- src, parameter by parameter (names must match: same architecture)."""
    src_params = dict(unwrap(src).named_parameters())
    pairs = []
    for name, q in unwrap(dst).named_parameters():
        p = src_params.get(name)
        if p is None:
            raise KeyError(f"reference parameter {name} has no counterpart in the policy")
        pairs.append((p, q))
    copy_pairs(pairs)


@torch.no_grad()
def copy_pairs(pairs):
    """q <- p for each (p, q) of ``pairs`` (same shapes), ZeRO-3 aware: the LoRA anchor's advance copies the policy
    adapter into the anchor adapter of the same module this way."""
    for p, q in pairs:
        if _is_zero3(p) or _is_zero3(q):
            import deepspeed

            with deepspeed.zero.GatheredParameters([p, q], modifier_rank=0):
                if _rank() == 0:
                    q.data.copy_(p.data)
        else:
            q.data.copy_(p.data)


@torch.no_grad()
def state_dict_on_rank0(model, select=None):
    """Full parameters on rank 0 (CPU tensors); an empty dict elsewhere. Gathers ZeRO-3 partitions one by one.
    ``select(name)`` keeps only some parameters (e.g. one LoRA adapter)."""
    out = {}
    for name, p in unwrap(model).named_parameters():
        if select is not None and not select(name):
            continue
        if _is_zero3(p):
            import deepspeed

            with deepspeed.zero.GatheredParameters([p]):
                if _rank() == 0:
                    out[name] = p.data.detach().cpu().clone()
        elif _rank() == 0:
            out[name] = p.data.detach().cpu().clone()
    return out


@torch.no_grad()
def load_weights(model, state, select=None):
    """Write a full state dict (read on every rank) into the model in place, ZeRO-3 aware; with ``select(name)`` only
    the parameters it keeps (the others are left as they are)."""
    for name, q in unwrap(model).named_parameters():
        if select is not None and not select(name):
            continue
        if name not in state:
            raise KeyError(f"anchor file lacks parameter {name}")
        if _is_zero3(q):
            import deepspeed

            with deepspeed.zero.GatheredParameters([q], modifier_rank=0):
                if _rank() == 0:
                    q.data.copy_(state[name])
        else:
            q.data.copy_(state[name])
