"""The in-process performance comparison end to end, on a tiny checkpoint."""
from __future__ import annotations

import csv
import json
import re
from contextlib import contextmanager

import pytest
import torch

from splitinfer import perf
from splitinfer.engine import SplitLlama
from splitinfer.models import load_model
from splitinfer.schemes import make_scheme


def perf_argv(tiny_models, tmp_path, lengths: str = "8,16") -> list[str]:
    return ["--model", tiny_models["gqa-tied"], "--lengths", lengths, "--warmup", "0", "--repeat", "1",
            "--out-dir", str(tmp_path)]


def run_perf(tiny_models, tmp_path, *extra: str, lengths: str = "8,16") -> dict:
    assert perf.main([*perf_argv(tiny_models, tmp_path, lengths), *extra]) == 0
    return json.loads((tmp_path / "perf.json").read_text())["lengths"]


def failing_engine(option: str, message: str) -> type[SplitLlama]:
    """A SplitLlama that fails, as a CUDA error would, when built with `option` set."""
    class Failing(SplitLlama):
        def __init__(self, *args, **kwargs):
            if kwargs.get(option):
                raise RuntimeError(message)
            super().__init__(*args, **kwargs)

    return Failing


def test_ratios_and_logits_against_the_plain_split(tiny_models, tmp_path, capsys):
    lengths = run_perf(tiny_models, tmp_path, "--kernels", "compiled", "--cpp-kernels", lengths="8")  # more: the next test
    assert set(lengths) == {"8"}
    # how the model was loaded, by which targets knows the default model whatever its display name
    assert json.loads((tmp_path / "perf.json").read_text())["setup"]["model_source"] == "checkpoint"
    for row in lengths.values():
        assert {"optimized", "ours", "otp", "tee_only", "transformers_cpu", "ratios"} <= set(row)
        assert row["ratios"]["ours_over_plain"] == pytest.approx(row["ours"]["median_ms"] / row["optimized"]["median_ms"])
        assert row["optimized"]["rel_diff_from_optimized"] == 0
        # the runners as they ship and the baselines timed side by side; a variant alone
        cpp = {f"{m}_cpp_kernels" for m in ("optimized", "ours", "otp")}  # --cpp-kernels: in turn with the runners
        assert set(row["ours"]["timed_with"]) == {"optimized", "otp", "tee_only", "transformers_cpu", *cpp}
        for method in ("optimized", "ours", "otp"):  # no inductor, set-up's choices made afresh
            variant = row[f"{method}_cpp_kernels"]
            assert variant["kernels"].startswith("cpp") and variant["kernel_compile_ms"] > 0
            assert variant["rel_diff_from_optimized"] < 1e-3 and row["ratios"][f"{method}_cpp_kernels_over_shipped"] > 0
        assert row["ours_cpp_kernels"]["configuration"]["options"] == ["fuse_hops"]
        assert "ours_eager_kernels" not in row["optimized"]["timed_with"] and row["ours_eager_kernels"]["timed_with"] == []
        # float32: the masks cost only rounding
        assert 0 < row["ours"]["rel_diff_from_optimized"] < 1e-3 and 0 < row["otp"]["rel_diff_from_optimized"] < 1e-3
        assert row["optimized"]["categories_median_ms"]["overlap"] == 0
        assert all(row[m]["instrumented_median_ms"] > 0 and row[m]["device_warmup_ms"] > 0
                   for m in ("optimized", "ours", "otp"))
        calls = {m: row[m]["calls"] for m in ("optimized", "ours", "otp")}  # what the fixed costs scale with
        assert calls["ours"]["encryption"] == calls["ours"]["decryption"] > 0 and "encryption" not in calls["optimized"]
        assert calls["otp"]["to_gpu"] > calls["optimized"]["to_gpu"] > 0 and calls["ours"]["gpu_linear"] > 0
        steps = row["otp"]["breakdown_median_ms"]["crypto"]  # the matmuls' recovery alone, or in a fused hop
        assert sum(ms for step, ms in steps.items() if step.startswith("recovery_matmul")) > 0
        assert "softmax" in row["optimized"]["breakdown_median_ms"]["cpu_compute"]
        # as they ship, with compiled kernels: set-up timed ours and otp with and without fused hops, kept the
        # faster, and their other variants take that choice; the forced ones name theirs
        for method in ("ours", "otp"):
            chosen = row[method]["configuration"]
            assert chosen["options"] == ["fuse_hops"] and set(chosen["median_ms"]) == {"neither", "fuse_hops"}
            assert row[method]["fuse_hops"] == (chosen["kept"] == "fuse_hops") and row[method]["configuration_choice_ms"] > 0
            assert row[f"{method}_fused_hops"]["fuse_hops"] and row[f"{method}_fused_hops"]["configuration"] == {}
        assert row["ours_eager_kernels"]["fuse_hops"] == row["ours_all_compiled"]["fuse_hops"] == row["ours"]["fuse_hops"]
        assert row["optimized"]["configuration"] == {} and not row["optimized"]["cuda_graphs"]
        # compiled kernels, built in set-up, and the same engines with eager ones beside them
        assert row["ours"]["kernels"].startswith("compiled") and row["ours"]["kernel_compile_ms"] > 0
        assert row["ours_eager_kernels"]["kernels"] == "eager" and row["ours_eager_kernels"]["kernel_compile_ms"] == 0
        assert row["ratios"]["ours_eager_over_compiled_kernels"] > 0
        # and compiled at every shape, without set-up's per-shape choice
        assert row["optimized_all_compiled"]["kernel_choices"] == {} and row["optimized"]["kernel_choices"]
        assert row["ratios"]["ours_all_compiled_over_chosen"] > 0
        assert row["ours_eager_kernels"]["rel_diff_from_optimized"] < 1e-3
        # ours and otp with each hop between two linears one TEE call: the same function, steps and crossings
        for method in ("ours", "otp"):
            fused = row[f"{method}_fused_hops"]
            assert fused["rel_diff_from_optimized"] < 1e-3 and fused["calls"] == row[method]["calls"]
            assert any("+rmsnorm+" in step for step in fused["breakdown_median_ms"]["crypto"])
        assert row["ratios"]["ours_fused_hops_over_plain"] > 0 and row["ratios"]["otp_fused_hops_online_over_plain"] > 0
    printed = capsys.readouterr().out  # each headline ratio with its range round by round (one round here)
    kept = lengths["8"]["ours"]["configuration"]["kept"]
    assert re.search(rf"  ours +[0-9.]+  \([0-9.]+\)  set-up kept: {kept}\n", printed)
    assert re.search(r"ours_over_plain +[0-9.]+  round by round [0-9.]+–[0-9.]+ \(1 round\)", printed)
    fused = [line for line in printed.splitlines() if line.strip().startswith("ours_fused_hops_over_plain")]
    assert len(fused) == 1 and "round by round" not in fused[0]  # a variant is timed alone
    # perf.csv: the same figures, one flat row per length and method, for plotting
    rows = list(csv.DictReader(open(tmp_path / "perf.csv")))
    assert {(r["tokens"], r["method"]) for r in rows} == {(n, m) for n, row in lengths.items() for m in row
                                                           if m != "ratios"}
    ours = next(r for r in rows if (r["tokens"], r["method"]) == ("8", "ours"))
    assert float(ours["median_ms"]) == pytest.approx(lengths["8"]["ours"]["median_ms"])
    assert float(ours["crypto_ms"]) > 0 and int(ours["tee_calls"]) > int(ours["gpu_calls"]) > 0 and ours["error"] == ""


