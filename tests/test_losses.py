"""Prox losses (comal_openrlhf/losses.py): hand-computed values, reductions to the hard forms
and to OpenRLHF's DPOLoss, and the population minimiser of the ipo loss = the closed-form prox step."""

import math

import numpy as np
import pytest
import torch

from comal_openrlhf.core.losses import (
    NEEDS_WIN_RATES,
    PROX_LOSSES,
    ProxLoss,
    dpo_loss,
    ipo_loss,
    prox_centre,
    rebel_loss,
    sppo_loss,
)
from comal_openrlhf.core.record import PairBatch

T = lambda *x: torch.tensor(x, dtype=torch.float64)


def B(mu_w, mu_l, ref_w, ref_l, p_w=None, p_l=None, soft_label=None, weight=None):
    """A PairBatch from explicit tensors; unknown win rates and hard labels are NaN, weights 1."""
    nan = torch.full_like(mu_w, float("nan"))
    return PairBatch(
        chosen_winrate=nan if p_w is None else p_w,
        rejected_winrate=nan if p_l is None else p_l,
        soft_label=nan if soft_label is None else soft_label,
        weight=torch.ones_like(mu_w) if weight is None else weight,
        logp_mu_chosen=mu_w,
        logp_mu_rejected=mu_l,
        logp_ref_chosen=ref_w,
        logp_ref_rejected=ref_l,
    )


def test_prox_centre_by_hand():
    # (1 - 0.25) * (-1) + 0.25 * (-3) = -0.75 - 0.75 = -1.5
    assert prox_centre(T(-1.0), T(-3.0), 0.25).item() == pytest.approx(-1.5)
    # r = 0 is the last iterate itself
    assert prox_centre(T(-1.0), T(-3.0), 0.0).item() == -1.0


def test_ipo_by_hand():
    # beta = 1: c = 1/2, h = 1/2 -> (1/2 - 1/2)^2 = 0
    assert ipo_loss(T(0.5), 1.0).item() == 0.0
    # beta = 1/4: c = 2, h = 1 -> (1 - 2)^2 = 1
    assert ipo_loss(T(1.0), 0.25).item() == pytest.approx(1.0)
    # soft p = 3/4: 3/4 (1 - 2)^2 + 1/4 (1 + 2)^2 = 0.75 + 2.25 = 3
    assert ipo_loss(T(1.0), 0.25, soft_label=T(0.75)).item() == pytest.approx(3.0)


def test_dpo_by_hand():
    # h = 0: -log sigmoid(0) = log 2, whatever the smoothing
    assert dpo_loss(T(0.0), 3.0, label_smoothing=0.2).item() == pytest.approx(math.log(2))
    # beta h = log 3: sigmoid = 3/4, sigmoid(-) = 1/4 -> -log(3/4) = log(4/3)
    beta = 0.5
    h = T(math.log(3) / beta)
    assert dpo_loss(h, beta).item() == pytest.approx(math.log(4 / 3))
    # ls = 0.1: 0.9 log(4/3) + 0.1 log 4
    assert dpo_loss(h, beta, label_smoothing=0.1).item() == pytest.approx(0.9 * math.log(4 / 3) + 0.1 * math.log(4))
    # soft p = 1/4: 0.25 log(4/3) + 0.75 log 4
    assert dpo_loss(h, beta, soft_label=T(0.25)).item() == pytest.approx(0.25 * math.log(4 / 3) + 0.75 * math.log(4))


def test_sppo_by_hand():
    # beta = 2: targets (0.9 - 0.5)/2 = 0.2 and (0.3 - 0.5)/2 = -0.1
    # 1/2 [(0.3 - 0.2)^2 + (-0.1 + 0.1)^2] = 1/2 * 0.01 = 0.005
    assert sppo_loss(T(0.3), T(-0.1), T(0.9), T(0.3), 2.0).item() == pytest.approx(0.005)


def test_rebel_by_hand():
    # beta = 2: target (0.8 - 0.2)/2 = 0.3; (0.5 - 0.3)^2 = 0.04
    assert rebel_loss(T(0.5), T(0.8), T(0.2), 2.0).item() == pytest.approx(0.04)


