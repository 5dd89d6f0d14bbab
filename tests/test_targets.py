"""The targets' scorecard (`splitinfer.targets`) on benchmark files written here, with known figures."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT

from splitinfer import models, targets


def method(ms: float, rel_diff: float = 0.0, first: float | None = None) -> dict:
    return {"median_ms": ms, "first_ms": ms if first is None else first, "rel_diff_from_optimized": rel_diff}


def runner(name: str, n: int, first: float, warm: float, rss: float, excess: float, on_gpu: bool = True) -> dict:
    return {"timing": {"total_ms": first}, "steady_state": {"uninstrumented_total_ms": {"median": warm}},
            "memory": {"peak_host_rss_mb": rss}, "data_transfer": {"excess_over_minimum": excess},
            "benchmark_info": {"model": "preset:llama-3.2-1b", "prefill_length": n, "gpu_fallback_to_cpu": not on_gpu}}


def gpu_run(folder) -> None:
    row128 = {"optimized": method(14.0), "optimized_cuda_graphs": method(10.0),
              "ours": {**method(30.0, 1e-3), "configuration": {"kept": "fuse_hops"}},  # set-up's choice
              "ours_fused_hops_cuda_graphs": method(12.0, 1e-3),
              "ours_resident_embedding": method(5.0, 1e-3),  # an ablation: never a configuration
              "otp": method(25.0, 1e-3), "otp_cuda_graphs": {"error": "CUDA error"},
              "otp_fused_hops": method(1.0, 0.5),  # logits off: not counted
              "tee_only": method(100.0), "transformers_cpu": method(120.0)}
    row512 = {"optimized": method(70.0), "ours": method(80.0), "otp": method(150.0), "tee_only": method(400.0)}
    perf = {"setup": {"model": "preset:llama-3.2-1b", "dtype": "float16", "gpu_fallback_to_cpu": False},
            "environment": {"gpu": "NVIDIA H100 80GB HBM3", "cpu": "Xeon", "threads": 16},
            "lengths": {"128": row128, "512": row512}}
    runners = {"optimized_n512": runner("optimized", 512, 160.0, 90.0, 1400.0, 0.04),
               "ours_n512": {**runner("ours", 512, 400.0, 200.0, 1600.0, 0.0001),
                             "memory": {"peak_host_rss_mb": 1600.0, "peak_reached_in": "configuration_chosen",
                                        "pinned_host_mb": {"now": 100.0, "peak": 180.4}}},
               "otp_n512": runner("otp", 512, 500.0, 400.0, 3000.0, 0.12),
               "tee_only_n512": runner("tee_only", 512, 1.0, 1.0, 1.0, 0.0)}
    (folder / "perf.json").write_text(json.dumps(perf))
    (folder / "runners.json").write_text(json.dumps(runners))


def rows_by(card: dict) -> dict[tuple[str, int], dict]:
    return {(r["target"], r["tokens"]): r for r in card["targets"]}


def test_a_gpu_run_is_judged_against_the_gpu_targets(tmp_path):
    gpu_run(tmp_path)
    card = targets.scorecard(str(tmp_path))
    rows = rows_by(card)
    assert card["on_gpu"] and card["gpu"] == "NVIDIA H100 80GB HBM3"
    plain = rows[("plain split, warm ms", 128)]
    assert (plain["figure"], plain["limit"], plain["met"]) == (14.0, 15.0, True)
    assert plain["best"] == "optimized_cuda_graphs: 10.0 ms"
    assert rows[("plain split, warm ms", 512)]["met"] is False
    ours = rows[("ours ÷ plain", 128)]
    assert ours["figure"] == pytest.approx(30 / 14) and ours["met"] is False
    assert ours["best"] == "ours_fused_hops_cuda_graphs ÷ optimized_cuda_graphs: 1.20"  # not the resident table
    assert ours["source"] == "perf.json: ours [fuse_hops] / optimized"  # as it ran: what set-up kept
    otp = rows[("otp ÷ plain", 128)]
    # its graphs failed and its fused hops' logits are off, so its fastest is itself, against the graphed plain split
    assert otp["met"] is True and otp["best"] == "otp ÷ optimized_cuda_graphs: 2.50"
    assert rows[("otp ÷ plain", 512)]["met"] is False
    assert rows[("optimized: speedup over TEE-only", 128)]["figure"] == pytest.approx(100 / 14)
    assert rows[("optimized: speedup over TEE-only", 128)]["met"] is True
    assert rows[("ours: speedup over TEE-only", 512)]["met"] is True  # 5.0: the limit itself
    assert rows[("otp: speedup over TEE-only", 512)]["met"] is False
    assert rows[("ours: speedup over TEE-only", 128)]["best"] == "ours_fused_hops_cuda_graphs: 8.3×"
    # the runners' own processes: first inference, memory at 512 tokens, bytes; the TEE-only runner has none
    assert rows[("optimized: first inference − warm, ms", 512)]["figure"] == 70.0
    assert rows[("ours: first inference − warm, ms", 512)]["met"] is False
    assert [rows[(f"{r}: peak host RSS, MiB", 512)]["met"] for r in ("optimized", "ours", "otp")] == [True, False, True]
    # where a runner's JSON says which phase reached its peak, and what the pinned cache held at its own, the row
    # says so too
    assert rows[("ours: peak host RSS, MiB", 512)]["source"] == ("runners.json: ours_n512; reached in "
                                                                 "configuration_chosen; pinned cache peak 180 MiB")
    assert rows[("optimized: peak host RSS, MiB", 512)]["source"] == "runners.json: optimized_n512"
    assert [rows[(f"{r}: bytes over the minimum", 512)]["met"] for r in ("optimized", "ours", "otp")] == [True, True, False]
    assert not any(r["target"].startswith("tee_only") for r in card["targets"])
    assert card["not_judged"] == 0 and card["met"] + card["not_met"] == len(card["targets"])


def test_a_cpu_run_is_judged_against_the_cpu_only_targets(tmp_path):
    row = {"optimized": method(100.0, first=101.0), "ours": method(120.0), "otp": method(170.0),
           "transformers_cpu": method(90.0)}
    # the default model as perf.json records it: by how it was loaded, its name only for display
    perf = {"setup": {"model": models.DEFAULT_MODEL_NAME, "model_source": "default", "dtype": "float32",
                      "gpu_fallback_to_cpu": True},
            "environment": {"gpu": None, "cpu": "AMD EPYC", "threads": 2},
            "lengths": {"128": {**row, "ratios": {"optimized_first_minus_warm_ms": 1.0}}, "512": row}}
    (tmp_path / "perf.json").write_text(json.dumps(perf))
    card = targets.scorecard(str(tmp_path))
    rows = rows_by(card)
    assert not card["on_gpu"] and ("plain split, warm ms", 128) not in rows
    assert rows[("plain split ÷ transformers (CPU)", 128)]["met"] is True  # 1.11
    assert rows[("ours ÷ plain (CPU)", 128)]["met"] is True  # 1.2
    assert rows[("otp ÷ plain (CPU)", 128)]["met"] is False  # 1.7
    assert rows[("otp ÷ plain (CPU)", 512)]["met"] is None  # stated at 128 tokens
    # the first inference's target is the GPU's: on the fallback it is shown, not judged
    assert rows[("optimized: first inference − warm, ms", 128)] == {
        **rows[("optimized: first inference − warm, ms", 128)], "figure": 1.0, "met": None}
    perf["setup"]["dtype"] = "float16"  # the CPU-only targets are stated in float32
    (tmp_path / "perf.json").write_text(json.dumps(perf))
    assert targets.scorecard(str(tmp_path))["met"] == 0


def test_ratios_timed_side_by_side_are_also_taken_round_by_round(tmp_path):
    """Where perf timed two methods side by side (each names the other in `timed_with`), their runs pair up round
    by round, and each ratio row shows the middle half of those ratios; timed apart (`--one-at-a-time`), none."""
    def timed(runs: list[float], group: list[str], name: str) -> dict:
        return {**method(sorted(runs)[len(runs) // 2]), "runs_ms": runs, "timed_with": [m for m in group if m != name]}

    group = ["optimized", "ours", "otp", "transformers_cpu"]
    # a slow spell in round 2 slows every method: the per-round ratios stay put
    runs = {"optimized": [100.0, 100.0, 200.0, 100.0], "ours": [120.0, 126.0, 250.0, 118.0],
            "otp": [150.0, 150.0, 300.0, 150.0], "transformers_cpu": [100.0, 100.0, 200.0, 100.0]}
    row = {name: timed(r, group, name) for name, r in runs.items()}
    perf = {"setup": {"model": targets.TARGET_MODEL, "dtype": "float32", "gpu_fallback_to_cpu": True},
            "environment": {}, "lengths": {"128": row}}
    (tmp_path / "perf.json").write_text(json.dumps(perf))
    rows = rows_by(targets.scorecard(str(tmp_path)))
    assert rows[("ours ÷ plain (CPU)", 128)]["rounds"] == "1.20–1.25 (4 rounds)"
    assert rows[("otp ÷ plain (CPU)", 128)]["rounds"] == "1.50–1.50 (4 rounds)"
    assert rows[("plain split ÷ transformers (CPU)", 128)]["rounds"] == "1.00–1.00 (4 rounds)"
    row["ours"]["timed_with"] = []  # timed alone
    (tmp_path / "perf.json").write_text(json.dumps(perf))
    rows = rows_by(targets.scorecard(str(tmp_path)))
    assert rows[("ours ÷ plain (CPU)", 128)]["rounds"] == "" and rows[("otp ÷ plain (CPU)", 128)]["rounds"]


def test_the_command_writes_its_table_and_fails_in_one_line(tmp_path):
    gpu_run(tmp_path)
    done = subprocess.run([sys.executable, "-m", "splitinfer.targets", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "targets.md").read_text() == done.stdout
    assert "| ours ÷ plain | 128 | 2.14 | 1.25 | no |  | ours_fused_hops_cuda_graphs ÷ optimized_cuda_graphs: 1.20 |" in done.stdout
    assert json.loads((tmp_path / "targets.json").read_text())["not_met"] == 9
    # it reads JSON and imports no torch, so it starts at once (the GPU machine's time is short)
    light = subprocess.run([sys.executable, "-c", "import sys, splitinfer.targets, splitinfer.report; "
                            "assert 'torch' not in sys.modules"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert light.returncode == 0, light.stderr
    missing = subprocess.run([sys.executable, "-m", "splitinfer.targets", str(tmp_path / "none")], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "perf.json' does not exist" in missing.stderr
    (tmp_path / "perf.json").write_text("{")
    broken = subprocess.run([sys.executable, "-m", "splitinfer.targets", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert broken.returncode == 2 and broken.stderr.startswith("error: cannot read") and "Traceback" not in broken.stderr


def test_runners_finished_says_whether_the_floor_let_the_headline_use_graphs(tmp_path):
    """gpu_benchmark.sh runs the headline without CUDA graphs unless the overhead floor's run timed the three split
    runners at every length, none failed (`targets.runners_finished`)."""
    path = tmp_path / "perf.json"
    assert not targets.runners_finished(str(path), "128")  # the floor's process died before writing it
    done = {"optimized": method(5.0), "ours": method(9.0), "otp": method(9.5)}
    for lengths, finished in (({"128": done, "512": done}, True), ({"128": done}, False),
                              ({"128": done, "512": {**done, "ours": {"error": "CUDA error"}}}, False),
                              ({"128": done, "512": {"optimized": method(9.0)}}, False)):
        path.write_text(json.dumps({"lengths": lengths}))
        assert targets.runners_finished(str(path), "128,512") is finished
    path.write_text("{")  # cut mid-write
    assert not targets.runners_finished(str(path), "128")
