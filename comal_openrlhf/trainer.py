"""COMAL on OpenRLHF: the DPO trainer with prox losses, cached log-probs and reference advances.

``COMALTrainer`` subclasses OpenRLHF's ``DPOTrainer`` and keeps its strategy, logging (wandb / TensorBoard),
evaluation and checkpoint machinery. One COMAL iteration k (COMAL.md section 5):

1. the iteration source yields pairs (offline files, a static dataset, or online sampling + judge);
2. ONE precompute pass stores log mu_k(y) and log ref(y) of every response (mu_k = the policy at the start of the
   iteration, ref = the anchor); DPOTrainer recomputes the reference at every step, here neither is recomputed;
3. the policy trains for ``--train.max_epochs`` epochs on the prox loss around log C = (1 - r) log mu_k + r log ref
   (comal_openrlhf.losses), with only the policy's forward and backward per step;
4. every K iterations the anchor takes the policy's weights (comal_openrlhf.weights, ZeRO-3 safe) and a new round
   starts, possibly with a new beta (``--comal.beta_schedule``).

Checkpoints (DeepSpeed, through OpenRLHF's strategy) carry the COMAL state in ``client_state["comal"]``: iteration,
step inside it, anchor version, RNG states and the history of finished iterations. The iteration's pairs and cached
log-probs and every advanced anchor live beside the checkpoints in ``<ckpt.path>_comal/``, so a run killed in the
middle of an iteration resumes at that step with the same pairs, the same cache and the right anchor.
"""

import json
import math
import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist
from openrlhf.trainer.dpo_trainer import DPOTrainer
from tqdm import tqdm

from comal_openrlhf.data import PairDataset
from comal_openrlhf.logps import pair_logps
from comal_openrlhf.losses import NEEDS_WIN_RATES, ProxLoss
from comal_openrlhf.weights import atomic_save, copy_weights, load_weights, state_dict_on_rank0


class NonFiniteLossError(RuntimeError):
    pass


def _rng_state():
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def policy_weights(dataset, cache):
    """Pair weights mu_k(y) mu_k(y') from the cached log-probs, normalised per prompt (--rollout.pair_weighting
    policy): the exact pair expectation of the prox loss when a prompt's samples cover mu_k's support."""
    logw = cache[:, 0] + cache[:, 1]
    groups = {}
    for i, r in enumerate(dataset.rows):
        groups.setdefault(r.prompt, []).append(i)
    for members in groups.values():
        m = torch.tensor(members)
        dataset.fields[m, 3] = torch.softmax(logw[m], 0)


