"""The nonlinear work the TEE keeps: RMSNorm, rotary embedding, masked softmax, SiLU-gated product.

Each follows transformers' LlamaForCausalLM numerics (float32 inside RMSNorm and softmax), so the
split engine can be compared with it at a tight tolerance.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from splitinfer import native
from splitinfer.kernels import tee_kernel

# Steps with a form in `native`'s C++ kernels, one form picked per shape in set-up (`native.in_picked_form`): the TEE
# kernel (compiled, or eager where set-up measured that faster), or the C++ one. The plain split's small ops cost a
# GPU host more in calls than in arithmetic (tee_gpu/ROUNDS.md, "Thirty-third round"): the C++ form is one call.
KERNEL = "kernel"
RMS_NORM, RESIDUAL_RMS_NORM, SILU_GATE, ROPE = "rms_norm", "residual_rms_norm", "silu_gate", "rope"


@dataclass(frozen=True)
class RmsNorm:
    """An RMSNorm whose weight is kept in float32 and times √d: weight·x/rms(x) = (weight·√d)·x/√(‖x‖² + d·eps),
    so a call casts no weight and divides by nothing. `weight` is the model's own, for export."""

    weight: torch.Tensor
    scaled: torch.Tensor
    eps_d: torch.Tensor  # d·eps, a float32 scalar tensor: ‖x‖² + d·eps is then one op

    @classmethod
    def of(cls, weight: torch.Tensor, eps: float) -> RmsNorm:
        d = weight.shape[-1]
        return cls(weight, weight.float() * d ** 0.5, torch.tensor(eps * d, dtype=torch.float32))

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """In float32, into `out` where given (the ops that feed the GPU write straight into pinned memory)."""
        return self.after(x, None, out)[1]

    def after(self, x: torch.Tensor, branch: torch.Tensor | None, out: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + branch, its norm): the residual add of the block before this norm, fused with it (one kernel
        compiled, one pass fewer); with no branch (the first block), (x, its norm)."""
        out = torch.empty_like(x) if out is None else out
        same = [x, out] if branch is None else [x, branch, out]
        usable = all(t.is_contiguous() and t.dtype == x.dtype for t in same)
        one_call = lambda: native.rms_norm(x, branch, self.scaled, self.eps_d, out)  # noqa: E731
        if branch is None:
            return native.in_picked_form(RMS_NORM, x, {KERNEL: lambda: (x, rms_norm(x, self.scaled, self.eps_d, out))},
                                         one_call, usable, native.ANY_DTYPES)
        return native.in_picked_form(RESIDUAL_RMS_NORM, x,
                                     {KERNEL: lambda: residual_rms_norm(x, branch, self.scaled, self.eps_d, out)},
                                     one_call, usable, native.ANY_DTYPES)


@tee_kernel
def rms_norm(x: torch.Tensor, scaled: torch.Tensor, eps_d: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """x·scaled/√(‖x‖² + d·eps) into `out` (`RmsNorm`'s form of weight·x/rms(x)), computed in float32.

    x is converted first because an op mixing float16 and float32 inputs takes PyTorch's slower casting
    path, and so does a norm accumulating float16 in float32: on the 2-core VM, 512 x 2048 in float16,
    0.20-0.22 ms against 0.27-0.28 for the same three passes on x itself (and 0.30 for the textbook seven).
    With the weight kept scaled, three small ops fewer a call: 0.052 ms against 0.057 at 128 x 2048
    for two fewer, and the square and the eps in one op, 2.5 µs less. Compiled, one kernel: 0.039 and
    0.097 ms at 128 and 512 x 2048, against 0.051 and 0.22 eager. Into a float32 `out`, x itself is read and
    `out` normalised in place: no copy of a float32 x, the same values (2-core VM, 128 x 576 / 2048: 20 / 44 µs
    eager, against 29 / 70 normalising a copy)."""
    xf = x.float()  # x itself in float32: only read
    norm = torch.linalg.vector_norm(xf, dim=-1, keepdim=True)
    inverse_rms = torch.addcmul(eps_d, norm, norm).rsqrt_()
    if out.dtype == torch.float32:
        return torch.mul(xf, inverse_rms, out=out).mul_(scaled)
    return torch.mul(xf * inverse_rms if xf is x else xf.mul_(inverse_rms), scaled, out=out)


@tee_kernel
def residual_rms_norm(x: torch.Tensor, branch: torch.Tensor, scaled: torch.Tensor, eps_d: torch.Tensor,
                      out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + branch in x's dtype, its `rms_norm` into `out`)."""
    total = torch.add(x, branch)
    return total, rms_norm.eager(total, scaled, eps_d, out)


def sum_and_norm(form: Callable, branch: torch.Tensor, x: torch.Tensor, scaled: torch.Tensor, eps_d: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """`RmsNorm.after(x, branch)` as a fused hop's op (`kernels.fused`): (x + branch, its norm), each kernel
    called as `form` gives it."""
    return form(residual_rms_norm)(x, branch, scaled, eps_d, torch.empty_like(x))


class Rotary:
    """Rotary tables from transformers' own RoPE initialisation (so llama3/linear/dynamic scaling come free)."""

    LENGTHS_KEPT = 8  # tables kept for this many lengths at once (128 KiB a pair at 512 x 64 in float16)

    def __init__(self, config: LlamaConfig):
        self.embedding = LlamaRotaryEmbedding(config)
        self.made: dict[tuple[int, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def tables(self, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [n, head_dim] for positions 0..n-1 (read-only: shared by every call for n). They depend
        on n alone, never on a prompt, so they are made once for a length (set-up makes an inference's) and kept:
        made at each inference they took 0.4-0.6 ms of it on the H100 machine (twenty-seventh round), eight ops of
        about 70 µs there."""
        key = (n, dtype)
        if key not in self.made:
            if len(self.made) >= self.LENGTHS_KEPT:
                del self.made[next(iter(self.made))]
            cos, sin = self.embedding(torch.empty(0, dtype=dtype), torch.arange(n).unsqueeze(0))
            self.made[key] = cos[0], sin[0]
        return self.made[key]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate x [B, heads, N, head_dim] by position: x·cos + rotate_half(x)·sin, into `out` where given."""
    out = torch.empty(x.shape, dtype=x.dtype) if out is None else out
    return native.in_picked_form(ROPE, x, {KERNEL: lambda: _rope(x, cos, sin, out)}, lambda: native.rope(x, cos, sin, out),
                                 x.dim() == 4 and x.stride(-1) == 1 and out.is_contiguous()
                                 and all(t.dtype == x.dtype for t in (cos, sin, out)), native.ANY_DTYPES)


def _rope_by_halves(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`_rope`'s eager form: x·cos whole, then rotate_half(x)·sin added into each half (no concatenated copy of
    x), three ops. Measured on the 2-core VM, 40 heads x 512 x 64 in float16: 0.17 ms, against 0.19 for four
    ops (x·cos half by half) and 0.23 for the concatenating form (at 32 heads)."""
    half = x.shape[-1] // 2
    torch.mul(x, cos, out=out)
    out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1)
    out[..., half:].addcmul_(x[..., :half], sin[..., half:])
    return out


@tee_kernel(eager=_rope_by_halves)
def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`apply_rope` into `out`; compiled, as one expression: one pass and one call, where eager makes three
    ops. 2-core VM, 40 heads in float16: 0.058 ms at 128 tokens and 0.145 at 512, against 0.051 and 0.181
    eager; compiled, the form eager runs took 0.081 and 0.274."""
    half = x.shape[-1] // 2
    return torch.add(x * cos, torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin, out=out)


def split_heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[B, N, heads·h] -> [B, heads, N, h], a view (`SplitLlama.heads`)."""
    batch, n, width = x.shape
    return x.view(batch, n, width // head_dim, head_dim).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, N, h] -> [B, N, H·h], the layout the o projection reads."""
    batch, heads, n, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, n, heads * head_dim)


def merged(form: Callable, x: torch.Tensor) -> tuple[None, torch.Tensor]:
    """`merge_heads` as a fused hop's op (`kernels.fused`): (nothing kept, x's heads merged)."""
    return None, merge_heads(x)


def rotated_heads(form: Callable, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
                  out: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The qkv projection's output [B, N, (H + 2·Hkv)·h] as a fused hop's op (`kernels.fused`): (v [B, Hkv, N, h],
    a view of it; (q, kᵀ), views of `out` [B, H + Hkv, N, h], into which one `_rope`, called as `form` gives it,
    writes q and k rotated), laid out as the separate steps lay them out (`SplitLlama.heads`, `rotate`,
    `split_q_k`). `out` comes from outside a compiled kernel so that the compiler keeps that layout."""
    per_head = split_heads(qkv, out.shape[-1])
    q_and_k = per_head[:, : out.shape[1]]
    rotated = form(_rope)(q_and_k, cos, sin, out)
    return per_head[:, out.shape[1]:], (rotated[:, :heads], rotated[:, heads:].transpose(-1, -2))


BLOCKED = -1e4  # far below any real score, so a blocked key's weight underflows to exactly zero; far from
# every dtype's limit, so no sum overflows and a row with no visible key stays finite. (The float16
# softmax also ran 1.7x slower on the 2-core VM with -32752 in its rows than with -1e4.)


def attention_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive [B, 1, N, N] bias in `dtype`: 0 where query i may see key j (j <= i and j is a real
    token), else BLOCKED."""
    n = attention_mask.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    allowed = causal[None, None] & attention_mask[:, None, None, :].bool()
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, BLOCKED)


def masked_softmax(scores: torch.Tensor, bias: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """softmax over keys of already-scaled scores plus the attention bias, in the scores' own dtype.

    Two passes: PyTorch's CPU softmax accumulates half precision in float32, as transformers does.
    Measured on the 2-core VM at 32 heads x 512² in float16: 2.4 ms, against 3.8 ms masking with
    torch.where and ~25 ms for a float32 round trip (scale, bias add, softmax, cast back)."""
    return torch.softmax(torch.add(scores, bias), dim=-1, out=out)


def softmax_in_order(scores: torch.Tensor, rows: torch.Tensor, keys: torch.Tensor, attention_mask: torch.Tensor,
                     padded: bool = True) -> torch.Tensor:
    """masked_softmax of [B, H, n, m] scores whose rows and keys come reordered, as ours' masks leave them
    (`schemes.Plain.scores_order`): row i is query rows[..., i] and column j key keys[..., j], for int32
    positions rows [B, G, H/G, n] and keys [B, G, m]. The softmax is per row, so the order changes only which
    entries the causal and padding mask hides: key keys[j] is visible to query rows[i] where keys[j] <= rows[i]
    and it is a real token. A padding key gets a position after every query's (`key_positions`; only where
    the batch is `padded`), so that one comparison hides both (a second broadcast mask made the compiled kernel
    4x slower on the 2-core VM). The mask and then the probabilities are written into the scores, in place: at
    32 heads x 512² a float16 copy of them is 16 MiB of the TEE's peak."""
    batch, groups = keys.shape[:2]
    _hide_later_keys(scores.view(batch, groups, -1, *scores.shape[-2:]), rows,
                     key_positions(keys, attention_mask, padded))
    return torch.softmax(scores, dim=-1, out=scores)


def key_positions(keys: torch.Tensor, attention_mask: torch.Tensor, padded: bool = True) -> torch.Tensor:
    """Each key's position in `softmax_in_order`'s comparison, for key positions [B, G, m] reordered (int32):
    its own, or past every query's (m) where it is padding; keys as they are where the batch is not `padded`."""
    if not padded:
        return keys
    batch, groups, m = keys.shape
    real = torch.gather(attention_mask.bool()[:, None, :].expand(batch, groups, -1), -1, keys.long())
    return torch.where(real, keys, m)


@tee_kernel
def _hide_later_keys(scores5: torch.Tensor, rows: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """BLOCKED into [B, G, H/G, n, m] scores wherever keys[j] > rows[i], in place (int32 positions: 0.37 ms
    at 32 heads x 512² in float16 compiled on the 2-core VM, 0.48 in int64; 4.7 ms eager, so eager kernels
    keep the scores in order, see `SplitLlama.softmax_of`)."""
    return scores5.masked_fill_(keys[:, :, None, None, :] > rows[..., None], BLOCKED)


def fused_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """softmax(q kᵀ + bias) v in one op, torch's scaled_dot_product_attention (q comes scaled), each group of
    query heads sharing its k and v [B, G, N, h]; causal where there is no bias (an unpadded batch). Only
    where nothing crosses between the steps: the TEE-only runner (`SplitLlama.choose_attention`)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=bias is None, scale=1.0,
                                          enable_gqa=True)


def silu_gate(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """SiLU(gate) * up, where gate_up holds [gate | up] along the last dimension."""
    out = torch.empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2), dtype=gate_up.dtype) if out is None else out
    return native.in_picked_form(SILU_GATE, gate_up, {KERNEL: lambda: silu_product(gate_up, out)},
                                 lambda: native.silu_gate(gate_up, out),
                                 gate_up.is_contiguous() and out.is_contiguous() and out.dtype == gate_up.dtype,
                                 native.ANY_DTYPES)


def gated(form: Callable, gate_up: torch.Tensor) -> tuple[None, torch.Tensor]:
    """`silu_gate` as a fused hop's op (`kernels.fused`): (nothing kept, SiLU(gate)·up)."""
    return None, form(silu_product)(gate_up, gate_up.new_empty((*gate_up.shape[:-1], gate_up.shape[-1] // 2)))


@tee_kernel
def silu_product(gate_up: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """`silu_gate` into `out`: SiLU written into the output, then multiplied in place (no temporary; 0.87 ms
    against 1.02 at 512 x 8192 in float16 on the 2-core VM, eager; 0.68 ms compiled)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.ops.aten.silu.out(gate, out=out).mul_(up)


def grouped_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [B, H, n, k] @ b [B, G, k, m] -> [B, H, n, m], each group of H/G query heads sharing one b.

    The broadcast never materialises b per query head (GQA). The GPU's matmul and the TEE's
    recovery of cross terms both use it.
    """
    batch, heads, n, _ = a.shape
    groups = b.shape[1]
    return (a.reshape(batch, groups, heads // groups, n, -1) @ b.unsqueeze(2)).reshape(batch, heads, n, -1)


def stacked_matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """`grouped_matmul` as one product per sequence and KV group, the rows of the group's query heads stacked (a
    copy of a's rows where they are not stacked in memory already), into `out` where given: the TEE's products, a
    few large ones where grouped_matmul's broadcast makes one per query head. On the 2-core VM (1B shape, float32,
    512 tokens) otp's cross terms took 16.1 ms against 22.5 for the scores, 21.7 against 34.9 for P·V (fortieth
    round). Not in float16, which the CPU fallback's products alone take: the VM's CPU has no float16 matrix unit,
    and with kᵀ's rows strided (a row block of a contiguous kᵀ) its one product a group took 228 ms a layer at 512
    tokens against 170 for grouped_matmul's."""
    if a.dtype == torch.float16:
        product = grouped_matmul(a, b)
        return product if out is None else out.copy_(product)
    batch, heads, n, k = a.shape
    groups, m = b.shape[1], b.shape[-1]
    rows, columns = a.reshape(batch * groups, heads // groups * n, k), b.reshape(batch * groups, k, m)
    if out is None:
        return torch.bmm(rows, columns).view(batch, heads, n, m)
    torch.bmm(rows, columns, out=out.view(rows.shape[0], rows.shape[1], m))
    return out


# the causal blocks' softmax's forms, one picked per shape in set-up (`kernels.pick`): the TEE kernel, or the C++ one
SOFTMAX_BLOCKS = "softmax_blocks"
ROWS = 64   # no part below this many rows: a short prompt keeps one op per step
MOST = 16  # at 2048 tokens and more: 17/32 of n² for the causal blocks, within 7% of the triangle
INDEX_BYTES = 64 * 2 ** 20  # the most a gather index of the packed scores may take (`CausalBlocks.gathers`)


def even_starts(n: int, least: int | None = None) -> tuple[int, ...]:
    """Where each part of n rows starts (and n, where the last ends): up to MOST parts of at least `least`
    rows (ROWS unless given), as even as whole rows allow."""
    count = max(1, min(MOST, n // (least or ROWS)))
    return tuple(n * r // count for r in range(count + 1))


def row_parts(t: torch.Tensor) -> list[torch.Tensor]:
    """t's rows (every dimension but the last flattened), cut as `even_starts` cuts them: contiguous views."""
    rows = t.view(-1, t.shape[-1])
    starts = even_starts(rows.shape[0])
    return [rows[start:end] for start, end in zip(starts[:-1], starts[1:])]


@dataclass(frozen=True)
class CausalBlocks:
    """The lower block triangle of causal n×n scores, for `batch` sequences of `heads` query heads. Row
    block r (rows starts[r] to starts[r+1]) sees no key at or after starts[r+1], so only those keys'
    columns are computed, shipped and normalised.

    Blocks are packed one after another into a flat tensor, each a contiguous [B, H, rows, keys]; one block
    is simply the [B, H, n, n] matrix. With 8 blocks (512 tokens) that is 9/16 of the n² entries (the exact
    triangle is about 1/2), for 8 ops instead of one in the TEE (and, on the CPU fallback, in the products)."""

    batch: int
    heads: int
    starts: tuple[int, ...]
    padded: bool = True  # whether the bias may block keys below the diagonal (right padding)

    @classmethod
    def of(cls, batch: int, heads: int, n: int, split: bool = True, padded: bool = True,
           rows: int | None = None) -> CausalBlocks:
        """Row blocks of at least `rows` rows (ROWS unless given) as `even_starts` cuts them; one block
        (the full matrix) unless `split`."""
        return cls(batch, heads, even_starts(n, rows) if split else (0, n), padded)

    @property
    def whole(self) -> bool:
        """One block: the full [B, H, n, n] matrix, and the plain products."""
        return len(self.starts) == 2

    @property
    def spans(self) -> list[tuple[int, int]]:
        return list(zip(self.starts[:-1], self.starts[1:]))

    @property
    def shape(self) -> tuple[int, ...]:
        """The packed scores' shape."""
        n = self.starts[-1]
        if self.whole:
            return self.batch, self.heads, n, n
        return (self.batch * self.heads * sum((end - start) * end for start, end in self.spans),)

    def views(self, packed: torch.Tensor) -> list[torch.Tensor]:
        """Each block of a packed tensor, as a [B, H, rows, keys] view."""
        flat, views, offset = packed.view(-1), [], 0
        for start, end in self.spans:
            size = self.batch * self.heads * (end - start) * end
            views.append(flat[offset: offset + size].view(self.batch, self.heads, end - start, end))
            offset += size
        return views

    def scores(self, q: torch.Tensor, k_t: torch.Tensor) -> torch.Tensor:
        """q [B, H, n, k] @ kᵀ [B, G, k, n], block by block, packed. Blocks slice q's rows and kᵀ's
        columns only, never k. On CUDA, one full product, then `pack` (one gather) instead; on the CPU (the TEE's
        products: otp's cross terms, the TEE-only runner's) each block one product a KV group (`stacked_matmul`),
        written in place."""
        if q.is_cuda:
            return grouped_matmul(q, k_t) if self.whole else self.pack(grouped_matmul(q, k_t))
        if self.whole:
            return stacked_matmul(q, k_t)
        packed = q.new_empty(self.shape)
        for (start, end), block in zip(self.spans, self.views(packed)):
            stacked_matmul(q[..., start:end, :], k_t[..., :end], block)  # contiguous, of bmm's size: written through
        return packed

    # On a GPU the products cost launches, not arithmetic: the H100 machine (LLaMA-3.2-1B shape, 512 tokens,
    # float16, spinning threads) ran the plain split in 133.5 ms with a product per block (2 x 8 per layer)
    # and in 81.8 ms with the full n² scores crossing. One full product, then one gather into the packed
    # triangle (and one scatter back before P·V), keeps both the few launches and the triangle's bytes:
    # 72.7 ms against 92.8 with a product per block, and 87.9 with the full scores (threads not spinning).

    # The gather's index has an int64 position per packed score, four times the float16 scores' own bytes:
    # 38 MB at 32 heads x 512 tokens, but 4.6 GB at batch 8 x 2048 tokens. Beyond INDEX_BYTES, where the
    # copies are large enough that one launch per block matters less than reading the index, `pack` and
    # `unpack` copy each block's slice instead, and keep no index.

    @property
    def gathers(self) -> bool:
        """Whether `pack` and `unpack` take one gather and one scatter (else a slice copy per block)."""
        return 8 * math.prod(self.shape) <= INDEX_BYTES

    def pack(self, full: torch.Tensor) -> torch.Tensor:
        """The packed block triangle of full [B, H, n, n] scores: one gather (or a copy per block)."""
        if self.gathers:
            return full.reshape(-1).index_select(0, self.positions(full.device))
        packed = full.new_empty(self.shape)
        for (start, end), block in zip(self.spans, self.views(packed)):
            block.copy_(full[..., start:end, :end])
        return packed

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """Packed blocks -> [B, H, n, n], zero outside the block triangle: one scatter into zeros (or a copy
        per block)."""
        n = self.starts[-1]
        full = packed.new_zeros(self.batch, self.heads, n, n)
        if self.gathers:
            full.view(-1).index_copy_(0, self.positions(packed.device), packed)
            return full
        for (start, end), block in zip(self.spans, self.views(packed)):
            full[..., start:end, :end].copy_(block)
        return full

    def constants(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        """The tensors on `device` that `scores` and `attend` read besides their operands (the gather index, where
        `gathers` on CUDA), for a caller that must keep them alive while it keeps the steps (a captured graph)."""
        return (self.positions(device),) if device.type == "cuda" and not self.whole and self.gathers else ()

    def positions(self, device: torch.device) -> torch.Tensor:
        """Where each packed entry sits in the flat [B, H, n, n] matrix, on `device` (`pack`, `unpack`), where
        `gathers`."""
        return _packed_positions(self.batch, self.heads, self.starts, device)

    def softmax(self, scores: torch.Tensor, bias: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """masked_softmax of every block of packed scores, with its part of the [B, 1, n, n] bias (which
        may overwrite the scores), into `out` where given: in the form set-up picked at the scores' shape, the
        TEE kernel `_softmax_blocks` or the C++ kernel that takes each row in one pass (`native.softmax_blocks`)."""
        out = torch.empty_like(scores) if out is None else out
        return native.in_picked_form(
            SOFTMAX_BLOCKS, scores,
            {KERNEL: lambda: _softmax_blocks(scores, bias, out, self.batch, self.heads, self.starts, self.padded)},
            lambda: native.softmax_blocks(scores, bias, out, self.batch, self.heads, self.starts, self.padded),
            usable=scores.is_contiguous() and out.is_contiguous(), dtypes=native.ANY_DTYPES)

    def softmax_block(self, r: int, block: torch.Tensor, bias: torch.Tensor, out: torch.Tensor) -> None:
        """masked_softmax of block r into `out`. Without padding the bias is zero left of the block's
        diagonal tile, so only that tile gets it, added into the scores in place: 32 heads x 512² in 8
        blocks, float16, on the 2-core VM, 1.33 ms against 1.57 for the bias over every block."""
        start, end = self.spans[r]
        if self.padded:
            masked_softmax(block, bias[..., start:end, :end], out=out)
        else:
            block[..., start:end].add_(bias[..., start:end, start:end])
            torch.softmax(block, dim=-1, out=out)

    def attend(self, probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Packed probabilities @ v [B, G, n, m] -> [B, H, n, m], each row block against the keys it sees;
        one block is the plain product. On CUDA, `unpack` (one scatter) and the plain product instead."""
        if self.whole:
            return grouped_matmul(probs, v)
        if probs.is_cuda:
            return grouped_matmul(self.unpack(probs), v)
        return torch.cat([grouped_matmul(block, v[..., :end, :])
                          for (_, end), block in zip(self.spans, self.views(probs))], dim=-2)


def _softmax_each_block(scores: torch.Tensor, bias: torch.Tensor, out: torch.Tensor, batch: int, heads: int,
                        starts: tuple[int, ...], padded: bool) -> torch.Tensor:
    """`_softmax_blocks`' eager form: `CausalBlocks.softmax_block` of each block, two ops a block."""
    blocks = CausalBlocks(batch, heads, starts, padded)
    for r, (block, into) in enumerate(zip(blocks.views(scores), blocks.views(out))):
        blocks.softmax_block(r, block, bias, into)
    return out


@tee_kernel(eager=_softmax_each_block, unused=("padded",))
def _softmax_blocks(scores: torch.Tensor, bias: torch.Tensor, out: torch.Tensor, batch: int, heads: int,
                    starts: tuple[int, ...], padded: bool) -> torch.Tensor:
    """`CausalBlocks.softmax` of packed scores into `out`; compiled, every block in one call, where eager makes
    two ops a block (16 at 512 tokens). Its blocks are formed as fresh results, then copied into `out` once:
    written into `out`'s views, the compiled kernel took 4x eager's time. 2-core VM, 32 heads in float16:
    0.22 ms at 128 tokens (2 blocks) and 1.99 at 512 (8), against 0.24 and 1.76 eager. The bias is added
    whole to each block (in the same pass), so `padded` changes nothing here, and is left out of it: the compiler
    would otherwise build the kernel again for each value."""
    blocks = CausalBlocks(batch, heads, starts)
    probs = [torch.softmax(block + bias[..., start:end, :end], dim=-1).view(-1)
             for (start, end), block in zip(blocks.spans, blocks.views(scores))]
    return out.view(-1).copy_(torch.cat(probs)).view(out.shape)


@functools.lru_cache(maxsize=4)
def _packed_positions(batch: int, heads: int, starts: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """CausalBlocks.positions, kept: every layer and every inference of one shape uses the same (int64:
    8 bytes per packed score, at most INDEX_BYTES)."""
    n = starts[-1]
    matrices = torch.arange(batch * heads, device=device).view(-1, 1, 1) * (n * n)
    return torch.cat([(matrices + torch.arange(start, end, device=device).view(1, -1, 1) * n
                       + torch.arange(end, device=device).view(1, 1, -1)).reshape(-1)
                      for start, end in zip(starts[:-1], starts[1:])])
