"""Sampling phase of a COMAL iteration as a command (arXiv 2410.23223, Algorithm 1, step 1: y ~ mu_k(. | x) for the
iteration's prompts), for users who sample on other machines than they train on (the official code's workflow).

    python -m comal_openrlhf.generate --model.model_name_or_path CKPT --policy_id iter_003 \\
        --data.dataset prompts.jsonl --data.prompt_key prompt --data.apply_chat_template \\
        --rollout.n_samples_per_prompt 5 --rollout.temperature 0.8 --rollout.top_p 0.95 \\
        --iteration 3 --rollout.prompts_per_iteration 64 --shard 0/4 --output samples.shard0.jsonl

Output: one JSON line per sample, ``{"prompt", "response", "policy", "sample", "position", "prompt_index"}``:
the raw prompt (as in the dataset; the policy saw it formatted with OpenRLHF's data flags, ``data.PromptFormatter``),
the decoded response, the policy id, the sample index, the prompt's position in the iteration's prompt list (the
order ``python -m comal_openrlhf.judge`` restores) and its row in the dataset.

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

from comal_openrlhf.errors import BadInputError
from comal_openrlhf.storage import append_lines

# ------------------------------------------------------------------------------ pieces shared by the phase commands


def add_prompt_args(parser, keys=False):
    """OpenRLHF's data flags for prompts (train_dpo's names and defaults, except ``--data.prompt_key`` "prompt").
    ``keys`` adds ``--data.chosen_key`` / ``--data.rejected_key`` (the pair files' keys)."""
    g = parser.add_argument_group("data", "Prompts (OpenRLHF's data flags)")
    g.add_argument(
        "--data.dataset", type=str, default=None, help="Prompt dataset(s): files or hub names, comma separated"
    )
    g.add_argument("--data.dataset_probs", type=str, default=None, help="Sampling probabilities of the datasets")
    g.add_argument("--data.dataset_split", type=str, default="train")
    g.add_argument("--data.max_samples", type=int, default=1000000, help="Maximum number of prompts")
    g.add_argument("--data.prompt_key", type=str, default="prompt")
    g.add_argument("--data.input_template", type=str, default=None)
    g.add_argument("--data.apply_chat_template", action="store_true", default=False, help="Use HF chat template")
    g.add_argument("--data.tokenizer_chat_template", type=str, default=None)
    g.add_argument("--data.max_len", type=int, default=512, help="Prompts this long (tokens, minus 2) are skipped")
    if keys:
        g.add_argument("--data.chosen_key", type=str, default="chosen")
        g.add_argument("--data.rejected_key", type=str, default="rejected")
    return parser


def parse_shard(spec):
    """``"i/n"`` -> (i, n) with 0 <= i < n."""
    try:
        i, n = (int(x) for x in spec.split("/"))
    except (ValueError, AttributeError):
        raise BadInputError(f"--shard {spec!r}: expected i/n, e.g. 0/4") from None
    if not (n >= 1 and 0 <= i < n):
        raise BadInputError(f"--shard {spec!r}: need 0 <= i < n")
    return i, n


class _PrintStrategy:
    """The two things ``blending_datasets`` asks of OpenRLHF's strategy, printing to stderr."""

    class args:  # noqa: N801
        use_ms = False

    @staticmethod
    def print(*msg):
        print(*msg, file=sys.stderr)

    @staticmethod
    def is_rank_0():
        return False  # its print(data_list) would go to stdout


def load_prompts(a):
    """(raw prompts, SkipLog) of ``--data.dataset`` under ``--data.prompt_key`` (``data.load_prompts``)."""
    from comal_openrlhf.data import load_prompts as read

    prompts, skips = read(a.data, _PrintStrategy, 42)
    if not prompts:
        raise BadInputError(f"--data.dataset {a.data.dataset}: no usable prompts")
    return [raw for _, raw in prompts], skips


def producer_key(a):
    """What produced a samples file, as 16 hex digits: the checkpoint's fingerprint (its files' sizes and times), the
    sampling settings, the seed, the dtype and the prompt format. Written in every row; a rerun into the same
    ``--output`` with another key is refused (samples of another checkpoint are never reused), and the judge command
    refuses a policy whose rows carry more than one key."""
    from comal_openrlhf.evaluate import _fingerprint, _key

    ro, d = a.rollout, a.data
    prompt_format = [d.input_template, d.apply_chat_template, d.tokenizer_chat_template, d.max_len]
    sampling = [ro.temperature, ro.top_p, ro.max_new_tokens, ro.backend, ro.prompts_per_iteration]
    return _key(_fingerprint(a.model.model_name_or_path), sampling, a.train.seed, a.dtype, prompt_format)[:16]


def iteration_slice(n_prompts, k, per_iteration):
    """Positions of the online source's prompts for iteration k (``--rollout.prompts_per_iteration``, cycling)."""
    n = min(per_iteration, n_prompts)
    start = (k * n) % n_prompts
    return [(start + i) % n_prompts for i in range(n)]


# -------------------------------------------------------------------------------------------------- the command


def build_parser():
    from comal_openrlhf.online import add_online_args

    p = argparse.ArgumentParser(
        prog="python -m comal_openrlhf.generate",
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
    from openrlhf.utils.config import hierarchize

    return hierarchize(build_parser().parse_args(argv))


def run(a):
    import torch
    from tqdm import tqdm

    from comal_openrlhf.data import PromptFormatter, read_jsonl
    from comal_openrlhf.evaluate import _load_policy, _load_tokenizer, _repair_tail

    shard, shards = parse_shard(a.shard)
    ro = a.rollout
    path = a.model.model_name_or_path
    policy = a.policy_id or os.path.basename(os.path.normpath(path))
    raw, skips = load_prompts(a)
    if ro.backend == "vllm":  # the engines load the checkpoint themselves
        model, tok = None, _load_tokenizer(path)
    else:
        model, tok = _load_policy(path, a.dtype)
    fmt = PromptFormatter(a.data, tok)
    kept, texts = [], []  # dataset rows that fit --data.max_len, as the online source filters them
    for i, r in enumerate(raw):
        text = fmt.policy_text(r)
        if len(tok(text, add_special_tokens=False)["input_ids"]) >= a.data.max_len - 2:
            skips.skip(f"prompt longer than --data.max_len {a.data.max_len}", f"{a.data.dataset}:prompt {i}")
            continue
        kept.append(i)
        texts.append(text)
    if not kept:
        raise BadInputError(f"no prompt fits --data.max_len {a.data.max_len}: {skips.summary()}")
    order = (
        list(range(len(kept)))
        if a.iteration is None
        else iteration_slice(len(kept), a.iteration, ro.prompts_per_iteration)
    )
    mine = list(enumerate(order))[shard::shards]  # (position, index into kept)

    producer = producer_key(a)
    done = {}
    if os.path.exists(a.output):
        _repair_tail(a.output)
        for line, row in read_jsonl(a.output):
            if row.get("policy") == policy and row.get("iteration") == a.iteration:
                if row.get("producer") != producer:
                    raise BadInputError(
                        f"{a.output}:{line}: the samples of policy {policy!r} there were made by another checkpoint "
                        f"or other sampling settings (producer {row.get('producer') or 'not recorded'}, this run "
                        f"{producer}): write to another --output, or delete the file to sample again"
                    )
                done[row["position"]] = done.get(row["position"], 0) + 1
    todo = [(pos, j) for pos, j in mine if done.get(pos, 0) < ro.n_samples_per_prompt]
    torch.manual_seed((a.train.seed * 1_000_003 + (a.iteration or 0) * 1009 + shard) % 2**31)
    sampler = None
    if ro.backend == "vllm":
        from comal_openrlhf.evaluate import vllm_sampler

        sampler = vllm_sampler(a, path, a.train.seed)
    written = 0
    bs = max(1, ro.generate_batch_size)
    os.makedirs(os.path.dirname(os.path.abspath(a.output)), exist_ok=True)
    with tqdm(total=len(todo), desc="generate", file=sys.stderr, mininterval=1.0) as bar:
        for s in range(0, len(todo), bs):
            chunk = todo[s : s + bs]
            need = {pos: ro.n_samples_per_prompt - done.get(pos, 0) for pos, _ in chunk}
            by_count = {}
            for pos, j in chunk:
                by_count.setdefault(need[pos], []).append((pos, j))
            rows = []
            for count, items in by_count.items():
                batch = [texts[j] for _, j in items]
                if sampler is not None:
                    out = sampler.generate(tok, batch, count, ro.temperature, ro.top_p, ro.max_new_tokens)
                else:
                    from comal_openrlhf.sampling import generate

                    out = generate(model, tok, batch, count, ro.temperature, ro.top_p, ro.max_new_tokens, bs)
                for (pos, j), responses in zip(items, out):
                    for t, resp in enumerate(responses):
                        rows.append(
                            {
                                "prompt": raw[kept[j]],
                                "response": resp,
                                "policy": policy,
                                "sample": done.get(pos, 0) + t,
                                "position": pos,
                                "prompt_index": kept[j],
                                "producer": producer,
                                **({} if a.iteration is None else {"iteration": a.iteration}),
                            }
                        )
            append_lines(a.output, [json.dumps(r, ensure_ascii=False) for r in rows])
            written += len(rows)
            bar.update(len(chunk))
    if sampler is not None and hasattr(sampler, "close"):
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
    from comal_openrlhf._cli import run_command

    a = parse_args(argv)
    summary = run_command(lambda: run(a), a.json)
    if not a.json:
        print(json.dumps(summary, indent=1), file=sys.stderr)
    return summary


if __name__ == "__main__":
    main()
