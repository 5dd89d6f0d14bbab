"""The in-process performance comparison end to end, on a tiny checkpoint."""
from __future__ import annotations

import json

import pytest

from splitinfer import perf
from splitinfer.engine import SplitLlama


def run_perf(tiny_models, tmp_path, *extra: str) -> dict:
    assert perf.main(["--model", tiny_models["gqa-tied"], "--lengths", "8,16", "--warmup", "0", "--repeat", "1",
                      "--out-dir", str(tmp_path), *extra]) == 0
    return json.loads((tmp_path / "perf.json").read_text())["lengths"]


def test_ratios_and_logits_against_the_plain_split(tiny_models, tmp_path, capsys):
    lengths = run_perf(tiny_models, tmp_path)
    assert set(lengths) == {"8", "16"}
    for row in lengths.values():
        assert {"optimized", "ours", "otp", "tee_only", "transformers_cpu", "ratios"} <= set(row)
        assert row["ratios"]["ours_over_plain"] == pytest.approx(row["ours"]["median_ms"] / row["optimized"]["median_ms"])
        assert row["optimized"]["rel_diff_from_optimized"] == 0
        # float32: the masks cost only rounding
        assert 0 < row["ours"]["rel_diff_from_optimized"] < 1e-3 and 0 < row["otp"]["rel_diff_from_optimized"] < 1e-3
        assert row["optimized"]["categories_median_ms"]["overlap"] == 0
        steps = row["otp"]["breakdown_median_ms"]["crypto"]
        assert steps["recovery_matmul"] > 0 and "softmax" in row["optimized"]["breakdown_median_ms"]["cpu_compute"]
    assert "ours_over_plain" in capsys.readouterr().out


def test_a_failing_variant_is_recorded_and_the_rest_still_run(tiny_models, tmp_path, monkeypatch, capsys):
    """One ablation failing on a lent GPU must not cost the whole comparison."""
    monkeypatch.setattr(perf, "variants", lambda overlap, ablations, sweep: [
        ("optimized", "plain", {}, None), ("ours", "matrix", {}, None), ("otp", "otp", {}, None),
        ("optimized_overlap", "plain", {"overlap": True}, None), ("optimized_threads1", "plain", {}, 1)])

    class Failing(SplitLlama):
        def __init__(self, *args, overlap: bool = False, **kwargs):
            if overlap:
                raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore detail")
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(perf, "SplitLlama", Failing)
    row = run_perf(tiny_models, tmp_path, "--split-only")["8"]
    assert row["optimized_overlap"] == {"error": "CUDA error: an illegal memory access was encountered"}
    assert row["optimized_threads1"]["rel_diff_from_optimized"] < 1e-5  # the same function, other threads
    out, err = capsys.readouterr()
    assert "optimized_overlap    failed: CUDA error" in out and "warning: optimized_overlap failed" in err


def test_a_run_cut_short_keeps_what_it_measured(tiny_models, tmp_path, monkeypatch):
    """A CUDA failure past the variants (here in the TEE-only engine) poisons the process: perf.json still
    gets every figure taken before it, marked incomplete, and the error still ends the run."""
    class Failing(SplitLlama):
        def __init__(self, *args, tee_only: bool = False, **kwargs):
            if tee_only:
                raise RuntimeError("CUDA error: unspecified launch failure")
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(perf, "SplitLlama", Failing)
    with pytest.raises(RuntimeError):
        perf.main(["--model", tiny_models["gqa-tied"], "--lengths", "8", "--warmup", "0", "--repeat", "1",
                   "--out-dir", str(tmp_path)])
    result = json.loads((tmp_path / "perf.json").read_text())
    assert result["incomplete"] == "CUDA error: unspecified launch failure"
    assert set(result["lengths"]["8"]) == {"optimized", "ours", "otp"}
