"""The hand-written split and TEE-only forwards against transformers' LlamaForCausalLM, in float32 on the CPU."""
from __future__ import annotations

import weakref
from contextlib import contextmanager

import pytest
import torch
from conftest import VARIANTS

from splitinfer import engine as engine_module
from splitinfer import schemes
from splitinfer.engine import SplitLlama
from splitinfer.inputs import build_batch, last_positions
from splitinfer.models import ByteTokenizer, load_model
from splitinfer.reference import compare, reference_logits
from splitinfer.results import host_rss_mb
from splitinfer.schemes import Plain, make_scheme
from splitinfer import tee_ops
from splitinfer.boundary import Boundary
from splitinfer.metrics import Metrics

PROMPTS = ["The quick brown fox jumps over the lazy dog.", "Private prompts stay in the TEE."]
CPU = torch.device("cpu")


def run_engine(path: str, tee_only: bool, batch: int, ragged: bool, n: int = 12):
    model = load_model(path, torch.float32, CPU)
    ids, mask = build_batch(model.tokenizer, PROMPTS, n, batch, ragged)
    reference = reference_logits(model.config, model.state_dict, ids, mask)
    engine = SplitLlama(model.config, model.state_dict, Plain(), CPU, torch.float32, tee_only=tee_only)
    logits, figures = engine.timed_forward(ids, mask)
    return logits, reference, figures, ids, mask


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("tee_only", [False, True], ids=["split", "tee-only"])
def test_matches_transformers(tiny_models, variant, tee_only):
    logits, reference, _, _, _ = run_engine(tiny_models[variant], tee_only, batch=1, ragged=False)
    err = compare(logits, reference)
    assert err["rel_logit_error"] <= 1e-4, err
    assert err["top1_agreement"] == 1.0


@pytest.mark.parametrize("variant", ["gqa-tied", "rope-llama3", "biases"])
def test_batch_with_padding(tiny_models, variant):
    logits, reference, _, ids, mask = run_engine(tiny_models[variant], False, batch=3, ragged=True)
    assert mask.sum(1).tolist() == [12, 10, 8]  # ragged really pads
    err = compare(logits, reference)
    assert err["rel_logit_error"] <= 1e-4, err
    assert err["top1_agreement"] == 1.0
    # each row is the logits of its own last real token: the same as running that sequence alone
    for b in range(3):
        alone_ids = ids[b: b + 1, : int(mask[b].sum())]
        model = load_model(tiny_models[variant], torch.float32, CPU)
        alone = reference_logits(model.config, model.state_dict, alone_ids, torch.ones_like(alone_ids))
        assert torch.allclose(logits[b], alone[0], atol=1e-4)


