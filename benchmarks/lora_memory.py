"""Benchmark: peak memory of a COMAL run with LoRA (one base model, two adapters) against full weights (policy +
reference model + the optimizer's state of every weight), same model, pairs and settings.

    python benchmarks/lora_memory.py [--hidden 512] [--layers 4] [--rank 16] [--pairs 16] [--out DIR]

A Llama of ``--hidden`` x ``--layers`` with the tiny word-level tokenizer is built locally (comal_openrlhf.tiny, no
hub), with two iteration files of pairs; then ``python -m openrlhf.cli.train_comal`` runs each configuration as its
own single-process launch (comal preset, an advance after each iteration, ZeRO-2, bf16 parameters where the CPU
runtime keeps them, else fp32). Peak memory is the process's peak resident set size (``ru_maxrss`` from ``os.wait4``
on the launched process): everything the process held at its peak, the Python runtime and libraries included, so the
difference between the two rows is what the second base model and the full optimizer state cost. On CUDA the same
launches run on the GPU and the RSS is host memory only. Prints a markdown table.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time


def build(out, hidden, layers, pairs):
    from comal_openrlhf.tiny import build_tiny_llama

    model = build_tiny_llama(
        os.path.join(out, "model"),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=max(1, hidden // 64),
        intermediate_size=hidden * 8 // 3 // 64 * 64 or 64,
    )
    pairs_dir = os.path.join(out, "pairs")
    os.makedirs(pairs_dir, exist_ok=True)
    row = {"prompt": "question pick one ?", "chosen": "yes good", "rejected": "no bad"}
    for k in range(2):
        with open(os.path.join(pairs_dir, f"iter_{k:03d}.jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for _ in range(pairs))
    return model, pairs_dir


def launch(model, pairs_dir, out, name, extra):
    work = os.path.join(out, name)
    cmd = [sys.executable, "-m", "openrlhf.cli.train_comal", "--model.model_name_or_path", model]
    cmd += ["--comal.pairs_dir", pairs_dir, "--comal.algo", "comal", "--comal.ref_update_interval", "1"]
    cmd += ["--train.micro_batch_size", "4", "--train.batch_size", "4", "--train.max_epochs", "1"]
    cmd += ["--adam.lr", "1e-4", "--data.prompt_key", "prompt", "--data.max_len", "64", "--ds.zero_stage", "2"]
    cmd += ["--ckpt.output_dir", os.path.join(work, "final"), "--ckpt.path", os.path.join(work, "ckpt")]
    cmd += ["--comal.no_iteration_ckpt"] + extra
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.time()
    with open(os.path.join(out, f"{name}.log"), "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{name}: train_comal failed; see {out}/{name}.log")
    return usage.ru_maxrss / 1024, time.time() - t0  # Linux: KiB -> MiB


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--out", default=None, help="work folder (default: a temporary one)")
    a = p.parse_args()
    out = a.out or tempfile.mkdtemp(prefix="lora_memory_")
    os.makedirs(out, exist_ok=True)
    model, pairs_dir = build(out, a.hidden, a.layers, a.pairs)
    import torch
    from transformers import AutoModelForCausalLM

    n = sum(t.numel() for t in AutoModelForCausalLM.from_pretrained(model).parameters())
    rows = [("full weights (policy + reference)", *launch(model, pairs_dir, out, "full", []))]
    lora = ["--ds.lora.rank", str(a.rank), "--ds.lora.alpha", str(2 * a.rank)]
    rows.append((f"LoRA rank {a.rank} (anchor = second adapter)", *launch(model, pairs_dir, out, "lora", lora)))
    print(f"model: {n / 1e6:.1f} M parameters (hidden {a.hidden}, {a.layers} layers), torch {torch.__version__}")
    print("| run | peak RSS (MiB) | wall (s) |\n|---|---|---|")
    for name, rss, secs in rows:
        print(f"| {name} | {rss:.0f} | {secs:.0f} |")
    print(f"LoRA / full: {rows[1][1] / rows[0][1]:.2f}; saved {rows[0][1] - rows[1][1]:.0f} MiB")


if __name__ == "__main__":
    main()
