"""Performance comparison in one process: the split runners, the TEE-only baseline, and transformers'
own forward on the CPU (and on the GPU when there is one), on the same weights and ids. Prints the
ratios the performance targets are stated in and writes them as JSON (perf.json), and the figures flat, a
row per length and method, as CSV (perf.csv).

    python -m splitinfer.perf --model preset:llama-3.2-1b --lengths 128,512 --out-dir perf_results

Every method is warmed up, then timed `--repeat` times (median, min, max); `first_ms` is each method's
first inference in this process, after its own set-up. A split engine's timed runs time no region of
their own; as many runs in between, with every region timed, say where the time went (see
`EngineTimer`). At each length the three runners as they ship and the baselines are set up in turn and then
timed together, a round at a time (`interleave`), so that the ratios the targets are stated in compare runs
taken side by side: all of them are in memory at once (`--one-at-a-time` times each runner alone, for a GPU
that cannot hold three engines). Every other engine is built, timed alone and freed before the next. Each
split engine's logits are compared with the plain split's (`rel_diff_from_optimized`: 0 for a variant that
computes the same thing another way, rounding for a masked scheme). A variant beyond the three runners that fails (a CUDA error, say) is recorded as
`{"error": ...}` and the rest still run; a failure that ends the run, or a SIGTERM (a time limit), still
writes what was measured before it, marked `incomplete`.
"""
from __future__ import annotations

import argparse
import gc
import os
import signal
import statistics
import sys
import time
from typing import Callable

import torch

from splitinfer import kernels
from splitinfer.boundary import copy_in_slices
from splitinfer.cli import (DTYPES, SWITCH, add_kernels_flag, keeps_embedding, kernel_options, load_config, progress,
                            resolve_gpu_device)
from splitinfer.engine import CHOSEN_OPTIONS, SplitLlama
from splitinfer.errors import OneLineParser, UserError, one_line_errors
from splitinfer.inputs import build_batch, read_prompts
from splitinfer.metrics import ONLINE, synchronize
from splitinfer.models import load_model
from splitinfer.reference import build_transformers_model, compare
from splitinfer.report import csv_text
from splitinfer.files import write_atomically, write_json
from splitinfer.results import environment_block, memory_block
from splitinfer.schemes import RUNNERS, SCHEMES, make_scheme
from splitinfer.targets import per_round

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_PROMPTS = os.path.join(ROOT, "tee_only_llama", "prompts.txt")
RUNNER_CONFIG = os.path.join(ROOT, "tee_gpu", "config.py")  # the split runners' defaults: as they ship
COPY_PARTS = (2, 4)  # the copy probe's just-written copies cut into as many slices, a stream each (`copy_bandwidth`)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="splitinfer.perf", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="default", help="checkpoint directory, 'default' or preset:NAME")
    p.add_argument("--lengths", default="128", help="comma-separated prefill lengths")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--dtype", choices=list(DTYPES), help="split runners' dtype (float16 with CUDA, float32 without)")
    p.add_argument("--tee-dtype", choices=list(DTYPES),
                   help="TEE-only runner's dtype (bfloat16 with CUDA, the split dtype without)")
    p.add_argument("--gpu-device", default="cuda:0")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--threads", type=int, default=None)
    add_kernels_flag(p, more=". Compiled split engines are also timed with eager kernels (*_eager_kernels) and "
                             "compiled at every shape (*_all_compiled), unless --no-kernel-variants")
    p.add_argument("--out-dir", default="perf_results", help="perf.json goes here")
    p.add_argument("--thread-sweep", metavar="N,N", default=None,
                   help="also time every split runner at these torch thread counts (e.g. 4,8)")
    p.add_argument("--split-only", action="store_true",
                   help="time only the split runners (no TEE-only baseline, no transformers, no ratios)")
    p.add_argument("--no-ablations", action="store_true",
                   help="on CUDA, skip the pageable-copy, full-scores and 128-row-block variants of the split runners, "
                        "and ours and otp with a tied embedding table the other way from how they ship (their own "
                        "copy, or the GPU's read at every inference)")
    p.add_argument("--no-kernel-variants", action="store_true",
                   help="with compiled kernels, skip the plain split and ours with eager kernels (*_eager_kernels) "
                        "and with compiled kernels at every shape (*_all_compiled: no per-shape choice in set-up)")
    p.add_argument("--without-cpp", action="store_true",
                   help="with compiled or C++ kernels, also time each split runner with the C++ kernels left out "
                        "(*_no_cpp_kernels: each step in its other form), round by round with the runners: what "
                        "they save")
    p.add_argument("--cpp-kernels", action="store_true",
                   help="with compiled kernels, also time each split runner with --kernels cpp (*_cpp_kernels: eager "
                        "ops and the C++ kernels, no inductor, each runner making its own set-up choices), round by "
                        "round with the runners: which kernels the runners should ship with on this machine")
    p.add_argument("--no-fused-hops", action="store_true",
                   help="with compiled or C++ kernels, skip ours and otp with fused hops (*_fused_hops: each of "
                        "the TEE's hops as one call), and keep them off in the runners as they ship (else as "
                        "tee_gpu/config.py sets them: auto, set-up's choice)")
    p.add_argument("--no-cuda-graphs", action="store_true",
                   help="on CUDA, skip the split runners with each GPU call replayed from a CUDA graph (*_cuda_graphs), "
                        "and keep graphs off in the runners as they ship (else as tee_gpu/config.py sets them)")
    p.add_argument("--no-option-variants", action="store_true",
                   help="skip the variants that set CUDA graphs and fused hops on or off (*_cuda_graphs, *_fused_hops, "
                        "*_fused_hops_cuda_graphs) and leave them to each runner's set-up, which times every way "
                        "and records each way's median (configuration)")
    p.add_argument("--no-buffer-variants", action="store_true",
                   help="on CUDA, skip the plain split with a fresh pinned buffer for every copy "
                        "(optimized_fresh_buffers) and with each copy to the GPU of a MiB or more cut into two "
                        "slices on two streams (optimized_copy_streams), timed in turn with the runners as they ship: "
                        "the plain split keeps its buffers from hop to hop, and copies each tensor whole")
    p.add_argument("--no-overlap", action="store_true",
                   help="on CUDA, skip the plain split with copies overlapping the TEE's work (optimized_overlap)")
    p.add_argument("--one-at-a-time", action="store_true",
                   help="time each of the three runners alone (set up, timed, freed), then the baselines together, "
                        "instead of all of them side by side: for a GPU that cannot hold three engines at once")
    p.add_argument("--profile", action="store_true",
                   help="also profile one more inference of each split runner (torch.profiler; its online phase, no "
                        "region timed) into profile.txt, and count the ops its host called (host_ops_per_inference)")
    return p


