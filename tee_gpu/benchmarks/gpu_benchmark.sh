#!/usr/bin/env bash
# The GPU benchmark: one script for a GPU machine (random presets only: it needs no network and no gguf).
# Writes six files to OUT_DIR (one more each with BASELINE and SPIN), each as soon as its step is done, most
# needed first (a run cut short keeps them):
#   perf.json          the in-process comparison, its ratios, the overlapped plain split and the ablations
#   profile.txt        torch.profiler tables of one inference of each split runner
#   perf_baseline.json with BASELINE=DIR (an older commit's tree, e.g. `git archive REF splitinfer tee_gpu
#                      tee_only_llama | tar -x -C DIR`): its split runners,
#                      timed the same way right after, for a before/after on one machine (compare its
#                      median_ms with perf.json's instrumented_median_ms if it predates uninstrumented runs)
#   runners.json       every runner's own JSON, each in a fresh process:
#                      first inference, memory, logit error
#   perf_spin.json     with SPIN=1: the comparison again with OMP_WAIT_POLICY=ACTIVE (idle TEE threads spin),
#                      no ablations (about 70 s; spinning measured slower on the H100 machine, faster on the H200)
#   precision.json     float16 logit error of each scheme against the float32 reference, 3 mask seeds
#   kernel_bench.json  the TEE's steps of one layer on this machine's CPU, eager against compiled kernels
#                      (splitinfer.kernel_bench; last, as the least needed; about 40 s)
#   log.txt            with the seconds since the start at each step
# On one H100 (2026-11-26) with THREAD_SWEEP=8 and the spin pass the steps began at 10, 30, 194, 430 and
# 489 s, and the precision step was cut at 520 s. Since then the runners step runs 12 processes, not 14, each
# with one repeat, not 3; perf times each repeat twice (uninstrumented and instrumented); the spin pass is
# opt-in. Expect about 8 minutes, 9.5 with BASELINE (about 90 s), so leave SPIN out when BASELINE is set.
# With compiled TEE kernels (the split runners' default with CUDA since the seventh round), one H100 run of
# the seventh round's code (2026-11-26, eighth round) began its steps at 8, 82 and 307 s and was cut at 550 s
# after 4 of the 8 runner processes: each split runner's set-up took 41 s (setup_ms), where the compiler
# then started a pool of 16 worker processes; the eighth round builds in-process (kernels._probe), which
# should bring a runner process back to about 17 s, unmeasured. Until a run shows it, leave BASELINE out.
# The runners step takes the longest length first: the memory target is stated at 512 tokens.
# A CUDA failure in any pass does not stop the passes after it; THREAD_SWEEP=4,8 adds thread-count
# ablations to the first pass (~40 s per count).
# Usage: bash tee_gpu/benchmarks/gpu_benchmark.sh OUT_DIR [PRESET]   (PRESET defaults to llama-3.2-1b)
# LENGTHS=128,512 and PRECISION_LENGTH=128 may be overridden, and MODEL (default preset:PRESET) and
# PRECISION_MODEL (default preset:smollm2-135m) and KERNEL_PRESET (default PRESET) too: tiny values make a
# dry run on a CPU (tests/test_bench.py).
# KERNELS=eager (or compiled) sets this tree's runners' TEE kernels; unset, each runner's own default.
set -euo pipefail
out=${1:?usage: gpu_benchmark.sh OUT_DIR [PRESET]}
preset=${2:-llama-3.2-1b}
model=${MODEL:-preset:$preset}
precision_model=${PRECISION_MODEL:-preset:smollm2-135m}
lengths=${LENGTHS:-128,512}
precision_length=${PRECISION_LENGTH:-128}
thread_sweep=${THREAD_SWEEP:-}
baseline=${BASELINE:-}
if [ -n "$baseline" ]; then  # absolute, since its pass runs from inside it; checked before anything runs
  [ -d "$baseline/splitinfer" ] || { echo "error: BASELINE '$baseline' holds no splitinfer package" >&2; exit 2; }
  baseline=$(cd "$baseline" && pwd)
fi
spin=${SPIN:-}
kernels=${KERNELS:+--kernels=$KERNELS}  # this tree's runners only (a baseline's may predate the flag); unset: theirs
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/runners" "$work/precision"
exec > >(tee "$out/log.txt") 2>&1
step() { echo "== [${SECONDS}s] $* =="; }  # seconds since the start: how long each step took, for planning runs
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, \
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0), 'threads', torch.get_num_threads())"

