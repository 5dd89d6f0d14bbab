"""The nonlinear work the TEE keeps: RMSNorm, rotary embedding, masked softmax, SiLU-gated product.

Each follows transformers' LlamaForCausalLM numerics (float32 inside RMSNorm and softmax), so the
split engine can be compared with it at a tight tolerance.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


class Rotary:
    """Rotary tables from transformers' own RoPE initialisation (so llama3/linear/dynamic scaling come free)."""

    def __init__(self, config: LlamaConfig):
        self.embedding = LlamaRotaryEmbedding(config)

    def tables(self, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [n, head_dim] for positions 0..n-1."""
        positions = torch.arange(n).unsqueeze(0)
        cos, sin = self.embedding(torch.empty(0, dtype=dtype), positions)
        return cos[0], sin[0]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, heads, N, head_dim] by position."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def attention_bias(attention_mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive [B, 1, N, N] bias: 0 where query i may see key j (j <= i and j is a real token), else -inf-ish."""
    n = attention_mask.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    allowed = causal[None, None] & attention_mask[:, None, None, :].bool()
    bias = torch.zeros(allowed.shape, dtype=dtype)
    return bias.masked_fill_(~allowed, torch.finfo(dtype).min)


def masked_softmax(scores: torch.Tensor, scale: float, bias: torch.Tensor) -> torch.Tensor:
    """softmax(scores * scale + bias) over keys, computed in float32 and returned in the scores' dtype.

    `bias` is float32, so one fused add both scales and promotes: a third of the passes of the obvious form."""
    return torch.softmax(torch.add(bias, scores, alpha=scale), dim=-1).to(scores.dtype)


def silu_gate(gate_up: torch.Tensor) -> torch.Tensor:
    """SiLU(gate) * up, where gate_up holds [gate | up] along the last dimension."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def grouped_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a [B, H, n, k] @ b [B, G, k, m] -> [B, H, n, m], each group of H/G query heads sharing one b.

    The broadcast never materialises b per query head (GQA). The GPU's matmul and the TEE's
    recovery of cross terms both use it.
    """
    batch, heads, n, _ = a.shape
    groups = b.shape[1]
    return (a.reshape(batch, groups, heads // groups, n, -1) @ b.unsqueeze(2)).reshape(batch, heads, n, -1)
