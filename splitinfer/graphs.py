"""CUDA graphs for the GPU's side of a hop: each call captured once, then replayed as one launch.

At 128 tokens on the H100 machine the GPU's work in a hop is a few microseconds of kernels behind tens of
microseconds of host calls each (the tenth round: 84-93 µs of `gpu_compute` per linear and 223 µs per attention
matmul, against 1.3 ms of product kernels an inference in the eighth round's profile). A replayed graph makes
those calls one. What crosses, and its copies, stay outside the graphs, so transfers are still timed apart
from the GPU's compute.

A graph reads its inputs from, and writes its output to, the addresses it was captured with. The copies to
the GPU land in buffers kept for each hop (`CallGraphs.landing`), at the same address at every inference, and
a graph takes those, and other graphs' outputs, as its inputs where they are. Any other input is copied into
the graph's own (on the device, inside the call's timed region). Each call hands back the graph's output
tensor, which the next replay of that graph overwrites: a caller reads it before making the same call again,
as every hop does (it crosses to the TEE, or feeds the next GPU call of the same layer).
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
    """`fn` on `inputs` (at the addresses it will read them from) captured as a CUDA graph on `stream`; `keep`
    holds device tensors that `fn` reads besides its inputs (an index), so that they outlive the graph.

    Each graph has a memory pool of its own. In a shared pool a graph's output may sit where an earlier capture
    had its temporaries (the full scores before they are packed): safe only while the graphs replay in the
    order they were captured, with no output alive across an inference. The engine's calls keep to that
    today; a private pool needs neither, at a cost in GPU memory, since each pool rounds up what it holds
    (2 MiB segments; 20 MiB for results of 1 to 10 MiB)."""

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
    replayed after (`__call__`), and the buffers the copies to the GPU land in (`landing`). `capture(fn,
    inputs, keep)` makes a `Captured`; by default a CUDA graph on `device`, which must then be a CUDA device."""

    def __init__(self, device: torch.device, capture: Callable[..., Captured] | None = None):
        self.device = device
        self.calls: dict[Hashable, Captured] = {}
        self.landings: dict[Hashable, torch.Tensor] = {}
        # storages that only this object's graphs and landings write: a graph may read them where they are
        self.owned: set[int] = set()
        self.input_copies = 0  # inputs copied into a graph's own at a replay, all replays together
        if capture is None:
            stream = torch.cuda.Stream(device)
            capture = lambda fn, inputs, keep: CudaGraphCall(fn, inputs, stream, keep)  # noqa: E731
        self.capture = capture

    def landing(self, hop: Hashable, t: torch.Tensor) -> torch.Tensor:
        """The device tensor that host tensor t lands in for the copy to the GPU that `hop` names, laid out as
        `t.to(device)` would be: the same one at each inference, so that the graph that reads it reads it where
        it is. Each is kept for the life of this object (one per hop and layout)."""
        key = (hop, layout(t))
        buffer = self.landings.get(key)
        if buffer is None:
            buffer = self.landings[key] = torch.empty_like(t, device=self.device)
            self.owned.add(buffer.untyped_storage().data_ptr())
        return buffer

    def __call__(self, key: Hashable, fn: Call, *inputs: torch.Tensor,
                 keep: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
        """fn(*inputs), from the graph captured for `key` at these inputs' layouts (captured now if there is
        none). The result is the graph's output: the next call with the same key and layouts overwrites it.
        An input found elsewhere than where the graph reads it is copied there, over what may be a landing or
        another graph's output: the engine rewrites both before it next reads them."""
        full_key = (key, *map(layout, inputs))
        call = self.calls.get(full_key)
        if call is None:
            # a landing or another graph's output is read where it is; anything else, from a copy of its own
            statics = tuple(t if t.untyped_storage().data_ptr() in self.owned else own_copy(t) for t in inputs)
            call = self.calls[full_key] = self.capture(fn, statics, keep)
            self.owned.add(call.output.untyped_storage().data_ptr())
        else:
            for static, t in zip(call.inputs, inputs):
                if static.data_ptr() != t.data_ptr() or static.stride() != t.stride():
                    static.copy_(t)
                    self.input_copies += 1
        call.replay()
        return call.output

    @property
    def captured(self) -> int:
        """How many calls have a graph."""
        return len(self.calls)