class CallTimer:
    """A call timed by the clock, synchronised around it (transformers' forward): its first call and `warmup`
    untimed ones when made, then one timed call per `round`."""

    def __init__(self, fn: Callable[[], object], device: torch.device, warmup: int, info: dict | None = None):
        """`info`: fields for its figures, as they are (its dtype)."""
        self.fn, self.device, self.runs, self.info = fn, device, [], info or {}
        self.first = self.once()
        for _ in range(warmup):
            self.once()

    def once(self) -> float:
        synchronize(self.device)
        start = time.perf_counter()
        self.fn()
        synchronize(self.device)
        return (time.perf_counter() - start) * 1e3

    def round(self) -> None:
        self.runs.append(self.once())

    def figures(self) -> dict:
        return {"first_ms": self.first, **spread(self.runs), **self.info}


class EngineTimer:
    """An engine timed from its own totals, which leave out the offline phase. When made: its set-up (its
    compiled kernels built, `kernel_compile_ms`; its device warmed up, `device_warmup_ms`), its first inference
    (instrumented, as in the runners) and `warmup` uninstrumented ones. Each `round` is two inferences:
    uninstrumented, for the headline figures (`median_ms`, `min_ms`, `max_ms`), and instrumented, for where the
    time went (`categories_median_ms`, `breakdown_median_ms`) and what timing every region costs
    (`instrumented_median_ms`). `logits` are the last inference's."""

    def __init__(self, engine: SplitLlama, ids: torch.Tensor, mask: torch.Tensor, warmup: int):
        self.engine, self.ids, self.mask = engine, ids, mask
        self.compile_ms = engine.warm_kernels(*ids.shape)
        self.warmup_ms = engine.warm_device(*ids.shape)
        self.choice_ms = engine.choose_configuration(*ids.shape)
        self.first = engine.timed_forward(ids, mask)[1]
        for _ in range(warmup):
            engine.timed_forward(ids, mask, instrumented=False)
        self.timed: list[dict] = []
        self.totals: list[float] = []
        self.logits: torch.Tensor | None = None

    def round(self) -> None:
        self.timed.append(self.engine.timed_forward(self.ids, self.mask)[1])
        self.logits, lean = self.engine.timed_forward(self.ids, self.mask, instrumented=False)
        self.totals.append(lean["total_ms"])

    def figures(self) -> dict:
        engine, timed = self.engine, self.timed
        out = {"first_ms": self.first["total_ms"], **spread(self.totals),
               "instrumented_median_ms": statistics.median(f["total_ms"] for f in timed),
               "kernel_compile_ms": self.compile_ms, "device_warmup_ms": self.warmup_ms, "kernels": engine.kernels,
               "kernel_vector_isa": kernels.vector_isa(engine.kernels),
               "kernels_failed": dict(kernels.failed),
               "kernel_choices": kernels.chosen() if self.compile_ms and engine.choose_kernels else {},
               "attention": engine.attention_form, "attention_ms_per_layer": engine.attention_ms,
               "lm_head_forms_ms": engine.gpu.head_ms, **kept_options(engine),
               "configuration": engine.configuration, "configuration_choice_ms": self.choice_ms}
        if engine.cuda_graphs:
            out["cuda_graphs_captured"] = engine.cuda_graphs_captured
        out["categories_median_ms"] = {c: statistics.median(f["categories"][c] for f in timed)
                                       for c in timed[0]["categories"]}
        # per op kind too (which hop's copies, which scheme step), so that a GPU run says where time went
        out["breakdown_median_ms"] = {c: {op: statistics.median(f["breakdown"].get(c, {}).get(op, 0.0) for f in timed)
                                          for op in ops} for c, ops in timed[-1]["breakdown"].items()}
        out["bytes_to_gpu"], out["bytes_to_cpu"] = (timed[0]["data_transfer"]["to_gpu_bytes"],
                                                    timed[0]["data_transfer"]["to_cpu_bytes"])
        # what an inference's fixed costs scale with: its TEE ops and scheme steps, GPU calls and crossings
        out["calls"] = {**timed[0]["counts"], "to_gpu": timed[0]["data_transfer"]["to_gpu_calls"],
                        "to_tee": timed[0]["data_transfer"]["to_cpu_calls"]}
        return out


