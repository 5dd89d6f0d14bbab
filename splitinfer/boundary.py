"""The one place tensors move between the TEE (CPU) and the GPU: counts bytes, calls and time per direction."""
from __future__ import annotations

from typing import Callable

import torch

from splitinfer.metrics import Metrics, synchronize

MIB = 2 ** 20
# a copy to the GPU at least this large is cut into slices, a stream each, where the boundary has `copy_streams`
SLICED_COPY_BYTES = MIB


def copy_in_slices(target: torch.Tensor, source: torch.Tensor, current: torch.cuda.Stream,
                   streams: list[torch.cuda.Stream], non_blocking: bool = True) -> None:
    """target.copy_(source), both contiguous, as len(streams) + 1 slices: the first queued on `current`, each other
    on one of `streams`, which first waits for `current`'s work (the target's memory may have served it); `current`
    then waits for each, so that what follows on it reads the whole copy (`Boundary._in_slices`, `perf`'s probe)."""
    (first, *targets), (head, *sources) = (x.view(-1).chunk(len(streams) + 1) for x in (target, source))
    used = streams[: len(targets)]
    for into, part, stream in zip(targets, sources, used):
        stream.wait_stream(current)
        with torch.cuda.stream(stream):
            into.copy_(part, non_blocking=non_blocking)
    first.copy_(head, non_blocking=non_blocking)
    for stream in used:
        current.wait_stream(stream)


