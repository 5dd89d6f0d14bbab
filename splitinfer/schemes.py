"""Protection schemes: what the TEE does to a tensor before the GPU sees it, and after the GPU answers.

A scheme answers two questions, each with a protect and a recover step:
- linear:  the GPU computes Y' = X' Wᵀ from a protected X'; the TEE recovers Y = X Wᵀ.
- matmul:  the GPU computes C' = A' B' from protected A', B'; the TEE recovers C = A B.
`plain` protects nothing: it is the speed reference and the upper bound of what the GPU learns.
"""
from __future__ import annotations

import torch


class Plain:
    """No protection: the GPU sees every operand in the clear (and the token ids)."""

    name = "plain"
    encryption_scheme: str | None = None
    masked = False  # masked schemes keep token ids and biases in the TEE

    def __init__(self, seed: int | None = None):
        self.seed = seed

    def start_inference(self) -> None:
        """Called before each inference; masked schemes draw fresh masks here."""

    def protect_linear(self, x: torch.Tensor, weight: str) -> tuple[torch.Tensor, object]:
        return x, None

    def recover_linear(self, y: torch.Tensor, secret: object) -> torch.Tensor:
        return y

    def protect_matmul(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, object]:
        return a, b, None

    def recover_matmul(self, c: torch.Tensor, secret: object) -> torch.Tensor:
        return c


SCHEMES = {"plain": Plain}


def make_scheme(name: str, **kwargs) -> Plain:
    return SCHEMES[name](**kwargs)
