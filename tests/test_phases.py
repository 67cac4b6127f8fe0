"""The phases as commands: python -m comal_openrlhf.cli.generate (prompts -> samples) and
python -m comal_openrlhf.cli.judge (samples -> win matrices -> iter_NNN.jsonl pairs), sharded and merged, equal to
the online source's pairs, and generate -> judge -> train_comal --comal.pairs_dir for two iterations."""

import json
import math
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
from _util import REPO, run_cmd, write_jsonl

from comal_openrlhf.cli.common import parse_shard
from comal_openrlhf.core.pairs import pair_winrates
from comal_openrlhf.errors import BadInputError, PlanError
from comal_openrlhf.training.data import prompt_window

PROMPTS = ["question pick one ?", "pick one option ?", "choose one answer ?"]
# per (iteration, prompt index): the samples of mu_k (labels of the paper game, an invalid word, an empty response)
RESPONSES = [
    ["a", "b", "b", "c", "yes"],
    ["c", "c", "a", "", "b"],
    ["b", "b", "b", "a", "a"],
]


def _samples_rows(k, per_iteration=2, policy="mu"):
    rows = []
    for pos, i in enumerate(prompt_window(len(PROMPTS), k, per_iteration)):
        for s, r in enumerate(RESPONSES[(i + k) % 3]):
            rows.append(
                {
                    "prompt": PROMPTS[i],
                    "response": r,
                    "policy": policy,
                    "sample": s,
                    "position": pos,
                    "prompt_index": i,
                }
            )
    return rows


def _judge(argv):
    from comal_openrlhf.cli.judge import judge_iteration, merge, parse_args

    a = parse_args([str(x) for x in argv])
    return merge(a) if a.merge else judge_iteration(a)


def _rows(path):
    return [json.loads(x) for x in open(path)]


def _judge_argv(samples, out_dir, k, rule, *extra):
    samples = samples if isinstance(samples, list) else [samples]
    return [
        "--samples",
        *samples,
        "--out_dir",
        out_dir,
        "--iteration",
        k,
        "--judge.kind",
        "table",
        "--judge.table",
        "paper",
        "--rollout.pair_rule",
        rule,
        "--train.seed",
        7,
        *extra,
    ]


def test_parse_shard():
    assert parse_shard("1/4") == (1, 4)
    for bad in ("4/4", "x", "1/0", "-1/2"):
        with pytest.raises(BadInputError):
            parse_shard(bad)


def test_prompt_window_cycles_like_the_online_source():
    assert prompt_window(3, 0, 2) == [0, 1] and prompt_window(3, 1, 2) == [2, 0]
    assert prompt_window(2, 5, 64) == [0, 1]


@pytest.mark.parametrize("rule", ["top2", "all_soft", "sampled"])
def test_judge_pairs_equal_the_online_source_on_the_same_samples(tmp_path, tiny_model, rule):
    """The judge command and OnlineSource.pairs (its sampling replaced by the same samples) build the same pairs:
    same groups, judge prompts, rule and generator seed (train.seed, iteration)."""
    from transformers import AutoTokenizer

    from comal_openrlhf.cli.train_comal import parse_args as train_args
    from comal_openrlhf.training.data import PromptFormatter
    from comal_openrlhf.training.online import OnlineSource

    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    args = train_args(
        [
            "--model.model_name_or_path",
            tiny_model,
            "--comal.source",
            "online",
            "--judge.kind",
            "table",
            "--judge.table",
            "paper",
            "--data.dataset",
            prompts,
            "--data.prompt_key",
            "prompt",
            "--data.apply_chat_template",
            "--rollout.prompts_per_iteration",
            "2",
            "--rollout.n_samples_per_prompt",
            "5",
            "--rollout.pair_rule",
            rule,
            "--train.seed",
            "7",
        ]
    )
    tok = AutoTokenizer.from_pretrained(tiny_model)

    strategy = SimpleNamespace(args=args, print=lambda *m: None, is_rank_0=lambda: True)
    src = OnlineSource(args, strategy, tok, rule)
    src.exact_game = None  # no policy model here: skip the exact-gap metrics
    fmt = PromptFormatter(args.data, tok)
    for k in (0, 1):
        samples = write_jsonl(tmp_path / f"samples_{k}.jsonl", _samples_rows(k))
        src.sample = lambda k_, policy, idx: {i: RESPONSES[(i + k_) % 3] for i in idx}
        online, _stats = src.pairs(k, None)
        summary = _judge(_judge_argv(samples, tmp_path / "pairs", k, rule))
        rows = _rows(tmp_path / "pairs" / f"iter_{k:03d}.jsonl")
        assert summary["pairs"] == len(rows) == len(online) > 0
        for row, p in zip(rows, online):
            assert fmt.policy_text(row["prompt"]) == p.prompt
            assert (row["chosen"], row["rejected"]) == (p.chosen, p.rejected)
            for name in ("chosen_winrate", "rejected_winrate", "soft_label"):
                got = row.get(name, math.nan)
                want = getattr(p, name)
                assert (math.isnan(got) and math.isnan(want)) or got == want, (name, got, want)
            assert row.get("weight", 1.0) == p.weight


