"""Where an online COMAL iteration's time goes: sampling, judging, precompute, training, weight push, checkpoint.

    python benchmarks/iteration_split.py [--nproc 2] [--prompts 8] [--samples 8] [--iterations 3] [--backend vllm]

Runs ``train_comal`` for real (torchrun, ZeRO-3, a tiny Llama built locally, a tiny GPM judge or the exact ``table``
judge, the vLLM CPU engine where ``--backend vllm``) and prints a markdown table of each phase's wall time per
iteration, read from the run's own records: ``comal_iterations.jsonl`` (rollout_sample_s with the push inside it,
rollout_push_s, rollout_judge_s, precompute_s, train_s, advance_s, seconds) and the "[comal] checkpoint saved (end
of iteration)" lines (the checkpoint's seconds). The figures are this machine's; docs/scale.md says how each
term grows.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from _util import torchrun, write_jsonl  # noqa: E402

from comal_openrlhf.judges.tiny_gpm import build_tiny_gpm  # noqa: E402
from comal_openrlhf.tiny import DEFAULT_WORDS, build_tiny_llama  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--backend", default="vllm", choices=["vllm", "hf"])
    ap.add_argument("--judge", default="gpm", choices=["gpm", "table"], help="a tiny GPM (a model forward per pair) "
                    "or the exact table judge (a lookup)")  # fmt: skip
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="comal_split_")
    # head_dim 64: vLLM's CPU attention refuses the default tiny model's head_dim 8
    model = build_tiny_llama(os.path.join(tmp, "model"), hidden_size=128, num_heads=2, intermediate_size=256,
                             words=tuple(DEFAULT_WORDS) + ("b", "c"))  # fmt: skip
    prompts = write_jsonl(os.path.join(tmp, "prompts.jsonl"), [{"prompt": "question pick one ?"}] * a.prompts)
    cmd = torchrun(a.nproc) + ["-m", "openrlhf.cli.train_comal", "--model.model_name_or_path", model]
    cmd += ["--comal.source", "online", "--ds.zero_stage", "3"]
    if a.judge == "gpm":
        gpm = build_tiny_gpm(os.path.join(tmp, "gpm"), value_head_dim=6, seed=1)
        cmd += ["--judge.kind", "gpm", "--judge.path", gpm, "--judge.device", "cpu"]
    else:
        cmd += ["--judge.kind", "table", "--judge.table", "paper"]
    if a.backend == "vllm":
        cmd += ["--rollout.backend", "vllm", "--vllm.enforce_eager"]
    cmd += ["--data.dataset", prompts, "--data.prompt_key", "prompt", "--data.apply_chat_template"]
    cmd += ["--data.max_len", "32", "--rollout.n_samples_per_prompt", str(a.samples), "--rollout.max_new_tokens", "3"]
    cmd += ["--rollout.prompts_per_iteration", str(a.prompts), "--comal.iterations", str(a.iterations)]
    cmd += ["--train.micro_batch_size", "2", "--train.batch_size", str(2 * a.nproc), "--comal.algo", "comal"]
    cmd += ["--comal.ref_update_interval", "1", "--rollout.pair_rule", "all_soft", "--train.max_epochs", "1"]
    cmd += ["--ckpt.output_dir", os.path.join(tmp, "final"), "--ckpt.path", os.path.join(tmp, "ckpt")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    log = p.stdout + p.stderr
    if p.returncode != 0:
        sys.exit(f"train_comal failed ({p.returncode}):\n{log[-4000:]}")
    hist = [json.loads(x) for x in open(os.path.join(tmp, "final", "comal_iterations.jsonl"))]
    ckpt = [float(m) for m in re.findall(r"checkpoint saved \(end of iteration\).*\((\d+\.\d+) s\)", log)]
    print(f"{a.nproc} ranks, ZeRO-3, backend {a.backend}, judge {a.judge}, {a.prompts} prompts x {a.samples} samples")
    print("| iteration | pairs | sampling | (of which weight push) | judging | precompute | training | advance | "
          "checkpoint | iteration total |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for i, h in enumerate(hist):
        row = [h["iteration"], h["pairs"], h.get("rollout_sample_s", 0.0), h.get("rollout_push_s", 0.0),
               h.get("rollout_judge_s", 0.0), h.get("precompute_s", 0.0), h.get("train_s", 0.0),
               h.get("advance_s", 0.0), ckpt[i] if i < len(ckpt) else float("nan"), h["seconds"]]  # fmt: skip
        print("| " + " | ".join(f"{v:.2f} s" if isinstance(v, float) else str(v) for v in row) + " |")


if __name__ == "__main__":
    main()
