#!/usr/bin/env bash
# Run the split runners and the TEE-only runner on the same model, ids and dtype; print the totals side by side.
# Usage: bash tee_only_llama/benchmarks/compare_split_vs_tee.sh [--out-dir DIR] [runner flags]
# Without --dtype, both sides use float32 so that like is compared with like.
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
case " ${args[*]-} " in *" --dtype "*) ;; *) args+=(--dtype float32) ;; esac
mkdir -p "$out_dir"
pairs=()
for scheme in optimized ours otp; do
  runner="$root/tee_gpu/tee_runner_$scheme.py"
  [ -f "$runner" ] || continue
  echo "== split: $scheme ==" >&2
  python "$runner" "${args[@]}" --output "$out_dir/split_$scheme.json"
  pairs+=("$scheme=$out_dir/split_$scheme.json")
done
echo "== tee_only ==" >&2
python "$root/tee_only_llama/tee_runner.py" "${args[@]}" --output "$out_dir/tee_only.json"
pairs+=("tee_only=$out_dir/tee_only.json")
PYTHONPATH="$root" python -m splitinfer.compare "${pairs[@]}"
echo "results in $out_dir/" >&2
