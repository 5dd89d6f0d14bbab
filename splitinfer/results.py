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


def memory_block(gpu_device: torch.device, offline_mask_bytes: int, tee_weight_bytes: int | None = None) -> dict:
    """Peak host RSS and peak GPU memory of the process so far, what the offline masks hold, and the model
    weights the TEE holds (norms; the embedding table under a masked scheme)."""
    peak_rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    gpu = torch.cuda.max_memory_allocated(gpu_device) / MIB if gpu_device.type == "cuda" else None
    return {"peak_host_rss_mb": peak_rss_kib * 1024 / MIB, "peak_gpu_mb": gpu,
            "offline_mask_mb": offline_mask_bytes / MIB,
            "tee_weights_mb": None if tee_weight_bytes is None else tee_weight_bytes / MIB, "mb_unit": "MiB"}


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
