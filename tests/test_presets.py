"""A preset is the official recipe: a bare ``--comal.algo`` launch fills every training flag the user did not pass
with the official COMAL pipeline's value and, for an online source, counts --train.batch_size in prompts; explicit
flags win; a launch without ``--comal.algo`` keeps OpenRLHF's defaults; sampling other than T = 1 / top-p = 1 says the
guarantee does not hold."""

import pytest
from _util import write_jsonl

from comal_openrlhf.cli.train_comal import OFFICIAL_TRAINING, parse_args, sampling_note
from comal_openrlhf.core.schedule import PRESETS


@pytest.fixture
def base(tmp_path, tiny_model):
    pairs = tmp_path / "pairs"
    pairs.mkdir()
    write_jsonl(pairs / "iter_000.jsonl", [{"prompt": "q ?", "chosen": "a", "rejected": "b"}])
    return ["--model.model_name_or_path", tiny_model, "--comal.pairs_dir", str(pairs)]


def _value(args, flag):
    node = args
    for part in flag.split("."):
        node = getattr(node, part)
    return tuple(node) if isinstance(node, list) else node


@pytest.mark.parametrize("algo", sorted(PRESETS))
def test_a_bare_preset_launch_trains_the_official_recipe(base, algo):
    args = parse_args(base + ["--comal.algo", algo])
    got = {flag: _value(args, flag) for flag in OFFICIAL_TRAINING}
    assert got == OFFICIAL_TRAINING
    # the values the issue lists, spelled out (lr 5e-7, 3 epochs, batch 32, no clipping, betas, linear + 10% warm-up)
    assert (args.adam.lr, args.train.max_epochs, args.train.batch_size, args.max_norm) == (5e-7, 3, 32, 0.0)
    assert (tuple(args.adam.betas), args.lr_scheduler, args.lr_warmup_ratio, args.adam.weight_decay) == (
        (0.9, 0.999),
        "linear",
        0.1,
        0.01,
    )
    assert args.comal.batch_unit == "pairs" and "adam.lr" in args.preset_filled  # offline files: pairs as given
    online = ["--judge.kind", "table", "--judge.table", "paper", "--comal.source", "online"]
    assert parse_args(base + ["--comal.algo", algo] + online).comal.batch_unit == "prompts"


def test_explicit_flags_win_over_the_preset(base):
    args = parse_args(base + ["--comal.algo", "comal", "--adam.lr", "1e-6", "--train.batch_size", "64"])
    assert args.adam.lr == 1e-6 and args.train.batch_size == 64 and args.train.max_epochs == 3
    assert "adam.lr" not in args.preset_filled and "train.max_epochs" in args.preset_filled
    args = parse_args(base + ["--comal.algo", "comal", "--comal.batch_unit", "prompts"])
    assert args.comal.batch_unit == "prompts"


def test_without_a_preset_a_train_dpo_launch_keeps_openrlhf_defaults(base):
    args = parse_args(base)
    assert (args.adam.lr, args.train.max_epochs, args.train.batch_size, args.max_norm) == (1e-5, 1, 128, 1.0)
    assert tuple(args.adam.betas) == (0.9, 0.95) and args.adam.weight_decay == 0.0
    assert args.comal.batch_unit == "pairs" and not args.preset_filled


def test_iter_dpo_builds_the_official_baselines_top2_pairs():
    assert PRESETS["iter-dpo"]["pair_rule"] == "top2"


def test_online_sampling_defaults_draw_from_mu_k_and_a_mismatch_says_so(base):
    args = parse_args(base + ["--comal.algo", "comal"])
    assert (args.rollout.temperature, args.rollout.top_p) == (1.0, 1.0) and sampling_note(args) is None
    for extra in (["--rollout.temperature", "0.8"], ["--rollout.top_p", "0.95"]):
        note = sampling_note(parse_args(base + extra))
        assert note.startswith("[comal] note:") and "guarantee does not hold" in note and "\n" not in note
