"""Where one inference's time went: per category, per op kind, with op counts.

Every region that touches the GPU synchronises the device on exit, so GPU time is GPU time and not
kernel-launch time. Whatever no region claims is `other` (residual adds, reshapes, interpreter).
"""
from __future__ import annotations

import time
from collections import Counter, defaultdict
from contextlib import contextmanager
from typing import Iterator

import torch

ONLINE = ("transfer_to_gpu", "transfer_to_cpu", "gpu_compute", "cpu_compute", "crypto")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Metrics:
    """Accumulates milliseconds per (category, op kind) and counts ops for one inference."""

    def __init__(self, device: torch.device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.ms: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.counts: Counter = Counter()
        self.total_ms = 0.0
        self.layer: int | None = None  # the decoder layer being run, for the per-layer table
        self.layer_ms: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))

    @contextmanager
    def time(self, category: str, op: str, count: str | None = None) -> Iterator[None]:
        """Time a region under `category` and op kind `op`, adding one to counter `count` if given.

        Synchronises the device on exit, so queued GPU work lands in the region that queued it."""
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            elapsed = (time.perf_counter() - start) * 1e3
            self.ms[category][op] += elapsed
            if self.layer is not None:
                self.layer_ms[self.layer][category] += elapsed
            if count:
                self.counts[count] += 1

    @contextmanager
    def in_layer(self, layer: int) -> Iterator[None]:
        """Attribute the regions inside to `layer`, and time the layer as a whole."""
        synchronize(self.device)
        start = time.perf_counter()
        self.layer = layer
        try:
            yield
        finally:
            synchronize(self.device)
            self.layer = None
            self.layer_ms[layer]["total"] = (time.perf_counter() - start) * 1e3

    @contextmanager
    def total(self) -> Iterator[None]:
        synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.total_ms = (time.perf_counter() - start) * 1e3

    def category_ms(self) -> dict[str, float]:
        """Milliseconds per category. The online ones and `other` (the total less every timed online
        region) sum to the total; `offline` happened before the total was started."""
        out = {c: sum(self.ms[c].values()) for c in ONLINE}
        out["other"] = max(0.0, self.total_ms - sum(out.values()))
        out["offline"] = sum(self.ms["offline"].values())
        return out

    def snapshot(self) -> dict:
        """A copy of this inference's figures, safe to keep after reset()."""
        return {"total_ms": self.total_ms, "categories": self.category_ms(),
                "breakdown": {c: dict(ops) for c, ops in self.ms.items()}, "counts": dict(self.counts),
                "per_layer": [self._layer_row(i) for i in sorted(self.layer_ms)]}

    def _layer_row(self, layer: int) -> dict:
        row = {"layer": layer, **{f"{c}_ms": self.layer_ms[layer].get(c, 0.0) for c in ONLINE}}
        row["total_ms"] = self.layer_ms[layer]["total"]
        row["other_ms"] = max(0.0, row["total_ms"] - sum(row[f"{c}_ms"] for c in ONLINE))
        return row
