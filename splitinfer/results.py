"""The JSON result: timing, where it went, bytes, op counts, model, correctness, environment."""
from __future__ import annotations

import os
import platform
import resource
import statistics
import sys

import torch
import transformers

from splitinfer.boundary import MIB
from splitinfer.metrics import ONLINE

PERCENT_GROUPS = {"transfer_pct": ("transfer_to_gpu", "transfer_to_cpu"), "gpu_compute_pct": ("gpu_compute",),
                  "cpu_compute_pct": ("cpu_compute",), "crypto_pct": ("crypto",), "other_pct": ("other",)}


def timing_block(figures: dict, setup_ms: float, crypto_steps: tuple[str, ...] = (), kernel_compile_ms: float = 0.0,
                 device_warmup_ms: float = 0.0, compiler_start_ms: float = 0.0, configuration_choice_ms: float = 0.0
                 ) -> dict:
    """The timing fields; `crypto_steps` names a masked scheme's protect and recover steps, whose
    per-op-kind figures (e.g. encryption_linear_attn_ms) and totals (encryption_ms) are added;
    `kernel_compile_ms` is the part of set-up that built the TEE's compiled kernels, `compiler_start_ms` the
    part of that which started the compiler (`kernels.start_ms`), `device_warmup_ms` the part of set-up that
    ran each GPU op once (`SplitLlama.warm_device`; for the TEE-only runner, the timing of its attention's
    forms too), `configuration_choice_ms` the part that timed the options left to set-up each way
    (`SplitLlama.choose_configuration`). A fused hop's time (`SplitLlama.fused_hop`: its label joins its steps and op with '+') counts
    in `fused_hops_ms`, not in either step's total: the one call does both, and the TEE op between."""
    c = figures["categories"]
    crypto = figures["breakdown"].get("crypto", {})
    per_step = {f"{step}_ms": sum(ms for op, ms in crypto.items() if op.startswith(step) and "+" not in op)
                for step in crypto_steps}
    if crypto_steps:
        per_step["fused_hops_ms"] = sum(ms for op, ms in crypto.items() if "+" in op)
    per_kind = {f"{op}_ms": ms for op, ms in sorted(crypto.items())}
    return {**per_step, **per_kind, "transfer_to_gpu_ms": c["transfer_to_gpu"], "transfer_to_cpu_ms": c["transfer_to_cpu"],
            "total_transfer_ms": c["transfer_to_gpu"] + c["transfer_to_cpu"],
            "gpu_compute_ms": c["gpu_compute"], "cpu_compute_ms": c["cpu_compute"],
            "total_crypto_ms": c["crypto"], "offline_ms": c["offline"], "other_ms": c["other"],
            "overlap_ms": c["overlap"],
            "total_ms": figures["total_ms"], "setup_ms": setup_ms, "kernel_compile_ms": kernel_compile_ms,
            "compiler_start_ms": compiler_start_ms, "device_warmup_ms": device_warmup_ms,
            "configuration_choice_ms": configuration_choice_ms}


def percentage_block(figures: dict) -> dict:
    total = figures["total_ms"] or 1.0
    c = figures["categories"]
    return {name: 100.0 * sum(c[k] for k in keys) / total for name, keys in PERCENT_GROUPS.items()}


def steady_state_block(runs: list[dict], uninstrumented_totals: list[float]) -> dict:
    """median/min/max/p90 per category (and total) over the repeated inferences, and of the totals of as
    many more that timed no region of their own (`uninstrumented_total_ms`: what timing costs, left out)."""
    series = {f"{k}_ms": [r["categories"][k] for r in runs] for k in (*ONLINE, "other", "overlap", "offline")}
    series["total_ms"] = [r["total_ms"] for r in runs]
    series["uninstrumented_total_ms"] = uninstrumented_totals
    return {"runs": len(runs), **{name: _stats(values) for name, values in series.items()}}


def _stats(values: list[float]) -> dict:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1], "p90": p90}


