"""COMAL on OpenRLHF: the outer loop of the COMAL meta-algorithm (arXiv 2410.23223) over OpenRLHF's DPO trainer.

One iteration k, each stage a method of ``COMALTrainer`` named after its step:

1. ``collect_pairs``   sample responses from mu_k and judge them, or read the iteration's pairs (the source);
2. ``precompute``      the iteration record: the pairs with log mu_k(y) and log ref(y) of every response, computed
                       once (OpenRLHF's DPOTrainer recomputes the reference at every step; here neither is); with
                       ``--comal.keep_best`` also the iteration's held-out pairs (sampled from mu_k and judged, or
                       read) with the same cache;
3. ``train``           ``--train.max_epochs`` passes of the prox loss around log C = (1 - r) log mu_k + r log ref
                       (comal_openrlhf.core.losses: the prox step mu_k+1 ~ mu_k^(1-r) ref^r exp(P(y > mu_k)/beta)),
                       with a fresh optimizer state and learning-rate schedule: each iteration is its own prox problem.
                       ``keep_best`` (the official model selection) scores the held-out prox loss around the same
                       centre at every epoch end and every ``--eval.steps`` steps and ends the iteration with the
                       best-scoring weights;
4. ``evaluate``        the held-out prox loss with the anchor as centre (``--eval.dataset`` pairs);
5. ``round_rollback``  at the end of a round, with ``--comal.round_rollback``, the policy returns to the round's
                       iterate with the lowest stage-4 loss (not the official selection; named for what it does);
6. ``advance_if_due``  every K iterations the anchor takes the policy's weights, ref <- pi (ZeRO-3 safe); with
                       LoRA the anchor is a frozen second adapter on the policy's base model and the advance copies
                       the policy adapter into it (comal_openrlhf.training.lora);
7. ``checkpoint``      the history line and a DeepSpeed checkpoint whose client state restores the loop.

Resuming (``restore``) sets the state these stages read (iteration, step inside it, anchor, the iteration record,
RNG) and then ``fit`` enters the same loop: there is no second path through it.

Wrapper or subclass: ``COMALTrainer`` subclasses OpenRLHF's ``DPOTrainer`` (openrlhf/trainer/dpo_trainer.py)
because its constructor is what wires the DeepSpeed strategy, the wandb / TensorBoard loggers from OpenRLHF's
``--logger.*`` flags and the NLL / aux-loss switches, and its forward helpers (``concatenated_forward``) stay valid.
What assumes one pass over a fixed dataloader against a fixed reference is replaced or refused: ``fit`` is the loop
above, ``evaluate`` is stage 4, ``beta`` reads the prox loss's current beta (it changes between rounds), and
``save_logs_and_checkpoints`` raises (stage 7 checkpoints).
"""

import contextlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.distributed as dist
from openrlhf.trainer.dpo_trainer import DPOTrainer
from tqdm import tqdm
from transformers.trainer import get_scheduler

from comal_openrlhf.core.losses import NEEDS_WIN_RATES, ProxLoss
from comal_openrlhf.core.record import IterationRecord
from comal_openrlhf.core.schedule import plan_differences
from comal_openrlhf.errors import BadInputError, NonFiniteLossError, PlanError, StorageError
from comal_openrlhf.eval.winrate import winrate
from comal_openrlhf.rollout.sampling import generate
from comal_openrlhf.storage import append_lines, guarded, publish_dir, save_torch, write_atomic, write_json
from comal_openrlhf.training import lora
from comal_openrlhf.training.data import PairDataset
from comal_openrlhf.training.logps import pair_logps, pair_logps_both
from comal_openrlhf.weights import copy_weights, load_weights, state_dict_on_rank0

ADVANCE_TOLERANCE = 1e-3  # policy vs anchor sequence log-probs right after ref <- pi (bf16 forwards, same weights)


@dataclass
class TrainerSettings:
    """What the loop needs beyond OpenRLHF's trainer arguments (from train_comal's ``--comal.*`` flags)."""

    logps_kernel: str = "auto"
    iteration_ckpt: bool = True
    policy_weighting: bool = False  # --rollout.pair_weighting policy
    mass_coef: float = 0.0
    keep_optimizer_state: bool = False
    keep_best: bool = False  # the official per-iteration selection on held-out pairs (stage 3)
    round_rollback: bool = False  # the round-level rollback on --eval.dataset (stage 5)
    eval_steps: int = -1  # --eval.steps: keep_best also scores every this many optimizer steps (epoch ends always)
    batch_unit: str = "pairs"  # what --train.batch_size counts: "pairs" (OpenRLHF) or "prompts" (see accumulation)


def _read_latest(ckpt_path):
    try:
        with open(os.path.join(ckpt_path, "latest")) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def support_mass_penalty(pairs, idx, pi_w, pi_l, mu_w, mu_l):
    """(log pi(S_x) - log mu_k(S_x))^2 averaged over the prompts x of a batch, S_x = the distinct responses of x in
    the batch (``--comal.mass_coef``; not in the paper). The prox step reweights mass among responses; the pair
    losses see only log-prob differences, so with Adam the policy can leak mass to outputs never sampled. This keeps
    the total mass of the sampled support where mu_k had it."""
    seen = {}
    for j, i in enumerate(idx.tolist()):
        p = pairs[i]
        seen.setdefault(p.prompt, {}).setdefault(p.chosen, (pi_w[j], mu_w[j]))
        seen[p.prompt].setdefault(p.rejected, (pi_l[j], mu_l[j]))
    terms = []
    for responses in seen.values():
        pi = torch.stack([v[0] for v in responses.values()])
        mu = torch.stack([v[1] for v in responses.values()])
        terms.append((torch.logsumexp(pi, 0) - torch.logsumexp(mu, 0)) ** 2)
    return torch.stack(terms).mean()


def policy_weights(record: IterationRecord) -> torch.Tensor:
    """Pair weights mu_k(y) mu_k(y') from the cached log-probs (``--rollout.pair_weighting policy``): the exact
    expectation over y, y' ~ mu_k when a prompt's samples cover mu_k's support (finite games)."""
    return torch.exp(record.logp_mu_chosen.double() + record.logp_mu_rejected.double())