# A CUDA error can poison the process it happens in, so the overlapped plain split (not yet run on a GPU
# when this was written) is first tried in a process of its own, and left out of the comparisons if it fails.
step "smoke test: the plain runner with --overlap, in a process of its own"
no_overlap=""
python "$root/tee_gpu/tee_runner_optimized.py" --model "$model" --prefill-length "${lengths%%,*}" \
  --dtype float16 --overlap $kernels --output "$work/overlap_smoke.json" 2>&1 | tail -2 || true
python -c "import json, sys; sys.exit(json.load(open(sys.argv[1]))['correctness']['rel_logit_error'] > 1e-2)" \
  "$work/overlap_smoke.json" 2>/dev/null || { no_overlap="--no-overlap"; echo "warning: --overlap failed or its logits are off; the comparisons leave it out"; }

step "in-process comparison: split runners, TEE-only (bfloat16), transformers on CPU and GPU"
python -m splitinfer.perf --model "$model" --lengths "$lengths" --dtype float16 --tee-dtype bfloat16 \
  --warmup 2 --repeat 5 ${thread_sweep:+--thread-sweep "$thread_sweep"} $no_overlap --profile $kernels \
  --out-dir "$work/perf" || true
cp "$work/perf/perf.json" "$out/perf.json" || true
cp "$work/perf/profile.txt" "$out/profile.txt" || true

if [ -n "$baseline" ]; then
  if [ -d "$model" ]; then model_there=$(cd "$model" && pwd); else model_there=$model; fi
  step "the split runners of the baseline in $baseline, timed the same way"
  # from inside it: `python -m` puts the working directory ahead of PYTHONPATH
  (cd "$baseline" && PYTHONPATH="$baseline" python -m splitinfer.perf --model "$model_there" --lengths "$lengths" \
    --dtype float16 --warmup 2 --repeat 5 --split-only --no-ablations --no-overlap --out-dir "$work/baseline") || true
  cp "$work/baseline/perf.json" "$out/perf_baseline.json" || true
fi

merge() {  # every JSON of one group into OUT_DIR/GROUP.json, written as soon as the group is done
  python - "$work/$1" "$out/$1.json" <<'PY'
import glob, json, os, sys
folder, target = sys.argv[1:]
merged = {os.path.basename(p)[:-5]: json.load(open(p)) for p in sorted(glob.glob(f"{folder}/*.json"))}
with open(target, "w") as f:
    json.dump(merged, f, indent=1)
print(f"{target}: {len(merged)} results")
PY
}

step "each runner in its own process: the first inference, then one more"
for n in $(tr ',' '\n' <<<"$lengths" | sort -rn); do
  for runner in optimized ours otp; do
    python "$root/tee_gpu/tee_runner_$runner.py" --model "$model" --prefill-length $n --dtype float16 \
      --repeat 1 $kernels --output "$work/runners/${runner}_n$n.json" 2>&1 | tail -3 || true
  done
  python "$root/tee_only_llama/tee_runner.py" --model "$model" --prefill-length $n --dtype bfloat16 \
    --repeat 1 --no-reference $kernels --output "$work/runners/tee_only_n$n.json" 2>&1 | tail -2 || true
  merge runners  # after each length, so that a run cut short still returns what it measured
done

if [ -n "$spin" ]; then
  step "the same with spinning OpenMP threads (OMP_WAIT_POLICY=ACTIVE), baselines included"
  OMP_WAIT_POLICY=ACTIVE python -m splitinfer.perf --model "$model" --lengths "$lengths" --dtype float16 \
    --tee-dtype bfloat16 --warmup 2 --repeat 5 --no-ablations $no_overlap $kernels --out-dir "$work/spin" || true
  cp "$work/spin/perf.json" "$out/perf_spin.json" || true
fi

step "float16 precision of each scheme against the float32 reference (smollm2-135m shape, 3 mask seeds)"
python -m splitinfer.precision --model "$precision_model" --length "$precision_length" --seeds 1,2,3 \
  $kernels --out "$work/precision/batch1.json" || true
python -m splitinfer.precision --model "$precision_model" --length "$precision_length" --seeds 1,2,3 \
  --batch-size 2 --ragged $kernels --out "$work/precision/batch2_ragged.json" || true
merge precision

step "the TEE's steps of one layer, eager and compiled kernels (CPU only)"
python -m splitinfer.kernel_bench --preset "${KERNEL_PRESET:-$preset}" --lengths "$lengths" \
  --out "$work/kernel_bench.json" || true
cp "$work/kernel_bench.json" "$out/kernel_bench.json" || true

echo "wrote $(ls "$out" | tr '\n' ' ')to $out in ${SECONDS}s"
