#!/usr/bin/env bash
# The first run on a lent GPU machine (docs/gpu.md): benchmarks/device_check.py with the machine's own python3, from
# the repository root, with no install step (the project is imported from this checkout). It writes
# device_check.json and device_check.log to $OUT (./device_out where $OUT is unset), keeps to its own time budget
# (--budget, 300 s by default) and exits 0 whatever a step did: the JSON says which steps failed and why.
# Arguments pass through: --dry-run (CPU, tiny sizes), --steps a,b (a rerun of some steps), --budget SECONDS.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/device_check.py "$@"
