"""Presets have the shapes of the models they are named after."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from splitinfer.models import PRESETS

# parameter counts of the published checkpoints
PUBLISHED = {"smollm2-135m": 134_515_008, "llama-3.2-1b": 1_235_814_400, "llama-3.2-3b": 3_212_749_824,
             "llama-2-7b": 6_738_415_616, "llama-3.1-8b": 8_030_261_248}


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_parameter_count(name):
    with torch.device("meta"):
        model = LlamaForCausalLM(PRESETS[name].llama_config())
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED[name]
