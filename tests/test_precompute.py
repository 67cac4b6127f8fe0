"""The precompute pass (COMALTrainer._cached: log mu_k and log ref of every pair, no gradient, once per iteration):
with --comal.logps_kernel torch/triton/auto both models run on the same batch and one call of the kernels'
sequence_logratio reads both logits; the record equals OpenRLHF's path (fp32 model) and does not depend on
--comal.precompute_batch_size. In process through a trainer (fp32, ZeRO-2, a policy perturbed away from the anchor so
that mu and ref differ), and end to end through train_comal on two ranks."""

import math
import os

import pytest
import torch
from _kernels import CUDA  # first: comal_openrlhf.kernels before triton, so that triton can run interpreted on CPU
from test_train_comal import comal_cmd, make_pairs_dir

ROWS = [
    {"prompt": "question pick one ?", "chosen": "yes good", "rejected": "no bad"},
    {"prompt": "question pick two ?", "chosen": "one", "rejected": "two three"},
    {"prompt": "question pick three please ?", "chosen": "yes", "rejected": "no no no bad"},
]


@pytest.fixture(scope="module")
def trainer(tmp_path_factory, tiny_model):
    from comal_openrlhf import cpu_runtime

    cpu_runtime.apply()
    from openrlhf.utils import get_strategy

    from comal_openrlhf.cli.train_comal import build_trainer, parse_args
    from comal_openrlhf.rundir import RunDirectory

    tmp = tmp_path_factory.mktemp("precompute")
    pairs = make_pairs_dir(tmp / "pairs", 1, rows=ROWS * 2 + ROWS[:1])  # 7 pairs: a last batch that is not full
    argv = ["--model.model_name_or_path", tiny_model, "--comal.pairs_dir", pairs, "--comal.algo", "comal"]
    argv += ["--ds.zero_stage", "2", "--ds.param_dtype", "fp32", "--train.micro_batch_size", "2"]
    argv += ["--train.batch_size", "2", "--data.prompt_key", "prompt", "--data.max_len", "32"]
    argv += ["--train.max_epochs", "1", "--comal.logps_kernel", "torch", "--comal.no_iteration_ckpt"]
    argv += ["--ckpt.output_dir", str(tmp / "final"), "--ckpt.path", str(tmp / "ckpt")]
    args = parse_args(argv)
    strategy = get_strategy(args)
    strategy.setup_distributed()
    trainer = build_trainer(args, strategy, RunDirectory(args.ckpt.path, args.ckpt.output_dir))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # mu_k != anchor, so that a swapped or reused logits tensor would show
        for p in trainer.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return trainer


@pytest.fixture(scope="module")
def pairs(trainer):
    pairs, _ = trainer.collect_pairs(0)
    assert len(pairs) == 7
    return pairs


def fill(trainer, pairs, kernel, batch_size=None):
    from comal_openrlhf.core.record import IterationRecord

    saved = trainer.settings.logps_kernel, trainer.args.comal.precompute_batch_size
    trainer.settings.logps_kernel, trainer.args.comal.precompute_batch_size = kernel, batch_size
    try:
        record = IterationRecord.from_pairs(pairs)
        return trainer._cached(record, trainer._dataset(record.pairs), "test")
    finally:
        trainer.settings.logps_kernel, trainer.args.comal.precompute_batch_size = saved


NAMES = ("logp_mu_chosen", "logp_mu_rejected", "logp_ref_chosen", "logp_ref_rejected")


def assert_same_record(got, want, tol=1e-5):
    for name in NAMES:
        a, b = getattr(got, name), getattr(want, name)
        assert torch.allclose(a, b, rtol=0, atol=tol), (name, a, b)


@pytest.fixture(scope="module")
def openrlhf_record(trainer, pairs):
    return fill(trainer, pairs, "openrlhf")


def _spy(monkeypatch, name):
    import comal_openrlhf.kernels as kernels

    calls, real = [], getattr(kernels, name)

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, name, spy)
    return calls


@pytest.mark.parametrize("kernel", ["torch", "auto", "triton"])
def test_paired_kernel_fills_the_record_of_the_openrlhf_path(trainer, pairs, openrlhf_record, kernel, monkeypatch):
    from comal_openrlhf.kernels import triton_runs_on_cpu

    if kernel == "triton" and not CUDA and not triton_runs_on_cpu():
        pytest.skip("triton was imported before TRITON_INTERPRET was set in this process")
    want = openrlhf_record
    assert not torch.allclose(want.logp_mu_chosen, want.logp_ref_chosen, atol=1e-3)  # the perturbation shows
    paired, single = _spy(monkeypatch, "sequence_logratio"), _spy(monkeypatch, "sequence_logps")
    got = fill(trainer, pairs, kernel)
    # 7 pairs in micro-batches of 2: 4 batches, each one call reading both models' logits (chosen + rejected rows)
    assert len(paired) == 4 and not single, (paired, single)
    assert paired[0][0] == 4 and paired[-1][0] == 2
    assert_same_record(got, want)


def test_linear_kernel_keeps_two_calls_and_the_same_record(trainer, pairs, openrlhf_record, monkeypatch):
    paired = _spy(monkeypatch, "sequence_logratio")
    assert_same_record(fill(trainer, pairs, "linear"), openrlhf_record)
    assert not paired


