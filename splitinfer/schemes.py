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

import math
import secrets
from typing import Callable

import torch

from splitinfer.tee_ops import grouped_matmul

MaskShapes = dict[str, tuple[int, ...]]
MatmulShapes = dict[str, tuple[tuple[int, ...], tuple[int, ...]]]


class Plain:
    """No protection: the GPU sees every operand in the clear (and the token ids)."""

    name = "plain"
    encryption_scheme: str | None = None
    masked = False            # masked schemes keep token ids and biases in the TEE
    needs_tee_weights = False  # whether `prepare` needs the linear weights in the TEE
    steps = ("encryption", "decryption")  # how the JSON names the protect and recover steps

    def __init__(self, seed: int | None = None):
        self.generator = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)

    def prepare(self, linears: MaskShapes, matmuls: MatmulShapes,
                weights: Callable[[str], torch.Tensor] | None = None, dtype: torch.dtype = torch.float32) -> int:
        """Offline phase: draw every mask of one inference (`dtype` is the model's, for masks that may be
        stored in it; `weights` gives the TEE's copy of a linear's weight). Returns the bytes the masks hold."""
        return 0

    def protect_linear(self, x: torch.Tensor, name: str) -> tuple[torch.Tensor, object]:
        return x, None

    def recover_linear(self, z: torch.Tensor, secret: object) -> torch.Tensor:
        return z

    def protect_matmul(self, a: torch.Tensor, b: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor, object]:
        return a, b, None

    def recover_matmul(self, c: torch.Tensor, secret: object) -> torch.Tensor:
        return c

    # ---- mask distributions, shared by the masked schemes ----

    def _signed_uniform(self, shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
        """Magnitudes uniform in [low, high], signs random: bounded away from 0, so division is stable."""
        magnitude = torch.empty(shape).uniform_(low, high, generator=self.generator)
        sign = torch.randint(0, 2, shape, generator=self.generator) * 2 - 1
        return magnitude * sign

    def _permutations(self, shape: tuple[int, ...]) -> torch.Tensor:
        """Uniformly random permutations of the last dimension (argsort of uniform draws)."""
        return torch.rand(shape, generator=self.generator).argsort(dim=-1)


class Matrix(Plain):
    """`ours`: token-mixing matrix M = D + A Bᵀ (A, B n×k; k = 1 is the original D + αβᵀ) for linears,
    permutation and diagonal masks for matmuls.

    Linear:  the GPU gets M X and returns M (X Wᵀ); the TEE applies M⁻¹ by Woodbury (Sherman–Morrison at k = 1).
    Matmul:  A' = D₁P₁ A P₂D₂,  B' = D₂⁻¹P₂⁻¹ B P₃D₃,  so A'B' = D₁P₁ (AB) P₃D₃.
    """

    name = "matrix"
    encryption_scheme = "matrix transformation (D + ABᵀ token mixing; permutation-diagonal matmul masks)"
    masked = True
    D_RANGE = (1.0, 2.0)        # |diagonal entries|, signs random: recovery divides by at most 1
    LOW_RANK_RANGE = (0.5, 1.5)  # |A_ij|, |B_ij| before the (n^(1/4)·√k) scaling that keeps ABᵀX about as large as DX

    def __init__(self, seed: int | None = None, rank: int = 1, mix_scale: float = 1.0):
        super().__init__(seed)
        self.rank, self.mix_scale = rank, mix_scale
        if rank > 1 or mix_scale != 1.0:
            self.encryption_scheme = self.encryption_scheme.replace("ABᵀ", f"ABᵀ, rank {rank}, mix scale {mix_scale:g}")

    def prepare(self, linears, matmuls, weights=None, dtype=torch.float32) -> int:
        self.linear_masks = {name: self._mixing_mask(shape) for name, shape in linears.items()}
        self.matmul_masks = {name: self._matmul_mask(a, b) for name, (a, b) in matmuls.items()}
        tensors = [t for m in (*self.linear_masks.values(), *self.matmul_masks.values()) for t in m.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def _mixing_mask(self, shape: tuple[int, ...]) -> dict[str, torch.Tensor]:
        """D, A, B (and the k×k core of the Woodbury inverse) for every sequence of a [..., n, d] input,
        plus a dummy row where n is 1."""
        sequences, n = _sequences(shape)
        rows = max(n, 2)  # one row alone would only be scaled, not mixed: pad with a random dummy row
        d = self._signed_uniform((sequences, rows), *self.D_RANGE)
        spread = rows ** -0.25 / math.sqrt(self.rank)
        a = self._signed_uniform((sequences, rows, self.rank), *self.LOW_RANK_RANGE) * spread * self.mix_scale
        b = self._signed_uniform((sequences, rows, self.rank), *self.LOW_RANK_RANGE) * spread
        # Woodbury divides by G = I + BᵀD⁻¹A. Rotate B by the orthogonal Q = U Vᵀ from BᵀD⁻¹A = U S Vᵀ:
        # then G = I + V S Vᵀ is symmetric with every eigenvalue >= 1, so recovery never amplifies error.
        # At k = 1 this is flipping β's sign to make βᵀD⁻¹α >= 0, a measure-preserving map of the draws:
        # rejection sampling of the badly conditioned ones, without the loop.
        u, _, vh = torch.linalg.svd(b.transpose(1, 2) @ (a / d[..., None]))
        b = b @ (u @ vh)
        core = torch.eye(self.rank) + b.transpose(1, 2) @ (a / d[..., None])
        mask = {"d": d, "a": a, "b": b, "core_inverse": torch.linalg.inv(core)}
        if rows > n:
            mask["dummy"] = torch.randn((sequences, rows - n, shape[-1]), generator=self.generator)
        return mask

    def _matmul_mask(self, a: tuple[int, ...], b: tuple[int, ...]) -> dict[str, torch.Tensor]:
        batch, heads, n, k = a
        groups, m = b[1], b[3]
        per_head = (batch, groups, heads // groups)
        mask = {"p1": self._permutations((*per_head, n)), "d1": self._signed_uniform((*per_head, n), *self.D_RANGE),
                "p2": self._permutations((batch, groups, k)),
                "d2": self._signed_uniform((batch, groups, k), *self.D_RANGE),
                "p3": self._permutations((batch, groups, m)),
                "d3": self._signed_uniform((batch, groups, m), *self.D_RANGE)}
        mask["p1_inverse"], mask["p3_inverse"] = mask["p1"].argsort(-1), mask["p3"].argsort(-1)
        return mask

    def protect_linear(self, x, name):
        mask = self.linear_masks[name]
        sequences, n = _sequences(x.shape)
        xf = x.float().reshape(sequences, n, x.shape[-1])
        # Mix unit-RMS rows, i.e. send M·diag(1/r)·X: one outlier token (an attention sink) would otherwise
        # dominate BᵀX and drown every other row in half-precision rounding; it also hides row norms.
        norms = _row_rms(xf)[..., 0]
        if "dummy" in mask:
            xf = torch.cat([xf, mask["dummy"]], dim=1)
            norms = torch.cat([norms, torch.ones(sequences, xf.shape[1] - n)], dim=1)
        shared = (mask["b"] / norms[..., None]).transpose(1, 2) @ xf       # Bᵀ diag(1/r) X, k×d
        mixed = xf * (mask["d"] / norms)[..., None]                        # D diag(1/r) X
        mixed.baddbmm_(mask["a"], shared)                                  # + A Bᵀ diag(1/r) X
        shape = x.shape if "dummy" not in mask else (-1, x.shape[-1])
        return mixed.reshape(shape).to(x.dtype), (mask, x.shape, norms, n)

    def recover_linear(self, z, secret):
        mask, in_shape, norms, n = secret
        d, a, b = mask["d"], mask["a"], mask["b"]
        zf = z.float().reshape(d.shape[0], d.shape[1], z.shape[-1])
        # diag(r) M⁻¹ Z by Woodbury, in O(n·k·out), never forming M:
        #   M⁻¹Z = D⁻¹Z − D⁻¹A (I + BᵀD⁻¹A)⁻¹ BᵀD⁻¹Z
        shared = mask["core_inverse"] @ ((b / d[..., None]).transpose(1, 2) @ zf)
        y = zf * (norms / d)[..., None]
        y.baddbmm_(a * (norms / d)[..., None], shared, alpha=-1)
        return y[:, :n].reshape(*in_shape[:-1], z.shape[-1]).to(z.dtype)

    def protect_matmul(self, a, b, name):
        m = self.matmul_masks[name]
        batch, heads, n, k = a.shape
        groups = b.shape[1]
        a5 = _permute_rows(a.float().view(batch, groups, heads // groups, n, k), m["p1"])   # P₁ A
        a5 = _permute_cols(a5, m["p2"][:, :, None, None, :])                                # (P₁A) P₂
        a5.mul_(m["d1"][..., None]).mul_(m["d2"][:, :, None, None, :])                      # D₁ · · D₂
        b4 = _permute_cols(_permute_rows(b.float(), m["p2"]), m["p3"][:, :, None, :])       # P₂⁻¹ B P₃
        b4.div_(m["d2"][..., None]).mul_(m["d3"][:, :, None, :])                            # D₂⁻¹ · · D₃
        return a5.view(a.shape).to(a.dtype), b4.to(b.dtype), (m, groups)

    def recover_matmul(self, c, secret):
        m, groups = secret
        batch, heads, n, cols = c.shape
        c5 = c.float().view(batch, groups, heads // groups, n, cols)
        c5 = c5 / m["d1"][..., None]
        c5.div_(m["d3"][:, :, None, None, :])
        c5 = _permute_cols(_permute_rows(c5, m["p1_inverse"]), m["p3_inverse"][:, :, None, None, :])
        return c5.view(c.shape).to(c.dtype)


class Otp(Plain):
    """One-time pads: the GPU sees X − R; the TEE adds back R Wᵀ, computed offline.

    Pads are σ·N with N ~ N(0, 1) drawn offline and σ = pad_scale · rms taken online (per row for
    linears, per tensor for matmul operands), so that R Wᵀ = diag(σ) (N Wᵀ) is still precomputed. Matmuls use two independent pads and recover the cross terms
    in the TEE:  A B = (A − R₁)(B − R₂) + A R₂ + R₁ (B − R₂).
    """

    name = "otp"
    encryption_scheme = "additive one-time pads (offline R·Wᵀ; two-pad matmul with TEE cross terms)"
    masked = True
    needs_tee_weights = True
    steps = ("masking", "recovery")

    def __init__(self, seed: int | None = None, pad_scale: float = 1.0):
        super().__init__(seed)
        self.pad_scale = pad_scale

    def prepare(self, linears, matmuls, weights=None, dtype=torch.float32) -> int:
        self.linear_pads = {}
        for name, shape in linears.items():
            weight = weights(name)
            noise = torch.randn(shape, generator=self.generator).to(weight.dtype)
            # N Wᵀ costs as much as the linear itself; kept in float32 so recovery adds no rounding of its own
            projected = (noise @ weight.T).float()
            self.linear_pads[name] = (noise, projected)
        # The attention pads are exact in any dtype (masking and recovery use the same stored values), so they
        # are kept in the model's: half the memory of float32 for the largest pads, the [n, n] ones.
        self.matmul_pads = {name: (torch.randn(a, generator=self.generator).to(dtype),
                                   torch.randn(b, generator=self.generator).to(dtype))
                            for name, (a, b) in matmuls.items()}
        tensors = [t for pads in (*self.linear_pads.values(), *self.matmul_pads.values()) for t in pads]
        return sum(t.numel() * t.element_size() for t in tensors)

    def protect_linear(self, x, name):
        noise, projected = self.linear_pads[name]
        # One scale per row: a pad sized for an outlier token would drown the others in rounding.
        sigma = self.pad_scale * _row_rms(x.float())
        return (x.float() - sigma * noise.float()).to(x.dtype), (projected, sigma)

    def recover_linear(self, z, secret):
        projected, sigma = secret
        return (z.float() + sigma * projected).to(z.dtype)

    def protect_matmul(self, a, b, name):
        noise_a, noise_b = self.matmul_pads[name]
        pad_a = self.pad_scale * a.float().pow(2).mean().sqrt() * noise_a.float()
        pad_b = self.pad_scale * b.float().pow(2).mean().sqrt() * noise_b.float()
        masked_b = b.float() - pad_b
        return (a.float() - pad_a).to(a.dtype), masked_b.to(b.dtype), (a.float(), pad_a, pad_b, masked_b)

    def recover_matmul(self, c, secret):
        a, pad_a, pad_b, masked_b = secret
        # the two cross terms cost twice the matmul itself, in the TEE: the price of no strippable mask
        return (c.float() + grouped_matmul(a, pad_b) + grouped_matmul(pad_a, masked_b)).to(c.dtype)


def _permute_rows(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """out[..., i, :] = x[..., perm[..., i], :], one permutation per matrix (perm has x's shape less the last dim).

    A single index_select over the flattened rows: a row copy, far cheaper than a broadcast gather."""
    rows = x.shape[-2]
    offsets = torch.arange(0, perm.numel(), rows).view(*perm.shape[:-1], 1)
    return x.reshape(-1, x.shape[-1]).index_select(0, (perm + offsets).reshape(-1)).view(x.shape)


def _permute_cols(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """out[..., j] = x[..., perm[..., j]], with perm broadcast over the rows (and heads) it is shared by."""
    return torch.gather(x, -1, perm.expand(x.shape))


def _row_rms(x: torch.Tensor) -> torch.Tensor:
    """RMS of each row (last dimension), kept as a column and kept away from zero."""
    return x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)


def _sequences(shape: tuple[int, ...]) -> tuple[int, int]:
    """(number of sequences, tokens per sequence) of a linear input; a 2-D input is one sequence of rows."""
    return (1, shape[0]) if len(shape) == 2 else (math.prod(shape[:-2]), shape[-2])


SCHEMES = {"plain": Plain, "matrix": Matrix, "otp": Otp}
RUNNERS = {"optimized": "plain", "ours": "matrix", "otp": "otp"}  # split runner -> the scheme it plugs in


def make_scheme(name: str, **kwargs) -> Plain:
    return SCHEMES[name](**kwargs)
