"""Presets have the shapes of the models they are named after; the narrow one keeps its model's calls."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from splitinfer.models import PRESETS

# parameter counts of the published checkpoints
PUBLISHED = {"smollm2-135m": 134_515_008, "llama-3.2-1b": 1_235_814_400, "llama-3.2-3b": 3_212_749_824,
             "llama-2-7b": 6_738_415_616, "llama-3.1-8b": 8_030_261_248}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_preset_parameter_count(name):
    with torch.device("meta"):
        model = LlamaForCausalLM(PRESETS[name].llama_config())
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[name]


def test_narrow_preset_makes_its_models_calls():
    """llama-3.2-1b-narrow differs from llama-3.2-1b in widths alone: the same layers, query heads per kv head,
    tied table and RoPE, so an engine makes the same calls and crossings on it (the overhead floor)."""
    assert set(PRESETS) == set(PUBLISHED) | {"llama-3.2-1b-narrow"}
    narrow, full = PRESETS["llama-3.2-1b-narrow"], PRESETS["llama-3.2-1b"]
    assert narrow.num_hidden_layers == full.num_hidden_layers and narrow.tie_word_embeddings == full.tie_word_embeddings
    assert (narrow.num_attention_heads // narrow.num_key_value_heads
            == full.num_attention_heads // full.num_key_value_heads)
    assert narrow.rope_parameters == full.rope_parameters and narrow.hidden_size * 32 == full.hidden_size
