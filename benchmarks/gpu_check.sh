#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): the working tree with this machine's own python3, no install.
#   benchmarks/gpu_check.sh OUT [--data-dir DIR] [--limit N] [--epochs N] [--budget SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
