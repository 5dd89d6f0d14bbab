"""The TEE's ops against transformers' own modules, and the helpers the performance work added."""
from __future__ import annotations

from unittest.mock import patch

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

import splitinfer.schemes as schemes
import splitinfer.tee_ops as tee_ops
from splitinfer import perf
from splitinfer.errors import UserError, one_line_errors
from splitinfer.tee_ops import (CausalBlocks, RmsNorm, Rotary, apply_rope, attention_bias, grouped_matmul,
                                masked_softmax)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_rms_norm_matches_transformers(dtype, tolerance):
    torch.manual_seed(0)
    norm = LlamaRMSNorm(48, eps=1e-5)
    norm.weight.data = 1 + 0.3 * torch.randn(48)
    x = (3 * torch.randn(2, 5, 48)).to(dtype)
    expected = norm.to(dtype)(x).float()
    out, before = torch.empty_like(x), x.clone()
    tee_norm = RmsNorm.of(norm.weight.data.to(dtype), 1e-5)
    assert tee_norm(x, out).data_ptr() == out.data_ptr()
    torch.testing.assert_close(tee_norm(x).float(), out.float(), rtol=0, atol=0)
    assert torch.equal(x, before)  # the input is left alone
    torch.testing.assert_close(out.float(), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("head_dim", [16, 24])
def test_rope_matches_transformers_on_q_and_k_together(head_dim):
    torch.manual_seed(1)
    config = LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 4})
    q, k = torch.randn(2, 4, 7, head_dim), torch.randn(2, 2, 7, head_dim)
    cos, sin = Rotary(config).tables(7, torch.float32)
    expected_q, expected_k = apply_rotary_pos_emb(q, k, cos[None], sin[None])
    torch.testing.assert_close(apply_rope(k, cos, sin), expected_k)
    # q and k as one strided view of the projection's output, as the engine passes them
    token_major = torch.cat([q, k], dim=1).transpose(1, 2).contiguous()
    rotated = apply_rope(token_major.transpose(1, 2), cos, sin)
    assert rotated.is_contiguous()
    torch.testing.assert_close(rotated[:, :4], expected_q)
    torch.testing.assert_close(rotated[:, 4:], expected_k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_masked_softmax_blocks_future_and_padding(dtype):
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [0, 1, 1, 1]])
    scores = (30 * torch.randn(3, 2, 4, 4)).to(dtype)  # large scores must not overflow the bias
    probs = masked_softmax(scores, attention_bias(mask, dtype))
    assert probs.dtype == dtype and torch.isfinite(probs).all()  # a fully blocked row (left padding) too
    torch.testing.assert_close(probs.float().sum(-1), torch.ones(3, 2, 4), rtol=1e-2, atol=1e-2)
    assert (probs[0].triu(1) == 0).all()  # no query sees a later key
    assert (probs[1, :, :, 2:] == 0).all()  # nor a padding key
    assert (probs[2, :, 1:, 0] == 0).all()
    torch.testing.assert_close(probs[0, :, 3].float(), torch.softmax(scores[0, :, 3].float(), -1), rtol=1e-2,
                               atol=1e-2)


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-6), (torch.float16, 1e-3), (torch.bfloat16, 8e-3)])
@pytest.mark.parametrize("starts", [(0, 3, 4, 9, 11), (0, 17, 33, 40)], ids=["short", "long"])
def test_causal_blocks_softmax_in_one_pass_is_the_kernels(dtype, tolerance, starts):
    """The causal blocks' softmax in one pass (`native.softmax_blocks`, C++: each row with its row of the bias, in
    float32, rounded once) gives the TEE kernel's probabilities within rounding, with a zero exactly where they have
    one (a later key, a padding key), over uneven blocks and a padded sequence, in rows shorter and longer than a
    register's 16 values. A row with no key to see (a query before a left-padded sequence starts) sums to 1 in both;
    its weights are the scores' own softmax here, where the float16 kernel's sum with the bias rounds the scores away
    first (no real token's answer reads such a row). Where no sequence is padded, later keys hidden by their index
    (the bias's values unused) give the very same probabilities as the bias does."""
    from splitinfer import native
    torch.manual_seed(4)
    batch, heads, n = 3, 4, starts[-1]
    mask = torch.tensor([[1] * n, [1] * 7 + [0] * (n - 7), [0, 0] + [1] * (n - 2)])
    blocks = CausalBlocks(batch, heads, starts)
    scores, bias = (4 * torch.randn(blocks.shape)).to(dtype), attention_bias(mask, dtype)
    want = tee_ops._softmax_blocks.eager(scores.clone(), bias, torch.empty_like(scores), batch, heads, blocks.starts,
                                         True)
    every = blocks.unpack(native.softmax_blocks(scores, bias, torch.empty_like(scores), batch, heads, blocks.starts))
    seeing = (bias == 0).any(-1).expand(batch, heads, n)  # rows with a key to see
    want, got = blocks.unpack(want)[seeing], every[seeing]
    torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)
    assert torch.equal(got == 0, want == 0) and (got == 0).sum() > got.numel() // 3
    torch.testing.assert_close(every[~seeing].float().sum(-1), torch.ones((~seeing).sum().item()),
                               rtol=2e-3, atol=2e-3)
    causal = attention_bias(torch.ones_like(mask), dtype)
    by_bias = native.softmax_blocks(scores, causal, torch.empty_like(scores), batch, heads, starts)
    by_index = native.softmax_blocks(scores, torch.full_like(causal, float("nan")), torch.empty_like(scores), batch,
                                     heads, starts, padded=False)
    assert torch.equal(by_index, by_bias) and not by_index.isnan().any()


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_plain_ops_in_cpp_are_the_kernels(dtype, tolerance):
    """The plain split's small TEE ops in C++ (`native.rms_norm`, `native.silu_gate`, `native.rope`: each row in
    float32, rounded once) give the TEE kernels' answers within rounding: RMSNorm with the residual add (whose sum
    is rounded as the kernel rounds it: the very values) and without, SiLU·up, and RoPE on q and k as a strided view
    of the projection's output; at widths that are no multiple of a vector's (and RoPE at heads of 32 too), for two
    sequences; in bfloat16 too, the TEE-only runner's dtype beside a GPU."""
    from splitinfer import native
    torch.manual_seed(5)
    d, inner, heads, n, h = 50, 300, 5, 9, 24
    norm = RmsNorm.of(1 + 0.3 * torch.randn(d), 1e-5)
    x, branch = (3 * torch.randn(2, n, d)).to(dtype), (3 * torch.randn(2, n, d)).to(dtype)
    want_sum, want = tee_ops.residual_rms_norm.eager(x, branch, norm.scaled, norm.eps_d, torch.empty_like(x))
    got_sum, got = native.rms_norm(x, branch, norm.scaled, norm.eps_d, torch.empty_like(x))
    assert torch.equal(got_sum, want_sum)
    torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)
    kept, got = native.rms_norm(x, None, norm.scaled, norm.eps_d, torch.empty_like(x))
    assert kept is x
    torch.testing.assert_close(got, tee_ops.rms_norm.eager(x, norm.scaled, norm.eps_d, torch.empty_like(x)),
                               rtol=tolerance, atol=tolerance)
    gate_up = (4 * torch.randn(2, n, 2 * inner)).to(dtype)
    want = tee_ops.silu_product.eager(gate_up, torch.empty(2, n, inner, dtype=dtype))
    torch.testing.assert_close(native.silu_gate(gate_up, torch.empty_like(want)), want, rtol=tolerance,
                               atol=4 * tolerance)
    q_and_k = tee_ops.split_heads(torch.randn(2, n, heads * h).to(dtype), h)  # [2, heads, n, h], strided
    angles = torch.rand(n, h) * 6
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    want = tee_ops._rope_by_halves(q_and_k, cos, sin, torch.empty(q_and_k.shape, dtype=dtype))
    torch.testing.assert_close(native.rope(q_and_k, cos, sin, torch.empty_like(want)), want, rtol=tolerance,
                               atol=tolerance)
    # heads of 32: each half one register, read straight from the strided view, where 24 takes the row's buffers
    wide = tee_ops.split_heads(torch.randn(2, n, 3 * 32).to(dtype), 32)
    angles = torch.rand(n, 32) * 6
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    want = tee_ops._rope_by_halves(wide, cos, sin, torch.empty(wide.shape, dtype=dtype))
    torch.testing.assert_close(native.rope(wide, cos, sin, torch.empty_like(want)), want, rtol=tolerance,
                               atol=tolerance)


