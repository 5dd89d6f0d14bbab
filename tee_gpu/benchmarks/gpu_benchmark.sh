#!/usr/bin/env bash
# The GPU benchmark: one script for a GPU machine (random presets only: it needs no network and no gguf).
# It keeps to a time budget, DEADLINE seconds from its start (default 570, under the 10 minutes one lent
# machine's call allows): each step runs with what is left of it, and for no longer than its own limit (the
# comparison 330 s or PERF_LIMIT, a runner process 120 s), so that one slow step leaves time to the others. A step cut
# short keeps what it measured (perf writes its figures marked `incomplete`), and a step that cannot start
# with the least it needs is skipped with a line in the log. Files in OUT_DIR, each written as soon as its
# step is done, most needed first (in the order the steps run: the floor, the comparison, the runner
# processes, the precision check, kernel_bench):
#   perf_floor.json    the comparison on llama-3.2-1b-narrow: the 1B shape's 16 layers, heads per group
#                      and tied table at widths of 64, so each runner makes the same calls and crossings with
#                      next to no arithmetic or bytes in them: what those calls cost on their own, the floor
#                      under each runner's time that no faster kernel or copy lowers (eager kernels: a compiled
#                      kernel's call costs more at such sizes; FLOOR_KERNELS=compiled to time them; 50 s on one
#                      H100 in the twenty-sixth round); perf_floor.csv and profile_floor.txt with it. First: cheap,
#                      and the first process to capture CUDA graphs, which the runners leave to set-up (auto);
#                      where its runners do not all finish, perf and the runner processes run with graphs off (a
#                      graph's failure may end its process)
#   perf.json          the in-process comparison (split runners, TEE-only in bfloat16, transformers on the CPU
#                      and the GPU) and its ratios; copy bandwidth first, then the runners and baselines at
#                      every length, with the plain split's fresh-buffer variant (a fresh pinned buffer per copy)
#                      timed in turn with them. Each runner's set-up times CUDA graphs and fused hops each way and
#                      keeps the faster (its `configuration` holds each way's median), so the variants that force them
#                      (*_cuda_graphs, *_fused_hops, *_fused_hops_cuda_graphs), and the plain split and ours with
#                      eager kernels and compiled at every shape, are opt-in: VARIANTS=1. The twenty-sixth round's
#                      headline took about 245 s on one H100, most of it compiling (about 23 s an engine)
#   perf.csv           the same figures flat, one row per length and method, for plotting
#   profile.txt        torch.profiler tables of one inference of each split runner
#   runners.json       every runner's own JSON, each in a fresh process, at RUNNER_LENGTHS (default the longest
#                      of LENGTHS, where the memory target is stated; about 60 s a process on one H100, cold):
#                      first inference, set-up, memory, bytes, logit error
#   precision.json     float16 logit error of each scheme against the float32 reference, 3 mask seeds (about
#                      110 s)
#   kernel_bench.json  the fixed cost of a call at 1, 4, 8 and 16 threads (an RMSNorm straight after another,
#                      after 0.2, 2 and 30 ms idle, and straight after a round trip to the GPU, as the engine's
#                      TEE ops come), also in fresh processes under OMP_WAIT_POLICY=PASSIVE
#                      and ACTIVE (waking OpenMP's threads), the CPU's matrix product rates in float32,
#                      bfloat16 and int8 (whether AMX runs otp's integer cross terms), the host's memory rates
#                      (memory_gbs: a copy and a float16 pass over 256 MiB, on all threads and one, and from
#                      pinned memory: whether the TEE's element-wise ops are bound by them), one layer's GPU calls
#                      op by op and replayed from CUDA graphs (gpu_calls: what a graph saves a call on this
#                      host), one hop with its copies made each way they could be (hop_forms: fresh or kept
#                      pinned buffers, copies inside the graph or apart), then the TEE's steps
#                      of one layer on this machine's CPU, eager against compiled kernels, the three hops
#                      between linears separate and fused, and otp's scores' cross terms as float32 and as
#                      integer products among them (splitinfer.kernel_bench; written after each stage,
#                      marked incomplete if cut)
#   targets.json/.md   the performance issue's targets judged from the files above (splitinfer.targets): each
#                      figure, its limit, met or not, and the fastest configuration measured beside the shipped
#                      runner; rerun it on a copy of OUT_DIR if the run was cut before this step
#   log.txt            with the seconds since the start at each step
# One lent machine's 15 minutes hold two calls: this script with the default budget (the floor, the comparison
# and the runner processes fit), then the rest on a second machine, STEPS=precision,kernel_bench DEADLINE=250,
# into another folder; copy that folder's files beside the first's and run splitinfer.targets on it. On one H200
# (thirty-ninth round) STEPS=perf,kernel_bench WITHOUT_CPP=1 PERF_LIMIT=420 with kernel_bench at 16 threads and 512
# tokens took 347 s, then STEPS=floor,runners,precision 248 s on the same machine, still warm: 12 minutes of
# device time with the start.
# Opt-in, each adding a step (and a file) and time:
#   ABLATIONS=1   perf's ablations (pageable copies, the full scores, blocks of 128 rows, ours with its own
#                 embedding table and otp reading the GPU's) and the plain split with overlapped copies, after a smoke test of
#                 --overlap in a process of its own (a CUDA error can poison the process it happens in).
#                 On one H100 (eighth round) they made the comparison 225 s instead of about 100.
#   WITHOUT_CPP=1 the comparison also times each split runner with the TEE's C++ kernels left out
#                 (*_no_cpp_kernels, round by round with the runners; perf --without-cpp): what they save, in one
#                 process (three more engines at each length: raise PERF_LIMIT, the comparison's limit, from 330 s)
#   CPP_KERNELS=1 the comparison also times each split runner with --kernels cpp (*_cpp_kernels: no inductor,
#                 each making its own set-up choices), round by round with the runners as they ship (compiled):
#                 which kernels a GPU host's runners should ship with (three more engines: raise PERF_LIMIT)
#   BASELINE=DIR  perf_baseline.json: the split runners of an older commit's tree (e.g. `git archive REF
#                 splitinfer tee_gpu tee_only_llama | tar -x -C DIR`), timed the same way right after perf,
#                 for a before/after on one machine (about 90 s)
#   SPIN=1        perf_spin.json: the comparison again with OMP_WAIT_POLICY=ACTIVE (idle TEE threads spin;
#                 measured slower on the H100 machine, faster on the H200; about 70 s)
# Step times on one H100 (twenty-sixth round): start 8 s, the floor 50 s, the comparison's headline about 245 s,
# a runner process at 512 tokens 45-70 s (25-41 s of it compiling the TEE's kernels on a machine whose
# compiler cache was cold, and 15 s more for the compiler's first start in the first), precision 110 s.
# Usage: bash tee_gpu/benchmarks/gpu_benchmark.sh OUT_DIR [PRESET]   (PRESET defaults to llama-3.2-1b)
# LENGTHS=128,512 and PRECISION_LENGTH=128 may be overridden, and MODEL (default preset:PRESET) and
# PRECISION_MODEL (default preset:smollm2-135m), FLOOR_MODEL and KERNEL_PRESET (default PRESET) too: tiny values make a
# dry run on a CPU (tests/test_bench.py). THREAD_SWEEP=8,12 adds the runners at those thread counts to the
# comparison (tenth round, 128 tokens, against 16 threads: plain 0.87-1.34x, ours 1.19-2.0x, otp
# 1.06-1.53x, so none by default); KERNEL_THREADS
# (default 1,4,8,16) sets kernel_bench's thread counts, KERNEL_LENGTHS (default LENGTHS) its token counts,
# KERNEL_WAIT_POLICIES (default PASSIVE,ACTIVE; empty: none)
# the OpenMP wait policies its fixed costs are also timed under. WARMUP=2 and REPEAT=5 set the comparisons' untimed
# and timed inferences per method, KERNEL_REPEAT=30 kernel_bench's timed calls per step (fewer: a quicker, noisier run).
# KERNELS=eager (or compiled) sets this tree's runners' TEE kernels; unset, each runner's own default.
# STEPS (default floor,perf,runners,precision,kernel_bench; the order they run in is fixed) names the steps to
# run, to finish a cut run on a second machine (STEPS=precision,kernel_bench). RUNNER_LENGTHS=128,512 sets
# the runner processes' lengths. Without the floor, the runners leave CUDA graphs to set-up, as they ship.
set -euo pipefail
out=${1:?usage: gpu_benchmark.sh OUT_DIR [PRESET]}
preset=${2:-llama-3.2-1b}
model=${MODEL:-preset:$preset}
precision_model=${PRECISION_MODEL:-preset:smollm2-135m}
floor_model=${FLOOR_MODEL:-preset:llama-3.2-1b-narrow}
lengths=${LENGTHS:-128,512}
precision_length=${PRECISION_LENGTH:-128}
thread_sweep=${THREAD_SWEEP:-}
kernel_threads=${KERNEL_THREADS:-1,4,8,16}
kernel_lengths=${KERNEL_LENGTHS:-$lengths}
kernel_wait_policies=${KERNEL_WAIT_POLICIES-PASSIVE,ACTIVE}
deadline=${DEADLINE:-570}
perf_limit=${PERF_LIMIT:-330}  # the comparison's own limit (its three engines more with WITHOUT_CPP want more)
steps=${STEPS:-floor,perf,runners,precision,kernel_bench}
runner_lengths=${RUNNER_LENGTHS:-$(tr ',' '\n' <<<"$lengths" | sort -rn | head -1)}  # the memory target's
wants() { [[ ",$steps," == *",$1,"* ]]; }  # wants STEP: whether STEPS names it
counts=(--warmup "${WARMUP:-2}" --repeat "${REPEAT:-5}")  # every comparison's untimed and timed inferences
kernel_repeat=${KERNEL_REPEAT:-30}
ablations=${ABLATIONS:-}
variant_flags="--no-option-variants --no-kernel-variants"  # graphs and fused hops left to the runners' set-up
[ -z "${VARIANTS:-}" ] || variant_flags=""
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
within() {  # within LEAST_S MOST_S COMMAND...: run COMMAND for at most MOST_S seconds and what is left of the
  # budget, if at least LEAST_S is left
  local least=$1 most=$2 left=$((deadline - SECONDS))
  shift 2
  if [ "$left" -lt "$least" ]; then
    echo "skipped (${left}s left of the ${deadline}s budget, ${least}s needed): ${*:1:3}"
    return 1
  fi
  timeout -k 15 $((left < most ? left : most)) "$@" || { echo "warning: exit status $? (124: cut at its limit): ${*:1:3}"; return 0; }
}
python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, \
'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0), 'threads', torch.get_num_threads())"

