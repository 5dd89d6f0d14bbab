"""Leakage attacks and the evaluation script: strong where nothing is hidden, blind to TEE state."""
from __future__ import annotations

import ast
import inspect
import json
import os

import pytest
import torch
from conftest import ROOT

from splitinfer import attacks, cli, leakage
from splitinfer.attacks import PublicModel, recovery_rate, remove_shared_directions
from splitinfer.models import load_model


def test_attack_module_cannot_reach_tee_state():
    """Attacks import nothing that holds masks, pads or ids, and take only crossings and the public model."""
    tree = ast.parse(inspect.getsource(attacks))
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not imported & {"splitinfer.engine", "splitinfer.schemes", "splitinfer.cli", "splitinfer.inputs",
                           "splitinfer.leakage"}
    for name, attack in attacks.ATTACKS.items():
        parameters = list(inspect.signature(attack).parameters)
        assert parameters[:2] == ["records", "model"], name
        assert set(parameters[2:]) <= {"layer", "k"}, name


def test_shared_direction_removal_undoes_rank_one_mixing():
    torch.manual_seed(0)
    x = torch.randn(12, 64)
    d, alpha, beta = torch.rand(12) + 1, torch.randn(12), torch.randn(12)
    mixed = d[:, None] * x + alpha[:, None] * (beta @ x)[None] * 10  # a strong shared direction
    before = torch.nn.functional.cosine_similarity(mixed, x, dim=-1).abs()
    rows, table = remove_shared_directions(mixed, x, 1)
    after = torch.nn.functional.cosine_similarity(rows, table, dim=-1).abs()
    assert before.median() < 0.2 and after.median() > 0.9


def test_recovery_rate_positional_and_multiset():
    truth = torch.tensor([[5, 6, 7, 5]])
    assert recovery_rate(torch.tensor([[5, 6, 0, 0]]), truth, positional=True) == 2
    assert recovery_rate(torch.tensor([[7, 5, 5, 9]]), truth, positional=False) == 3


def test_layer0_attack_recovers_the_plain_runners_prompt(tmp_path):
    """On the real default model, the layer-0 match reads the prompt back from the plain split's crossings."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("My social security number is 123-45-6789 and my password is hunter2.\n"
                       "Please summarise my medical history for the insurance claim.\n")
    out = tmp_path / "leak"
    assert leakage.main(["--schemes", "plain,matrix", "--layers", "0", "--prompt-file", str(prompts),
                         "--seed", "3", "--out-dir", str(out)]) == 0
    result = json.loads((out / "leakage.json").read_text())
    rates = {(a["attack"], a["layer"]): a["token_recovery_rate"] for a in result["schemes"]["plain"]["attacks"]}
    assert rates[("naive_match", 0)] >= 0.95 and rates[("ids_in_clear", None)] == 1.0
    matrix = {a["attack"]: a["token_recovery_rate"] for a in result["schemes"]["matrix"]["attacks"]}
    assert matrix["shared_direction"] > matrix["naive_match"]  # the stronger attack is the stronger one
    assert "| plain (optimized) | naive_match | 0 |" in (out / "leakage.md").read_text()


def test_leakage_tables_on_a_tiny_model(tiny_models, tmp_path):
    out = tmp_path / "leak"
    assert leakage.main(["--model", tiny_models["gqa-tied"], "--layers", "0,1", "--rank-sweep", "1,3",
                         "--pad-scale-sweep", "1,8", "--out-dir", str(out)]) == 0
    result = json.loads((out / "leakage.json").read_text())
    assert set(result["schemes"]) == {"plain", "matrix", "otp"}
    for scheme in result["schemes"].values():
        for a in scheme["attacks"]:
            assert 0 <= a["token_recovery_rate"] <= 1
            assert a["tokens"] == result["tokens"] * (4 if a["attack"] == "query_profile" else 1)  # per head
    assert [r["options"]["rank"] for r in result["sweeps"]["mask_rank"]] == [1, 3]
    assert (out / "rank_tradeoff.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("argv,expected", [
    (["--schemes", "plain,rot13"], "unknown scheme"),
    (["--layers", "a"], "not a comma-separated list"),
    (["--rank-sweep", "0"], "ranks >= 1"),
    (["--prompt-file", "/no/such/file"], "cannot read prompts"),
])
def test_leakage_bad_input(tmp_path, capsys, argv, expected):
    assert leakage.main([*argv, "--out-dir", str(tmp_path / "o")]) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "o" / "leakage.json").exists()


@pytest.mark.parametrize("rank", [2, 4, 8])
def test_mask_rank_matches_transformers(tiny_models, tmp_path, rank):
    out = tmp_path / "r.json"
    assert cli.main(os.path.join(ROOT, "tee_gpu", "config.py"), "matrix",
                    ["--model", tiny_models["rope-llama3"], "--mask-rank", str(rank), "--batch-size", "2",
                     "--ragged", "--prefill-length", "12", "--output", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["correctness"]["rel_logit_error"] <= 1e-3 and r["correctness"]["top1_agreement"] == 1.0
    assert f"rank {rank}" in r["benchmark_info"]["encryption_scheme"]


def test_public_model_candidates_are_the_layer_inputs(tiny_models):
    model = load_model(tiny_models["mha-untied"], torch.float32, torch.device("cpu"))
    public = PublicModel(model.config, model.state_dict)
    table = public.candidates(1)
    assert table.shape == (model.config.vocab_size, model.config.hidden_size)
    # layer 0's candidate for a token is exactly what the plain split sends for it at layer 0
    embed = model.state_dict["model.embed_tokens.weight"][7]
    norm = model.state_dict["model.layers.0.input_layernorm.weight"]
    expected = norm * embed * torch.rsqrt(embed.pow(2).mean() + model.config.rms_norm_eps)
    torch.testing.assert_close(public.candidates(0)[7], expected, rtol=1e-5, atol=1e-6)