def test_causal_blocks_equal_the_full_attention():
    """Scores, softmax and P·V over uneven row blocks, with GQA and a padded sequence, against the full
    n×n computation, block by block and packed from (and unpacked into) full matrices; and the packed size
    is the block triangle."""
    torch.manual_seed(3)
    batch, heads, groups, n, head_dim = 2, 4, 2, 11, 8
    blocks = CausalBlocks(batch, heads, (0, 3, 4, 9, 11))
    q, k_t = torch.randn(batch, heads, n, head_dim), torch.randn(batch, groups, head_dim, n)
    v = torch.randn(batch, groups, n, head_dim)
    bias = attention_bias(torch.tensor([[1] * n, [1] * 7 + [0] * 4]), torch.float32)
    assert blocks.shape == (batch * heads * (3 * 3 + 1 * 4 + 5 * 9 + 2 * 11),)
    full_probs = masked_softmax(grouped_matmul(q, k_t), bias)
    probs = blocks.softmax(blocks.scores(q, k_t), bias)
    for (start, end), block in zip(blocks.spans, blocks.views(probs)):
        torch.testing.assert_close(block, full_probs[..., start:end, :end])
    torch.testing.assert_close(blocks.attend(probs, v), grouped_matmul(full_probs, v))
    full_scores = grouped_matmul(q, k_t)  # the CUDA form: one product, then one gather; one scatter before P·V
    for (start, end), block in zip(blocks.spans, blocks.views(blocks.pack(full_scores))):
        assert torch.equal(block, full_scores[..., start:end, :end])
    assert torch.equal(blocks.pack(blocks.unpack(probs)), probs)
    torch.testing.assert_close(blocks.unpack(probs), full_probs)  # zero above the block triangle, as causal
    packed, unpacked = blocks.pack(full_scores), blocks.unpack(probs)
    assert blocks.gathers
    with patch.object(tee_ops, "INDEX_BYTES", 0):  # past the index's limit: a slice copy per block, as exact
        assert not blocks.gathers
        assert torch.equal(blocks.pack(full_scores), packed) and torch.equal(blocks.unpack(probs), unpacked)
    assert CausalBlocks.of(1, 32, 512).gathers and not CausalBlocks.of(8, 32, 2048).gathers  # 38 MB; 4.6 GB
    unpadded = torch.ones(batch, n, dtype=torch.long)
    causal_bias = attention_bias(unpadded, torch.float32)
    full_causal = masked_softmax(grouped_matmul(q, k_t), causal_bias)
    no_padding = CausalBlocks(batch, heads, (0, 3, 4, 9, 11), padded=False)  # the bias on diagonal tiles only
    for (start, end), block in zip(blocks.spans, blocks.views(no_padding.softmax(blocks.scores(q, k_t), causal_bias))):
        torch.testing.assert_close(block, full_causal[..., start:end, :end])
    one = CausalBlocks.of(batch, heads, n, split=False)  # the full matrix, as it is
    torch.testing.assert_close(one.softmax(one.scores(q, k_t), bias), full_probs)
    assert one.shape == (batch, heads, n, n) and CausalBlocks.of(1, 1, 63).starts == (0, 63)
    assert CausalBlocks.of(1, 1, 512).starts == tuple(range(0, 513, 64))
    assert CausalBlocks.of(1, 1, 512, rows=128).starts == (0, 128, 256, 384, 512)


