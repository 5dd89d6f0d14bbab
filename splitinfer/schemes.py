"""Protection schemes: what the TEE does to a tensor before the GPU sees it, and after the GPU answers.

A scheme answers two questions, each with a protect and a recover step:
- linear:  the GPU computes Z = X' Wᵀ from a protected X'; the TEE recovers Y = X Wᵀ.
- matmul:  the GPU computes C' = A' B' from protected A', B'; the TEE recovers C = A B.
Masks depend only on shapes, so they are drawn in `prepare`, the offline phase, before the prompt is
seen; the online steps only apply and remove them. tee_gpu/README.md gives the math and what the GPU sees.

Shapes: a linear input is [..., n, d] (n tokens of one sequence, mixed by `matrix`) or [rows, d] for
the LM head; a matmul is a [B, H, n, k] @ b [B, G, k, m] with G <= H (GQA groups share b).
"""
from __future__ import annotations

import functools
import math
import secrets
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, NamedTuple

import torch

from splitinfer import kernels, native
from splitinfer.kernels import fused, tee_kernel
from splitinfer.tee_ops import (CausalBlocks, _hide_later_keys, gated, grouped_matmul, key_positions, merged,
                                rotated_heads, split_heads, stacked_matmul, sum_and_norm)

MaskShapes = dict[str, tuple[int, ...]]
MatmulShapes = dict[str, tuple[tuple[int, ...], tuple[int, ...]]]


class MixArgs(NamedTuple):
    """`_mix_rows`' arguments after the rows, for one linear's mask (`Matrix._mix_args`)."""
    d: torch.Tensor
    a: torch.Tensor
    b_t_over_d: torch.Tensor
    dummy: torch.Tensor | None  # the mask's dummy rows, where it has them (the C++ hops take none)
    out: torch.Tensor | None  # where the mixed rows go: a pinned buffer, or None for a fresh tensor

    def into(self, width: int, dtype: torch.dtype) -> torch.Tensor:
        """Where a C++ hop writes the mixed rows, `width` wide: `out`, or a fresh tensor of d's rows."""
        return torch.empty(*self.d.shape, width, dtype=dtype) if self.out is None else self.out