def kept_options(engine: SplitLlama) -> dict[str, bool]:
    """The options set-up may choose (`CHOSEN_OPTIONS`), as the engine runs them, and whether a masked one keeps its
    own copy of a tied table: what a runner's variants inherit from it."""
    return {**{name: getattr(engine, name) for name in CHOSEN_OPTIONS}, "resident_embedding": engine.resident_embedding}


def shipped_options(no_cuda_graphs: bool, no_fused_hops: bool) -> dict[str, dict]:
    """Each split runner's options as it ships them (tee_gpu/config.py): `CHOSEN_OPTIONS` (on, off or auto), each off
    where its flag says so, and for a masked runner whether it keeps its own copy of a tied embedding table."""
    config = load_config(RUNNER_CONFIG)
    chosen = {name: False if off else SWITCH.get(value, value)
              for name, value, off in (("cuda_graphs", config.CUDA_GRAPHS, no_cuda_graphs),
                                       ("fuse_hops", config.FUSE_HOPS, no_fused_hops))}
    return {method: {**chosen, **({} if scheme == "plain" else {"resident_embedding": keeps_embedding(config, scheme)})}
            for method, scheme in RUNNERS.items()}


def spread(runs: list[float]) -> dict:
    """A method's timed inferences: their median, min and max, and each in the order taken (`runs_ms`: in the
    headline, one a round, so that two methods' runs pair up round by round)."""
    return {"median_ms": statistics.median(runs), "min_ms": min(runs), "max_ms": max(runs), "runs_ms": list(runs)}


FRESH_BUFFERS, COPY_STREAMS = "_fresh_buffers", "_copy_streams"  # the plain split's variants of its copies
NO_CPP = "_no_cpp_kernels"  # a runner with `native`'s C++ kernels left out
CPP = "_cpp_kernels"  # a runner with --kernels cpp where it ships compiled
IN_TURN = (FRESH_BUFFERS, COPY_STREAMS, NO_CPP, CPP)  # the variants timed in turn with the runners (`variants`, `measure`)


def interleave(timers: dict[str, CallTimer | EngineTimer], repeat: int) -> None:
    """`repeat` rounds, each timing every timer once in turn: a drift in the host's speed while they are timed (a
    noisy neighbour, a clock) then falls on all of them alike, not on their ratios. Each round starts one timer
    later than the last, so that no method always follows the same one: what one leaves behind (the caches' state,
    the CPU's after the baselines' matrix work) would otherwise fall on one neighbour every round (H200 host,
    128 tokens: the plain split, timed right after transformers, took 1.76 ms over its RMSNorms where its two
    variants, with the same code, took 1.10 and 1.17)."""
    order = list(timers.values())
    for r in range(repeat if order else 0):
        for timer in order[r % len(order):] + order[:r % len(order)]:
            timer.round()