def test_a_failing_variant_is_recorded_and_the_rest_still_run(tiny_models, tmp_path, monkeypatch, capsys):
    """One ablation failing on a lent GPU must not cost the whole comparison."""
    monkeypatch.setattr(perf, "variants", lambda overlap, ablations, sweep, kernel_variants=False, fused_hops=False, cuda_graphs=False, shipped=None,
                        fresh_buffers=False, without_cpp=False, cpp_kernels=False: [
        ("optimized", "plain", {}, None), ("ours", "matrix", {}, None), ("otp", "otp", {}, None),
        ("optimized_overlap", "plain", {"overlap": True}, None), ("optimized_threads1", "plain", {}, 1)])
    monkeypatch.setattr(perf, "SplitLlama", failing_engine(
        "overlap", "CUDA error: an illegal memory access was encountered\nmore detail"))
    row = run_perf(tiny_models, tmp_path, "--split-only")["8"]
    assert row["optimized_overlap"] == {"error": "CUDA error: an illegal memory access was encountered"}
    failed = [r for r in csv.DictReader(open(tmp_path / "perf.csv")) if r["method"] == "optimized_overlap"]
    assert [(r["error"], r["median_ms"]) for r in failed] == [(row["optimized_overlap"]["error"], "")] * 2  # 8, 16
    assert row["optimized_threads1"]["rel_diff_from_optimized"] < 1e-5  # the same function, other threads
    out, err = capsys.readouterr()
    assert "optimized_overlap    failed: CUDA error" in out and "warning: optimized_overlap failed" in err
    # each variant at every length in turn, after the runners as they ship at every length
    order = [line for line in err.splitlines() if line.startswith(("8 tokens:", "16 tokens:"))]
    assert order[-4:] == ["8 tokens: optimized_overlap", "16 tokens: optimized_overlap",
                          "8 tokens: optimized_threads1", "16 tokens: optimized_threads1"]


