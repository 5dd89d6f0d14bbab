"""The benchmark harness: per-layer figures, the comparison report, sweeps, and its bad-input handling."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from conftest import ROOT

from splitinfer import bench, cli, engine
from splitinfer.report import breakdown_png, comparison_rows, sweep_report

CONFIG = os.path.join(ROOT, "tee_gpu", "config.py")
TEE_CONFIG = os.path.join(ROOT, "tee_only_llama", "config.py")
GPU_BENCHMARK = os.path.join(ROOT, "tee_gpu", "benchmarks", "gpu_benchmark.sh")
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def results(tiny_models, tmp_path_factory) -> dict[int, dict[str, str]]:
    """Result files of all four runners on a tiny model at two lengths: {length: {method: path}}."""
    folder = tmp_path_factory.mktemp("results")
    paths: dict[int, dict[str, str]] = {}
    for n in (8, 16):
        for method, scheme in (("optimized", "plain"), ("ours", "matrix"), ("otp", "otp"), ("tee_only", cli.TEE_ONLY)):
            out = str(folder / f"{method}_n{n}.json")
            config = TEE_CONFIG if scheme == cli.TEE_ONLY else CONFIG
            assert cli.main(config, scheme, ["--model", tiny_models["gqa-tied"], "--prefill-length", str(n),
                                             "--dtype", "float32", "--per-layer", "--output", out]) == 0
            paths.setdefault(n, {})[method] = out
    return paths


def test_per_layer_table(results):
    r = json.loads(open(results[8]["ours"]).read())
    layers = r["per_layer"]
    assert [row["layer"] for row in layers] == [0, 1]
    for row in layers:
        parts = sum(row[k] for k in ("transfer_to_gpu_ms", "transfer_to_cpu_ms", "gpu_compute_ms",
                                     "cpu_compute_ms", "crypto_ms", "other_ms"))
        assert abs(parts - row["total_ms"]) <= 0.02 * row["total_ms"] + 1e-6
        assert row["crypto_ms"] > 0 and row["gpu_compute_ms"] > 0
    assert sum(row["total_ms"] for row in layers) <= r["timing"]["total_ms"]


def test_comparison_report(results, tmp_path, capsys):
    pairs = [f"{method}={path}" for method, path in results[8].items()]
    assert bench.main(["report", "--out-dir", str(tmp_path), *pairs]) == 0
    table = capsys.readouterr().out
    for method in ("optimized", "ours", "otp", "tee_only"):
        assert f"| {method} |" in table
    assert (tmp_path / "comparison.md").read_text().count("\n| ") == 5  # header + four methods
    rows = list(csv.DictReader(open(tmp_path / "comparison.csv")))
    assert [row["method"] for row in rows] == ["optimized", "ours", "otp", "tee_only"]
    assert float(rows[0]["overhead_vs_plain"]) == 1.0 and rows[3]["speedup_vs_tee_only"] == ""
    assert rows[0]["tee_attention"] == "" and rows[3]["tee_attention"] in engine.ATTENTION_FORMS
    # no GPU: no graphs; the C++ kernels beside eager ones (the default without CUDA) leave ours' and otp's fused hops
    # to set-up, and the plain split has nothing to choose
    assert rows[0]["configuration"] == "neither" and rows[3]["configuration"] == ""
    assert all(row["configuration"] in ("neither (set-up)", "fuse_hops (set-up)") for row in rows[1:3])
    assert (tmp_path / "comparison.png").read_bytes().startswith(PNG)


def test_comparison_figures(results):
    loaded = {m: json.loads(open(p).read()) for m, p in results[8].items()}
    rows = {r["method"]: r for r in comparison_rows(loaded)}
    plain, tee = loaded["optimized"]["timing"]["total_ms"], loaded["tee_only"]["timing"]["total_ms"]
    assert rows["ours"]["overhead_vs_plain"] == pytest.approx(loaded["ours"]["timing"]["total_ms"] / plain)
    assert rows["otp"]["speedup_vs_tee_only"] == pytest.approx(tee / loaded["otp"]["timing"]["total_ms"])
    assert rows["otp"]["offline_ms"] > 0 and rows["ours"]["crypto_ms"] > 0
    assert all(r["top1_agreement"] == 1.0 for r in rows.values())
    assert all(r["overlap_ms"] == 0 for r in rows.values())  # nothing overlaps without CUDA
    # a result from before overlap_ms existed still reports, and an overlapped one draws
    del loaded["ours"]["timing"]["overlap_ms"]
    loaded["optimized"]["timing"]["overlap_ms"] = 0.5
    rows = comparison_rows(loaded)
    assert [r["overlap_ms"] for r in rows] == [0.5, 0.0, 0.0, 0.0]
    assert breakdown_png(rows, "title").startswith(PNG)
    # without --repeat no warm figures; with it for every runner, the warm medians and their ratios beside them
    assert not any("warm_median_ms" in r for r in rows)
    for method, ms in (("optimized", 10.0), ("ours", 12.0), ("otp", 15.0), ("tee_only", 30.0)):
        loaded[method]["steady_state"] = {"runs": 3, "uninstrumented_total_ms": {"median": ms, "min": ms, "max": ms}}
    rows = {r["method"]: r for r in comparison_rows(loaded)}
    assert rows["ours"]["warm_median_ms"] == 12.0 and rows["ours"]["warm_overhead_vs_plain"] == pytest.approx(1.2)
    assert rows["otp"]["warm_speedup_vs_tee_only"] == pytest.approx(2.0) and rows["tee_only"]["warm_overhead_vs_plain"] is None
    del loaded["otp"]["steady_state"]  # one runner not repeated: no warm column, rather than a column with holes
    assert not any("warm_median_ms" in r for r in comparison_rows(loaded))


def test_sweep_report(results, tmp_path):
    sweep = {n: {m: json.loads(open(p).read()) for m, p in by_method.items()} for n, by_method in results.items()}
    table, files = sweep_report(sweep, str(tmp_path / "sweep"))
    assert "| 8 |" in table and "| 16 |" in table and "ours/plain" in table
    assert files[str(tmp_path / "sweep.png")].startswith(PNG)
    rows = list(csv.DictReader(files[str(tmp_path / "sweep.csv")].splitlines()))
    assert len(rows) == 8 and {r["tokens"] for r in rows} == {"8", "16"}
    assert "warm" not in table
    for by_method in sweep.values():  # every runner repeated: each length's warm medians and ratios too
        for method, r in by_method.items():
            r["steady_state"] = {"uninstrumented_total_ms": {"median": 20.0 if method == "ours" else 10.0}}
    table, _ = sweep_report(sweep, str(tmp_path / "sweep"))
    assert "ours/plain warm" in table and "| 8 | " in table and "2.00" in table


def test_compare_script_end_to_end(tiny_models, tmp_path):
    """The script as a user runs it, from another directory, with flags passed through."""
    script = os.path.join(ROOT, "tee_only_llama", "benchmarks", "compare_split_vs_tee.sh")
    done = subprocess.run(["bash", script, "--out-dir", str(tmp_path / "out"), "--model", tiny_models["mha-untied"],
                           "--prefill-length", "6", "--repeat", "1"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| tee_only |" in done.stdout
    for name in ("comparison.md", "comparison.csv", "comparison.png", "optimized.json", "tee_only.json"):
        assert (tmp_path / "out" / name).exists()
    r = json.loads((tmp_path / "out" / "ours.json").read_text())
    assert r["benchmark_info"]["prefill_length"] == 6 and r["steady_state"]["runs"] == 1
    rows = list(csv.DictReader(open(tmp_path / "out" / "comparison.csv")))  # --repeat: the warm figures too
    assert all(float(row["warm_median_ms"]) > 0 for row in rows) and float(rows[1]["warm_overhead_vs_plain"]) > 0
    assert "wrote" in done.stderr and "[4/4] tee_only" in done.stderr


@pytest.mark.parametrize("argv,expected", [
    (["compare", "--lengths", "8,x"], "not a comma-separated list"),
    (["compare", "--lengths", "0"], "at least 1"),
    (["split", "--bogus"], "unrecognized arguments: --bogus"),
    (["split", "--output", "x.json"], "set per runner by the bench"),
    (["compare", "--lengths", "8", "--prefill-length", "4"], "either --lengths or --prefill-length"),
    (["report", "optimized=/no/such/result.json"], "does not exist"),
    (["report"], "METHOD=RESULT.json"),
    (["nonsense"], "invalid choice"),
])
def test_bench_bad_input(tmp_path, capsys, argv, expected):
    out = tmp_path / "out"
    try:
        status = bench.main([argv[0], "--out-dir", str(out), *argv[1:]])
    except SystemExit as e:  # argparse's own one-line errors
        status = e.code
    assert status == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and expected in err[0], err
    assert not out.exists() or not any(f.startswith(("comparison", "sweep")) for f in os.listdir(out))


def test_failing_runner_leaves_no_report(tmp_path):
    done = subprocess.run([sys.executable, "-m", "splitinfer.bench", "split", "--out-dir", str(tmp_path),
                           "--model", str(tmp_path / "missing")], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 1
    assert "runner optimized failed (exit 2); no report written" in done.stderr
    assert not any(f.startswith("comparison") for f in os.listdir(tmp_path))


def test_privacy_column(results, tmp_path, capsys):
    leakage = tmp_path / "leakage.json"
    best = {"attack": "shared_direction", "layer": 0, "token_recovery_rate": 0.979, "tokens": 96, "correct": 94}
    leakage.write_text(json.dumps({"schemes": {
        "plain": {"runner": "optimized", "best": dict(best, attack="ids_in_clear", token_recovery_rate=1.0)},
        "matrix": {"runner": "ours", "best": best}}}))
    pairs = [f"{method}={path}" for method, path in results[8].items()]
    assert bench.main(["report", "--out-dir", str(tmp_path), "--leakage", str(leakage), *pairs]) == 0
    table = capsys.readouterr().out
    assert "best_attack_recovery" in table and "98% (shared_direction)" in table and "100% (ids_in_clear)" in table
    assert bench.main(["report", "--out-dir", str(tmp_path / "x"), "--leakage", str(tmp_path / "nope.json"),
                       *pairs]) == 2
    assert "leakage file" in capsys.readouterr().err


def test_gpu_benchmark_dry_run(tiny_models, tmp_path):
    """gpu_benchmark.sh, the one script a lent GPU machine runs, end to end on the CPU with a tiny model:
    every step ran (no step's failure is hidden by the script's `|| true`) and wrote what it measured."""
    baseline = tmp_path / "baseline"  # a copy of this tree stands in for an older commit's
    for folder in ("splitinfer", "tee_gpu", "tee_only_llama"):
        shutil.copytree(os.path.join(ROOT, folder), baseline / folder, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "MODEL": tiny_models["gqa-tied"], "PRECISION_MODEL": tiny_models["gqa-tied"],
           "LENGTHS": "8", "PRECISION_LENGTH": "8", "BASELINE": str(baseline), "SPIN": "1", "ABLATIONS": "1",
           "VARIANTS": "1",
           "KERNEL_PRESET": "smollm2-135m", "KERNEL_THREADS": "1", "KERNEL_LENGTHS": "4",
           "KERNEL_WAIT_POLICIES": "", "THREAD_SWEEP": "2", "WARMUP": "0", "REPEAT": "1", "KERNEL_REPEAT": "2"}
    out = tmp_path / "out"
    done = subprocess.run(["bash", GPU_BENCHMARK, str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    assert sorted(os.listdir(out)) == ["kernel_bench.json", "log.txt", "perf.csv", "perf.json", "perf_baseline.json",
                                       "perf_floor.csv", "perf_floor.json", "perf_spin.json", "precision.json",
                                       "profile.txt", "profile_floor.txt", "runners.json", "targets.json",
                                       "targets.md"]
    log = (out / "log.txt").read_text()
    assert log.count("== [") == 9 and "warning: --overlap failed" not in log and "Traceback" not in log
    assert "skipped" not in log and "warning: exit status" not in log
    main = json.loads((out / "perf.json").read_text())
    assert "optimized_threads2" in main["lengths"]["8"]  # THREAD_SWEEP's
    assert "--no-option-variants" not in main["environment"]["argv"]  # VARIANTS=1
    for name, policy in (("perf.json", None), ("perf_baseline.json", None), ("perf_spin.json", "ACTIVE"),
                         ("perf_floor.json", None)):
        perf = json.loads((out / name).read_text())
        assert "incomplete" not in perf and set(perf["lengths"]) == {"8"} and perf["compiler_start_ms"] >= 0
        assert perf["environment"]["omp_wait_policy"] == policy
        assert (perf["setup"]["warmup"], perf["setup"]["repeat"]) == (0, 1)  # WARMUP, REPEAT
        assert all("error" not in row for rows in perf["lengths"].values() for row in rows.values())
    floor = json.loads((out / "perf_floor.json").read_text())
    assert floor["setup"]["model"] == "preset:llama-3.2-1b-narrow"
    assert all(floor["lengths"]["8"][m]["host_ops_per_inference"] > 0 for m in ("optimized", "ours"))
    ran = json.loads((out / "perf_baseline.json").read_text())["environment"]["argv"][0]
    assert ran.startswith(str(baseline))  # the baseline's own code, not this tree's
    runners = json.loads((out / "runners.json").read_text())
    assert set(runners) == {f"{r}_n8" for r in ("optimized", "ours", "otp", "tee_only")}
    for name, result in runners.items():
        assert result["timing"]["total_ms"] > 0 and result["memory"]["peak_host_rss_mb"] > 0
        if not name.startswith("tee_only"):
            assert result["correctness"]["rel_logit_error"] < 1e-2
    assert set(json.loads((out / "precision.json").read_text())) == {"batch1", "batch2_ragged"}
    kernel_bench = json.loads((out / "kernel_bench.json").read_text())
    steps = kernel_bench["lengths"]["4"]
    # compiled kernels add ours' softmax hop in one pass (C++), a form offered only there
    assert set(steps["eager"]) < set(steps["compiled"]) and all(ms > 0 for ms in steps["compiled"].values())
    assert json.loads((out / "targets.json").read_text())["targets"]  # the scorecard of what ran
    assert kernel_bench["fixed_costs_by_wait_policy"] == {}  # none: their fresh processes are test_kernels.py's
    assert set(kernel_bench["lengths"]) == {"4"} and kernel_bench["repeat"] == 2  # KERNEL_LENGTHS, KERNEL_REPEAT


def test_gpu_benchmark_runs_the_steps_named(tiny_models, tmp_path):
    """STEPS and RUNNER_LENGTHS finish a cut run on a second machine: only the runner processes, at their own
    length, and no scorecard (it needs the cut run's perf.json); without the floor, nothing turns CUDA graphs off."""
    env = {**os.environ, "MODEL": tiny_models["gqa-tied"], "LENGTHS": "8,16", "STEPS": "runners",
           "RUNNER_LENGTHS": "8"}
    out = tmp_path / "out"
    done = subprocess.run(["bash", GPU_BENCHMARK, str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:]
    assert sorted(os.listdir(out)) == ["log.txt", "runners.json"]  # the scorecard needs the cut run's perf.json
    log = (out / "log.txt").read_text()
    assert log.count("== [") == 2 and "skipped (" not in log and "without CUDA graphs" not in log
    assert "skipped: no perf.json" in log
    runners = json.loads((out / "runners.json").read_text())
    assert set(runners) == {f"{r}_n8" for r in ("optimized", "ours", "otp", "tee_only")}


def test_gpu_benchmark_keeps_to_its_budget(tiny_models, tmp_path):
    """A step that cannot start with the least it needs is skipped, and one cut at the budget keeps what it
    measured: perf, stopped by the budget's SIGTERM, writes its figures marked `incomplete`."""
    env = {**os.environ, "MODEL": tiny_models["gqa-tied"], "LENGTHS": "8,16", "DEADLINE": "0"}
    done = subprocess.run(["bash", GPU_BENCHMARK, str(tmp_path / "none")], env=env, capture_output=True, text=True,
                          timeout=300)
    # the floor, perf, the 4 runner processes at the longest length, 2 precision checks, kernel_bench
    assert done.returncode == 0 and done.stdout.count("skipped (") == 9, done.stdout[-3000:]
    assert sorted(os.listdir(tmp_path / "none")) == ["log.txt", "precision.json", "runners.json"]
    out, log = tmp_path / "perf", tmp_path / "perf.log"
    with open(log, "w") as err:
        perf = subprocess.Popen([sys.executable, "-m", "splitinfer.perf", "--model", tiny_models["gqa-tied"],
                                 "--lengths", "8", "--repeat", "100000", "--out-dir", str(out)], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=err)
        started = time.time()
        while "8 tokens: optimized" not in log.read_text() and perf.poll() is None and time.time() - started < 120:
            time.sleep(0.2)  # until the plain split is being timed (for ever, at this repeat count)
        perf.terminate()
        perf.wait(timeout=60)
    assert perf.returncode == 1 and "stopped by SIGTERM" in log.read_text(), log.read_text()[-2000:]
    result = json.loads((out / "perf.json").read_text())
    assert result["incomplete"].startswith("stopped by SIGTERM") and result["lengths"] == {"8": {}}



def test_scheme_flags_reach_only_their_runners():
    flags = ["--resident-embedding", "--model", "m", "--pad-scale", "2", "--overlap", "--mask-rank=2", "--fuse-hops",
             "--cuda-graphs"]
    assert bench.flags_for("optimized", flags, None) == ["--model", "m", "--overlap", "--cuda-graphs"]
    assert bench.flags_for("ours", flags, None) == ["--resident-embedding", "--model", "m", "--mask-rank=2",
                                                    "--fuse-hops", "--cuda-graphs"]
    assert bench.flags_for("otp", flags, None) == ["--resident-embedding", "--model", "m", "--pad-scale", "2",
                                                   "--fuse-hops", "--cuda-graphs"]
    assert bench.flags_for("tee_only", flags, "bfloat16") == ["--model", "m", "--dtype", "bfloat16"]
    bench.check_runner_flags(tuple(bench.SCRIPTS), flags, None)  # each runner's own parser takes what it gets
    # on, off or auto after a switch is its value, and goes where the switch goes
    valued = ["--fuse-hops", "off", "--model", "m", "--cuda-graphs", "auto", "--fuse-hops=on",
              "--resident-embedding", "off"]
    assert bench.flags_for("optimized", valued, None) == ["--model", "m", "--cuda-graphs", "auto"]
    assert bench.flags_for("tee_only", valued, None) == ["--model", "m"]
    assert bench.flags_for("ours", valued, None) == valued
    bench.check_runner_flags(tuple(bench.SCRIPTS), valued, None)


@pytest.mark.skipif(shutil.which("git") is None or not os.path.exists(os.path.join(ROOT, ".git")),
                    reason="needs git and a checkout")
def test_measured_files_are_not_ignored():
    """A GPU run's files, copied into tee_gpu/benchmarks/measured/, get committed: `.gitignore` once kept every
    folder named `results` out of git, and two runs' files with it."""
    measured = "tee_gpu/benchmarks/measured/h100_round99/perf.json"
    checked = subprocess.run(["git", "check-ignore", "-q", measured], cwd=ROOT)
    assert checked.returncode == 1, f"{measured} is ignored by git"
    assert subprocess.run(["git", "check-ignore", "-q", "results/optimized.json"], cwd=ROOT).returncode == 0
