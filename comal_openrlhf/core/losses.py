"""Prox losses of COMAL (Liu et al., "COMAL: A Convergent Meta-Algorithm for Aligning LLMs with General
Preferences", arXiv 2410.23223): the preference-optimisation losses the paper uses as prox operators. Plain
PyTorch: nothing here knows OpenRLHF.

Each loss trains the policy pi towards one inner step of the KL-regularised game (mirror descent, as in INPO,
arXiv 2407.00617, and the paper's inner solver)

    mu_{k+1}(y)  ~  mu_k(y)^(1 - eta*tau) * ref(y)^(eta*tau) * exp(eta * P(y > mu_k))

with beta = 1/eta and r = eta*tau in [0, 1). All losses are written against the prox centre

    log C(y) = (1 - r) log mu(y) + r log ref(y)

where mu is the last iterate (the sampling policy) and ref the anchor that COMAL advances every K iterations.
With r = 0 the centre is mu (iterative self-play), and passing OpenRLHF's reference log-probs as mu makes ``dpo``
and ``ipo`` exactly OpenRLHF's DPOLoss (tests/test_losses.py). Inputs are per-pair sequence log-probs;
h = Delta_pi - Delta_C with Delta_X = log X(y_w) - log X(y_l).
"""

import math

import torch
import torch.nn.functional as F

PROX_LOSSES = ("ipo", "dpo", "sppo", "rebel")
NEEDS_WIN_RATES = {"sppo", "rebel"}


def prox_centre(mu: torch.Tensor, ref: torch.Tensor, r: float) -> torch.Tensor:
    """log C = (1 - r) log mu + r log ref, the prox centre, on log-prob tensors.

    C is a geometric mixture and is unnormalised when r > 0 and mu != ref; the pair losses only see differences,
    so the missing log-partition cancels for them (not for sppo).
    """
    return (1 - r) * mu + r * ref


def ipo_loss(h: torch.Tensor, beta: float, soft_label: torch.Tensor | None = None) -> torch.Tensor:
    """IPO prox loss (Azar et al., arXiv 2310.12036, Eq. 17, with the prox centre as reference; INPO's loss).

    hard: (h - c)^2,  c = 1/(2 beta)
    soft: p (h - c)^2 + (1 - p)(h + c)^2,  p = soft_label = P(y_w > y_l)

    The soft form is the expectation of the hard form over the label, so both have the same minimiser; with pairs
    y, y' ~ mu it is the exact inner step for any preference P. Returns the per-pair loss (no reduction).
    """
    c = 1 / (2 * beta)
    if soft_label is None:
        return (h - c) ** 2
    return soft_label * (h - c) ** 2 + (1 - soft_label) * (h + c) ** 2


def dpo_loss(
    h: torch.Tensor, beta: float, label_smoothing: float = 0.0, soft_label: torch.Tensor | None = None
) -> torch.Tensor:
    """DPO prox loss (Rafailov et al., arXiv 2305.18290, Eq. 7; label smoothing as in OpenRLHF's DPOLoss).

    hard: -(1 - ls) log sigmoid(beta h) - ls log sigmoid(-beta h)
    soft: -p log sigmoid(beta h) - (1 - p) log sigmoid(-beta h),  p = soft_label (label_smoothing is then unused)

    Not an exact prox of the win rate: under Bradley-Terry P = sigmoid(r_i - r_j) the minimiser is C exp(r/beta),
    the prox of the reward. Returns the per-pair loss (no reduction).
    """
    p = 1 - label_smoothing if soft_label is None else soft_label
    return -p * F.logsigmoid(beta * h) - (1 - p) * F.logsigmoid(-beta * h)


def sppo_loss(
    logratio_w: torch.Tensor, logratio_l: torch.Tensor, p_w: torch.Tensor, p_l: torch.Tensor, beta: float
) -> torch.Tensor:
    """SPPO prox loss (Wu et al., arXiv 2405.00675, self-play preference optimisation).

    1/2 [(lr_w - (p_w - 1/2)/beta)^2 + (lr_l - (p_l - 1/2)/beta)^2],  lr_w = log pi(y_w) - log C(y_w) (``logratio_w``),
    lr_l likewise,

    p_w, p_l = win rates P(y > mu). It regresses log pi/C itself, so it assumes a zero log-partition: approximate,
    with an error that shrinks as beta grows when r = 0, and a floor when r > 0 (C unnormalised). Per pair.
    """
    return 0.5 * ((logratio_w - (p_w - 0.5) / beta) ** 2 + (logratio_l - (p_l - 0.5) / beta) ** 2)


