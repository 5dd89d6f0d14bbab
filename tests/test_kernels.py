"""The TEE's compiled kernels: the same logits as the eager ops, built in set-up, and an eager fallback."""
from __future__ import annotations

import json
import os

import pytest
import torch
import torch._inductor

from splitinfer import engine as engine_module
from splitinfer import kernels
from splitinfer.engine import SplitLlama, attention_operands
from splitinfer.inputs import build_batch
from splitinfer.models import load_model
from splitinfer.reference import compare, reference_logits
from splitinfer.schemes import _pad_tensor, make_scheme
from splitinfer.tee_ops import CausalBlocks, RmsNorm, apply_rope, attention_bias

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def eager_afterwards():
    yield
    kernels.select(False)


def graphs_built() -> int:
    return kernels.builds()


@pytest.mark.parametrize("scheme", ["plain", "matrix", "otp"])
# the shapes of other tests' compiled engines (test_perf's, the fused hops'), which then build less
@pytest.mark.parametrize("variant,batch,length", [("gqa-tied", 1, 8), ("biases", 2, 10)])
def test_compiled_kernels_match_transformers_and_build_in_set_up(tiny_models, scheme, variant, batch, length,
                                                                 monkeypatch):
    """Set-up builds every kernel the inference runs, then hands the heap's free memory back once
    (`release_freed_memory`: the compiler's garbage); eager kernels build nothing and hand nothing back."""
    released = []
    monkeypatch.setattr(engine_module, "release_freed_memory", lambda: released.append(True))
    model = load_model(tiny_models[variant], torch.float32, CPU)
    ids, mask = build_batch(model.tokenizer, ["Compiled kernels, the same answers."], length, batch, ragged=batch > 1)
    reference = reference_logits(model.config, model.state_dict, ids, mask)
    logits = {}
    for compiled in (False, True):
        # compiled at every shape, so that every kernel is built: none may be left for the inference, not
        # even for operands laid out otherwise than set-up's (a kernel is built for its inputs' strides)
        engine = SplitLlama(model.config, model.state_dict, make_scheme(scheme, seed=3), CPU, torch.float32,
                            compiled=compiled, choose_kernels=False)
        compile_ms = engine.warm_kernels(*ids.shape)
        assert (compile_ms > 0) == compiled and (engine.kernels == kernels.COMPILED) == compiled
        assert len(released) == compiled
        linears, matmuls = engine.mask_shapes(*ids.shape)
        assert {name: (a.shape, b.shape) for name, (a, b) in engine.matmul_operands(*ids.shape).items()} == {
            name: matmuls[name] for name in ("0.scores", "0.attend")}
        built = graphs_built()
        logits[compiled] = engine.timed_forward(ids, mask)[0]
        assert graphs_built() == built  # the set-up built every kernel the inference runs
    err = compare(logits[True], reference)
    assert err["rel_logit_error"] <= (1e-4 if scheme == "plain" else 1e-3) and err["top1_agreement"] == 1.0
    # the same masks (the set-up's draws leave the generator as it was), so only rounding differs
    assert compare(logits[True], logits[False])["rel_logit_error"] <= 1e-5


def test_a_kernel_is_one_function_compiled_or_not():
    norm = RmsNorm.of(torch.rand(32) + 0.5, 1e-5)
    x = torch.randn(3, 5, 32)
    kernels.select(False)
    eager = norm(x)
    kernels.select(True)
    assert torch.allclose(norm(x), eager, rtol=1e-5, atol=1e-6)
    assert torch.allclose(eager, norm.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5), atol=1e-5)


def test_kernels_build_in_this_process(monkeypatch):
    """No pool of compile worker processes: it would compete with the timed TEE for the CPU."""
    import torch._inductor.config as inductor
    monkeypatch.delenv("TORCHINDUCTOR_COMPILE_THREADS", raising=False)
    monkeypatch.setitem(kernels._state, "mode", kernels.EAGER)
    # inductor's own patch, not monkeypatch: under torch 2.11 monkeypatch reads a config key as unset and deletes
    # it on undo, which hides the key from every later reader (`kernels._probe` then fails to compile)
    with inductor.patch({"compile_threads": None, "cpp.vec_isa_ok": None}):
        assert kernels.select(True) == kernels.COMPILED
        assert inductor.compile_threads == 1
        assert inductor.cpp.vec_isa_ok is True  # the CPU's flags, not a test build per instruction set
    assert kernels.start_ms() > 0


