"""The oracle: transformers' LlamaForCausalLM on the same weights and ids, in float32 on the CPU."""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from splitinfer.inputs import last_positions

REFERENCE_DTYPE = torch.float32


def build_transformers_model(config: LlamaConfig, state_dict: dict[str, torch.Tensor],
                             device: torch.device = torch.device("cpu"),
                             dtype: torch.dtype = REFERENCE_DTYPE) -> LlamaForCausalLM:
    """transformers' LlamaForCausalLM around the given weights (copied only where device or dtype differ)."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.load_state_dict({name: t.to(device, dtype) for name, t in state_dict.items()}, assign=True, strict=False)
    model.tie_weights()
    model.model.rotary_emb = LlamaRotaryEmbedding(config).to(device)  # its buffers are not in a state dict
    return model.eval()


@torch.no_grad()
def reference_logits(config: LlamaConfig, state_dict: dict[str, torch.Tensor], ids: torch.Tensor,
                     attention_mask: torch.Tensor) -> torch.Tensor:
    """float32 logits [B, vocab] at the last real position of each sequence, computed on the CPU."""
    model = build_transformers_model(config, state_dict)
    logits = model(input_ids=ids, attention_mask=attention_mask).logits
    return logits[torch.arange(ids.shape[0]), last_positions(attention_mask)].float()


def compare(logits: torch.Tensor, reference: torch.Tensor) -> dict:
    """Error figures of `logits` against the reference (both [B, vocab])."""
    max_abs = (logits - reference).abs().max().item()
    return {"reference": "transformers", "reference_dtype": str(REFERENCE_DTYPE).replace("torch.", ""),
            "max_abs_logit_error": max_abs,
            "rel_logit_error": max_abs / max(reference.abs().max().item(), 1e-30),
            "top1_agreement": (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()}