def test_the_headline_comes_first_at_every_length(tiny_models, tmp_path, monkeypatch):
    """The runners as they ship and the baselines run at every length before any variant, so a run stopped
    by its budget among the variants still has the ratios the targets are stated in, at every length."""
    monkeypatch.setattr(perf, "variants", lambda overlap, ablations, sweep, kernel_variants=False, fused_hops=False, cuda_graphs=False, shipped=None,
                        fresh_buffers=False, without_cpp=False, cpp_kernels=False: [
        ("optimized", "plain", {}, None), ("ours", "matrix", {}, None), ("otp", "otp", {}, None),
        ("optimized_full_scores", "plain", {"triangle": False}, None)])

    class StoppedAtTheVariant(SplitLlama):
        def __init__(self, *args, **kwargs):
            if kwargs.get("triangle") is False:
                raise perf.Stopped("stopped by SIGTERM (a time limit)")
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(perf, "SplitLlama", StoppedAtTheVariant)
    assert perf.main(perf_argv(tiny_models, tmp_path)) == 1
    result = json.loads((tmp_path / "perf.json").read_text())
    assert result["incomplete"].startswith("stopped by SIGTERM")
    for row in result["lengths"].values():
        assert {"optimized", "ours", "otp", "tee_only", "transformers_cpu"} <= set(row)
        assert row["ratios"]["ours_over_plain"] > 0 and "optimized_full_scores" not in row


def test_a_stop_during_the_cpp_build_stops_the_run(monkeypatch):
    """A SIGTERM arriving while the C++ kernels build (the first step with a C++ form, in set-up) stops the run as
    it would anywhere else: the build, which leaves the kernels out on any failure of its own, does not take it for
    one (it did, and a run past its budget went on with the kernels left out)."""
    import functools
    from torch.utils import cpp_extension
    from splitinfer import kernels, native

    def stopped(*args, **kwargs):
        raise perf.Stopped("stopped by SIGTERM (a time limit)")

    monkeypatch.setattr(cpp_extension, "load_inline", stopped)
    monkeypatch.setattr(native, "_built", functools.cache(native._built.__wrapped__))  # a fresh try
    monkeypatch.setattr(kernels, "failed", {})
    with pytest.raises(perf.Stopped):
        native._built()
    assert kernels.failed == {}


def test_the_runners_inferences_interleave(tiny_models):
    """Engines timed together (the runners as they ship, and the baselines) are set up and warmed in turn, then
    take turns at every timed round, each round starting one later, so that a drift in the host's speed meets each
    alike; each keeps its own figures."""
    model = load_model(tiny_models["gqa-tied"], torch.float32, torch.device("cpu"))
    ran: list[tuple[str, bool]] = []

    class Logged(SplitLlama):
        def timed_forward(self, ids, attention_mask, instrumented=True):
            ran.append((self.scheme.name, instrumented))
            return super().timed_forward(ids, attention_mask, instrumented)

    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    timers = {method: perf.EngineTimer(Logged(model.config, model.state_dict, make_scheme(scheme),
                                              torch.device("cpu"), torch.float32), ids, torch.ones_like(ids), warmup=1)
              for method, scheme in (("optimized", "plain"), ("ours", "matrix"))}
    timers["call"] = perf.CallTimer(lambda: ran.append(("call", False)), torch.device("cpu"), warmup=1,
                                    info={"dtype": "float32"})
    perf.interleave(timers, repeat=2)
    plain, ours = timers["optimized"].engine.scheme.name, timers["ours"].engine.scheme.name
    # set-up: each its first inference (instrumented) and its warm-up, in turn
    set_up = [(plain, True), (plain, False), (ours, True), (ours, False), ("call", False), ("call", False)]
    # each round starts one timer later than the last: no method always follows the same one
    first_round = [(plain, True), (plain, False), (ours, True), (ours, False), ("call", False)]
    second_round = [(ours, True), (ours, False), ("call", False), (plain, True), (plain, False)]
    assert ran == set_up + first_round + second_round
    figures = {name: timer.figures() for name, timer in timers.items()}
    assert "encryption" not in figures["optimized"]["calls"] and figures["ours"]["calls"]["encryption"] > 0
    assert all(f["min_ms"] <= f["median_ms"] <= f["max_ms"] for f in figures.values())
    # each inference's total kept, a round each, in order: two methods' runs pair up round by round
    assert all(len(f["runs_ms"]) == 2 and min(f["runs_ms"]) == f["min_ms"] for f in figures.values())
    assert figures["call"]["dtype"] == "float32" and len(timers["call"].runs) == 2


