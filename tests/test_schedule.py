"""Presets, overrides, rounds and the beta schedule of the COMAL outer loop (comal_openrlhf.schedule)."""

import pytest

from comal_openrlhf.schedule import parse_beta_schedule, resolve_plan


def test_presets_set_loss_r_and_k():
    assert (lambda p: (p.prox, p.ref_weight, p.ref_update_interval))(resolve_plan("comal")) == ("ipo", 1 / 3, 12)
    assert (lambda p: (p.prox, p.ref_weight, p.ref_update_interval))(resolve_plan("inpo")) == ("ipo", 1 / 3, 0)
    assert resolve_plan("iter-dpo").prox == "dpo" and resolve_plan("iter-dpo").ref_weight == 0
    assert resolve_plan("sppo").prox == "sppo"


def test_unchanged_dpo_and_ipo_launches_keep_their_meaning():
    assert resolve_plan(None).algo == "iter-dpo" and resolve_plan(None).prox == "dpo"
    assert resolve_plan(None, ipo_enable=True).prox == "ipo"
    with pytest.raises(ValueError, match="ipo_enable"):
        resolve_plan("iter-dpo", ipo_enable=True)
    assert resolve_plan("iter-dpo", prox="ipo", ipo_enable=True).prox == "ipo"


def test_explicit_flags_override_the_preset():
    p = resolve_plan("comal", prox="rebel", ref_weight=0.5, ref_update_interval=3, iterations=7)
    assert (p.prox, p.ref_weight, p.ref_update_interval, p.iterations) == ("rebel", 0.5, 3, 7)
    assert resolve_plan("comal", default_iterations=5).iterations == 5
    assert resolve_plan("comal").iterations == 24


def test_rounds_advances_and_beta_schedule():
    # paper v2: 18 iterations in 3 rounds of 6, beta 0.002 in round 1 then 0.1
    p = resolve_plan("comal", ref_update_interval=6, iterations=18, beta_schedule="0.002,0.1")
    assert [p.advance_after(k) for k in range(18)] == [k in (5, 11, 17) for k in range(18)]
    assert [p.round_of(k) for k in (0, 5, 6, 11, 12, 17)] == [0, 0, 1, 1, 2, 2]
    assert [p.beta_at(k) for k in (0, 5, 6, 17)] == [0.002, 0.002, 0.1, 0.1]
    inpo = resolve_plan("inpo", iterations=5)
    assert not any(inpo.advance_after(k) for k in range(5)) and inpo.beta_at(4) == 0.1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(algo="nash"), "--comal.algo"),
        (dict(algo="comal", prox="kto"), "--comal.prox"),
        (dict(algo="comal", ref_weight=1.0), "ref_weight"),
        (dict(algo="comal", ref_update_interval=-1), "ref_update_interval"),
        (dict(algo="comal", iterations=0), "iterations"),
        (dict(algo="comal", beta=0.0), "beta"),
    ],
)
def test_bad_settings_name_the_flag(kwargs, match):
    with pytest.raises(ValueError, match=match):
        resolve_plan(**kwargs)


def test_beta_schedule_parsing():
    assert parse_beta_schedule("0.002, 0.1") == (0.002, 0.1)
    assert parse_beta_schedule(None) == ()
    for bad in ("a,b", "0.1,-1"):
        with pytest.raises(ValueError, match="beta_schedule"):
            parse_beta_schedule(bad)
