"""Online COMAL iterations: sample from the current policy, judge, build pairs (arXiv 2410.23223: the sampling and
preference steps of each iteration).

``OnlineSource.pairs(k, policy)`` is the online iteration source of comal_openrlhf.training.data's interface:

1. take ``--rollout.prompts_per_iteration`` prompts of ``--data.dataset`` (OpenRLHF's prompt key, input template
   and chat-template flags, ``data.PromptFormatter``), each rank a shard;
2. sample ``--rollout.n_samples_per_prompt`` responses per prompt from the policy mu_k with HF ``generate``
   (``comal_openrlhf.rollout.sampling``; ZeRO-3 partitioned weights included) or, with ``--rollout.backend vllm``, from
   OpenRLHF's vLLM engines holding mu_k's weights (``comal_openrlhf.rollout.vllm_engines``);
3. rank 0 judges every pair of a prompt's samples with the general-preference judge (``--judge.*``, both orders
   averaged by default) and builds pairs with ``--rollout.pair_rule`` (``comal_openrlhf.core.pairs``); the pairs are
   broadcast to every rank.

Pair weights (``--rollout.pair_weighting``): ``count`` keeps the weights of the pair rule (sample counts, the
Monte-Carlo estimate of the pair distribution mu_k x mu_k); ``policy`` replaces them after the precompute with
mu_k(y) mu_k(y') from the cached log-probs, the exact expectation when the samples cover the policy's support
(finite games, the demo). With the ``table`` judge every iteration also logs the exact duality gap of mu_k
(``comal_openrlhf.eval.exact.game_report``).

``optimistic`` (``--comal.algo optimistic``): the win-rate targets become the optimistic payoff
2 P(y > mu_k) - P(y > mu_{k-1}) (``core.pairs.optimistic_pairs``). Iteration k keeps samples of mu_k for the prompts
of iteration k + 1 (as text, and in the checkpoint: ``state_dict``); iteration k + 1 judges each of its distinct
responses against them. ``--comal.optimistic_previous reuse`` (default) keeps the samples iteration k trained on
(prompts outside its window are sampled once more): the payoff's second term is then the estimate of P(. > mu_k)
that step k itself used, the stochastic optimistic step ghat_{k+1}, 2 ghat_{k+1} - ghat_k, whose sum over steps
telescopes to the self-play sum plus one term. ``fresh`` draws a second, independent set from mu_k: unbiased for
P(y > mu_k) given mu_{k+1}, but the step then adds independent noise of both sets every iteration. Iteration 0 uses
mu_{-1} = mu_0: the payoff is the plain win rate.
"""

import time
from types import SimpleNamespace

import numpy as np
import torch.distributed as dist

