"""The GPU's calls replayed from captured graphs (`splitinfer.graphs`). This machine has no CUDA, so a stand-in
captures each call (`EagerCall`): the same own inputs, and one output tensor that every replay overwrites in
place, as a CUDA graph's does. What these tests check is what the graphs change around the calls: that every
call's inputs reach the graph, that each call site and layout has its own, and that no hop reads an output
after the same call has been made again."""
from __future__ import annotations

import time

import pytest
import torch

from splitinfer.engine import AUTO, Gpu, SplitLlama
from splitinfer.graphs import CallGraphs
from splitinfer.inputs import build_batch
from splitinfer.models import load_model
from splitinfer.reference import compare, reference_logits
from splitinfer.schemes import make_scheme
from splitinfer import tee_ops

PROMPTS = ["The quick brown fox jumps over the lazy dog.", "Private prompts stay in the TEE."]
CPU = torch.device("cpu")


class EagerCall:
    """A captured call's stand-in without CUDA: each replay runs the call again on its own inputs and writes
    the result into the one output tensor it handed out at the capture."""

    def __init__(self, fn, inputs: tuple[torch.Tensor, ...], keep: tuple[torch.Tensor, ...]):
        self.fn, self.inputs, self.keep = fn, inputs, keep
        self.output = fn(*inputs)
        self.replays = 0

    def replay(self) -> None:
        self.output.copy_(self.fn(*self.inputs))
        self.replays += 1


def eager_graphs() -> CallGraphs:
    return CallGraphs(CPU, capture=EagerCall)


class SlowCall(EagerCall):
    """A stand-in whose replays cost more than the call itself."""

    def replay(self) -> None:
        time.sleep(0.002)
        super().replay()


def failing_capture(fn, inputs, keep):
    raise RuntimeError("CUDA error: operation not permitted when stream is capturing\nmore detail")


class WrongCall(EagerCall):
    """A stand-in whose replays give a wrong answer."""

    def replay(self) -> None:
        super().replay()
        self.output.add_(1.0)


def test_a_call_is_captured_once_per_key_and_layout():
    graphs = eager_graphs()
    x = torch.randn(3, 4)
    first = graphs("double", lambda t: 2 * t, x)
    assert torch.equal(first, 2 * x) and graphs.captured == 1
    y = torch.randn(3, 4)
    second = graphs("double", lambda t: 2 * t, y)  # the same graph: y is copied in, the output overwritten
    assert second is first and torch.equal(second, 2 * y) and graphs.captured == 1
    assert not torch.equal(x, y)  # the caller's tensors are never written
    z = torch.randn(4, 3).t()  # another layout of the same shape: a graph of its own
    assert torch.equal(graphs("double", lambda t: 2 * t, z), 2 * z) and graphs.captured == 2
    graphs("triple", lambda t: 3 * t, x)  # another key
    assert graphs.captured == 3
    calls = list(graphs.calls.values())
    assert [c.replays for c in calls] == [2, 1, 1]


def test_a_strided_view_keeps_its_layout():
    """A view with gaps (v within the qkv projection's output) is copied into the graph's own input with its
    strides, so that the graph runs the kernels the call would run on it."""
    graphs = eager_graphs()
    qkv = torch.randn(2, 5, 12)
    v = qkv.view(2, 5, 3, 4)[:, :, 2].transpose(1, 2)
    out = graphs("sum", lambda t: t.sum(-1), v)
    assert torch.equal(out, v.sum(-1))
    (static,) = graphs.calls[next(iter(graphs.calls))].inputs
    assert static.stride() == v.stride() and torch.equal(static, v) and static.data_ptr() != qkv.data_ptr()