def test_a_failed_probe_brings_back_the_instruction_set_tests(monkeypatch):
    """Where the instruction sets the CPU's flags name do not build, the probe fails once; inductor's own
    test builds then choose, and the kernels are still compiled."""
    import torch._inductor.config as inductor
    calls = []

    def fails_first(real=kernels._build_probe):
        calls.append(inductor.cpp.vec_isa_ok)
        return "avx512 does not build" if len(calls) == 1 else real()

    monkeypatch.setattr(kernels, "_build_probe", fails_first)
    monkeypatch.setitem(kernels._state, "mode", kernels.EAGER)
    with inductor.patch({"cpp.vec_isa_ok": None}):
        assert kernels.select(True) == kernels.COMPILED
        assert calls == [True, None] and inductor.cpp.vec_isa_ok is None


def test_instruction_set_checks_load_their_builds_without_importing_torch(monkeypatch):
    """torch 2.11 loads each instruction-set test build in a fresh Python that imports torch (1.3 s each); in
    the probe that Python imports nothing, the build still loads (so the check still passes), and the script
    is torch's own again after the probe, and in the retry of a failed probe."""
    import torch._inductor.config as inductor
    from torch._inductor import cpu_vec_isa
    torch_2_11 = '\nimport torch\nfrom ctypes import cdll\ncdll.LoadLibrary("__lib_path__")\n'
    monkeypatch.setattr(cpu_vec_isa.VecISA, "_avx_py_load", torch_2_11)
    monkeypatch.setenv("LD_LIBRARY_PATH", "/elsewhere")
    seen = []

    def probe() -> str | None:
        seen.append(cpu_vec_isa.VecISA._avx_py_load)
        if len(seen) == 1:
            assert cpu_vec_isa.VecAVX2().check_build(cpu_vec_isa.VecISA._avx_code)  # a real build, loaded
            return "fails once"
        return None

    monkeypatch.setattr(kernels, "_build_probe", probe)
    monkeypatch.setitem(kernels._state, "mode", kernels.EAGER)
    with inductor.patch({"cpp.vec_isa_ok": None}):
        assert kernels.select(True) == kernels.COMPILED
    assert "import torch" not in seen[0] and "cdll.LoadLibrary" in seen[0]
    assert seen[1] == torch_2_11 == cpu_vec_isa.VecISA._avx_py_load
    assert os.environ["LD_LIBRARY_PATH"] == "/elsewhere"


def test_without_a_compiler_the_kernels_run_eager(monkeypatch, capsys):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setattr(torch._inductor, "compile", no_compiler)
    monkeypatch.setitem(kernels._state, "mode", kernels.EAGER)
    monkeypatch.setitem(kernels._state, "failure", None)
    mode = kernels.select(True)
    assert mode.startswith(kernels.EAGER) and "No working C++ compiler" in mode
    assert "the TEE's kernels run eager" in capsys.readouterr().err
    norm = RmsNorm.of(torch.ones(8), 1e-5)
    assert torch.allclose(norm(torch.full((2, 8), 3.0)), torch.ones(2, 8), atol=1e-4)  # eager, no compile called
    monkeypatch.setitem(kernels._state, "failure", None)  # the real compiler for the tests after this one


