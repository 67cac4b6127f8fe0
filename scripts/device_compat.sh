#!/usr/bin/env bash
# The GPU machine's versions of what the kernels need, on this CPU machine (docs/gpu.md): .venv-compat/ with
# triton 3.6.0 (the GPU image's), numpy >= 2.4 (the image has 2.5.2) and torch 2.13.0+cpu, without this project
# installed, as there. The image's torch 2.11.0 exists on PyPI only as a CUDA build (a 531 MB wheel plus the
# nvidia-* wheels it requires), so the CPU build on this machine's disk stands in for it: the kernels use no torch
# API that differs between the two. Then: the kernel tests under Triton's interpreter (CPU tensors) and the
# ahead-of-time compile of every launched kernel for sm_90. Idempotent: the environment is rebuilt only when this
# script changes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
V=.venv-compat
stamp=$V/.compat-installed
want="$(sha256sum scripts/device_compat.sh | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  rm -rf "$V"
  $PY -m venv "$V"
  # +cpu: only the CPU build matches, never a CUDA torch from PyPI.
  "$V/bin/pip" install -qq --disable-pip-version-check "torch==2.13.0+cpu" "triton==3.6.0" "numpy>=2.4" pytest \
    pytest-timeout
  echo "$want" > "$stamp"
fi
"$V/bin/python" - <<'PYEOF'
import numpy, torch, triton
assert torch.version.cuda is None, f"expected a CPU torch, got {torch.__version__}"
assert triton.__version__ == "3.6.0", triton.__version__
print(f"device-compat: torch {torch.__version__}, triton {triton.__version__}, numpy {numpy.__version__}")
PYEOF
start=$(date +%s)
TRITON_INTERPRET=1 "$V/bin/python" -m pytest -q -p no:cacheprovider -m "not integration" \
  tests/test_kernels_sequence_logps.py tests/test_kernels_logratio.py tests/test_kernels_linear.py \
  tests/test_kernels_aot.py tests/test_kernels_bench.py
"$V/bin/python" benchmarks/kernels_aot.py --arch 90
echo "device-compat: kernel tests (interpreter) and sm_90 compile passed under triton 3.6.0 in $(( $(date +%s) - start )) s"
