"""A policy checkpoint in a phase command (generate, evaluate): its prompts, tokenizer, model and fingerprint, and
the sampling loop that resumes (only the responses missing from the command's file are sampled, each batch appended
as soon as it is made)."""

import json
import os
import sys
from types import SimpleNamespace

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from comal_openrlhf.errors import BadInputError
from comal_openrlhf.rollout.sampling import generate
from comal_openrlhf.rollout.vllm_engines import VLLMSampler
from comal_openrlhf.training.data import load_prompts as read_prompts


def checkpoint_fingerprint(path):
    """What identifies a checkpoint's weights: its absolute path and its files' sizes and modification times."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        return [path]
    files = sorted(f for f in os.listdir(path) if os.path.isfile(os.path.join(path, f)))
    return [path] + [
        [f, os.path.getsize(os.path.join(path, f)), os.path.getmtime(os.path.join(path, f))] for f in files
    ]


def load_tokenizer(path):
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise BadInputError(f"cannot load the tokenizer of {path}: {e}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_policy(path, dtype):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = checkpoint_dtype(path) if dtype == "auto" else dtype
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    tok = load_tokenizer(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device)
    except (OSError, ValueError) as e:
        raise BadInputError(f"cannot load the policy {path}: {e}") from None
    model.eval()
    model.comal_dtype = dtype  # reported with the results: an exact gap depends on it (bf16 vs fp32 log-probs)
    return model, tok


def checkpoint_dtype(path):
    """The dtype the checkpoint was saved in (config.json's ``torch_dtype`` / ``dtype``): bf16, fp16 or fp32 (the
    default when the config says nothing). ``--dtype auto`` evaluates in it, so a policy trained and saved in bf16
    (the demo on a CPU with native bf16) is measured as it was trained."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):
        return "fp32"
    name = str(config.get("torch_dtype") or config.get("dtype") or "float32")
    return {"bfloat16": "bf16", "float16": "fp16"}.get(name, "fp32")


def vllm_sampler(a, path, seed):
    """``rollout_vllm.VLLMSampler`` for checkpoint ``path`` from a phase command's flags (``--vllm.*``,
    ``--rollout.*``, ``--dtype``); the engines load the checkpoint themselves."""
    dtype = {"auto": "bf16", "fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}[a.dtype]
    args = SimpleNamespace(
        vllm=a.vllm,
        rollout=a.rollout,
        ds=SimpleNamespace(param_dtype=dtype, zero_stage=0),
        train=SimpleNamespace(seed=seed),
        model=SimpleNamespace(model_name_or_path=path),
        data=a.data,
    )
    return VLLMSampler(args, path, a.data.max_len)


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
    """(prompts, SkipLog) of ``--data.dataset`` under ``--data.prompt_key``: [(origin, raw prompt)], origin the
    dataset row (1-based); ``data.load_prompts`` reads them, the command refuses a dataset with none."""
    prompts, skips = read_prompts(a.data, _PrintStrategy, 42)
    if not prompts:
        raise BadInputError(f"--data.dataset {a.data.dataset}: no usable prompts")
    return prompts, skips


class PolicySampler:
    """``sampler(texts, count)`` -> ``count`` responses per text from the policy at ``path`` with the ``--rollout.*``
    settings: vLLM engines for ``--rollout.backend vllm`` (they load the checkpoint themselves), else HF generate on
    the loaded ``model``. ``close()`` stops the engines."""

    def __init__(self, a, path, model, tok, seed):
        self.ro, self.model, self.tok = a.rollout, model, tok
        self.engines = vllm_sampler(a, path, seed) if self.ro.backend == "vllm" else None

    def __call__(self, texts, count):
        ro = self.ro
        if self.engines is not None:
            return self.engines.generate(self.tok, texts, count, ro.temperature, ro.top_p, ro.max_new_tokens)
        bs = max(1, ro.generate_batch_size)
        return generate(self.model, self.tok, texts, count, ro.temperature, ro.top_p, ro.max_new_tokens, batch_size=bs)

    def close(self):
        if self.engines is not None and hasattr(self.engines, "close"):
            self.engines.close()


def sample_missing(sampler, need, batch_size, on_batch):
    """The sampling loop of the phase commands that resume (generate, evaluate): ``need`` lists (key, prompt text,
    responses still missing); prompts missing the same number are sampled together, ``batch_size`` a call, fewest
    first, and ``on_batch([(key, responses), ...])`` receives each call's output at once, so the caller appends it
    to its file before the next call and a crash loses one batch at most."""
    groups = {}
    for key, text, count in need:
        if count > 0:
            groups.setdefault(count, []).append((key, text))
    for count in sorted(groups):
        items = groups[count]
        for s in range(0, len(items), batch_size):
            chunk = items[s : s + batch_size]
            out = sampler([text for _, text in chunk], count)
            on_batch([(key, responses) for (key, _), responses in zip(chunk, out)])
