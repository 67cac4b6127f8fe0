"""Online COMAL iterations: sample from the current policy, judge, build pairs (COMAL.md section 5, steps 1-3).

``OnlineSource.pairs(k, trainer)`` is the online iteration source of comal_openrlhf.data's interface:

1. take ``--rollout.prompts_per_iteration`` prompts of ``--data.dataset`` (OpenRLHF's prompt key, input template
   and chat-template flags), each rank a shard;
2. sample ``--rollout.n_samples_per_prompt`` responses per prompt from the training policy mu_k with HF
   ``generate`` (ZeRO-3 partitioned weights included: ``synced_gpus``);
3. rank 0 judges every pair of a prompt's samples with the general-preference judge (``--judge.*``, both orders
   averaged by default) and builds pairs with ``--rollout.pair_rule``; the pairs are broadcast to every rank.

Pair weights (``--rollout.pair_weighting``): ``count`` weighs an all_soft pair (y, y') by the sample counts
c(y) c(y'), the Monte-Carlo estimate of the pair distribution mu_k x mu_k; ``policy`` uses mu_k(y) mu_k(y') from
the cached log-probs, the exact expectation when the samples cover the policy's support (finite games, the demo).
With the ``table`` judge every iteration also logs the exact duality gap of mu_k (comal_openrlhf.evaluate).
"""

import numpy as np
import torch
import torch.distributed as dist

from comal_openrlhf.data import IterationSource, PairRow, SkipLog, load_train_data

ROLLOUT_BACKENDS = ("hf", "vllm")


def add_online_args(parser):
    from comal_openrlhf.judges import add_judge_args
    from comal_openrlhf.pairs import RULES

    g = parser.add_argument_group("rollout", "Online COMAL: sampling from the current policy (--comal.source online)")
    g.add_argument("--rollout.n_samples_per_prompt", type=int, default=5, help="Samples per prompt (official: 5)")
    g.add_argument("--rollout.temperature", type=float, default=0.8, help="Sampling temperature (official: 0.8)")
    g.add_argument("--rollout.top_p", type=float, default=0.95, help="Nucleus sampling top-p (official: 0.95)")
    g.add_argument("--rollout.max_new_tokens", type=int, default=1024, help="Longest sampled response")
    g.add_argument(
        "--rollout.prompts_per_iteration", type=int, default=64, help="Prompts sampled per iteration (cycling)"
    )
    g.add_argument("--rollout.generate_batch_size", type=int, default=16, help="Prompts per generate call")
    g.add_argument(
        "--rollout.pair_rule",
        type=str,
        default="top2",
        choices=list(RULES),
        help="top2 = best vs second best (official code), best_worst, sampled (pairs from mu_k, labels drawn from "
        "the judge: unbiased), all_soft (every pair with its soft label: the exact prox loss, lower variance)",
    )
    g.add_argument(
        "--rollout.pair_weighting",
        type=str,
        default="count",
        choices=["count", "policy"],
        help="Weights of all_soft pairs: count = c(y)c(y') sample counts; policy = mu_k(y)mu_k(y') from the cached "
        "log-probs (exact when the samples cover the support, e.g. a finite game)",
    )
    g.add_argument(
        "--rollout.backend",
        type=str,
        default="hf",
        choices=list(ROLLOUT_BACKENDS),
        help="hf = generate with the training policy (CPU/GPU, any ZeRO stage); vllm = OpenRLHF vLLM engines on "
        "Ray GPUs, weights pushed from the policy every iteration (GPU only, experimental)",
    )
    v = parser.add_argument_group("vllm", "vLLM engines for --rollout.backend vllm (GPU only)")
    v.add_argument("--vllm.num_engines", type=int, default=1, help="Number of vLLM engines")
    v.add_argument("--vllm.tensor_parallel_size", type=int, default=1, help="Tensor parallel size per engine")
    v.add_argument("--vllm.gpu_memory_utilization", type=float, default=0.5, help="vLLM GPU memory fraction")
    v.add_argument("--vllm.enforce_eager", action="store_true", default=False, help="Disable CUDA graphs")
    add_judge_args(parser)
    return parser


