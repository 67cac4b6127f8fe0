"""Sampling responses from a policy with HF ``generate``: the sampling step of a COMAL iteration (arXiv 2410.23223:
responses y ~ mu_k(. | x)), shared by the online source, ``python -m comal_openrlhf.cli.generate`` and the evaluate
command.

``generate`` takes a Hugging Face causal LM (a plain module, or the module inside OpenRLHF's Actor / DeepSpeed
engine, see ``weights.unwrap``), left-pads the prompt texts, and returns ``n`` decoded responses per prompt (special
tokens dropped, outer whitespace stripped). Under ZeRO-3 every rank must run the same number of ``generate`` calls
(each forward gathers partitioned weights collectively): ``synced_gpus=True`` keeps the ranks in step inside a call
and ``min_calls`` (the largest call count over ranks) adds padding calls whose output is dropped.
"""

import math

import torch

from comal_openrlhf.weights import unwrap


def num_calls(n_texts, batch_size):
    return math.ceil(n_texts / max(1, batch_size))


@torch.no_grad()
def generate(
    model,
    tokenizer,
    texts,
    n,
    temperature=1.0,
    top_p=1.0,
    max_new_tokens=256,
    batch_size=16,
    synced_gpus=False,
    min_calls=0,
    do_sample=True,
    progress=None,
):
    """``n`` responses for each prompt text: list (one per text) of lists of ``n`` strings.

    ``do_sample=False`` is greedy decoding (then ``n`` copies of the greedy response). ``progress`` is an optional
    callable receiving the number of prompts finished after each call (for a progress bar).
    """
    hf = unwrap(model)
    device = next(hf.parameters()).device
    was_training = hf.training
    hf.eval()
    bs = max(1, batch_size)
    out = []
    calls = max(num_calls(len(texts), bs), min_calls)
    sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if do_sample else dict(do_sample=False)
    try:
        for c in range(calls):
            chunk = texts[c * bs : (c + 1) * bs] or texts[:1]  # a padding call keeps ZeRO-3 ranks in step
            if not chunk:
                break
            enc = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in chunk]
            width = max(map(len, enc))
            ids = torch.full((len(enc), width), tokenizer.pad_token_id, dtype=torch.long)
            att = torch.zeros_like(ids)
            for i, e in enumerate(enc):  # left padding for generation
                ids[i, width - len(e) :] = torch.tensor(e, dtype=torch.long)
                att[i, width - len(e) :] = 1
            gen = hf.generate(
                input_ids=ids.to(device),
                attention_mask=att.to(device),
                max_new_tokens=max_new_tokens,
                num_return_sequences=n if do_sample else 1,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                synced_gpus=synced_gpus,
                **sampling,
            )
            if c * bs < len(texts):
                resp = [r.strip() for r in tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)]
                m = n if do_sample else 1
                out += [resp[i * m : (i + 1) * m] * (1 if do_sample else n) for i in range(len(chunk))]
                if progress is not None:
                    progress(len(chunk))
    finally:
        if was_training:
            hf.train()
    return out