class Boundary:
    """TEE <-> GPU transport. In a TDX guest with a passthrough GPU, `.to(device)` is the whole transport.

    With `crossing=False` (the TEE-only runner) nothing leaves the TEE and nothing is counted.
    With `pinned` (the default on CUDA) both directions go through page-locked host memory, which the
    GPU's copy engines read and write at full speed; pageable copies go through the driver's bounce
    buffer at a fraction of it. An optional `audit` callback sees every tensor sent to the GPU,
    labelled, in order.

    A hop may also cross in parts, so that copies run while the TEE works on other parts (`to_tee_in_parts`,
    `to_gpu_into`): parts come back on a stream of their own, `copies_back`, so that they need not queue
    behind the parts still on their way to the TEE.
    """

    def __init__(self, gpu: torch.device, tee: torch.device, metrics: Metrics, crossing: bool = True,
                 pinned: bool | None = None, copy_streams: int = 1):
        self.gpu, self.tee, self.metrics, self.crossing = gpu, tee, metrics, crossing
        self.pinned = gpu.type == "cuda" if pinned is None else pinned and gpu.type == "cuda"
        # Base addresses of the pinned buffers handed out. PyTorch's host cache keeps pinned blocks for
        # the process's life, so an address once pinned stays pinned; a lookup here replaces
        # Tensor.is_pinned(), a driver call that took ~11 µs per copy on the H200 machine.
        self.pinned_bases: set[int] = set()
        self.audit = None
        # pinned buffers kept from hop to hop (`kept_buffer`), by their use, shape, strides and dtype; not `keep`,
        # a fresh one at each call (an ablation: what keeping them saves)
        self.kept: dict[tuple, torch.Tensor] = {}
        self.keep = True
        # where each copy to the GPU lands, given its hop (op, layer, its count within them in this inference):
        # a fresh tensor, unless set (`graphs.CallGraphs.landing`: the same buffer at every inference)
        self.landing: Callable[[tuple, torch.Tensor], torch.Tensor] | None = None
        self.copies_back = torch.cuda.Stream(gpu) if gpu.type == "cuda" and crossing else None
        # with `copy_streams` above one, a pinned copy to the GPU of SLICED_COPY_BYTES or more is cut into as many
        # slices, the first queued on the current stream and each other on one of these (`_in_slices`)
        self.copy_streams = ([torch.cuda.Stream(gpu) for _ in range(copy_streams - 1)]
                             if gpu.type == "cuda" and crossing and copy_streams > 1 else [])
        self.reset()

    def reset(self) -> None:
        self.bytes = {"to_gpu": 0, "to_cpu": 0}
        self.calls = {"to_gpu": 0, "to_cpu": 0}
        self.new_inference()

    def new_inference(self) -> None:
        """Count the hops afresh: an inference's n-th copy to the GPU for an op and layer lands where the last
        inference's did (`landing`)."""
        self.hops: dict[tuple, int] = {}

    def to_gpu(self, t: torch.Tensor, op: str, layer: int | None = None) -> torch.Tensor:
        """Send `t` to the GPU; `op` is the op kind it feeds, `layer` its layer (None outside the layers)."""
        if not self.crossing:
            return t
        if self.audit is not None:
            self.audit(layer, op, t)
        into = None
        if self.landing is not None:
            count = self.hops[op, layer] = self.hops.get((op, layer), -1) + 1
            into = self.landing((op, layer, count), t)
        return self._move(t, self.gpu, "to_gpu", "transfer_to_gpu", op, into)

    def pinned_buffer(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype,
                      strides: tuple[int, ...] | None = None) -> torch.Tensor | None:
        """An empty pinned host tensor (contiguous, unless `strides`) for a result bound for the GPU, or None where
        copies are not pinned."""
        if not (self.pinned and self.crossing):
            return None
        buffer = (torch.empty(shape, dtype=dtype, pin_memory=True) if strides is None else
                  torch.empty_strided(shape, strides, dtype=dtype, pin_memory=True))
        self.pinned_bases.add(buffer.data_ptr())
        return buffer

    def kept_buffer(self, use: str, like: torch.Tensor | torch.Size | tuple[int, ...], dtype: torch.dtype
                    ) -> torch.Tensor | None:
        """A pinned host tensor kept for `use` and the layout of `like` (a tensor, or a shape: contiguous), the same
        one at every call for the boundary's life (not `keep`: a fresh one each time), or None where copies are not
        pinned. What it holds lasts until the next call for the same use and layout writes it: for a hop whose
        result the TEE has used up by then, as each of the plain split's hops has. On the H100 machine a hop of the
        1B shape's q and k took 83 µs with both its buffers kept against 101 with fresh ones at 128 tokens, and 189
        against 223 at 512 (twenty-seventh round, `kernel_bench`'s `hop_forms`)."""
        shape, strides = ((like.shape, like.stride()) if isinstance(like, torch.Tensor) else
                          (torch.Size(like), None))
        if not (self.pinned and self.crossing and self.keep):
            return self.pinned_buffer(shape, dtype, strides)
        key = (use, tuple(shape), strides, dtype)
        buffer = self.kept.get(key)
        if buffer is None:
            buffer = self.kept[key] = self.pinned_buffer(shape, dtype, strides)
        return buffer

    def to_tee(self, t: torch.Tensor, op: str, kept: str | None = None) -> torch.Tensor:
        """`t` on the TEE; with `kept`, the hop's name (the layer's linear or matmul, or the TEE op it feeds), in a
        buffer kept for that hop and t's layout (`kept_buffer`), which the same hop of the next layer overwrites:
        for a result the TEE has used by then."""
        if not self.crossing:
            return t
        into = self.kept_buffer(f"to_tee {kept}", t, t.dtype) if kept else None
        return self._move(t, self.tee, "to_cpu", "transfer_to_cpu", op, into)

    def _move(self, t: torch.Tensor, device: torch.device, direction: str, category: str, op: str,
              into: torch.Tensor | None = None) -> torch.Tensor:
        """t on `device` (into `into` where given, a tensor laid out as `t.to(device)` would be)."""
        if not self.pinned:  # host-timed: the driver's bounce-buffer copying is part of the cost
            with self.metrics.time(category, op, host=True):
                out = t.to(device) if into is None else into.copy_(t)
                synchronize(self.gpu)
        elif device.type == "cuda":
            if t.untyped_storage().data_ptr() not in self.pinned_bases:  # stage it in pinned memory
                with self.metrics.time(category, "staging", host=True):
                    t = torch.empty_like(t, pin_memory=True).copy_(t)
            with self.metrics.time(category, op):
                if self.sliced(t, into):
                    out = self._in_slices(t, into)
                else:
                    out = t.to(device, non_blocking=True) if into is None else into.copy_(t, non_blocking=True)
        else:  # a non-blocking device-to-host copy lands in pinned memory; wait before the TEE reads it
            with self.metrics.time(category, op):
                out = t.to(device, non_blocking=True) if into is None else into.copy_(t, non_blocking=True)
            if t.is_cuda:
                torch.cuda.current_stream(t.device).synchronize()
        self._count(direction, t)
        return out

    def sliced(self, t: torch.Tensor, into: torch.Tensor | None) -> bool:
        """Whether the pinned copy of `t` to the GPU (into `into`, where given) is cut into slices (`_in_slices`)."""
        return (bool(self.copy_streams) and t.numel() * t.element_size() >= SLICED_COPY_BYTES and t.is_contiguous()
                and (into is None or into.is_contiguous()))

    def _in_slices(self, t: torch.Tensor, into: torch.Tensor | None) -> torch.Tensor:
        """The pinned, contiguous `t` on the GPU (in `into`, where given), copied in slices: the first on the current
        stream, each other on a copy stream of its own, so that as many of the GPU's copy engines read the host's
        memory at once. On the H100 machine a copy from memory the CPU had just written, as the TEE's results are, ran
        at 20-22 GB/s at 2-8 MiB, against 52-54 otherwise (twenty-seventh round; `perf`'s copy probe times it in
        slices too). Each copy stream first waits for the current one's work, which the target's memory may have
        served, and the current one then waits for each, so that what follows on it reads the whole copy."""
        out = torch.empty(t.shape, dtype=t.dtype, device=self.gpu) if into is None else into
        copy_in_slices(out, t, torch.cuda.current_stream(self.gpu), self.copy_streams)
        return out

    def _count(self, direction: str, t: torch.Tensor) -> None:
        self.bytes[direction] += t.numel() * t.element_size()
        self.calls[direction] += 1

    # ---- crossing in parts ----

    def to_tee_in_parts(self, t: torch.Tensor, parts: Callable[[torch.Tensor], list[torch.Tensor]],
                        op: str) -> tuple[torch.Tensor, list[torch.cuda.Event | None]]:
        """Queue the copy of every part of `t` (as `parts` cuts it and a tensor of its shape) to the TEE at
        once: (the TEE's copy of t, one event per part marking its arrival; None where a part is there
        as soon as this returns)."""
        if not self.crossing or self.gpu.type != "cuda":
            host = self.to_tee(t, op)
            return host, [None] * len(parts(host))
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.pinned)
        stream, arrivals = torch.cuda.current_stream(self.gpu), []
        for source, target in zip(parts(t), parts(host)):
            with self.metrics.time("transfer_to_cpu", op, host=not self.pinned):
                target.copy_(source, non_blocking=self.pinned)
            arrivals.append(torch.cuda.Event())
            arrivals[-1].record(stream)
            self._count("to_cpu", source)
        return host, arrivals

    @staticmethod
    def wait(arrival: torch.cuda.Event | None) -> None:
        """Block until the part this event marks has arrived in the TEE."""
        if arrival is not None:
            arrival.synchronize()

    def gpu_empty(self, shape: torch.Size | tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A GPU tensor for parts to be copied into (`to_gpu_into`). Its memory may have served work
        still queued on the current stream, so the copies-back stream first waits for that."""
        out = torch.empty(shape, dtype=dtype, device=self.gpu)
        if self.copies_back is not None:
            self.copies_back.wait_stream(torch.cuda.current_stream(self.gpu))
        return out

    def to_gpu_into(self, target: torch.Tensor, t: torch.Tensor, op: str, layer: int | None = None) -> None:
        """Copy the TEE's `t` into `target`, a part of a `gpu_empty` tensor, on the copies-back stream.
        `t` should be pinned (a `pinned_buffer`), so that the copy does not hold up the TEE."""
        if self.audit is not None:
            self.audit(layer, op, t)
        if self.copies_back is None:
            with self.metrics.time("transfer_to_gpu", op, host=True):
                target.copy_(t)
        else:
            with torch.cuda.stream(self.copies_back), self.metrics.time("transfer_to_gpu", op, host=not self.pinned):
                target.copy_(t, non_blocking=self.pinned)
        self._count("to_gpu", t)

    def parts_arrived(self) -> None:
        """Make the current stream wait for every part copied back (the host does not wait)."""
        if self.copies_back is not None:
            torch.cuda.current_stream(self.gpu).wait_stream(self.copies_back)

    def summary(self) -> dict:
        to_gpu, to_cpu = self.bytes["to_gpu"] / MIB, self.bytes["to_cpu"] / MIB
        return {"to_gpu_mb": to_gpu, "to_cpu_mb": to_cpu, "total_mb": to_gpu + to_cpu,
                "to_gpu_bytes": self.bytes["to_gpu"], "to_cpu_bytes": self.bytes["to_cpu"],
                "to_gpu_calls": self.calls["to_gpu"], "to_cpu_calls": self.calls["to_cpu"], "mb_unit": "MiB"}
