"""``python -m comal_openrlhf.cli.tiny``: a local starting point for a first ``train_comal`` launch on CPU, with no
hub: a tiny Llama and tokenizer (``comal_openrlhf.tiny``), the paper game's prompt and its pairs with soft labels.
"""

import argparse
import json
import os
import sys

from comal_openrlhf.cli.common import run_command
from comal_openrlhf.core.matrix import load_matrix
from comal_openrlhf.errors import BadInputError
from comal_openrlhf.storage import write_atomic
from comal_openrlhf.tiny import DEFAULT_WORDS, PROMPT, build_tiny_llama


def build_example(out, iterations=3, seed=0):
    """A local starting point for ``train_comal`` with no hub: ``out/model`` (a tiny Llama whose words include the
    paper game's options a, b, c), ``out/prompts.jsonl`` (the game's prompt) and ``out/pairs/iter_NNN.jsonl``: every
    ordered pair of distinct options with its soft label P(chosen beats rejected) from the paper's table, one file
    per iteration. Returns the paths."""
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
    p = argparse.ArgumentParser(
        prog="python -m comal_openrlhf.cli.tiny",
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
