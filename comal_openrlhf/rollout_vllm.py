"""vLLM rollouts for online COMAL (``--rollout.backend vllm``, GPU only; experimental: not yet run on a GPU here).

Engines are built the OpenRLHF way, ``openrlhf.trainer.ray.vllm_engine.create_vllm_engines`` (Ray actors with
OpenRLHF's worker extension), on GPUs that Ray owns (``--vllm.num_engines`` x ``--vllm.tensor_parallel_size``;
connect to a Ray cluster with RAY_ADDRESS, or let rank 0 start a local one). After every iteration the policy's
weights are pushed into the engines over a process group between training rank 0 and every engine rank, as
OpenRLHF's PPO actor does (``broadcast_to_vllm``): ZeRO-3 partitions are gathered one parameter at a time, no
checkpoint is written or reloaded.
"""

import socket

import torch
import torch.distributed as dist


class VLLMSampler:
    def __init__(self, args, pretrain, max_len):
        if not torch.cuda.is_available():
            raise SystemExit("[comal] --rollout.backend vllm needs CUDA GPUs; use --rollout.backend hf on CPU")
        self.args = args
        self.engines = None
        self.group = None
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        if self.rank == 0:
            import ray
            from openrlhf.trainer.ray.vllm_engine import create_vllm_engines
            from openrlhf.utils.distributed_util import stateless_init_process_group

            if not ray.is_initialized():
                ray.init(ignore_reinit_error=True)
            v = args.vllm
            self.engines = create_vllm_engines(
                v.num_engines,
                v.tensor_parallel_size,
                pretrain,
                args.train.seed,
                False,
                False,
                v.enforce_eager,
                max_len + args.rollout.max_new_tokens,
                gpu_memory_utilization=v.gpu_memory_utilization,
            )
            address = ray._private.services.get_node_ip_address()
            with socket.socket() as s:
                s.bind(("", 0))
                port = s.getsockname()[1]
            world = v.num_engines * v.tensor_parallel_size + 1
            refs = [
                e.init_process_group.remote(
                    address, port, i * v.tensor_parallel_size + 1, world, "comal", backend="nccl", use_ray=False
                )
                for i, e in enumerate(self.engines)
            ]
            self.group = stateless_init_process_group(address, port, 0, world, torch.cuda.current_device())
            ray.get(refs)
        if dist.is_initialized():
            dist.barrier()

    @torch.no_grad()
    def refresh(self, actor):
        """Push the policy's weights into every engine (called on all ranks: ZeRO-3 gathers are collective)."""
        import deepspeed

        module = actor.model.module
        params = list(module.named_parameters())
        zero3 = self.args.ds.zero_stage == 3
        for count, (name, p) in enumerate(params, 1):
            with deepspeed.zero.GatheredParameters([p], enabled=zero3):
                if self.rank == 0:
                    import ray

                    shape = p.ds_shape if zero3 else p.shape
                    refs = [
                        e.update_weight.remote(name, dtype=p.dtype, shape=shape, empty_cache=count == len(params))
                        for e in self.engines
                    ]
                    self.group.broadcast(p.data, src=0, stream=torch.cuda.current_stream())
                    ray.get(refs)
        if dist.is_initialized():
            dist.barrier()

    def generate(self, tokenizer, texts, n, temperature, top_p, max_new_tokens):
        """Rank 0 only: n sampled responses (decoded text) for each prompt text."""
        import ray
        from vllm import SamplingParams

        params = SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_new_tokens)
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        refs = [self.engines[i % len(self.engines)].generate.remote(x, params) for i, x in enumerate(ids)]
        outs = ray.get(refs)
        return [[tokenizer.decode(o.token_ids, skip_special_tokens=True).strip() for o in out.outputs] for out in outs]