def memory_block(gpu_device: torch.device, offline_mask_bytes: int, tee_weight_bytes: int | None = None,
                 phases: MemoryPhases | None = None) -> dict:
    """Peak host RSS and peak GPU memory of the process so far, what the offline masks hold, and the model
    weights the TEE holds (norms; the embedding table under a masked scheme); on CUDA, what PyTorch's cache of
    pinned host memory holds, now and at its peak (part of the RSS: page-locked blocks, each a power of two,
    kept for reuse); with `phases`, the host's figures after each phase and the phase the peak was reached in."""
    gpu = torch.cuda.max_memory_allocated(gpu_device) / MIB if gpu_device.type == "cuda" else None
    block = {"peak_host_rss_mb": peak_host_rss_mb(), "peak_gpu_mb": gpu, "pinned_host_mb": pinned_host_mb(gpu_device),
             "offline_mask_mb": offline_mask_bytes / MIB,
             "tee_weights_mb": None if tee_weight_bytes is None else tee_weight_bytes / MIB, "mb_unit": "MiB"}
    if phases is not None:
        block.update(by_phase=phases.phases, peak_reached_in=phases.peak_reached_in())
    return block


def peak_host_rss_mb() -> float:
    """The process's peak resident set so far, MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MIB  # ru_maxrss: KiB on Linux


def host_rss_mb() -> float | None:
    """The process's resident set now (VmRSS), MiB; None where /proc has no such figure."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024 / MIB
    except OSError:
        pass
    return None


def pinned_host_mb(gpu_device: torch.device) -> dict | None:
    """PyTorch's pinned host memory on CUDA: what its cache holds now and at its peak (its blocks, in use or kept
    for reuse), MiB; None off CUDA, or where this torch does not count it."""
    stats = torch.cuda.host_memory_stats() if gpu_device.type == "cuda" and hasattr(torch.cuda, "host_memory_stats") \
        else {}
    if "allocated_bytes.current" not in stats:
        return None
    return {"now": stats["allocated_bytes.current"] / MIB, "peak": stats["allocated_bytes.peak"] / MIB}


class MemoryPhases:
    """The host's memory after each phase of a run (loading, each set-up step, the inferences), so that a peak
    over its limit says which phase reached it: the peak so far, the resident set now and, on CUDA, the pinned
    cache now (`mark`)."""

    def __init__(self, gpu_device: torch.device):
        self.gpu_device = gpu_device
        self.phases: dict[str, dict] = {}

    def mark(self, phase: str) -> None:
        pinned = pinned_host_mb(self.gpu_device)
        self.phases[phase] = {"peak_host_rss_mb": peak_host_rss_mb(), "host_rss_mb": host_rss_mb(),
                              "pinned_host_mb": None if pinned is None else pinned["now"]}

    def peak_reached_in(self) -> str | None:
        """The first phase after which the peak was what it is after the last one."""
        if not self.phases:
            return None
        last = list(self.phases.values())[-1]["peak_host_rss_mb"]
        return next(name for name, figures in self.phases.items() if figures["peak_host_rss_mb"] >= last)


def environment_block(gpu_device: torch.device, gpu_fallback: bool, threads: int) -> dict:
    cuda = gpu_device.type == "cuda"
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__,
            "gpu": torch.cuda.get_device_name(gpu_device) if cuda else None,
            "cuda": torch.version.cuda if cuda else None, "gpu_fallback_to_cpu": gpu_fallback,
            "cpu": cpu_model(), "cpu_count": os.cpu_count(), "threads": threads,
            # which half-precision matrix units the TEE's CPU has (AMX, AVX-512 FP16/BF16) and the vector
            # level torch's kernels use: what the TEE's products can run at, where the model name is hidden
            "cpu_matrix_flags": sorted(CPU_MATRIX_FLAGS & cpu_flags()),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
            "tdx_guest": in_tdx_guest(), "argv": sys.argv}


CPU_MATRIX_FLAGS = {"avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_fp16", "amx_int8"}


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    """The first CPU's feature flags (/proc/cpuinfo; empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def in_tdx_guest() -> bool:
    """True inside an Intel TDX trust domain (the guest device node or the CPU flag)."""
    return os.path.exists("/dev/tdx_guest") or "tdx_guest" in cpu_flags()