from comal_openrlhf.core.judging import load_table
from comal_openrlhf.core.pairs import build_pairs, cross_winrates, optimistic_pairs
from comal_openrlhf.errors import BadInputError, PlanError
from comal_openrlhf.eval.exact import game_report
from comal_openrlhf.judges import build_judge
from comal_openrlhf.rollout.sampling import generate, num_calls
from comal_openrlhf.rollout.vllm_engines import VLLMSampler
from comal_openrlhf.training.data import IterationSource, PromptFormatter, fitting_prompts, load_prompts, prompt_window
from comal_openrlhf.training.peers import serial_group


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

    def __init__(self, args, strategy, tokenizer, pair_rule, heldout_of=None, optimistic=False):
        """``heldout_of``: this source is the held-out split of that training source (``--comal.keep_best``): its
        prompts are ``--comal.heldout`` (default ``--eval.dataset``, split ``--eval.split``), ``--comal.
        heldout_prompts`` per iteration, sampled from the same mu_k right after the training samples (the same vLLM
        engines, no second weight push) and judged by the same judge."""
        self.args, self.strategy, self.tokenizer = args, strategy, tokenizer
        self.timings = {}  # the phases' wall times of the last pairs() call
        self.ro = args.rollout
        self.pair_rule = pair_rule
        self.optimistic = optimistic and heldout_of is None
        self.previous = None  # optimistic: {"iteration": k, "samples": {prompt text: [samples of mu_k]}}
        if self.ro.n_samples_per_prompt < 2:
            raise BadInputError("--rollout.n_samples_per_prompt must be >= 2 to form pairs")
        data = args.data
        self.per_iteration, self.salt, self.label = self.ro.prompts_per_iteration, 0, "online"
        if heldout_of is not None:
            path = args.comal.heldout or args.eval.dataset
            data = SimpleNamespace(**{**vars(args.data), "dataset": path, "dataset_split": args.eval.split})
            data.dataset_probs, data.max_samples = None, int(1e8)
            self.per_iteration, self.salt, self.label = args.comal.heldout_prompts, 1, "held-out"
        self.formatter = PromptFormatter(data, tokenizer)
        self.prompts, self.texts = [], []
        flag = (
            "--data.dataset" if heldout_of is None else ("--comal.heldout" if args.comal.heldout else "--eval.dataset")
        )
        prompts, self.skips0 = load_prompts(data, strategy, args.train.seed, flag)
        for _, raw, text in fitting_prompts(prompts, self.formatter, tokenizer, args.data.max_len, self.skips0):
            self.prompts.append(raw)
            self.texts.append(text)
        if not self.prompts:
            raise BadInputError(f"no usable prompts in {data.dataset}: {self.skips0.summary()}")
        if self.skips0.total():
            strategy.print(f"[comal] {self.label} prompts skipped: {self.skips0.summary()}")
        self.both_orders = not args.judge.single_order
        self.vllm = None
        if heldout_of is not None:
            self.judge, self.exact_game, self.vllm = heldout_of.judge, None, heldout_of.vllm
            self.refresh_engines = False  # the training source pushed mu_k's weights this iteration
            return
        self.refresh_engines = True
        self.judge = build_judge(args.judge)
        spec = self.ro.exact_game or (args.judge.table if args.judge.kind == "table" else None)
        self.exact_game = load_table(spec) if spec else None  # (P, labels) for the exact duality gap
        if self.ro.backend == "vllm":
            self.vllm = VLLMSampler(args, args.model.model_name_or_path, args.data.max_len)

    def describe(self):
        mode = getattr(self.args.comal, "optimistic_previous", "reuse")
        opt = f", optimistic payoff, previous samples {mode}" if self.optimistic else ""
        return f"{self.label} ({len(self.prompts)} prompts, judge {self.judge.name}, pairs {self.pair_rule}{opt})"

    def state_dict(self):
        return self.previous if self.optimistic else None

    def load_state_dict(self, state):
        if self.optimistic:
            self.previous = state

    def prompt_indices(self, k):
        """The prompts of iteration k: a window of --rollout.prompts_per_iteration (held out: --comal.
        heldout_prompts), cycling over the dataset."""
        return prompt_window(len(self.prompts), k, self.per_iteration)

    def sample(self, k, policy, idx):
        """Step 1: {prompt index: n responses} sampled from mu_k, the same dict on every rank."""
        ro = self.ro
        rank, world = _rank_world()
        if self.vllm is not None:  # rank 0 samples every prompt from engines holding mu_k's weights
            if k > 0 and self.refresh_engines:  # the policy moved away from the weights the engines hold
                t0 = time.time()
                self.vllm.refresh(policy)
                self.timings["push_s"] = round(time.time() - t0, 3)
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
        """Sample, judge and pair iteration k's prompts; the stats carry each phase's wall time (seconds): sample_s
        (the weight push included), push_s (vLLM only), judge_s (rank 0, the judge and the pair building)."""
        idx = self.prompt_indices(k)
        self.timings = {}
        t0 = time.time()
        sampled = self.sample(k, policy, idx)
        self.timings["sample_s"] = round(time.time() - t0, 3)
        rank, world = _rank_world()
        payload = [None]
        t0 = time.time()
        if rank == 0:  # steps 2-3: judge every pair of each prompt's samples, build the pairs
            groups = [(self.texts[i], sampled[i]) for i in idx]
            rng = np.random.default_rng(
                [self.args.train.seed, k, self.salt] if self.salt else [self.args.train.seed, k]
            )
            pairs, pstats = build_pairs(
                groups,
                self.judge,
                self.pair_rule,
                rng=rng,
                both_orders=self.both_orders,
                judge_prompts=[self.formatter.judge_text(self.prompts[i]) for i in idx],
                origin=f"iteration {k}" if not self.salt else f"iteration {k} (held out)",
            )
            counters = {f"judge_{name}": v for name, v in self.judge.stats().items()}  # e.g. remote retries
            counters.update(self.timings, judge_s=round(time.time() - t0, 3))
            payload = [(pairs, {**pstats.as_dict(), **counters})]
            if self.optimistic:
                pairs, payload[0][1]["optimistic_judge_calls"] = self._optimistic(k, pairs, idx)
                payload = [(pairs, payload[0][1])]
        if self.optimistic:  # mu_k's samples for iteration k + 1's payoff (every rank samples)
            self._keep_previous(k, policy, sampled)
        if world > 1:  # the other ranks waited for rank 0's sampling and judging: the serial phases' bound
            dist.broadcast_object_list(payload, src=0, group=serial_group())
        pairs, pstats = payload[0]
        stats = {"source": f"{self.label} iteration {k}", **{f"rollout_{key}": v for key, v in pstats.items()}}
        if self.exact_game is not None:
            stats.update(self.game_metrics(policy))
        return pairs, stats

    def _optimistic(self, k, pairs, idx):
        """(pairs with the optimistic payoff as win-rate targets, judge calls spent on it); rank 0."""
        if k == 0 or not pairs:  # mu_{-1} = mu_0: the payoff is the win rate itself
            return pairs, 0
        prev = self.previous
        if prev is None or prev.get("iteration") != k - 1:
            have = "none" if prev is None else f"iteration {prev.get('iteration')}'s"
            raise PlanError(
                f"--comal.algo optimistic: iteration {k} needs the samples of mu_{k - 1} kept by iteration {k - 1}, "
                f"but the source holds {have} (a checkpoint written without them cannot continue this run)"
            )
        texts = sorted({self.texts[i] for i in idx})
        distinct = {t: [] for t in texts}
        for p in pairs:
            for y in (p.chosen, p.rejected):
                if y not in distinct[p.prompt]:
                    distinct[p.prompt].append(y)
        groups = [
            (self.formatter.judge_text(self.prompts[self.texts.index(t)]), distinct[t], prev["samples"][t])
            for t in texts
        ]
        rates, calls = cross_winrates(self.judge, groups, both_orders=self.both_orders)
        rate = {(t, y): float(r) for t, rs in zip(texts, rates) for y, r in zip(distinct[t], rs)}
        return optimistic_pairs(pairs, rate), calls

    def _keep_previous(self, k, policy, sampled):
        """mu_k's samples for iteration k + 1's prompts: this iteration's (reuse) where it sampled the prompt, else
        (and always with fresh) a new draw from mu_k."""
        nxt = self.prompt_indices(k + 1)
        reuse = getattr(self.args.comal, "optimistic_previous", "reuse") == "reuse"
        missing = [i for i in nxt if not (reuse and i in sampled)]
        more = {}
        if missing:
            refresh, self.refresh_engines = self.refresh_engines, False  # the engines already hold mu_k
            try:
                more = self.sample(k, policy, missing)
            finally:
                self.refresh_engines = refresh
        samples = {}
        for i in nxt:
            got = sampled.get(i) if reuse and i in sampled else more.get(i)
            if got is not None:
                samples.setdefault(self.texts[i], []).extend(got)
        self.previous = {"iteration": k, "samples": samples}

    def game_metrics(self, policy):
        """Exact duality gap of mu_k on the first prompt when the responses that count are a finite game's options
        (the table judge's, or ``--rollout.exact_game``)."""
        P, labels = self.exact_game
        rep = game_report(policy.model, self.tokenizer, self.texts[0], P, labels)
        out = {"game_gap": rep["duality_gap"], "game_invalid_mass": rep["invalid_mass"]}
        out.update({f"game_p_{lab}": p for lab, p in zip(labels, rep["policy"])})
        return out
