"""The one place tensors move between the TEE (CPU) and the GPU: counts bytes, calls and time per direction."""
from __future__ import annotations

import torch

from splitinfer.metrics import Metrics

MIB = 2 ** 20


class Boundary:
    """TEE <-> GPU transport. In a TDX guest with a passthrough GPU, `.to(device)` is the whole transport.

    With `crossing=False` (the TEE-only runner) nothing leaves the TEE and nothing is counted.
    An optional `audit` callback sees every tensor sent to the GPU, labelled, in order.
    """

    def __init__(self, gpu: torch.device, tee: torch.device, metrics: Metrics, crossing: bool = True):
        self.gpu, self.tee, self.metrics, self.crossing = gpu, tee, metrics, crossing
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

    def to_tee(self, t: torch.Tensor, op: str) -> torch.Tensor:
        if not self.crossing:
            return t
        return self._move(t, self.tee, "to_cpu", "transfer_to_cpu", op)

    def _move(self, t: torch.Tensor, device: torch.device, direction: str, category: str, op: str) -> torch.Tensor:
        with self.metrics.time(category, op):
            out = t.to(device)
        self.bytes[direction] += t.numel() * t.element_size()
        self.calls[direction] += 1
        return out

    def summary(self) -> dict:
        to_gpu, to_cpu = self.bytes["to_gpu"] / MIB, self.bytes["to_cpu"] / MIB
        return {"to_gpu_mb": to_gpu, "to_cpu_mb": to_cpu, "total_mb": to_gpu + to_cpu,
                "to_gpu_bytes": self.bytes["to_gpu"], "to_cpu_bytes": self.bytes["to_cpu"],
                "to_gpu_calls": self.calls["to_gpu"], "to_cpu_calls": self.calls["to_cpu"], "mb_unit": "MiB"}