def variants(overlap: bool, ablations: bool, thread_sweep: str | None, kernel_variants: bool = False,
             fused_hops: bool = False, cuda_graphs: bool = False, shipped: dict[str, dict] | None = None,
             fresh_buffers: bool = False, without_cpp: bool = False, cpp_kernels: bool = False
             ) -> list[tuple[str, str, dict, int | None]]:
    """(label, scheme, engine options, threads) of every split engine to time: the three runners as they
    ship (`shipped`, by runner: its options as tee_gpu/config.py sets them); the plain split with copies overlapping the TEE's work (`overlap`: on CUDA; off by default, as
    it measured slower on the H100 machine); ablations on the same machine (`ablations`: on CUDA): the
    plain split with pageable copies (what the pinned staging buys), the plain split and otp with the
    full n×n scores (what the causal block triangle buys), the plain split with blocks of at least
    128 rows (half as many TEE ops, a little more of n²), and each masked runner with a tied embedding table the
    other way from how it ships, its own copy or the GPU's read at every inference (what reading the GPU's costs); the plain split and ours with eager TEE kernels, and with compiled
    ones at every shape (`kernel_variants`: what compiling buys, and what set-up's per-shape choice of
    eager or compiled buys); ours and otp with fused hops (`fused_hops`: with compiled or C++ kernels, where a hop
    can become one call); each runner with its GPU calls replayed from CUDA graphs (`cuda_graphs`: on CUDA,
    first among the variants), and ours and otp with both; the plain split with a fresh pinned buffer for every
    copy instead of buffers kept from hop to hop, and with its copies to the GPU cut into two slices on two streams
    (`fresh_buffers`: on CUDA; timed in turn with the runners, see `measure`); each runner with `native`'s C++
    kernels left out (`without_cpp`: what they save, with compiled or C++ kernels); each runner with the C++ kernels
    beside eager ops and no compiled ones, its options as it ships them, so that set-up chooses them afresh
    (`cpp_kernels`: where the runners ship compiled, timed in turn with them); and each runner at each thread count
    of the sweep. Those three name both options set-up may choose, each on or off; every other variant takes what
    set-up chose for its runner at its length (`measure`)."""
    shipped = shipped or {}
    out = [(method, scheme, dict(shipped.get(method, {})), None) for method, scheme in RUNNERS.items()]
    if fresh_buffers:
        out += [(f"optimized{FRESH_BUFFERS}", "plain", {"kept_buffers": False}, None),
                (f"optimized{COPY_STREAMS}", "plain", {"copy_streams": 2}, None)]
    if cuda_graphs:
        out += [(f"{method}_cuda_graphs", scheme, {"cuda_graphs": True, "fuse_hops": False}, None)
                for method, scheme in RUNNERS.items()]
    if fused_hops:
        out += [(f"{method}_fused_hops", RUNNERS[method], {"fuse_hops": True, "cuda_graphs": False}, None)
                for method in ("ours", "otp")]
    if fused_hops and cuda_graphs:  # both, as the masked runners' defaults on CUDA would have them if both pay
        out += [(f"{method}_fused_hops_cuda_graphs", RUNNERS[method], {"fuse_hops": True, "cuda_graphs": True}, None)
                for method in ("ours", "otp")]
    if overlap:
        out.append(("optimized_overlap", "plain", {"overlap": True}, None))
    if ablations:
        out.append(("optimized_pageable", "plain", {"pinned": False}, None))
        out += [(f"{method}_full_scores", RUNNERS[method], {"triangle": False}, None)
                for method in ("optimized", "otp")]
        out.append(("optimized_blocks128", "plain", {"block_rows": 128}, None))
        for method in ("ours", "otp"):
            keeps = shipped.get(method, {}).get("resident_embedding", False)
            out.append((f"{method}_{'streamed' if keeps else 'resident'}_embedding", RUNNERS[method],
                        {"resident_embedding": not keeps}, None))
    if kernel_variants:
        for method in ("optimized", "ours"):
            out += [(f"{method}_eager_kernels", RUNNERS[method], {"compiled": False}, None),
                    (f"{method}_all_compiled", RUNNERS[method], {"choose_kernels": False}, None)]
    if without_cpp:
        out += [(f"{method}{NO_CPP}", scheme, {"native_kernels": False}, None) for method, scheme in RUNNERS.items()]
    if cpp_kernels:
        out += [(f"{method}{CPP}", scheme, {**shipped.get(method, {}), "compiled": False, "cpp": True}, None)
                for method, scheme in RUNNERS.items()]
    for threads in parse_counts(thread_sweep, "--thread-sweep"):
        out += [(f"{method}_threads{threads}", scheme, {}, threads) for method, scheme in RUNNERS.items()]
    return out


def parse_counts(text: str | None, flag: str) -> list[int]:
    """Sorted distinct positive integers from 'N,N,...' (none from an empty or missing value)."""
    if not text:
        return []
    try:
        counts = sorted({int(x) for x in text.split(",")})
    except ValueError:
        raise UserError(f"{flag} must be comma-separated integers, got '{text}'") from None
    if counts[0] < 1:
        raise UserError(f"{flag} values must be at least 1")
    return counts


def copy_bandwidth(device: torch.device, mib: int = 64, repeat: int = 5, sizes: tuple[int, ...] = (2, 8)) -> dict:
    """GB/s of one `mib`-MiB copy each way, from pinned and from pageable host memory, timed with CUDA
    events (median of `repeat`, after one untimed): the machine's ceiling for the boundary's copies. Also,
    at the boundary's own sizes (`sizes` MiB and `mib`), pinned copies to the GPU from a buffer the CPU has
    just written, as the TEE's ops write theirs (`by_size`): on the H100 machine the plain split's copies to
    the GPU ran at 25 GB/s and those back at 46, against 54 and 50 here (eighth round); and the same copy cut
    into COPY_PARTS slices, the first on the current stream and each other on one of its own (as
    `Boundary._in_slices` cuts them), so that as many of the GPU's copy engines read at once:
    whether the just-written copies are bound by how many reads one engine keeps in flight."""
    stream = torch.cuda.current_stream(device)
    side_streams = [torch.cuda.Stream(device) for _ in range(max(COPY_PARTS) - 1)]

    def rate(target: torch.Tensor, source: torch.Tensor, non_blocking: bool, written: torch.Tensor | None = None,
             parts: int = 1) -> float:
        times = []
        for _ in range(repeat + 1):
            if written is not None:
                written.fill_(len(times))  # the CPU's writes, still in its caches when the copy reads them
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            copy_in_slices(target, source, stream, side_streams[: parts - 1], non_blocking)  # as the engine's copies
            end.record(stream)
            end.synchronize()
            times.append(start.elapsed_time(end))
        return source.numel() / (statistics.median(times[1:]) * 1e-3) / 1e9

    on_gpu = torch.empty(mib * 2 ** 20, dtype=torch.uint8, device=device)
    by_size = {}
    for size_mib in (*sizes, mib):
        host = torch.empty(size_mib * 2 ** 20, dtype=torch.uint8, pin_memory=True)
        target = on_gpu[: host.numel()]
        by_size[size_mib] = {"to_gpu_pinned_gb_per_s": rate(target, host, True),
                             "to_gpu_pinned_just_written_gb_per_s": rate(target, host, True, written=host),
                             **{f"to_gpu_pinned_just_written_{parts}_streams_gb_per_s":
                                rate(target, host, True, written=host, parts=parts) for parts in COPY_PARTS},
                             "to_cpu_pinned_gb_per_s": rate(host, target, True)}
    pageable = torch.empty(on_gpu.numel(), dtype=torch.uint8)
    return {"copy_mib": mib, "to_gpu_pinned_gb_per_s": by_size[mib]["to_gpu_pinned_gb_per_s"],
            "to_cpu_pinned_gb_per_s": by_size[mib]["to_cpu_pinned_gb_per_s"],
            "to_gpu_pageable_gb_per_s": rate(on_gpu, pageable, False),
            "to_cpu_pageable_gb_per_s": rate(pageable, on_gpu, False), "by_size": by_size}


