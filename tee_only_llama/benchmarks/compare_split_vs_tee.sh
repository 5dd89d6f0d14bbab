#!/usr/bin/env bash
# Run the three split runners and the TEE-only runner on the same model, ids and dtype (float32 unless
# --dtype is given; --tee-dtype bfloat16 sets the TEE-only side alone) and write the comparison report:
# a Markdown table, a CSV and a PNG of the time breakdown. --lengths 8,32,128,512 sweeps and adds a scaling plot.
# Usage: bash tee_only_llama/benchmarks/compare_split_vs_tee.sh [--out-dir DIR] [--lengths L1,L2,...] [runner flags, e.g. --model preset:llama-3.2-1b]
# Works from any directory; outputs go to --out-dir (default ./results). See: python -m splitinfer.bench --help
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" exec python -m splitinfer.bench compare "$@"