no_overlap="--no-overlap" no_ablations="--no-ablations"
if [ -n "$ablations" ]; then
  no_ablations=""
  step "smoke test: the plain runner with --overlap, in a process of its own"
  within 60 120 python "$root/tee_gpu/tee_runner_optimized.py" --model "$model" --prefill-length "${lengths%%,*}" \
    --dtype float16 --overlap $kernels --output "$work/overlap_smoke.json" 2>&1 | tail -2 || true
  python -c "import json, sys; sys.exit(json.load(open(sys.argv[1]))['correctness']['rel_logit_error'] > 1e-2)" \
    "$work/overlap_smoke.json" 2>/dev/null && no_overlap="" || echo "warning: --overlap failed or its logits are off; the comparisons leave it out"
fi

no_graphs="" runner_graphs=""
if wants floor; then
  step "the overhead floor: the same comparison on $floor_model, whose calls are the 1B shape's with next to no arithmetic"
  # first, in a process of its own: it is cheap, and the first to capture CUDA graphs (the runners leave them to
  # set-up, auto), so that a graph that fails in a way that ends its process cannot take the headline with it
  within 30 90 python -m splitinfer.perf --model "$floor_model" --lengths "$lengths" --dtype float16 --tee-dtype bfloat16 \
    "${counts[@]}" --no-ablations --no-kernel-variants --no-overlap --kernels="${FLOOR_KERNELS:-eager}" \
    --profile --out-dir "$work/floor" || true
  cp "$work/floor/perf.json" "$out/perf_floor.json" 2>/dev/null || true
  cp "$work/floor/perf.csv" "$out/perf_floor.csv" 2>/dev/null || true
  cp "$work/floor/profile.txt" "$out/profile_floor.txt" 2>/dev/null || true
  python -c "import sys; from splitinfer.targets import runners_finished; sys.exit(not runners_finished(*sys.argv[1:]))" \
    "$work/floor/perf.json" "$lengths" || { no_graphs="--no-cuda-graphs" runner_graphs="--cuda-graphs=off"
    echo "warning: the floor's runners did not all finish: the comparisons and runners below run without CUDA graphs"; }
