"""Prompts to token ids: every runner builds the same [B, N] ids and attention mask from the same prompts."""
from __future__ import annotations

import torch

from splitinfer.errors import UserError


def read_prompts(path: str) -> list[str]:
    """Non-empty lines of a prompts file (lines starting with '#' are comments)."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.strip() for line in f]
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read prompts file '{path}': {e.strerror if isinstance(e, OSError) else e}") from None
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise UserError(f"prompts file '{path}' holds no prompt")
    return prompts


def fit_length(ids: list[int], n: int) -> list[int]:
    """Cut `ids` to n tokens, or repeat them until there are n."""
    if not ids:
        raise UserError("a prompt tokenized to no tokens")
    return (ids * -(-n // len(ids)))[:n]


def build_batch(tokenizer, prompts: list[str], n: int, batch: int, ragged: bool = False,
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """ids and attention mask [batch, n]: sequence b is prompt b (cycling), cut or repeated to n tokens.

    With `ragged`, sequence b keeps only n - b*ceil(n / 2batch) real tokens (at least 1), right-padded,
    so that padding masks are exercised; the last real position is what the logits are read at.
    """
    step = -(-n // (2 * batch))
    ids = torch.full((batch, n), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((batch, n), dtype=torch.long)
    for b in range(batch):
        real = max(1, n - b * step) if ragged else n
        ids[b, :real] = torch.tensor(fit_length(tokenizer.encode(prompts[b % len(prompts)]), real))
        mask[b, :real] = 1
    return ids, mask


def last_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each sequence."""
    return (attention_mask * torch.arange(attention_mask.shape[1])).argmax(dim=1)
