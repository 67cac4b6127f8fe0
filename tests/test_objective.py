"""The objective the trainer minimises, checked through train_comal (not only through the loss function): pair
weights that survive micro-batching and ranks, the label rule with label smoothing, preset defaults, the fresh
optimizer per iteration, keep_best (the official selection) and round_rollback. fp32 (``--ds.param_dtype fp32``)
so that equalities hold to float rounding."""

import json
import os
import sys

import pytest
import torch
from _util import read_scalars, run_cmd, torchrun, write_jsonl

pytestmark = pytest.mark.integration  # every test launches train_comal

PROMPT = "question pick one ? "  # OpenRLHF's RewardDataset joins prompt + response as is: end with a space
# four pairs of one-token responses (no padding differences between micro-batch sizes), weights 1, 2, 3, 4
PAIRS = [("yes", "no", 1), ("good", "bad", 2), ("one", "two", 3), ("three", "four", 4)]
FLAGS = [
    "--data.prompt_key", "prompt", "--data.max_len", "32", "--model.beta", "1.0", "--ds.param_dtype", "fp32",
    "--ds.zero_stage", "2", "--adam.lr", "1e-2", "--lr_scheduler", "constant", "--lr_warmup_ratio", "0",
    "--logger.logging_steps", "1", "--train.max_epochs", "1",
]  # fmt: skip


def launch(tmp_path, name, model, pairs_dir, *extra, nproc=1):
    out = tmp_path / name
    launcher = torchrun(nproc) if nproc > 1 else [sys.executable]
    cmd = launcher + ["-m", "openrlhf.cli.train_comal", "--model.model_name_or_path", model]
    cmd += ["--comal.pairs_dir", str(pairs_dir), "--ckpt.output_dir", str(out / "final")]
    cmd += ["--ckpt.path", str(out / "ckpt"), "--logger.tensorboard_dir", str(out / "tb")]
    p = run_cmd(cmd + FLAGS + [str(x) for x in extra], cwd=str(tmp_path))
    with open(out / "final" / "comal_iterations.jsonl") as f:
        history = [json.loads(line) for line in f]
    return out, history, p.stdout


def test_pair_weights_survive_micro_batching_and_ranks(tmp_path, tiny_model):
    """The weighted pairs (weights 1..4) give the gradient of the duplicated pairs (pair i repeated w_i times,
    unweighted), however they are split: micro-batch 1 or 4, one rank or two. Compared through the pre-clipping
    gradient norm of the one optimizer step (fp32; a per-micro-batch normalisation would cancel the weights with
    micro-batch 1 and change the norm by far more than rounding)."""
    weighted = tmp_path / "weighted"
    os.makedirs(weighted)
    rows = [{"prompt": PROMPT, "chosen": c, "rejected": r, "weight": w} for c, r, w in PAIRS]
    write_jsonl(weighted / "iter_000.jsonl", rows)
    duplicated = tmp_path / "duplicated"
    os.makedirs(duplicated)
    write_jsonl(
        duplicated / "iter_000.jsonl",
        [{"prompt": PROMPT, "chosen": c, "rejected": r} for c, r, w in PAIRS for _ in range(w)],
    )

    norms = {}
    for name, pairs_dir, mb, bs, nproc in [
        ("mb1", weighted, 1, 4, 1),
        ("mb4", weighted, 4, 4, 1),
        ("ranks2", weighted, 2, 4, 2),
        ("dup", duplicated, 10, 10, 1),
    ]:
        out, h, _ = launch(
            tmp_path, name, tiny_model, pairs_dir, "--comal.algo", "comal", "--train.micro_batch_size", mb,
            "--train.batch_size", bs, "--model.beta", "1.0", nproc=nproc,
        )  # fmt: skip
        assert h[0]["steps"] == 1
        norms[name] = read_scalars(str(out / "tb"), "train/grad_norm")[0]
    assert norms["dup"] > 0
    # fp32 sums of ~1e4 terms in a different order: relative differences of order 1e-6; 1e-4 leaves margin
    for name in ("mb1", "mb4", "ranks2"):
        assert norms[name] == pytest.approx(norms["dup"], rel=1e-4), norms


def test_label_smoothing_reaches_the_trainers_loss(tmp_path, tiny_model):
    """dpo with --model.label_smoothing 0.2 on hard pairs: the first loss of iteration 1 equals
    -(1 - ls) log sigmoid(beta h) - ls log sigmoid(-beta h) with h = r (Delta mu_1 - Delta ref) from the cached
    log-probs of the iteration record (pi = mu_1 before the first step), and differs from the value for ls = 0."""
    pairs = tmp_path / "pairs"
    os.makedirs(pairs)
    for k in range(2):
        write_jsonl(
            pairs / f"iter_{k:03d}.jsonl", [{"prompt": PROMPT, "chosen": "yes good", "rejected": "no bad"}] * 8
        )
    out, h, _ = launch(
        tmp_path, "ls", tiny_model, pairs, "--comal.algo", "inpo", "--comal.prox", "dpo", "--comal.ref_weight",
        "0.5", "--model.label_smoothing", "0.2", "--train.micro_batch_size", "8", "--train.batch_size", "8",
    )  # fmt: skip
    record = torch.load(str(out / "ckpt") + "_comal/iter_001.pt", weights_only=True)["record"]
    d_mu = record["logp_mu_chosen"][0].double() - record["logp_mu_rejected"][0].double()
    d_ref = record["logp_ref_chosen"][0].double() - record["logp_ref_rejected"][0].double()
    h_value = 0.5 * (d_mu - d_ref)
    logsig = torch.nn.functional.logsigmoid
    expected = (-0.8 * logsig(h_value) - 0.2 * logsig(-h_value)).item()
    unsmoothed = (-logsig(h_value)).item()
    logged = read_scalars(str(out / "tb"), "train/loss")
    assert len(logged) == 2
    assert abs(expected - unsmoothed) > 1e-3  # the check below can tell smoothing from none
    # fp32 sequence sums of a few tokens; 1e-5 is ~100 ulps of the loss
    assert logged[1] == pytest.approx(expected, abs=1e-5), (logged, expected, unsmoothed)


