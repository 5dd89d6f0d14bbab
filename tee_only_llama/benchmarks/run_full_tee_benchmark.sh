#!/usr/bin/env bash
# Run the TEE-only runner (everything on the CPU) and print its figures.
# Usage: bash tee_only_llama/benchmarks/run_full_tee_benchmark.sh [--out-dir DIR] [runner flags, e.g. --dtype bfloat16]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
out_dir=results
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out-dir) out_dir=${2:?--out-dir needs a folder}; shift 2 ;;
    --output) echo "error: --output is fixed by this script; use --out-dir" >&2; exit 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
mkdir -p "$out_dir"
python "$root/tee_only_llama/tee_runner.py" "${args[@]}" --output "$out_dir/tee_only.json"
PYTHONPATH="$root" python -m splitinfer.compare "tee_only=$out_dir/tee_only.json"
echo "results in $out_dir/" >&2