@pytest.mark.parametrize("rule", ["top2", "all_soft"])
def test_sharded_judge_then_merge_equals_one_run(tmp_path, rule):
    rows = _samples_rows(0, per_iteration=3)
    a, b = write_jsonl(tmp_path / "s0.jsonl", rows[::2]), write_jsonl(tmp_path / "s1.jsonl", rows[1::2])
    _judge(_judge_argv([a, b], tmp_path / "one", 0, rule))
    assert set(_judge(_judge_argv(tmp_path / "s*.jsonl", tmp_path / "sh", 0, rule, "--shard", "1/2"))) >= {"pairs"}
    with pytest.raises(PlanError, match=r"shards \[0\] of 2 are missing"):
        _judge(["--merge", "--out_dir", tmp_path / "sh", "--iteration", 0])
    _judge(_judge_argv(tmp_path / "s*.jsonl", tmp_path / "sh", 0, rule, "--shard", "0/2"))
    assert _judge(["--merge", "--out_dir", tmp_path / "sh", "--iteration", 0])["shards"] == 2
    for name in ("iter_000.jsonl", "iter_000.matrices.jsonl"):
        assert (tmp_path / "sh" / name).read_text() == (tmp_path / "one" / name).read_text()


def test_win_matrices_and_win_rates(tmp_path):
    samples = write_jsonl(tmp_path / "s.jsonl", _samples_rows(0, per_iteration=3))
    summary = _judge(_judge_argv(samples, tmp_path / "p", 0, "top2"))
    mats = _rows(tmp_path / "p" / "iter_000.matrices.jsonl")
    pairs = _rows(tmp_path / "p" / "iter_000.jsonl")
    assert [m["position"] for m in mats] == [0, 1, 2] and summary["invalid_responses"] == 0
    assert summary["empty_responses"] == 1 and "" in mats[1]["responses"]  # kept: it loses to every response
    for m, p in zip(mats, pairs):
        W, c = np.array(m["W"]), np.array(m["counts"], dtype=float)
        assert np.allclose(W + W.T, 1.0, atol=4 * np.finfo(float).eps) and np.all(np.diag(W) == 0.5)
        # "winrates" are the scores that rank top2; a pair's win rates leave the pair's two samples out
        i, j = m["responses"].index(p["chosen"]), m["responses"].index(p["rejected"])
        assert m["winrates"][i] == max(m["winrates"]) and c.sum() == 5
        T = pair_winrates(c, W)
        assert (p["chosen_winrate"], p["rejected_winrate"]) == (T[i, j], T[j, i])
    # prompt 2: b x3, a x2 -> against the 3 samples outside the pair (b, b, a): b (0.5 + 0.5 + 0.9) / 3
    assert pairs[2]["chosen"] == "b" and abs(pairs[2]["chosen_winrate"] - 1.9 / 3) < 8 * np.finfo(float).eps


def test_judge_refuses_mixed_policies_and_bad_rows(tmp_path):
    rows = _samples_rows(0) + _samples_rows(0, policy="other")
    samples = write_jsonl(tmp_path / "s.jsonl", rows)
    with pytest.raises(PlanError, match="pick one with --policy"):
        _judge(_judge_argv(samples, tmp_path / "p", 0, "top2"))
    assert _judge(_judge_argv(samples, tmp_path / "p", 0, "top2", "--policy", "other"))["pairs"] == 2
    # samples of two checkpoints (or sampling settings) of one policy id are never judged together
    mixed = [{**r, "producer": "aaaa"} for r in _samples_rows(0)] + [
        {**r, "producer": "bbbb"} for r in _samples_rows(1)
    ]
    mixed = write_jsonl(tmp_path / "mixed.jsonl", mixed)
    with pytest.raises(PlanError, match=r"more than one checkpoint or sampling setting \(producers: aaaa at .*mixed"):
        _judge(_judge_argv(mixed, tmp_path / "p", 0, "top2"))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "sample": 0}])
    with pytest.raises(BadInputError, match=r"bad.jsonl:1: a samples row needs"):
        _judge(_judge_argv(bad, tmp_path / "p", 0, "top2"))