def test_stacked_matmul_is_the_grouped_product():
    """One product a KV group, the group's query heads' rows stacked: grouped_matmul's answer, from rows that are
    stacked in memory or not (a row block), against kᵀ as a transposed view, into `out` where given; the causal
    blocks' scores take it on the CPU."""
    torch.manual_seed(5)
    batch, heads, groups, n, head_dim = 2, 6, 2, 9, 8
    q, k = torch.randn(batch, heads, n, head_dim), torch.randn(batch, groups, n, head_dim)
    k_t = k.transpose(-1, -2)
    torch.testing.assert_close(tee_ops.stacked_matmul(q, k_t), grouped_matmul(q, k_t))
    out = torch.empty(batch, heads, 4, 6)
    assert tee_ops.stacked_matmul(q[..., 2:6, :], k_t[..., :6], out) is out
    torch.testing.assert_close(out, grouped_matmul(q, k_t)[..., 2:6, :6])
    blocks = CausalBlocks(batch, heads, (0, 4, 9))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):  # float16: grouped_matmul's own product
        qd, kd = q.to(dtype), k_t.to(dtype)
        for (start, end), block in zip(blocks.spans, blocks.views(blocks.scores(qd, kd))):
            torch.testing.assert_close(block, grouped_matmul(qd, kd)[..., start:end, :end])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 3, 2, 5, 7), (2, 3, 4, 6)])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_permutation_moves_values_exactly(shape, dtype, layout):
    """ours' row and column permutations of an operand (as kᵀ comes, a transposed view too), into a buffer."""
    x = torch.randn(*shape).to(dtype)
    x = x if layout == "contiguous" else x.transpose(-1, -2).contiguous().transpose(-1, -2)
    row_perm = torch.rand(*shape[:-1]).argsort(-1)
    col_perm = torch.rand(shape[0], shape[1], shape[-1]).argsort(-1)
    out = torch.empty(shape, dtype=dtype)
    assert schemes._permute(x, schemes._row_index(row_perm), schemes._col_index(col_perm, shape), out) is not None
    assert out.dtype == dtype
    for b in range(shape[0]):
        for g in range(shape[1]):
            rows = x[b, g].gather(-2, row_perm[b, g][..., None].expand(*shape[2:]))  # row i is row perm_r(i)
            assert torch.equal(out[b, g], rows[..., col_perm[b, g]])