def test_the_copy_variants_are_timed_in_turn_with_the_runners(tiny_models, tmp_path, monkeypatch):
    """The plain split with a fresh pinned buffer for every copy (`optimized_fresh_buffers`) and with its copies to
    the GPU cut across two streams (`optimized_copy_streams`), both on CUDA by default, are set up and timed in the
    runners' own group, round by round with them, and each one's median over the plain split's is a ratio."""
    copies = [v for v in perf.variants(False, False, None, fresh_buffers=True) if v[0].endswith(perf.IN_TURN)]
    assert copies == [("optimized_fresh_buffers", "plain", {"kept_buffers": False}, None),
                      ("optimized_copy_streams", "plain", {"copy_streams": 2}, None)]
    real = perf.variants
    monkeypatch.setattr(perf, "variants", lambda *args, **kwargs: real(*args, **{**kwargs, "fresh_buffers": True}))
    row = run_perf(tiny_models, tmp_path, "--no-kernel-variants", lengths="8")["8"]
    timed_with = set(row["optimized"]["timed_with"])
    assert {"optimized_fresh_buffers", "optimized_copy_streams", "ours", "tee_only"} <= timed_with
    assert row["ratios"]["optimized_fresh_buffers_over_kept"] > 0
    assert row["ratios"]["optimized_copy_streams_over_one_stream"] > 0
    assert row["optimized_fresh_buffers"]["rel_diff_from_optimized"] == 0.0
    assert row["optimized_copy_streams"]["rel_diff_from_optimized"] == 0.0


def test_option_variants_may_be_left_to_set_up(tiny_models, tmp_path):
    """`--no-option-variants`: no variant forces fused hops (or CUDA graphs), and the runners as they ship still
    leave them to set-up, whose configuration holds each way's median."""
    row = run_perf(tiny_models, tmp_path, "--no-option-variants", "--no-kernel-variants", "--split-only",
                   "--kernels", "compiled", lengths="8")["8"]
    assert set(row) == {"optimized", "ours", "otp"}
    for method in ("ours", "otp"):
        assert set(row[method]["configuration"]["median_ms"]) == {"neither", "fuse_hops"}


def test_one_at_a_time_times_each_runner_alone(tiny_models, tmp_path, capsys):
    """`--one-at-a-time` (a GPU that cannot hold three engines): each runner timed alone, then the baselines together;
    the row and its ratios as side by side."""
    row = run_perf(tiny_models, tmp_path, "--one-at-a-time", "--kernels", "eager", lengths="8")["8"]
    assert row["ours"]["timed_with"] == [] and row["tee_only"]["timed_with"] == ["transformers_cpu"]
    assert {"optimized", "ours", "otp", "tee_only", "transformers_cpu"} <= set(row) and row["ratios"]["ours_over_plain"] > 0
    together = [line for line in capsys.readouterr().err.splitlines() if "in turn" in line]
    assert together == ["8 tokens: timing tee_only, transformers_cpu in turn, 1× each"]


def test_a_run_cut_short_keeps_what_it_measured(tiny_models, tmp_path, monkeypatch):
    """A CUDA failure in the headline (here in the TEE-only engine at the second length) poisons the process:
    perf.json still gets every figure taken before it (the first length's), marked incomplete, and the error
    still ends the run."""
    tee_only_engines = []

    class FailsAtTheSecondLength(SplitLlama):
        def __init__(self, *args, **kwargs):
            if kwargs.get("tee_only"):
                tee_only_engines.append(self)
                if len(tee_only_engines) == 2:
                    raise RuntimeError("CUDA error: unspecified launch failure")
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(perf, "SplitLlama", FailsAtTheSecondLength)
    with pytest.raises(RuntimeError):
        perf.main(perf_argv(tiny_models, tmp_path, lengths="8,16"))
    result = json.loads((tmp_path / "perf.json").read_text())
    assert result["incomplete"] == "CUDA error: unspecified launch failure"
    assert {"optimized", "ours", "otp", "tee_only", "transformers_cpu", "ratios"} <= set(result["lengths"]["8"])
    assert result["lengths"]["16"] == {}  # its engines were set up, none timed