def test_kernel_bench_times_each_step_both_ways(tmp_path, capsys):
    from splitinfer import kernel_bench
    out = tmp_path / "k.json"
    assert kernel_bench.main(["--preset", "smollm2-135m", "--lengths", "4", "--repeat", "2", "--threads", "1,2",
                              "--round-trip-device", "cpu", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    steps = results["lengths"]["4"]
    # the C++ kernels (the plain split's small ops, the softmaxes in one pass, ours' permutations, ours' and otp's
    # hops) are offered with compiled kernels only
    assert set(steps["compiled"]) - set(steps["eager"]) == {"plain: 2 x RMSNorm with the residual add (C++)",
                                                            "plain: RoPE on q and k (C++)", "plain: SiLU·up (C++)",
                                                            "ours: softmax hop, one pass (C++)",
                                                            "plain, otp: softmax of the causal blocks, one pass (C++)",
                                                            "ours: both matmuls' masks, C++ permutations",
                                                            "ours: RoPE hop, C++ kernels",
                                                            "ours: P·V hop, one C++ call",
                                                            "ours: 3 hops, one C++ call each",
                                                            "otp: RoPE hop, one C++ call",
                                                            "otp: 3 hops, one C++ call each"}
    assert len(steps["eager"]) == 29
    assert {"ours: 3 hops, fused", "otp: 3 hops, separate steps", "ours: softmax hop, fused",
            "otp: RoPE hop, fused"} <= set(steps["compiled"])
    costs = results["fixed_costs"]
    assert set(costs) == {"1", "2"} and all(min(row.values()) > 0 for row in costs.values())
    # on two threads, the RMSNorm's kernel built on one too, after each wait; the RMSNorm as one C++ call after each
    # (and on two threads on one of them too); an empty team after each, and with barriers
    assert len(costs["1"]) == 24 and len(costs["2"]) == 34
    assert {"RMSNorm with the residual add, 128 tokens, C++, after 30 ms idle",
            "RMSNorm with the residual add, 128 tokens, C++ on one thread, straight after a round trip to cpu"
            } <= set(costs["2"])
    assert {"an empty team of every thread (C++), after 2 ms idle", "an empty team of every thread (C++), 4 barriers",
            "an empty team of every thread (C++), straight after a round trip to cpu"} <= set(costs["2"])
    assert "RMSNorm with the residual add, 128 tokens, compiled on one thread, after 30 ms idle" in costs["2"]
    assert "RMSNorm with the residual add, 128 tokens, compiled, straight after a round trip to cpu" in \
        results["fixed_costs"]["1"]
    assert results["fixed_costs_by_wait_policy"] == {}  # none asked for
    assert set(results["product_rates_gmacs"]) == {"float32", "bfloat16", "int8, int32 sums"}
    assert min(results["product_rates_gmacs"].values()) > 0
    assert set(results["memory_gbs"]) == {"copy", "copy, one thread", "float16 scale", "float16 scale, one thread"}
    assert min(results["memory_gbs"].values()) > 0
    assert all(ms > 0 for mode in ("eager", "compiled") for ms in steps[mode].values())
    assert steps["kernels"] == kernels.COMPILED and "ours: recover 4 linears" in capsys.readouterr().out
    assert "incomplete" not in results
    assert kernel_bench.main(["--preset", "nope", "--out", str(out)]) == 2
    assert "unknown preset 'nope'" in capsys.readouterr().err
    assert kernel_bench.main(["--wait-policies", "SPIN", "--out", str(out)]) == 2
    assert "--wait-policies takes PASSIVE and ACTIVE" in capsys.readouterr().err
    assert kernel_bench.main(["--round-trip-device", "gpu7", "--out", str(out)]) == 2
    assert "not a device: 'gpu7'" in capsys.readouterr().err


def test_kernel_bench_fixed_costs_under_a_wait_policy(tmp_path, monkeypatch):
    """--wait-policies times the fixed costs again in a fresh process per policy (OMP_WAIT_POLICY is read when
    a process starts), and a process that fails leaves its error, not the run's end."""
    from splitinfer import kernel_bench
    out = tmp_path / "k.json"
    assert kernel_bench.main(["--preset", "smollm2-135m", "--lengths", "", "--repeat", "1", "--threads", "1",
                              "--wait-policies", "passive", "--round-trip-device", "cpu", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert set(results["fixed_costs_by_wait_policy"]) == {"PASSIVE"} and results["lengths"] == {}
    row = results["fixed_costs_by_wait_policy"]["PASSIVE"]["1"]
    assert min(row.values()) > 0 and sum("round trip to cpu" in step for step in row) == 4  # the flag goes along
    monkeypatch.setattr(kernel_bench.sys, "executable", "false")
    assert kernel_bench.main(["--lengths", "", "--repeat", "1", "--threads", "1", "--wait-policies", "ACTIVE",
                              "--out", str(out)]) == 0
    assert "error" in json.loads(out.read_text())["fixed_costs_by_wait_policy"]["ACTIVE"]


def test_kernel_bench_cut_short_keeps_its_fixed_costs(tmp_path, monkeypatch):
    """The fixed costs come first and are written at once, so a run stopped in the per-layer stage (a GPU
    run's time limit) still leaves them, marked incomplete."""
    from splitinfer import kernel_bench

    def stopped(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(kernel_bench, "layer_steps", stopped)
    out = tmp_path / "k.json"
    with pytest.raises(KeyboardInterrupt):
        kernel_bench.main(["--preset", "smollm2-135m", "--lengths", "4", "--repeat", "2", "--out", str(out)])
    results = json.loads(out.read_text())
    assert results["incomplete"] and results["lengths"] == {}
    assert len(results["fixed_costs"]) == 1 and min(next(iter(results["fixed_costs"].values())).values()) > 0


def test_a_kernel_that_fails_to_compile_runs_eager(monkeypatch, capsys):
    def broken_compile(graph, example_inputs, options=None):
        def run(*args):
            raise RuntimeError("Unsupported: an op this compiler does not take\ndetails")
        return run

    monkeypatch.setattr(torch._inductor, "compile", broken_compile)
    monkeypatch.setattr(kernels, "failed", {})
    monkeypatch.setitem(kernels._state, "on", True)

    @kernels.tee_kernel
    def doubled(x):
        return x * 2

    assert torch.equal(doubled(torch.ones(2)), torch.full((2,), 2.0))
    assert kernels.failed == {"doubled": "Unsupported: an op this compiler does not take"}
    assert "the TEE kernel doubled runs eager" in capsys.readouterr().err
    assert torch.equal(doubled(torch.ones(3)), torch.full((3,), 2.0)) and capsys.readouterr().err == ""


@pytest.fixture
def two_threads():
    """torch on two threads, so that set-up also times each kernel's eager form on one (`kernels._choose`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def test_a_kernel_is_built_for_the_thread_count_it_runs_at(monkeypatch, tmp_path):
    """A build names torch's thread count in its options, which key inductor's cache of built graphs: torch 2.11's
    key lacks the count, so that a graph built on one thread was served from that cache at any count, and ran on
    one thread. Built again at another count (`select` drops the old builds), the kernel is built anew, for it."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # an empty cache: nothing built before counts
    options, real_compile = [], torch._inductor.compile

    def recording_compile(graph, example_inputs, options_=None, **kwargs):
        given = kwargs.get("options", options_)
        options.append((torch.get_num_threads(), given["cpp.threads"]))
        return real_compile(graph, example_inputs, options=given)

    monkeypatch.setattr(torch._inductor, "compile", recording_compile)

    @kernels.tee_kernel
    def halved(x):
        return x / 2

    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            kernels.select(True, chosen=False)
            assert torch.equal(halved(torch.ones(4)), torch.full((4,), 0.5))
    finally:
        torch.set_num_threads(threads)
        kernels.select(True)
    # `select`'s probe and the kernel, at each count
    assert all(count == built_for for count, built_for in options) and {count for count, _ in options} == {1, 2}


def test_set_up_keeps_the_faster_form_at_each_shape(monkeypatch, two_threads):
    """Inside `choosing` (set-up), a compiled kernel is timed against its eager form, on all threads and on one,
    at each shape, and the fastest runs at that shape from then on; a changed thread count drops the choices
    with the compiled code."""
    compiled_calls = []
    real_compile = torch._inductor.compile

    def counting_compile(graph, example_inputs, options=None):
        built = real_compile(graph, example_inputs, options=options)

        def run(*args):
            compiled_calls.append(tuple(args[0].shape))
            return built(*args)
        return run

    # stand-in times: eager, compiled, then eager on one thread, at 3 values, then at 5
    clock = iter([1.0, 2.0, 3.0, 2.0, 1.0, 3.0])
    monkeypatch.setattr(torch._inductor, "compile", counting_compile)
    monkeypatch.setattr(kernels, "timed", lambda step, fresh=None, repeat=30: (step(None), next(clock))[1])
    monkeypatch.setattr(kernels, "choices", {})
    monkeypatch.setattr(kernels, "_form_at", {})

    @kernels.tee_kernel
    def doubled(x):
        return x * 2

    kernels.select(True)
    with kernels.choosing():
        assert torch.equal(doubled(torch.ones(3)), torch.full((3,), 2.0))
        assert torch.equal(doubled(torch.ones(5)), torch.full((5,), 2.0))
    assert kernels.chosen() == {
        "doubled [3]": {"eager_ms": 1.0, "compiled_ms": 2.0, "eager_one_thread_ms": 3.0, "runs": "eager"},
        "doubled [5]": {"eager_ms": 2.0, "compiled_ms": 1.0, "eager_one_thread_ms": 3.0, "runs": "compiled"}}
    compiled_calls.clear()
    assert torch.equal(doubled(torch.ones(3)), torch.full((3,), 2.0))
    assert torch.equal(doubled(torch.ones(5)), torch.full((5,), 2.0))
    assert compiled_calls == [(5,)]  # eager at 3 values, compiled at 5
    kernels.select(True, chosen=False)  # compiled at every shape (perf's *_all_compiled)
    doubled(torch.ones(3))
    assert compiled_calls == [(5,), (3,)]
    kernels.select(True)
    clock = iter([3.0, 1.0, 3.0])  # timed again in a later set-up, compiled is now faster at 3 values
    with kernels.choosing():
        doubled(torch.ones(3))
    assert kernels.chosen()["doubled [3]"]["runs"] == "compiled"
    clock = iter([1.0, 2.0, 3.0, 2.0, 1.0, 3.0])  # one shape in two layouts: each its own choice
    square = torch.ones(2, 2)
    with kernels.choosing():
        doubled(square)
        doubled(square.t())
    assert kernels.chosen()["doubled [2, 2]"]["runs"] == "eager"
    assert kernels.chosen()["doubled [2, 2] strides [1, 2]"]["runs"] == "compiled"
    compiled_calls.clear()
    doubled(square), doubled(square.t())
    assert compiled_calls == [(2, 2)]  # the transposed one
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        kernels.select(True)
        assert kernels.chosen() == {}
    finally:
        torch.set_num_threads(threads)


def test_a_small_kernel_may_run_on_one_thread(monkeypatch, two_threads):
    """Where set-up timed the eager form on one thread fastest, the kernel runs so at that shape: torch's thread
    count is one for the call and back to what it was after, and the JSON's choice says so."""
    counts = []

    @kernels.tee_kernel
    def doubled(x):
        counts.append(torch.get_num_threads())
        return x * 2

    clock = iter([2.0, 3.0, 1.0, 1.0, 2.0, 3.0])  # one thread fastest at 3 values, all threads at 5
    monkeypatch.setattr(kernels, "timed", lambda step, fresh=None, repeat=30: (step(None), next(clock))[1])
    monkeypatch.setattr(kernels, "choices", {})
    monkeypatch.setattr(kernels, "_form_at", {})
    kernels.select(True)
    with kernels.choosing():
        doubled(torch.ones(3)), doubled(torch.ones(5))
    assert kernels.chosen()["doubled [3]"]["runs"] == kernels.ONE_THREAD
    assert kernels.chosen()["doubled [5]"]["runs"] == "eager"
    counts.clear()
    assert torch.equal(doubled(torch.ones(3)), torch.full((3,), 2.0))
    assert torch.equal(doubled(torch.ones(5)), torch.full((5,), 2.0))
    assert counts == [1, 2] and torch.get_num_threads() == 2
    kernels.select(False)


def test_a_kernel_may_have_an_eager_form_of_its_own(monkeypatch, two_threads):
    """`tee_kernel(eager=...)`: that form runs with compiled kernels off and where set-up timed it faster, and
    set-up times it against the kernel's own body compiled."""
    ran = []

    def added(x):
        ran.append(tuple(x.shape))
        return x + x

    @kernels.tee_kernel(eager=added)
    def doubled(x):
        return x * 2

    monkeypatch.setattr(kernels, "choices", {})
    monkeypatch.setattr(kernels, "_form_at", {})
    assert doubled.eager is added
    kernels.select(False)
    assert torch.equal(doubled(torch.ones(3)), torch.full((3,), 2.0)) and ran == [(3,)]
    clock = iter([1.0, 2.0, 3.0, 2.0, 1.0, 3.0])  # eager faster at 3 values, compiled at 5
    monkeypatch.setattr(kernels, "timed", lambda step, fresh=None, repeat=30: (step(None), next(clock))[1])
    kernels.select(True)
    with kernels.choosing():
        doubled(torch.ones(3)), doubled(torch.ones(5))
    ran.clear()
    assert torch.equal(doubled(torch.ones(3)), torch.full((3,), 2.0))
    assert torch.equal(doubled(torch.ones(5)), torch.full((5,), 2.0))
    assert ran == [(3,)]  # the compiled body at 5 values calls nothing of `added`


@pytest.mark.parametrize("padded", [False, True])
def test_kernels_written_apart_from_their_eager_form_give_its_answer(padded):
    """RoPE and the causal blocks' softmax compile a form of their own (one expression, fresh blocks); in float16
    it gives the eager ops' answer but for rounding, over several blocks, padded or not."""
    batch, heads, n = 2, 4, 160
    q, k_t, _ = attention_operands(batch, n, heads, 2, 16, torch.float16, make=torch.randn)
    mask = torch.ones(batch, n, dtype=torch.long)
    mask[1, 100:] = 0 if padded else 1
    bias, blocks = attention_bias(mask, torch.float16), CausalBlocks.of(batch, heads, n, padded=padded)
    scores = blocks.scores(q, k_t)
    cos, sin = torch.rand(n, 16).half(), torch.rand(n, 16).half()
    assert len(blocks.spans) > 1
    results = {}
    for compiled in (False, True):
        kernels.select(compiled, chosen=False)
        results[compiled] = blocks.softmax(scores.clone(), bias), apply_rope(q, cos, sin)
    for eager, compiled in zip(results[False], results[True]):
        torch.testing.assert_close(compiled.float(), eager.float(), atol=2e-3, rtol=2e-3)


def test_engine_set_up_times_every_kernel(tiny_models):
    """warm_kernels times each kernel of the inference at its shapes (the JSON lists them), and the inference
    after it builds nothing new and gives the eager answer."""
    model = load_model(tiny_models["gqa-tied"], torch.float32, CPU)
    ids, mask = build_batch(model.tokenizer, ["Each kernel, its faster form."], 8, 1)
    engine = SplitLlama(model.config, model.state_dict, make_scheme("matrix", seed=3), CPU, torch.float32,
                        compiled=True)
    engine.warm_kernels(*ids.shape)
    names = {key.split(" ")[0] for key in kernels.chosen()}
    assert {"rms_norm", "residual_rms_norm", "silu_product", "_mix_rows", "_unmix_rows", "_scale_rows_cols",
            "_unscale_rows_cols", "_hide_later_keys", "_rope"} <= names
    picked = tuple({step for step, *_ in kernels.picks})  # steps set-up picks a form of, not kernels (C++ forms)
    assert all(c["eager_ms"] > 0 and c["compiled_ms"] > 0 for key, c in kernels.chosen().items()
               if not key.startswith(picked))
    built = graphs_built()
    logits = engine.timed_forward(ids, mask)[0]
    assert graphs_built() == built
    eager = SplitLlama(model.config, model.state_dict, make_scheme("matrix", seed=3), CPU, torch.float32)
    assert compare(logits, eager.timed_forward(ids, mask)[0])["rel_logit_error"] <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_otp_pads_a_matmul_operand_exactly_compiled_or_not(dtype):
    """otp's recovery adds back the very pad its protect returned, so the operand sent must be x − pad rounded
    in x's dtype, compiled as eager: the compiled kernel rounds where eager does (`tee_kernel(exact=True)`)."""
    torch.manual_seed(5)
    x = (3 * torch.randn(2, 4, 16, 8)).to(dtype)
    for operand in (x, x.transpose(-1, -2)):  # contiguous, as the probabilities are; a view, as kᵀ is
        noise = torch.randn(operand.shape).to(dtype)
        for compiled in (False, True):
            kernels.select(compiled, chosen=False)
            masked, pad = _pad_tensor(operand, noise, 1.0, None)
            assert masked.dtype == pad.dtype == dtype and torch.equal(masked, operand - pad)
            assert "_pad_tensor" not in kernels.failed


@pytest.mark.parametrize("scheme", ["matrix", "otp"])
def test_fused_hops_compile_to_one_call_each(tiny_models, scheme, monkeypatch):
    """Compiled, each fused hop is one kernel (`kernels.fused`: the three between linears, the RoPE hop and the P·V
    hop; ours' softmax hop unscales and hides keys in one, `schemes._unscale_hide`), built and timed in set-up
    against its chain of kernels, whose own forms were chosen first (no choice runs inside another's timing); the
    inference builds nothing, gives the separate steps' answer, and calls fewer ops on the host."""
    from splitinfer import perf
    model = load_model(tiny_models["biases"], torch.float32, CPU)
    ids, mask = build_batch(model.tokenizer, ["Three hops a layer, one call each."], 10, 2, ragged=True)
    depth, deepest = [0], [0]
    choose = kernels._choose

    def counted(*args):
        depth[0] += 1
        deepest[0] = max(deepest[0], depth[0])
        try:
            return choose(*args)
        finally:
            depth[0] -= 1

    monkeypatch.setattr(kernels, "_choose", counted)
    runs, host_ops, compiled_calls = {}, {}, {}
    for fuse in (False, True):
        engine = SplitLlama(model.config, model.state_dict, make_scheme(scheme, seed=2), CPU, torch.float32,
                            compiled=True, fuse_hops=fuse)
        engine.warm_kernels(*ids.shape)
        built = graphs_built()
        runs[fuse] = engine.timed_forward(ids, mask)[0]
        assert graphs_built() == built
        engine.choose_kernels = False  # compiled at every shape, for the count
        engine.warm_kernels(*ids.shape)
        host_ops[fuse], compiled_calls[fuse] = perf.profile_engine(engine, ids, mask, scheme)[1:]
    body, rope_body, attend_body = (("unmix_op_mix", "unmix_op_permute", "unpermute_op_mix") if scheme == "matrix"
                                    else ("add_op_pad", "add_op_pad_both", "cross_op_pad"))
    softmax_hop = {"_unscale_hide"} if scheme == "matrix" else set()  # otp's: its steps, in one call
    built = {f"{body}_sum_and_norm", f"{body}_gated", f"{rope_body}_rotated_heads", f"{attend_body}_merged",
             *softmax_hop}
    assert built <= {key.split(" ")[0] for key in kernels.chosen()}, kernels.failed
    assert not built & set(kernels.failed), kernels.failed
    assert deepest[0] == 1
    torch.testing.assert_close(runs[True], runs[False], atol=1e-5, rtol=1e-5)
    # per layer, two calls fewer in each of the three hops, and the bias adds folded in
    assert host_ops[True] < host_ops[False] - 6 * model.config.num_hidden_layers
    assert compiled_calls[True] < compiled_calls[False]


def test_a_cpp_form_is_also_offered_on_one_thread(monkeypatch, two_threads):
    """`native.in_picked_form` offers set-up the C++ form on torch's threads and, where there are several, on one:
    run so, the call sees one thread, and the count is back to two after. On one thread there is no second form.
    Outside set-up the form picked is looked up, not picked again, and run the same way; a step picked nowhere runs
    its first form."""
    from splitinfer import native
    offered = []
    monkeypatch.setattr(native, "offered", lambda t, dtypes=native.DTYPES: True)
    monkeypatch.setattr(kernels, "pick", lambda step, t, forms: (offered.append(list(forms)), native.ONE_PASS_ONE_THREAD
                                                                  if native.ONE_PASS_ONE_THREAD in forms else "steps")[1])
    with kernels.choosing():
        assert native.in_picked_form("step", torch.ones(3), {"steps": lambda: 0}, torch.get_num_threads) == 1
        assert torch.get_num_threads() == 2 and offered == [["steps", native.ONE_PASS, native.ONE_PASS_ONE_THREAD]]
        torch.set_num_threads(1)
        assert native.in_picked_form("step", torch.ones(3), {"steps": lambda: 0}, torch.get_num_threads) == 0
        assert offered[-1] == ["steps", native.ONE_PASS]
    torch.set_num_threads(2)
    looked_up = {"step": native.ONE_PASS_ONE_THREAD, "other": native.ONE_PASS}
    monkeypatch.setattr(kernels, "picked", lambda step, t, default: looked_up.get(step, default))
    assert native.in_picked_form("step", torch.ones(3), {"steps": lambda: 0}, torch.get_num_threads) == 1
    assert native.in_picked_form("other", torch.ones(3), {"steps": lambda: 0}, torch.get_num_threads) == 2
    assert native.in_picked_form("nowhere", torch.ones(3), {"steps": lambda: 0}, torch.get_num_threads) == 0
    assert len(offered) == 2 and torch.get_num_threads() == 2


def test_set_up_picks_the_faster_form_of_a_step(monkeypatch, capsys):
    """`kernels.pick`: inside `choosing`, each form of a step runs once (its kernels built and chosen), then is
    timed, and the fastest is kept for that shape and dtype; outside, `picked` gives it where compiled kernels
    are on and chosen per shape, and the default elsewhere. A form that fails is left out; a changed thread count
    drops the picks."""
    clock = iter([2.0, 1.0, 1.0, 2.0])  # stand-in times: float32 then integer, at 3 values, then at 5
    monkeypatch.setattr(kernels, "timed", lambda step, fresh=None, repeat=30: (step(None), next(clock))[1])
    monkeypatch.setattr(kernels, "picks", {})
    monkeypatch.setattr(kernels, "choices", {})
    ran = []
    forms = {"float32": lambda: ran.append("float32"), "integer": lambda: ran.append("integer")}
    three, five = torch.ones(3, dtype=torch.float16), torch.ones(5, dtype=torch.float16)
    kernels.select(True)
    assert kernels.pick("step", three, forms) == "float32" and ran == []  # not choosing: nothing runs
    with kernels.choosing():
        assert kernels.pick("step", three, forms) == "integer"
        assert kernels.pick("step", five, forms) == "float32"
    assert ran == ["float32", "integer"] * 4  # each once untimed, then once timed, at each shape
    assert kernels.picked("step", three, "float32") == "integer" and kernels.picked("step", five, "x") == "float32"
    assert kernels.picked("step", three.float(), "float32") == "float32"  # another dtype: not picked
    assert kernels.chosen() == {"step [3] float16": {"float32_ms": 2.0, "integer_ms": 1.0, "runs": "integer"},
                                "step [5] float16": {"float32_ms": 1.0, "integer_ms": 2.0, "runs": "float32"}}
    def missing():
        raise RuntimeError("no such op here\nmore")

    clock = iter([3.0])
    with kernels.choosing():  # a form that fails is left out, with a warning
        assert kernels.pick("step", three, {"float32": forms["float32"], "integer": missing}) == "float32"
    assert kernels.chosen()["step [3] float16"] == {"float32_ms": 3.0, "runs": "float32"}
    assert "step's integer form is left out: no such op here" in capsys.readouterr().err
    kernels.select(True, chosen=False)  # compiled at every shape: no per-shape choice
    assert kernels.picked("step", three, "float32") == "float32"
    kernels.select(False)
    assert kernels.picked("step", three, "float32") == "float32"
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        kernels.select(True)
        assert kernels.picks == {}
    finally:
        torch.set_num_threads(threads)


def test_otp_set_up_picks_its_scores_cross_terms_in_half_precision(tiny_models, monkeypatch):
    """In half precision, otp's set-up times the scores' cross terms as float32 and as integer products, at the
    inference's shapes (several causal blocks here), and the inference runs the form kept, building nothing; the
    integer form's logits are the float32 form's but for rounding. P·V's stay float32; nothing is picked where
    the integer form's products would take more than INTEGER_BYTES, nor in float32."""
    from splitinfer import schemes
    model = load_model(tiny_models["biases"], torch.float16, CPU)  # the float16 fused hops' test's shapes (below)
    ids, mask = build_batch(model.tokenizer, ["Cross terms in integers, the same answers."], 10, 2, ragged=True)
    reference = reference_logits(model.config, model.state_dict, ids, mask)
    monkeypatch.setattr(kernels, "picks", {})
    ran = []
    for form, f in schemes.CROSS_FORMS.items():
        monkeypatch.setitem(schemes.CROSS_FORMS, form, lambda *args, form=form, f=f: (ran.append(form), f(*args))[1])
    logits = {}
    for form in schemes.CROSS_FORMS:
        engine = SplitLlama(model.config, model.state_dict, make_scheme("otp", seed=3), CPU, torch.float16,
                            compiled=True, block_rows=8)
        engine.warm_kernels(*ids.shape)
        (key, times), = ((k, v) for k, v in kernels.chosen().items() if k.startswith(schemes.SCORES_CROSS))
        assert key == f"{schemes.SCORES_CROSS} [2, 4, 10, 16] float16" and set(times) == {
            "float32_ms", "integer_ms", "runs"} and min(times["float32_ms"], times["integer_ms"]) > 0
        cross, = (key for key in kernels.picks if key[0] == schemes.SCORES_CROSS)
        kernels.picks[cross]["runs"] = form  # as if set-up had measured it faster
        ran.clear()
        built = graphs_built()
        logits[form] = engine.timed_forward(ids, mask)[0]
        assert graphs_built() == built
        assert ran == [form, "float32"] * model.config.num_hidden_layers  # the scores', then P·V's
    assert compare(logits["integer"], logits["float32"])["rel_logit_error"] <= 2e-3
    assert compare(logits["integer"], reference)["top1_agreement"] == 1.0
    kernels.picks.clear()
    monkeypatch.setattr(schemes, "INTEGER_BYTES", 2 * 4 * 2 * 4 * 10 * 10 - 1)  # its int32 products, a byte too many
    SplitLlama(model.config, model.state_dict, make_scheme("otp", seed=3), CPU, torch.float16,
               compiled=True, block_rows=8).warm_kernels(*ids.shape)
    assert not [key for key in kernels.picks if key[0] == schemes.SCORES_CROSS]
    model = load_model(tiny_models["gqa-tied"], torch.float32, CPU)
    SplitLlama(model.config, model.state_dict, make_scheme("otp", seed=3), CPU, torch.float32,
               compiled=True).warm_kernels(1, 8)  # a shape the tests above built: nothing to compile
    assert not [key for key in kernels.picks if key[0] == schemes.SCORES_CROSS]


@pytest.mark.parametrize("scheme", ["matrix", "otp"])
def test_fused_hops_build_in_set_up_in_half_precision(tiny_models, scheme):
    """In float16, as on a GPU machine (where otp's scores' cross terms may be integer products, picked in set-up
    from protected operands laid out as the fused RoPE hop lays them out), set-up builds every kernel of the fused
    hops' inference, in the forms it chose and compiled at every shape, and the logits stay within float16
    rounding of the eager engine's."""
    model = load_model(tiny_models["biases"], torch.float16, CPU)
    ids, mask = build_batch(model.tokenizer, ["Half precision, six hops a layer."], 10, 2, ragged=True)
    eager = SplitLlama(model.config, model.state_dict, make_scheme(scheme, seed=2), CPU, torch.float16,
                       fuse_hops=True, block_rows=8).timed_forward(ids, mask)[0]
    for choose in (True, False):  # two causal blocks, as set-up's test of the cross terms above (its builds)
        engine = SplitLlama(model.config, model.state_dict, make_scheme(scheme, seed=2), CPU, torch.float16,
                            compiled=True, fuse_hops=True, choose_kernels=choose, block_rows=8)
        engine.warm_kernels(*ids.shape)
        built = graphs_built()
        logits = engine.timed_forward(ids, mask)[0]
        assert graphs_built() == built and not kernels.failed
        assert compare(logits, eager)["rel_logit_error"] < 1e-2


def test_the_json_names_the_vector_instruction_set_the_kernels_are_built_for():
    """Once the compiler has started, `vector_isa` names the instruction set inductor builds for (this VM's CPU
    has AVX2 at least, so never 'none': scalar kernels would run several times slower)."""
    try:
        assert kernels.select(True) == kernels.COMPILED
        isa = kernels.vector_isa()
        assert isa not in (None, "unknown", "none") and isa.startswith("avx"), isa
    finally:
        kernels.select(False)