def test_perf_counts_and_variants():
    assert perf.parse_counts("8,4,8", "--thread-sweep") == [4, 8]
    assert perf.parse_counts(None, "--thread-sweep") == []
    for bad in ("4,x", "0"):
        with pytest.raises(UserError):
            perf.parse_counts(bad, "--lengths")
    names = [v[0] for v in perf.variants(overlap=True, ablations=True, thread_sweep="4")]
    assert names == ["optimized", "ours", "otp", "optimized_overlap", "optimized_pageable", "optimized_full_scores",
                     "otp_full_scores", "optimized_blocks128", "ours_resident_embedding", "otp_resident_embedding",
                     "optimized_threads4", "ours_threads4", "otp_threads4"]
    # a masked runner's table the other way from how it ships: ours reads the GPU's, otp keeps its own (config.py)
    tables = [v for v in perf.variants(False, True, None, shipped=perf.shipped_options(False, False))
              if v[0].endswith("_embedding")]
    assert tables == [("ours_resident_embedding", "matrix", {"resident_embedding": True}, None),
                      ("otp_streamed_embedding", "otp", {"resident_embedding": False}, None)]
    assert [v[0] for v in perf.variants(overlap=True, ablations=False, thread_sweep=None)] == [
        "optimized", "ours", "otp", "optimized_overlap"]
    assert [v[0] for v in perf.variants(overlap=False, ablations=False, thread_sweep=None)] == ["optimized", "ours", "otp"]
    graphed = perf.variants(overlap=False, ablations=False, thread_sweep=None, fused_hops=True, cuda_graphs=True)
    assert [v[0] for v in graphed] == ["optimized", "ours", "otp", "optimized_cuda_graphs", "ours_cuda_graphs",
                                       "otp_cuda_graphs", "ours_fused_hops", "otp_fused_hops",
                                       "ours_fused_hops_cuda_graphs", "otp_fused_hops_cuda_graphs"]
    # the three that name graphs and fused hops set both; the runners as they ship take `shipped`
    assert all(v[2] == {"cuda_graphs": True, "fuse_hops": False} for v in graphed[3:6])
    assert all(v[2] == {"fuse_hops": True, "cuda_graphs": False} for v in graphed[6:8])
    assert all(v[2] == {"fuse_hops": True, "cuda_graphs": True} for v in graphed[8:])
    chosen = {"cuda_graphs": "auto", "fuse_hops": "auto"}
    shipped = {"optimized": chosen, "ours": {**chosen, "resident_embedding": False},
               "otp": {**chosen, "resident_embedding": True}}
    assert perf.shipped_options(False, False) == shipped  # tee_gpu/config.py's
    assert [v[2] for v in perf.variants(False, False, None, shipped=shipped)] == list(shipped.values())
    assert perf.shipped_options(True, False)["ours"] == {"cuda_graphs": False, "fuse_hops": "auto",
                                                         "resident_embedding": False}
    hops_only = perf.variants(overlap=False, ablations=False, thread_sweep=None, fused_hops=True)
    assert [v[0] for v in hops_only] == ["optimized", "ours", "otp", "ours_fused_hops", "otp_fused_hops"]
    # each runner without the C++ kernels, timed in turn with the runners; its ratio to the runner
    without = perf.variants(overlap=False, ablations=False, thread_sweep=None, without_cpp=True)[3:]
    assert [v[0] for v in without] == ["optimized_no_cpp_kernels", "ours_no_cpp_kernels", "otp_no_cpp_kernels"]
    assert all(v[2] == {"native_kernels": False} and v[0].endswith(perf.IN_TURN) for v in without)
    # each runner with --kernels cpp where it ships compiled: its shipped options, so that set-up chooses afresh
    cpp = perf.variants(False, False, None, shipped=shipped, cpp_kernels=True)[3:]
    assert [(v[0], v[2]) for v in cpp] == [(f"{m}_cpp_kernels", {**shipped[m], "compiled": False, "cpp": True})
                                           for m in ("optimized", "ours", "otp")]
    assert all(v[0].endswith(perf.IN_TURN) for v in cpp)
    row = {m: {"median_ms": ms, "first_ms": ms} for m, ms in (("optimized", 40.0), ("ours", 80.0), ("otp", 90.0),
                                                               ("ours_no_cpp_kernels", 100.0))}
    assert perf.ratios(row)["ours_no_cpp_kernels_over_with"] == 1.25
    # what reading the GPU's table costs, whichever way the runner ships
    row.update(ours_resident_embedding={"median_ms": 70.0}, otp_streamed_embedding={"median_ms": 99.0})
    assert perf.ratios(row)["ours_streamed_over_resident_embedding"] == 80.0 / 70.0
    assert perf.ratios(row)["otp_streamed_over_resident_embedding"] == 99.0 / 90.0


