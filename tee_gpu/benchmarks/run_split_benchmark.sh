#!/usr/bin/env bash
# Run every split runner that exists with the same settings, one JSON each, then print them side by side.
# Usage: bash tee_gpu/benchmarks/run_split_benchmark.sh [--out-dir DIR] [runner flags, e.g. --model preset:llama-3.2-1b]
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
out_dir=results
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out-dir) out_dir=${2:?--out-dir needs a folder}; shift 2 ;;
    --output) echo "error: --output is chosen per runner; use --out-dir" >&2; exit 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
mkdir -p "$out_dir"
pairs=()
for scheme in optimized ours otp; do
  runner="$root/tee_gpu/tee_runner_$scheme.py"
  [ -f "$runner" ] || continue
  echo "== $scheme ==" >&2
  python "$runner" "${args[@]}" --output "$out_dir/split_$scheme.json"
  pairs+=("$scheme=$out_dir/split_$scheme.json")
done
PYTHONPATH="$root" python -m splitinfer.compare "${pairs[@]}"
echo "results in $out_dir/" >&2
