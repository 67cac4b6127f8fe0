"""Online COMAL: sampling from the policy, the table judge, pair building, through train_comal; the demo's
convergence claim at small scale."""

import json
import subprocess
import sys

import pytest
from _util import REPO, run_cmd, torchrun, write_jsonl

from comal_openrlhf.core.game import paper_game

pytestmark = pytest.mark.integration  # every test here launches train_comal or the demo


def _online_cmd(launcher, model, tmp_path, *extra):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "question pick one ?"}] * 2)
    cmd = launcher + ["-m", "openrlhf.cli.train_comal", "--model.model_name_or_path", model]
    cmd += ["--comal.source", "online", "--judge.kind", "table", "--judge.table", "paper"]
    cmd += ["--data.dataset", prompts, "--data.prompt_key", "prompt", "--data.apply_chat_template"]
    cmd += ["--data.max_len", "32", "--rollout.n_samples_per_prompt", "8", "--rollout.max_new_tokens", "3"]
    cmd += ["--rollout.temperature", "1.0", "--rollout.top_p", "1.0", "--comal.iterations", "2"]
    cmd += ["--train.micro_batch_size", "2", "--train.batch_size", "2", "--comal.algo", "comal"]
    cmd += ["--comal.ref_update_interval", "1", "--ckpt.output_dir", str(tmp_path / "final")]
    cmd += ["--ckpt.path", str(tmp_path / "ckpt")]
    return cmd + list(extra)


@pytest.fixture(scope="module")
def game_model(tmp_path_factory):
    """Tiny Llama whose vocabulary holds the paper game's options a, b, c."""
    from comal_openrlhf.tiny import DEFAULT_WORDS, build_tiny_llama

    return build_tiny_llama(str(tmp_path_factory.mktemp("game_llama")), words=tuple(DEFAULT_WORDS) + ("b", "c"))


def _history(tmp_path):
    return [json.loads(x) for x in open(tmp_path / "final" / "comal_iterations.jsonl")]


@pytest.mark.parametrize("nproc, zero, rule", [(1, 2, "top2"), (2, 3, "all_soft")])
def test_online_iterations_sample_judge_and_train(tmp_path, game_model, nproc, zero, rule):
    launcher = torchrun(nproc) if nproc > 1 else [sys.executable]
    cmd = _online_cmd(launcher, game_model, tmp_path, "--ds.zero_stage", str(zero), "--rollout.pair_rule", rule)
    cmd += ["--train.batch_size", str(2 * nproc)]  # micro-batch 2 on each rank
    run_cmd(cmd, cwd=str(tmp_path))
    h = _history(tmp_path)
    assert [r["iteration"] for r in h] == [0, 1]
    for r in h:
        # 2 prompts x 8 samples were generated and judged; the exact game gap of mu_k is logged every iteration
        assert r["rollout_prompts"] == 2 and r["rollout_responses"] == 16
        assert r["pairs"] == r["rollout_pairs"] > 0 or r["rollout_prompts_dropped"] == 2
        assert 0.0 <= r["game_gap"] <= 1.0 and abs(r["game_p_a"] + r["game_p_b"] + r["game_p_c"] - 1) < 1e-6
    assert h[0]["advance_max_abs_diff"] <= 1e-5