def test_perf_ratios_with_cuda_graphs():
    """What replaying the GPU's calls buys each runner, and the targets' ratios among the graphed runners."""
    row = {m: {"median_ms": ms, "first_ms": ms} for m, ms in (
        ("optimized", 40.0), ("ours", 80.0), ("otp", 100.0), ("tee_only", 120.0), ("transformers_cpu", 130.0),
        ("optimized_cuda_graphs", 20.0), ("ours_cuda_graphs", 50.0), ("otp_cuda_graphs", 60.0))}
    out = perf.ratios(row)
    assert out["optimized_cuda_graphs_over_optimized"] == 0.5 and out["otp_cuda_graphs_over_otp"] == 0.6
    assert out["ours_over_plain_cuda_graphs"] == 2.5 and out["otp_online_over_plain_cuda_graphs"] == 3.0
    assert "optimized_cuda_graphs_over_optimized" not in perf.ratios({m: r for m, r in row.items() if "graphs" not in m})
    row["ours_fused_hops_cuda_graphs"] = {"median_ms": 30.0, "first_ms": 30.0}  # both on
    assert perf.ratios(row)["ours_fused_hops_over_plain_cuda_graphs"] == 1.5
    row["optimized_cuda_graphs"] = {"error": "a capture failed"}  # the plain split's graphs failed, ours' ran
    out = perf.ratios(row)
    assert out["ours_cuda_graphs_over_ours"] == 50 / 80 and "ours_over_plain_cuda_graphs" not in out
    assert "ours_fused_hops_over_plain_cuda_graphs" not in out


def test_one_line_errors(capsys):
    @one_line_errors
    def main(fail: bool) -> int:
        if fail:
            raise UserError("bad value")
        return 0

    assert main(False) == 0 and main(True) == 2
    assert capsys.readouterr().err == "error: bad value\n"