def reset_optimizer_state(optimizer):
    """Forget Adam's moments and step counts (DeepSpeed's wrappers hold the torch optimizer as ``.optimizer``)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    inner.state.clear()
    for group in inner.param_groups:
        group.pop("step", None)  # DeepSpeed's FusedAdam counts steps per group


def optimizer_steps_in_state(optimizer) -> int:
    """The largest Adam step count held in the optimizer state (0 after a reset)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    steps = [int(s["step"]) for s in inner.state.values() if "step" in s]
    steps += [int(g["step"]) for g in inner.param_groups if "step" in g]
    return max(steps, default=0)


class COMALTrainer(DPOTrainer):
    def __init__(
        self,
        model,
        ref_model,
        strategy,
        tokenizer,
        optim,
        scheduler,
        source,
        plan,
        scheduler_cfg,
        settings: TrainerSettings,
        max_norm=1.0,
        max_epochs=1,
        save_hf_ckpt=False,
        disable_ds_ckpt=False,
        eval_dataset=None,
        run_dir=None,
        winrate_probe=None,
        heldout_source=None,
    ):
        super().__init__(
            model=model,
            ref_model=ref_model,
            strategy=strategy,
            tokenizer=tokenizer,
            optim=optim,
            train_dataloader=None,
            eval_dataloader=None,
            scheduler=scheduler,
            max_norm=max_norm,
            beta=plan.beta_at(0),
            max_epochs=max_epochs,
            save_hf_ckpt=save_hf_ckpt,
            disable_ds_ckpt=disable_ds_ckpt,
        )
        args = strategy.args
        self.plan = plan
        self.source = source
        self.scheduler_cfg = scheduler_cfg
        self.settings = settings
        self.eval_dataset = eval_dataset
        self.run_dir = run_dir
        self.winrate_probe = winrate_probe
        self.heldout_source = heldout_source  # held-out pairs per iteration for keep_best (None without it)
        self.heldout = None  # (dataset, record with mu_k / anchor log-probs) of the current iteration
        self.loss_fn = ProxLoss(plan.prox, plan.beta_at(0), plan.ref_weight, args.model.label_smoothing)
        # what a resume must find unchanged: the algorithm's settings, the source of the pairs and the judge
        self.run_settings = {**plan.as_dict(), "source": source.describe()}
        self.state_dir = args.ckpt.path.rstrip("/") + "_comal"
        self.history_path = os.path.join(args.ckpt.output_dir, "comal_iterations.jsonl")
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.base_accum = self.strategy.accumulated_gradient
        self.grad_accum = self.base_accum  # this iteration's micro-batches per optimizer step (accumulation())
        # the state a checkpoint restores and the stages read
        self.iteration = 0
        self.micro_step = 0  # micro-batches done inside the current iteration
        self.global_step = 0
        self.anchor_version = 0
        self.history = []
        self.best = None  # (eval loss, iteration) of the kept iterate of the current round (round_rollback)
        self.best_in_iter = None  # {"loss", "step", "checks"} of keep_best inside the current iteration
        self._resumed = None  # (record, stats) of the iteration being resumed
        self._dataset_cache = (None, None)
        self._last_good_tag = _read_latest(args.ckpt.path)  # the checkpoint a resume would load now
        # LoRA: no reference model; the anchor is the adapter "anchor" on the policy's own base (training.lora)
        self.lora_anchor = ref_model is None and lora.peft_model(model) is not None
        if ref_model is None and not self.lora_anchor:
            raise PlanError("COMALTrainer needs a reference model, or a LoRA policy carrying the anchor adapter")
        self.base_fingerprint = None  # LoRA: the frozen base weights' fingerprint at the start of fit

    @contextlib.contextmanager
    def anchor(self):
        """The anchor as an actor for the forwards inside the block: the reference model, or (LoRA) the policy with
        its anchor adapter active. Inside the block ``self.model`` is the anchor too: callers use only what it
        yields, under no_grad."""
        if self.lora_anchor:
            with lora.active(self.model, lora.ANCHOR):
                yield self.model
        else:
            yield self.ref_model

    @property
    def _policy_select(self):
        """The policy's own parameters (state files of keep_best and round_rollback): with LoRA its adapter only."""
        return lora.is_policy_param if self.lora_anchor else None

    # -------------------------------------------------- inherited API made honest
    @property
    def beta(self):
        loss_fn = self.__dict__.get("loss_fn")
        return loss_fn.beta if isinstance(loss_fn, ProxLoss) else self.__dict__.get("_initial_beta")

    @beta.setter
    def beta(self, value):  # DPOTrainer.__init__ assigns it before the prox loss exists
        self.__dict__["_initial_beta"] = value

    def save_logs_and_checkpoints(self, *args, **kwargs):
        raise NotImplementedError("COMALTrainer logs per step in train() and checkpoints in checkpoint()")

    # ------------------------------------------------------------------ logging
    def _log(self, prefix, logs, step):
        if not self.strategy.is_rank_0():
            return
        if self._wandb is not None:
            self._wandb.log({f"{prefix}/{k}": v for k, v in {**logs, "global_step": step}.items()})
        elif self._tensorboard is not None:
            for k, v in logs.items():
                self._tensorboard.add_scalar(f"{prefix}/{k}", v, step)

    def _dataset(self, pairs):
        """The tokenised pairs of the current record (tokenised once per iteration)."""
        if self._dataset_cache[0] is not pairs:
            self._dataset_cache = (pairs, PairDataset(pairs, self.tokenizer, self.args.data.max_len))
        return self._dataset_cache[1]

    def _logps(self, actor, batch):
        """(chosen sum, rejected sum, chosen mean) sequence log-probs of a batch under the policy or the anchor."""
        return pair_logps(actor, batch, self.tokenizer.pad_token_id, self.settings.logps_kernel)

    def _loader(self, dataset, shuffle, epoch=0, consumed=0, batch_size=None):
        """Each rank's shard of ``dataset`` (OpenRLHF's DistributedSampler, padded to a whole number of rows per rank)
        in micro-batches of ``batch_size`` (default: --train.micro_batch_size)."""
        loader = self.strategy.setup_dataloader(
            dataset,
            batch_size or self.args.train.micro_batch_size,
            False,
            shuffle,
            dataset.collate_fn,
            drop_last=False,
        )
        loader.sampler.set_epoch(epoch, consumed_samples=consumed)
        return loader

    # ------------------------------------------------------------------- the loop
    def fit(self, args=None, consumed_samples=0, num_update_steps_per_epoch=None):
        """The COMAL meta-algorithm (arXiv 2410.23223): for each iteration k, the stages of the module docstring."""
        if self.winrate_probe is not None:
            self.winrate_probe.start(self)
        if self.lora_anchor:
            self.base_fingerprint = lora.base_fingerprint(self.model)
        bar = tqdm(
            total=self.plan.iterations,
            initial=self.iteration,
            desc="COMAL iterations",
            disable=not self.strategy.is_rank_0(),
        )
        for k in range(self.iteration, self.plan.iterations):
            t0 = time.time()
            self.iteration = k
            self.loss_fn.beta = self.plan.beta_at(k)
            self.loss_fn.ref_weight = self.plan.ref_weight_at(k)  # extragradient's real step: the anchor, r = 1
            if self._resumed is not None:
                record, stats, self.heldout = self._resumed
                self._resumed = None
            else:
                pairs, stats = self.collect_pairs(k)
                record = self.precompute(k, pairs, stats) if pairs else None
            t1 = time.time()
            logs = self.train(k, record) if record is not None else {}
            logs["train_s"] = round(time.time() - t1, 3)
            logs.update(self.evaluate())
            logs.update(self.round_rollback(k, logs))
            t1 = time.time()
            advanced, advance_err = self.advance_if_due(k, record)
            logs["advance_s"] = round(time.time() - t1, 3)
            self.checkpoint(k, record, logs, stats, advanced, advance_err, t0)
            bar.set_postfix(loss=logs.get("loss", float("nan")))
            bar.update()
        bar.close()
        if self._wandb is not None and self.strategy.is_rank_0():
            self._wandb.finish()
        if self._tensorboard is not None and self.strategy.is_rank_0():
            self._tensorboard.close()

    # ------------------------------------------------------ stage 1: the pairs
    def collect_pairs(self, k):
        """Sample and judge (online) or read (offline, static) the pairs of iteration k; counted skips reported."""
        self.micro_step = 0
        pairs, stats = self.source.pairs(k, self.model)
        skips = stats.pop("skips", None)
        if skips is not None:
            if skips.total() or skips.truncated:
                trunc = f"; {skips.truncated} truncated to --data.max_len" if skips.truncated else ""
                self.strategy.print(
                    f"[comal] iteration {k}: {len(pairs)} pairs kept, {skips.total()} skipped: {skips.summary()}"
                    f"{trunc}"
                )
            stats["skips"] = skips.as_dict()
        if not pairs:
            if not self.source.allow_empty:
                raise BadInputError(f"iteration {k}: no usable pairs in {stats.get('source', '')}")
            self.strategy.print(
                f"[comal] iteration {k}: no prompt has 2 distinct valid samples; iteration skipped (policy unchanged)"
            )
        return pairs, stats

    # -------------------------------------------------- stage 2: the record
    @torch.no_grad()
    def precompute(self, k, pairs, stats):
        """The iteration record: sequence log-probs of every pair under mu_k (the policy now) and the anchor, one
        pass; each rank computes its shard and the shards are gathered so every rank holds the whole record. The
        record is saved beside the checkpoints so a resume inside iteration k trains on the same pairs and cache."""
        t0 = time.time()
        record = IterationRecord.from_pairs(pairs)
        if self.plan.prox in NEEDS_WIN_RATES and not record.has_winrates:
            raise BadInputError(f"iteration {k}: the {self.plan.prox} loss needs win rates for every pair")
        record = self._cached(record, self._dataset(record.pairs), "Precompute log-probs")
        if self.settings.policy_weighting:
            record = record.with_weights(policy_weights(record))
        self.heldout = self._heldout_pairs(k, stats) if self.heldout_source is not None else None
        stats["precompute_s"] = round(time.time() - t0, 3)
        if self.strategy.is_rank_0():
            os.makedirs(self.state_dir, exist_ok=True)
            heldout = self.heldout[1].state_dict() if self.heldout is not None else None
            save_torch({"record": record.state_dict(), "stats": stats, "heldout": heldout}, self.iter_state_path(k))
            old = self.iter_state_path(k - 1)
            if os.path.exists(old):
                os.remove(old)
        return record

    def _heldout_pairs(self, k, stats):
        """keep_best's held-out pairs of iteration k (sampled from mu_k and judged, or read) with their mu_k and
        anchor log-probs; None when the iteration gave none (the selection is then skipped, and said)."""
        pairs, hstats = self.heldout_source.pairs(k, self.model)
        stats["heldout_pairs"] = len(pairs)
        if not pairs:
            self.strategy.print(
                f"[comal] iteration {k}: no held-out pairs ({hstats.get('source')}); keep_best skipped"
            )
            return None
        record = IterationRecord.from_pairs(pairs)
        dataset = PairDataset(record.pairs, self.tokenizer, self.args.data.max_len)
        return dataset, self._cached(record, dataset, "Held-out log-probs")

    @torch.no_grad()
    def _cached(self, record, dataset, desc):
        """``record`` with log mu_k (the policy now) and log ref of every pair, one pass; each rank computes its shard
        and the shards are gathered so every rank holds the whole record. Both models run on each micro-batch of
        --comal.precompute_batch_size pairs and one call reads both logits (``pair_logps_both``); the log-probs stay on
        the device until the pass ends (no host round trip per batch). The sampler gives each rank the same shard
        whatever the batch size, so the record does not depend on it."""
        self.model.eval()
        idx, vals = [], []
        loader = self._loader(dataset, shuffle=False, batch_size=self._precompute_batch_size())
        pad = self.tokenizer.pad_token_id
        for batch in tqdm(loader, desc=desc, disable=not self.strategy.is_rank_0(), leave=False):
            if self.lora_anchor:  # one model, two adapters: the policy's forward, then the anchor's
                mu_w, mu_l, _ = self._logps(self.model, batch)
                with self.anchor() as ref:
                    ref_w, ref_l, _ = self._logps(ref, batch)
                mu_and_ref = (mu_w, mu_l, ref_w, ref_l)
            else:
                mu_and_ref = pair_logps_both(self.model, self.ref_model, batch, pad, self.settings.logps_kernel)
            idx.append(batch[-1])
            vals.append(torch.stack(mu_and_ref).float())
        mine = (torch.cat(idx), torch.cat(vals, 1).cpu()) if idx else (torch.empty(0, dtype=torch.long), None)
        parts = [mine]
        if self.world > 1:
            parts = [None] * self.world
            dist.all_gather_object(parts, mine)
        logps = torch.full((4, len(record)), float("nan"))
        for i, v in parts:
            if v is not None:
                logps[:, i] = v
        if torch.isnan(logps).any():
            raise RuntimeError("precompute left pairs without log-probs (the sampler did not cover the dataset)")
        self.model.train()
        return record.with_logps(*logps)

    def _precompute_batch_size(self):
        """--comal.precompute_batch_size, default --train.micro_batch_size."""
        size = getattr(getattr(self.args, "comal", None), "precompute_batch_size", None)
        if size is None:
            return self.args.train.micro_batch_size
        if not (isinstance(size, int) and size >= 1):
            raise PlanError(f"--comal.precompute_batch_size {size}: must be an integer >= 1")
        return size

    # ------------------------------------------------------- stage 3: train
    def _restart_schedule(self, steps, done=0):
        """A fresh warm-up + decay of the learning rate for the iteration's ``steps`` optimizer steps."""
        cfg = self.scheduler_cfg
        name = cfg["lr_scheduler"]
        kwargs = (
            {"min_lr_rate": cfg["min_lr_ratio"]} if name in {"cosine_with_min_lr", "cosine_warmup_with_min_lr"} else {}
        )
        for group in self.scheduler.optimizer.param_groups:
            group["lr"] = group["initial_lr"]
        fresh = get_scheduler(
            name,
            self.scheduler.optimizer,
            num_warmup_steps=math.ceil(steps * cfg["lr_warmup_ratio"]),
            num_training_steps=steps,
            scheduler_specific_kwargs=kwargs,
        )
        self.scheduler.lr_lambdas = fresh.lr_lambdas
        self.scheduler.base_lrs = fresh.base_lrs
        self.scheduler.last_epoch = done
        lrs = [base * lam(done) for base, lam in zip(fresh.base_lrs, fresh.lr_lambdas)]
        for group, lr in zip(self.scheduler.optimizer.param_groups, lrs):
            group["lr"] = lr
        self.scheduler._last_lr = lrs

    def train(self, k, record):
        """``--train.max_epochs`` passes over the record's pairs with the prox loss; returns the mean step logs.

        The step count is rounded up to whole optimizer steps. A resume continues at ``micro_step`` with the
        sampler's order for that pass (``set_epoch``), so the same micro-batches follow.
        """
        dataset = self._dataset(record.pairs)
        mb = self.args.train.micro_batch_size
        per_pass = len(self._loader(dataset, shuffle=True))
        self._set_accumulation(self.accumulation(record, per_pass))
        micro_total = math.ceil(per_pass * self.epochs / self.grad_accum) * self.grad_accum
        if self.micro_step == 0:
            self.best_in_iter = None
            if not self.settings.keep_optimizer_state:
                reset_optimizer_state(self.optimizer)
        self._restart_schedule(micro_total // self.grad_accum, self.micro_step // self.grad_accum)
        bar = tqdm(
            total=micro_total,
            initial=self.micro_step,
            desc=f"Iteration {k} steps",
            disable=not self.strategy.is_rank_0(),
        )
        sums, count = {}, 0
        self.model.train()
        if self.ref_model is not None:
            self.ref_model.eval()
        while self.micro_step < micro_total:
            epoch, done = divmod(self.micro_step, per_pass)
            loader = self._loader(dataset, True, epoch=k * 1000 + epoch, consumed=done * mb * self.world)
            for batch in loader:
                if self.micro_step >= micro_total:
                    break
                logs = self._train_step(batch, record)
                for n, v in logs.items():
                    sums[n] = sums.get(n, 0.0) + v
                count += 1
                self.micro_step += 1
                bar.update()
                if self.micro_step % self.grad_accum == 0:
                    self._after_optimizer_step(k, logs, bar, micro_total)
                    self._select_if_due(k, per_pass, micro_total)
        bar.close()
        out = {n: v / max(count, 1) for n, v in sums.items()}
        out["steps"] = micro_total // self.grad_accum
        out["optimizer_steps_in_state"] = optimizer_steps_in_state(self.optimizer)
        out.update(self._keep_best_weights(k, micro_total // self.grad_accum))
        return out

    # ------------------------------------------- stage 3b: the official model selection
    def _select_if_due(self, k, per_pass, micro_total):
        """keep_best: after an optimizer step that ends an epoch (or the iteration), or every --eval.steps steps,
        score the policy by the held-out prox loss around this iteration's centre; the best weights are saved
        (state_dir/best_of_iteration.pt) with their step and loss."""
        if not self.settings.keep_best or self.heldout is None:
            return
        step = self.micro_step // self.grad_accum
        prev = self.micro_step - self.grad_accum
        epoch_end = self.micro_step // per_pass > prev // per_pass or self.micro_step == micro_total
        every = self.settings.eval_steps
        if not (epoch_end or (every > 0 and step % every == 0)):
            return
        loss = self._heldout_loss(*self.heldout, centre="prox")["loss"]
        best = self.best_in_iter or {"loss": math.inf, "step": None, "checks": 0}
        best["checks"] += 1
        best["last_loss"], best["last_step"] = loss, step
        if loss < best["loss"]:
            best["loss"], best["step"] = loss, step
            state = state_dict_on_rank0(self.model, self._policy_select)
            if self.strategy.is_rank_0():
                os.makedirs(self.state_dir, exist_ok=True)
                save_torch({"iteration": k, "step": step, "state": state}, self.best_path)
            if dist.is_initialized():
                dist.barrier()
        self.best_in_iter = best
        self._log("heldout", {"prox_loss": loss, "iteration": k, "step_in_iteration": step}, self.global_step)

    def _keep_best_weights(self, k, last_step):
        """End of a keep_best iteration: the policy takes the best-scoring weights (so they become mu_k+1)."""
        best = self.best_in_iter
        if not self.settings.keep_best or best is None or best["step"] is None:
            return {}
        if best["step"] != last_step:
            if dist.is_initialized():
                dist.barrier()
            saved = torch.load(self.best_path, map_location="cpu", weights_only=True)
            if saved["iteration"] != k or saved["step"] != best["step"]:
                raise PlanError(
                    f"{self.best_path} holds iteration {saved['iteration']} step {saved['step']}, "
                    f"not the kept iteration {k} step {best['step']}"
                )
            load_weights(self.model, saved["state"], self._policy_select)
            refresh = getattr(self.optimizer, "refresh_fp32_params", None)
            if refresh is not None:  # DeepSpeed keeps fp32 master weights beside the bf16 module
                refresh()
            self.strategy.print(
                f"[comal] iteration {k}: keeping step {best['step']} of {last_step} (held-out prox loss "
                f"{best['loss']:.6g}, last {best['last_loss']:.6g})"
            )
        return {
            "kept_step": best["step"],
            "kept_heldout_loss": best["loss"],
            "last_heldout_loss": best["last_loss"],
            "heldout_checks": best["checks"],
        }

    def accumulation(self, record, per_pass):
        """Micro-batches per optimizer step for this iteration.

        ``batch_unit`` "pairs": OpenRLHF's fixed accumulation, --train.batch_size pairs per step. "prompts": the
        iteration makes S = ceil(epochs * prompts / batch_size) optimizer steps, each over about the pairs of
        batch_size prompts, i.e. accumulation ceil(per_pass * epochs / S). With one pair per prompt (top2) both
        agree; with all_soft's N(N-1)/2 pairs per prompt the step count and each step's size (the loss is the
        weighted mean over the step's pairs, weights of mean 1) stay those of the official one-pair pipeline.
        """
        if self.settings.batch_unit != "prompts":
            return self.base_accum
        prompts = len({p.prompt for p in record.pairs})
        steps = max(1, math.ceil(self.epochs * prompts / self.args.train.batch_size))
        return max(1, math.ceil(per_pass * self.epochs / steps))

    def _set_accumulation(self, accum):
        """Give the DeepSpeed engine the iteration's accumulation: its loss scaling (1 / accumulation steps) and,
        through an explicit boundary flag set before each backward, its step boundaries (its own micro-step counter
        runs across iterations whose accumulations differ)."""
        self.grad_accum = accum
        engine = getattr(self.model, "model", self.model)
        if accum != engine.gradient_accumulation_steps():
            engine.set_train_batch_size(accum * self.args.train.micro_batch_size * self.world)

    def _after_optimizer_step(self, k, logs, bar, micro_total):
        self.global_step += 1
        logs = {**logs, "lr": self.scheduler.get_last_lr()[0], "beta": self.loss_fn.beta, "iteration": k}
        logs["grad_norm"] = self.strategy.get_grad_norm(self.model)
        bar.set_postfix(loss=logs["loss"], accuracy=logs["accuracy"])
        if self.global_step % self.args.logger.logging_steps == 0:
            self._log("train", logs, self.global_step)
        save_steps = self.args.ckpt.save_steps
        if save_steps > 0 and self.global_step % save_steps == 0 and self.micro_step < micro_total:
            self.save_checkpoint("step")

    def _train_step(self, batch, record):
        idx = batch[-1]
        device = next(self.model.parameters()).device
        pi_w, pi_l, nll = self._logps(self.model, batch)
        pb = record.batch(idx).to(device)
        loss, chosen_reward, reject_reward = self.loss_fn(
            pi_w, pi_l, pb, reduction_size=self.args.train.micro_batch_size
        )
        total = loss + (nll * self.args.model.nll_loss_coef if self.nll_loss else 0)
        if self.settings.mass_coef > 0:
            penalty = support_mass_penalty(record.pairs, idx, pi_w, pi_l, pb.logp_mu_chosen, pb.logp_mu_rejected)
            total = total + self.settings.mass_coef * penalty
        bad = torch.tensor([0.0 if torch.isfinite(total) else 1.0])
        if self.world > 1:
            dist.all_reduce(bad)
        if bad.item() > 0:
            raise NonFiniteLossError(
                f"non-finite loss at iteration {self.iteration}, micro-step {self.micro_step} "
                f"(loss {loss.item()}); training stopped, the last good checkpoint in {self.args.ckpt.path} is kept. "
                "Lower --adam.lr or check the data / win rates."
            )
        engine = getattr(self.model, "model", self.model)
        engine.set_gradient_accumulation_boundary((self.micro_step + 1) % self.grad_accum == 0)
        self.strategy.backward(total, self.model, self.optimizer)
        self.strategy.optimizer_step(self.optimizer, self.model, self.scheduler)
        return {
            "loss": loss.item(),
            "accuracy": (chosen_reward > reject_reward).float().mean().item(),
            "chosen_reward": chosen_reward.mean().item(),
            "reject_reward": reject_reward.mean().item(),
            "margin": (chosen_reward - reject_reward).mean().item(),
            "logratio_to_anchor": ((pi_w - pb.logp_ref_chosen) + (pi_l - pb.logp_ref_rejected)).mean().item() / 2,
        }

    # ---------------------------------------------------- stage 4: evaluate
    @torch.no_grad()
    def evaluate(self, eval_dataloader=None, steps=0):
        """``--eval.dataset`` after each iteration: the prox loss with the anchor as centre (OpenRLHF's DPO/IPO
        eval loss against its reference) and the share of pairs whose log-ratio margin to the anchor is positive.
        Returns {} without an eval dataset."""
        if self.eval_dataset is None:
            return {}
        held = self._heldout_loss(*self.eval_dataset)
        logs = {"eval_loss": held["loss"], "eval_accuracy": held["accuracy"]}
        if self.winrate_probe is not None and self.winrate_probe.due(self.iteration):
            logs.update(self.winrate_probe(self))
        self._log("eval", logs, self.iteration)
        return logs

    @torch.no_grad()
    def _heldout_loss(self, dataset, record, centre="anchor"):
        """The weighted mean prox loss on held-out pairs and the share with a positive margin. ``centre`` "anchor":
        log C = log ref (the anchor's log-probs computed now; stage 4); "prox": the record's cached log mu_k and log
        ref, i.e. the iteration's own centre (1 - r) log mu_k + r log ref (keep_best)."""
        self.model.eval()
        loss_sum, hits, n = 0.0, 0.0, 0
        desc = f"Held-out loss, iteration {self.iteration}"
        for batch in tqdm(self._loader(dataset, False), desc=desc, disable=not self.strategy.is_rank_0(), leave=False):
            pw, pl, _ = self._logps(self.model, batch)
            pb = record.batch(batch[-1]).to(pw.device)
            if centre == "anchor":  # log mu := log ref, so log C = log ref for every r
                with self.anchor() as ref:
                    rw, rl, _ = self._logps(ref, batch)
                pb = replace(pb, logp_mu_chosen=rw, logp_mu_rejected=rl, logp_ref_chosen=rw, logp_ref_rejected=rl)
            loss, cr, rr = self.loss_fn(pw, pl, pb, reduction_size=1)
            loss_sum += loss.item()
            hits += (cr > rr).float().sum().item()
            n += len(pw)
        self.model.train()
        totals = self.strategy.all_reduce({"loss": loss_sum, "hits": hits, "n": float(n)}, op="sum")
        n = max(totals["n"], 1)
        return {"loss": totals["loss"] / n, "accuracy": totals["hits"] / n}

    # --------------------------------------------------- stage 5: round rollback
    def round_rollback(self, k, logs):
        """With ``--comal.round_rollback``: remember the round's iterate with the lowest anchor-centred held-out loss
        on --eval.dataset, and at the round's end load it into the policy (so it becomes mu_{k+1} and, at an advance,
        the anchor). Not the official selection (that is keep_best, inside each iteration)."""
        if not self.settings.round_rollback:
            return {}
        loss = logs["eval_loss"]
        path = os.path.join(self.state_dir, "best_of_round.pt")
        if self.best is None or loss < self.best[0]:
            self.best = (loss, k)
            state = state_dict_on_rank0(self.model, self._policy_select)
            if self.strategy.is_rank_0():
                os.makedirs(self.state_dir, exist_ok=True)
                save_torch(state, path)
        out = {}
        if self.plan.round_ends_after(k):
            best_k = self.best[1]
            if best_k != k:
                if dist.is_initialized():
                    dist.barrier()
                load_weights(self.model, torch.load(path, map_location="cpu", weights_only=True), self._policy_select)
                refresh = getattr(self.optimizer, "refresh_fp32_params", None)
                if refresh is not None:  # DeepSpeed keeps fp32 master weights beside the bf16 module
                    refresh()
                self.strategy.print(f"[comal] end of round: the policy returns to iteration {best_k}'s weights")
            out = {"kept_iteration": best_k, "kept_eval_loss": self.best[0]}
            self.best = None
        return out

    # ----------------------------------------------------- stage 6: advance
    def advance_if_due(self, k, record):
        """ref <- pi every K iterations (the reference advance of COMAL), then a check that both give the same
        log-probs right away: a write lost under ZeRO-3 would show here. Returns (advanced, max abs difference)."""
        if not self.plan.advance_after(k):
            return False, None
        if self.lora_anchor:  # the policy adapter into the anchor adapter: megabytes, not the model
            lora.advance(self.model)
        else:
            copy_weights(self.model, self.ref_model)
        err = self._check_advance(record) if record is not None else None
        self.anchor_version += 1
        if self.lora_anchor:  # the anchor file holds the anchor adapter only
            state = state_dict_on_rank0(self.model, lora.is_anchor_param)
        else:
            state = state_dict_on_rank0(self.ref_model)
        if self.strategy.is_rank_0():
            os.makedirs(self.state_dir, exist_ok=True)
            save_torch(state, self.anchor_path(self.anchor_version))
            stale = self.anchor_path(self.anchor_version - 2)
            if os.path.exists(stale):
                os.remove(stale)
        if dist.is_initialized():
            dist.barrier()
        return True, err

    @torch.no_grad()
    def _check_advance(self, record):
        batch = next(iter(self._loader(self._dataset(record.pairs), shuffle=False)))
        self.model.eval()
        pw, pl, _ = self._logps(self.model, batch)
        with self.anchor() as ref:
            rw, rl, _ = self._logps(ref, batch)
        self.model.train()
        err = torch.stack([pw - rw, pl - rl]).abs().max().float()
        if self.world > 1:
            dist.all_reduce(err, op=dist.ReduceOp.MAX)
        if err.item() > ADVANCE_TOLERANCE:
            raise RuntimeError(f"reference advance failed: policy and anchor log-probs differ by {err.item()}")
        return err.item()

    # -------------------------------------------------- stage 7: checkpoint
    def checkpoint(self, k, record, logs, stats, advanced, advance_err, t0):
        """Append iteration k's history line (file and logger) and save the end-of-iteration checkpoint."""
        plan = self.plan
        line = {
            "iteration": k,
            "round": plan.round_of(k),
            "beta": self.loss_fn.beta,
            "pairs": len(record) if record is not None else 0,
            "advanced": advanced,
            "anchor_version": self.anchor_version,
            "seconds": round(time.time() - t0, 3),
        }
        if record is not None:
            line["logratio_mu_to_anchor"] = record.logratio_mu_to_anchor()
            line["pair_weight_min"] = record.weight.min().item()
            line["pair_weight_max"] = record.weight.max().item()
        if advance_err is not None:
            line["advance_max_abs_diff"] = advance_err
        if self.lora_anchor:  # the frozen base must never change (only the two adapters do)
            line["lora_base_fingerprint"] = fingerprint = lora.base_fingerprint(self.model)
            if fingerprint != self.base_fingerprint:
                raise RuntimeError(
                    f"the LoRA base weights changed during iteration {k} (fingerprint {self.base_fingerprint} -> "
                    f"{fingerprint}); only the adapters may"
                )
        line.update(logs)
        line.update({n: v for n, v in stats.items() if isinstance(v, (int, float))})
        line.update(stats.get("skips", {}))
        self.history.append(line)
        self.iteration, self.micro_step = k + 1, 0
        if self.settings.iteration_ckpt:
            self.save_checkpoint("end of iteration")
        if self.strategy.is_rank_0():
            os.makedirs(os.path.dirname(self.history_path) or ".", exist_ok=True)
            append_lines(self.history_path, [json.dumps(line)])
        self._log("iter", {n: float(v) for n, v in line.items() if isinstance(v, (int, float))}, k)

    def _client_state(self):
        return {
            "consumed_samples": self.global_step * self.args.train.batch_size,
            "comal": {
                "iteration": self.iteration,
                "micro_step": self.micro_step,
                "global_step": self.global_step,
                "anchor_version": self.anchor_version,
                "history": self.history,
                "plan": self.run_settings,
                "best": self.best,
                "best_in_iteration": self.best_in_iter,
                "rng": _rng_state(),
                "source": self.source.state_dict(),
            },
        }

    def save_checkpoint(self, reason):
        args = self.args
        t0 = time.time()
        tag = f"iter{self.iteration:03d}_step{self.micro_step:06d}"
        if not self.disable_ds_ckpt:
            try:
                with guarded(os.path.join(args.ckpt.path, tag), "save the checkpoint"):
                    self.strategy.save_ckpt(
                        self.model.model, args.ckpt.path, tag, args.ckpt.max_num, args.ckpt.max_mem,
                        self._client_state(),
                    )  # fmt: skip
            except StorageError:
                self._drop_partial_checkpoint(tag)
                raise
            self._last_good_tag = tag
        if self.save_hf_ckpt:
            with guarded(os.path.join(args.ckpt.path, f"{tag}_hf"), "save the HF checkpoint"):
                path = os.path.join(args.ckpt.path, f"{tag}_hf")
                self.strategy.save_model(self.model, self.tokenizer, path, **self._save_kwargs())
        self.strategy.print(
            f"[comal] checkpoint saved ({reason}): iteration {self.iteration}, micro-step {self.micro_step}, "
            f"global step {self.global_step}, anchor v{self.anchor_version} ({time.time() - t0:.2f} s)",
        )

    def save_final(self, output_dir):
        """The final model (weights, config, tokenizer) into ``output_dir``, written in full or not at all: saved into
        a temporary folder inside it, read back (``storage.check_hf_dir``), fsynced, then moved in file by file. A
        failed write is one StorageError on every rank (naming the path and the free space); the checkpoints are
        untouched, so the run can be resumed after freeing space."""
        tmp = os.path.join(output_dir, ".final.partial")
        rank0 = self.strategy.is_rank_0()
        if rank0:
            shutil.rmtree(tmp, ignore_errors=True)
        error = None
        try:
            with guarded(tmp, "save the final model to"):
                self.strategy.save_model(self.model, self.tokenizer, tmp, **self._save_kwargs())
        except StorageError as e:  # only rank 0 writes; it left save_model before the barrier the others wait in
            error = e
            if dist.is_initialized():
                dist.barrier()
        if rank0 and error is None:
            try:
                publish_dir(tmp, output_dir)
            except StorageError as e:
                error = e
        if rank0 and error is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if self.world > 1:
            box = [error]
            dist.broadcast_object_list(box, src=0)
            error = box[0]
        if error is not None:
            raise error

    def _save_kwargs(self):
        """With LoRA, OpenRLHF's save_model writes the peft adapter (as its own LoRA path does): the policy adapter
        only, not the anchor's (which lives in the anchor files beside the checkpoints)."""
        return {"selected_adapters": [lora.POLICY]} if self.lora_anchor else {}

    def _drop_partial_checkpoint(self, tag):
        """After a failed save: remove the half-written tag folder and point ``latest`` back at the last complete
        checkpoint, so a resume never loads a partial one."""
        if not self.strategy.is_rank_0():
            return
        shutil.rmtree(os.path.join(self.args.ckpt.path, tag), ignore_errors=True)
        latest = os.path.join(self.args.ckpt.path, "latest")
        with contextlib.suppress(StorageError, OSError):
            if self._last_good_tag:
                write_atomic(latest, self._last_good_tag)
            elif os.path.exists(latest):
                os.remove(latest)

    def anchor_path(self, version):
        return os.path.join(self.state_dir, f"anchor_v{version:03d}.pt")

    @property
    def best_path(self):
        return os.path.join(self.state_dir, "best_of_iteration.pt")

    def iter_state_path(self, k):
        return os.path.join(self.state_dir, f"iter_{k:03d}.pt")

    # ----------------------------------------------------------------- resume
    def restore(self, states, accept_plan_change=False):
        """Restore the loop's state from a loaded checkpoint's client state; ``fit`` then continues the same loop.

        The checkpoint's plan must equal this run's (``plan_differences``) unless ``accept_plan_change``; an accepted
        change is recorded in the history."""
        comal = states.get("comal")
        if comal is None:
            raise PlanError(
                f"the checkpoint in {self.args.ckpt.path} was not written by train_comal (no COMAL state); "
                "point --ckpt.path at a train_comal checkpoint or drop --ckpt.load_enable"
            )
        diffs = plan_differences(comal.get("plan", {}), self.run_settings)
        if diffs and not accept_plan_change:
            lines = "\n".join(f"  {name}: checkpoint {old!r}, this run {new!r}" for name, old, new in diffs)
            raise PlanError(
                f"--ckpt.load_enable would continue the run in {self.args.ckpt.path} with other settings:\n{lines}\n"
                "Either start a new run (a new --ckpt.path and --ckpt.output_dir), or pass "
                "--comal.accept_plan_change to continue with this run's settings (the change is recorded in the "
                "history)."
            )
        self.iteration = comal["iteration"]
        self.micro_step = comal["micro_step"]
        self.global_step = comal["global_step"]
        self.anchor_version = comal["anchor_version"]
        self.history = comal["history"]
        self.best = comal.get("best")
        self.best_in_iter = comal.get("best_in_iteration")
        if diffs:
            self.history.append(
                {"plan_change_at_iteration": self.iteration, "changes": {n: [o, v] for n, o, v in diffs}}
            )
        _set_rng_state(comal["rng"])
        self.source.load_state_dict(comal.get("source"))
        if self.anchor_version > 0:
            path = self.anchor_path(self.anchor_version)
            if not os.path.exists(path):
                raise PlanError(f"resume needs the anchor {path}, which is missing")
            state = torch.load(path, map_location="cpu", weights_only=True)
            if self.lora_anchor:
                load_weights(self.model, state, lora.is_anchor_param)
            else:
                load_weights(self.ref_model, state)
        if self.micro_step > 0:
            path = self.iter_state_path(self.iteration)
            if not os.path.exists(path):
                raise PlanError(f"resume in the middle of iteration {self.iteration} needs {path}, which is missing")
            saved = torch.load(path, map_location="cpu", weights_only=True)
            record = IterationRecord.from_state_dict(saved["record"])
            self._check_anchor(record)
            heldout = None
            if saved.get("heldout") is not None:
                hrecord = IterationRecord.from_state_dict(saved["heldout"])
                heldout = (PairDataset(hrecord.pairs, self.tokenizer, self.args.data.max_len), hrecord)
            self._resumed = (record, saved["stats"], heldout)
        if self.strategy.is_rank_0():  # the log holds exactly the finished iterations of this checkpoint
            os.makedirs(os.path.dirname(self.history_path) or ".", exist_ok=True)
            write_atomic(self.history_path, "".join(json.dumps(h) + "\n" for h in self.history))
        self.strategy.print(
            f"[comal] resumed: iteration {self.iteration}, micro-step {self.micro_step}, "
            f"global step {self.global_step}, anchor v{self.anchor_version}, "
            f"{sum('iteration' in h for h in self.history)} finished iterations"
        )

    @torch.no_grad()
    def _check_anchor(self, record):
        """After a resume: the anchor must reproduce the record's cached reference log-probs."""
        batch = next(iter(self._loader(self._dataset(record.pairs), shuffle=False)))
        with self.anchor() as ref:
            ref_w, ref_l, _ = self._logps(ref, batch)
        cached = record.batch(batch[-1])
        got = torch.stack([ref_w, ref_l]).float().cpu()
        err = (got - torch.stack([cached.logp_ref_chosen, cached.logp_ref_rejected])).abs().max().item()
        self.strategy.print(f"[comal] resume check: anchor log-probs match the cache within {err:.2e}")
        if err > ADVANCE_TOLERANCE:
            raise PlanError(f"the restored anchor does not reproduce the cached log-probs (max error {err})")


def eval_record(pairs) -> IterationRecord:
    """Held-out pairs as a record; ``evaluate`` puts the anchor's log-probs in place of its (zero) cache."""
    record = IterationRecord.from_pairs(pairs)
    zeros = torch.zeros(len(record))
    return record.with_logps(zeros, zeros, zeros, zeros)


class WinrateProbe:
    """``--eval.winrate_every N``: every N iterations, the judge's win rate of the policy against the start policy
    and against the current anchor on held-out prompts (``comal_openrlhf.eval.winrate.winrate``, bootstrap interval
    over prompts). The start policy's samples are drawn once, before any training, and kept beside the checkpoints
    (a resumed run reuses them). Every rank samples (ZeRO-3 forwards are collective); rank 0 judges and the result
    is broadcast."""

    def __init__(self, judge, prompts, every, n_samples, rollout, single_order=False):
        self.judge, self.prompts, self.every, self.n = judge, list(prompts), int(every), int(n_samples)
        self.sampling = dict(
            temperature=rollout.temperature,
            top_p=rollout.top_p,
            max_new_tokens=rollout.max_new_tokens,
            batch_size=rollout.generate_batch_size,
        )
        self.both_orders = not single_order
        self.start_samples = None

    def due(self, k):
        return (k + 1) % self.every == 0

    def _generate(self, trainer, actor):
        zero3 = getattr(trainer.args.ds, "zero_stage", 0) == 3 and dist.is_initialized()
        return generate(actor, trainer.tokenizer, self.prompts, self.n, synced_gpus=zero3, **self.sampling)

    def start(self, trainer):
        """Sample the start policy (call before the first training step; a resume reloads the saved samples)."""
        path = os.path.join(trainer.state_dir, "winrate_start_samples.json")
        if os.path.exists(path):
            with open(path) as f:
                self.start_samples = json.load(f)
            return
        self.start_samples = self._generate(trainer, trainer.model)
        if trainer.strategy.is_rank_0():
            os.makedirs(trainer.state_dir, exist_ok=True)
            write_json(path, self.start_samples)

    def __call__(self, trainer):
        mine = self._generate(trainer, trainer.model)
        with trainer.anchor() as ref:
            anchor = self._generate(trainer, ref)
        box = [None]
        if trainer.strategy.is_rank_0():
            logs = {}
            for name, opponent in (("start", self.start_samples), ("anchor", anchor)):
                wr = winrate(mine, opponent, self.prompts, self.judge, trainer.tokenizer, n_samples=self.n,
                             both_orders=self.both_orders)  # fmt: skip
                logs[f"winrate_vs_{name}"] = wr.mean
                logs[f"winrate_vs_{name}_ci_low"] = wr.ci_low
                logs[f"winrate_vs_{name}_ci_high"] = wr.ci_high
            box = [logs]
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast_object_list(box, src=0)
        return box[0]
