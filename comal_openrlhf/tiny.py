"""Tiny Llama models and word-level tokenizers built locally, for tests, the CPU demo and benchmarks.

Nothing is downloaded: the tokenizer is a ``tokenizers`` WordLevel model over the given words, the model a
randomly initialised ``LlamaForCausalLM`` from a ``LlamaConfig``. Both are saved with ``save_pretrained`` so
OpenRLHF loads them through its normal ``from_pretrained`` path.
"""

import os

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

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


if __name__ == "__main__":  # the command lives in cli/: say so instead of exiting 0 having done nothing
    raise SystemExit("comal_openrlhf.tiny is the library; the command is: python -m comal_openrlhf.cli.tiny --help")
