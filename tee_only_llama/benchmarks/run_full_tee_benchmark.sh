#!/usr/bin/env bash
# Run the TEE-only runner (everything on the CPU) and report its figures.
# Usage: bash tee_only_llama/benchmarks/run_full_tee_benchmark.sh [--out-dir DIR] [--lengths L1,L2,...] [runner flags, e.g. --model preset:llama-3.2-1b]
# Works from any directory; outputs go to --out-dir (default ./results). See: python -m splitinfer.bench --help
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" exec python -m splitinfer.bench tee "$@"