def test_landings_and_outputs_are_read_where_they_are():
    """A copy to the GPU lands in the same buffer for its hop at each inference, laid out as `.to` lays it out; a
    graph reads a landing, or a view of another graph's output, in place, and copies anything else in."""
    graphs = eager_graphs()
    x = torch.randn(4, 6)
    landed = graphs.landing(("linear_attn", 0, 0), x)
    assert graphs.landing(("linear_attn", 0, 0), torch.randn(4, 6)) is landed
    assert graphs.landing(("linear_attn", 1, 0), x) is not landed
    t = torch.randn(6, 4).t()  # dense, transposed: `.to` keeps its strides
    assert graphs.landing(("matmul", 0, 0), t).stride() == t.stride()
    landed.copy_(x)
    out = graphs("0.qkv", lambda t: 2 * t, landed)
    assert graphs.calls[next(iter(graphs.calls))].inputs[0] is landed and torch.equal(out, 2 * x)
    landed.copy_(torch.randn(4, 6))
    assert torch.equal(graphs("0.qkv", lambda t: 2 * t, landed), 2 * landed) and graphs.input_copies == 0
    v = out[:, 3:]  # a view of that graph's output
    assert torch.equal(graphs("0.attend", lambda t: t + 1, v), v + 1)
    assert graphs.calls[list(graphs.calls)[1]].inputs[0].data_ptr() == v.data_ptr()
    fresh = torch.randn(4, 6)  # neither: copied into the graph's input, which is the landing
    assert torch.equal(graphs("0.qkv", lambda t: 2 * t, fresh), 2 * fresh) and graphs.input_copies == 1


def test_keep_reaches_the_capture():
    seen = []
    graphs = CallGraphs(CPU, capture=lambda fn, inputs, keep: seen.append(keep) or EagerCall(fn, inputs, keep))
    index = torch.arange(3)
    graphs("take", lambda t: t[index], torch.randn(5), keep=(index,))
    assert seen == [(index,)]


def test_the_engine_warns_and_runs_without_cuda(tiny_models, capsys):
    model = load_model(tiny_models["gqa-tied"], torch.float32, CPU)
    engine = SplitLlama(model.config, model.state_dict, make_scheme("plain"), CPU, torch.float32, cuda_graphs=True)
    assert not engine.cuda_graphs and "CUDA graphs need a CUDA device" in capsys.readouterr().err


@pytest.mark.parametrize("scheme,variant,fuse", [("plain", "gqa-tied", False), ("matrix", "gqa-tied", False),
                                                 ("otp", "biases", False), ("plain", "gqa-head-dim", False),
                                                 ("matrix", "gqa-tied", True), ("otp", "biases", True)],
                         ids=["plain", "matrix", "otp", "plain-head-dim", "matrix-fused-hops", "otp-fused-hops"])
