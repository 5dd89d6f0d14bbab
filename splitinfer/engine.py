"""The LLaMA prefill, written top to bottom, with every TEE <-> GPU hop a visible call.

The TEE (CPU) holds the norms and runs every nonlinear op; the GPU holds the projection weights and
runs every linear op. A scheme protects what crosses; `plain` protects nothing.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import itertools
import math
import statistics
import sys
import time
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import LlamaConfig

from splitinfer import kernels, native
from splitinfer.boundary import Boundary
from splitinfer.graphs import CallGraphs
from splitinfer.inputs import last_positions
from splitinfer.metrics import NOTHING, Metrics, synchronize
from splitinfer.reference import compare
from splitinfer.schemes import Plain
from splitinfer.targets import SAME_FUNCTION
from splitinfer.tee_ops import (CausalBlocks, RmsNorm, Rotary, apply_rope, attention_bias, fused_attention, gated,
                                grouped_matmul, merge_heads, merged, rotated_heads, row_parts, silu_gate, softmax_in_order,
                                split_heads, sum_and_norm)


Product = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Parts = Callable[[torch.Tensor], list[torch.Tensor]]
Step = Callable[[int, torch.Tensor, torch.Tensor], object]
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # glibc's mallopt parameters
# A streamed embedding table crosses this much at a time, two blocks in flight (`streamed_embedding`). PyTorch's
# pinned cache rounds each block up to a power of two and keeps it; at 512 tokens ours' largest other pinned
# blocks are 16 MiB (the scores and the probabilities, two at once), so blocks of that size share them.
EMBEDDING_BLOCK_BYTES = 16 * 2 ** 20
SCALED_PROJECTION = "self_attn.q_proj"  # its GPU weight and bias carry the scores' 1/sqrt(head_dim)
# The TEE-only runner's forms of attention, where no hop separates its steps (`SplitLlama.choose_attention`):
# the scores as one n×n block, as the causal block triangle, or the three steps as one op (`fused_attention`)
ONE_BLOCK, CAUSAL_BLOCKS, FUSED = "one-block", "causal-blocks", "fused"
ATTENTION_FORMS = (ONE_BLOCK, CAUSAL_BLOCKS, FUSED)
# The LM head's forms on a CPU device (`Gpu.choose_head`): F.linear, or the same product as W·xᵀ (`head_by_columns`)
BY_ROWS, BY_COLUMNS = "linear", "by-columns"
# `fuse_hops` and `cuda_graphs` may be left to set-up: each way timed on this machine, the faster kept
# (`SplitLlama.choose_configuration`)
AUTO = "auto"
CHOSEN_OPTIONS = ("cuda_graphs", "fuse_hops")
_ALLOCATOR_SETTING: str | None = None


def keep_freed_memory() -> str:
    """Make glibc serve every allocation from its heap (no mmap) and never trim it, so that freed memory
    is reused instead of returned to the OS and faulted in afresh by the next op's temporaries.

    The TEE's ops allocate many short-lived tensors, some over glibc's largest mmap threshold (32 MiB: a
    float32 copy of 32 heads x 512² scores, or of a 512 x 16384 gate/up output), which glibc would
    otherwise map and unmap on every call. Measured on the 2-core VM: the first engine of a process ran
    512 tokens in ~740 ms instead of ~930 ms (threshold alone); with mmap off too, both schemes' four
    linear masks per layer at 1B shape and 512 tokens took ~9 ms instead of 16-24 ms. In a TDX guest
    each fresh page also costs an acceptance. Returns what was set, for the JSON."""
    global _ALLOCATOR_SETTING
    if _ALLOCATOR_SETTING is None:
        try:
            libc = ctypes.CDLL("libc.so.6")
            ok = all(libc.mallopt(param, value) == 1 for param, value in
                     ((M_MMAP_MAX, 0), (M_MMAP_THRESHOLD, 32 * 2 ** 20), (M_TRIM_THRESHOLD, 2 ** 31 - 1)))
            _ALLOCATOR_SETTING = "glibc: no mmap, trim threshold 2 GiB" if ok else "default"
        except (OSError, AttributeError):
            _ALLOCATOR_SETTING = "default (not glibc)"
    return _ALLOCATOR_SETTING


def release_freed_memory() -> None:
    """Hand the heap's free memory back to the OS, once (glibc's malloc_trim), where `keep_freed_memory` keeps it
    otherwise: after set-up's compiler, whose garbage would stay resident for the process's life and count in its
    peak. On the 2-core VM (ours, 1B shape with 2 layers, 512 tokens, float16) building the kernels left 266 MiB
    of it, and the runner's peak host RSS fell from 1660 to 1509 MiB."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Gpu:
    """The untrusted device: the projection weights and the linear work.

    In the TEE-only runner the same object runs on the CPU, and its time counts as CPU compute.
    """

    def __init__(self, device: torch.device, metrics: Metrics, in_tee: bool = False):
        self.device, self.metrics = device, metrics
        # where set (`SplitLlama.use_graphs`), each call is replayed from a CUDA graph captured at its first
        self.graphs: CallGraphs | None = None
        self.category, self.prefix = ("cpu_compute", "cpu") if in_tee else ("gpu_compute", "gpu")
        self.weights: dict[str, torch.Tensor] = {}
        self.biases: dict[str, torch.Tensor | None] = {}
        self.head_forms: dict[int, str] = {}  # the LM head's rows -> its form there (`choose_head`)
        self.head_ms: dict[str, dict[str, float]] = {}  # the head's input shape -> what each form took there

    def upload(self, name: str, weights: list[torch.Tensor], biases: list[torch.Tensor] | None, dtype: torch.dtype):
        """Place one (possibly fused) weight on the device; parts are moved first, then fused there."""
        self.weights[name] = self._fuse(weights, dtype)
        self.biases[name] = None if biases is None else self._fuse(biases, dtype)

    def _fuse(self, parts: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        parts = [p.to(self.device, dtype) for p in parts]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def linear(self, x: torch.Tensor, name: str, kind: str, first: int | None = None) -> torch.Tensor:
        """x Wᵀ (+ b); with `first`, as `linear_in_two` lays it out: that many output columns, then the rest."""
        weight, bias = self.weights[name], self.biases[name]
        if first is not None:
            product = partial(linear_in_two, first=first)
        else:
            product = head_by_columns if kind == "lm_head" and self.head_forms.get(x.shape[0]) == BY_COLUMNS else F.linear
        with self.metrics.time(self.category, kind, f"{self.prefix}_{'lm_head' if kind == 'lm_head' else 'linear'}"):
            return self.call(name, lambda x: product(x, weight, bias), x)

    def choose_head(self, rows: int, repeat: int = 3) -> None:
        """On a CPU device, the LM head's form for its `rows` (one per sequence, or two where ours pads one
        row): F.linear and `head_by_columns`, each timed (`kernels.timed`'s median of `repeat` after
        three untimed calls), the faster kept, the times in `head_ms`. Which is faster depends on the BLAS,
        the dtype and the threads: on the 2-core VM (float32, 2 threads) the default model's head took 9.8 ms
        as F.linear and 3.7 by columns at one row, 24.5 and 2.9 at two; the 1B shape's 56 and 52, 115 and 38;
        but in float16 and bfloat16 F.linear was faster. On CUDA F.linear stays, untimed."""
        if self.device.type != "cpu":
            return
        weight, bias = self.weights["lm_head"], self.biases["lm_head"]
        x = torch.randn(rows, weight.shape[1]).to(weight.dtype)
        times = {form: kernels.timed(lambda _: product(x, weight, bias), repeat=repeat, wait_s=0.0)
                 for form, product in ((BY_ROWS, F.linear), (BY_COLUMNS, head_by_columns))}
        self.head_forms[rows] = min(times, key=times.get)
        self.head_ms[str(list(x.shape))] = {**{f"{form}_ms": ms for form, ms in times.items()}, "runs": self.head_forms[rows]}

    def matmul(self, a: torch.Tensor, b: torch.Tensor, name: str, product: Product = grouped_matmul,
               merge: bool = False) -> torch.Tensor:
        """a [B, H, n, k] @ b [B, Hkv, k, m] -> [B, H, n, m]; query heads share their group's b (GQA broadcast).
        `product` may instead be a CausalBlocks step: only the causal block triangle of the scores. `name` is the
        layer's matmul (`0.scores`): with graphs, each has its own, which reads its operands where they land.
        With `merge`, the answer's heads merged in the same call ([B, n, H·m], `merge_heads`), as a projection
        on the GPU reads it: with graphs, that projection's graph then reads it where this one wrote it."""
        blocks = getattr(product, "__self__", None) if self.graphs is not None else None
        fn = (lambda a, b: merge_heads(product(a, b))) if merge else product
        with self.metrics.time(self.category, "matmul", f"{self.prefix}_matmul"):
            return self.call(name, fn, a, b, keep=() if blocks is None else blocks.constants(a.device))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        table = self.weights["embed"]
        with self.metrics.time(self.category, "embedding", f"{self.prefix}_embedding"):
            return self.call("embed", lambda ids: F.embedding(ids, table), ids)

    def call(self, key: str, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor,
             keep: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
        """fn(*inputs): as it is, or replayed from its graph (`graphs`), whose output the next such call overwrites."""
        if self.graphs is None:
            return fn(*inputs)
        return self.graphs(key, fn, *inputs, keep=keep)


def head_by_columns(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x's few rows [m, k], as weight·xᵀ, xᵀ a transposed view of at least two rows
    (a zero row after a single one): a product a CPU's BLAS may run at the memory's rate where it runs F.linear
    of a few rows well below it (`Gpu.choose_head`). With one row, or with xᵀ contiguous, the VM's took the slow
    path again (9.7 and 16.4 ms for the default model's head, against 3.1)."""
    rows = x if x.shape[0] > 1 else torch.cat([x, torch.zeros_like(x)])
    out = (weight @ rows.T).T[: x.shape[0]]
    return (out if bias is None else out + bias).contiguous()


def linear_in_two(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, first: int) -> torch.Tensor:
    """F.linear(x, weight, bias) as one flat tensor: its first `first` output columns [..., first], then the
    rest [..., out - first], each contiguous (`in_two`). The first part then crosses to the TEE as it lies; a
    slice of F.linear's output would first be copied into a tensor of its own on the GPU (a launch a layer
    more, outside any graph). Two products in one call; on the 2-core VM (1B shape's qkv, 128 tokens, float32)
    9.8 ms against F.linear's 10.2."""
    rows = x.reshape(-1, x.shape[-1])
    out = torch.empty(rows.shape[0] * weight.shape[0], dtype=x.dtype, device=x.device)
    for lo, hi in ((0, first), (first, weight.shape[0])):
        into = out[rows.shape[0] * lo: rows.shape[0] * hi].view(rows.shape[0], hi - lo)
        if bias is None:
            torch.mm(rows, weight[lo:hi].T, out=into)
        else:
            torch.addmm(bias[lo:hi], rows, weight[lo:hi].T, out=into)
    return out


def in_two(out: torch.Tensor, rows: torch.Size, first: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`linear_in_two`'s flat output as its two parts, [*rows, first] and [*rows, the rest] (views)."""
    count = math.prod(rows)
    return out[: count * first].view(*rows, first), out[count * first:].view(*rows, -1)


def table_block_rows(table: torch.Tensor) -> int:
    """How many rows of a streamed embedding table cross at a time (EMBEDDING_BLOCK_BYTES of them)."""
    return max(1, EMBEDDING_BLOCK_BYTES // (table.shape[1] * table.element_size()))


def whole(t: torch.Tensor) -> list[torch.Tensor]:
    return [t]


def by_parts(step: Step, parts: Parts, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`step(r, part r of x, part r of out)` for every part, in order; returns out."""
    for r, (part, into) in enumerate(zip(parts(x), parts(out))):
        step(r, part, into)
    return out


def attention_operands(batch: int, n: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                       make: Callable[..., torch.Tensor] = torch.zeros
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, kᵀ and v of one layer (`make`'s values) laid out as a masked scheme's inference has them
    (`SplitLlama.heads`, `split_q_k`): q and kᵀ views of RoPE's [B, H + Hkv, n, h] output, v a view of the
    qkv projection's [B, n, (H + 2·Hkv)·h]."""
    q_and_k = make(batch, heads + kv_heads, n, head_dim, dtype=dtype)
    qkv = split_heads(make(batch, n, (heads + 2 * kv_heads) * head_dim, dtype=dtype), head_dim)
    return q_and_k[:, :heads], q_and_k[:, heads:].transpose(-1, -2), qkv[:, heads + kv_heads:]


@dataclass
class TeeLayer:
    attn_norm: RmsNorm
    mlp_norm: RmsNorm


@dataclass
class Answer:
    """A linear's answer as the GPU gave it, still masked: recovered where it is used (`SplitLlama.received`),
    or in the fused hop after it (`SplitLlama.fused_hop`)."""
    z: torch.Tensor
    secret: object
    weight: str
    kind: str


@dataclass
class Protected:
    """A linear's input (or a matmul's two operands) that a fused hop has already protected: it crosses as it is."""
    masked: torch.Tensor | tuple[torch.Tensor, torch.Tensor]
    secret: object


def linear_kind(weight: str) -> str:
    """The op kind the JSON files a layer's linear under."""
    return "linear_attn" if weight.endswith((".qkv", ".o")) else "linear_mlp"


def layer_hops(x: torch.Tensor, attn_norm: RmsNorm, mlp_norm: RmsNorm, layer: str = "0."
               ) -> tuple[tuple[str, Callable, tuple, str], ...]:
    """The three hops of a layer that a fused hop makes one call (`SplitLlama.fused_hop`), as (the linear
    before, the op, its arguments after the answer, the linear after), with x the residual stream: o's answer
    to the MLP norm to gate/up, gate/up's to SiLU·up to down, and down's to the next layer's norm to q/k/v."""
    return ((f"{layer}o", sum_and_norm, (x, mlp_norm.scaled, mlp_norm.eps_d), f"{layer}gate_up"),
            (f"{layer}gate_up", gated, (), f"{layer}down"),
            (f"{layer}down", sum_and_norm, (x, attn_norm.scaled, attn_norm.eps_d), f"{layer}qkv"))


class SplitLlama:
    """A LLaMA prefill split between the TEE and the GPU under a protection scheme."""

    def __init__(self, config: LlamaConfig, state_dict: dict[str, torch.Tensor], scheme: Plain,
                 gpu_device: torch.device, dtype: torch.dtype, tee_only: bool = False, pinned: bool | None = None,
                 triangle: bool = True, block_rows: int | None = None, overlap: bool = False,
                 resident_embedding: bool = False, compiled: bool = False, choose_kernels: bool = True,
                 attention: str | None = None, fuse_hops: bool | str = False, cuda_graphs: bool | str = False,
                 kept_buffers: bool = True, copy_streams: int = 1, native_kernels: bool = True, cpp: bool = False):
        """`pinned` and `triangle` (the scores' causal block triangle) exist to be switched off for ablations;
        `block_rows` sets the triangle's least rows per block (tee_ops.ROWS unless given), to compare sizes.
        `overlap` makes the plain split's two largest hops (scores -> softmax -> probabilities, gate/up ->
        SiLU -> down's input) cross in parts, each part's copies running while the TEE works on another
        (`through_tee`); masked schemes, whose protect and recover steps need whole tensors, ignore it.
        `resident_embedding` makes a masked scheme with a tied LM head keep its own copy of the embedding
        table in the TEE instead of reading the GPU's at every inference (`streamed_embedding`).
        `compiled` runs the TEE's fused kernels compiled (`kernels`; `warm_kernels` builds them in set-up),
        each eager at the shapes where set-up measured that faster, unless not `choose_kernels`. `cpp`, with eager
        kernels (not `compiled`), makes `native`'s C++ kernels forms of their steps too, picked per shape in set-up as
        they are beside compiled kernels (`kernels.CPP`), with no compile but their one build per machine.
        `fuse_hops` makes each of a masked scheme's TEE hops one call: between two linears (`fused_hop`),
        recovering the answer, the residual add and RMSNorm or SiLU·up, and protecting the next linear's input;
        from the qkv projection to the scores (`rope_hop`), recovering it, RoPE, and protecting q and kᵀ; between
        the two attention matmuls (`softmax_hop`), recovering the scores, their softmax and protecting P·V's
        operands; from P·V to the o projection (`attend_hop`), recovering it and protecting o's input. Six hops a
        layer, each one call (one compiled kernel or C++ call where set-up measured that faster) where it made two
        or three; the call is timed as crypto, so that category then holds those RMSNorms, SiLUs, RoPEs and
        softmaxes too.
        `cuda_graphs` replays each of the GPU's calls from a CUDA graph (`splitinfer.graphs`), captured in set-up
        (`warm_device`): one launch where a linear makes several host calls, and an attention matmul more. Only
        on CUDA (elsewhere it warns and does nothing); set-up kept them for every runner on the H100 machine of the
        twenty-sixth round (tee_gpu/ROUNDS.md). Both are off here by
        default; the runners leave both to set-up (tee_gpu/config.py). Either may be AUTO: off until
        `choose_configuration` times each way in set-up and keeps the faster; graphs only on CUDA, fused hops only
        for a masked scheme with compiled kernels or with the C++ ones (`cpp`: both schemes' hops between two linears
        have C++ forms; without them a fused hop is its steps' eager ops in one Python call, and whether it pays is
        noise; elsewhere AUTO is off, untimed).
        `kept_buffers` off gives the plain split a fresh pinned buffer for every copy instead of buffers kept from
        hop to hop (`Boundary.kept_buffer`), to measure what keeping them saves. Masked schemes keep none: ours'
        host peak at 512 tokens was 22 MiB under its limit on the H100 machine (twenty-sixth round), and a buffer
        kept per hop holds more than the pinned cache's blocks, which hops of one size share.
        `copy_streams` above one cuts each copy to the GPU of a MiB or more into as many slices, each on a stream of
        its own (`Boundary._in_slices`), to measure whether that speeds the copies of what the TEE has just written.
        `native_kernels` off runs no step in `native`'s C++ kernels, whatever set-up picked (`native.left_out`), to
        measure what they save.
        `attention` pins the TEE-only runner's form of attention (one of ATTENTION_FORMS); unset, set-up times
        each on this CPU and keeps the fastest (`choose_attention`). Split engines have none: their scores cross."""
        if attention not in (None, *ATTENTION_FORMS):
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_FORMS)}, not {attention!r}")
        self.config, self.scheme, self.dtype, self.triangle, self.block_rows = config, scheme, dtype, triangle, block_rows
        self.resident_embedding = resident_embedding
        self.allocator = keep_freed_memory()
        self.compiled, self.choose_kernels, self.native_kernels = compiled, choose_kernels, native_kernels
        self.cpp = cpp and not compiled
        # the mode in force (`kernels.select`), set by `warm_kernels` or an inference: not here, so that the
        # compiler's first start in the process counts as building the kernels
        self.kernels: str | None = None
        self.tee_device = torch.device("cpu")
        self.metrics = Metrics(gpu_device)
        self.link = Boundary(gpu_device, self.tee_device, self.metrics, crossing=not tee_only, pinned=pinned,
                             copy_streams=copy_streams)
        self.link.keep = kept_buffers
        scheme.pinned_buffer = self.link.pinned_buffer  # protected operands are written where the GPU reads them
        self.gpu = Gpu(gpu_device, self.metrics, in_tee=tee_only)
        # the options left to set-up (`choose_configuration`), where they can pay; off until then
        applicable = (("cuda_graphs", cuda_graphs, gpu_device.type == "cuda"),
                      ("fuse_hops", fuse_hops, scheme.masked and (compiled or self.cpp)))
        self.auto = {name for name, value, applies in applicable if value == AUTO and applies and not tee_only}
        # what set-up's choice found: each way's median ms, the one kept, and any left out for its logits
        self.configuration: dict = {}
        self.graphs_held: CallGraphs | None = None  # graphs made for `choose_configuration` to try
        graphs = self._graphs(cuda_graphs is True and not tee_only, gpu_device)
        if graphs is not None:
            self.use_graphs(graphs)
        elif "cuda_graphs" in self.auto:
            self.graphs_held = CallGraphs(gpu_device)
        self.overlap = overlap and not tee_only and not scheme.masked
        self.fuse_hops = fuse_hops is True and scheme.masked
        self.attention_pinned = attention is not None
        self.attention_form = (attention or ONE_BLOCK) if tee_only else None  # ONE_BLOCK until `choose_attention`
        self.attention_ms: dict[str, float] = {}  # what each form took in `choose_attention`, ms per layer
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.scale = self.head_dim ** -0.5
        self.eps = config.rms_norm_eps
        self.rotary = Rotary(config)
        self.last_bias: tuple[torch.Tensor, torch.Tensor] | None = None  # (attention mask, its bias): `attention_bias`
        self._place_weights(state_dict)

    @staticmethod
    def _graphs(wanted: bool, device: torch.device) -> CallGraphs | None:
        if wanted and device.type != "cuda":
            print(f"warning: CUDA graphs need a CUDA device, not {device}: the GPU's calls run as they are",
                  file=sys.stderr)
        return CallGraphs(device) if wanted and device.type == "cuda" else None

    def use_graphs(self, graphs: CallGraphs | None) -> None:
        """Replay the GPU's calls from `graphs`, into whose landings the copies to the GPU go (None: no graphs)."""
        self.gpu.graphs, self.link.landing = graphs, None if graphs is None else graphs.landing

    @property
    def cuda_graphs(self) -> bool:
        """Whether the GPU's calls are replayed from graphs."""
        return self.gpu.graphs is not None

    @property
    def cuda_graphs_captured(self) -> int:
        """How many GPU calls have a graph (0 without graphs)."""
        return self.gpu.graphs.captured if self.cuda_graphs else 0

    def _place_weights(self, sd: dict[str, torch.Tensor]) -> None:
        def tee(name: str) -> torch.Tensor:
            return sd[name].to(self.tee_device, self.dtype)

        def norm(name: str) -> RmsNorm:
            return RmsNorm.of(tee(name), self.eps)

        tied = self.config.tie_word_embeddings or "lm_head.weight" not in sd
        self.sources: dict[str, list[str]] = {}  # GPU weight -> the transformers modules fused into it
        self.layers: list[TeeLayer] = []
        for i in range(self.config.num_hidden_layers):
            p = f"model.layers.{i}."
            self.sources[f"{i}.qkv"] = [p + f"self_attn.{x}_proj" for x in "qkv"]
            self.sources[f"{i}.o"] = [p + "self_attn.o_proj"]
            self.sources[f"{i}.gate_up"] = [p + "mlp.gate_proj", p + "mlp.up_proj"]
            self.sources[f"{i}.down"] = [p + "mlp.down_proj"]
            self.layers.append(TeeLayer(norm(p + "input_layernorm.weight"), norm(p + "post_attention_layernorm.weight")))
        self.sources["lm_head"] = ["model.embed_tokens" if tied else "lm_head"]
        self.final_norm = norm("model.norm.weight")

        def scaled(module: str, part: str) -> torch.Tensor:
            # q's projection carries the scores' 1/sqrt(head_dim) (RoPE is linear, so it commutes), so that
            # q and k share one RoPE op and one crossing and no pass over the n² scores scales them
            t = sd[f"{module}.{part}"]
            return (t.float() * self.scale).to(t.dtype) if module.endswith(SCALED_PROJECTION) else t

        self.tee_biases: dict[str, torch.Tensor] = {}
        for name, modules in self.sources.items():
            biases = [scaled(m, "bias") for m in modules if m + ".bias" in sd] or None
            # masked schemes add the bias in the TEE after recovery: the GPU's product is still masked
            self.gpu.upload(name, [scaled(m, "weight") for m in modules], None if self.scheme.masked else biases,
                            self.dtype)
            if self.scheme.masked and biases:
                self.tee_biases[name] = torch.cat([b.to(self.tee_device, self.dtype) for b in biases])
        # token ids are private, so a masked scheme looks them up in the TEE: in its own table, unless the
        # table is the tied LM head's weight, already on the GPU (then `streamed_embedding`)
        self.embed_table = None
        if self.scheme.masked:
            if self.resident_embedding or not tied:
                self.embed_table = tee("model.embed_tokens.weight")
        elif tied:
            self.gpu.weights["embed"] = self.gpu.weights["lm_head"]
        else:
            self.gpu.upload("embed", [sd["model.embed_tokens.weight"]], None, self.dtype)
        self.split_sizes = {name: [sd[m + ".weight"].shape[0] for m in modules] for name, modules in self.sources.items()}
        self.tied = tied

    def weight_for_tee(self, name: str) -> torch.Tensor:
        """A linear's weight for an offline step in the TEE (otp multiplies its pads by it), where it lives:
        the step fetches it from the GPU a block of rows at a time (`schemes._float32_product`). Weights are
        public, so they may cross, and the TEE never holds a copy of one whole (the 1B shape's tied LM head is
        501 MiB in float16). A tied LM head may be the TEE's own embedding table."""
        if name == "lm_head" and self.tied and self.embed_table is not None:
            return self.embed_table
        weight = self.gpu.weights[name]
        if weight.device != self.tee_device:
            self.offline_fetched_bytes += weight.numel() * weight.element_size()
        return weight

    def norms(self) -> list[RmsNorm]:
        return [n for layer in self.layers for n in (layer.attn_norm, layer.mlp_norm)] + [self.final_norm]

    def tee_weight_bytes(self) -> int:
        """Bytes of model weights the TEE holds: the norms, and under a masked scheme the biases and an
        untied (or resident) embedding table. Never a linear weight: those live on the GPU alone."""
        held = [t for n in self.norms() for t in (n.weight, n.scaled)]
        held += [*self.tee_biases.values()] + ([] if self.embed_table is None else [self.embed_table])
        return sum(t.numel() * t.element_size() for t in held)

    @torch.no_grad()
    def warm_kernels(self, batch: int, n: int) -> float:
        """Build the compiled TEE kernels for one inference of `batch` sequences of n tokens, by running each
        on zeros of the shapes (and outputs) the inference gives it: set-up, so that the inference compiles
        nothing; each is timed against its eager form there, and the faster kept for that shape
        (`kernels.choosing`). With `cpp`, no kernel is compiled: each step with a C++ form is timed in its forms
        there, and the fastest kept for that shape (the C++ kernels' one build per machine included where it happens
        here). Returns the milliseconds it took, the compiler's first start in the process included where it happens
        here (0 with eager kernels alone)."""
        start = time.perf_counter()
        self.kernels = kernels.select(self.compiled, self.choose_kernels, self.cpp)
        if not (kernels.on() or kernels.picking() and self.choose_kernels):  # eager: nothing to build or pick
            return 0.0
        # each kernel also timed eager, at each shape, the faster kept there
        with kernels.choosing() if self.choose_kernels else NOTHING:
            self._run_kernels(batch, n)
        release_freed_memory()
        return (time.perf_counter() - start) * 1e3

    def _run_kernels(self, batch: int, n: int) -> None:
        """Each TEE kernel of an inference of `batch` sequences of n tokens once, on zeros (`warm_kernels`)."""
        # with outputs where the inference puts them (pinned, where they go straight to the GPU)
        h = torch.zeros(batch, n, self.config.hidden_size, dtype=self.dtype)
        self.layers[0].attn_norm.after(h, None, self.gpu_bound(h.shape))
        self.layers[0].attn_norm.after(h, torch.zeros_like(h), self.gpu_bound(h.shape))  # not h: an aliased pair
        self.final_norm.after(torch.zeros(batch, self.config.hidden_size, dtype=self.dtype),
                              torch.zeros(batch, self.config.hidden_size, dtype=self.dtype))
        inner = self.gpu.weights["0.down"].shape[1]
        act = self.gpu_bound((batch, n, inner))
        by_parts(lambda r, x, into: silu_gate(x, into), row_parts if self.overlap else whole,
                 torch.zeros(batch, n, 2 * inner, dtype=self.dtype),
                 torch.empty(batch, n, inner, dtype=self.dtype) if act is None else act)
        # RoPE's input laid out as the inference has it: where the TEE receives q and k, or recovers all of qkv
        qkv_width = self.gpu.weights["0.qkv"].shape[0]
        q_and_k = (self.heads(torch.zeros(batch, n, qkv_width, dtype=self.dtype))[0] if self.scheme.masked else
                   self.q_and_k_to_tee(torch.zeros(batch, n, self.qk_width, dtype=self.dtype, device=self.gpu.device)))
        self.rotate(q_and_k, self.rotary.tables(n, self.dtype))
        linears = self.mask_shapes(batch, n)[0]
        softmax_of = self.softmax_of()
        blocks = self.causal_blocks(batch, n)
        if not softmax_of:
            blocks.softmax(torch.zeros(blocks.shape, dtype=self.dtype), torch.zeros(batch, 1, n, n, dtype=self.dtype),
                           self.gpu_bound(blocks.shape))
        # the softmax hop's, where fused: the blocks, a bias and an attention mask of the inference's shapes
        fused = self.fuse_hops or "fuse_hops" in self.auto  # set-up may choose them: their kernels too
        attention = ((blocks, torch.zeros(batch, 1, n, n, dtype=self.dtype), torch.ones(batch, n, dtype=torch.long))
                     if fused else None)
        self.scheme.warm_kernels(linears, self.matmul_operands(batch, n),
                                 {name: self.gpu.weights[name].shape[0] for name in linears}, self.dtype, softmax_of,
                                 self.hops_on_zeros(batch, n) if fused else (),
                                 {"0.scores": blocks.scores, "0.attend": blocks.attend}, attention)
        if softmax_of:
            groups, positions = self.n_kv_heads, torch.int32
            softmax_in_order(torch.zeros(batch, self.n_heads, n, n, dtype=self.dtype),
                             torch.zeros(batch, groups, self.n_heads // groups, n, dtype=positions),
                             torch.zeros(batch, groups, n, dtype=positions), torch.ones(batch, n, dtype=torch.long))

    def hops_on_zeros(self, batch: int, n: int) -> tuple:
        """The fused hops of a layer that leave a linear, as `Plain.warm_kernels` takes them: (the linear before, its
        bias, the op, its arguments on zeros, the linear or matmul after): the three between two linears and the
        one from the qkv projection to the scores (`rope_hop`)."""
        x, layer = torch.zeros(batch, n, self.config.hidden_size, dtype=self.dtype), self.layers[0]
        rope = self.rope_args(tuple(torch.zeros(n, self.head_dim, dtype=self.dtype) for _ in range(2)), batch)
        return tuple((source, self.tee_biases.get(source), op, args, target)
                     for source, op, args, target in (*layer_hops(x, layer.attn_norm, layer.mlp_norm),
                                                      ("0.qkv", rotated_heads, rope, "0.scores")))

    @torch.no_grad()
    def warm_device(self, batch: int, n: int) -> float:
        """Device set-up for inferences of `batch` sequences of n tokens: each GPU op once, on zeros of one
        layer's shapes (the layers share them), so that the GPU loads its kernels and picks its matrix
        product algorithms, and the causal blocks' gather index is built (where `pack` gathers), before the
        first inference; the rotary tables of n tokens and an unpadded batch's attention bias made (both kept);
        and where a masked scheme streams the tied table, the whole table once, so that the pinned host memory
        its two blocks in flight land in is allocated; with `cuda_graphs`, one whole inference (its offline phase
        included), which captures every GPU call's graph. Nothing of it is counted in an inference. Returns the milliseconds it
        took. (On the H100 machine the first inference's GPU work took 72 ms, against 7 warm: eighth round,
        plain split, 128 tokens.) The TEE-only runner's attention form is chosen here too."""
        start = time.perf_counter()
        self.choose_attention(batch, n)
        self.rotary.tables(n, self.dtype)  # kept for the length: a function of it alone
        self.attention_bias(torch.ones(batch, n, dtype=torch.long))  # an unpadded batch's, kept until a mask differs
        device, weights = self.gpu.device, self.gpu.weights

        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, device=device, dtype=self.dtype)

        head_rows = max(batch, self.scheme.least_rows)  # the LM head's: one per sequence, unless the scheme pads
        for name in {tuple(w.shape): name for name, w in weights.items() if name != "embed"}.values():
            F.linear(zeros(*((head_rows,) if name == "lm_head" else (batch, n)), weights[name].shape[1]),
                     weights[name], self.gpu.biases[name])
        self.gpu.choose_head(head_rows)
        if "embed" in weights:
            F.embedding(torch.zeros(batch, n, dtype=torch.long, device=device), weights["embed"])
        blocks, kv_heads = self.causal_blocks(batch, n), self.n_kv_heads
        probs = blocks.scores(zeros(batch, self.n_heads, n, self.head_dim), zeros(batch, kv_heads, self.head_dim, n))
        blocks.attend(probs, zeros(batch, kv_heads, n, self.head_dim))
        if self.scheme.masked and self.embed_table is None:  # the pinned memory `streamed_embedding`'s blocks land in
            self.streamed_embedding(torch.zeros(batch, n, dtype=torch.long))
        if self.cuda_graphs:  # every GPU call's graph, captured by one inference here rather than in a timed one
            ids = torch.zeros(batch, n, dtype=torch.long)
            self.timed_forward(ids, torch.ones_like(ids), instrumented=False)
        synchronize(device)
        return (time.perf_counter() - start) * 1e3

    @torch.no_grad()
    def choose_configuration(self, batch: int, n: int, repeat: int = 3) -> float:
        """Set-up, after `warm_device`: where `cuda_graphs` or `fuse_hops` was left to it (AUTO), each way (each
        combination, where both were) timed on this machine, the fastest kept, as the TEE's kernels and the LM
        head's form are. Which pays depends on the host: what a GPU call costs it, and a TEE call, against what
        a graph's replay and a fused hop's one kernel cost there. Each way runs once untimed (a graph is captured
        at its call's first run), then `repeat` rounds time each in turn (uninstrumented totals, so that a drift
        in the host's speed falls on all alike); their median decides. The inferences take zeros for ids, never
        the prompt, and share one offline phase, the first way's: no mask drawn here serves a timed inference. A
        way whose logits differ from the first's (neither option) by more than SAME_FUNCTION is left out, with a
        warning: it would not compute the same function; so is one that fails (a graph's capture, say), with its
        error. Returns the milliseconds it took; `configuration` holds what it found."""
        options = [name for name in CHOSEN_OPTIONS if name in self.auto]
        if not options:
            return 0.0
        start = time.perf_counter()
        ways = {"+".join(name for name in options if on[name]) or "neither": on
                for on in (dict(zip(options, values)) for values in itertools.product((False, True), repeat=len(options)))}
        ids = torch.zeros(batch, n, dtype=torch.long)
        mask = torch.ones_like(ids)
        logits, left_out = {}, {}
        for name, way in ways.items():
            self._configure(way)
            try:  # the first way ("neither") draws the masks every way shares
                logits[name] = self.timed_forward(ids, mask, instrumented=False, offline=not logits)[0].clone()
            except RuntimeError as e:
                if name == "neither":  # the engine itself fails: nothing to choose
                    raise
                left_out[name] = str(e).splitlines()[0]
        first = logits["neither"]
        left_out.update({name: diff for name, diff in ((name, compare(out, first)["rel_logit_error"])
                                                       for name, out in logits.items()) if not diff <= SAME_FUNCTION})
        for name, why in left_out.items():
            print(f"warning: set-up left out {name}: " + (f"it failed ({why})" if isinstance(why, str) else
                  f"its logits differ from the engine's without it by {why:.3g}"), file=sys.stderr)
        timed = {name: way for name, way in ways.items() if name not in left_out}
        runs = {name: [] for name in timed}
        for _ in range(repeat):
            for name, way in timed.items():
                self._configure(way)
                runs[name].append(self.timed_forward(ids, mask, instrumented=False, offline=False)[1]["total_ms"])
        medians = {name: statistics.median(ms) for name, ms in runs.items()}
        kept = min(medians, key=medians.get)
        self._configure(ways[kept])
        if not self.cuda_graphs:  # graphs not kept: their memory goes
            self.graphs_held = None
        self.configuration = {"options": options, "median_ms": medians, "kept": kept, "left_out": left_out,
                              "repeat": repeat}
        return (time.perf_counter() - start) * 1e3

    def _configure(self, way: dict[str, bool]) -> None:
        """Set the options `way` names (`choose_configuration`)."""
        if "cuda_graphs" in way:
            self.use_graphs(self.graphs_held if way["cuda_graphs"] else None)
        self.fuse_hops = way.get("fuse_hops", self.fuse_hops)

    def causal_blocks(self, batch: int, n: int, attention_mask: torch.Tensor | None = None) -> CausalBlocks:
        """How the attention scores are laid out: the lower block triangle where it cuts what crosses and
        the scheme's masks keep that structure (`ours` permutes rows and keys, so it needs every entry).
        With nothing crossing, the TEE-only runner's form (`choose_attention`)."""
        if self.link.crossing:
            split = self.triangle and self.scheme.causal_blocks
        else:
            split = self.attention_form == CAUSAL_BLOCKS
        padded = attention_mask is None or not bool(attention_mask.all())
        return CausalBlocks.of(batch, self.n_heads, n, split=split, padded=padded, rows=self.block_rows)

    @torch.no_grad()
    def choose_attention(self, batch: int, n: int, repeat: int = 3) -> None:
        """The TEE-only runner's attention form, unless pinned: each of ATTENTION_FORMS timed on one layer's
        shapes (random q, k and v, an unpadded batch; `kernels.timed`'s median of `repeat` after three
        untimed calls, back to back as in a layer), the fastest kept, the times in `attention_ms`. The
        TEE-only baseline should be as fast as this CPU allows, and which form is depends on the CPU. On
        the 2-core VM (1B shape, 512 tokens) one block, the causal blocks and the fused op took 6.0-6.4,
        5.8-6.3 and 14.4 ms per layer in bfloat16, and 15.5-15.7, 12.0-12.1 and 13.7 in float32. On the
        H100 machine the TEE-only runner took 300.9 ms at 512 tokens in bfloat16 with the causal blocks
        (fifth round) and 397.7 with one block (eighth), while transformers' own forward, with the fused
        op, took 321.8 and 295.5. A form that fails is left out."""
        if self.link.crossing or self.attention_pinned:
            return
        heads, groups, h = self.n_heads, self.n_kv_heads, self.head_dim
        q = (torch.randn(batch, heads, n, h) * self.scale).to(self.dtype)
        k, v = (torch.randn(batch, groups, n, h).to(self.dtype) for _ in range(2))
        mask = torch.ones(batch, n, dtype=torch.long)
        bias = attention_bias(mask, self.dtype)
        self.attention_ms = {}
        for form in ATTENTION_FORMS:
            self.attention_form = form
            blocks = self.causal_blocks(batch, n, mask)

            def attend(blocks: CausalBlocks = blocks) -> torch.Tensor:  # as `plain_attention` runs it, untimed
                if self.attention_form == FUSED:
                    return fused_attention(q, k, v, None)
                return blocks.attend(blocks.softmax(blocks.scores(q, k.transpose(-1, -2)), bias), v)

            try:
                self.attention_ms[form] = kernels.timed(lambda _: attend(), repeat=repeat, wait_s=0.0)
            except RuntimeError as e:  # an op this torch does not have for this dtype on this CPU
                print(f"warning: the TEE-only attention form {form} failed ({str(e).splitlines()[0]})", file=sys.stderr)
        self.attention_form = min(self.attention_ms, key=self.attention_ms.get)

    def softmax_of(self) -> dict[str, str]:
        """Each layer's P·V matmul -> its scores matmul, whose product's row softmax is P·V's left operand, for
        a scheme that may then leave the scores in its masks' order (`Plain.scores_order`): two gathers over
        the n² scores fewer per layer. Only with compiled kernels or the C++ ones (whose softmax hop takes the scores
        in that order in one pass): eager, hiding the keys in that order costs more than the gathers
        (`tee_ops._hide_later_keys`)."""
        if not (self.scheme.keeps_scores_order and self.kernels in (kernels.COMPILED, kernels.CPP)):
            return {}
        return {f"{i}.attend": f"{i}.scores" for i in range(len(self.layers))}

    def mask_shapes(self, batch: int, n: int) -> tuple[dict, dict]:
        """The input shape of every linear and matmul of one inference, keyed as the hops name them."""
        h, heads, kv_heads = self.head_dim, self.n_heads, self.n_kv_heads
        linears = {name: (batch, n, self.gpu.weights[name].shape[1]) for name in self.sources if name != "lm_head"}
        linears["lm_head"] = (batch, self.gpu.weights["lm_head"].shape[1])
        matmuls, probs = {}, self.causal_blocks(batch, n).shape
        for i in range(len(self.layers)):
            matmuls[f"{i}.scores"] = ((batch, heads, n, h), (batch, kv_heads, h, n))
            matmuls[f"{i}.attend"] = (probs, (batch, kv_heads, n, h))
        return linears, matmuls

    def matmul_operands(self, batch: int, n: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Zeros laid out as a masked scheme's inference hands one layer's two matmuls their operands
        (`attention_operands`), keyed as the hops name them: a compiled kernel is built for its inputs'
        strides as well as their shapes (`_run_kernels`)."""
        q, k_t, v = attention_operands(batch, n, self.n_heads, self.n_kv_heads, self.head_dim, self.dtype)
        probs = torch.zeros(self.causal_blocks(batch, n).shape, dtype=self.dtype)
        return {"0.scores": (q, k_t), "0.attend": (probs, v)}

    def minimum_crossing_bytes(self, batch: int, n: int) -> tuple[int, int]:
        """(to GPU, to TEE) bytes that this op placement cannot do without in one inference.

        tee_gpu/README.md derives them: per layer, every linear input and output crosses once and each
        attention matmul ships its operands and product, except that the plain split keeps v, P·V and
        the o-projection input on the GPU; of the scores and probabilities, only the causal triangle,
        unless the scheme's masks need every entry; plus the embedding (plain: the ids and their rows;
        masked with a streamed table: the whole table) and the LM head rows."""
        size = torch.finfo(self.dtype).bits // 8
        d, inner = self.config.hidden_size, self.gpu.weights["0.down"].shape[1]
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        tokens = batch * n
        scores = batch * self.n_heads * (n * (n + 1) // 2 if self.scheme.causal_blocks else n * n)
        if self.scheme.masked:
            to_gpu = tokens * (2 * d + 2 * q + 2 * kv + inner) + scores
            to_tee = tokens * (2 * q + 2 * kv + 2 * d + 2 * inner) + scores
            embed_to_gpu = 0  # the table crosses whole where it is streamed (`streamed_embedding`)
            embed_to_tee = 0 if self.embed_table is not None else size * self.gpu.weights["lm_head"].numel()
        else:
            to_gpu = tokens * (2 * d + q + kv + inner) + scores
            to_tee = tokens * (q + kv + 2 * d + 2 * inner) + scores
            embed_to_gpu, embed_to_tee = 8 * tokens, size * tokens * d  # int64 ids, hidden states
        layers = len(self.layers)
        lm_head = self.gpu.weights["lm_head"]
        return (layers * to_gpu * size + embed_to_gpu + size * batch * lm_head.shape[1],
                layers * to_tee * size + embed_to_tee + size * batch * lm_head.shape[0])

    # ---- the hops: every crossing of the TEE/GPU boundary goes through one of these ----

    def linear(self, x: torch.Tensor | Protected, weight: str, kind: str, layer: int | None = None,
               defer: bool = False) -> torch.Tensor | Answer:
        """TEE -> GPU -> TEE: y = x Wᵀ (+ b) computed on the GPU on a protected x (protected already where a
        fused hop made it). With `defer` and fused hops, the answer stays masked, for the hop after it."""
        masked, secret = ((x.masked, x.secret) if isinstance(x, Protected) else
                          self.crypto(0, kind, self.scheme.protect_linear, x, weight))
        z = self.link.to_tee(self.gpu.linear(self.link.to_gpu(masked, kind, layer), weight, kind), kind)
        return Answer(z, secret, weight, kind) if defer and self.fuse_hops else self.recover(z, secret, weight, kind)

    def recover(self, z: torch.Tensor, secret: object, weight: str, kind: str) -> torch.Tensor:
        """Linear `weight`'s answer z recovered, with its bias added in the TEE where it has one."""
        y = self.crypto(1, kind, self.scheme.recover_linear, z, secret)
        bias = self.tee_biases.get(weight)
        return y if bias is None else self.tee("bias", torch.add, y, bias)

    def received(self, y: torch.Tensor | Answer) -> torch.Tensor:
        """An answer left masked (`Answer`), recovered; a tensor as it is."""
        return self.recover(y.z, y.secret, y.weight, y.kind) if isinstance(y, Answer) else y

    def fused_hop(self, op: str, fn: Callable, answer: Answer, args: tuple, weight: str
                  ) -> tuple[torch.Tensor | None, Protected]:
        """TEE, in one call (`Plain.hop`): the answer's recovery (and bias), the TEE op `op` (`fn`:
        `tee_ops.sum_and_norm`, `tee_ops.gated`) on it, and the protect step of linear `weight` on the op's
        result. Returns (what the op keeps: the residual sum, or None; the protected input). Timed as crypto
        under both steps' names and the op's, and counted as each of them."""
        bias = self.tee_biases.get(answer.weight)
        kept, masked, secret = self.in_one_call(op, answer.kind, linear_kind(weight), self.scheme.hop, answer.z,
                                                answer.secret, bias, fn, args, weight,
                                                counts=("cpu_bias",) if bias is not None else ())
        return kept, Protected(masked, secret)

    def rope_hop(self, qkv: Answer, rope: tuple[torch.Tensor, torch.Tensor], batch: int, name: str
                 ) -> tuple[torch.Tensor, Protected]:
        """TEE, in one call (`Plain.rope_hop`): the qkv projection's recovery (and bias), RoPE on q and k, and the
        protect step of the scores' matmul `name` on q and kᵀ, for `batch` sequences. Returns (v, q and kᵀ
        protected). Timed and counted as `fused_hop`'s are."""
        bias = self.tee_biases.get(qkv.weight)
        v, a, b, secret = self.in_one_call("rotary", qkv.kind, "matmul", self.scheme.rope_hop, qkv.z, qkv.secret, bias,
                                           rotated_heads, self.rope_args(rope, batch), name,
                                           counts=("cpu_bias",) if bias is not None else ())
        return v, Protected((a, b), secret)

    def rope_args(self, rope: tuple[torch.Tensor, torch.Tensor], batch: int) -> tuple:
        """`tee_ops.rotated_heads`' arguments after the qkv projection's output, for `batch` sequences of as many
        tokens as the tables `rope` have rows: where RoPE writes q and k, as `rotate` writes them (fresh at each
        call: otp's recovery of the scores reads q)."""
        shape = (batch, self.n_heads + self.n_kv_heads, rope[0].shape[0], self.head_dim)
        return *rope, self.n_heads, torch.empty(shape, dtype=self.dtype)

    def softmax_hop(self, scores: Answer, v: torch.Tensor, name: str, blocks: CausalBlocks, bias: torch.Tensor,
                    attention_mask: torch.Tensor) -> Protected:
        """TEE, in one call (`Plain.softmax_hop`): the scores' recovery, their masked softmax, and the protect
        step of P·V (matmul `name`) on the probabilities and v. Timed and counted as `fused_hop`'s are."""
        a, b, secret = self.in_one_call("softmax", "matmul", "matmul", self.scheme.softmax_hop, scores.z,
                                        scores.secret, v, name, blocks, bias, attention_mask)
        return Protected((a, b), secret)

    def attend_hop(self, out: Answer, product: Product, weight: str) -> Protected:
        """TEE, in one call (`Plain.attend_hop`): P·V's recovery (computed in the form `product`), its heads merged,
        and the protect step of linear `weight` (o) on them. Timed and counted as `fused_hop`'s are; merging the
        heads is no TEE op of its own."""
        _, masked, secret = self.in_one_call(None, out.kind, linear_kind(weight), self.scheme.attend_hop, out.z,
                                             out.secret, product, merged, (), weight)
        return Protected(masked, secret)

    def in_one_call(self, op: str | None, before: str, after: str, fn: Callable, *args, counts: tuple[str, ...] = ()):
        """A fused hop's one TEE call fn(*args): timed as crypto under the recover step of op kind `before`, the
        TEE op `op` (where there is one) and the protect step of kind `after`, and counted as each of them (and
        `counts`)."""
        recover, protect = self.scheme.steps[1], self.scheme.steps[0]
        label = "+".join([f"{recover}_{before}", *([op] if op else []), f"{protect}_{after}"])
        with self.metrics.time("crypto", label):
            result = fn(*args)
        self.metrics.count(recover, *([f"cpu_{op}"] if op else []), protect, *counts)
        return result

    def matmul(self, a: torch.Tensor | Protected, b: torch.Tensor | None, name: str, layer: int, product: Product,
               defer: bool = False) -> torch.Tensor | Answer:
        """TEE -> GPU -> TEE: a @ b with both operands private, broadcast over GQA groups on the GPU, in the
        form `product` gives (a CausalBlocks step); `a` may hold both operands protected already (a fused hop
        made them; b is then not read). With `defer` and fused hops, the answer stays masked, for the hop after it."""
        if isinstance(a, Protected):
            (a_masked, b_masked), secret = a.masked, a.secret
        else:
            a_masked, b_masked, secret = self.crypto(0, "matmul", self.scheme.protect_matmul, a, b, name)
        a_gpu = self.link.to_gpu(a_masked, "matmul", layer)
        b_gpu = self.link.to_gpu(b_masked, "matmul", layer)
        c = self.link.to_tee(self.gpu.matmul(a_gpu, b_gpu, name, product), "matmul")
        if defer and self.fuse_hops:
            return Answer(c, secret, name, "matmul")
        return self.crypto(1, "matmul", self.scheme.recover_matmul, c, secret, product)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> hidden states: in the TEE under a masked scheme (from its own table, or from the GPU's
        read whole), else on the GPU (the ids cross)."""
        if self.embed_table is not None:
            return self.tee("embedding", F.embedding, ids, self.embed_table)
        if self.scheme.masked:
            return self.streamed_embedding(ids)
        return self.link.to_tee(self.gpu.embed(self.link.to_gpu(ids, "embedding")), "embedding")

    def streamed_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> hidden states in the TEE from the GPU's table (the tied LM head), which crosses
        whole, a block of rows at a time: the GPU sees every row read whatever the ids, and the TEE keeps two
        blocks at most, the one it reads and the next one crossing, and the rows its ids name (not a copy of the
        GPU's weight: see tee_gpu/README.md)."""
        table = self.gpu.weights["lm_head"]
        rows = table_block_rows(table)
        flat = ids.reshape(-1)
        order = torch.argsort(flat)
        ordered = flat[order]
        if flat.numel() and not 0 <= int(ordered[0]) <= int(ordered[-1]) < table.shape[0]:  # else rows stay unwritten
            raise IndexError(f"token ids {int(ordered[0])}..{int(ordered[-1])} reach outside the vocabulary "
                             f"(0..{table.shape[0] - 1})")
        ends = torch.searchsorted(ordered, torch.arange(0, table.shape[0] + rows, rows)).tolist()
        out = torch.empty(flat.shape[0], table.shape[1], dtype=self.dtype)

        def take(block: torch.Tensor, start: int, hits: slice) -> None:  # the rows of the ids `hits` picks
            out.index_copy_(0, order[hits], block[ordered[hits] - start])

        def fetch(start: int) -> tuple[torch.Tensor, torch.cuda.Event | None] | None:  # a block's copy, queued
            if start >= table.shape[0]:
                return None
            block, (arrival,) = self.link.to_tee_in_parts(table[start: start + rows], whole, "embedding")
            return block, arrival

        stream = torch.cuda.current_stream(table.device) if table.is_cuda else None
        with self.metrics.overlapped("embedding", stream):  # the TEE takes one block's rows while the next crosses
            pending = fetch(0)
            for b, start in enumerate(range(0, table.shape[0], rows)):
                # two blocks held at most: rebinding `block` lets the last one go before the next is fetched, whose
                # copy may then land in its pinned memory
                block, arrival = pending
                pending = fetch(start + rows)  # queued behind this block's copy: the copy engine never waits
                self.link.wait(arrival)
                self.tee("embedding", take, block, start, slice(ends[b], ends[b + 1]), count=b == 0)
        return out.view(*ids.shape, -1)

    def crypto(self, step: int, kind: str, fn, *args):
        """A scheme's protect (step 0) or recover (step 1), timed as crypto; the plain scheme has none."""
        if not self.scheme.masked:
            return fn(*args)
        name = self.scheme.steps[step]
        with self.metrics.time("crypto", f"{name}_{kind}", name):
            return fn(*args)

    def tee(self, op: str, fn, *args, count: bool = True) -> torch.Tensor:
        """Run a nonlinear op in the TEE, timed as CPU compute (and counted, unless it is a later part of one)."""
        with self.metrics.time("cpu_compute", op, f"cpu_{op}" if count else None):
            return fn(*args)

    def through_tee(self, op: str, kind: str, layer: int, x: torch.Tensor, out_shape: tuple[int, ...],
                    run: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], parts: Parts, step: Step
                    ) -> torch.Tensor:
        """GPU -> TEE -> GPU with no scheme step between (the plain split): the TEE op `op` is `run(x, into)`
        on the GPU's `x`, writing into a tensor of `out_shape`, which goes back to the GPU.

        With `overlap`, part by part, as `step(r, part, into)` over the parts `parts` cuts x and the result
        into: every part's copy to the TEE is queued at once, the TEE takes each as it arrives, and sends each
        result back on a stream of its own, so copies both ways run while the TEE works (on one stream the
        copies back would wait behind every copy in). Without, one copy each way, and `run` in between."""
        out = self.gpu_bound(out_shape)
        out = torch.empty(out_shape, dtype=x.dtype) if out is None else out
        if not self.overlap:
            host = self.link.to_tee(x, kind, kept=op)
            return self.link.to_gpu(self.tee(op, run, host, out), kind, layer)
        with self.metrics.overlapped(kind, self.link.copies_back):
            result = self.link.gpu_empty(out_shape, x.dtype)  # before the copies in, so as not to wait for them
            host, arrivals = self.link.to_tee_in_parts(x, parts, kind)
            for r, (arrival, part, into, target) in enumerate(zip(arrivals, parts(host), parts(out), parts(result))):
                self.link.wait(arrival)
                self.tee(op, step, r, part, into, count=r == 0)
                self.link.to_gpu_into(target, into, kind, layer)
            self.link.parts_arrived()
        return result

    # ---- the forward ----

    def timed_forward(self, ids: torch.Tensor, attention_mask: torch.Tensor, instrumented: bool = True,
                      offline: bool = True) -> tuple[torch.Tensor, dict]:
        """One inference with fresh counters: (logits, its figures). Not `instrumented`, only its total
        (`total_ms`) is measured: no region is timed, so none adds its timing's own cost. Not `offline`, a masked
        scheme reuses the last inference's masks: only for set-up's own inferences on ids of the same shape
        (`choose_configuration`), never for a prompt's."""
        self.metrics.reset()
        self.metrics.instrumented = instrumented
        # process-wide: another engine may have switched it
        self.kernels = kernels.select(self.compiled, self.choose_kernels, self.cpp)
        self.link.reset()
        mask_bytes, self.offline_fetched_bytes = 0, 0
        try:
            if self.scheme.masked and offline:  # the offline phase: every mask of this inference, before the prompt is seen
                with self.metrics.time("offline", "masks"):
                    mask_bytes = self.scheme.prepare(*self.mask_shapes(*ids.shape), self.weight_for_tee, self.dtype,
                                                     softmax_of=self.softmax_of())
            with self.metrics.total(), contextlib.nullcontext() if self.native_kernels else native.left_out():
                logits = self.forward(ids, attention_mask)
        finally:
            self.metrics.instrumented = True
        figures = self.metrics.snapshot()
        figures["instrumented"] = instrumented
        figures["data_transfer"] = self.link.summary()
        if self.link.crossing:
            to_gpu, to_tee = self.minimum_crossing_bytes(*ids.shape)
            moved = figures["data_transfer"]["to_gpu_bytes"] + figures["data_transfer"]["to_cpu_bytes"]
            figures["data_transfer"].update(minimum_to_gpu_bytes=to_gpu, minimum_to_cpu_bytes=to_tee,
                                            excess_over_minimum=moved / (to_gpu + to_tee) - 1)
        figures["offline_mask_bytes"] = mask_bytes
        figures["data_transfer"]["offline_weights_to_cpu_bytes"] = self.offline_fetched_bytes
        return logits, figures

    @torch.no_grad()
    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits [B, vocab] (float32) at the last real position of each (right-padded) sequence."""
        batch, n = ids.shape
        self.link.new_inference()
        x = self.embed(ids)
        rope = self.tee("rotary_tables", self.rotary.tables, n, self.dtype)
        bias = self.tee("attention_mask", self.attention_bias, attention_mask)
        blocks = self.causal_blocks(batch, n, attention_mask)
        branch = None  # each norm first adds the residual branch before it: one TEE op for both
        for i, layer in enumerate(self.layers):
            with self.metrics.in_layer(i):
                x, h = self.norm(layer.attn_norm, x, branch, f"{i}.qkv")
                x, h = self.norm(layer.mlp_norm, x, self.attention(h, i, rope, bias, blocks, attention_mask),
                                 f"{i}.gate_up")
                branch = self.mlp(h, i)
        last = torch.arange(batch), last_positions(attention_mask)  # only these rows reach the LM head
        _, h = self.tee("rmsnorm", self.final_norm.after, x[last], self.received(branch)[last])
        return self.linear(h, "lm_head", "lm_head").float()

    def attention_bias(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """`tee_ops.attention_bias` of the mask (read-only), made again only where the mask is not the last
        inference's: the bias is a function of the mask alone, and made at each inference it took 0.17-0.30 ms of
        it on the H100 machine (twenty-seventh round). The comparison is one pass over the mask's B x n entries."""
        last = self.last_bias
        if last is None or last[0].shape != attention_mask.shape or not torch.equal(last[0], attention_mask):
            self.last_bias = last = attention_mask.clone(), attention_bias(attention_mask, self.dtype)
        return last[1]

    def norm(self, norm: RmsNorm, x: torch.Tensor, branch: torch.Tensor | Answer | None, weight: str
             ) -> tuple[torch.Tensor, torch.Tensor | Protected]:
        """(x + branch, its RMSNorm): the residual add of the block before (none before the first) and the norm
        that makes linear `weight`'s input, as one TEE op; where the branch is an answer still masked, the fused
        hop that also recovers it and protects the norm (`fused_hop`)."""
        if isinstance(branch, Answer):
            return self.fused_hop("rmsnorm", sum_and_norm, branch, (x, norm.scaled, norm.eps_d), weight)
        return self.tee("rmsnorm", norm.after, x, branch, self.gpu_bound(x.shape))

    def silu(self, gate_up: torch.Tensor | Answer, weight: str) -> torch.Tensor | Protected:
        """SiLU(gate)·up, linear `weight`'s input; fused with the recovery before and the protect after where
        gate_up is an answer still masked (`fused_hop`)."""
        if isinstance(gate_up, Answer):
            return self.fused_hop("silu", gated, gate_up, (), weight)[1]
        return self.tee("silu", silu_gate, gate_up)

    def attention(self, h: torch.Tensor | Protected, i: int, rope: tuple, bias: torch.Tensor, blocks: CausalBlocks,
                  attention_mask: torch.Tensor) -> torch.Tensor | Answer:
        if not self.scheme.masked:
            return self.plain_attention(h, i, rope, bias, blocks)
        qkv = self.linear(h, f"{i}.qkv", "linear_attn", i, defer=True)
        if isinstance(qkv, Answer):
            v, operands = self.rope_hop(qkv, rope, blocks.batch, f"{i}.scores")
            scores = self.matmul(operands, None, f"{i}.scores", i, blocks.scores, defer=True)
        else:
            v, (q, k_t) = self.tee("rotary", rotated_heads, kernels.as_chosen, qkv, *self.rope_args(rope, blocks.batch))
            scores = self.matmul(q, k_t, f"{i}.scores", i, blocks.scores, defer=True)
        if isinstance(scores, Answer):
            probs = self.softmax_hop(scores, v, f"{i}.attend", blocks, bias, attention_mask)
        else:
            order = self.scheme.scores_order(f"{i}.scores")  # ours: rows and keys may stay in its masks' order
            probs = (self.tee("softmax", blocks.softmax, scores, bias) if order is None else
                     self.tee("softmax", softmax_in_order, scores, *order, attention_mask, blocks.padded))
        out = self.matmul(probs, v, f"{i}.attend", i, blocks.attend, defer=True)
        o_input = self.attend_hop(out, blocks.attend, f"{i}.o") if isinstance(out, Answer) else merge_heads(out)
        return self.linear(o_input, f"{i}.o", "linear_attn", i, defer=True)

    def plain_attention(self, h: torch.Tensor, i: int, rope: tuple, bias: torch.Tensor,
                        blocks: CausalBlocks) -> torch.Tensor:
        """Unprotected attention: v and P·V need no TEE step, so they never leave the GPU; of the scores
        and probabilities, only the causal lower block triangle is computed and crosses."""
        # q and k's columns apart from v's, so that they cross as they lie
        qk, v = in_two(self.gpu.linear(self.link.to_gpu(h, "linear_attn", i), f"{i}.qkv", "linear_attn",
                                       self.qk_width), h.shape[:-1], self.qk_width)
        q_and_k, v = self.q_and_k_to_tee(qk), split_heads(v, self.head_dim)
        # q and k cross together, k as laid out: it is transposed on the GPU, where that is a view (a
        # transposed view would be copied into pageable memory on the host first, and cross at that rate)
        q, k = self.split_q_k(self.link.to_gpu(self.rotate(q_and_k, rope), "matmul", i))
        if self.attention_form == FUSED:  # the TEE-only runner: no hop between the three steps, so one op may do them
            out = merge_heads(self.tee("attention", fused_attention, q, k, v, bias if blocks.padded else None))
        else:
            scores = self.gpu.matmul(q, k.transpose(-1, -2), f"{i}.scores", blocks.scores)
            probs = self.through_tee("softmax", "matmul", i, scores, scores.shape,
                                     lambda x, into: blocks.softmax(x, bias, into), blocks.views,
                                     lambda r, block, into: blocks.softmax_block(r, block, bias, into))
            out = self.gpu.matmul(probs, v, f"{i}.attend", blocks.attend, merge=True)
        return self.link.to_tee(self.gpu.linear(out, f"{i}.o", "linear_attn"), "linear_attn", kept="o")

    @property
    def qk_width(self) -> int:
        """The qkv projection's output columns that are q and k, (H + Hkv)·h: the rest are v."""
        return (self.n_heads + self.n_kv_heads) * self.head_dim

    def q_and_k_to_tee(self, qk: torch.Tensor) -> torch.Tensor:
        """GPU -> TEE: the q and k part of the qkv projection's output [B, N, (H + Hkv)·h] (contiguous: v's part
        stays on the GPU), as [B, H + Hkv, N, h]."""
        return split_heads(self.link.to_tee(qk, "linear_attn", kept="qkv"), self.head_dim)

    def rotate(self, q_and_k: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """RoPE on q and k [B, H + Hkv, N, h] in one op (q comes already scaled by 1/sqrt(head_dim))."""
        cos, sin = rope
        return self.tee("rotary", apply_rope, q_and_k, cos, sin, self.gpu_bound(q_and_k.shape))

    def split_q_k(self, q_and_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, H + Hkv, N, h] -> q [B, H, N, h], k [B, Hkv, N, h] (views)."""
        return q_and_k[:, : self.n_heads], q_and_k[:, self.n_heads:]

    def gpu_bound(self, shape: torch.Size) -> torch.Tensor | None:
        """Where a TEE op's result goes straight to the GPU (the plain split: no protect step between),
        a pinned buffer for it to write into, so the boundary has nothing to stage, kept for results of its
        shape (`Boundary.kept_buffer`: each crosses before the next is written); else None."""
        return None if self.scheme.masked else self.link.kept_buffer("to_gpu", shape, self.dtype)

    def heads(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, N, (H + 2·Hkv)·h] (or just its q and k part) -> q and k [B, H + Hkv, N, h], v [B, Hkv, N, h]."""
        per_head = split_heads(qkv, self.head_dim)
        return per_head[:, : self.n_heads + self.n_kv_heads], per_head[:, self.n_heads + self.n_kv_heads:]

    def mlp(self, h: torch.Tensor, i: int) -> torch.Tensor:
        if not self.scheme.masked:
            return self.plain_mlp(h, i)
        gate_up = self.linear(h, f"{i}.gate_up", "linear_mlp", i, defer=True)
        return self.linear(self.silu(gate_up, f"{i}.down"), f"{i}.down", "linear_mlp", i, defer=True)

    def plain_mlp(self, h: torch.Tensor, i: int) -> torch.Tensor:
        """Unprotected MLP: gate/up's output goes to the TEE for SiLU, and down's input comes straight back,
        in row parts where copies overlap the TEE's work."""
        gate_up = self.gpu.linear(self.link.to_gpu(h, "linear_mlp", i), f"{i}.gate_up", "linear_mlp")
        act = self.through_tee("silu", "linear_mlp", i, gate_up, (*gate_up.shape[:-1], gate_up.shape[-1] // 2),
                               silu_gate, row_parts, lambda r, x, into: silu_gate(x, into))
        return self.link.to_tee(self.gpu.linear(act, f"{i}.down", "linear_mlp"), "linear_mlp", kept="down")

    # ---- for the reference ----

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights the engine holds, under transformers' names (views where possible, no copies)."""
        sd: dict[str, torch.Tensor] = {}
        for name, modules in self.sources.items():
            bias = self.gpu.biases[name] if self.gpu.biases[name] is not None else self.tee_biases.get(name)
            for kind, fused in (("weight", self.gpu.weights[name]), ("bias", bias)):
                if fused is not None:
                    sd.update(zip([f"{m}.{kind}" for m in modules], fused.split(self.split_sizes[name])))
        for key in [k for k in sd if k.rsplit(".", 1)[0].endswith(SCALED_PROJECTION)]:
            sd[key] = sd[key].float() / self.scale  # without the scale it carries here (exact for a power of two)
        for i, layer in enumerate(self.layers):
            sd[f"model.layers.{i}.input_layernorm.weight"] = layer.attn_norm.weight
            sd[f"model.layers.{i}.post_attention_layernorm.weight"] = layer.mlp_norm.weight
        sd["model.norm.weight"] = self.final_norm.weight
        sd["model.embed_tokens.weight"] = (self.embed_table if self.embed_table is not None
                                           else self.gpu.weights["lm_head" if self.scheme.masked else "embed"])
        sd.setdefault("lm_head.weight", self.gpu.weights["lm_head"])
        return sd
