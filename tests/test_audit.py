"""What the GPU sees under each masked scheme: never the plaintext, never a row-wise rescaling of it, never ids."""
from __future__ import annotations

import os
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT

from splitinfer import cli
from splitinfer.audit import AuditLog, read_audit
from splitinfer.engine import SplitLlama
from splitinfer.inputs import build_batch, read_prompts
from splitinfer.models import load_model
from splitinfer.schemes import Plain, make_scheme

CONFIG = os.path.join(ROOT, "tee_gpu", "config.py")


def crossings(folder, model: str, scheme: str) -> dict[tuple, torch.Tensor]:
    """(layer, op, occurrence) -> tensor the runner sent to the GPU, read back from its --audit-dir."""
    assert cli.main(CONFIG, scheme, ["--model", model, "--prefill-length", "12", "--batch-size", "2", "--ragged",
                                     "--seed", "11", "--audit-dir", str(folder),
                                     "--output", str(folder) + ".json"]) == 0
    return keyed([(r["layer"], r["op"], r["tensor"]) for r in read_audit(str(folder))])


def keyed(records: list[tuple]) -> dict[tuple, torch.Tensor]:
    seen: dict[tuple, int] = defaultdict(int)
    out = {}
    for layer, op, tensor in records:
        out[(layer, op, seen[(layer, op)])] = tensor
        seen[(layer, op)] += 1
    return out


class InTheClear(Plain):
    """The masked runners' placement (ids and biases in the TEE, every operand crossing) with no masks:
    what the GPU would see at each of their hops if nothing protected it."""

    masked = True


def plaintext_crossings(model_path: str) -> tuple[dict[tuple, torch.Tensor], torch.Tensor]:
    model = load_model(model_path, torch.float32, torch.device("cpu"))
    ids, mask = build_batch(model.tokenizer, read_prompts(os.path.join(ROOT, "tee_only_llama", "prompts.txt")),
                            12, 2, ragged=True)
    engine = SplitLlama(model.config, model.state_dict, InTheClear(), torch.device("cpu"), torch.float32)
    log = AuditLog()
    engine.link.audit = log
    engine.timed_forward(ids, mask)
    return keyed(log.records), ids


def row_proportionality(masked: torch.Tensor, plain: torch.Tensor) -> float:
    """Cosine between the masked tensor and the best row-wise rescaling diag(c)·plain of the plaintext.

    1 means the GPU got the plaintext up to one factor per row; rows are compared position by position
    (a dummy row that a scheme appends has no plaintext partner and is left out).
    """
    width = masked.shape[-1]
    m = masked.reshape(-1, width).float()
    p = plain.reshape(-1, width).float()
    rows = min(len(m), len(p))
    m, p = m[:rows], p[:rows]
    cos = F.cosine_similarity(m, p, dim=-1)
    weights = m.pow(2).sum(-1)
    return ((weights * cos.pow(2)).sum() / weights.sum()).sqrt().item()


@pytest.mark.parametrize("scheme", ["matrix", "otp"])
@pytest.mark.parametrize("variant", ["gqa-tied", "rope-llama3", "mha-untied"])
def test_gpu_never_sees_plaintext(tiny_models, tmp_path, scheme, variant):
    plain, ids = plaintext_crossings(tiny_models[variant])
    masked = crossings(tmp_path / scheme, tiny_models[variant], scheme)
    assert set(masked) == set(plain)  # the same hops, in the same order
    assert not any(op == "embedding" for _, op, _ in masked)  # the ids never cross ...
    assert all(t.is_floating_point() for t in masked.values())
    for key, tensor in masked.items():
        reference = plain[key]
        assert not (tensor.numel() == ids.numel() and torch.equal(tensor.reshape(-1).long(), ids.reshape(-1)))
        assert not torch.allclose(tensor.float().reshape(-1)[: reference.numel()],
                                  reference.float().reshape(-1)[: tensor.numel()], rtol=1e-2, atol=1e-3), key
        assert row_proportionality(tensor, reference) < 0.99, key


def test_plain_runner_sends_the_ids(tiny_models, tmp_path):
    plain = crossings(tmp_path / "plain", tiny_models["gqa-tied"], "plain")
    assert plain[(None, "embedding", 0)].dtype == torch.long


def test_matrix_mixing_keeps_the_row_space(tiny_models, tmp_path):
    """The known limit of token mixing: M·X only recombines X's rows, so where the rows are nearly
    identical (here, large biases dominate every hidden state) the GPU sees them almost unchanged.
    The one-time pads hide the same tensors."""
    plain, _ = plaintext_crossings(tiny_models["biases"])
    matrix = crossings(tmp_path / "matrix", tiny_models["biases"], "matrix")
    otp = crossings(tmp_path / "otp", tiny_models["biases"], "otp")
    key = (1, "linear_mlp", 0)
    assert row_proportionality(matrix[key], plain[key]) > 0.99
    assert row_proportionality(otp[key], plain[key]) < 0.9


def test_audit_dir_must_be_writable(tiny_models, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    status = cli.main(CONFIG, "matrix", ["--model", tiny_models["gqa-tied"], "--audit-dir", str(blocker / "audit"),
                                         "--output", str(tmp_path / "r.json")])
    assert status == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and "--audit-dir" in err[0]
    assert not (tmp_path / "r.json").exists()


def test_matrix_probabilities_reveal_their_order(tiny_models):
    """A known limit of ours' P·V masks: the probabilities are exactly zero above the causal diagonal, and
    permutations and scalings keep zeros zero, so the GPU can count them. A row's nonzeros give its query
    position and a column's its key position, which undoes P₁ and P₂; what is left is each probability
    times |d₁ d₂| in [1, 4] and a sign the GPU can read off (probabilities are positive)."""
    model = load_model(tiny_models["gqa-tied"], torch.float32, torch.device("cpu"))
    ids, mask = build_batch(model.tokenizer, ["The quick brown fox jumps over the lazy dog."], 12, 1)
    seen = {}
    for name, scheme in (("plain", InTheClear()), ("matrix", make_scheme("matrix", seed=3))):
        engine = SplitLlama(model.config, model.state_dict, scheme, torch.device("cpu"), torch.float32)
        engine.link.audit = AuditLog()
        engine.timed_forward(ids, mask)
        seen[name] = keyed(engine.link.audit.records)[(1, "matmul", 2)][0]  # layer 1's probabilities, [H, n, n]
    plain, masked = seen["plain"], seen["matrix"]
    assert not torch.allclose(masked.abs(), plain)
    for head in range(plain.shape[0]):
        nonzero = masked[head] != 0
        rows = nonzero.sum(1).argsort()                 # query 0 sees one key, query n-1 sees all n
        cols = nonzero.sum(0).argsort(descending=True)  # key 0 is seen by every query
        undone = masked[head][rows][:, cols].abs()
        seen_keys = plain[head] > 0
        assert torch.equal(undone > 0, seen_keys)
        ratio = undone[seen_keys] / plain[head][seen_keys]
        assert ratio.min() >= 1 - 1e-4 and ratio.max() <= 4 + 1e-4