def test_graphed_calls_give_the_same_inference(tiny_models, scheme, variant, fuse, monkeypatch):
    """With every GPU call replayed from a graph, captured in set-up by one inference: the next inferences capture
    nothing, replay every graph, cross the same bytes in the same calls, count the same ops, and give the logits
    of the engine without graphs bit for bit (its masks drawn after as many as set-up's inference drew). Every
    copy to the GPU lands where its graph reads it, and the plain split's o projection reads P·V's graph's
    output, its heads merged there, so no input is copied again on the GPU. The scores are two causal blocks
    (4-row blocks), a padded batch of 2. With fused hops too, whose protected operands land as the steps' do."""
    monkeypatch.setattr(tee_ops, "ROWS", 4)
    # the LM head's form as F.linear in both engines: set-up's timing of its two forms (`Gpu.choose_head`) may keep
    # either, and a host busy with other work made the two engines keep different ones, a product rounded apart
    monkeypatch.setattr(Gpu, "choose_head", lambda self, rows, repeat=3: None)
    model = load_model(tiny_models[variant], torch.float32, CPU)
    ids, mask = build_batch(model.tokenizer, PROMPTS, 8, 2, ragged=True)
    runs = {}
    for graphed in (False, True):
        engine = SplitLlama(model.config, model.state_dict, make_scheme(scheme, seed=3), CPU, torch.float32,
                            fuse_hops=fuse)
        if graphed:
            engine.use_graphs(eager_graphs())
        engine.warm_device(*ids.shape)
        if not graphed:  # the masks set-up's inference draws with graphs
            engine.timed_forward(torch.zeros_like(ids), torch.ones_like(ids), instrumented=False)
        captured = engine.gpu.graphs.captured if graphed else 0
        copies = engine.gpu.graphs.input_copies if graphed else 0
        # cloned: without CUDA nothing is copied at the boundary, so the logits are the LM head graph's output,
        # which the next inference overwrites
        runs[graphed] = [(logits.clone(), figures) for logits, figures in
                         (engine.timed_forward(ids, mask) for _ in range(2))]
        if graphed:
            layers = model.config.num_hidden_layers
            # 4 linears and 2 matmuls a layer, the LM head, and the plain split's embedding
            assert captured == engine.gpu.graphs.captured == 6 * layers + 1 + (scheme == "plain")
            assert {c.replays for c in engine.gpu.graphs.calls.values()} == {3}  # set-up's inference and two more
            assert engine.gpu.graphs.input_copies == copies == 0
            landings = len(engine.gpu.graphs.landings)
            engine.forward(ids, mask)  # as the profile calls it, outside `timed_forward`: the same landings
            assert len(engine.gpu.graphs.landings) == landings and engine.gpu.graphs.captured == captured
    for (graphed_logits, graphed), (logits, plain) in zip(runs[True], runs[False]):
        assert torch.equal(graphed_logits, logits)
        assert graphed["counts"] == plain["counts"] and graphed["data_transfer"] == plain["data_transfer"]
    err = compare(runs[True][-1][0], reference_logits(model.config, model.state_dict, ids, mask))
    assert err["rel_logit_error"] <= 1e-3 and err["top1_agreement"] == 1.0, err


def test_kernel_bench_times_one_layers_gpu_calls_both_ways():
    """kernel_bench's GPU calls (on a GPU: what the graphs save a call), here with the stand-in: every call
    timed op by op and replayed, every operand read where it landed."""
    from splitinfer import kernel_bench
    graphs = eager_graphs()
    calls = kernel_bench.gpu_calls("smollm2-135m", 8, torch.float32, CPU, 2, graphs=graphs)
    assert len(calls) == 8 and all(ms > 0 for ms in calls.values())
    assert {label.rsplit(", ", 1)[1] for label in calls} == {"op by op", "replayed"}
    assert graphs.captured == 4 and graphs.input_copies == 0


def slow_calls_without_graphs(engine: SplitLlama) -> None:
    """Make each GPU call made without graphs cost 2 ms more, so that replaying graphs is the faster way."""
    call = engine.gpu.call

    def slow(key, fn, *inputs, keep=()):
        if engine.gpu.graphs is None:
            time.sleep(0.002)
        return call(key, fn, *inputs, keep=keep)

    engine.gpu.call = slow


@pytest.mark.parametrize("scheme,capture,kept", [("plain", SlowCall, "neither"), ("matrix", EagerCall, "cuda_graphs"),
                                                 ("otp", WrongCall, "neither"), ("matrix", failing_capture, "neither")],
                         ids=["slower-graphs", "faster-graphs", "wrong-graphs", "failing-graphs"])
