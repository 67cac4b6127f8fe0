"""In-process unit tests of the trainer's parts: the iteration record, the precompute stage, one prox training stage
and the reference advance under ZeRO-3 on one process (fp32, so the comparisons hold to float rounding)."""

import math

import pytest
import torch
from test_train_comal import make_pairs_dir

from comal_openrlhf.core.pairs import Pair
from comal_openrlhf.core.record import IterationRecord, weights_normalised

ROWS = [
    {"prompt": "question pick one ?", "chosen": "yes good", "rejected": "no bad"},
    {"prompt": "question pick two ?", "chosen": "one", "rejected": "two three"},
]


def test_record_round_trip_and_weights():
    pairs = [
        Pair("p", "a", "b", chosen_winrate=0.7, rejected_winrate=0.2, weight=3.0),
        Pair("p", "a", "c", soft_label=0.6, weight=1.0, origin="f:2"),
    ]
    record = IterationRecord.from_pairs(pairs)
    # weights scaled to mean 1 over the iteration: 3, 1 -> 1.5, 0.5
    assert (
        record.weight.tolist() == [1.5, 0.5]
        and math.isnan(record.soft_label[0])
        and record.soft_label[1].item() == pytest.approx(0.6)
    )
    with pytest.raises(RuntimeError, match="precompute"):
        record.batch(torch.tensor([0]))
    filled = record.with_logps(*(torch.tensor([-1.0, -2.0]) * (i + 1) for i in range(4)))
    assert not record.has_logps and filled.has_logps  # a new record; the source's is untouched
    again = IterationRecord.from_state_dict(filled.state_dict())
    assert again.pairs == filled.pairs
    for name in ("weight", "logp_mu_chosen", "logp_ref_rejected"):
        assert torch.equal(getattr(again, name), getattr(filled, name))
    batch = again.batch(torch.tensor([1]))
    assert batch.logp_mu_rejected.tolist() == [-4.0] and batch.weight.tolist() == [0.5]
    with pytest.raises(ValueError, match="non-finite"):
        record.with_logps(*(torch.tensor([0.0, float("nan")]) for _ in range(4)))
    with pytest.raises(ValueError, match="weights"):
        weights_normalised(torch.tensor([0.0, 0.0]))


def build_in_process_trainer(tmp, tiny_model, *extra):
    """A COMALTrainer built by train_comal's own parse_args and build_trainer in-process: two iterations of offline
    pairs, ZeRO-3, fp32, an advance after each iteration, no iteration checkpoints; extra flags are appended."""
    from comal_openrlhf import cpu_runtime

    cpu_runtime.apply()  # before OpenRLHF's first import: it patches what breaks on a CPU-only machine
    from openrlhf.utils import get_strategy

    from comal_openrlhf.cli.train_comal import build_trainer, parse_args
    from comal_openrlhf.rundir import RunDirectory

    pairs = make_pairs_dir(tmp / "pairs", 2, rows=ROWS * 2)
    argv = ["--model.model_name_or_path", tiny_model, "--comal.pairs_dir", pairs, "--comal.algo", "comal"]
    argv += ["--comal.ref_update_interval", "1", "--model.beta", "1.0", "--ds.zero_stage", "3"]
    argv += ["--ds.param_dtype", "fp32", "--train.micro_batch_size", "2", "--train.batch_size", "2"]
    argv += ["--adam.lr", "1e-2", "--lr_scheduler", "constant", "--lr_warmup_ratio", "0", "--data.prompt_key"]
    argv += ["prompt", "--data.max_len", "32", "--comal.logps_kernel", "torch", "--adam.weight_decay", "0"]
    argv += ["--ckpt.output_dir", str(tmp / "final"), "--ckpt.path", str(tmp / "ckpt"), "--comal.no_iteration_ckpt"]
    args = parse_args(argv + [str(x) for x in extra])
    strategy = get_strategy(args)
    strategy.setup_distributed()
    return build_trainer(args, strategy, RunDirectory(args.ckpt.path, args.ckpt.output_dir))


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("unit")
    return build_in_process_trainer(tmp, tiny_model, "--train.max_epochs", 4, "--comal.batch_unit", "pairs")


