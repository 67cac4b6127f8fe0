"""Run any OpenRLHF entry point through the plugin's runtime: ``python -m comal_openrlhf.cli.run MODULE [FLAGS...]``.

Example (OpenRLHF's own DPO on a CPU-only machine)::

    python -m comal_openrlhf.cli.run openrlhf.cli.train_dpo --model.model_name_or_path ... --ds.zero_stage 2
    torchrun --nproc_per_node 2 -m comal_openrlhf.cli.run openrlhf.cli.train_dpo ...

On a machine with CUDA the runtime changes nothing and the module runs exactly as ``python -m MODULE`` would.
"""

import runpy
import sys

from comal_openrlhf import cpu_runtime
from comal_openrlhf.errors import COMALError


def main():
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        raise SystemExit(0 if len(sys.argv) >= 2 else 2)

    cpu_runtime.apply()
    module = sys.argv[1]
    sys.argv = [module] + sys.argv[2:]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except COMALError as e:  # e.g. a CUDA-only setting refused by the CPU runtime
        print(f"[comal] error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
