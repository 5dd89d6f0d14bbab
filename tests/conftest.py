"""Tiny random LLaMA checkpoints, built with LlamaConfig + save_pretrained, one per variant the engine supports."""
from __future__ import annotations

import os
import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, vocab_size=320, max_position_embeddings=64,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False)

VARIANTS = {
    "mha-untied": {},
    "gqa-tied": dict(num_key_value_heads=2, tie_word_embeddings=True),
    "gqa-head-dim": dict(num_key_value_heads=1, head_dim=24),
    "rope-llama3": dict(num_key_value_heads=2, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "rope-linear": dict(rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}),
    "rope-dynamic": dict(rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}),
    "biases": dict(num_key_value_heads=2, attention_bias=True, mlp_bias=True),
}


def make_checkpoint(path: str, seed: int = 0, **overrides) -> LlamaConfig:
    """Save a random tiny LLaMA to `path`; norms and biases are perturbed so that they matter."""
    torch.manual_seed(seed)
    config = LlamaConfig(**{**BASE, **overrides})
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(path)
    return config


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, str]:
    """variant name -> checkpoint directory."""
    root = tmp_path_factory.mktemp("tiny")
    paths = {}
    for i, (name, overrides) in enumerate(VARIANTS.items()):
        paths[name] = str(root / name)
        make_checkpoint(paths[name], seed=i, **overrides)
    return paths