def test_copy_bandwidth_at_the_boundarys_sizes(monkeypatch, capsys):
    """The copy probe (CUDA only) on the CPU, with CUDA's events standing in as 2 ms per copy: every size and
    direction is timed, as bytes over time, and the table prints them."""
    import torch

    class Event:
        def __init__(self, enable_timing: bool = False):
            pass

        def record(self, stream=None):
            pass

        def synchronize(self):
            pass

        def elapsed_time(self, end) -> float:
            return 2.0

    class Stream:
        """Records which stream each copy is queued on, and what each waits for."""
        current, log = None, []

        def __init__(self, device=None):
            self.name = f"side {len([e for e in Stream.log if e[0] == 'new'])}"
            Stream.log.append(("new", self.name))

        def wait_stream(self, other) -> None:
            Stream.log.append(("wait", self.name, other.name))

    main = Stream.__new__(Stream)
    main.name = "main"

    @contextmanager
    def on(side):
        Stream.current = side
        yield
        Stream.current = None

    copied_on = []
    copy_ = torch.Tensor.copy_
    empty = torch.empty
    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: main)
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, src, non_blocking=False: (
        copied_on.append((Stream.current or main).name), copy_(self, src))[1])
    monkeypatch.setattr(torch, "empty", lambda *a, pin_memory=False, device=None, **k: empty(*a, **k))
    bandwidth = perf.copy_bandwidth(torch.device("cpu"), mib=4, repeat=2, sizes=(1,))
    assert bandwidth["to_gpu_pinned_gb_per_s"] == pytest.approx(4 * 2 ** 20 / 2e-3 / 1e9)
    assert set(bandwidth["by_size"]) == {1, 4} and bandwidth["by_size"][1] == {
        name: pytest.approx(2 ** 20 / 2e-3 / 1e9) for name in
        ("to_gpu_pinned_gb_per_s", "to_gpu_pinned_just_written_gb_per_s",
         "to_gpu_pinned_just_written_2_streams_gb_per_s", "to_gpu_pinned_just_written_4_streams_gb_per_s",
         "to_cpu_pinned_gb_per_s")}
    # a copy in parts: the first on the main stream, each other on a side stream that first waits for the main one,
    # which then waits for each
    assert set(copied_on) == {"main", "side 0", "side 1", "side 2"}
    waits = [e[1:] for e in Stream.log if e[0] == "wait"]
    assert waits[:2] == [("side 0", "main"), ("main", "side 0")]
    assert waits[-6:] == [("side 0", "main"), ("side 1", "main"), ("side 2", "main"),
                          ("main", "side 0"), ("main", "side 1"), ("main", "side 2")]
    perf.print_table({"copy_bandwidth": bandwidth, "lengths": {}})
    assert ("1 MiB pinned, GB/s: to_gpu_pinned 0.5, to_gpu_pinned_just_written 0.5, "
            "to_gpu_pinned_just_written_2_streams 0.5") in capsys.readouterr().out


def test_the_profile_is_of_the_online_phase(tiny_models):
    """perf's profile of a masked scheme leaves its offline phase (the masks' random draws) out, and times no
    region of its own (no clock reads around the TEE's ops)."""
    model = load_model(tiny_models["gqa-tied"], torch.float32, torch.device("cpu"))
    engine = SplitLlama(model.config, model.state_dict, make_scheme("matrix", seed=0), torch.device("cpu"),
                        torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    table, called, compiled_calls = perf.profile_engine(engine, ids, torch.ones_like(ids), "ours")
    assert table.startswith("== ours\n") and "aten::gather" in table and "aten::uniform_" not in table
    assert "aten::randint" not in table and engine.metrics.instrumented and compiled_calls == 0  # eager kernels
    plain = SplitLlama(model.config, model.state_dict, make_scheme("plain"), torch.device("cpu"), torch.float32)
    assert 0 < perf.profile_engine(plain, ids, torch.ones_like(ids), "plain")[1] < called  # ours' masks