def test_gqa_kv_never_expanded_before_crossing(tiny_models):
    """K and V cross at their own head count: the GPU broadcasts them over the query heads of a group.
    The plain split keeps v and P·V on the GPU, and moves the minimum for its placement but for the
    upper triangle of a short prompt's scores."""
    _, _, figures, _, _ = run_engine(tiny_models["gqa-head-dim"], False, batch=1, ragged=False, n=8)
    heads, kv_heads, head_dim, n, layers, hidden, inner, vocab = 4, 1, 24, 8, 2, 64, 96, 320
    per_layer = 4 * n * (2 * hidden + heads * head_dim + kv_heads * head_dim + inner) + 4 * heads * n * n
    assert figures["data_transfer"]["to_gpu_bytes"] == layers * per_layer + 8 * n + 4 * hidden
    back = 4 * n * ((heads + kv_heads) * head_dim + 2 * hidden + 2 * inner) + 4 * heads * n * n
    assert figures["data_transfer"]["to_cpu_bytes"] == layers * back + 4 * n * hidden + 4 * vocab
    # at 8 tokens the scores are one block: all n² entries cross, where the causal triangle is the minimum
    upper = layers * 4 * heads * (n * n - n * (n + 1) // 2)
    assert figures["data_transfer"]["minimum_to_gpu_bytes"] == figures["data_transfer"]["to_gpu_bytes"] - upper
    assert figures["data_transfer"]["minimum_to_cpu_bytes"] == figures["data_transfer"]["to_cpu_bytes"] - upper


@pytest.mark.parametrize("scheme", ["matrix", "otp"])
def test_masked_crossings_near_minimum(tiny_models, scheme):
    model = load_model(tiny_models["gqa-tied"], torch.float32, CPU)
    ids, mask = build_batch(model.tokenizer, PROMPTS, 16, 1)
    engine = SplitLlama(model.config, model.state_dict, make_scheme(scheme), CPU, torch.float32)
    figures = engine.timed_forward(ids, mask)[1]
    assert 0 <= figures["data_transfer"]["excess_over_minimum"] <= 0.10


@pytest.mark.parametrize("variant", ["gqa-tied", "biases"])
@pytest.mark.parametrize("runner", ["split", "tee-only", "otp"])
@pytest.mark.parametrize("ragged", [True, False], ids=["padded", "unpadded"])
def test_causal_blocks_match_transformers(tiny_models, variant, runner, ragged, monkeypatch):
    """With blocks of 4 rows, 16 tokens are 4 row blocks; a batch with or without padding still matches,
    and only the block triangle of the scores crosses (10/16 of n²), against all of them with the
    triangle off."""
    monkeypatch.setattr(tee_ops, "ROWS", 4)
    model = load_model(tiny_models[variant], torch.float32, CPU)
    ids, mask = build_batch(model.tokenizer, PROMPTS, 16, 3, ragged=ragged)

    def run(triangle: bool) -> tuple[torch.Tensor, dict]:
        scheme = make_scheme("otp", seed=0) if runner == "otp" else Plain()
        engine = SplitLlama(model.config, model.state_dict, scheme, CPU, torch.float32, tee_only=runner == "tee-only",
                            triangle=triangle)
        return engine.timed_forward(ids, mask)

    logits, figures = run(triangle=True)
    err = compare(logits, reference_logits(model.config, model.state_dict, ids, mask))
    assert err["rel_logit_error"] <= (1e-3 if runner == "otp" else 1e-4) and err["top1_agreement"] == 1.0, err
    if runner != "tee-only":
        saved = run(triangle=False)[1]["data_transfer"]["to_cpu_bytes"] - figures["data_transfer"]["to_cpu_bytes"]
        assert saved == 2 * 3 * 4 * 4 * (16 * 16 - 10 * 16)  # layers x batch x heads x float32 x (n² - 10·4·4)


@pytest.mark.parametrize("ragged", [True, False], ids=["padded", "unpadded"])
def test_overlapped_hops_match_whole_ones(tiny_models, ragged, monkeypatch):
    """With `overlap`, the plain split's scores and gate/up output cross in parts (4-row blocks, 4-row
    chunks here) and come back into one GPU tensor: the logits are bit for bit those of whole crossings,
    the same bytes cross in more calls, and each TEE op still counts once per layer."""
    monkeypatch.setattr(tee_ops, "ROWS", 4)
    model = load_model(tiny_models["biases"], torch.float32, CPU)
    ids, mask = build_batch(model.tokenizer, PROMPTS, 16, 3, ragged=ragged)
    runs = {}
    for overlap in (False, True):
        engine = SplitLlama(model.config, model.state_dict, Plain(), CPU, torch.float32, overlap=overlap)
        runs[overlap] = engine.timed_forward(ids, mask)
    (logits, figures), (whole_logits, whole) = runs[True], runs[False]
    assert torch.equal(logits, whole_logits)
    err = compare(logits, reference_logits(model.config, model.state_dict, ids, mask))
    assert err["rel_logit_error"] <= 1e-4 and err["top1_agreement"] == 1.0, err
    moved, whole_moved = figures["data_transfer"], whole["data_transfer"]
    assert (moved["to_gpu_bytes"], moved["to_cpu_bytes"]) == (whole_moved["to_gpu_bytes"], whole_moved["to_cpu_bytes"])
    # per layer, the probabilities go back in 4 blocks and SiLU's output in 12 chunks of 4 of the 48 rows
    assert moved["to_gpu_calls"] == whole_moved["to_gpu_calls"] + 2 * (3 + 11)
    assert figures["counts"] == whole["counts"]
    assert figures["categories"]["overlap"] == 0  # nothing runs at once without CUDA


def test_block_rows_sets_the_triangle(tiny_models):
    """`block_rows` picks the blocks' least height (perf compares 64 and 128 rows); ours keeps one block."""
    model = load_model(tiny_models["gqa-tied"], torch.float32, CPU)
    ids, mask = build_batch(model.tokenizer, PROMPTS, 16, 1)
    engine = SplitLlama(model.config, model.state_dict, Plain(), CPU, torch.float32, block_rows=8)
    assert engine.causal_blocks(1, 16).starts == (0, 8, 16)
    err = compare(engine.timed_forward(ids, mask)[0], reference_logits(model.config, model.state_dict, ids, mask))
    assert err["rel_logit_error"] <= 1e-4
    ours = SplitLlama(model.config, model.state_dict, make_scheme("matrix"), CPU, torch.float32, block_rows=8)
    assert ours.causal_blocks(1, 16).starts == (0, 16)


def test_masked_schemes_ignore_overlap(tiny_models):
    model = load_model(tiny_models["gqa-tied"], torch.float32, CPU)
    for scheme in ("matrix", "otp"):
        assert not SplitLlama(model.config, model.state_dict, make_scheme(scheme), CPU, torch.float32,
                              overlap=True).overlap


def test_figures_add_up(tiny_models):
    _, _, figures, _, _ = run_engine(tiny_models["mha-untied"], False, batch=1, ragged=False)
    c = figures["categories"]
    online = sum(v for k, v in c.items() if k not in ("offline", "overlap")) - c["overlap"]
    assert abs(online - figures["total_ms"]) <= 0.02 * figures["total_ms"]
    counts = figures["counts"]
    assert counts["gpu_linear"] == 2 * 4 and counts["gpu_matmul"] == 2 * 2
    assert counts["cpu_rmsnorm"] == 2 * 2 + 1 and counts["cpu_softmax"] == 2 and counts["gpu_lm_head"] == 1


@pytest.mark.parametrize("scheme", ["plain", "matrix", "otp"])
def test_uninstrumented_runs_time_the_total_alone(tiny_models, scheme):
    """The headline runs time no region: same logits (plain; the masked schemes draw fresh masks), same
    bytes, a total, and no breakdown; the next inference is instrumented again."""
    model = load_model(tiny_models["gqa-tied"], torch.float32, CPU)
    ids, mask = build_batch(model.tokenizer, PROMPTS, 12, 2, True)
    engine = SplitLlama(model.config, model.state_dict, make_scheme(scheme, seed=0), CPU, torch.float32)
    logits, figures = engine.timed_forward(ids, mask)
    lean_logits, lean = engine.timed_forward(ids, mask, instrumented=False)
    assert lean["instrumented"] is False and lean["total_ms"] > 0 and not lean["counts"]
    assert all(lean["categories"][c] == 0 for c in ("transfer_to_gpu", "gpu_compute", "cpu_compute", "crypto"))
    assert lean["data_transfer"]["to_gpu_bytes"] == figures["data_transfer"]["to_gpu_bytes"]
    if scheme == "plain":
        assert torch.equal(lean_logits, logits)
    else:
        reference = reference_logits(model.config, model.state_dict, ids, mask)
        assert compare(lean_logits, reference)["rel_logit_error"] < 1e-3
    assert engine.timed_forward(ids, mask)[1]["categories"]["cpu_compute"] > 0


@pytest.mark.parametrize("scheme", ["matrix", "otp"])
def test_streamed_embedding_equals_the_resident_table(tiny_models, scheme, monkeypatch):
    """A tied table is read from the GPU in blocks (here of 3 rows, so that ids fall in many): the same
    logits as from the TEE's own copy, which the TEE then does not hold; the whole table crosses."""
    monkeypatch.setattr(engine_module, "EMBEDDING_BLOCK_BYTES", 3 * 64 * 4)
    model = load_model(tiny_models["gqa-tied"], torch.float32, CPU)
    ids, mask = build_batch(model.tokenizer, PROMPTS, 12, 2, True)
    runs = {}
    for resident in (False, True):
        engine = SplitLlama(model.config, model.state_dict, make_scheme(scheme, seed=3), CPU, torch.float32,
                            resident_embedding=resident)
        runs[resident] = engine, *engine.timed_forward(ids, mask)
    (streamed, logits, figures), (resident, resident_logits, resident_figures) = runs[False], runs[True]
    assert torch.equal(logits, resident_logits)
    table = 320 * 64 * 4
    assert resident.tee_weight_bytes() - streamed.tee_weight_bytes() == table
    moved = figures["data_transfer"]["to_cpu_bytes"] - resident_figures["data_transfer"]["to_cpu_bytes"]
    assert moved == table and figures["data_transfer"]["excess_over_minimum"] <= 0.10
    assert streamed.export_state_dict()["model.embed_tokens.weight"].shape == (320, 64)
    # two blocks held at most, the one the TEE reads and the next one crossing: each is let go before the block
    # after next is fetched, which may then reuse its pinned memory
    held, fetch = [], streamed.link.to_tee_in_parts

    def two_at_most(t: torch.Tensor, parts, op: str):
        assert all(block() is None for block in held[:-1]), "a block before the last one fetched is still held"
        block, arrivals = fetch(t, parts, op)
        held.append(weakref.ref(block))
        return block, arrivals

    monkeypatch.setattr(streamed.link, "to_tee_in_parts", two_at_most)
    assert torch.equal(streamed.streamed_embedding(ids), resident.embed(ids)) and len(held) == -(-320 // 3)
    with pytest.raises(IndexError):  # as the resident table's lookup does, never rows left unwritten
        streamed.streamed_embedding(torch.tensor([[3, 320]]))


def test_untied_table_stays_in_the_tee(tiny_models):
    model = load_model(tiny_models["mha-untied"], torch.float32, CPU)
    engine = SplitLlama(model.config, model.state_dict, make_scheme("matrix", seed=0), CPU, torch.float32)
    assert engine.embed_table is not None


def test_tee_only_never_crosses(tiny_models):
    _, _, figures, _, _ = run_engine(tiny_models["mha-untied"], True, batch=1, ragged=False)
    assert figures["data_transfer"]["total_mb"] == 0
    assert figures["categories"]["gpu_compute"] == 0
    assert "cpu_linear" in figures["counts"] and "gpu_linear" not in figures["counts"]


@pytest.mark.parametrize("form", engine_module.ATTENTION_FORMS)
@pytest.mark.parametrize("variant", ["gqa-head-dim", "rope-llama3"])
def test_tee_only_attention_forms(tiny_models, variant, form):
    """Each form of the TEE-only runner's attention matches transformers, on a padded batch too (where the
    fused op takes the bias) and an unpadded one (where it is causal alone); the fused form is one op."""
    model = load_model(tiny_models[variant], torch.float32, CPU)
    engine = SplitLlama(model.config, model.state_dict, Plain(), CPU, torch.float32, tee_only=True, attention=form,
                        block_rows=16)  # two blocks of 20 rows: the causal blocks are more than one
    for batch, ragged in ((3, True), (1, False)):
        ids, mask = build_batch(model.tokenizer, PROMPTS, 40, batch, ragged)
        engine.warm_device(*ids.shape)
        assert engine.attention_form == form and engine.attention_ms == {}  # pinned: nothing timed
        logits, figures = engine.timed_forward(ids, mask)
        err = compare(logits, reference_logits(model.config, model.state_dict, ids, mask))
        assert err["rel_logit_error"] <= 1e-4 and err["top1_agreement"] == 1.0, (batch, err)
        layers = model.config.num_hidden_layers
        assert figures["counts"].get("cpu_attention", 0) == (layers if form == engine_module.FUSED else 0)
        assert figures["counts"].get("cpu_matmul", 0) == (0 if form == engine_module.FUSED else 2 * layers)
    assert engine.causal_blocks(1, 40, mask).whole == (form != engine_module.CAUSAL_BLOCKS)


def test_tee_only_attention_is_the_fastest_form(tiny_models, monkeypatch):
    """Unpinned, set-up times every form and keeps the fastest; a form that fails is left out; split
    engines have no form (their scores cross) and choose nothing."""
    model = load_model(tiny_models["gqa-tied"], torch.float32, CPU)
    engine = SplitLlama(model.config, model.state_dict, Plain(), CPU, torch.float32, tee_only=True)
    assert engine.attention_form == engine_module.ONE_BLOCK  # until set-up chooses
    engine.warm_device(1, 64)
    assert set(engine.attention_ms) == set(engine_module.ATTENTION_FORMS)
    assert engine.attention_form == min(engine.attention_ms, key=engine.attention_ms.get)

    def failing(*args):
        raise RuntimeError("not implemented for this dtype")

    monkeypatch.setattr(engine_module, "fused_attention", failing)
    engine.warm_device(1, 64)
    assert engine.attention_form != engine_module.FUSED and engine_module.FUSED not in engine.attention_ms
    split = SplitLlama(model.config, model.state_dict, Plain(), CPU, torch.float32)
    split.warm_device(1, 16)
    assert split.attention_form is None and split.attention_ms == {}
    with pytest.raises(ValueError):
        SplitLlama(model.config, model.state_dict, Plain(), CPU, torch.float32, tee_only=True, attention="flash")


def test_inputs_cut_and_repeat():
    tok = ByteTokenizer(256)
    ids, mask = build_batch(tok, ["abc"], 7, 1)
    assert bytes(ids[0].tolist()) == b"abcabca" and mask.all()
    ids, mask = build_batch(tok, ["abcdefghij"], 4, 2, ragged=True)
    assert bytes(ids[0].tolist()) == b"abcd" and mask.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert last_positions(mask).tolist() == [3, 2]


def test_otp_offline_fetches_weights_a_block_at_a_time(tiny_models, monkeypatch):
    """otp multiplies its pads by the weights offline, in the TEE: it fetches each from where it lives (the
    GPU) a few rows at a time and keeps none, so the TEE never holds a copy of a GPU weight."""
    model = load_model(tiny_models["mha-untied"], torch.float32, CPU)
    ids, mask = build_batch(model.tokenizer, PROMPTS, 8, 1)
    engine = SplitLlama(model.config, model.state_dict, make_scheme("otp", seed=0), CPU, torch.float32)
    monkeypatch.setattr(schemes, "WEIGHT_BLOCK_BYTES", 3 * 64 * 4)  # three float32 rows of 64
    where, fetched, alive = engine.weight_for_tee, [], []

    class OnTheGpu:  # a weight that records every block of rows taken from it
        def __init__(self, name):
            self.name, self.weight = name, where(name)
            self.shape = self.weight.shape

        def __getitem__(self, rows):
            block = self.weight[rows].clone()  # on CUDA a fetch is a copy: simulated
            held = sum(r() is not None for r in alive)
            fetched.append((self.name, block.shape[0], held))
            alive.append(weakref.ref(block))
            return block

    engine.weight_for_tee = OnTheGpu
    logits, _ = engine.timed_forward(ids, mask)
    rows = {}
    for name, count, held in fetched:
        assert count <= 3 and held == 0  # no earlier block is still held when the next is taken
        rows[name] = rows.get(name, 0) + count
    assert len(rows) == 4 * 2 + 1 and rows["lm_head"] == 320 and rows["0.gate_up"] == 2 * 96
    assert compare(logits, reference_logits(model.config, model.state_dict, ids, mask))["rel_logit_error"] < 1e-3
    norms = 2 * (2 * 2 + 1) * 64 * 4  # each norm as given and as the TEE uses it (times sqrt(d), float32)
    assert engine.tee_weight_bytes() == norms + 320 * 64 * 4  # the norms and the embedding table, nothing else


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("scheme", ["matrix", "otp"])
def test_protected_operands_are_written_where_the_gpu_reads_them(tiny_models, scheme, compiled):
    """With CUDA, a masked scheme writes every operand bound for the GPU into a pinned buffer of the
    boundary's, so nothing is staged on the way. Here the buffers are NaN-filled stand-ins: every one is
    written whole (the same logits, bit for bit), and every tensor sent to the GPU is one of them."""
    from splitinfer import kernels
    model = load_model(tiny_models["biases"], torch.float32, CPU)  # the compiled kernel tests' shapes: fewer builds
    ids, mask = build_batch(model.tokenizer, PROMPTS, 10, 2, True)
    logits, buffers, sent = {}, set(), []
    try:
        for buffered in (False, True):
            # compiled at every shape: set-up's timed choice between a kernel's forms could differ between the
            # two engines, and the forms round differently
            engine = SplitLlama(model.config, model.state_dict, make_scheme(scheme, seed=5), CPU, torch.float32,
                                compiled=compiled, choose_kernels=False)
            if buffered:
                def poisoned(shape, dtype):
                    out = torch.full(shape, float("nan"), dtype=dtype)
                    buffers.add(out.untyped_storage().data_ptr())
                    return out
                engine.scheme.pinned_buffer = poisoned
                engine.link.audit = lambda layer, op, t: sent.append((op, t.untyped_storage().data_ptr()))
            engine.warm_kernels(*ids.shape)
            logits[buffered] = engine.timed_forward(ids, mask)[0]
    finally:
        kernels.select(False)
    assert torch.equal(logits[True], logits[False]) and not logits[True].isnan().any()
    assert sent and all(ptr in buffers for op, ptr in sent), [op for op, ptr in sent if ptr not in buffers]


@pytest.mark.parametrize("scheme,variant", [("plain", "gqa-tied"), ("matrix", "gqa-tied"), ("otp", "biases")])
def test_device_warmup_changes_nothing_an_inference_measures(tiny_models, scheme, variant):
    """warm_device runs each GPU op once in set-up (and, for a streamed table, one block of it): the inference
    after it gives the same logits, crosses the same bytes in as many copies, and counts the same ops."""
    model = load_model(tiny_models[variant], torch.float32, CPU)
    ids, mask = build_batch(model.tokenizer, PROMPTS, 12, 2, ragged=True)
    runs = []
    for warm in (False, True):
        engine = SplitLlama(model.config, model.state_dict, make_scheme(scheme, seed=5), CPU, torch.float32,
                            block_rows=4)
        if warm:
            assert engine.warm_device(*ids.shape) > 0
        runs.append(engine.timed_forward(ids, mask))
    (cold, cold_figures), (warmed, warm_figures) = runs
    # set-up may keep the LM head's other form (`Gpu.choose_head`), the same product to rounding
    assert torch.allclose(cold, warmed, rtol=1e-5, atol=1e-5) and cold_figures["counts"] == warm_figures["counts"]
    moved = [{k: v for k, v in f["data_transfer"].items() if k.endswith(("bytes", "calls"))} for f in (cold_figures, warm_figures)]
    assert moved[0] == moved[1]


@pytest.mark.parametrize("rows", [1, 2, 3])
@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_lm_head_by_columns_is_the_linear(rows, bias):
    weight, x = torch.randn(320, 64), torch.randn(rows, 64)
    b = torch.randn(320) if bias else None
    out = engine_module.head_by_columns(x, weight, b)
    assert out.shape == (rows, 320) and out.is_contiguous()
    assert torch.allclose(out, torch.nn.functional.linear(x, weight, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_the_plain_splits_qkv_comes_in_two_contiguous_parts(bias):
    """`linear_in_two`: F.linear's output, its first columns (q and k, bound for the TEE) and the rest (v, which
    stays) each contiguous, so that the first crosses without a copy on the GPU."""
    weight, x = torch.randn(96, 32), torch.randn(2, 5, 32)
    b = torch.randn(96) if bias else None
    first, rest = engine_module.in_two(engine_module.linear_in_two(x, weight, b, 64), x.shape[:-1], 64)
    expected = torch.nn.functional.linear(x, weight, b)
    assert first.shape == (2, 5, 64) and rest.shape == (2, 5, 32) and first.is_contiguous() and rest.is_contiguous()
    assert torch.allclose(first, expected[..., :64], atol=1e-5) and torch.allclose(rest, expected[..., 64:], atol=1e-5)


@pytest.mark.parametrize("scheme, batch", [("plain", 1), ("matrix", 1), ("matrix", 3), ("otp", 2)])
def test_lm_head_takes_the_faster_form(tiny_models, scheme, batch):
    """Set-up times the LM head both ways at the rows it will take (one per sequence; two for ours at one
    sequence, which pads a row) and keeps the faster; an inference in either form gives transformers' logits."""
    model = load_model(tiny_models["gqa-tied"], torch.float32, CPU)
    ids, mask = build_batch(model.tokenizer, PROMPTS, 12, batch, ragged=batch > 1)
    reference = reference_logits(model.config, model.state_dict, ids, mask)
    engine = SplitLlama(model.config, model.state_dict, make_scheme(scheme, seed=1), CPU, torch.float32)
    engine.warm_device(*ids.shape)
    rows = max(batch, 2) if scheme == "matrix" else batch
    times = engine.gpu.head_ms[str([rows, model.config.hidden_size])]
    assert list(engine.gpu.head_forms) == [rows] and set(times) == {"linear_ms", "by-columns_ms", "runs"}
    assert times["runs"] == engine.gpu.head_forms[rows] == min(engine_module.BY_ROWS, engine_module.BY_COLUMNS,
                                                                key=lambda form: times[f"{form}_ms"])
    for form in (engine_module.BY_ROWS, engine_module.BY_COLUMNS):
        engine.gpu.head_forms[rows] = form
        logits, figures = engine.timed_forward(ids, mask)
        assert figures["counts"]["gpu_lm_head"] == 1
        err = compare(logits, reference)
        assert err["rel_logit_error"] <= 1e-4 and err["top1_agreement"] == 1.0, (form, err)


@pytest.mark.parametrize("scheme", ["matrix", "otp"])
@pytest.mark.parametrize("variant, n, batch", [("biases", 12, 3), ("gqa-tied", 1, 2)],
                         ids=["biases-padded", "one-token"])
def test_fused_hops_do_the_separate_steps_work(tiny_models, scheme, variant, n, batch):
    """With `fuse_hops`, each hop between two linears (recovery and bias, residual add and RMSNorm or SiLU·up,
    the next protect), the one from the qkv projection to the scores (recovery and bias, RoPE, the scores'
    protect), the one between the attention matmuls (recovery, softmax, protect) and the one from P·V to the o
    projection (recovery, the heads merged, o's protect), is one TEE call:
    eager, the very ops the separate steps run, so the same logits bit for bit; the same bytes cross in the same
    calls, every step is still counted, and the hops' time is crypto, under labels that name both steps and the
    op. One token: ours mixes a dummy row in (`Matrix`)."""
    model = load_model(tiny_models[variant], torch.float32, CPU)
    ids, mask = build_batch(model.tokenizer, PROMPTS, n, batch, ragged=n > 1)
    runs = {}
    for fuse in (False, True):
        engine = SplitLlama(model.config, model.state_dict, make_scheme(scheme, seed=4), CPU, torch.float32,
                            fuse_hops=fuse)
        runs[fuse] = engine.timed_forward(ids, mask)
    (logits, figures), (separate, whole) = runs[True], runs[False]
    assert torch.equal(logits, separate)
    err = compare(logits, reference_logits(model.config, model.state_dict, ids, mask))
    assert err["rel_logit_error"] <= 1e-3 and err["top1_agreement"] == 1.0, err
    assert figures["counts"] == whole["counts"] and figures["data_transfer"] == whole["data_transfer"]
    layers = model.config.num_hidden_layers
    hops = {op: ms for op, ms in figures["breakdown"]["crypto"].items() if "+" in op}
    recover, protect = make_scheme(scheme).steps[1], make_scheme(scheme).steps[0]
    assert set(hops) == {f"{recover}_linear_attn+rmsnorm+{protect}_linear_mlp",
                         f"{recover}_linear_mlp+silu+{protect}_linear_mlp",
                         f"{recover}_linear_mlp+rmsnorm+{protect}_linear_attn",
                         f"{recover}_linear_attn+rotary+{protect}_matmul",
                         f"{recover}_matmul+softmax+{protect}_matmul",
                         f"{recover}_matmul+{protect}_linear_attn"}
    assert "rmsnorm" in figures["breakdown"]["cpu_compute"]
    assert not {"silu", "softmax", "rotary"} & set(figures["breakdown"]["cpu_compute"])
    assert layers > 1  # so that a down projection's answer meets the next layer's norm


def test_fused_hops_leave_the_plain_split_as_it_is(tiny_models):
    """The plain split has no steps to fuse: `fuse_hops` changes nothing there."""
    model = load_model(tiny_models["gqa-tied"], torch.float32, CPU)
    engine = SplitLlama(model.config, model.state_dict, Plain(), CPU, torch.float32, fuse_hops=True)
    ids, mask = build_batch(model.tokenizer, PROMPTS, 8, 1)
    assert not engine.fuse_hops and not engine.timed_forward(ids, mask)[1]["breakdown"].get("crypto")
    with pytest.raises(NotImplementedError, match="plain scheme has no protect or recover step"):
        Plain().hop(torch.zeros(1, 2, 4), None, None, tee_ops.gated, (), "0.down")


@pytest.mark.parametrize("variant", ["gqa-tied", "biases"])
def test_the_plain_splits_kept_buffers_hold_nothing_still_needed(tiny_models, variant):
    """With pinned copies (CUDA), the plain split's answers come back into a buffer kept for each hop, which the
    same hop of the next layer overwrites, and what it sends the GPU is written into buffers kept by shape
    (`Boundary.kept_buffer`). Here they are NaN-filled stand-ins, and every copy back is made into one: two
    inferences of different prompts, a padded batch of 2, each give transformers' logits, the second reusing the
    first's buffers, and everything sent to the GPU after the embedding but before the LM head is one of them.
    A masked scheme keeps none."""
    model = load_model(tiny_models[variant], torch.float32, CPU)
    engine = SplitLlama(model.config, model.state_dict, Plain(), CPU, torch.float32)
    engine.link.pinned = True  # as on CUDA, where copies are pinned; on the CPU the copies back are real copies

    def poisoned(shape, dtype, strides=None):
        return torch.full(shape, float("nan"), dtype=dtype).as_strided(shape, strides or torch.empty(shape).stride())

    engine.link.pinned_buffer = poisoned
    sent = []
    engine.link.audit = lambda layer, op, t: sent.append((layer, t.untyped_storage().data_ptr()))
    kept = None
    for prompts in (PROMPTS, ["Masks are fresh at every layer.", "One GPU, one TEE, no IPC between them."]):
        ids, mask = build_batch(model.tokenizer, prompts, 16, 2, True)
        sent.clear()
        logits = engine.timed_forward(ids, mask)[0]
        err = compare(logits, reference_logits(model.config, model.state_dict, ids, mask))
        assert err["rel_logit_error"] <= 1e-4 and err["top1_agreement"] == 1.0, err
        buffers = {id(b): b.untyped_storage().data_ptr() for b in engine.link.kept.values()}
        assert kept is None or buffers == kept  # the same buffers, none added
        kept = buffers
        in_layers = [ptr for layer, ptr in sent if layer is not None]
        assert in_layers and set(in_layers) <= set(buffers.values())
    assert {key[0] for key in engine.link.kept} == {"to_gpu", *(f"to_tee {hop}" for hop in
                                                                ("qkv", "softmax", "o", "silu", "down"))}
    masked = SplitLlama(model.config, model.state_dict, make_scheme("matrix"), CPU, torch.float32)
    masked.link.pinned, masked.link.pinned_buffer = True, poisoned
    masked.scheme.pinned_buffer = lambda shape, dtype: None
    masked.timed_forward(ids, mask)
    assert masked.link.kept == {}


def test_freed_memory_goes_back_to_the_os_when_set_up_asks():
    """The heap keeps what the process frees (`keep_freed_memory`: no mmap, no trimming), so that the TEE's
    temporaries are not faulted in afresh at every op; `release_freed_memory`, called once after set-up's
    compiler, hands it back."""
    if not engine_module.keep_freed_memory().startswith("glibc"):
        pytest.skip("not glibc")
    t = torch.ones(64 * 2 ** 20)  # 256 MiB, from the heap
    held = host_rss_mb()
    del t
    assert host_rss_mb() > held - 64  # freed, but still resident
    engine_module.release_freed_memory()
    assert host_rss_mb() < held - 192


@pytest.mark.parametrize("variant", ["gqa-tied", "rope-dynamic"])
def test_the_rotary_tables_and_the_bias_are_made_once_for_a_length_and_a_mask(tiny_models, variant):
    """The rotary tables depend on the length alone and the attention bias on the mask alone, so each is made once
    and kept (`Rotary.tables`, `SplitLlama.attention_bias`): the same tensors at the next inference of that length
    and mask, even where the mask is another tensor of the same values; another mask (other padding) gets a bias
    of its own, and every inference still gives transformers' logits."""
    model = load_model(tiny_models[variant], torch.float32, CPU)
    engine = SplitLlama(model.config, model.state_dict, Plain(), CPU, torch.float32)
    ids, ragged = build_batch(model.tokenizer, PROMPTS, 12, 2, True)
    made = []
    for mask in (ragged, ragged.clone(), torch.ones_like(ragged), ragged):
        logits = engine.timed_forward(ids, mask)[0]
        assert compare(logits, reference_logits(model.config, model.state_dict, ids, mask))["rel_logit_error"] <= 1e-4
        made.append((engine.last_bias[1], engine.rotary.tables(12, torch.float32)))
    biases, tables = zip(*made)
    assert biases[1] is biases[0] and biases[2] is not biases[1] and biases[3] is not biases[2]
    assert all(pair is tables[0] for pair in tables) and list(engine.rotary.made) == [(12, torch.float32)]


def test_a_large_copy_to_the_gpu_may_cross_in_slices_a_stream_each(monkeypatch):
    """With copy streams (`Boundary(copy_streams=3)`, on CUDA), a contiguous copy to the GPU of a MiB or more is cut
    into one slice per stream (`_in_slices`): the first on the current stream, each other on a copy stream that
    waits for the current one's work before its slice is queued on it, and the current one waits for each after,
    so that what follows reads the whole copy. Smaller or strided tensors cross whole. Here CPU tensors and
    stand-in streams, which log the order."""
    log = []

    class Stream:
        def __init__(self, name: str):
            self.name = name

        def wait_stream(self, other: "Stream") -> None:
            log.append(("wait", self.name, other.name))

    current = Stream("current")

    @contextmanager
    def on(stream: Stream):
        log.append(("on", stream.name))
        yield

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
    monkeypatch.setattr(torch.cuda, "stream", on)
    link = Boundary(CPU, CPU, Metrics(CPU))
    assert link.copy_streams == []  # none off CUDA
    link.copy_streams = [Stream("a"), Stream("b")]
    big = torch.arange(2 ** 19, dtype=torch.float32)  # 2 MiB
    assert link.sliced(big, None) and link.sliced(big, torch.empty_like(big))
    assert not link.sliced(big[: 2 ** 10], None) and not link.sliced(big.view(2 ** 10, -1).t(), None)
    assert not link.sliced(big, torch.empty(2 ** 10, 2 ** 9).t())
    out = link._in_slices(big, None)
    assert torch.equal(out, big) and out.data_ptr() != big.data_ptr()
    assert log == [("wait", "a", "current"), ("on", "a"), ("wait", "b", "current"), ("on", "b"),
                   ("wait", "current", "a"), ("wait", "current", "b")]
    into = torch.zeros_like(big)
    assert link._in_slices(big, into) is into and torch.equal(into, big)