def rebel_loss(h: torch.Tensor, p_w: torch.Tensor, p_l: torch.Tensor, beta: float) -> torch.Tensor:
    """REBEL prox loss (Gao et al., arXiv 2404.16767, regression of relative rewards).

    (h - (p_w - p_l)/beta)^2,  p_w, p_l = win rates P(y > mu).

    Exact prox step: the target is a difference of a per-response score, so the log-partition cancels. Per pair.
    """
    return (h - (p_w - p_l) / beta) ** 2


class ProxLoss(torch.nn.Module):
    """The COMAL prox loss on a micro-batch of an iteration record (comal_openrlhf.core.record.PairBatch).

    ``kind`` is one of PROX_LOSSES, ``beta`` = 1/eta (settable between rounds by a beta schedule), ``ref_weight``
    = r = eta*tau in [0, 1). ``forward(pi_w, pi_l, batch)`` takes the policy's sequence log-probs of the chosen and
    rejected responses and the batch's cached log mu_k, log ref, win rates, soft labels and weights, and returns
    (loss, chosen_reward, rejected_reward) with the rewards beta * (log pi - log C) of each side, i.e. OpenRLHF's DPO
    rewards with the prox centre as the reference (openrlhf/models/loss.py DPOLoss).

    The label of a pair is decided in one place: its soft label P(y_w > y_l) when it has one (not NaN), else a hard
    "y_w wins", which the dpo loss smooths to 1 - ``label_smoothing`` as OpenRLHF's DPOLoss does (OpenRLHF's IPO
    ignores label smoothing, and so does ``ipo`` here). sppo and rebel read the win rates instead.

    Reduction: sum_i w_i l_i / ``reduction_size`` (default: the batch size). The record's weights have mean 1 over
    the iteration, so passing the nominal micro-batch size makes every optimizer step follow the gradient of the
    iteration's weighted mean, however the pairs are split into micro-batches and ranks.
    """

    def __init__(self, kind: str, beta: float, ref_weight: float = 0.0, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if kind not in PROX_LOSSES:
            raise ValueError(f"unknown prox loss {kind!r}; choose one of {', '.join(PROX_LOSSES)}")
        if not 0.0 <= ref_weight < 1.0:
            raise ValueError(f"ref_weight r = eta*tau must lie in [0, 1), got {ref_weight}")
        if not 0.0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")
        self.kind = kind
        self.beta = beta
        self.ref_weight = ref_weight
        self.label_smoothing = label_smoothing

    @property
    def beta(self) -> float:
        return self._beta

    @beta.setter
    def beta(self, value: float) -> None:
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"beta must be a finite number > 0, got {value}")
        self._beta = float(value)

    def labels(self, soft_label: torch.Tensor) -> torch.Tensor:
        """P(y_w beats y_l) per pair: the soft label where given, else the hard label (smoothed for dpo)."""
        hard = 1.0 - self.label_smoothing if self.kind == "dpo" else 1.0
        return torch.where(torch.isnan(soft_label), torch.full_like(soft_label, hard), soft_label)

    def forward(
        self, pi_w: torch.Tensor, pi_l: torch.Tensor, batch, reduction_size: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        beta, r = self.beta, self.ref_weight
        # log pi - log C of each side; h is their difference, the margin the pair losses act on
        logratio_w = pi_w - prox_centre(batch.logp_mu_chosen, batch.logp_ref_chosen, r)
        logratio_l = pi_l - prox_centre(batch.logp_mu_rejected, batch.logp_ref_rejected, r)
        h = logratio_w - logratio_l
        if self.kind == "ipo":
            losses = ipo_loss(h, beta, self.labels(batch.soft_label))
        elif self.kind == "dpo":
            losses = dpo_loss(h, beta, soft_label=self.labels(batch.soft_label))
        else:
            p_w, p_l = batch.chosen_winrate, batch.rejected_winrate
            if torch.isnan(p_w).any() or torch.isnan(p_l).any():
                raise ValueError(f"prox loss {self.kind!r} needs the win rates of both responses of every pair")
            if self.kind == "sppo":
                losses = sppo_loss(logratio_w, logratio_l, p_w, p_l, beta)
            else:
                losses = rebel_loss(h, p_w, p_l, beta)
        n = len(losses) if reduction_size is None else reduction_size
        loss = (losses * batch.weight.to(losses.dtype)).sum() / n
        return loss, beta * logratio_w.detach(), beta * logratio_l.detach()