fi

if wants perf; then
  step "in-process comparison: split runners, TEE-only (bfloat16), transformers on CPU and GPU"
  within 60 "$perf_limit" python -m splitinfer.perf --model "$model" --lengths "$lengths" --dtype float16 --tee-dtype bfloat16 \
    "${counts[@]}" ${thread_sweep:+--thread-sweep "$thread_sweep"} $no_overlap $no_ablations $no_graphs --profile $kernels \
    $variant_flags ${WITHOUT_CPP:+--without-cpp} ${CPP_KERNELS:+--cpp-kernels} \
    --out-dir "$work/perf" || true
  cp "$work/perf/perf.json" "$out/perf.json" 2>/dev/null || true
  cp "$work/perf/perf.csv" "$out/perf.csv" 2>/dev/null || true
  cp "$work/perf/profile.txt" "$out/profile.txt" 2>/dev/null || true
fi

if [ -n "$baseline" ]; then
  if [ -d "$model" ]; then model_there=$(cd "$model" && pwd); else model_there=$model; fi
  step "the split runners of the baseline in $baseline, timed the same way"
  # from inside it: `python -m` puts the working directory ahead of PYTHONPATH
  (cd "$baseline" && PYTHONPATH="$baseline" within 60 150 python -m splitinfer.perf --model "$model_there" \
    --lengths "$lengths" --dtype float16 "${counts[@]}" --split-only --no-ablations --no-overlap \
    --out-dir "$work/baseline") || true
  cp "$work/baseline/perf.json" "$out/perf_baseline.json" 2>/dev/null || true
