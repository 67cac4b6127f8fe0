"""Presets, overrides, rounds and the beta schedule of the COMAL outer loop (comal_openrlhf.core.schedule)."""

import math

import pytest

from comal_openrlhf.core.schedule import parse_beta_schedule, resolve_plan
from comal_openrlhf.errors import PlanError


def plan(*args, **kwargs):
    return resolve_plan(*args, **kwargs)[0]


def test_presets_set_loss_r_k_beta_and_pair_rule():
    p, src = resolve_plan("comal")
    assert (p.prox, p.ref_weight, p.ref_update_interval, p.betas, p.pair_rule) == (
        "ipo",
        1 / 3,
        12,
        (0.002,),
        "all_soft",
    )
    assert src["beta"] == "preset" and src["ref_weight"] == "preset" and src["iterations"] == "default"
    assert (lambda q: (q.prox, q.ref_weight, q.ref_update_interval))(plan("inpo")) == ("ipo", 1 / 3, 0)
    assert plan("iter-dpo").prox == "dpo" and plan("iter-dpo").ref_weight == 0
    assert plan("iter-dpo").betas == (0.1,)  # DPO keeps OpenRLHF's beta
    assert plan("sppo").prox == "sppo"


def test_unchanged_dpo_and_ipo_launches_keep_openrlhf_defaults():
    p, src = resolve_plan(None)
    assert (p.algo, p.prox, p.betas) == ("iter-dpo", "dpo", (0.1,)) and src["beta"] == "OpenRLHF default"
    p = plan(None, ipo_enable=True)
    assert p.prox == "ipo" and p.betas == (0.1,)  # no preset beta without --comal.algo
    with pytest.raises(PlanError, match="ipo_enable"):
        resolve_plan("iter-dpo", ipo_enable=True)
    with pytest.raises(PlanError, match="ipo_enable.*--comal.prox"):
        resolve_plan("comal", prox="dpo", ipo_enable=True)
    assert plan("iter-dpo", prox="ipo", ipo_enable=True).prox == "ipo"


def test_explicit_flags_override_the_preset():
    p, src = resolve_plan("comal", prox="rebel", ref_weight=0.5, ref_update_interval=3, iterations=7, beta=0.05)
    assert (p.prox, p.ref_weight, p.ref_update_interval, p.iterations, p.betas) == ("rebel", 0.5, 3, 7, (0.05,))
    assert all(src[k] == "flag" for k in ("prox", "ref_weight", "ref_update_interval", "iterations", "beta"))
    assert plan("comal", default_iterations=5).iterations == 5
    assert plan("comal").iterations == 24
    assert plan("comal", pair_rule="top2").pair_rule == "top2"


def test_rounds_advances_and_beta_schedule():
    # paper v2: 18 iterations in 3 rounds of 6, beta 0.002 in round 1 then 0.1
    p = plan("comal", ref_update_interval=6, iterations=18, beta_schedule="0.002,0.1")
    assert [p.advance_after(k) for k in range(18)] == [k in (5, 11, 17) for k in range(18)]
    assert [p.round_of(k) for k in (0, 5, 6, 11, 12, 17)] == [0, 0, 1, 1, 2, 2]
    assert [p.beta_at(k) for k in (0, 5, 6, 17)] == [0.002, 0.002, 0.1, 0.1]
    # rounds of their own length: COMAL's anchor every 12, beta rounds of 6 (the paper's Llama data rounds)
    p = plan("comal", iterations=18, round_length=6, beta_schedule="0.002,0.1")
    assert p.ref_update_interval == 12 and [p.beta_at(k) for k in (5, 6, 12)] == [0.002, 0.1, 0.1]
    # inpo never advances: a schedule needs explicit rounds, else it could never apply
    with pytest.raises(PlanError, match="never apply.*round_length"):
        resolve_plan("inpo", iterations=24, beta_schedule="0.002,0.1")
    p = plan("inpo", iterations=24, beta_schedule="0.002,0.1", round_length=12)
    assert not any(p.advance_after(k) for k in range(24)) and (p.beta_at(11), p.beta_at(12)) == (0.002, 0.1)
    with pytest.raises(PlanError, match="3 betas.*2 round"):
        resolve_plan("comal", iterations=24, beta_schedule="0.002,0.1,0.2")
    with pytest.raises(PlanError, match="disagree"):
        resolve_plan("comal", beta=0.01, beta_schedule="0.002,0.1")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(algo="nash"), "--comal.algo"),
        (dict(algo="comal", prox="kto"), "--comal.prox"),
        (dict(algo="comal", ref_weight=1.0), "ref_weight"),
        (dict(algo="comal", ref_weight=math.nan), "ref_weight"),
        (dict(algo="comal", ref_update_interval=-1), "ref_update_interval"),
        (dict(algo="comal", iterations=0), "iterations"),
        (dict(algo="comal", beta=0.0), "beta"),
        (dict(algo="comal", beta=math.inf), "beta"),
        (dict(algo="comal", beta=math.nan), "beta"),
        (dict(algo="comal", round_length=0), "round_length"),
    ],
)
def test_bad_settings_name_the_flag(kwargs, match):
    with pytest.raises(PlanError, match=match):
        resolve_plan(**kwargs)


def test_beta_schedule_parsing():
    assert parse_beta_schedule("0.002, 0.1") == (0.002, 0.1)
    assert parse_beta_schedule(None) == ()
    for bad in ("a,b", "0.1,-1", "0.1,inf", "nan"):
        with pytest.raises(PlanError, match="beta_schedule"):
            parse_beta_schedule(bad)