def test_preset_defaults_fresh_optimizer_and_round_rollback(tmp_path, tiny_model):
    pairs = tmp_path / "pairs"
    os.makedirs(pairs)
    rows = [{"prompt": PROMPT, "chosen": "yes good", "rejected": "no bad"}] * 4
    for k in range(4):
        write_jsonl(pairs / f"iter_{k:03d}.jsonl", rows)
    eval_set = write_jsonl(tmp_path / "eval.jsonl", rows)
    common = ["--train.micro_batch_size", "2", "--train.batch_size", "2", "--comal.ref_update_interval", "2"]
    # preset comal: beta 0.002 where --model.beta is not given (FLAGS pass 1.0: drop it here)
    flags = list(FLAGS)
    del flags[flags.index("--model.beta") : flags.index("--model.beta") + 2]
    out = tmp_path / "preset"
    cmd = [sys.executable, "-m", "openrlhf.cli.train_comal", "--model.model_name_or_path", tiny_model]
    cmd += ["--comal.pairs_dir", str(pairs), "--comal.algo", "comal", "--ckpt.output_dir", str(out / "final")]
    cmd += ["--ckpt.path", str(out / "ckpt"), "--comal.iterations", "2"] + flags + common
    p = run_cmd(cmd, cwd=str(tmp_path))
    assert "| beta per round | 0.002 | preset |" in p.stdout and "| --train.max_epochs | 1 * | flag | 3 |" in p.stdout
    h = [json.loads(x) for x in open(out / "final" / "comal_iterations.jsonl")]
    assert [r["beta"] for r in h] == [0.002, 0.002]
    # a fresh Adam state per iteration: the state counts only the iteration's own steps (2 each)
    assert [r["optimizer_steps_in_state"] for r in h] == [2, 2]

    _, h, _ = launch(
        tmp_path, "keep", tiny_model, pairs, "--comal.algo", "comal", "--comal.keep_optimizer_state", *common
    )
    assert [r["optimizer_steps_in_state"] for r in h] == [2, 4, 6, 8]

    _, h, stdout = launch(
        tmp_path, "best", tiny_model, pairs, "--comal.algo", "comal", "--comal.round_rollback", "--eval.dataset",
        eval_set, "--eval.split", "train", *common,
    )  # fmt: skip
    for k in (1, 3):  # rounds end with the advances after iterations 1 and 3
        kept = h[k]["kept_iteration"]
        round_losses = {j: h[j]["eval_loss"] for j in (k - 1, k)}
        assert kept == min(round_losses, key=round_losses.get) and h[k]["kept_eval_loss"] == round_losses[kept]
    assert "kept_iteration" not in h[0] and "kept_iteration" not in h[2]


def test_keep_best_ends_each_iteration_with_the_lowest_heldout_prox_loss(tmp_path, tiny_model):
    # the held-out pairs are the training pairs with the labels flipped: training raises their prox loss, so the
    # best check is an early one, the last is not, and the kept weights must be the early step's
    pairs, heldout = tmp_path / "pairs", tmp_path / "heldout"
    os.makedirs(pairs), os.makedirs(heldout)
    rows = [{"prompt": PROMPT, "chosen": c, "rejected": r} for c, r, _w in PAIRS]
    flipped = [{"prompt": PROMPT, "chosen": r, "rejected": c} for c, r, _w in PAIRS]
    for k in range(2):
        write_jsonl(pairs / f"iter_{k:03d}.jsonl", rows)
        write_jsonl(heldout / f"iter_{k:03d}.jsonl", flipped)
    out, h, stdout = launch(
        tmp_path, "keep", tiny_model, pairs, "--comal.algo", "comal", "--comal.keep_best", "--comal.heldout",
        heldout, "--eval.steps", "1", "--train.max_epochs", "3", "--train.micro_batch_size", "2",
        "--train.batch_size", "2", "--comal.ref_update_interval", "1", "--adam.lr", "1e-3",
    )  # fmt: skip
    losses = read_scalars(str(out / "tb"), "heldout/prox_loss")
    assert len(losses) == 12  # 2 iterations x 6 optimizer steps, each checked (--eval.steps 1)
    for k, r in enumerate(h):
        mine = losses[6 * k : 6 * k + 6]
        best = min(range(6), key=mine.__getitem__)
        assert r["heldout_checks"] == 6 and r["kept_step"] == best + 1 and best + 1 < 6, (mine, h)
        assert r["kept_heldout_loss"] == pytest.approx(mine[best], rel=1e-6)
        assert r["last_heldout_loss"] == pytest.approx(mine[-1], rel=1e-6) and mine[-1] > mine[best]
    assert "keeping step" in stdout
    # the kept weights are the policy of the next iteration: its record's log mu equals the kept step's policy,
    # so iteration 1's first held-out check starts from the kept iterate's loss on the same (flipped) pairs
    assert losses[6] < losses[5]