def support_mass_penalty(idx, rows, pi_w, pi_l, mu_w, mu_l):
    """(log pi(S_x) - log mu_k(S_x))^2 averaged over the prompts x of a batch, S_x = the distinct responses of x in
    the batch (--comal.mass_coef). The prox step of COMAL.md section 2 reweights mass among responses; the pair losses
    see only log-prob differences, so with Adam the policy can leak mass to outputs never sampled. This keeps the
    total mass of the sampled support where mu_k had it."""
    seen = {}
    for j, i in enumerate(idx.tolist()):
        r = rows[i]
        seen.setdefault(r.prompt, {}).setdefault(r.chosen, (pi_w[j], mu_w[j]))
        seen[r.prompt].setdefault(r.rejected, (pi_l[j], mu_l[j]))
    terms = []
    for responses in seen.values():
        pi = torch.stack([v[0] for v in responses.values()])
        mu = torch.stack([v[1] for v in responses.values()])
        terms.append((torch.logsumexp(pi, 0) - torch.logsumexp(mu, 0)) ** 2)
    return torch.stack(terms).mean()


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
        max_norm=1.0,
        max_epochs=1,
        save_hf_ckpt=False,
        disable_ds_ckpt=False,
        logps_kernel="openrlhf",
        iteration_ckpt=True,
        policy_weighting=False,
        mass_coef=0.0,
        eval_dataset=None,
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
        self.logps_kernel = logps_kernel
        self.iteration_ckpt = iteration_ckpt
        self.policy_weighting = policy_weighting
        self.mass_coef = mass_coef
        self.eval_dataset = eval_dataset
        self.loss_fn = ProxLoss(plan.prox, plan.beta_at(0), plan.ref_weight, args.model.label_smoothing)
        self.state_dir = args.ckpt.path.rstrip("/") + "_comal"
        self.history_path = os.path.join(args.ckpt.output_dir, "comal_iterations.jsonl")
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        # COMAL state (what a checkpoint restores)
        self.iteration = 0
        self.micro_step = 0  # micro-batches done inside the current iteration
        self.global_step = 0
        self.anchor_version = 0
        self.history = []
        self._iter_state = None  # (rows, cache) of the iteration being resumed

    # ------------------------------------------------------------------ logging
    def _log(self, prefix, logs, step):
        if not self.strategy.is_rank_0():
            return
        if self._wandb is not None:
            self._wandb.log({f"{prefix}/{k}": v for k, v in {**logs, "global_step": step}.items()})
        elif self._tensorboard is not None:
            for k, v in logs.items():
                self._tensorboard.add_scalar(f"{prefix}/{k}", v, step)

    # --------------------------------------------------------- checkpoint/resume
    def _client_state(self):
        return {
            "consumed_samples": self.global_step * self.args.train.batch_size,
            "comal": {
                "iteration": self.iteration,
                "micro_step": self.micro_step,
                "global_step": self.global_step,
                "anchor_version": self.anchor_version,
                "history": self.history,
                "plan": self.plan.as_dict(),
                "rng": _rng_state(),
            },
        }

    def save_checkpoint(self, reason):
        args = self.args
        tag = f"iter{self.iteration:03d}_step{self.micro_step:06d}"
        if not self.disable_ds_ckpt:
            self.strategy.save_ckpt(
                self.model.model, args.ckpt.path, tag, args.ckpt.max_num, args.ckpt.max_mem, self._client_state()
            )
        if self.save_hf_ckpt:
            self.strategy.save_model(self.model, self.tokenizer, os.path.join(args.ckpt.path, f"{tag}_hf"))
        self.strategy.print(
            f"[comal] checkpoint saved ({reason}): iteration {self.iteration}, micro-step {self.micro_step}, "
            f"global step {self.global_step}, anchor v{self.anchor_version}",
        )

    def anchor_path(self, version):
        return os.path.join(self.state_dir, f"anchor_v{version:03d}.pt")

    def iter_state_path(self, k):
        return os.path.join(self.state_dir, f"iter_{k:03d}.pt")

    def restore(self, states):
        """Restore the COMAL state from a loaded checkpoint's client state."""
        comal = states.get("comal")
        if comal is None:
            raise SystemExit(
                f"[comal] the checkpoint in {self.args.ckpt.path} was not written by train_comal (no COMAL state); "
                "point --ckpt.path at a train_comal checkpoint or drop --ckpt.load_enable"
            )
        self.iteration = comal["iteration"]
        self.micro_step = comal["micro_step"]
        self.global_step = comal["global_step"]
        self.anchor_version = comal["anchor_version"]
        self.history = comal["history"]
        _set_rng_state(comal["rng"])
        if self.anchor_version > 0:
            path = self.anchor_path(self.anchor_version)
            if not os.path.exists(path):
                raise SystemExit(f"[comal] resume needs the anchor {path}, which is missing")
            load_weights(self.ref_model, torch.load(path, map_location="cpu", weights_only=True))
        if self.micro_step > 0:
            path = self.iter_state_path(self.iteration)
            if not os.path.exists(path):
                raise SystemExit(f"[comal] resume in the middle of iteration {self.iteration} needs {path}")
            saved = torch.load(path, map_location="cpu", weights_only=False)
            self._iter_state = (saved["rows"], saved["cache"], saved["stats"])
        if self.strategy.is_rank_0():  # the log holds exactly the finished iterations of this checkpoint
            with open(self.history_path, "w") as f:
                f.writelines(json.dumps(h) + "\n" for h in self.history)
        self.strategy.print(
            f"[comal] resumed: iteration {self.iteration}, micro-step {self.micro_step}, "
            f"global step {self.global_step}, anchor v{self.anchor_version}, {len(self.history)} finished iterations"
        )

    # -------------------------------------------------------------- precompute
    def _loader(self, dataset, shuffle, drop_last, epoch=0, consumed=0):
        loader = self.strategy.setup_dataloader(
            dataset, self.args.train.micro_batch_size, False, shuffle, dataset.collate_fn, drop_last=drop_last
        )
        loader.sampler.set_epoch(epoch, consumed_samples=consumed)
        return loader

    @torch.no_grad()
    def precompute(self, dataset):
        """Sequence log-probs of every pair under mu_k (the current policy) and the anchor: [n, 4] fp32 tensor
        (mu_w, mu_l, ref_w, ref_l). Each rank computes its shard; the shards are gathered so every rank has all."""
        self.model.eval()
        pad = self.tokenizer.pad_token_id
        idx, vals = [], []
        loader = self._loader(dataset, shuffle=False, drop_last=False)
        for batch in tqdm(loader, desc="Precompute log-probs", disable=not self.strategy.is_rank_0(), leave=False):
            mu_w, mu_l, _ = pair_logps(self.model, batch, pad, self.logps_kernel)
            ref_w, ref_l, _ = pair_logps(self.ref_model, batch, pad, self.logps_kernel)
            idx.append(batch[-1])
            vals.append(torch.stack([mu_w, mu_l, ref_w, ref_l], dim=1).float().cpu())
        mine = (torch.cat(idx) if idx else torch.empty(0, dtype=torch.long), torch.cat(vals) if vals else None)
        parts = [None] * self.world
        if self.world > 1:
            dist.all_gather_object(parts, mine)
        else:
            parts = [mine]
        cache = torch.full((len(dataset), 4), float("nan"))
        for i, v in parts:
            if v is not None:
                cache[i] = v
        if torch.isnan(cache).any():
            raise RuntimeError("precompute left pairs without log-probs (sampler did not cover the dataset)")
        self.model.train()
        return cache

    # ------------------------------------------------------------ lr schedule
    def _restart_schedule(self, steps, done=0):
        """Fresh warmup + decay for every iteration (each COMAL iteration is its own prox problem, as the official
        pipeline trains each iteration from the previous checkpoint with a new schedule)."""
        from transformers.trainer import get_scheduler

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

    # -------------------------------------------------------------- the loop
    def fit(self, args=None, consumed_samples=0, num_update_steps_per_epoch=None):
        plan = self.plan
        acc = self.strategy.accumulated_gradient
        iter_bar = tqdm(
            range(self.iteration, plan.iterations),
            desc="COMAL iterations",
            disable=not self.strategy.is_rank_0(),
        )
        for k in range(self.iteration, plan.iterations):
            t0 = time.time()
            self.iteration = k
            beta = plan.beta_at(k)
            self.loss_fn.beta = beta
            if self._iter_state is not None:  # resuming in the middle of iteration k
                rows, cache, stats = self._iter_state
                self._iter_state = None
                dataset = PairDataset(rows, self.tokenizer, self.args.data.max_len)
                self._check_anchor(dataset, cache)
            else:
                self.micro_step = 0
                rows, stats = self.source.pairs(k, self)
                self._report_skips(k, rows, stats)
                stats = {key: (v.as_dict() if hasattr(v, "as_dict") else v) for key, v in stats.items()}
                if not rows:  # online: every prompt had < 2 distinct valid samples (e.g. a collapsed policy)
                    self._finish_iteration(k, beta, None, {}, stats, t0, 0, 0)
                    iter_bar.update()
                    continue
                dataset = PairDataset(rows, self.tokenizer, self.args.data.max_len)
                tp = time.time()
                cache = self.precompute(dataset)
                stats["precompute_s"] = time.time() - tp
                if self.strategy.is_rank_0():
                    os.makedirs(self.state_dir, exist_ok=True)
                    atomic_save({"rows": rows, "cache": cache, "stats": stats}, self.iter_state_path(k))
                    old = self.iter_state_path(k - 1)
                    if os.path.exists(old):
                        os.remove(old)
            if self.policy_weighting:
                policy_weights(dataset, cache)
            if plan.prox in NEEDS_WIN_RATES and torch.isnan(dataset.fields[:, :2]).any():
                raise SystemExit(f"[comal] iteration {k}: the {plan.prox} loss needs win rates for every pair")

            # every pass over the pairs is one epoch; the step count is rounded up to whole optimizer steps
            per_pass = len(self._loader(dataset, shuffle=True, drop_last=False))
            total = -(-per_pass * self.epochs // acc) * acc
            self._restart_schedule(total // acc, self.micro_step // acc)
            logs = self._train_iteration(k, dataset, cache, per_pass, total)

            if self.eval_dataset is not None:
                logs.update(self.evaluate_pairs(k))
            self._finish_iteration(k, beta, dataset, logs, stats, t0, total // acc, cache)
            iter_bar.set_postfix(loss=logs.get("loss", float("nan")))
            iter_bar.update()

        if self._wandb is not None and self.strategy.is_rank_0():
            self._wandb.finish()
        if self._tensorboard is not None and self.strategy.is_rank_0():
            self._tensorboard.close()

    def _finish_iteration(self, k, beta, dataset, logs, stats, t0, steps, cache):
        """Advance the anchor if due, then checkpoint, then append the iteration's history line."""
        plan = self.plan
        advanced = plan.advance_after(k)
        advance_err = None
        if advanced:
            copy_weights(self.model, self.ref_model)
            if dataset is not None:
                advance_err = self._check_advance(dataset)
            self.anchor_version += 1
            state = state_dict_on_rank0(self.ref_model)
            if self.strategy.is_rank_0():
                os.makedirs(self.state_dir, exist_ok=True)
                atomic_save(state, self.anchor_path(self.anchor_version))
                stale = self.anchor_path(self.anchor_version - 2)
                if os.path.exists(stale):
                    os.remove(stale)
            if dist.is_initialized():
                dist.barrier()
        record = {
            "iteration": k,
            "round": plan.round_of(k),
            "beta": beta,
            "pairs": len(dataset) if dataset is not None else 0,
            "steps": steps,
            "advanced": advanced,
            "anchor_version": self.anchor_version,
            "seconds": round(time.time() - t0, 3),
        }
        if dataset is not None:
            record["logratio_mu_to_anchor"] = cache[:, :2].mean().item() - cache[:, 2:].mean().item()
        if advance_err is not None:
            record["advance_max_abs_diff"] = advance_err
        record.update(logs)
        record.update({n: v for n, v in stats.items() if isinstance(v, (int, float))})
        record.update(stats.get("skips", {}))
        self.history.append(record)
        self.iteration, self.micro_step = k + 1, 0
        if self.iteration_ckpt:
            self.save_checkpoint("end of iteration")
        if self.strategy.is_rank_0():
            os.makedirs(os.path.dirname(self.history_path) or ".", exist_ok=True)
            with open(self.history_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        self._log("iter", {n: float(v) for n, v in record.items() if isinstance(v, (int, float))}, k)

    def _report_skips(self, k, rows, stats):
        skips = stats.get("skips")
        if skips is not None and (skips.total() or skips.truncated):
            trunc = f"; {skips.truncated} truncated to --data.max_len" if skips.truncated else ""
            self.strategy.print(
                f"[comal] iteration {k}: {len(rows)} pairs kept, {skips.total()} skipped: {skips.summary()}{trunc}"
            )
        if not rows:
            if not getattr(self.source, "allow_empty", False):
                raise SystemExit(f"[comal] iteration {k}: no usable pairs in {stats.get('source', '')}")
            self.strategy.print(
                f"[comal] iteration {k}: no prompt has 2 distinct valid samples; iteration skipped (policy unchanged)"
            )

    @torch.no_grad()
    def evaluate_pairs(self, k):
        """``--eval.dataset`` after each iteration: the prox loss with the anchor as centre (OpenRLHF's DPO/IPO eval
        loss against its reference) and the fraction of pairs whose log-ratio margin to the anchor is positive."""
        self.model.eval()
        pad = self.tokenizer.pad_token_id
        loader = self._loader(self.eval_dataset, shuffle=False, drop_last=False)
        loss_sum, acc_sum, n = 0.0, 0.0, 0
        for batch in tqdm(
            loader, desc=f"Eval after iteration {k}", disable=not self.strategy.is_rank_0(), leave=False
        ):
            pw, pl, _ = pair_logps(self.model, batch, pad, self.logps_kernel)
            rw, rl, _ = pair_logps(self.ref_model, batch, pad, self.logps_kernel)
            f = self.eval_dataset.fields[batch[-1]].to(pw.device)
            loss, cr, rr = self.loss_fn(pw, pl, rw, rl, rw, rl, p_w=f[:, 0], p_l=f[:, 1], soft_label=f[:, 2])
            loss_sum += loss.item() * len(pw)
            acc_sum += (cr > rr).float().sum().item()
            n += len(pw)
        self.model.train()
        logs = self.strategy.all_reduce({"eval_loss": loss_sum / max(n, 1), "eval_acc": acc_sum / max(n, 1)})
        self._log("eval", logs, k)
        return logs

    @torch.no_grad()
    def _check_advance(self, dataset):
        """Right after ref <- pi the two must give the same log-probs; a lost ZeRO-3 write would show here."""
        batch = next(iter(self._loader(dataset, shuffle=False, drop_last=False)))
        self.model.eval()
        pad = self.tokenizer.pad_token_id
        pw, pl, _ = pair_logps(self.model, batch, pad, self.logps_kernel)
        rw, rl, _ = pair_logps(self.ref_model, batch, pad, self.logps_kernel)
        self.model.train()
        err = torch.stack([pw - rw, pl - rl]).abs().max().float()
        if self.world > 1:
            dist.all_reduce(err, op=dist.ReduceOp.MAX)
        if err.item() > 1e-3:
            raise RuntimeError(f"[comal] reference advance failed: policy and anchor log-probs differ by {err.item()}")
        return err.item()

    def _check_anchor(self, dataset, cache):
        """After a resume: the anchor must reproduce the cached reference log-probs (same anchor, same pairs)."""
        loader = self._loader(dataset, shuffle=False, drop_last=False)
        batch = next(iter(loader))
        with torch.no_grad():
            ref_w, ref_l, _ = pair_logps(self.ref_model, batch, self.tokenizer.pad_token_id, self.logps_kernel)
        err = (torch.stack([ref_w, ref_l], 1).float().cpu() - cache[batch[-1]][:, 2:]).abs().max().item()
        self.strategy.print(f"[comal] resume check: anchor log-probs match the cache within {err:.2e}")
        if err > 1e-3:
            raise SystemExit(f"[comal] the restored anchor does not reproduce the cached log-probs (max error {err})")

    def _train_iteration(self, k, dataset, cache, per_pass, total):
        acc = self.strategy.accumulated_gradient
        pad = self.tokenizer.pad_token_id
        mb = self.args.train.micro_batch_size
        step_bar = tqdm(
            total=total, initial=self.micro_step, desc=f"Iteration {k} steps", disable=not self.strategy.is_rank_0()
        )
        sums, count = {}, 0
        self.model.train()
        self.ref_model.eval()
        while self.micro_step < total:
            # pass e over the pairs, resumed after the micro-batches a checkpoint already holds
            e, done = divmod(self.micro_step, per_pass)
            loader = self._loader(dataset, True, False, epoch=k * 1000 + e, consumed=done * mb * self.world)
            for batch in loader:
                if self.micro_step >= total:
                    break
                logs = self._train_step(batch, cache, dataset, pad)
                for n, v in logs.items():
                    sums[n] = sums.get(n, 0.0) + v
                count += 1
                self.micro_step += 1
                step_bar.update()
                if self.micro_step % acc == 0:
                    self.global_step += 1
                    logs["lr"] = self.scheduler.get_last_lr()[0]
                    logs["grad_norm"] = self.strategy.get_grad_norm(self.model)
                    logs["beta"] = self.loss_fn.beta
                    logs["iteration"] = k
                    step_bar.set_postfix(loss=logs["loss"], acc=logs["acc"])
                    if self.global_step % self.args.logger.logging_steps == 0:
                        self._log("train", logs, self.global_step)
                    save_steps = self.args.ckpt.save_steps
                    if save_steps > 0 and self.global_step % save_steps == 0 and self.micro_step < total:
                        self.save_checkpoint("step")
        step_bar.close()
        return {n: v / max(count, 1) for n, v in sums.items()}

    def _train_step(self, batch, cache, dataset, pad):
        idx = batch[-1]
        device = next(self.model.parameters()).device
        pi_w, pi_l, nll = pair_logps(self.model, batch, pad, self.logps_kernel)
        c = cache[idx].to(device)
        f = dataset.fields[idx].to(device)
        loss, chosen_reward, reject_reward = self.loss_fn(
            pi_w,
            pi_l,
            c[:, 0],
            c[:, 1],
            c[:, 2],
            c[:, 3],
            p_w=f[:, 0],
            p_l=f[:, 1],
            soft_label=f[:, 2],
            weight=f[:, 3],
        )
        total = loss + (nll * self.args.model.nll_loss_coef if self.nll_loss else 0)
        if self.mass_coef > 0:
            total = total + self.mass_coef * support_mass_penalty(idx, dataset.rows, pi_w, pi_l, c[:, 0], c[:, 1])
        bad = torch.tensor([0.0 if torch.isfinite(total) else 1.0])
        if self.world > 1:
            dist.all_reduce(bad)
        if bad.item() > 0:
            raise NonFiniteLossError(
                f"[comal] non-finite loss at iteration {self.iteration}, micro-step {self.micro_step} "
                f"(loss {loss.item()}); training stopped, the last good checkpoint in {self.args.ckpt.path} is kept. "
                "Lower --adam.lr or check the data / win rates."
            )
        self.strategy.backward(total, self.model, self.optimizer)
        self.strategy.optimizer_step(self.optimizer, self.model, self.scheduler)
        margin = (chosen_reward - reject_reward).mean().item()
        return {
            "loss": loss.item(),
            "acc": (chosen_reward > reject_reward).float().mean().item(),
            "chosen_reward": chosen_reward.mean().item(),
            "reject_reward": reject_reward.mean().item(),
            "margin": margin,
            "kl_pi_to_anchor_pairs": ((pi_w - c[:, 2]) + (pi_l - c[:, 3])).mean().item() / 2,
        }