def _hf_sequence_logps(path, pair):
    """log p(response + EOS | prompt) with a plain HF model in fp32: an independent reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    n_prompt = len(tok(pair.prompt, add_special_tokens=False)["input_ids"])
    for response in (pair.chosen, pair.rejected):
        ids = tok(pair.prompt + response + " " + tok.eos_token, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            logp = torch.log_softmax(model(**ids).logits[0, :-1].double(), -1)
        tokens = ids["input_ids"][0, 1:]
        out.append(logp[torch.arange(len(tokens)), tokens][n_prompt - 1 :].sum().item())
    return out


@pytest.fixture(scope="module")
def record(trainer):
    pairs, stats = trainer.collect_pairs(0)
    return trainer.precompute(0, pairs, stats)


def test_precompute_fills_the_record_with_mu_and_anchor_logps(record, tiny_model):
    assert len(record) == 4 and record.has_logps
    # at the start mu_0 == anchor == the saved model
    assert torch.equal(record.logp_mu_chosen, record.logp_ref_chosen)
    expected = _hf_sequence_logps(tiny_model, record.pairs[0])
    got = [record.logp_mu_chosen[0].item(), record.logp_mu_rejected[0].item()]
    # fp32 log-softmax over a 50-word vocabulary, summed over <= 4 tokens: about 1e-6 of error
    assert got == pytest.approx(expected, abs=1e-4)


def test_one_prox_stage_moves_the_margin_towards_the_ipo_target(trainer, record):
    logs = trainer.train(0, record)
    assert logs["steps"] == 4 * 2 and logs["optimizer_steps_in_state"] == 8
    from comal_openrlhf.training.logps import pair_logps

    batch = next(iter(trainer._loader(trainer._dataset(record.pairs), shuffle=False)))
    with torch.no_grad():
        pi_w, pi_l, _ = pair_logps(trainer.model, batch, trainer.tokenizer.pad_token_id, "torch")
    pb = record.batch(batch[-1])
    h = (pi_w - pi_l) - (pb.logp_mu_chosen - pb.logp_mu_rejected)  # r plays no role: mu_0 == anchor here
    # the ipo target margin is 1/(2 beta) = 0.5: 8 Adam steps of lr 1e-2 move h from 0 towards it
    assert (h > 0.05).all() and (h < 1.0).all(), h


def test_advance_under_zero3_copies_every_parameter(trainer, record):
    from comal_openrlhf.weights import state_dict_on_rank0

    advanced, err = trainer.advance_if_due(0, record)
    assert advanced and err == 0.0 and trainer.anchor_version == 1
    policy, anchor = state_dict_on_rank0(trainer.model), state_dict_on_rank0(trainer.ref_model)
    assert policy.keys() == anchor.keys() and len(policy) > 10
    assert all(torch.equal(policy[k], anchor[k]) for k in policy)


def test_batch_unit_prompts_makes_the_steps_of_one_pair_per_prompt(trainer, record):
    # 4 pairs of 2 prompts, --train.batch_size 2, 4 epochs: counted in prompts an iteration makes
    # ceil(4 * 2 / 2) = 4 optimizer steps of 2 micro-batches (the 2 pairs of each prompt) where one pair per prompt
    # (top2) would make the same 4; counted in pairs it makes 8 (the test above)
    from dataclasses import replace

    saved = trainer.settings
    trainer.settings = replace(saved, batch_unit="prompts")
    try:
        trainer.micro_step = 0
        logs = trainer.train(1, record)
        assert logs["steps"] == 4 and logs["optimizer_steps_in_state"] == 4
        assert trainer.grad_accum == 2 and trainer.model.model.gradient_accumulation_steps() == 2
        one_pair = IterationRecord.from_pairs(record.pairs[:2]).with_logps(
            record.logp_mu_chosen[:2],
            record.logp_mu_rejected[:2],
            record.logp_ref_chosen[:2],
            record.logp_ref_rejected[:2],
        )
        assert len({p.prompt for p in one_pair.pairs}) == 2 and trainer.accumulation(one_pair, 1) == 1
    finally:
        trainer.settings = saved
        trainer.micro_step = 0


def test_an_empty_response_is_the_prompt_then_eos(tiny_model):
    """The policy that stopped at once is a response of its own: the pair dataset scores it as the
    prompt's tokens then EOS, also for a prompt that ends in a newline (OpenRLHF's RewardDataset strips the joined
    text's trailing newline, which would leave the response mask empty and log pi(empty) = 0)."""
    from transformers import AutoTokenizer

    from comal_openrlhf.core.pairs import EMPTY
    from comal_openrlhf.training.data import PairDataset

    tok = AutoTokenizer.from_pretrained(tiny_model)
    for prompt in ("question pick one ?", "question pick one ?\n"):
        ds = PairDataset([Pair(prompt, "yes good", EMPTY), Pair(prompt, "yes good", "no bad")], tok, 64)
        _, _, reject_ids, r_mask, prompt_len, _ = ds[0]
        want = tok(prompt, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert reject_ids[0].tolist() == want and r_mask.sum().item() == len(want)
        assert len(want) == prompt_len + 1  # exactly one response token, EOS, under the response mask
        assert ds[1][2][0].tolist() != want  # a non-empty response is tokenised by RewardDataset as before


def test_rows_keep_an_empty_rejected_and_skip_an_empty_chosen(tiny_model):
    from types import SimpleNamespace

    from transformers import AutoTokenizer

    from comal_openrlhf.core.pairs import EMPTY
    from comal_openrlhf.training.data import RowFormatter, SkipLog

    tok = AutoTokenizer.from_pretrained(tiny_model)
    d = SimpleNamespace(
        prompt_key="prompt", chosen_key="chosen", rejected_key="rejected", input_template=None,
        apply_chat_template=False, tokenizer_chat_template=None,
    )  # fmt: skip
    fmt, skips = RowFormatter(d, tok, 64), SkipLog()
    kept = fmt({"prompt": "question pick one ?", "chosen": "yes", "rejected": "  "}, "f:1", skips)
    assert kept is not None and kept.rejected == EMPTY
    assert fmt({"prompt": "question pick one ?", "chosen": " ", "rejected": "no"}, "f:2", skips) is None
    assert skips.as_dict()["skipped_empty_response"] == 1
