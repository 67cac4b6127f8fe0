"""Sampling phase of a COMAL iteration as a command (arXiv 2410.23223, Algorithm 1, step 1: y ~ mu_k(. | x) for the
iteration's prompts), for users who sample on other machines than they train on (the official code's workflow).

    python -m comal_openrlhf.cli.generate --model.model_name_or_path CKPT --policy_id iter_003 \\
        --data.dataset prompts.jsonl --data.prompt_key prompt --data.apply_chat_template \\
        --rollout.n_samples_per_prompt 5 --rollout.temperature 0.8 --rollout.top_p 0.95 \\
        --iteration 3 --rollout.prompts_per_iteration 64 --shard 0/4 --output samples.shard0.jsonl

Output: one JSON line per sample, ``{"prompt", "response", "policy", "sample", "position", "prompt_index"}``:
the raw prompt (as in the dataset; the policy saw it formatted with OpenRLHF's data flags, ``data.PromptFormatter``),
the decoded response, the policy id, the sample index, the prompt's position in the iteration's prompt list (the
order ``python -m comal_openrlhf.cli.judge`` restores) and its row in the dataset.

Prompts: ``--data.*`` as in train_dpo / train_comal (``blending_datasets``: files, hub names, probabilities, split,
``--data.max_samples``); prompts of ``--data.max_len - 2`` tokens or more are skipped and counted, as the online
source does. ``--iteration K`` takes the online source's slice for iteration K (``--rollout.prompts_per_iteration``
prompts from position K * N, cycling); without it every prompt. ``--shard i/n`` keeps positions i, i + n, ...
(as the online source's ranks split a slice), so n machines or vLLM clusters each take a share and the judge command
reads all their files. Backends: ``--rollout.backend hf`` (``sampling.generate``) or ``vllm``
(``rollout_vllm.VLLMSampler``). A rerun appends only the samples missing from ``--output``; every row records its
producer (``producer_key``: the checkpoint's fingerprint, the sampling settings, the seed), and a rerun with another
producer is refused.
"""

import argparse
import json
import os
import sys

import torch
from openrlhf.utils.config import hierarchize
from tqdm import tqdm

from comal_openrlhf.cli.common import add_online_args, add_prompt_args, parse_shard, run_command
from comal_openrlhf.cli.policies import (
    PolicySampler,
    checkpoint_fingerprint,
    load_policy,
    load_prompts,
    load_tokenizer,
    sample_missing,
)
from comal_openrlhf.errors import BadInputError
from comal_openrlhf.storage import append_lines, content_key, repair_tail
from comal_openrlhf.training.data import PromptFormatter, fitting_prompts, prompt_window, read_jsonl


def producer_key(a):
    """What produced a samples file, as 16 hex digits: the checkpoint's fingerprint (its files' sizes and times), the
    sampling settings, the seed, the dtype and the prompt format. Written in every row; a rerun into the same
    ``--output`` with another key is refused (samples of another checkpoint are never reused), and the judge command
    refuses a policy whose rows carry more than one key."""
    ro, d = a.rollout, a.data
    prompt_format = [d.input_template, d.apply_chat_template, d.tokenizer_chat_template, d.max_len]
    sampling = [ro.temperature, ro.top_p, ro.max_new_tokens, ro.backend, ro.prompts_per_iteration]
    return content_key(
        checkpoint_fingerprint(a.model.model_name_or_path), sampling, a.train.seed, a.dtype, prompt_format
    )[:16]


# -------------------------------------------------------------------------------------------------- the command


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m comal_openrlhf.cli.generate",
        description="Sample responses from a policy: prompts -> samples jsonl (one COMAL phase).",
    )
    p.add_argument("--model.model_name_or_path", required=True, help="HF checkpoint of the policy")
    p.add_argument("--policy_id", default=None, help="Id written in every row (default: the checkpoint's name)")
    p.add_argument("--output", required=True, help="Samples file (JSON lines); existing rows are kept and skipped")
    p.add_argument("--shard", default="0/1", help="i/n: this process samples positions i, i+n, ... of the prompts")
    p.add_argument("--iteration", type=int, default=None, help="Take the online source's prompts of iteration K")
    p.add_argument("--train.seed", type=int, default=42, help="Sampling seed (mixed with the iteration and shard)")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp16", "fp32"), default="auto", help="auto: bf16 on CUDA")
    p.add_argument("--json", action="store_true", default=False, help="Print one JSON summary object on stdout")
    add_prompt_args(p)
    add_online_args(p)
    return p


