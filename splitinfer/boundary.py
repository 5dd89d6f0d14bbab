"""The one place tensors move between the TEE (CPU) and the GPU: counts bytes, calls and time per direction."""
from __future__ import annotations

import torch

from splitinfer.metrics import Metrics, synchronize

MIB = 2 ** 20


class Boundary:
    """TEE <-> GPU transport. In a TDX guest with a passthrough GPU, `.to(device)` is the whole transport.

    With `crossing=False` (the TEE-only runner) nothing leaves the TEE and nothing is counted.
    With `pinned` (the default on CUDA) both directions go through page-locked host memory, which the
    GPU's copy engines read and write at full speed; pageable copies go through the driver's bounce
    buffer at a fraction of it. An optional `audit` callback sees every tensor sent to the GPU,
    labelled, in order.
    """

    def __init__(self, gpu: torch.device, tee: torch.device, metrics: Metrics, crossing: bool = True,
                 pinned: bool | None = None):
        self.gpu, self.tee, self.metrics, self.crossing = gpu, tee, metrics, crossing
        self.pinned = gpu.type == "cuda" if pinned is None else pinned and gpu.type == "cuda"
        # Base addresses of the pinned buffers handed out. PyTorch's host cache keeps pinned blocks for
        # the process's life, so an address once pinned stays pinned; a lookup here replaces
        # Tensor.is_pinned(), a driver call that took ~11 µs per copy on the H200 machine.
        self.pinned_bases: set[int] = set()
        self.audit = None
        self.reset()

    def reset(self) -> None:
        self.bytes = {"to_gpu": 0, "to_cpu": 0}
        self.calls = {"to_gpu": 0, "to_cpu": 0}

    def to_gpu(self, t: torch.Tensor, op: str, layer: int | None = None) -> torch.Tensor:
        """Send `t` to the GPU; `op` is the op kind it feeds, `layer` its layer (None outside the layers)."""
        if not self.crossing:
            return t
        if self.audit is not None:
            self.audit(layer, op, t)
        return self._move(t, self.gpu, "to_gpu", "transfer_to_gpu", op)

    def pinned_buffer(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """An empty pinned host tensor for a result bound for the GPU, or None where copies are not pinned."""
        if not (self.pinned and self.crossing):
            return None
        buffer = torch.empty(shape, dtype=dtype, pin_memory=True)
        self.pinned_bases.add(buffer.data_ptr())
        return buffer

    def to_tee(self, t: torch.Tensor, op: str) -> torch.Tensor:
        if not self.crossing:
            return t
        return self._move(t, self.tee, "to_cpu", "transfer_to_cpu", op)

    def _move(self, t: torch.Tensor, device: torch.device, direction: str, category: str, op: str) -> torch.Tensor:
        if not self.pinned:  # host-timed: the driver's bounce-buffer copying is part of the cost
            with self.metrics.time(category, op, host=True):
                out = t.to(device)
                synchronize(self.gpu)
        elif device.type == "cuda":
            if t.untyped_storage().data_ptr() not in self.pinned_bases:  # stage it in pinned memory
                with self.metrics.time(category, "staging", host=True):
                    t = torch.empty_like(t, pin_memory=True).copy_(t)
            with self.metrics.time(category, op):
                out = t.to(device, non_blocking=True)
        else:  # a non-blocking device-to-host copy lands in pinned memory; wait before the TEE reads it
            with self.metrics.time(category, op):
                out = t.to(device, non_blocking=True)
            torch.cuda.current_stream(t.device).synchronize()
        self.bytes[direction] += t.numel() * t.element_size()
        self.calls[direction] += 1
        return out

    def summary(self) -> dict:
        to_gpu, to_cpu = self.bytes["to_gpu"] / MIB, self.bytes["to_cpu"] / MIB
        return {"to_gpu_mb": to_gpu, "to_cpu_mb": to_cpu, "total_mb": to_gpu + to_cpu,
                "to_gpu_bytes": self.bytes["to_gpu"], "to_cpu_bytes": self.bytes["to_cpu"],
                "to_gpu_calls": self.calls["to_gpu"], "to_cpu_calls": self.calls["to_cpu"], "mb_unit": "MiB"}