@pytest.mark.integration
def test_generate_judge_train_two_iterations(tmp_path):
    """generate (2 shards per iteration) -> judge -> train_comal --comal.pairs_dir, two iterations on CPU."""
    from comal_openrlhf.tiny import DEFAULT_WORDS, build_tiny_llama

    model = build_tiny_llama(str(tmp_path / "m"), words=tuple(DEFAULT_WORDS) + ("b", "c"))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    common = ["--data.dataset", prompts, "--data.prompt_key", "prompt", "--data.apply_chat_template"]
    common += ["--rollout.prompts_per_iteration", "2", "--rollout.n_samples_per_prompt", "4", "--train.seed", "3"]
    for k in (0, 1):
        for shard in ("0/2", "1/2"):
            cmd = [sys.executable, "-m", "comal_openrlhf.cli.generate", "--model.model_name_or_path", model, *common]
            cmd += ["--rollout.max_new_tokens", "3", "--rollout.temperature", "1.0", "--iteration", str(k)]
            cmd += ["--shard", shard, "--output", str(tmp_path / f"s{k}.{shard[0]}.jsonl"), "--json"]
            out = json.loads(run_cmd(cmd, cwd=REPO).stdout)
            assert out["samples_written"] == 4 and out["prompts"] == 1
        again = json.loads(run_cmd(cmd, cwd=REPO).stdout)  # a rerun finds its samples and adds none
        assert again["samples_written"] == 0 and again["samples_kept"] == 4
        if k == 0:  # the same --output with other sampling settings: refused, the old samples untouched
            before = (tmp_path / "s0.1.jsonl").read_text()
            p = subprocess.run(cmd + ["--rollout.temperature", "0.7"], cwd=REPO, capture_output=True, text=True)
            assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-2000:]
            assert "made by another checkpoint or other sampling settings" in p.stderr
            assert (tmp_path / "s0.1.jsonl").read_text() == before
        rows = _rows(tmp_path / f"s{k}.0.jsonl") + _rows(tmp_path / f"s{k}.1.jsonl")
        assert sorted(r["position"] for r in rows) == [0] * 4 + [1] * 4
        assert {r["prompt_index"] for r in rows} == set(prompt_window(3, k, 2))
        cmd = [sys.executable, "-m", "comal_openrlhf.cli.judge", "--samples", str(tmp_path / f"s{k}.*.jsonl")]
        cmd += ["--iteration", str(k), "--out_dir", str(tmp_path / "pairs"), "--judge.kind", "table"]
        cmd += ["--judge.table", "paper", "--rollout.pair_rule", "all_soft", "--train.seed", "3", "--json"]
        summary = json.loads(run_cmd(cmd, cwd=REPO).stdout)
        assert summary["responses"] == 8
    cmd = [sys.executable, "-m", "openrlhf.cli.train_comal", "--model.model_name_or_path", model]
    cmd += ["--comal.pairs_dir", str(tmp_path / "pairs"), "--comal.algo", "comal", "--comal.ref_update_interval", "1"]
    cmd += ["--data.prompt_key", "prompt", "--data.apply_chat_template", "--data.max_len", "32"]
    cmd += ["--train.micro_batch_size", "1", "--train.batch_size", "1", "--ds.zero_stage", "0"]
    cmd += ["--ckpt.output_dir", str(tmp_path / "final"), "--ckpt.path", str(tmp_path / "ckpt")]
    run_cmd(cmd, cwd=str(tmp_path))
    hist = [json.loads(x) for x in open(tmp_path / "final" / "comal_iterations.jsonl")]
    assert [h["iteration"] for h in hist] == [0, 1]
    for k, h in enumerate(hist):
        n_rows = len(_rows(tmp_path / "pairs" / f"iter_{k:03d}.jsonl"))
        assert h["pairs"] == n_rows > 0