class Plain:
    """No protection: the GPU sees every operand in the clear (and the token ids)."""

    name = "plain"
    encryption_scheme: str | None = None
    masked = False            # masked schemes keep token ids and biases in the TEE
    causal_blocks = True      # whether the scores may be only their causal block triangle (tee_ops.CausalBlocks)
    keeps_scores_order = False  # whether the scores may stay in the masks' order when recovered (`scores_order`)
    least_rows = 1            # the fewest rows a protected linear input crosses with (ours pads one row to two)
    steps = ("encryption", "decryption")  # how the JSON names the protect and recover steps

    def __init__(self, seed: int | None = None):
        self.generator = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)
        # Where a protected operand bound for the GPU is written: the engine gives its boundary's pinned
        # buffers (`Boundary.pinned_buffer`), so that the copy engines read it as it is and the boundary
        # stages nothing; None (pageable copies, or no GPU) leaves the op to allocate its own result.
        self.pinned_buffer: Callable[[tuple[int, ...], torch.dtype], torch.Tensor | None] = lambda shape, dtype: None

    def prepare(self, linears: MaskShapes, matmuls: MatmulShapes,
                weights: Callable[[str], torch.Tensor] | None = None, dtype: torch.dtype = torch.float32,
                softmax_of: dict[str, str] | None = None) -> int:
        """Offline phase: draw every mask of one inference (`dtype` is the model's, for masks that may be
        stored in it; `weights(name)` gives a linear's weight where it lives, for the TEE to fetch a block of
        rows at a time; `softmax_of` maps a matmul whose left operand is the row softmax of another's product
        to that other, which a scheme may then leave in its masks' order: `scores_order`). Returns the bytes
        the masks hold."""
        return 0

    def scores_order(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The order matmul `name`'s recovered product comes in, where the scheme `keeps_scores_order` and
        `prepare` was told its product feeds a softmax (`softmax_of`): (rows [B, G, H/G, n], keys [B, G, m]),
        row i being query rows[i] and column j key keys[j]; None where the product is in order."""
        return None

    def warm_kernels(self, linears: MaskShapes, matmuls: dict[str, tuple[torch.Tensor, torch.Tensor]],
                     outputs: dict[str, int], dtype: torch.dtype, softmax_of: dict[str, str] | None = None,
                     hops: tuple = (), products: dict[str, Callable] | None = None,
                     attention: tuple | None = None) -> None:
        """Build the compiled kernels that the protect and recover steps run (none here), before the
        inference: `matmuls` gives zeros laid out as each matmul's operands are (strides too), `products` the
        form the GPU computes each in (as `recover_matmul` takes it; the full product unless given), `outputs`
        each linear's output width, `hops` the fused hops from a linear (`hop`'s and `rope_hop`'s arguments on
        zeros: the linear before, its bias, the op and its arguments, the linear or scores matmul after),
        `attention` where the hops from the scores are fused too (`softmax_hop`, `attend_hop`: the causal blocks,
        the bias and the attention mask, of the inference's shapes)."""

    def _warm_hops(self, linears: MaskShapes, outputs: dict[str, int], dtype: torch.dtype, hops: tuple) -> None:
        """Each fused hop once, on zeros, its masks drawn (`warm_kernels`): `hop`, or `rope_hop` where the linear
        after is a scores matmul."""
        for source, bias, op, op_args, target in hops:
            masked, secret = self.protect_linear(torch.zeros(linears[source], dtype=dtype), source)
            step = self.rope_hop if target.endswith(".scores") else self.hop
            step(torch.zeros(*masked.shape[:-1], outputs[source], dtype=dtype), secret, bias, op, op_args, target)

    def protect_linear(self, x: torch.Tensor, name: str) -> tuple[torch.Tensor, object]:
        return x, None

    def recover_linear(self, z: torch.Tensor, secret: object) -> torch.Tensor:
        return z

    def protect_matmul(self, a: torch.Tensor, b: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor, object]:
        return a, b, None

    def recover_matmul(self, c: torch.Tensor, secret: object, product: Callable = grouped_matmul) -> torch.Tensor:
        """`product` is the form the GPU computed a @ b in (the full product, or a causal block step)."""
        return c

    def hop(self, z: torch.Tensor, secret: object, bias: torch.Tensor | None, op: Callable, op_args: tuple,
            name: str) -> tuple[torch.Tensor | None, torch.Tensor, object]:
        """The TEE's whole work between two linears, as one call (`SplitLlama(fuse_hops=True)`): recover_linear
        of the answer z [B, n, out], plus `bias` where there is one, then `op(form, y, *op_args)` -> (kept, h)
        (`tee_ops.sum_and_norm`, `tee_ops.gated`), then protect_linear(h, name); one kernel where compiled
        (`kernels.fused`). Returns (kept, h protected, its secret). With no steps there is nothing to fuse."""
        raise NotImplementedError(f"the {self.name} scheme has no protect or recover step to fuse")

    def rope_hop(self, z: torch.Tensor, secret: object, bias: torch.Tensor | None, op: Callable, op_args: tuple,
                 name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, object]:
        """The TEE's whole work between the qkv projection and the scores matmul, as one call
        (`SplitLlama(fuse_hops=True)`): recover_linear of the answer z [B, n, out], plus `bias` where there is one,
        then `op(form, y, *op_args)` -> (v, (q, kᵀ)) (`tee_ops.rotated_heads`), then protect_matmul(q, kᵀ, name);
        one kernel where compiled (`kernels.fused`). Returns (v, what protect_matmul does)."""
        raise NotImplementedError(f"the {self.name} scheme has no protect or recover step to fuse")

    def attend_hop(self, c: torch.Tensor, secret: object, product: Callable, op: Callable, op_args: tuple, name: str
                   ) -> tuple[torch.Tensor | None, torch.Tensor, object]:
        """The TEE's whole work between the P·V matmul and the o projection, as one call
        (`SplitLlama(fuse_hops=True)`): recover_matmul of the answer c (computed in the form `product`), then
        `op(form, out, *op_args)` -> (kept, x) (`tee_ops.merged`), then protect_linear(x, name); one kernel where
        compiled (`kernels.fused`). Returns (kept, x protected, its secret)."""
        raise NotImplementedError(f"the {self.name} scheme has no protect or recover step to fuse")

    def softmax_hop(self, c: torch.Tensor, secret: object, v: torch.Tensor, name: str, blocks: CausalBlocks,
                    bias: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, object]:
        """The TEE's whole work between the two attention matmuls, as one call (`SplitLlama(fuse_hops=True)`):
        recover_matmul of the scores' answer c (computed in the form `blocks.scores`), their row softmax under
        the causal and padding mask (`bias`), then protect_matmul(probabilities, v, name). Returns what
        protect_matmul does. Here the three steps, for scores that come back in order."""
        return self.protect_matmul(blocks.softmax(self.recover_matmul(c, secret, blocks.scores), bias), v, name)

    def _warm_attention_hops(self, matmuls: dict[str, tuple[torch.Tensor, torch.Tensor]], attention: tuple | None
                             ) -> None:
        """The softmax hop between each scores matmul in `matmuls` and its P·V, and the hop from that P·V to its
        layer's o projection, once each, on zeros (`warm_kernels`; `attention`: the blocks, bias and attention mask
        of the inference's shapes, or None for no hop)."""
        if attention is None:
            return
        blocks, bias, attention_mask = attention
        for name in [name for name in matmuls if name.endswith(".scores")]:
            (a, b), layer = matmuls[name], name.removesuffix("scores")
            secret = self.protect_matmul(a, b, name)[2]
            v = matmuls[layer + "attend"][1]
            attend_secret = self.softmax_hop(torch.zeros(blocks.shape, dtype=a.dtype), secret, v, layer + "attend",
                                             blocks, bias, attention_mask)[2]
            self.attend_hop(torch.zeros(*a.shape[:-1], v.shape[-1], dtype=a.dtype), attend_secret, blocks.attend,
                            merged, (), layer + "o")

    # ---- mask distributions, shared by the masked schemes ----

    def _signed_uniform(self, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
        """Magnitudes uniform in [low, high], signs random: bounded away from 0, so division is stable."""
        magnitude = torch.empty(shape).uniform_(low, high, generator=self.generator)
        sign = torch.randint(0, 2, shape, generator=self.generator) * 2 - 1
        return magnitude * sign

    def _result(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Where a protected matmul operand is written: a pinned buffer where copies are pinned, else a contiguous
        tensor; given to the kernel from outside, so that a fused hop's compiled kernel lays it out as the
        separate steps do."""
        buffer = self.pinned_buffer(shape, dtype)
        return torch.empty(shape, dtype=dtype) if buffer is None else buffer

    def _gaussians(self, shapes: list[tuple[int, ...]], dtypes: list[torch.dtype]) -> list[torch.Tensor]:
        """One standard-normal tensor per shape, in parallel threads, each from its own generator seeded
        from this scheme's: PyTorch draws from one generator sequentially, so a single stream of pads
        used one core (1.4 s of otp's 2.2 s offline phase at 512 tokens on the H200 machine). The draws
        depend on the seed only, not on the thread count."""
        seeds = torch.randint(0, 2 ** 62, (len(shapes),), generator=self.generator).tolist()

        def draw(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
            return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)

        with ThreadPoolExecutor(max_workers=max(1, torch.get_num_threads())) as pool:
            return list(pool.map(draw, shapes, dtypes, seeds))

    def _permutations(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Uniformly random permutations of the last dimension: the argsort of random 62-bit keys (float32 draws
        tie with a chance of about n²/2²⁵ a row, 0.8% at 512, where a stable sort keeps the lower index first;
        integer keys also sort faster: 2-core VM, 512 rows of 128, 0.71 ms against 1.06)."""
        return torch.randint(0, 2 ** 62, shape, generator=self.generator).argsort(dim=-1)


class Matrix(Plain):
    """`ours`: token-mixing matrix M = D + A Bᵀ (A, B n×k; k = 1 is the original D + αβᵀ) for linears,
    permutation and diagonal masks for matmuls.

    Linear:  the GPU gets M X and returns M (X Wᵀ); the TEE applies M⁻¹ by Woodbury (Sherman–Morrison at k = 1).
    Matmul:  A' = D₁P₁ A P₂D₂,  B' = D₂⁻¹P₂⁻¹ B P₃D₃,  so A'B' = D₁P₁ (AB) P₃D₃.
    """

    name = "matrix"
    encryption_scheme = "matrix transformation (D + ABᵀ token mixing; permutation-diagonal matmul masks)"
    masked = True
    causal_blocks = False  # permuted rows and keys scatter the triangle: every score must cross
    keeps_scores_order = True
    least_rows = 2  # `_mixing_masks`' dummy row
    D_RANGE = (1.0, 2.0)        # |diagonal entries|, signs random: recovery divides by at most 1
    LOW_RANK_RANGE = (0.5, 1.5)  # |A_ij|, |B_ij| before the (n^(1/4)·√k) scaling that keeps ABᵀX about as large as DX

    def __init__(self, seed: int | None = None, rank: int = 1, mix_scale: float = 1.0):
        super().__init__(seed)
        self.rank, self.mix_scale = rank, mix_scale
        self.kept_order: set[str] = set()  # the matmuls whose products stay in their masks' order
        self.scratch: dict[tuple, torch.Tensor] = {}  # `_scratch`'s buffers
        if rank > 1 or mix_scale != 1.0:
            self.encryption_scheme = self.encryption_scheme.replace("ABᵀ", f"ABᵀ, rank {rank}, mix scale {mix_scale:g}")

    def prepare(self, linears, matmuls, weights=None, dtype=torch.float32, softmax_of=None) -> int:
        self.linear_masks, self.matmul_masks = {}, {}  # the last inference's masks go before these are drawn
        self.linear_shapes = dict(linears)
        self.linear_masks = _drawn_by_shape(linears, self._mixing_masks)
        self.matmul_masks = _drawn_by_shape(matmuls, lambda shapes, count: self._matmul_masks(*shapes, dtype, count))
        self.kept_order = set(softmax_of.values()) if softmax_of else set()
        for name, source in (softmax_of or {}).items():
            self._chain(self.matmul_masks[source], self.matmul_masks[name])
        tensors = [t for m in (*self.linear_masks.values(), *self.matmul_masks.values()) for t in m.values()]
        return _storage_bytes(tensors)

    def _mixing_masks(self, shape: tuple[int, ...], count: int) -> dict[str, torch.Tensor]:
        """`count` linears' masks for a [..., n, d] input, stacked along a first dimension: D, A, B (and the
        k×k core of the Woodbury inverse) for every sequence, plus a dummy row where n is 1."""
        sequences, n = _sequences(shape)
        rows = max(n, self.least_rows)  # one row alone would only be scaled, not mixed: pad with a random dummy row
        d = self._signed_uniform((count, sequences, rows), *self.D_RANGE)
        spread = rows ** -0.25 / math.sqrt(self.rank)
        a = self._signed_uniform((count, sequences, rows, self.rank), *self.LOW_RANK_RANGE) * spread * self.mix_scale
        b = self._signed_uniform((count, sequences, rows, self.rank), *self.LOW_RANK_RANGE) * spread
        # Woodbury divides by G = I + BᵀD⁻¹A. Rotate B by the orthogonal Q = U Vᵀ from BᵀD⁻¹A = U S Vᵀ:
        # then G = I + V S Vᵀ is symmetric with every eigenvalue >= 1, so recovery never amplifies error.
        # At k = 1 this is flipping β's sign to make βᵀD⁻¹α >= 0, a measure-preserving map of the draws:
        # rejection sampling of the badly conditioned ones, without the loop.
        u, _, vh = torch.linalg.svd(b.transpose(-1, -2) @ (a / d[..., None]))
        b = b @ (u @ vh)
        core = torch.eye(self.rank) + b.transpose(-1, -2) @ (a / d[..., None])
        mask = {"d": d, "a": a, "b": b, "core_inverse": torch.linalg.inv(core)}
        # offline, so that online recovery is one k-row product: G⁻¹BᵀD⁻¹; and (BᵀD⁻¹), which protect
        # applies to the rows it has already scaled by D
        mask["woodbury_rows"] = mask["core_inverse"] @ (b / d[..., None]).transpose(-1, -2)
        mask["b_t_over_d"] = (b / d[..., None]).transpose(-1, -2).contiguous()
        if rows > n:
            mask["dummy"] = torch.randn((count, sequences, rows - n, shape[-1]), generator=self.generator)
        return mask

    def _matmul_masks(self, a: tuple[int, ...], b: tuple[int, ...], dtype: torch.dtype, count: int
                      ) -> dict[str, torch.Tensor]:
        """`count` matmuls' permutations and diagonals, stacked along a first dimension; the diagonals in the
        operands' dtype, which the masks are applied in."""
        batch, heads, n, k = a
        groups, m = b[1], b[3]
        per_head = (count, batch, groups, heads // groups)
        mask = {"p1": self._permutations((*per_head, n)),
                "d1": self._signed_uniform((*per_head, n), *self.D_RANGE).to(dtype),
                "p2": self._permutations((count, batch, groups, k)),
                "d2": self._signed_uniform((count, batch, groups, k), *self.D_RANGE).to(dtype),
                "p3": self._permutations((count, batch, groups, m)),
                "d3": self._signed_uniform((count, batch, groups, m), *self.D_RANGE).to(dtype)}
        mask["p1_inverse"], mask["p3_inverse"] = _inverse(mask["p1"]), _inverse(mask["p3"])
        # offline, so that the online steps take fewer ops: each row permutation as the flat index it gathers
        # with, each column permutation as the index it gathers with over its operand (a view), and B's two
        # diagonals as one k×m scale (B is kᵀ or v, never n×n), from the very rounded values A's and the
        # recovery's diagonals use
        for name in ("p1", "p2", "p1_inverse"):
            mask[f"rows_{name}"] = _row_index(mask[name], stacked=True)
        mask["cols_a"] = _col_index(mask["p2"], (*per_head[1:], n, k))
        mask["cols_b"] = _col_index(mask["p3"], b)
        mask["cols_c"] = _col_index(mask["p3_inverse"], (*per_head[1:], n, m))
        mask["b_scale"] = (mask["d3"].float()[..., None, :] / mask["d2"].float()[..., None]).to(dtype)
        # each group's column orders as the C++ kernels take them (`native.permute_scales`, `native.ours_attend_hop`):
        # int32 [B, G, m]
        mask["a_columns"], mask["b_columns"] = mask["p2"].int(), mask["p3"].int()
        mask["c_columns"] = mask["p3_inverse"].int()
        return mask

    @staticmethod
    def _chain(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
        """Offline: `first`'s product is recovered only from its diagonals, so it stays in its masks' order,
        Ŝ[i, j] = S[p1[i], p3[j]] (the softmax is per row, so that order does not change it); `second`
        gathers its A' = D₁'P₁' A P₂'D₂' straight from that order, A[r, c] = Â[p1⁻¹[r], p3⁻¹[c]], through
        composite indices. Two gathers over the n² entries fewer per layer; the GPU still sees A under
        second's own fresh P₁', P₂', and B (v) is masked as before."""
        second["a_rows"] = _row_index(torch.gather(first["p1_inverse"], -1, second["p1"]))
        columns = torch.gather(first["p3_inverse"], -1, second["p2"])
        second["cols_a"], second["a_columns"] = _col_index(columns, second["cols_a"].shape), columns.int()
        # that order as the positions the causal mask compares (`scores_order`: int32, as `_hide_later_keys` and
        # `_unscale_hide` take them)
        first["rows_at"], first["keys_at"] = first["p1"].int(), first["p3"].int()
        # the gathers they were for are gone
        del first["rows_p1_inverse"], first["cols_c"], first["c_columns"], second["rows_p1"]

    def protect_linear(self, x, name):
        sequences, n = _sequences(x.shape)
        mixed, scale = _mix_rows(x.reshape(sequences, n, x.shape[-1]), *self._mix_args(name, x.shape[-1], x.dtype))
        return self._mixed(mixed, scale, name, x.shape, n)

    def _mix_args(self, name: str, width: int, dtype: torch.dtype) -> MixArgs:
        """`_mix_rows`' arguments after the rows (`width` wide): linear `name`'s mask, and where its result goes."""
        mask = self.linear_masks[name]
        return MixArgs(mask["d"], mask["a"], mask["b_t_over_d"], mask.get("dummy"),
                       self.pinned_buffer((*mask["d"].shape, width), dtype))

    def _mixed(self, mixed: torch.Tensor, scale: torch.Tensor, name: str, shape: torch.Size, n: int):
        """protect_linear's answer from `_mix_rows`' for an input of `shape` (n rows a sequence)."""
        mask = self.linear_masks[name]
        return mixed.reshape(shape if "dummy" not in mask else (-1, shape[-1])), (mask, shape, scale, n)

    def recover_linear(self, z, secret):
        """May overwrite `z` (the GPU's answer, which nothing else holds)."""
        mask, in_shape, scale, n = secret  # scale: D diag(1/r), a column
        y = _unmix_rows(_rows_of(z, scale), mask["woodbury_rows"], mask["a"], scale)
        return y[:, :n].reshape(*in_shape[:-1], z.shape[-1])

    def hop(self, z, secret, bias, op, op_args, name):
        """In the form set-up picked at z's shape for the op: one TEE kernel (`_unmix_op_mix`), or one C++ call
        (`_linear_hop_one_pass`) where the op is SiLU·up or the residual sum's RMSNorm and neither a bias nor a
        dummy row comes in. May overwrite `z`."""
        mask, in_shape, scale, n = secret
        if len(in_shape) != 3:  # the LM head's rows: no op comes after it
            raise ValueError(f"a fused hop takes [batch, n, width] answers, not {list(in_shape)}")
        width = self.linear_shapes[name][-1]
        z3, mix_args = _rows_of(z, scale), self._mix_args(name, width, z.dtype)

        def one_kernel():
            return fused(_unmix_op_mix, op)(z3, mask["woodbury_rows"], mask["a"], scale, n, bias, op_args, *mix_args)

        one_pass = functools.partial(self._linear_hop_one_pass, z3, mask, scale, op, op_args, mix_args)
        usable = bias is None and mix_args.dummy is None and op in (gated, sum_and_norm)
        kept, mixed, next_scale = native.in_picked_form(f"{LINEAR_HOP}_{op.__name__}", z, {STEPS: one_kernel},
                                                        one_pass, usable)
        return (kept, *self._mixed(mixed, next_scale, name, (*in_shape[:-1], width), n))

    def _linear_hop_one_pass(self, z3: torch.Tensor, mask: dict[str, torch.Tensor], scale: torch.Tensor, op: Callable,
                             op_args: tuple, mix_args: MixArgs) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """`_unmix_op_mix`'s (kept, mixed, next scale) in one C++ call (`native.ours_linear_hop`), for SiLU·up
        (`gated`) or the residual sum's RMSNorm (`sum_and_norm`), with no dummy rows."""
        norm = None if op is gated else op_args
        out = mix_args.into(z3.shape[-1] // 2 if norm is None else z3.shape[-1], z3.dtype)
        # the residual stream, which the layer keeps; or SiLU·up, which nothing keeps
        kept = self._scratch(out.shape, out.dtype) if norm is None else torch.empty_like(out)
        next_scale = native.ours_linear_hop(z3, mask["woodbury_rows"], mask["a"], scale, norm, mix_args.d, mix_args.a,
                                            mix_args.b_t_over_d, out, kept)
        return (None if norm is None else kept), out, next_scale

    def warm_kernels(self, linears, matmuls, outputs, dtype, softmax_of=None, hops=(), products=None,
                     attention=None) -> None:
        """Protect and recover every linear and matmul once, and run each fused hop, on zeros of its shapes, so
        that compiled kernels are built before the inference; with masks from a copy of the generator, so that
        the inference's own masks are the ones it would have drawn without this."""
        state = self.generator.get_state()
        # one of each shape: the layers share them; and those the hops name
        one_each = {(shape, outputs[name]): name for name, shape in linears.items()}.values()
        linears = {name: linears[name] for name in [*one_each, *(name for hop in hops for name in (hop[0], hop[-1])
                                                                 if name in linears)]}
        softmax_of = {name: source for name, source in (softmax_of or {}).items() if {name, source} <= set(matmuls)}
        self.prepare(linears, {name: (a.shape, b.shape) for name, (a, b) in matmuls.items()}, dtype=dtype,
                     softmax_of=softmax_of)
        for name, shape in linears.items():
            masked, secret = self.protect_linear(torch.zeros(shape, dtype=dtype), name)
            self.recover_linear(torch.zeros(*masked.shape[:-1], outputs[name], dtype=dtype), secret)
        for name, (a, b) in matmuls.items():
            secret = self.protect_matmul(a, b, name)[2]
            self.recover_matmul(torch.zeros(*a.shape[:-1], b.shape[-1], dtype=dtype), secret)
        self._warm_hops(linears, outputs, dtype, hops)
        self._warm_attention_hops(matmuls, attention)
        self.generator.set_state(state)
        self.linear_masks, self.matmul_masks = {}, {}

    # The matmul masks work in the operands' own dtype: a permutation is exact in any dtype, and the n×n
    # operands (scores, probabilities) stay half the bytes of float32.

    def scores_order(self, name):
        m = self.matmul_masks[name]
        return (m["rows_at"], m["keys_at"]) if name in self.kept_order else None

    def protect_matmul(self, a, b, name):
        """In the form set-up picked at a's shape: `_permute_scale`'s steps, or one C++ call an operand."""
        steps = {STEPS: lambda: _permute_scale(kernels.as_chosen, a, b, *self._permute_args(name, a.dtype))}
        return (*native.in_picked_form(PROTECT_MATMUL, a, steps, lambda: self._permuted(a, b, name)),
                self._matmul_secret(name))

    def _permuted(self, a: torch.Tensor, b: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """What `_permute_scale` makes of matmul `name`'s operands, in one C++ call (`native.permute_scales`):
        A' = D₁P₁ A P₂D₂ and B' = D₂⁻¹P₂⁻¹ B P₃D₃."""
        jobs, results = self._permute_jobs(a, b, name)
        native.permute_scales(*jobs)
        return results

    def _permute_jobs(self, a: torch.Tensor | None, b: torch.Tensor, name: str, args: tuple | None = None
                      ) -> tuple[list[tuple], tuple]:
        """`native.permute_scales`' jobs for matmul `name`'s operands (A' = D₁P₁ A P₂D₂, B' = D₂⁻¹P₂⁻¹ B P₃D₃;
        B's alone where a is None), and the results they write, for a C++ call to run them; from `_permute_args`'
        (given, or made here)."""
        m = self.matmul_masks[name]
        a_rows, _, d1, d2, b_rows, _, _, out_a, out_b = args or self._permute_args(name, b.dtype)
        b_job = (b, b_rows, m["b_columns"], d2, m["d3"], out_b, True)
        if a is None:
            return [b_job], (out_b,)
        return [(a, a_rows, m["a_columns"], d1, d2, out_a, False), b_job], (out_a.view(a.shape), out_b)

    def _permute_args(self, name: str, dtype: torch.dtype) -> tuple:
        """`_permute_scale`'s arguments after the operands: matmul `name`'s masks, and where its results go."""
        m = self.matmul_masks[name]
        return (m.get("a_rows", m.get("rows_p1")), m["cols_a"], m["d1"], m["d2"], m["rows_p2"], m["cols_b"],  # `_chain`
                m["b_scale"], self._result(m["cols_a"].shape, dtype), self._result(m["cols_b"].shape, dtype))

    def _matmul_secret(self, name: str) -> tuple:
        m = self.matmul_masks[name]
        return m, m["cols_b"].shape[1], name in self.kept_order

    def rope_hop(self, z, secret, bias, op, op_args, name):
        """In the form set-up picked at z's shape: one TEE kernel (`_unmix_op_permute`), or `_rope_hop_one_pass`.
        May overwrite `z`."""
        mask, in_shape, scale, n = secret

        def one_kernel():
            return fused(_unmix_op_permute, op)(_rows_of(z, scale), mask["woodbury_rows"], mask["a"], scale, n, bias,
                                                op_args, *self._permute_args(name, z.dtype))

        one_pass = functools.partial(self._rope_hop_one_pass, z, secret, bias, op, op_args, name)
        return *native.in_picked_form(ROPE_HOP, z, {STEPS: one_kernel}, one_pass), self._matmul_secret(name)

    def _rope_hop_one_pass(self, z: torch.Tensor, secret: tuple, bias: torch.Tensor | None, op: Callable,
                           op_args: tuple, name: str) -> tuple:
        """The RoPE hop in `native`'s C++ kernels: the recovery and RoPE in one call (`native.ours_unmix_rope`;
        where a bias or a dummy row comes in, `_unmix_rows` and the op apart), the scores' operands protected by
        `_permuted`: (kept, a, b)."""
        mask, in_shape, scale, n = secret
        z3 = _rows_of(z, scale)
        if bias is None and op is rotated_heads and z3.shape[1] == n:
            cos, sin, heads, rotated = op_args
            h = rotated.shape[-1]
            v = torch.empty(z3.shape[0], n, z3.shape[-1] - rotated.shape[1] * h, dtype=z.dtype)
            jobs, masked = self._permute_jobs(rotated[:, :heads], rotated[:, heads:].transpose(-1, -2), name)
            native.ours_unmix_rope(z3, mask["woodbury_rows"], mask["a"], scale, cos, sin, rotated, v, *jobs)
            return split_heads(v, h), *masked
        y = kernels.as_chosen(_unmix_rows)(z3, mask["woodbury_rows"], mask["a"], scale)[:, :n]
        kept, (left, right) = op(kernels.as_chosen, y if bias is None else torch.add(y, bias), *op_args)
        return kept, *self._permuted(left, right, name)

    def softmax_hop(self, c, secret, v, name, blocks, bias, attention_mask):
        """Where the scores stay in their masks' order (`_chain`), in the form set-up picked at c's shape
        (`native.in_picked_form`): its steps, or the C++ kernel that takes them in one pass. Else the steps of
        `Plain.softmax_hop`. May overwrite `c`."""
        m, groups, keep_order = secret
        if not keep_order:
            return super().softmax_hop(c, secret, v, name, blocks, bias, attention_mask)
        batch, heads, n, keys = c.shape
        c5 = c.view(batch, groups, heads // groups, n, keys)
        positions = key_positions(m["keys_at"], attention_mask, blocks.padded)
        steps = functools.partial(self._softmax_steps, c5, m, positions, v, name)
        return native.in_picked_form(SOFTMAX_HOP, c, {STEPS: steps},
                                     functools.partial(self._softmax_one_pass, c5, m, positions, v, name))

    def _softmax_steps(self, c5: torch.Tensor, m: dict[str, torch.Tensor], positions: torch.Tensor, v: torch.Tensor,
                       name: str) -> tuple:
        """The softmax hop with one pass fewer over the n² scores than its steps apart: unscaled with their later and
        padding keys hidden in one kernel (`_unscale_hide`); then the softmax, in place (as `softmax_in_order`'s),
        and protect_matmul. Overwrites `c5`."""
        scores = _unscale_hide(c5, m["d1"], m["d3"], m["rows_at"], positions)
        batch, groups, per_group, n, keys = c5.shape
        return self.protect_matmul(torch.softmax(scores, dim=-1, out=scores).view(batch, -1, n, keys), v, name)

    def _softmax_one_pass(self, c5: torch.Tensor, m: dict[str, torch.Tensor], positions: torch.Tensor,
                          v: torch.Tensor, name: str) -> tuple:
        """The softmax hop's probabilities in one pass over the scores (`native.ours_softmax_hop`), protected for
        P·V as protect_matmul would (its row and column gathers and scales); v protected as it does, in the same
        call."""
        args = self._permute_args(name, c5.dtype)
        a_rows, _, d1, d2, _, _, _, out_a, _ = args
        v_jobs, (masked_v,) = self._permute_jobs(None, v, name, args)
        a5 = native.ours_softmax_hop(c5, m["d1"], m["d3"], m["rows_at"], positions, a_rows,
                                     self.matmul_masks[name]["a_columns"], d1, d2, out_a, *v_jobs)
        batch, groups, per_group, n, keys = c5.shape
        return a5.view(batch, -1, n, keys), masked_v, self._matmul_secret(name)

    def attend_hop(self, c, secret, product, op, op_args, name):
        """In the form set-up picked at c's shape: one TEE kernel (`_unpermute_op_mix`), or one C++ call
        (`native.ours_attend_hop`) where the op merges the heads and no dummy row comes in. Overwrites `c`. P·V's
        product is never kept in the masks' order (`_chain`)."""
        m, _, keep_order = secret
        if keep_order:
            raise ValueError("a product kept in its masks' order feeds a softmax, not a linear")
        shape = self.linear_shapes[name]
        mix_args = self._mix_args(name, shape[-1], c.dtype)

        def one_kernel():
            return fused(_unpermute_op_mix, op)(c, m["d1"], m["d3"], m["rows_p1_inverse"], m["cols_c"], op_args,
                                                *mix_args)

        one_pass = functools.partial(self._attend_hop_one_pass, c, m, mix_args)
        kept, mixed, scale = native.in_picked_form(ATTEND_HOP, c, {STEPS: one_kernel}, one_pass,
                                                   usable=op is merged and mix_args.dummy is None)
        return (kept, *self._mixed(mixed, scale, name, shape, shape[-2]))

    def _attend_hop_one_pass(self, c: torch.Tensor, m: dict[str, torch.Tensor], mix_args: MixArgs
                             ) -> tuple[None, torch.Tensor, torch.Tensor]:
        """`_unpermute_op_mix`'s (kept, mixed, next scale) for the merged heads, in one C++ call."""
        batch, heads, n, h = c.shape
        out = mix_args.into(heads * h, c.dtype)
        scale = native.ours_attend_hop(c, m["rows_p1_inverse"], m["c_columns"], m["d1"], m["d3"], mix_args.d,
                                       mix_args.a, mix_args.b_t_over_d, out, self._scratch(out.shape, out.dtype))
        return None, out, scale

    def _scratch(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A buffer that a C++ hop writes and reads back but nothing keeps (SiLU·up, the merged heads), one a shape
        and dtype, kept across calls."""
        key = (tuple(shape), dtype)
        if key not in self.scratch:
            self.scratch[key] = torch.empty(shape, dtype=dtype)
        return self.scratch[key]

    def recover_matmul(self, c, secret, product=grouped_matmul):
        """Overwrites `c` (the GPU's answer, which nothing else holds) on the way."""
        m, groups, keep_order = secret
        batch, heads, n, cols = c.shape
        c5 = _unscale_rows_cols(c.view(batch, groups, heads // groups, n, cols), m["d1"], m["d3"])
        if keep_order:  # left in the masks' order: `scores_order`
            return c5.view(c.shape)
        return _permute(c5, m["rows_p1_inverse"], m["cols_c"]).view(c.shape)


# ours' and otp's steps that set-up picks a form of per shape (`kernels.pick`): its steps (or one TEE kernel, for a
# hop), or `native`'s C++ kernels. The softmax hop's, where the scores stay in their masks' order
SOFTMAX_HOP = "ours_softmax_hop"
PROTECT_MATMUL, ROPE_HOP = "ours_protect_matmul", "ours_rope_hop"
LINEAR_HOP = "ours_hop"  # a hop between two linears, as its op names it: ours_hop_gated, ours_hop_sum_and_norm
ATTEND_HOP = "ours_attend_hop"
OTP_LINEAR_HOP = "otp_hop"  # otp's hop between two linears, as its op names it: otp_hop_gated, otp_hop_sum_and_norm
OTP_ROPE_HOP = "otp_rope_hop"
ADD_CROSS_TERMS = "otp_add_cross_terms"  # otp's matmuls' answers plus their float32 cross terms, rounded
STEPS = "steps"


class Otp(Plain):
    """One-time pads: the GPU sees X − R; the TEE adds back R Wᵀ, computed offline.

    Pads are σ·N with N ~ N(0, 1) drawn offline and σ = pad_scale · rms taken online (per row for
    linears, per tensor for matmul operands), so that R Wᵀ = diag(σ) (N Wᵀ) is still precomputed. Matmuls use two independent pads and recover the cross terms
    in the TEE:  A B = (A − R₁)(B − R₂) + A R₂ + R₁ (B − R₂).
    """

    name = "otp"
    encryption_scheme = "additive one-time pads (offline R·Wᵀ; two-pad matmul with TEE cross terms)"
    masked = True
    steps = ("masking", "recovery")

    def __init__(self, seed: int | None = None, pad_scale: float = 1.0):
        super().__init__(seed)
        self.pad_scale = pad_scale

    def prepare(self, linears, matmuls, weights=None, dtype=torch.float32, softmax_of=None) -> int:
        # The last inference's pads go before this one's are drawn: kept until the loop below, they were 637 MiB
        # of the peak (VM, 1B shape, 512 tokens, float16: the second offline phase)
        self.linear_pads, self.matmul_pads = {}, {}
        # The attention pads are exact in any dtype (masking and recovery use the same stored values), so they
        # are kept in the model's: half the memory of float32 for the largest pads, the [n, n] ones.
        noises = iter(self._gaussians([*linears.values(), *(shape for pair in matmuls.values() for shape in pair)],
                                      [dtype] * (len(linears) + 2 * len(matmuls))))
        for name in linears:  # one weight at a time in the TEE
            noise = next(noises)
            self.linear_pads[name] = (noise, _float32_product(noise, weights(name), dtype))
        self.matmul_pads = {name: (next(noises), next(noises)) for name in matmuls}
        tensors = [t for pads in (*self.linear_pads.values(), *self.matmul_pads.values()) for t in pads]
        return sum(t.numel() * t.element_size() for t in tensors)

    def warm_kernels(self, linears, matmuls, outputs, dtype, softmax_of=None, hops=(), products=None,
                     attention=None) -> None:
        """Pad every linear input and matmul operand shape once, run each fused hop, and in half precision pick
        the form of the scores' cross terms (`CROSS_FORMS`), on zeros (zeros for pads too: the kernels take the
        noise)."""
        for shape in set(linears.values()):
            _pad_rows(torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype), self.pad_scale,
                      self.pinned_buffer(shape, dtype))
        for operand in {(t.shape, t.stride()): t for pair in matmuls.values() for t in pair}.values():
            _pad_tensor(operand, torch.zeros(operand.shape, dtype=dtype), self.pad_scale,
                        self._result(operand.shape, dtype))
        for name, (a, b) in matmuls.items():
            # the scores, their operands padded as the inference has them: each form of their cross terms where the
            # integer form's two int32 products fit in INTEGER_BYTES, else the float32 form (its sum's forms)
            blocks = _scores_blocks((products or {}).get(name))
            if not blocks:
                continue
            self.matmul_pads = {name: (torch.zeros(a.shape, dtype=dtype), torch.zeros(b.shape, dtype=dtype))}
            secret, c = self.protect_matmul(a, b, name)[2], torch.zeros(blocks.shape, dtype=dtype)
            if dtype in INTEGER_DTYPES and 2 * 4 * math.prod(a.shape[:-1]) * b.shape[-1] <= INTEGER_BYTES:
                kernels.pick(SCORES_CROSS, a, {form: lambda f=f: f(*secret, c, blocks.scores)
                                               for form, f in CROSS_FORMS.items()})
            else:
                _float32_cross(*secret, c, blocks.scores)
        # the fused hops, on zero pads: every matmul's, and the linears' at each hop's ends
        self.matmul_pads = {name: tuple(torch.zeros(t.shape, dtype=dtype) for t in pair) for name, pair in matmuls.items()}
        self.linear_pads = {name: (torch.zeros(linears[name], dtype=dtype),
                                   torch.zeros(*linears[name][:-1], outputs[name], dtype=dtype))
                            for name in {name for hop in hops for name in (hop[0], hop[-1])} - set(matmuls)}
        self._warm_hops(linears, outputs, dtype, hops)
        self._warm_attention_hops(matmuls, attention)
        self.linear_pads, self.matmul_pads = {}, {}

    def protect_linear(self, x, name):
        noise, projected = self.linear_pads[name]
        masked, sigma = _pad_rows(x, noise, self.pad_scale, self.pinned_buffer(x.shape, x.dtype))
        return masked, (projected, sigma)

    def recover_linear(self, z, secret):
        projected, sigma = secret
        # one addcmul in the model's dtype, computed in float32 and rounded once (VM, 512 x 16384 float16:
        # 0.55 ms, against 2.6 with a float32 N·Wᵀ and 3.8-4.1 mixing dtypes)
        return torch.addcmul(z, sigma, projected)

    def hop(self, z, secret, bias, op, op_args, name):
        """In the form set-up picked at z's shape for the op: one TEE kernel (`_add_op_pad`), or one C++ call
        (`native.otp_linear_hop`) where the op is SiLU·up or the residual sum's RMSNorm and no bias comes in."""
        projected, sigma = secret
        noise, next_projected = self.linear_pads[name]
        out = self.pinned_buffer(noise.shape, z.dtype)

        def one_kernel():
            return fused(_add_op_pad, op)(z, sigma, projected, bias, op_args, noise, self.pad_scale, out)

        one_pass = functools.partial(self._linear_hop_one_pass, z, secret, op, op_args, noise, out)
        usable = (bias is None and op in (gated, sum_and_norm)
                  and all(t.is_contiguous() and t.dtype == z.dtype for t in (z, sigma, projected, noise, *op_args[:1])))
        kept, masked, next_sigma = native.in_picked_form(f"{OTP_LINEAR_HOP}_{op.__name__}", z, {STEPS: one_kernel},
                                                         one_pass, usable, native.ANY_DTYPES)
        return kept, masked, (next_projected, next_sigma)

    def _linear_hop_one_pass(self, z: torch.Tensor, secret: tuple[torch.Tensor, torch.Tensor], op: Callable,
                             op_args: tuple, noise: torch.Tensor, out: torch.Tensor | None
                             ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """`_add_op_pad`'s (kept, padded, next row scales) in one C++ call (`native.otp_linear_hop`), for z's
        `secret` (protect_linear's), SiLU·up (`gated`) or the residual sum's RMSNorm (`sum_and_norm`), and the next
        linear's `noise`, the padded input into `out` where given."""
        projected, sigma = secret
        norm = None if op is gated else op_args  # (x, the weight times √W, W·eps)
        kept = None if norm is None else torch.empty_like(z)  # the residual stream, which the layer keeps
        masked = torch.empty(noise.shape, dtype=z.dtype) if out is None else out
        return kept, masked, native.otp_linear_hop(z, sigma, projected, norm, noise, self.pad_scale, masked, kept)

    def protect_matmul(self, a, b, name):
        masked_a, masked_b, pad_a, pad_b = _pad_both(kernels.as_chosen, a, b, *self._pad_args(name, a.dtype))
        return masked_a, masked_b, (a, pad_a, pad_b, masked_b)

    def _pad_args(self, name: str, dtype: torch.dtype) -> tuple:
        """`_pad_both`'s arguments after the operands: matmul `name`'s pads, and where its results go."""
        noise_a, noise_b = self.matmul_pads[name]
        return noise_a, noise_b, self.pad_scale, *(self._result(t.shape, dtype) for t in (noise_a, noise_b))

    def rope_hop(self, z, secret, bias, op, op_args, name):
        """In the form set-up picked at z's shape: one TEE kernel (`_add_op_pad_both`), or one C++ call
        (`native.otp_rope_hop`) where no bias comes in."""
        projected, sigma = secret
        pad_args = self._pad_args(name, z.dtype)

        def one_kernel():
            return fused(_add_op_pad_both, op, exact=True)(z, sigma, projected, bias, op_args, *pad_args)

        usable = bias is None and op is rotated_heads and all(
            t.is_contiguous() and t.dtype == z.dtype for t in (z, sigma, projected, *op_args[:2], op_args[-1],
                                                                *pad_args[:2]))
        one_pass = functools.partial(self._rope_hop_one_pass, z, secret, op_args, pad_args)
        kept, masked_a, masked_b, a, pad_a, pad_b = native.in_picked_form(OTP_ROPE_HOP, z, {STEPS: one_kernel},
                                                                          one_pass, usable, native.ANY_DTYPES)
        return kept, masked_a, masked_b, (a, pad_a, pad_b, masked_b)

    @staticmethod
    def _rope_hop_one_pass(z: torch.Tensor, secret: tuple[torch.Tensor, torch.Tensor], op_args: tuple,
                           pad_args: tuple) -> tuple[torch.Tensor, ...]:
        """`_add_op_pad_both`'s values with `rotated_heads` in one C++ call (`native.otp_rope_hop`), for z's `secret`
        (protect_linear's), RoPE's arguments and the scores' pads (`_pad_args`)."""
        projected, sigma = secret
        return native.otp_rope_hop(z, sigma, projected, *op_args, *pad_args)

    def attend_hop(self, c, secret, product, op, op_args, name):
        noise, projected = self.linear_pads[name]
        kept, masked, sigma = fused(_cross_op_pad, op)(*secret, c, product, op_args, noise, self.pad_scale,
                                                       self.pinned_buffer(noise.shape, c.dtype))
        return kept, masked, (projected, sigma)

    def recover_matmul(self, c, secret, product=grouped_matmul):
        """c + A R₂ + R₁ (B − R₂), in the GPU's own form (where the scores are their causal block triangle, so
        are the cross terms): twice the matmul itself, in the TEE, the price of no strippable mask. The scores'
        in the form set-up picked (`CROSS_FORMS`), the rest in float32."""
        form = kernels.picked(SCORES_CROSS, secret[0], FLOAT32) if _scores_blocks(product) else FLOAT32
        return CROSS_FORMS[form](*secret, c, product)


def _float32_cross(a: torch.Tensor, pad_a: torch.Tensor, pad_b: torch.Tensor, masked_b: torch.Tensor, c: torch.Tensor,
                   product: Callable) -> torch.Tensor:
    """otp's matmul recovered, c + A R₂ + R₁ (B − R₂), the cross terms as float32 products in the form `product`
    gives (`_cross_terms`), added to c in float32 and rounded once: in place then rounded, or in one pass in C++
    (`native.add_cross_terms`), as set-up picked at c's shape (VM, 4.7 M float16 scores: 1.38 ms against 0.53 in
    set-up, fortieth round)."""
    cross = _cross_terms(a, pad_a, pad_b, masked_b, product)
    return native.in_picked_form(ADD_CROSS_TERMS, c, {STEPS: lambda: cross.add_(c).to(c.dtype)},
                                 lambda: native.add_cross_terms(cross, c, torch.empty_like(c)), c.is_contiguous(),
                                 native.ANY_DTYPES)


def _cross_terms(a: torch.Tensor, pad_a: torch.Tensor, pad_b: torch.Tensor, masked_b: torch.Tensor, product: Callable
                 ) -> torch.Tensor:
    """otp's cross terms A R₂ + R₁ (B − R₂) as float32 products in the form `product` gives, each one product a KV
    group (`stacked_matmul`)."""
    if a.dim() == 4:  # the product keeps the inner dimension whole: both terms as one product,
        # [A | R₁] [R₂ ; B − R₂], which writes the answer once (VM, 1B shape, 512 tokens: 11.5 ms, not 13.2);
        # the scores' causal blocks, or the full product
        operands = _side_by_side(a, pad_a, pad_b, masked_b, a.shape[-1])
        cross = product(*operands) if _scores_blocks(product) else stacked_matmul(*operands)
    else:  # packed probabilities: the same, a row block at a time, against the keys that block sees (VM, 1B
        # shape, 512 tokens: 10.6 ms against 11.8 for the two terms apart)
        blocks = product.__self__
        cross = torch.cat([stacked_matmul(*_side_by_side(block, pad_block, pad_b[..., :end, :],
                                                         masked_b[..., :end, :], end))
                           for (_, end), block, pad_block in zip(blocks.spans, blocks.views(a), blocks.views(pad_a))],
                          dim=-2)
    return cross


def _side_by_side(a: torch.Tensor, pad_a: torch.Tensor, pad_b: torch.Tensor, masked_b: torch.Tensor, k: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """[A | R₁] and [R₂ ; B − R₂] in float32, for a product over an inner dimension of k each."""
    f32 = torch.float32
    left = torch.cat([a, pad_a], dim=-1, out=a.new_empty((*a.shape[:-1], 2 * k), dtype=f32))
    right = torch.cat([pad_b, masked_b], dim=-2, out=a.new_empty((*pad_b.shape[:-2], 2 * k, pad_b.shape[-1]), dtype=f32))
    return left, right


# otp's scores' cross terms may be integer products (`_integer_scores`): each entry of [A | R₁] becomes two int8
# digits of one scale per row, x = s·(128·high + low) up to s/2, and each of [R₂ ; B − R₂] two of one scale per
# column. |x| / s is at most DIGITS, so high is within ±127 and low within ±64.
DIGITS = 127 * 128
FLOAT32, INTEGER = "float32", "integer"
SCORES_CROSS = "otp_scores_cross_terms"  # the step's name where set-up picks its form (`kernels.pick`)
INTEGER_DTYPES = (torch.float16, torch.bfloat16)  # whose 11 or 8 significant bits the two digits' 14 cover
# The integer products are the full n×n ones, two int32 tensors of them: 64 MiB at 32 heads x 512 tokens, but
# 1 GiB at 2048 and 8 GiB at batch 8, four times the float32 form's packed blocks. Set-up offers the integer
# form only where they hold at most this much.
INTEGER_BYTES = 256 * 2 ** 20


def _digits(x: torch.Tensor, dim: int, high_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x (float32) as two int8 digits along `dim`, one scale per slice across it: (the digits, high then low
    or low then high, concatenated along `dim`; the scales, float32)."""
    scale = x.abs().amax(dim, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny) / DIGITS
    whole = torch.round(x / scale)
    high = torch.round(whole / 128)
    parts = [high, whole - 128 * high]
    return torch.cat(parts if high_first else parts[::-1], dim=dim).to(torch.int8), scale


@tee_kernel
def _row_digits(a: torch.Tensor, pad_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[A | R₁] [B, H, n, 2k] as digits [high | low] [B, H, n, 4k], a scale per row [B, H, n, 1]."""
    return _digits(torch.cat([a, pad_a], dim=-1).float(), -1, high_first=True)


@tee_kernel
def _column_digits(pad_b: torch.Tensor, masked_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[R₂ ; B − R₂] [B, G, 2k, m] as digits [low ; high] [B, G, 4k, m], a scale per column [B, G, 1, m]."""
    return _digits(torch.cat([pad_b, masked_b], dim=-2).float(), -2, high_first=False)


@tee_kernel
def _joined_digits(c: torch.Tensor, high: torch.Tensor, middle: torch.Tensor, row_scale: torch.Tensor,
                   column_scale: torch.Tensor, starts: tuple[int, ...]) -> torch.Tensor:
    """c + the cross terms from the digits' products (high·high, and high·low + low·high, each [B, G, H/G·n, m]),
    scaled, in c's form (its causal blocks packed, where `starts` makes more than one), added in float32 and
    rounded once."""
    batch, groups, rows, m = high.shape
    n = starts[-1]
    per = rows // n
    cross = ((high.float() * 128 * 128 + middle.float() * 128).view(batch, groups, per, n, m)
             * row_scale.view(batch, groups, per, n, 1) * column_scale.view(batch, groups, 1, 1, m))
    cross = cross.view(batch, groups * per, n, m)
    if len(starts) > 2:
        cross = torch.cat([cross[..., start:end, :end].reshape(-1) for start, end in zip(starts[:-1], starts[1:])])
    return (cross + c.float()).to(c.dtype)


def _integer_scores(a: torch.Tensor, pad_a: torch.Tensor, pad_b: torch.Tensor, masked_b: torch.Tensor,
                    c: torch.Tensor, product: Callable) -> torch.Tensor:
    """`_float32_cross` of the scores, with both cross terms as int8 products with int32 sums (`torch._int_mm`,
    which the CPU's matrix units run: VNNI, AMX), two a KV group: high·high, and high·low + low·high as one
    product over the digits side by side; low·low, 2⁻¹⁴ of the rest, is left out. Every entry of [A | R₁] is
    within 2⁻¹⁵ of its row's largest, and of [R₂ ; B − R₂] of its column's, before c's own float16 rounding
    (2⁻¹¹). The products are the full n×n ones: the causal blocks are taken from them as they are added to c."""
    batch, heads, n, k = a.shape
    groups, m = pad_b.shape[1], pad_b.shape[-1]
    left, row_scale = _row_digits(a, pad_a)
    right, column_scale = _column_digits(pad_b, masked_b)
    rows = left.view(batch, groups, heads // groups * n, 4 * k)
    high = torch.empty(batch, groups, rows.shape[2], m, dtype=torch.int32)
    middle = torch.empty_like(high)
    for b in range(batch):
        for g in range(groups):
            torch._int_mm(rows[b, g, :, : 2 * k], right[b, g, 2 * k:], out=high[b, g])
            torch._int_mm(rows[b, g], right[b, g], out=middle[b, g])
    blocks = _scores_blocks(product)
    return _joined_digits(c, high, middle, row_scale, column_scale, blocks.starts if blocks else (0, n))


def _scores_blocks(product: Callable | None) -> CausalBlocks | None:
    """The causal blocks whose scores `product` computes (`CausalBlocks.scores`: the engine's form of q·kᵀ, one
    block or more), or None for any other product (P·V's, or the plain full product)."""
    blocks = getattr(product, "__self__", None)
    return blocks if isinstance(blocks, CausalBlocks) and product.__func__ is CausalBlocks.scores else None


# the scores' cross terms in each form; set-up keeps the faster at each shape in half precision. P·V's stay in
# float32: as integer products of the full n×n probabilities (one per KV group) they took 21 ms against 10 at
# the 1B shape and 512 tokens on the 2-core VM, most of it in making the probabilities' digits
CROSS_FORMS = {FLOAT32: _float32_cross, INTEGER: _integer_scores}


def _add_op_pad(form: Callable, op: Callable, z: torch.Tensor, sigma: torch.Tensor, projected: torch.Tensor,
                bias: torch.Tensor | None, op_args: tuple, noise: torch.Tensor, pad_scale: float,
                out: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """otp's hop (`Plain.hop`): recover z, add the bias, op, pad its result."""
    y = torch.addcmul(z, sigma, projected)
    kept, h = op(form, y if bias is None else torch.add(y, bias), *op_args)
    masked, next_sigma = form(_pad_rows)(h, noise, pad_scale, out)
    return kept, masked, next_sigma


def _cross_op_pad(form: Callable, op: Callable, a: torch.Tensor, pad_a: torch.Tensor, pad_b: torch.Tensor,
                  masked_b: torch.Tensor, c: torch.Tensor, product: Callable, op_args: tuple, noise: torch.Tensor,
                  pad_scale: float, out: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """otp's hop from a matmul to a linear (`Plain.attend_hop`): recover c with float32 cross terms, op -> (kept, x),
    pad x's rows: (kept, x padded, its row scales)."""
    # added to c and rounded in the kernel, which a compiler fuses (no C++ call inside a traced kernel)
    kept, x = op(form, _cross_terms(a, pad_a, pad_b, masked_b, product).add_(c).to(c.dtype), *op_args)
    return (kept, *form(_pad_rows)(x, noise, pad_scale, out))


def _add_op_pad_both(form: Callable, op: Callable, z: torch.Tensor, sigma: torch.Tensor, projected: torch.Tensor,
                     bias: torch.Tensor | None, op_args: tuple, noise_a: torch.Tensor, noise_b: torch.Tensor,
                     pad_scale: float, out_a: torch.Tensor | None, out_b: torch.Tensor | None) -> tuple:
    """otp's hop from a linear to a matmul (`Plain.rope_hop`): recover z, add the bias, op -> (kept, (a, b)), pad
    both: (kept, a and b padded, a, a's pad, b's pad). Compiled exact: the pads are the very values recovery
    takes, as `_pad_tensor`'s are."""
    y = torch.addcmul(z, sigma, projected)
    kept, (a, b) = op(form, y if bias is None else torch.add(y, bias), *op_args)
    masked_a, masked_b, pad_a, pad_b = _pad_both(form, a, b, noise_a, noise_b, pad_scale, out_a, out_b)
    return kept, masked_a, masked_b, a, pad_a, pad_b


def _pad_both(form: Callable, a: torch.Tensor, b: torch.Tensor, noise_a: torch.Tensor, noise_b: torch.Tensor,
              pad_scale: float, out_a: torch.Tensor | None, out_b: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """otp's protect of a matmul's operands (`_pad_tensor` each, called as `form` gives it): (a and b padded, their
    pads)."""
    masked_b, pad_b = form(_pad_tensor)(b, noise_b, pad_scale, out_b)
    masked_a, pad_a = form(_pad_tensor)(a, noise_a, pad_scale, out_a)
    return masked_a, masked_b, pad_a, pad_b


@tee_kernel
def _pad_rows(x: torch.Tensor, noise: torch.Tensor, pad_scale: float, out: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """otp's protect: (X − diag(σ)·N, into `out` where given; σ), σ = pad_scale · each row's RMS.

    One scale per row: a pad sized for an outlier token would drown the others in rounding. The scale is
    rounded to the model's dtype, and recovery uses that very value, so the pad stays exact: then one
    addcmul in that dtype (computed in float32, rounded once), not an op mixing dtypes, which took
    PyTorch's casting path (VM, 512 x 8192 float16: 0.27 ms against 2.2-2.5)."""
    sigma = (pad_scale * _row_rms(x)).to(x.dtype)
    return torch.addcmul(x, sigma, noise, value=-1, out=out), sigma


@tee_kernel(exact=True)  # the pad subtracted is the one recovery adds back
def _pad_tensor(x: torch.Tensor, noise: torch.Tensor, pad_scale: float, out: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """otp's protect of a matmul operand: (X − σ·N, into `out` where given; the pad σ·N), σ = pad_scale ·
    X's RMS, one scale for the whole tensor. The pad is kept in x's dtype, and recovery uses those very
    values. Compiled, one pass to measure X and one to pad it: both matmuls' four operands, laid out as in
    the inference, took 1.2 ms per layer (1B shape, 512 tokens, float16, 2-core VM), against 1.7 eager."""
    pad = noise * (pad_scale * _rms(x)).to(x.dtype)
    return torch.sub(x, pad, out=out), pad


WEIGHT_BLOCK_BYTES = 64 * 2 ** 20  # the float32 rows of a weight that otp's offline phase converts at a time


def _float32_product(x: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype, block_bytes: int | None = None
                     ) -> torch.Tensor:
    """x Wᵀ multiplied in float32 on x's device (the TEE) and kept in `dtype`.

    float32 because the CPU multiplies it far faster than half precision (VM, default model, 512 tokens:
    otp's offline phase 0.75 s against 2.4 s); kept in the model's dtype, as a half-precision product
    was before (the logits come out the same). W, wherever it lives, is fetched and converted a block of
    rows at a time: a float32 copy of the 1B shape's whole LM head would be 1 GiB, and it set the peak of
    otp's offline phase (VM, 512 tokens, float16: 2072 MiB over the setup before, 919 after, of which the
    pads are 784); a whole fetch of it from the GPU would still be 501 MiB."""
    x32, rows = x.float(), max(1, (block_bytes or WEIGHT_BLOCK_BYTES) // (4 * weight.shape[1]))
    out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=dtype)
    for start in range(0, weight.shape[0], rows):
        out[..., start:start + rows] = x32 @ weight[start:start + rows].to(x.device).float().T
    return out


@tee_kernel
def _mix_rows(x3: torch.Tensor, d: torch.Tensor, a: torch.Tensor, b_t_over_d: torch.Tensor,
              dummy: torch.Tensor | None, out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """ours' protect: (M·diag(1/r)·X in x's dtype, into `out` where given; D·diag(1/r)) for x3 [S, n, d],
    M = D + ABᵀ, the dummy rows (if any) appended to X first with r = 1.

    Mixes unit-RMS rows: one outlier token (an attention sink) would otherwise dominate BᵀX and drown every
    other row in half-precision rounding; it also hides row norms. In half precision, a float32 copy, then
    in place: ops mixing float16 and float32 run ~2x slower. Compiled, two passes over x: 0.12 / 0.52 ms
    at 512 x 2048 / 8192 in float16 on the 2-core VM, against 0.24 / 1.8 eager. A float32 x is only read:
    the row scale goes into Bᵀ's k×n rows rather than into a copy of X before the product, so that eager
    reads x twice and writes the result once (2-core VM, 128 rows of 576 / 1536 / 2048: 42 / 72 / 88 µs,
    against 69 / 115 / 138 scaling a copy first). In float16 that order measured no faster."""
    rows = x3.float()  # x itself in float32: read, never written
    norms = _row_rms(rows)
    if dummy is not None:
        rows = torch.cat([rows, dummy], dim=1)
        norms = torch.cat([norms, norms.new_ones(norms.shape[0], dummy.shape[1], 1)], dim=1)
    scale = d[..., None] / norms                                       # D diag(1/r)
    if rows is x3:  # float32, no dummy rows: x is only read, the row scale goes into Bᵀ's rows
        shared = (b_t_over_d * scale.transpose(1, 2)) @ x3             # Bᵀ diag(1/r) X, k×d
        return _add_low_rank(torch.mul(x3, scale, out=out), a, shared), scale
    rows.mul_(scale)                                                   # D diag(1/r) X
    shared = b_t_over_d @ rows                                         # Bᵀ diag(1/r) X, k×d
    mixed = _add_low_rank(rows, a, shared)                             # (D + ABᵀ) diag(1/r) X
    # in float32 `.to` is no copy at all, where `copy_` into a buffer would be one pass more
    return (mixed.to(x3.dtype) if out is None else out.copy_(mixed)), scale


def _unmix_op_mix(form: Callable, op: Callable, z3: torch.Tensor, woodbury_rows: torch.Tensor, a: torch.Tensor,
                  scale: torch.Tensor, n: int, bias: torch.Tensor | None, op_args: tuple, d: torch.Tensor,
                  a_next: torch.Tensor, b_t_over_d: torch.Tensor, dummy: torch.Tensor | None, out: torch.Tensor | None
                  ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """ours' hop (`Plain.hop`): unmix z3's rows (the first n of each sequence), add the bias, op, mix its result."""
    y = form(_unmix_rows)(z3, woodbury_rows, a, scale)[:, :n]
    kept, h = op(form, y if bias is None else torch.add(y, bias), *op_args)
    mixed, next_scale = form(_mix_rows)(h, d, a_next, b_t_over_d, dummy, out)
    return kept, mixed, next_scale


def _unpermute_op_mix(form: Callable, op: Callable, c: torch.Tensor, d1: torch.Tensor, d3: torch.Tensor,
                      rows: torch.Tensor, cols: torch.Tensor, op_args: tuple, *mix_args
                      ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """ours' hop from a matmul to a linear (`Plain.attend_hop`): unscale and unpermute c [B, H, n, m] (`rows` and
    `cols` the inverse permutations' indices), op -> (kept, x [B, n, d]), mix x's rows (`_mix_rows`): (kept, x
    mixed, its scale)."""
    batch, heads, n, m = c.shape
    c5 = form(_unscale_rows_cols)(c.view(batch, d3.shape[1], heads // d3.shape[1], n, m), d1, d3)
    kept, x = op(form, _permute(c5, rows, cols).view(c.shape), *op_args)
    return (kept, *form(_mix_rows)(x, *mix_args))


def _unmix_op_permute(form: Callable, op: Callable, z3: torch.Tensor, woodbury_rows: torch.Tensor, a: torch.Tensor,
                      scale: torch.Tensor, n: int, bias: torch.Tensor | None, op_args: tuple, *permute_args
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ours' hop from a linear to a matmul (`Plain.rope_hop`): unmix z3's rows (the first n of each sequence), add
    the bias, op -> (kept, (a, b)), mask both (`_permute_scale`): (kept, a and b masked)."""
    y = form(_unmix_rows)(z3, woodbury_rows, a, scale)[:, :n]
    kept, (left, right) = op(form, y if bias is None else torch.add(y, bias), *op_args)
    return (kept, *_permute_scale(form, left, right, *permute_args))


def _permute_scale(form: Callable, a: torch.Tensor, b: torch.Tensor, a_rows: torch.Tensor, cols_a: torch.Tensor,
                   d1: torch.Tensor, d2: torch.Tensor, b_rows: torch.Tensor, cols_b: torch.Tensor, b_scale: torch.Tensor,
                   out_a: torch.Tensor | None, out_b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """ours' protect of a matmul's operands, into `out_a` and `out_b` where given: A' = D₁P₁ A P₂D₂ [B, H, n, k]
    and B' = D₂⁻¹P₂⁻¹ B P₃D₃, `_scale_rows_cols` called as `form` gives it."""
    batch, heads, n, k = a.shape
    groups = b.shape[1]
    a5 = _permute(a.reshape(batch, groups, heads // groups, n, k), a_rows, cols_a, out_a)
    form(_scale_rows_cols)(a5, d1, d2)                                                  # D₁P₁ A P₂D₂
    b4 = _permute(b, b_rows, cols_b, out_b)                                             # P₂⁻¹ B P₃
    return a5.view(a.shape), b4.mul_(b_scale)                                           # D₂⁻¹ · · D₃


def _rows_of(z: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The GPU's answer z as [sequences, rows, out], the rows `_mix_rows` mixed (`scale` has one per row)."""
    return z.reshape(scale.shape[0], scale.shape[1], z.shape[-1])


@tee_kernel
def _unmix_rows(z3: torch.Tensor, woodbury_rows: torch.Tensor, a: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """ours' recovery: diag(r) M⁻¹ Z for the GPU's z3 [S, rows, out], in z's dtype, by Woodbury, in
    O(n·k·out), never forming M:  M⁻¹Z = D⁻¹ (Z − A G⁻¹BᵀD⁻¹Z),  G = I + BᵀD⁻¹A. May overwrite z3.
    Compiled: 0.97 ms at 512 x 16384 in float16 on the 2-core VM, against 3.3 eager."""
    zf = z3.float()
    shared = woodbury_rows @ zf
    return _add_low_rank(zf, a, shared, alpha=-1).div_(scale).to(z3.dtype)


@tee_kernel
def _scale_rows_cols(x5: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """x5 [B, G, R, n, m] times rows [B, G, R, n] down its rows and cols [B, G, m] along them, in place:
    compiled, one pass over the n² probabilities (0.43 ms at 32 heads x 512² in float16 on the 2-core VM,
    against 0.99 for two)."""
    return x5.mul_(rows[..., None]).mul_(cols[:, :, None, None, :])


@tee_kernel
def _unscale_rows_cols(x5: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """`_scale_rows_cols` undone: divided by the very values it multiplied by, in place."""
    return x5.div_(rows[..., None]).div_(cols[:, :, None, None, :])


@tee_kernel
def _unscale_hide(c5: torch.Tensor, d1: torch.Tensor, d3: torch.Tensor, rows: torch.Tensor, keys: torch.Tensor
                  ) -> torch.Tensor:
    """`_unscale_rows_cols`, then `tee_ops._hide_later_keys`, as one kernel: ours' scores kept in their masks'
    order unscaled in place, and BLOCKED wherever key position keys[j] > query position rows[i] (int32); one
    pass where the two make two, the same values. 2-core VM, 1B shape, float16, compiled, with the softmax
    and P·V's protect after it: 0.35-0.39 ms at 128 tokens against 0.38-0.47 for the two kernels, 6.3-7.0
    against 6.3-7.4 at 512 (`kernel_bench`'s softmax hop, and alone)."""
    return _hide_later_keys.eager(_unscale_rows_cols.eager(c5, d1, d3), rows, keys)


def _drawn_by_shape(shapes: dict[str, object], draw: Callable[[object, int], dict[str, torch.Tensor]]
                    ) -> dict[str, dict[str, torch.Tensor]]:
    """Each name's masks, drawn for all the names of one shape at once (`draw(shape, count)` stacks them along a
    first dimension), as views of those stacks: a few ops a shape instead of a few dozen a mask (ours' offline
    phase, 2-core VM, float32, 128 tokens: the default model's 181 masks, and the 1B preset's 97)."""
    names_of: dict[object, list[str]] = {}
    for name, shape in shapes.items():
        names_of.setdefault(shape, []).append(name)
    masks = {}
    for shape, names in names_of.items():
        views = {key: t.unbind(0) for key, t in draw(shape, len(names)).items()}
        masks.update({name: {key: views[key][i] for key in views} for i, name in enumerate(names)})
    return masks


def _inverse(perm: torch.Tensor) -> torch.Tensor:
    """The inverse of each permutation of the last dimension: a scatter, where an argsort sorts (2-core VM, 512
    rows of 128: 0.03 ms against 0.71)."""
    return torch.empty_like(perm).scatter_(-1, perm, torch.arange(perm.shape[-1]).expand(perm.shape))


def _row_index(perm: torch.Tensor, stacked: bool = False) -> torch.Tensor:
    """The flat index `_permute` selects rows with for `perm` (one permutation per matrix, over its rows):
    each matrix's permuted rows, offset to where that matrix's rows start among all of them; `stacked`: for
    masks stacked along perm's first dimension, each mask's own index (a row of the result)."""
    rows = perm.shape[-1]
    per_mask = perm[0].numel() if stacked else perm.numel()
    offsets = torch.arange(0, per_mask, rows).view(*perm.shape[int(stacked):-1], 1)
    index = perm + offsets
    return index.reshape(perm.shape[0], -1) if stacked else index.reshape(-1)


def _col_index(perm: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """The index `_permute` gathers columns with for `perm` [..., B, G, m] (one permutation per batch and group,
    shared by all its rows and heads) over an operand of `shape` [B, G, ..., m]: a view of perm, no copy (of
    stacked masks' `perm`, each mask's index is a view of one of them)."""
    lead = perm.shape[:-3]
    return perm.view(*perm.shape[:-1], *[1] * (len(shape) - 3), perm.shape[-1]).expand(*lead, *shape)


def _permute(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """out[b, g, ..., i, j] = x[b, g, ..., perm_r(i), perm_c(j)] for rows = `_row_index(perm_r)` and cols =
    `_col_index(perm_c, x.shape)`; into `out` where given (x's shape, contiguous).

    A permutation only moves values, so both steps move the raw bits (an integer view of the same width):
    one index_select over the flattened rows (a row copy, far cheaper than a broadcast gather), then one
    broadcast gather along them, which PyTorch runs several times faster on integers than on half
    precision. Measured on the 2-core VM, float16, 8 groups of 4 heads x 512²: the gather 1.7 ms, against
    10 ms for a float16 gather and 7 ms for indexing per (batch, group). Both steps on one integer view, with
    the column index made offline, make 7 host calls where the two steps apart made 9, in the same time at
    the 1B shape."""
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    picked = x.view(bits).reshape(-1, x.shape[-1]).index_select(0, rows).view(x.shape)
    return torch.gather(picked, -1, cols, out=None if out is None else out.view(bits)).view(x.dtype)


def _storage_bytes(tensors: list[torch.Tensor]) -> int:
    """The bytes of memory the tensors hold, each storage once (views share one: `_col_index`)."""
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def _row_rms(x: torch.Tensor) -> torch.Tensor:
    """float32 RMS of each row (last dimension), kept as a column and kept away from zero.

    Of a float32 copy: PyTorch's norm accumulating half precision in float32 (`dtype=`) is slower than
    converting first (VM, 512 x 8192 float16: 0.55 ms against 0.31 with the conversion)."""
    norms = torch.linalg.vector_norm(x.float(), dim=-1, keepdim=True)
    return norms.mul_(x.shape[-1] ** -0.5).clamp_min_(1e-12)


def _add_low_rank(y: torch.Tensor, a: torch.Tensor, shared: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """y += alpha · A·shared in place, A [S, R, k], shared [S, k, d]. At k = 1 an outer product: a broadcast
    multiply-add, not a batched matrix product with an inner dimension of 1."""
    if a.shape[-1] == 1:
        return y.addcmul_(a, shared, value=alpha)
    return y.baddbmm_(a, shared, alpha=alpha)


def _rms(x: torch.Tensor) -> torch.Tensor:
    """RMS of a whole tensor, a float32 scalar tensor (of a float32 copy, as `_row_rms`: VM, 4.7 M float16
    values, 0.57 ms against 0.93); a tensor, not a number, so that a compiled kernel takes it whole."""
    return torch.linalg.vector_norm(x.float()) * x.numel() ** -0.5


def _sequences(shape: tuple[int, ...]) -> tuple[int, int]:
    """(number of sequences, tokens per sequence) of a linear input; a 2-D input is one sequence of rows."""
    return (1, shape[0]) if len(shape) == 2 else (math.prod(shape[:-2]), shape[-2])


SCHEMES = {"plain": Plain, "matrix": Matrix, "otp": Otp}
RUNNERS = {"optimized": "plain", "ours": "matrix", "otp": "otp"}  # split runner -> the scheme it plugs in
RUNNER_OF = {scheme: runner for runner, scheme in RUNNERS.items()}  # scheme -> the split runner that plugs it in


def make_scheme(name: str, **kwargs) -> Plain:
    return SCHEMES[name](**kwargs)
