"""A generative LLM as a pairwise judge (the official COMAL v1 code used Llama-3-OffsetBias-8B this way).

The template (``--judge.template``, a file or a string) holds ``{prompt}``, ``{response_a}`` and ``{response_b}``;
they are substituted literally (other braces in the template are left alone). The filled text becomes one user turn
of the tokenizer's chat template (with the generation prompt) when the tokenizer has one. The judge reads the
next-token logits of the two label tokens (default "A", "B") and returns

    P(a beats b) = softmax(logit[label_a], logit[label_b])[0].

Each label must be a single token of the judge's vocabulary; judge both orders (the default of ``judge_pairs``)
to cancel the position bias such judges have.
"""

import os

import numpy as np

from comal_openrlhf.core.judging import Judge, JudgeError
from comal_openrlhf.judges.reward_model import resolve_device

DEFAULT_TEMPLATE = """Compare two responses to the same instruction and decide which one is better: more helpful, \
correct, honest and clear.

# Instruction
{prompt}

# Response A
{response_a}

# Response B
{response_b}

Reply with a single letter: A if Response A is better, B if Response B is better."""

PLACEHOLDERS = ("{prompt}", "{response_a}", "{response_b}")


def read_template(template):
    """``template`` is a file path or the template text itself; None gives the default."""
    if not template:
        return DEFAULT_TEMPLATE
    if os.path.isfile(template):
        with open(template) as f:
            template = f.read()
    missing = [p for p in PLACEHOLDERS if p not in template]
    if missing:
        raise JudgeError(f"pairwise judge template lacks {', '.join(missing)}")
    return template


class PairwiseLMJudge(Judge):
    def __init__(self, path, template=None, labels=("A", "B"), temperature=1.0, device="auto", batch_size=8):
        if not path:
            raise JudgeError("pairwise_lm judge needs --judge.path")
        if len(labels) != 2 or labels[0] == labels[1]:
            raise JudgeError(f"pairwise_lm judge needs two different labels, got {labels!r}")
        if temperature <= 0:
            raise JudgeError(f"pairwise_lm judge {path}: temperature must be > 0, got {temperature}")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = f"pairwise_lm:{path}"
        self.template = read_template(template)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.tokenizer.padding_side = "left"  # the next-token logits are then in the last column
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.label_ids = []
        for label in labels:
            ids = self.tokenizer.encode(label, add_special_tokens=False)
            if len(ids) != 1:
                raise JudgeError(f"judge {self.name!r}: label {label!r} is not a single token (token ids {ids})")
            self.label_ids.append(ids[0])
        self.device = resolve_device(device)
        dtype = torch.bfloat16 if self.device.startswith("cuda") else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()
        self.temperature, self.batch_size = temperature, int(batch_size)

    def text(self, prompt, a, b):
        filled = self.template
        for key, value in zip(PLACEHOLDERS, (prompt, a, b)):
            filled = filled.replace(key, value)
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": filled}], tokenize=False, add_generation_prompt=True
            )
        return filled

    def _prob(self, prompts, a, b):
        import torch

        add_special = not self.tokenizer.chat_template  # a chat template already writes BOS
        out = np.empty(len(prompts), dtype=np.float64)
        for s in range(0, len(prompts), self.batch_size):
            e = min(len(prompts), s + self.batch_size)
            texts = [self.text(*t) for t in zip(prompts[s:e], a[s:e], b[s:e])]
            batch = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=add_special)
            ids, mask = batch["input_ids"].to(self.device), batch["attention_mask"].to(self.device)
            # positions count real tokens only, so a left-padded row reads as it would alone
            pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
            with torch.no_grad():
                logits = self.model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
            logits = logits[:, -1, self.label_ids].float() / self.temperature
            out[s:e] = torch.softmax(logits, dim=-1)[:, 0].cpu().numpy()
        return out