def _rank_world():
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class OnlineSource(IterationSource):
    name = "online"
    num_iterations = None
    allow_empty = True  # an iteration whose samples give no pair is logged and skipped, not fatal

    def __init__(self, args, strategy, tokenizer):
        from comal_openrlhf.judges import build_judge

        self.args, self.strategy, self.tokenizer = args, strategy, tokenizer
        self.ro = args.rollout
        self.vllm = None
        if self.ro.backend == "vllm":
            from comal_openrlhf.rollout_vllm import VLLMSampler

            self.vllm = VLLMSampler(args, args.model.model_name_or_path, args.data.max_len)
        if self.ro.n_samples_per_prompt < 2:
            raise SystemExit("[comal] --rollout.n_samples_per_prompt must be >= 2 to form pairs")
        if not args.data.dataset:
            raise SystemExit("[comal] the online source needs prompts: --data.dataset")
        key = args.data.prompt_key
        if not key:
            raise SystemExit("[comal] the online source needs --data.prompt_key (the prompt column)")
        data = load_train_data(args, strategy)
        self.prompts, self.texts, self.skips0 = [], [], SkipLog()
        if args.data.apply_chat_template and args.data.tokenizer_chat_template:
            tokenizer.chat_template = args.data.tokenizer_chat_template
        for i, row in enumerate(data):
            origin = f"{args.data.dataset}:row {i}"
            if key not in row:
                raise SystemExit(f"[comal] {origin}: missing prompt key {key!r}; the row has {sorted(row)}")
            raw = row[key]
            if isinstance(raw, str) and not raw.strip() or raw is None:
                self.skips0.skip("empty prompt", origin)
                continue
            text = self.format_prompt(raw)
            if len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= args.data.max_len - 2:
                self.skips0.skip(f"prompt longer than --data.max_len {args.data.max_len}", origin)
                continue
            self.prompts.append(raw)
            self.texts.append(text)
        if not self.prompts:
            raise SystemExit(f"[comal] no usable prompts in {args.data.dataset}: {self.skips0.summary()}")
        if self.skips0.total():
            strategy.print(f"[comal] prompts skipped: {self.skips0.summary()}")
        self.judge = build_judge(args.judge)
        self.both_orders = not args.judge.single_order
        self.table = getattr(self.judge, "labels", None) is not None and args.judge.kind == "table"

    def format_prompt(self, raw):
        data = self.args.data
        if data.apply_chat_template:
            messages = [{"role": "user", "content": raw}] if isinstance(raw, str) else raw
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if data.input_template:
            return data.input_template.format(raw)
        return raw

    def judge_prompt(self, raw):
        """What the judge sees as the prompt: the user's text (last user message for a chat)."""
        if isinstance(raw, str):
            return raw
        return next((m["content"] for m in reversed(raw) if m.get("role") == "user"), str(raw))

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, model, texts):
        """n samples for each prompt text with HF generate on the training policy."""
        ro = self.ro
        tok = self.tokenizer
        engine = model.model  # Actor -> DeepSpeed engine (its forward gathers ZeRO-3 partitions)
        hf = getattr(engine, "module", engine)
        zero3 = getattr(self.args.ds, "zero_stage", 0) == 3 and dist.is_initialized()
        device = next(hf.parameters()).device
        was_training = hf.training
        hf.eval()
        out = []
        bs = max(1, ro.generate_batch_size)
        rank, world = _rank_world()
        # every rank runs the same number of generate calls (ZeRO-3 needs lockstep forwards)
        n_calls = -(-len(texts) // bs)
        if zero3:
            counts = torch.tensor([n_calls])
            dist.all_reduce(counts, op=dist.ReduceOp.MAX)
            n_calls = int(counts.item())
        for c in range(n_calls):
            chunk = texts[c * bs : (c + 1) * bs] or texts[:1]  # a padding call keeps ZeRO-3 ranks in step
            enc = [tok(t, add_special_tokens=False)["input_ids"] for t in chunk]
            n = max(map(len, enc))
            ids = torch.full((len(enc), n), tok.pad_token_id, dtype=torch.long)
            att = torch.zeros_like(ids)
            for i, e in enumerate(enc):  # left padding for generation
                ids[i, n - len(e) :] = torch.tensor(e)
                att[i, n - len(e) :] = 1
            gen = hf.generate(
                input_ids=ids.to(device),
                attention_mask=att.to(device),
                do_sample=True,
                temperature=ro.temperature,
                top_p=ro.top_p,
                max_new_tokens=ro.max_new_tokens,
                num_return_sequences=ro.n_samples_per_prompt,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
                synced_gpus=zero3,
            )
            if c * bs < len(texts):
                resp = tok.batch_decode(gen[:, n:], skip_special_tokens=True)
                m = ro.n_samples_per_prompt
                out += [[r.strip() for r in resp[i * m : (i + 1) * m]] for i in range(len(chunk))]
        if was_training:
            hf.train()
        return out

    # ---------------------------------------------------------------- iteration
    def pairs(self, k, trainer):
        from comal_openrlhf.pairs import build_pairs

        ro = self.ro
        n = min(ro.prompts_per_iteration, len(self.prompts))
        start = (k * n) % len(self.prompts)
        idx = [(start + i) % len(self.prompts) for i in range(n)]
        rank, world = _rank_world()
        if self.vllm is not None:  # rank 0 samples every prompt from engines holding mu_k's weights
            if trainer.global_step > 0:  # the policy moved away from the weights the engines were built with
                self.vllm.refresh(trainer.model)
            sampled = None
            if rank == 0:
                texts = [self.texts[i] for i in idx]
                out = self.vllm.generate(
                    self.tokenizer, texts, ro.n_samples_per_prompt, ro.temperature, ro.top_p, ro.max_new_tokens
                )
                sampled = dict(zip(idx, out))
        else:  # every rank samples its shard with HF generate, then all ranks share the samples
            mine = idx[rank::world]
            responses = self.sample(trainer.model, [self.texts[i] for i in mine])
            shards = [None] * world
            if world > 1:
                dist.all_gather_object(shards, list(zip(mine, responses)))
            else:
                shards = [list(zip(mine, responses))]
            sampled = dict(item for shard in shards for item in shard)

        payload = [None]
        if rank == 0:
            groups = [(self.judge_prompt(self.prompts[i]), sampled[i]) for i in idx]
            rng = np.random.default_rng([self.args.train.seed, k])
            pairs, pstats = build_pairs(groups, self.judge, ro.pair_rule, rng=rng, both_orders=self.both_orders)
            text_of = {self.judge_prompt(self.prompts[i]): self.texts[i] for i in idx}
            rows = [
                PairRow(
                    text_of[p.prompt],
                    p.chosen,
                    p.rejected,
                    p.chosen_winrate,
                    p.rejected_winrate,
                    p.soft_label,
                    f"iteration {k}",
                    getattr(p, "weight", 1.0),
                )
                for p in pairs
            ]
            payload = [(rows, pstats.as_dict())]
        if world > 1:
            dist.broadcast_object_list(payload, src=0)
        rows, pstats = payload[0]
        stats = {"source": f"online iteration {k}", **{f"rollout_{key}": v for key, v in pstats.items()}}
        if self.table:
            stats.update(self.game_metrics(trainer))
        return rows, stats

    def game_metrics(self, trainer):
        """Exact duality gap of mu_k on the first prompt when the judge is a finite game (table)."""
        from comal_openrlhf.evaluate import game_report

        rep = game_report(trainer.model.model, self.tokenizer, self.texts[0], self.judge.P, self.judge.labels)
        out = {"game_gap": rep["duality_gap"], "game_invalid_mass": rep["invalid_mass"]}
        out.update({f"game_p_{lab}": p for lab, p in zip(self.judge.labels, rep["policy"])})
        return out