def test_prox_loss_by_hand():
    # beta = 1/2 (c = 1), r = 1/2. log C_w = (-1 - 3)/2 = -2, log C_l = (-1 - 1)/2 = -1
    # rw = -1 - (-2) = 1, rl = -2 - (-1) = -1, h = 2 -> (2 - 1)^2 = 1; rewards beta*r = 0.5, -0.5
    loss, cr, rr = ProxLoss("ipo", beta=0.5, ref_weight=0.5)(T(-1.0), T(-2.0), B(T(-1.0), T(-1.0), T(-3.0), T(-1.0)))
    assert loss.item() == pytest.approx(1.0)
    assert cr.item() == pytest.approx(0.5) and rr.item() == pytest.approx(-0.5)
    # two pairs, h = 2 and h = 3 (losses 1 and 4), weights 1.5 and 0.5 (mean 1, as a record holds them):
    # sum w l / n = (1.5*1 + 0.5*4) / 2 = 1.75; with reduction_size 4 (a nominal micro-batch of 4): 3.5 / 4
    z = T(0.0, 0.0)
    loss, _, _ = ProxLoss("ipo", beta=0.5)(T(2.0, 3.0), z, B(z, z, z, z, weight=T(1.5, 0.5)))
    assert loss.item() == pytest.approx(1.75)
    loss, _, _ = ProxLoss("ipo", beta=0.5)(T(2.0, 3.0), z, B(z, z, z, z, weight=T(1.5, 0.5)), reduction_size=4)
    assert loss.item() == pytest.approx(0.875)


def test_one_rule_for_the_label_soft_else_smoothed_hard():
    # dpo, beta = 1, h = 1: hard label with smoothing 0.2 is the soft label 0.8:
    #   -0.8 log sigmoid(1) - 0.2 log sigmoid(-1) = 0.8 * 0.313262 + 0.2 * 1.313262 = 0.513262
    z, one = T(0.0), T(1.0)
    loss_fn = ProxLoss("dpo", beta=1.0, label_smoothing=0.2)
    hard = loss_fn(one, z, B(z, z, z, z))[0]
    assert hard.item() == pytest.approx(0.8 * 0.3132617 + 0.2 * 1.3132617, abs=1e-6)
    # an explicit soft label wins over smoothing: soft 1.0 -> -log sigmoid(1) = 0.313262
    assert loss_fn(one, z, B(z, z, z, z, soft_label=T(1.0)))[0].item() == pytest.approx(0.3132617, abs=1e-6)
    # ipo ignores label smoothing, as OpenRLHF's IPO does: (1 - 1/2)^2 = 0.25
    assert ProxLoss("ipo", beta=1.0, label_smoothing=0.2)(one, z, B(z, z, z, z))[0].item() == pytest.approx(0.25)


def test_soft_labels_at_0_and_1_are_the_hard_forms():
    h = torch.linspace(-2, 2, 9, dtype=torch.float64)
    one, zero = torch.ones_like(h), torch.zeros_like(h)
    for beta in (0.1, 1.0, 3.0):
        torch.testing.assert_close(ipo_loss(h, beta, soft_label=one), ipo_loss(h, beta))
        torch.testing.assert_close(ipo_loss(h, beta, soft_label=zero), ipo_loss(-h, beta))  # label flips the pair
        torch.testing.assert_close(dpo_loss(h, beta, soft_label=one), dpo_loss(h, beta))
        torch.testing.assert_close(dpo_loss(h, beta, soft_label=zero), dpo_loss(-h, beta))
        # label smoothing ls is the soft label 1 - ls
        torch.testing.assert_close(dpo_loss(h, beta, soft_label=0.8 * one), dpo_loss(h, beta, label_smoothing=0.2))


