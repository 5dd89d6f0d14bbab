"""End to end on the real default model, SmolLM2-135M-Instruct (fetched and converted on first use)."""
from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import ROOT
from transformers import AutoTokenizer, LlamaForCausalLM

from splitinfer import cli
from splitinfer.models import ensure_default_checkpoint


def test_default_model_answers_and_matches_transformers(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The capital of France is\nThe opposite of hot is\n")
    out, saved = tmp_path / "r.json", tmp_path / "l.pt"
    status = cli.main(os.path.join(ROOT, "tee_gpu", "config.py"), "plain",
                      ["--prefill-length", "5", "--batch-size", "2", "--ragged", "--prompts-file", str(prompts),
                       "--output", str(out), "--save-logits", str(saved)])
    assert status == 0
    assert "next token: ' Paris'" in capsys.readouterr().out

    # an independent transformers forward, loaded straight from the cached checkpoint
    path = ensure_default_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    logits = torch.load(saved)["logits"]
    for b, prompt in enumerate(["The capital of France is", "The opposite of hot is"]):
        ids = tokenizer(prompt, return_tensors="pt").input_ids[:, : 5 - 2 * b]  # ragged: 5 and 3 real tokens
        with torch.no_grad():
            expected = model(ids).logits[0, -1]
        assert (logits[b] - expected).abs().max() / expected.abs().max() <= 1e-4
        assert logits[b].argmax() == expected.argmax()
    r = json.loads(out.read_text())
    assert r["benchmark_info"]["model"] == "SmolLM2-135M-Instruct" and r["benchmark_info"]["random_weights"] is False
    assert r["correctness"]["top1_agreement"] == 1.0


def test_tee_only_on_default_model_in_bfloat16(tmp_path):
    out = tmp_path / "r.json"
    status = cli.main(os.path.join(ROOT, "tee_only_llama", "config.py"), cli.TEE_ONLY,
                      ["--dtype", "bfloat16", "--output", str(out)])
    assert status == 0
    r = json.loads(out.read_text())
    assert r["benchmark_info"]["dtype"] == "bfloat16" and r["benchmark_info"]["scheme"] == cli.TEE_ONLY
    assert r["correctness"]["top1_agreement"] == 1.0
    assert r["correctness"]["rel_logit_error"] < 0.1  # bfloat16 against a float32 reference


@pytest.mark.parametrize("scheme", ["matrix", "otp"])
def test_masked_runners_on_default_model(tmp_path, scheme):
    """float32 on the CPU: within 1e-3 of transformers with the same top-1, batch 1 and batch 2 with padding."""
    for batch in ("1", "2"):
        out = tmp_path / f"{scheme}{batch}.json"
        status = cli.main(os.path.join(ROOT, "tee_gpu", "config.py"), scheme,
                          ["--prefill-length", "16", "--batch-size", batch, "--ragged", "--output", str(out)])
        assert status == 0
        r = json.loads(out.read_text())
        assert r["correctness"]["rel_logit_error"] <= 1e-3 and r["correctness"]["top1_agreement"] == 1.0
        assert r["benchmark_info"]["real_tokens"] == (16 if batch == "1" else 16 + 12)
