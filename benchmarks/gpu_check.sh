#!/usr/bin/env bash
# The GPU check: builds fastcodegen, then runs every check in order of value, each within its own time
# limit, writing summary.md, summary.json and the logs into OUTDIR as it goes (benchmarks/gpu_check.py
# drives the stages; `--help` lists them).
#
#   bash benchmarks/gpu_check.sh OUTDIR          # on a CUDA machine: at most 525 s, the build included
#   bash benchmarks/gpu_check.sh --cpu OUTDIR    # the same stages at tiny shapes on the CPU (a smoke test)
#
# PYTHON picks the interpreter (default: python3, else python): the one whose torch and triton to use.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-$(command -v python3 || command -v python || true)}"
if [ -z "$PYTHON" ]; then
    echo "error: no python3 or python on the PATH (set PYTHON)" >&2
    exit 2
fi
exec "$PYTHON" benchmarks/gpu_check.py "$@"