@pytest.mark.parametrize("kind", PROX_LOSSES)
def test_r0_centre_is_mu(kind):
    g = torch.Generator().manual_seed(0)
    pi_w, pi_l, mu_w, mu_l, ref_w, ref_l = (-5 * torch.rand(8, generator=g, dtype=torch.float64) for _ in range(6))
    p_w, p_l = (torch.rand(8, generator=g, dtype=torch.float64) for _ in range(2))
    wins = {"p_w": p_w, "p_l": p_l}
    base = ProxLoss(kind, beta=0.7, ref_weight=0.0)(pi_w, pi_l, B(mu_w, mu_l, ref_w, ref_l, **wins))
    other_ref = ProxLoss(kind, beta=0.7, ref_weight=0.0)(pi_w, pi_l, B(mu_w, mu_l, ref_w - 3, ref_l + 1, **wins))
    ref_is_mu = ProxLoss(kind, beta=0.7, ref_weight=0.4)(pi_w, pi_l, B(mu_w, mu_l, mu_w, mu_l, **wins))
    for a, b in zip(base, other_ref):
        torch.testing.assert_close(a, b)
    for a, b in zip(base, ref_is_mu):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind,ls", [("dpo", 0.0), ("dpo", 0.1), ("ipo", 0.0)])
def test_matches_openrlhf_dpoloss(kind, ls):
    """r = 0 with mu := OpenRLHF's reference log-probs is OpenRLHF's DPOLoss (loss and both rewards)."""
    import comal_openrlhf.cpu_runtime as rt

    rt.apply()
    from openrlhf.models.loss import DPOLoss

    g = torch.Generator().manual_seed(1)
    pc, pr, rc, rr = (-20 * torch.rand(16, generator=g) for _ in range(4))
    ours = ProxLoss(kind, beta=0.1, ref_weight=0.0, label_smoothing=ls)(pc, pr, B(rc, rr, rc - 7, rr + 7))
    theirs = DPOLoss(0.1, label_smoothing=ls, ipo=kind == "ipo")(pc, pr, rc, rr)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def test_beta_is_settable_and_validated():
    loss = ProxLoss("ipo", beta=1.0)
    z = T(0.0)
    assert loss(z, z, B(z, z, z, z))[0].item() == pytest.approx(0.25)  # (0 - 1/2)^2
    loss.beta = 0.5
    assert loss(z, z, B(z, z, z, z))[0].item() == pytest.approx(1.0)  # (0 - 1)^2
    for bad in (0.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="beta"):
            loss.beta = bad


def test_errors():
    with pytest.raises(ValueError, match="unknown prox loss"):
        ProxLoss("kto", beta=1.0)
    for r in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=r"\[0, 1\)"):
            ProxLoss("ipo", beta=1.0, ref_weight=r)
    with pytest.raises(ValueError, match="beta"):
        ProxLoss("ipo", beta=-1.0)
    z = T(0.0)
    for kind in sorted(NEEDS_WIN_RATES):
        with pytest.raises(ValueError, match="win rates"):
            ProxLoss(kind, beta=1.0)(z, z, B(z, z, z, z, p_w=z))


def test_gradient_reaches_only_the_policy():
    pi = T(-1.0, -2.0).requires_grad_(True)
    mu = T(-1.5, -1.5).requires_grad_(True)
    loss, cr, _ = ProxLoss("ipo", beta=1.0, ref_weight=0.3)(pi[:1], pi[1:], B(mu[:1], mu[1:], T(-1.0), T(-1.0)))
    loss.backward()
    assert pi.grad is not None and not cr.requires_grad
    # d/d pi_w (h - c)^2 = 2 (h - c), h = -1 - (-2) = 1, c = 1/2 -> 1; and -1 for pi_l
    torch.testing.assert_close(pi.grad, T(1.0, -1.0))


def test_ipo_population_minimiser_is_the_closed_form_step():
    """Exact pair expectation over mu x mu with soft labels from P: argmin = mu^(1-r) ref^r exp(eta P mu)."""
    from comal_openrlhf.core.game import loss_step, paper_game

    P, _ = paper_game()
    mu, ref = np.array([0.6, 0.3, 0.1]), np.array([0.2, 0.3, 0.5])
    for eta, tau in [(1.0, 0.1), (0.5, 0.0), (2.0, 0.3)]:
        r = eta * tau
        target = mu ** (1 - r) * ref**r * np.exp(eta * P @ mu)
        target /= target.sum()
        got = np.exp(loss_step(P, np.log(mu), np.log(ref), eta, tau, prox="ipo"))
        np.testing.assert_allclose(got, target, atol=1e-9)