@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_precompute_batch_size_does_not_change_the_record(trainer, pairs, openrlhf_record, batch_size, monkeypatch):
    paired = _spy(monkeypatch, "sequence_logratio")
    got = fill(trainer, pairs, "torch", batch_size)
    assert len(paired) == math.ceil(7 / batch_size)  # the loader of the pass took the flag's micro-batch
    assert_same_record(got, openrlhf_record)


def test_precompute_batch_size_flag(trainer, pairs):
    from comal_openrlhf.cli.train_comal import build_parser
    from comal_openrlhf.errors import PlanError

    action = build_parser()._option_string_actions["--comal.precompute_batch_size"]
    assert action.default is None and "precompute" in action.help and "micro_batch_size" in action.help
    assert trainer.args.comal.precompute_batch_size is None and trainer._precompute_batch_size() == 2
    with pytest.raises(PlanError, match="precompute_batch_size"):
        fill(trainer, pairs, "torch", 0)


def _pair_batch(V):
    """A PairDataset-shaped batch of 3 pairs: chosen and rejected right-padded to their own lengths."""
    g = torch.Generator().manual_seed(2)
    chosen, rejected = torch.randint(3, V, (3, 1, 10), generator=g), torch.randint(3, V, (3, 1, 13), generator=g)
    c_mask, r_mask = torch.ones_like(chosen), torch.ones_like(rejected)
    c_mask[1, :, 8:] = 0
    r_mask[2, :, 6:] = 0
    return chosen, c_mask, rejected, r_mask, [3, 4, 2], torch.arange(3)


@pytest.mark.parametrize("kernel", ["torch", "triton", "linear", "openrlhf"])
def test_pair_logps_both_is_two_pair_logps_calls(tiny_model, kernel, monkeypatch):
    """pair_logps_both (one sequence_logratio for the paired kernels) gives what pair_logps gives for each model;
    temperatures that differ take the two-call path."""
    from test_kernels_logps_linear import make_actor

    from comal_openrlhf.kernels import triton_runs_on_cpu
    from comal_openrlhf.training.logps import pair_logps, pair_logps_both

    if kernel == "triton" and not CUDA and not triton_runs_on_cpu():
        pytest.skip("triton was imported before TRITON_INTERPRET was set in this process")
    policy, anchor = make_actor(tiny_model, tie=False), make_actor(tiny_model, tie=False)  # temperature 0.9 each
    for actor in (policy, anchor):
        actor.packing_samples = False  # what Actor(path) sets; make_actor wraps a built model
    with torch.no_grad():
        anchor.model.lm_head.weight.mul_(0.5)
    batch = _pair_batch(policy.model.config.vocab_size)
    want = [*pair_logps(policy, batch, 0, kernel)[:2], *pair_logps(anchor, batch, 0, kernel)[:2]]
    paired = _spy(monkeypatch, "sequence_logratio")
    got = pair_logps_both(policy, anchor, batch, 0, kernel)
    assert len(paired) == (kernel in ("torch", "triton")) and not any(t.requires_grad for t in got)
    assert not torch.allclose(want[0], want[2], atol=1e-3)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, rtol=0, atol=1e-5), (a, b)
    anchor.temperature = 1.0
    again = pair_logps_both(policy, anchor, batch, 0, kernel)
    assert len(paired) == (kernel in ("torch", "triton"))  # no second paired call
    assert torch.allclose(again[0], want[0], rtol=0, atol=1e-5)
    assert torch.allclose(again[2], pair_logps(anchor, batch, 0, kernel)[0], rtol=0, atol=1e-5)


@pytest.mark.integration
def test_train_comal_with_the_paired_precompute_on_two_ranks(tiny_model, tmp_path):
    """Two iterations through python -m openrlhf.cli.train_comal with --comal.logps_kernel torch on two ranks, an odd
    number of pairs (the sampler pads one rank's shard) and a precompute micro-batch of 3: the run finishes, every
    logged loss is finite and the last iteration's record holds finite log-probs for every pair."""
    import sys

    from _util import read_scalars, run_cmd, torchrun

    pairs = make_pairs_dir(tmp_path / "pairs", 2, rows=ROWS * 2 + ROWS[:1])
    cmd = comal_cmd(torchrun(2), tiny_model, tmp_path, "--comal.pairs_dir", pairs, "--comal.algo", "comal")
    cmd += ["--comal.logps_kernel", "torch", "--comal.precompute_batch_size", "3", "--comal.ref_update_interval", "1"]
    run_cmd(cmd, cwd=str(tmp_path), env={"PYTHONPATH": os.pathsep.join(sys.path)})
    losses = read_scalars(str(tmp_path / "tb"), "train/loss")
    assert len(losses) >= 2 and all(math.isfinite(x) for x in losses), losses
    with open(tmp_path / "final" / "comal_iterations.jsonl") as f:
        assert len(f.readlines()) == 2
    saved = torch.load(tmp_path / "ckpt_comal" / "iter_001.pt", map_location="cpu", weights_only=True)
    record = saved["record"]
    values = torch.stack([torch.as_tensor(record[name]) for name in NAMES])
    assert values.shape == (4, 7) and torch.isfinite(values).all(), values