fi

if [ -n "$spin" ]; then
  step "the comparison with spinning OpenMP threads (OMP_WAIT_POLICY=ACTIVE), baselines included"
  OMP_WAIT_POLICY=ACTIVE within 60 150 python -m splitinfer.perf --model "$model" --lengths "$lengths" --dtype float16 \
    --tee-dtype bfloat16 "${counts[@]}" --no-ablations --no-kernel-variants --no-overlap $no_graphs $kernels \
    --out-dir "$work/spin" || true
  cp "$work/spin/perf.json" "$out/perf_spin.json" 2>/dev/null || true
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

if wants runners; then
  step "each runner in its own process: the first inference, then one more"
  for n in $(tr ',' '\n' <<<"$runner_lengths" | sort -rn); do
    for runner in optimized ours otp; do
      within 45 120 python "$root/tee_gpu/tee_runner_$runner.py" --model "$model" --prefill-length $n --dtype float16 \
        --repeat 1 $kernels $runner_graphs --output "$work/runners/${runner}_n$n.json" 2>&1 | tail -3 || true
    done
    within 30 90 python "$root/tee_only_llama/tee_runner.py" --model "$model" --prefill-length $n --dtype bfloat16 \
      --repeat 1 --no-reference $kernels --output "$work/runners/tee_only_n$n.json" 2>&1 | tail -2 || true
    merge runners  # after each length, so that a run cut short still returns what it measured
  done
fi

if wants precision; then
  step "float16 precision of each scheme against the float32 reference (smollm2-135m shape, 3 mask seeds)"
  within 30 120 python -m splitinfer.precision --model "$precision_model" --length "$precision_length" --seeds 1,2,3 \
    $kernels --out "$work/precision/batch1.json" || true
  within 30 120 python -m splitinfer.precision --model "$precision_model" --length "$precision_length" --seeds 1,2,3 \
    --batch-size 2 --ragged $kernels --out "$work/precision/batch2_ragged.json" || true
  merge precision
fi

if wants kernel_bench; then
  step "the fixed cost of a call, by OpenMP wait policy and straight after a GPU round trip, and the TEE's steps of one layer, eager and compiled"
  within 40 150 python -m splitinfer.kernel_bench --preset "${KERNEL_PRESET:-$preset}" --lengths "$kernel_lengths" \
    --threads "$kernel_threads" --wait-policies "$kernel_wait_policies" --repeat "$kernel_repeat" \
    --out "$work/kernel_bench.json" || true
  cp "$work/kernel_bench.json" "$out/kernel_bench.json" 2>/dev/null || true
fi

step "the issue's targets, judged from the files above (python -m splitinfer.targets OUT_DIR reruns it on a copy)"
if [ -f "$out/perf.json" ]; then
  python -m splitinfer.targets "$out" || true
else  # a run that finishes a cut one: judge its files beside that run's perf.json
  echo "skipped: no perf.json in $out (copy in the cut run's, then run python -m splitinfer.targets on the folder)"
fi

echo "wrote $(ls "$out" | tr '\n' ' ')to $out in ${SECONDS}s (budget ${deadline}s)"
