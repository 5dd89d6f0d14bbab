"""Where one inference's time went: per category, per op kind, with op counts.

Device work (transfers, GPU compute) is timed on the device itself: on CUDA each such region records a
start and an end event on the stream, read once the inference is over, so GPU time is GPU time and not
kernel-launch time, and no region needs a synchronisation of its own (the only ones left are those the
TEE needs before it reads a result). Without CUDA, a region is timed on the host clock. TEE regions
(CPU compute, crypto) and the host side of a transfer (staging in pinned memory) are host-timed.
Whatever no region claims is `other`: residual adds, reshapes, the interpreter, kernel-launch and
synchronisation latency. Where copies run while the TEE works (an `overlapped` region), the time they
share is `overlap`: then the online categories and `other`, less `overlap`, make up the total.

Timing every region costs time of its own: two CUDA events per device region, a clock read per TEE region,
and the interpreter's work around each. So an inference can also run `instrumented=False`: then only its
total is measured, and the headline figures of `perf` come from such runs (see `perf.EngineTimer`).
"""
from __future__ import annotations

import time
from collections import Counter, defaultdict
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Iterator

import torch

ONLINE = ("transfer_to_gpu", "transfer_to_cpu", "gpu_compute", "cpu_compute", "crypto")
DEVICE_WORK = ("transfer_to_gpu", "transfer_to_cpu", "gpu_compute")
NOTHING = nullcontext()  # reusable: it holds no state


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Metrics:
    """Accumulates milliseconds per (category, op kind) and counts ops for one inference."""

    def __init__(self, device: torch.device):
        self.device = device
        self.instrumented = True  # False: time the total alone (see the module's docstring)
        self.spare_events: list[torch.cuda.Event] = []  # reused across inferences: creating one costs a driver call
        self.reset()

    def reset(self) -> None:
        self.ms: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.counts: Counter = Counter()
        self.total_ms = 0.0
        self.layer: int | None = None  # the decoder layer being run, for the per-layer table
        self.layer_ms: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.pending: list[tuple[str, str, int | None, torch.cuda.Event, torch.cuda.Event]] = []
        # overlapped regions: (op kind, layer, start, end, their first and past-the-last pending index,
        # host-timed ms)
        self.sections: list[tuple[str, int | None, torch.cuda.Event, torch.cuda.Event, int, int, float]] = []

    def _add(self, category: str, op: str, layer: int | None, elapsed: float) -> None:
        self.ms[category][op] += elapsed
        if layer is not None:
            self.layer_ms[layer][category] += elapsed

    def time(self, category: str, op: str, count: str | None = None,
             host: bool = False) -> AbstractContextManager[None]:
        """Time a region under `category` and op kind `op`, adding one to counter `count` if given.

        Device work on CUDA is timed with events (read in `total`); everything else, and any region
        marked `host`, with the host clock. Uninstrumented, nothing."""
        return self._time(category, op, count, host) if self.instrumented else NOTHING

    def count(self, *counters: str) -> None:
        """One more of each counter, for work a region timed under another name (`SplitLlama.fused_hop`)."""
        if self.instrumented:
            self.counts.update(counters)

    @contextmanager
    def _time(self, category: str, op: str, count: str | None, host: bool) -> Iterator[None]:
        if count:
            self.counts[count] += 1
        if self.device.type == "cuda" and category in DEVICE_WORK and not host:
            stream = torch.cuda.current_stream(self.device)
            start, end = self._event(), self._event()
            start.record(stream)
            try:
                yield
            finally:
                end.record(stream)
                self.pending.append((category, op, self.layer, start, end))
            return
        start_s = time.perf_counter()
        try:
            yield
        finally:
            self._add(category, op, self.layer, (time.perf_counter() - start_s) * 1e3)

    @contextmanager
    def overlapped(self, op: str, copies_back: torch.cuda.Stream | None) -> Iterator[None]:
        """A region whose copies run while the TEE works. The time they share is what the region's timed
        work adds up to (device regions by their events, TEE regions by the host clock) less the time the
        region took: from its start on the current stream to the end of its last copy back, queued on
        `copies_back`. Gaps in the region make this a lower bound. It is kept under the op kind `op` of
        the hop. Without CUDA nothing overlaps."""
        if self.device.type != "cuda" or not self.instrumented:
            yield
            return
        start, end = self._event(), self._event()
        start.record(torch.cuda.current_stream(self.device))
        first, host_ms = len(self.pending), self._host_ms()
        try:
            yield
        finally:
            end.record(copies_back)
            self.sections.append((op, self.layer, start, end, first, len(self.pending), self._host_ms() - host_ms))

    def _host_ms(self) -> float:
        """The host-timed online milliseconds so far (device regions wait in `pending` until the end)."""
        return sum(sum(self.ms[c].values()) for c in ONLINE)

    @contextmanager
    def in_layer(self, layer: int) -> Iterator[None]:
        """Attribute the regions inside to `layer`, and time the layer as a whole."""
        if not self.instrumented:
            yield
            return
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
        """Wall-clock time of the inference; on exit, the device regions' event times are read."""
        synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.total_ms = (time.perf_counter() - start) * 1e3
            elapsed = [begin.elapsed_time(end) for _, _, _, begin, end in self.pending]
            for op, layer, begin, end, first, last, host_ms in self.sections:
                shared = sum(elapsed[first:last]) + host_ms - begin.elapsed_time(end)
                self._add("overlap", op, layer, max(0.0, shared))
                self.spare_events += (begin, end)
            for (category, op, layer, begin, end), ms in zip(self.pending, elapsed):
                self._add(category, op, layer, ms)
                self.spare_events += (begin, end)
            self.pending.clear()
            self.sections.clear()

    def _event(self) -> torch.cuda.Event:
        return self.spare_events.pop() if self.spare_events else torch.cuda.Event(enable_timing=True)

    def category_ms(self) -> dict[str, float]:
        """Milliseconds per category. The online ones and `other` (the total less the timed online work
        that did not overlap) sum to the total plus `overlap`; `offline` happened before the total was
        started."""
        out = {c: sum(self.ms[c].values()) for c in ONLINE}
        out["overlap"] = sum(self.ms["overlap"].values())
        out["other"] = max(0.0, self.total_ms - sum(out[c] for c in ONLINE) + out["overlap"])
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
        row["overlap_ms"] = self.layer_ms[layer].get("overlap", 0.0)
        row["other_ms"] = max(0.0, row["total_ms"] - sum(row[f"{c}_ms"] for c in ONLINE) + row["overlap_ms"])
        return row