def parse_args(argv=None):
    return hierarchize(build_parser().parse_args(argv))


def run(a):
    shard, shards = parse_shard(a.shard)
    ro = a.rollout
    path = a.model.model_name_or_path
    policy = a.policy_id or os.path.basename(os.path.normpath(path))
    prompts, skips = load_prompts(a)
    if ro.backend == "vllm":  # the engines load the checkpoint themselves
        model, tok = None, load_tokenizer(path)
    else:
        model, tok = load_policy(path, a.dtype)
    kept = fitting_prompts(prompts, PromptFormatter(a.data, tok), tok, a.data.max_len, skips)
    if not kept:
        raise BadInputError(f"no prompt fits --data.max_len {a.data.max_len}: {skips.summary()}")
    order = (
        list(range(len(kept)))
        if a.iteration is None
        else prompt_window(len(kept), a.iteration, ro.prompts_per_iteration)
    )
    mine = list(enumerate(order))[shard::shards]  # (position, index into kept)

    producer = producer_key(a)
    done = {}
    if os.path.exists(a.output):
        repair_tail(a.output)
        for line, row in read_jsonl(a.output):
            if row.get("policy") == policy and row.get("iteration") == a.iteration:
                if row.get("producer") != producer:
                    raise BadInputError(
                        f"{a.output}:{line}: the samples of policy {policy!r} there were made by another checkpoint "
                        f"or other sampling settings (producer {row.get('producer') or 'not recorded'}, this run "
                        f"{producer}): write to another --output, or delete the file to sample again"
                    )
                done[row["position"]] = done.get(row["position"], 0) + 1
    need = [(pos, kept[j][2], ro.n_samples_per_prompt - done.get(pos, 0)) for pos, j in mine]
    todo = [item for item in need if item[2] > 0]
    torch.manual_seed((a.train.seed * 1_000_003 + (a.iteration or 0) * 1009 + shard) % 2**31)
    os.makedirs(os.path.dirname(os.path.abspath(a.output)), exist_ok=True)
    index = dict(mine)
    written = 0

    def record(batch):
        nonlocal written
        rows = []
        for pos, responses in batch:
            i, raw, _ = kept[index[pos]]
            for t, resp in enumerate(responses):
                row = {"prompt": raw, "response": resp, "policy": policy, "sample": done.get(pos, 0) + t}
                row.update(position=pos, prompt_index=i, producer=producer)
                rows.append(row if a.iteration is None else {**row, "iteration": a.iteration})
        append_lines(a.output, [json.dumps(r, ensure_ascii=False) for r in rows])
        written += len(rows)
        bar.update(len(batch))

    sampler = PolicySampler(a, path, model, tok, a.train.seed)
    try:
        with tqdm(total=len(todo), desc="generate", file=sys.stderr, mininterval=1.0) as bar:
            sample_missing(sampler, todo, max(1, ro.generate_batch_size), record)
    finally:
        sampler.close()
    return {
        "output": os.path.abspath(a.output),
        "policy": policy,
        "shard": f"{shard}/{shards}",
        "prompts": len(mine),
        "samples_written": written,
        "samples_kept": sum(min(done.get(pos, 0), ro.n_samples_per_prompt) for pos, _ in mine),
        "prompts_skipped": skips.as_dict() if skips.total() else {},
    }


def main(argv=None):
    a = parse_args(argv)
    summary = run_command(lambda: run(a), a.json)
    if not a.json:
        print(json.dumps(summary, indent=1), file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