def test_set_up_keeps_graphs_where_they_are_faster_and_compute_the_same(tiny_models, scheme, capture, kept, capsys):
    """With `cuda_graphs=AUTO`, set-up times an inference with and without graphs (stand-ins here, made faster or
    slower than the calls) and keeps the faster; graphs whose logits are off, or whose capture fails, are left out
    untimed, with a warning. The engine then runs as kept, its graphs gone where not kept, and its logits match transformers'.
    Without CUDA, AUTO leaves nothing to choose."""
    model = load_model(tiny_models["gqa-tied"], torch.float32, CPU)
    ids, mask = build_batch(model.tokenizer, PROMPTS, 8, 2, ragged=True)
    engine = SplitLlama(model.config, model.state_dict, make_scheme(scheme, seed=3), CPU, torch.float32,
                        cuda_graphs=AUTO)
    assert not engine.auto and engine.choose_configuration(*ids.shape) == 0.0 and engine.configuration == {}
    engine.auto.add("cuda_graphs")  # as on CUDA, with stand-ins for the graphs
    engine.graphs_held = CallGraphs(CPU, capture=capture)
    if capture is EagerCall:
        slow_calls_without_graphs(engine)
    engine.warm_device(*ids.shape)
    assert not engine.cuda_graphs  # off until set-up's choice
    assert engine.choose_configuration(*ids.shape, repeat=2) > 0
    chosen = engine.configuration
    assert chosen["options"] == ["cuda_graphs"] and chosen["kept"] == kept and chosen["repeat"] == 2
    if capture in (WrongCall, failing_capture):
        assert set(chosen["median_ms"]) == {"neither"} and set(chosen["left_out"]) == {"cuda_graphs"}
        why = chosen["left_out"]["cuda_graphs"]
        assert why == "CUDA error: operation not permitted when stream is capturing" if capture is failing_capture else why > 1e-2
        assert "set-up left out cuda_graphs" in capsys.readouterr().err
    else:
        assert set(chosen["median_ms"]) == {"neither", "cuda_graphs"} and chosen["left_out"] == {}
        assert min(chosen["median_ms"], key=chosen["median_ms"].get) == kept
    assert engine.cuda_graphs == (kept == "cuda_graphs") and (engine.graphs_held is None) == (kept == "neither")
    logits = engine.timed_forward(ids, mask)[0].clone()
    err = compare(logits, reference_logits(model.config, model.state_dict, ids, mask))
    assert err["rel_logit_error"] <= 1e-3 and err["top1_agreement"] == 1.0, err


def test_set_up_chooses_among_graphs_and_fused_hops_together(tiny_models):
    """Both options left to set-up: all four ways timed, the fastest of them kept. Fused hops are left to set-up
    only for a masked scheme with compiled kernels, or with the C++ ones beside eager kernels (its hops between two
    linears have C++ forms); here the eager engine is given the choice a compiled one has."""
    model = load_model(tiny_models["gqa-tied"], torch.float32, CPU)
    for scheme, kernels, auto in (("matrix", "compiled", {"fuse_hops"}), ("matrix", "eager", set()),
                                  ("plain", "compiled", set()), ("matrix", "cpp", {"fuse_hops"}),
                                  ("otp", "cpp", {"fuse_hops"}), ("otp", "compiled", {"fuse_hops"}),
                                  ("otp", "eager", set())):
        engine = SplitLlama(model.config, model.state_dict, make_scheme(scheme), CPU, torch.float32,
                            compiled=kernels == "compiled", cpp=kernels == "cpp", fuse_hops=AUTO, cuda_graphs=AUTO)
        assert engine.auto == auto and not engine.fuse_hops
    ids, mask = build_batch(model.tokenizer, PROMPTS, 8, 1)
    engine = SplitLlama(model.config, model.state_dict, make_scheme("otp", seed=1), CPU, torch.float32)
    engine.auto |= {"cuda_graphs", "fuse_hops"}
    engine.graphs_held = eager_graphs()
    engine.warm_device(*ids.shape)
    engine.choose_configuration(*ids.shape, repeat=1)
    chosen = engine.configuration
    assert chosen["options"] == ["cuda_graphs", "fuse_hops"] and chosen["left_out"] == {}
    assert set(chosen["median_ms"]) == {"neither", "cuda_graphs", "fuse_hops", "cuda_graphs+fuse_hops"}
    assert chosen["kept"] == min(chosen["median_ms"], key=chosen["median_ms"].get)
    assert engine.cuda_graphs == ("cuda_graphs" in chosen["kept"]) and engine.fuse_hops == ("fuse_hops" in chosen["kept"])
    err = compare(engine.timed_forward(ids, mask)[0].clone(), reference_logits(model.config, model.state_dict, ids, mask))
    assert err["rel_logit_error"] <= 1e-3, err
