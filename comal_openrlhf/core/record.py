"""The iteration record: one COMAL iteration's pairs as named tensors (plain PyTorch, no OpenRLHF).

One iteration k of COMAL (arXiv 2410.23223: one prox step of the KL-regularised game) trains the policy on
pairs (y_w, y_l) of prompts x. The record holds, per pair i:

    chosen_winrate, rejected_winrate   P(y > mu_k) of each side (NaN when unknown)
    soft_label                         P(y_w beats y_l), NaN for a hard pair
    weight                             the pair's share of the expectation over y, y' ~ mu_k, scaled so that the
                                       iteration's weights have mean 1 (see ``weights_normalised``)
    logp_mu_chosen, logp_mu_rejected   log mu_k(y | x): the policy at the start of the iteration
    logp_ref_chosen, logp_ref_rejected log ref(y | x): the anchor reference

The source produces a record without log-probs (``IterationRecord.from_pairs``), the precompute stage returns a
copy with them (``with_logps``), an optional policy weighting returns a copy with new weights (``with_weights``),
the prox loss reads micro-batches of it (``batch``), the checkpoint saves it (``state_dict`` / ``from_state_dict``).
No stage changes a record in place; every field is addressed by name.
"""

from dataclasses import dataclass, fields, replace
from typing import Optional

import torch

from comal_openrlhf.core.pairs import Pair

LOGP_FIELDS = ("logp_mu_chosen", "logp_mu_rejected", "logp_ref_chosen", "logp_ref_rejected")
PAIR_FIELDS = ("chosen_winrate", "rejected_winrate", "soft_label", "weight")


@dataclass(frozen=True)
class PairBatch:
    """The tensors of a subset of a record's pairs (a micro-batch), what the prox loss consumes."""

    chosen_winrate: torch.Tensor
    rejected_winrate: torch.Tensor
    soft_label: torch.Tensor
    weight: torch.Tensor
    logp_mu_chosen: torch.Tensor
    logp_mu_rejected: torch.Tensor
    logp_ref_chosen: torch.Tensor
    logp_ref_rejected: torch.Tensor

    def to(self, device) -> "PairBatch":
        return PairBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def __len__(self) -> int:
        return self.weight.shape[0]


def weights_normalised(weight: torch.Tensor) -> torch.Tensor:
    """Scale pair weights to mean 1 over the whole iteration.

    The prox loss of a micro-batch is then sum_i w_i l_i / micro_batch_size, so an optimizer step over B pairs (any
    split into micro-batches, ranks or accumulation steps, which DeepSpeed averages) follows the gradient of
    sum_i w_i l_i / B: the iteration's weighted mean with one normaliser, known before training. A per-micro-batch
    mean sum(w l) / sum(w) would cancel the weights entirely with one pair per micro-batch.
    """
    weight = weight.to(torch.float64)
    if weight.numel() == 0:
        return weight.float()
    if not torch.isfinite(weight).all() or (weight < 0).any() or not weight.max() > 0:
        raise ValueError("pair weights must be finite, non-negative and not all zero")
    weight = weight / weight.max()  # in [0, 1] first: weights near the float range (1e308) cannot overflow the sum
    return (weight * (weight.numel() / weight.sum())).float()


@dataclass(frozen=True)
class IterationRecord:
    """Pairs of one iteration plus their per-pair tensors (see the module docstring)."""

    pairs: tuple
    chosen_winrate: torch.Tensor
    rejected_winrate: torch.Tensor
    soft_label: torch.Tensor
    weight: torch.Tensor
    logp_mu_chosen: Optional[torch.Tensor] = None
    logp_mu_rejected: Optional[torch.Tensor] = None
    logp_ref_chosen: Optional[torch.Tensor] = None
    logp_ref_rejected: Optional[torch.Tensor] = None

    @classmethod
    def from_pairs(cls, pairs) -> "IterationRecord":
        pairs = tuple(pairs)

        def column(name, dtype=torch.float32):
            return torch.tensor([float(getattr(p, name)) for p in pairs], dtype=dtype)

        return cls(
            pairs=pairs,
            chosen_winrate=column("chosen_winrate"),
            rejected_winrate=column("rejected_winrate"),
            soft_label=column("soft_label"),
            weight=weights_normalised(column("weight", torch.float64)),  # float64: a weight may exceed float32
        )

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def has_logps(self) -> bool:
        return self.logp_mu_chosen is not None

    @property
    def has_winrates(self) -> bool:
        return not (torch.isnan(self.chosen_winrate).any() or torch.isnan(self.rejected_winrate).any())

    def with_logps(self, mu_chosen, mu_rejected, ref_chosen, ref_rejected) -> "IterationRecord":
        """A copy holding the cached sequence log-probs under mu_k and the anchor (fp32, one value per pair)."""
        values = dict(zip(LOGP_FIELDS, (mu_chosen, mu_rejected, ref_chosen, ref_rejected)))
        for name, v in values.items():
            if v.shape != (len(self),):
                raise ValueError(f"{name}: expected shape ({len(self)},), got {tuple(v.shape)}")
            if not torch.isfinite(v).all():
                raise ValueError(f"{name}: non-finite log-probabilities")
        return replace(self, **{k: v.detach().to("cpu", torch.float32) for k, v in values.items()})

    def with_weights(self, weight: torch.Tensor) -> "IterationRecord":
        return replace(self, weight=weights_normalised(weight))

    def batch(self, index: torch.Tensor) -> PairBatch:
        if not self.has_logps:
            raise RuntimeError("the record has no cached log-probs yet (run the precompute stage first)")
        return PairBatch(**{name: getattr(self, name)[index] for name in PAIR_FIELDS + LOGP_FIELDS})

    def logratio_mu_to_anchor(self) -> float:
        """Mean over pairs and sides of log mu_k(y) - log ref(y): how far the sampling policy is from the anchor."""
        mu = torch.cat([self.logp_mu_chosen, self.logp_mu_rejected])
        ref = torch.cat([self.logp_ref_chosen, self.logp_ref_rejected])
        return (mu - ref).mean().item()

    def state_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "pairs"}
        out["pairs"] = [
            {f.name: getattr(p, f.name) for f in fields(Pair)} for p in self.pairs
        ]  # plain dicts: loads with weights_only
        return out

    @classmethod
    def from_state_dict(cls, state: dict) -> "IterationRecord":
        pairs = tuple(Pair(**p) for p in state["pairs"])
        return cls(pairs=pairs, **{k: v for k, v in state.items() if k != "pairs"})
