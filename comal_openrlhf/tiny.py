"""Tiny Llama models and word-level tokenizers built locally, for tests, the CPU demo and benchmarks.

Nothing is downloaded: the tokenizer is a ``tokenizers`` WordLevel model over the given words, the model a
randomly initialised ``LlamaForCausalLM`` from a ``LlamaConfig``. Both are saved with ``save_pretrained`` so
OpenRLHF loads them through its normal ``from_pretrained`` path.
"""

import os

DEFAULT_WORDS = (
    "the a an is of to and in that it for on with as was at by be this are or from".split()
    + "question answer yes no good bad best option pick choose one two three four five six".split()
)
SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}user : {{ m['content'] }} "
    "{% else %}assistant : {{ m['content'] }} </s> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def build_tokenizer(words=DEFAULT_WORDS):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for w in list(words) + ["user", "assistant", ":", ".", ",", "?"]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_llama(
    path,
    words=DEFAULT_WORDS,
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    intermediate_size=64,
    max_positions=256,
    seed=0,
    reward_head=False,
):
    """Save a tiny Llama + tokenizer to ``path`` and return ``path``. ``reward_head``: a scalar "score" head
    (LlamaForSequenceClassification, num_labels 1), the layout OpenRLHF's reward-model loader reads."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    tokenizer = build_tokenizer(words)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        num_labels=1,
    )
    torch.manual_seed(seed)
    model = (LlamaForSequenceClassification if reward_head else LlamaForCausalLM)(config)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------------- the command

PROMPT = "question pick one ?"


def build_example(out, iterations=3, seed=0):
    """A local starting point for ``train_comal`` with no hub: ``out/model`` (a tiny Llama whose words include the
    paper game's options a, b, c), ``out/prompts.jsonl`` (the game's prompt) and ``out/pairs/iter_NNN.jsonl``: every
    ordered pair of distinct options with its soft label P(chosen beats rejected) from the paper's table, one file
    per iteration. Returns the paths."""
    import json

    from comal_openrlhf.matrix import load_matrix
    from comal_openrlhf.storage import write_atomic

    P, labels = load_matrix("paper")
    model = build_tiny_llama(os.path.join(out, "model"), words=tuple(DEFAULT_WORDS) + tuple(labels), seed=seed)
    rows = [
        {"prompt": PROMPT, "chosen": a, "rejected": b, "soft_label": float(P[i, j])}
        for i, a in enumerate(labels)
        for j, b in enumerate(labels)
        if i != j
    ]
    pairs = os.path.join(out, "pairs")
    for k in range(iterations):
        write_atomic(os.path.join(pairs, f"iter_{k:03d}.jsonl"), "".join(json.dumps(r) + "\n" for r in rows * 4))
    prompts = os.path.join(out, "prompts.jsonl")
    write_atomic(prompts, json.dumps({"prompt": PROMPT}) + "\n")
    return {"model": model, "pairs_dir": pairs, "prompts": prompts}


def main(argv=None):
    import argparse
    import sys

    from comal_openrlhf._cli import run_command

    p = argparse.ArgumentParser(
        prog="python -m comal_openrlhf.tiny",
        description="Build a tiny Llama + tokenizer and example pair files locally (no hub), for a first train_comal "
        "launch on CPU.",
    )
    p.add_argument("--out", default="comal_tiny", help="Folder to write (model/, pairs/, prompts.jsonl)")
    p.add_argument("--iterations", type=int, default=3, help="Number of iteration pair files")
    p.add_argument("--seed", type=int, default=0, help="Initialisation seed of the model")
    p.add_argument("--json", action="store_true", default=False, help="Print the paths as one JSON object")
    a = p.parse_args(argv)

    def run():
        if a.iterations < 1:
            from comal_openrlhf.errors import BadInputError

            raise BadInputError(f"--iterations must be >= 1, got {a.iterations}")
        paths = build_example(a.out, a.iterations, a.seed)
        if not a.json:
            print(
                f"wrote {paths['model']} (model + tokenizer), {paths['pairs_dir']} ({a.iterations} iteration files), "
                f"{paths['prompts']}; train on them with\n"
                f"  python -m openrlhf.cli.train_comal --model.model_name_or_path {paths['model']} "
                f"--comal.pairs_dir {paths['pairs_dir']} --comal.algo comal --data.apply_chat_template "
                "--train.micro_batch_size 4 --train.batch_size 4 --ckpt.output_dir comal_tiny_run/final "
                "--ckpt.path comal_tiny_run/ckpt",
                file=sys.stderr,
            )
        return paths

    return run_command(run, a.json)


if __name__ == "__main__":
    main()
