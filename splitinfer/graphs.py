"""CUDA graphs for the GPU's side of a hop: each call captured once, then replayed as one launch.

At 128 tokens on the H100 machine the GPU's work in a hop is a few microseconds of kernels behind tens of
microseconds of host calls each (the tenth round: 84-93 µs of `gpu_compute` per linear and 223 µs per attention
matmul, against 1.3 ms of product kernels an inference in the eighth round's profile). A replayed graph makes
those calls one. What crosses, and its copies, stay outside the graphs, so transfers are still timed apart
from the GPU's compute.

A graph reads its inputs from, and writes its output to, the addresses it was captured with. So each call
copies its inputs into the graph's own (on the device, inside the call's timed region), and hands back the
graph's output tensor, which the next replay of that graph overwrites: a caller reads it before making the
same call again, as every hop does (it crosses to the TEE, or feeds the next GPU call of the same layer).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Hashable, Protocol

import torch

Call = Callable[..., torch.Tensor]


class Captured(Protocol):
    """One captured call: replaying it recomputes `output` from `inputs`, in place."""
    inputs: tuple[torch.Tensor, ...]
    output: torch.Tensor

    def replay(self) -> None: ...


class CudaGraphCall:
    """`fn` on `inputs` (the graph's own copies) captured as a CUDA graph on `stream`; `keep` holds device
    tensors that `fn` reads besides its inputs (an index), so that they outlive the graph.

    Each graph has a memory pool of its own. In a shared pool a graph's output may sit where an earlier capture
    had its temporaries (the full scores before they are packed), which is safe only if the graphs replay in
    the order they were captured; the attention's graphs, captured in the first layer and replayed in every
    one, do not. Each pool rounds up what it holds (2 MiB segments; 20 MiB for results of 1 to 10 MiB)."""

    def __init__(self, fn: Call, inputs: tuple[torch.Tensor, ...], stream: torch.cuda.Stream,
                 keep: tuple[torch.Tensor, ...] = ()):
        self.inputs, self.keep = inputs, keep
        stream.wait_stream(torch.cuda.current_stream(stream.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # lazily made state (cuBLAS's workspace for this stream) before the capture
                fn(*inputs)
        torch.cuda.synchronize(stream.device)
        self.graph = torch.cuda.CUDAGraph()
        # not `torch.cuda.graph(...)`: on entry it empties the pinned host cache, and the boundary relies on
        # a pinned address staying pinned (`Boundary.pinned_bases`)
        with torch.cuda.stream(stream):
            self.graph.capture_begin()
            try:
                self.output = fn(*inputs)
            except BaseException:
                with contextlib.suppress(RuntimeError):  # the capture's own error says less than fn's
                    self.graph.capture_end()
                raise
            self.graph.capture_end()
        torch.cuda.current_stream(stream.device).wait_stream(stream)

    def replay(self) -> None:
        self.graph.replay()


def layout(t: torch.Tensor) -> tuple:
    return tuple(t.shape), t.stride(), t.dtype


def own_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of t with t's strides, gaps included (a view of v within qkv), so that the graph runs the very
    kernels the call would on t, and rounds as it does."""
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device).copy_(t)


class CallGraphs:
    """The GPU's calls, each captured the first time it is made with a key and its inputs' layout, and
    replayed after (`__call__`). `capture(fn, inputs, keep)` makes a `Captured`; by default a CUDA graph on
    `device`, which must then be a CUDA device."""

    def __init__(self, device: torch.device, capture: Callable[..., Captured] | None = None):
        self.calls: dict[Hashable, Captured] = {}
        if capture is None:
            stream = torch.cuda.Stream(device)
            capture = lambda fn, inputs, keep: CudaGraphCall(fn, inputs, stream, keep)  # noqa: E731
        self.capture = capture

    def __call__(self, key: Hashable, fn: Call, *inputs: torch.Tensor,
                 keep: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
        """fn(*inputs), from the graph captured for `key` at these inputs' layouts (captured now if there is
        none). The result is the graph's output: the next call with the same key and layouts overwrites it."""
        full_key = (key, *map(layout, inputs))
        call = self.calls.get(full_key)
        if call is None:
            self.calls[full_key] = self.capture(fn, tuple(map(own_copy, inputs)), keep)
            call = self.calls[full_key]
        else:
            for static, t in zip(call.inputs, inputs):
                static.copy_(t)
        call.replay()
        return call.output

    @property
    def captured(self) -> int:
        """How many calls have a graph."""
        return len(self.calls)