def test_online_source_needs_prompts_and_a_prompt_key(tmp_path, game_model):
    cmd = _online_cmd([sys.executable], game_model, tmp_path)
    cmd[cmd.index("--data.prompt_key") + 1] = "question"
    p = subprocess.run(cmd, cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "missing prompt key 'question'" in p.stderr + p.stdout
    assert "Traceback" not in p.stderr


def test_demo_converges_where_iterative_ipo_cycles(tmp_path):
    """Small version of the README's main job: COMAL's final gap is small and below iterative IPO's."""
    cmd = [sys.executable, "-m", "comal_openrlhf.cli.demo", "--algos", "comal,iter-ipo", "--iterations", "16"]
    cmd += ["--out", str(tmp_path / "demo"), "--json"]
    p = run_cmd(cmd, cwd=REPO, timeout=900)
    report = json.loads(p.stdout.strip().splitlines()[-1])
    comal, ipo = report["algorithms"]["comal"], report["algorithms"]["iter-ipo"]
    assert comal["duality_gap"] <= 0.06, comal
    assert comal["duality_gap"] < ipo["duality_gap"], (comal, ipo)
    P, _ = paper_game()
    assert abs(sum(comal["policy"]) - 1) < 1e-9 and comal["invalid_mass"] < 0.2
    assert (tmp_path / "demo" / "gap.png").stat().st_size > 1000
    assert len(comal["gaps"]) == 17  # mu_0 .. mu_15 and the final policy


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="vLLM rollouts need a CUDA GPU")
def test_vllm_rollout_backend_on_gpu(tmp_path):
    pytest.importorskip("vllm", reason="vllm (the gpu extra) is not installed")
    from comal_openrlhf.tiny import DEFAULT_WORDS, build_tiny_llama

    # head_dim 64: vLLM's attention backends refuse the default tiny model's head_dim 8
    model = build_tiny_llama(str(tmp_path / "llama"), words=tuple(DEFAULT_WORDS) + ("b", "c"), hidden_size=128,
                             num_heads=2, intermediate_size=256)  # fmt: skip
    cmd = _online_cmd([sys.executable], model, tmp_path, "--rollout.backend", "vllm", "--ds.zero_stage", "2")
    run_cmd(cmd + ["--vllm.gpu_memory_utilization", "0.2", "--vllm.enforce_eager"], cwd=str(tmp_path))
    h = _history(tmp_path)
    assert [r["iteration"] for r in h] == [0, 1] and all(r["rollout_responses"] == 16 for r in h)


def test_vllm_backend_refuses_cleanly_what_cpu_vllm_cannot_run(tmp_path, game_model):
    """The game model's head_dim 8 is outside vLLM's CPU attention (without vllm: the install hint); the CPU run
    itself is tests/test_rollout_vllm.py."""
    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU")
    cmd = _online_cmd([sys.executable], game_model, tmp_path, "--rollout.backend", "vllm")
    p = subprocess.run(cmd, cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    out = p.stderr + p.stdout
    assert p.returncode != 0 and ("head_dim 8" in out or "needs vLLM" in out) and "Traceback" not in p.stderr


def test_winrate_against_start_and_anchor_is_logged(tmp_path, game_model):
    rows = [{"prompt": "question pick one ?", "chosen": "a", "rejected": "b"}] * 2
    eval_set = write_jsonl(tmp_path / "eval.jsonl", rows)
    cmd = _online_cmd([sys.executable], game_model, tmp_path, "--ds.zero_stage", "2", "--eval.dataset", eval_set)
    cmd += ["--eval.split", "train", "--eval.winrate_every", "1", "--eval.winrate_samples", "4"]
    cmd += ["--logger.tensorboard_dir", str(tmp_path / "tb")]
    run_cmd(cmd, cwd=str(tmp_path))
    h = _history(tmp_path)
    for r in h:
        for name in ("start", "anchor"):
            low, mid, high = (r[f"winrate_vs_{name}{s}"] for s in ("_ci_low", "", "_ci_high"))
            assert 0.0 <= low <= mid <= high <= 1.0
    from _util import read_scalars

    assert len(read_scalars(str(tmp_path / "tb"), "eval/winrate_vs_start")) == 2


def test_all_soft_makes_the_optimizer_steps_of_top2_on_the_same_prompts(tmp_path, game_model):
    # with a preset --train.batch_size counts prompts, so all_soft's many pairs per prompt make the
    # official top2 pipeline's number of optimizer steps (counted in pairs all_soft would make several times more)
    prompts = write_jsonl(tmp_path / "two.jsonl", [{"prompt": "question pick one ?"}, {"prompt": "question two ?"}])
    steps, pairs = {}, {}
    for rule in ("top2", "all_soft"):
        out = tmp_path / rule
        out.mkdir()
        cmd = _online_cmd([sys.executable], game_model, out, "--rollout.pair_rule", rule, "--data.dataset", prompts)
        cmd += ["--rollout.prompts_per_iteration", "2", "--comal.iterations", "1", "--train.max_epochs", "2"]
        cmd += ["--train.micro_batch_size", "1", "--ds.zero_stage", "0", "--train.seed", "3"]
        run_cmd(cmd, cwd=str(tmp_path))
        (row,) = _history(out)
        steps[rule], pairs[rule] = row["steps"], row["pairs"]
    assert pairs["all_soft"] > pairs["top2"] == 2
    assert steps["all_soft"] == steps["top2"] == 2  # ceil(2 epochs x 2 prompts / batch 2)