COMPILED_CALL = "## Call CompiledFxGraph"  # how the profiler names a call of a compiled TEE kernel (`kernels.Built`)


def profile_engine(engine: SplitLlama, ids, mask, title: str) -> tuple[str, int, int]:
    """One inference's online phase under torch.profiler, timing no region of its own: the operators that took
    the most host time, as a table, how many ops the host called (ATen operators, views included, and compiled
    TEE kernels, not counting those inside another), and how many of those were compiled kernels: a compiled
    call costs the host more than an eager op (its frame's guards and wrappers). A masked scheme's offline
    phase is left out: the inference before, run outside the profile, drew the masks this one uses again (its
    argsorts topped ours' table in the eighth round). 40 rows, so that the driver's calls (copies,
    synchronisations, pinned allocations) show too."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if engine.metrics.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    engine.timed_forward(ids, mask, instrumented=False)  # its kernels selected, its masks drawn
    engine.metrics.instrumented = False
    try:
        with torch.profiler.profile(activities=activities) as prof:
            engine.forward(ids, mask)
            synchronize(engine.metrics.device)
    finally:
        engine.metrics.instrumented = True
    called = [event.name for event in prof.events() if event.cpu_parent is None
              and event.name.startswith(("aten::", COMPILED_CALL))]
    compiled = sum(1 for name in called if not name.startswith("aten::"))
    return (f"== {title}\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40), len(called),
            compiled)


def measure(args, results: dict) -> None:
    """Fill `results` as each figure is taken, so that a run cut short still holds what it measured."""
    gpu_device, fallback = resolve_gpu_device(args.gpu_device)
    cuda = gpu_device.type == "cuda"
    dtype_name = args.dtype or ("float16" if cuda else "float32")
    tee_name = args.tee_dtype or ("bfloat16" if cuda else dtype_name)
    dtype, tee_dtype = DTYPES[dtype_name], DTYPES[tee_name]
    lengths = parse_counts(args.lengths, "--lengths")
    mode = kernel_options(args.kernels, gpu_device)
    picks = mode["compiled"] or mode["cpp"]  # set-up picks each step's form: C++ kernels among them
    split_variants = variants(cuda and not args.no_overlap, cuda and not args.no_ablations,  # a bad sweep fails first
                              args.thread_sweep, mode["compiled"] and not args.no_kernel_variants,
                              picks and not (args.no_fused_hops or args.no_option_variants),
                              cuda and not (args.no_cuda_graphs or args.no_option_variants),
                              shipped_options(args.no_cuda_graphs, args.no_fused_hops),
                              fresh_buffers=cuda and not args.no_buffer_variants,
                              without_cpp=picks and args.without_cpp,
                              cpp_kernels=mode["compiled"] and args.cpp_kernels)
    prompts = read_prompts(DEFAULT_PROMPTS)
    progress(f"loading {args.model} ({dtype_name}; TEE-only {tee_name})")
    model = load_model(args.model, dtype, gpu_device)
    state = model.state_dict
    results["setup"] = {"model": model.name, "model_source": model.source, "random_weights": model.random_weights,
                        "dtype": dtype_name, "tee_dtype": tee_name, "batch_size": args.batch_size,
                        "gpu_device": str(gpu_device), "gpu_fallback_to_cpu": fallback, "warmup": args.warmup,
                        "repeat": args.repeat}
    results["environment"] = environment_block(gpu_device, fallback, torch.get_num_threads())
    if cuda:  # first: a few seconds, and a run cut short by its budget still has them
        progress("copy bandwidth: pinned and pageable, by size")
        results["copy_bandwidth"] = copy_bandwidth(gpu_device)
    results["lengths"] = {}
    profiles: list[str] = []
    batches, plain_logits = {}, {}
    # (length, scheme) -> the options set-up chose for that runner there, which its other variants then take
    chosen: dict[tuple[int, str], dict[str, bool]] = {}
    for n in lengths:
        if n > model.config.max_position_embeddings:
            raise UserError(f"length {n} exceeds max_position_embeddings ({model.config.max_position_embeddings})")
        batches[n] = build_batch(model.tokenizer, prompts, n, args.batch_size)
        results["lengths"][n] = {}

    def time_variants(n: int, group: list[tuple[str, str, dict, int | None]], baselines: bool = False) -> None:
        """Split engines at n tokens (at the first one's thread count; there may be none, with `baselines`) into
        their row, with how far each one's logits are from the plain split's; with `baselines`, the TEE-only runner
        and transformers' own forward on the CPU (and the GPU) too, then the ratios the targets are stated in. Each
        is set up in turn, then all are timed together (`interleave`)."""
        row, (ids, mask) = results["lengths"][n], batches[n]
        methods = [method for method, *_ in group]
        default_threads = torch.get_num_threads()
        torch.set_num_threads((group[0][3] if group else None) or default_threads)
        timers: dict[str, CallTimer | EngineTimer] = {}
        try:
            with torch.no_grad():
                for method, scheme, options, _ in group:
                    progress(f"{n} tokens: {method}")
                    inherited = {} if method in RUNNERS else chosen.get((n, scheme), {})  # `options` come first
                    engine = SplitLlama(model.config, state, make_scheme(scheme), gpu_device, dtype,
                                        **{**mode, **inherited, **options})
                    timers[method] = EngineTimer(engine, ids, mask, args.warmup)
                    if method in RUNNERS:
                        chosen[n, scheme] = kept_options(engine)
                if baselines:
                    timers.update(baseline_timers(args, model, state, (ids, mask), gpu_device, dtype, tee_dtype))
                if len(timers) > 1:
                    progress(f"{n} tokens: timing {', '.join(timers)} in turn, {args.repeat}× each")
                interleave(timers, args.repeat)
            for method, scheme, options, threads in group:
                timer = timers[method]
                row[method] = timer.figures()
                if args.profile and not threads and (method in RUNNERS or set(options) <= set(CHOSEN_OPTIONS)):
                    table, called, compiled_calls = profile_engine(timer.engine, ids, mask, f"{n} tokens: {method}")
                    row[method].update(host_ops_per_inference=called, compiled_calls_per_inference=compiled_calls)
                    profiles.append(table)
                # every variant computes the same function
                plain_logits[n] = timer.logits if method == "optimized" else plain_logits[n]
                row[method]["rel_diff_from_optimized"] = compare(timer.logits, plain_logits[n])["rel_logit_error"]
            for label in [label for label in timers if label not in methods]:
                row[label] = timers[label].figures()
            for label in timers:  # whose runs pair up with its own, round by round
                row[label]["timed_with"] = [other for other in timers if other != label]
        except RuntimeError as e:  # CUDA errors, out of memory among them
            if set(methods) & set(RUNNERS):  # the runners as they ship must work; a variant may fail and be recorded
                raise
            print(f"warning: {', '.join(methods)} failed: {str(e).splitlines()[0]}", file=sys.stderr)
            for method in methods:
                row[method] = {"error": str(e).splitlines()[0]}
        finally:
            torch.set_num_threads(default_threads)
            timers.clear()
            gc.collect()
        if baselines or "ratios" in row:
            row["ratios"] = ratios(row)

    # The runners as they ship and the baselines at every length first, then the variants: a run cut by its
    # budget keeps the headline ratios at every length (the tenth round lost the 512-token baselines). Then each
    # variant at every length in turn, in `variants`' order, the most wanted first: a cut run has those at
    # every length. The variants of the plain split's copies, and the runners without the C++ kernels, are timed in
    # turn with the runners, round by round: what keeping the buffers saves is a few percent, under the host's drift
    # from one group to the next
    shipped = [v for v in split_variants if v[0] in RUNNERS or v[0].endswith(IN_TURN)]
    for n in lengths:
        if args.one_at_a_time:
            for variant in shipped:
                time_variants(n, [variant])
            if not args.split_only:
                time_variants(n, [], baselines=True)
        else:  # side by side: the targets are their ratios
            time_variants(n, shipped, baselines=not args.split_only)
    for variant in [v for v in split_variants if v not in shipped]:
        for n in lengths:
            time_variants(n, [variant])
    if profiles:
        text = "\n\n".join(profiles).encode()
        write_atomically(os.path.join(args.out_dir, "profile.txt"), lambda f: f.write(text))
    results["memory"] = memory_block(gpu_device, 0)


def baseline_timers(args, model, state: dict, batch: tuple[torch.Tensor, torch.Tensor], gpu_device: torch.device,
                    dtype: torch.dtype, tee_dtype: torch.dtype) -> dict[str, CallTimer | EngineTimer]:
    """The TEE-only runner (in `tee_dtype`) and transformers' own forward on the CPU (in `tee_dtype` with CUDA,
    else `dtype`) and on the GPU (in `dtype`), each set up, with its first call and its warm-up made."""
    ids, mask = batch
    cuda, n = gpu_device.type == "cuda", ids.shape[1]
    progress(f"{n} tokens: tee_only ({str(tee_dtype).removeprefix('torch.')})")
    engine = SplitLlama(model.config, state, make_scheme("plain"), torch.device("cpu"), tee_dtype, tee_only=True,
                        **kernel_options(args.kernels, torch.device("cpu")))
    timers: dict[str, CallTimer | EngineTimer] = {"tee_only": EngineTimer(engine, ids, mask, args.warmup)}
    for label, device, hf_dtype in (("transformers_cpu", torch.device("cpu"), dtype if not cuda else tee_dtype),
                                    ("transformers_gpu", gpu_device, dtype)):
        if label == "transformers_gpu" and not cuda:
            continue
        name = str(hf_dtype).removeprefix("torch.")
        progress(f"{n} tokens: {label} ({name})")
        hf = build_transformers_model(model.config, state, device, hf_dtype)
        timers[label] = CallTimer(lambda hf=hf, device=device: hf(input_ids=ids.to(device), attention_mask=mask.to(device),
                                                                  logits_to_keep=1), device, args.warmup, {"dtype": name})
    return timers


# The ratios the targets are stated in, each of two methods the headline times side by side: (numerator,
# denominator) of their warm medians, and of their runs round by round (`targets.per_round`)
HEADLINE_RATIOS = {"ours_over_plain": ("ours", "optimized"), "otp_online_over_plain": ("otp", "optimized"),
                   "plain_over_transformers_cpu": ("optimized", "transformers_cpu"),
                   **{f"{method}_speedup_vs_tee_only": ("tee_only", method) for method in RUNNERS},
                   "plain_over_transformers_gpu": ("optimized", "transformers_gpu")}  # with a GPU only


def ratios(row: dict) -> dict:
    """The figures the performance targets are stated in (warm medians)."""
    row = {method: r for method, r in row.items() if "error" not in r}
    plain = row["optimized"]["median_ms"]
    out = {name: row[a]["median_ms"] / row[b]["median_ms"] for name, (a, b) in HEADLINE_RATIOS.items()
           if {a, b} <= set(row)}
    for method in RUNNERS:
        out[f"{method}_first_minus_warm_ms"] = row[method]["first_ms"] - row[method]["median_ms"]
    if "optimized_overlap" in row:
        out["overlap_over_plain"] = row["optimized_overlap"]["median_ms"] / plain
    if "optimized_pageable" in row:
        out["pageable_over_pinned"] = row["optimized_pageable"]["median_ms"] / plain
    for method in ("optimized", "otp"):
        if f"{method}_full_scores" in row:
            full = row[f"{method}_full_scores"]["median_ms"]
            out[f"{method}_full_scores_over_triangle"] = full / row[method]["median_ms"]
    if "optimized_blocks128" in row:
        out["blocks128_over_blocks64"] = row["optimized_blocks128"]["median_ms"] / plain
    for method in ("optimized", "ours"):
        if f"{method}_eager_kernels" in row:
            out[f"{method}_eager_over_compiled_kernels"] = row[f"{method}_eager_kernels"]["median_ms"] / row[method]["median_ms"]
        if f"{method}_all_compiled" in row:
            out[f"{method}_all_compiled_over_chosen"] = row[f"{method}_all_compiled"]["median_ms"] / row[method]["median_ms"]
    for method in RUNNERS:
        if method + NO_CPP in row:
            out[f"{method}{NO_CPP}_over_with"] = row[method + NO_CPP]["median_ms"] / row[method]["median_ms"]
        if method + CPP in row:
            out[f"{method}{CPP}_over_shipped"] = row[method + CPP]["median_ms"] / row[method]["median_ms"]
    for method, ratio in (("ours", "ours_fused_hops_over_plain"), ("otp", "otp_fused_hops_online_over_plain")):
        if f"{method}_fused_hops" in row:
            out[ratio] = row[f"{method}_fused_hops"]["median_ms"] / plain
    if "optimized" + FRESH_BUFFERS in row:  # what keeping the pinned buffers saves, timed round by round with it
        out["optimized" + FRESH_BUFFERS + "_over_kept"] = row["optimized" + FRESH_BUFFERS]["median_ms"] / plain
    if "optimized" + COPY_STREAMS in row:  # what cutting the copies to the GPU across two streams saves, the same way
        out["optimized" + COPY_STREAMS + "_over_one_stream"] = row["optimized" + COPY_STREAMS]["median_ms"] / plain
    for method in RUNNERS:  # what replaying the GPU's calls buys, and the targets' ratios with them
        if f"{method}_cuda_graphs" in row:
            out[f"{method}_cuda_graphs_over_{method}"] = row[f"{method}_cuda_graphs"]["median_ms"] / row[method]["median_ms"]
    for variant, ratio in (("ours_cuda_graphs", "ours_over_plain_cuda_graphs"),
                           ("otp_cuda_graphs", "otp_online_over_plain_cuda_graphs"),
                           ("ours_fused_hops_cuda_graphs", "ours_fused_hops_over_plain_cuda_graphs"),
                           ("otp_fused_hops_cuda_graphs", "otp_fused_hops_online_over_plain_cuda_graphs")):
        if {variant, "optimized_cuda_graphs"} <= set(row):
            out[ratio] = row[variant]["median_ms"] / row["optimized_cuda_graphs"]["median_ms"]
    for method in ("ours", "otp"):  # what reading the GPU's table costs: one of the two is the runner
        pair = [f"{method}_streamed_embedding", f"{method}_resident_embedding"]
        if method in row and len(set(pair) & set(row)) == 1:
            streamed, resident = (row.get(label, row[method])["median_ms"] for label in pair)
            out[f"{method}_streamed_over_resident_embedding"] = streamed / resident
    return out


CSV_COLUMNS = ("tokens", "method", "median_ms", "min_ms", "max_ms", "first_ms", "instrumented_median_ms",
               *(f"{c}_ms" for c in (*ONLINE, "overlap", "other", "offline")),  # Metrics.category_ms's
               "bytes_to_gpu", "bytes_to_cpu", "tee_calls", "gpu_calls", "crossings", "host_ops_per_inference",
               "compiled_calls_per_inference",
               "rel_diff_from_optimized", "kernels", "error")
SCHEME_STEPS = {step for scheme in SCHEMES.values() for step in scheme.steps}


def csv_rows(results: dict) -> list[dict]:
    """perf.json flattened for plotting: one row per length and method timed (baselines included), the same
    columns in every row, empty where a method has no such figure. `tee_calls` counts the TEE's ops and the
    scheme's protect and recover steps, `gpu_calls` the GPU's, `crossings` the copies both ways."""
    rows = []
    for n, row in results.get("lengths", {}).items():
        for method, figures in row.items():
            if method == "ratios":
                continue
            calls = figures.get("calls")
            flat = {**figures, **{f"{c}_ms": ms for c, ms in figures.get("categories_median_ms", {}).items()},
                    "tokens": n, "method": method}
            if calls is not None:
                flat.update(tee_calls=sum(v for k, v in calls.items() if k.startswith("cpu_") or k in SCHEME_STEPS),
                            gpu_calls=sum(v for k, v in calls.items() if k.startswith("gpu_")),
                            crossings=calls["to_gpu"] + calls["to_tee"])
            rows.append({column: flat.get(column) for column in CSV_COLUMNS})
    return rows


def print_table(results: dict) -> None:
    if "copy_bandwidth" in results:
        bandwidth = results["copy_bandwidth"]
        print("copies, GB/s: " + ", ".join(f"{k.removesuffix('_gb_per_s')} {v:.1f}"
                                            for k, v in bandwidth.items() if k.endswith("_gb_per_s")))
        for size_mib, rates in bandwidth.get("by_size", {}).items():
            print(f"  {size_mib} MiB pinned, GB/s: " + ", ".join(f"{k.removesuffix('_gb_per_s')} {v:.1f}"
                                                              for k, v in rates.items()))
    for n, row in results["lengths"].items():
        print(f"\n{n} tokens (warm median ms; first in parentheses)")
        for method, r in row.items():
            if "error" in r:
                print(f"  {method:<20} failed: {r['error']}")
            elif method != "ratios":
                form = f"  attention: {r['attention']}" if r.get("attention") else ""  # the TEE-only runner's choice
                if r.get("configuration"):  # what set-up kept of the options left to it
                    form = f"  set-up kept: {r['configuration']['kept']}"
                print(f"  {method:<20} {r['median_ms']:9.2f}  ({r['first_ms']:.2f}){form}")
        for name, value in row.get("ratios", {}).items():
            rounds = per_round(row, *HEADLINE_RATIOS[name]) if name in HEADLINE_RATIOS else ""
            print(f"  {name:<34} {value:8.2f}" + (f"  round by round {rounds}" if rounds else ""))


class Stopped(BaseException):
    """SIGTERM arrived (a time limit, such as gpu_benchmark.sh's): stop, keeping what was measured. A BaseException,
    as KeyboardInterrupt is, so that no `except Exception` on the way swallows it (the C++ kernels' build, which
    leaves them out on any failure, took one arriving during it for a failed build, and the run went on)."""


def _stop(signum, frame) -> None:
    raise Stopped("stopped by SIGTERM (a time limit)")


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    os.makedirs(args.out_dir, exist_ok=True)
    path = os.path.join(args.out_dir, "perf.json")
    results: dict = {}
    previous = signal.signal(signal.SIGTERM, _stop)
    stopped: RuntimeError | Stopped | None = None
    try:
        measure(args, results)
    except (RuntimeError, Stopped) as e:  # a CUDA failure mid-run poisons the rest: keep what was measured, marked so
        results["incomplete"] = str(e).splitlines()[0]
        stopped = e
    finally:
        signal.signal(signal.SIGTERM, previous)
    results["compiler_start_ms"] = kernels.start_ms()  # once per process: inside the first compiled engine's kernel_compile_ms
    write_json(path, results)
    rows = csv_rows(results)
    if rows:  # the same figures, flat
        text = csv_text(rows).encode()
        write_atomically(os.path.join(args.out_dir, "perf.csv"), lambda f: f.write(text))
    if stopped is not None:
        progress(f"wrote the figures taken before it stopped to {path}")
        if isinstance(stopped, Stopped):
            print(f"error: {stopped}", file=sys.stderr)
            return 1
        raise stopped
    print_table(results)
    progress(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
