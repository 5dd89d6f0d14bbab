"""Each scheme's recovery on its own, against the unmasked product, and end to end against transformers."""
from __future__ import annotations

import functools

import pytest
import torch
from conftest import VARIANTS

from splitinfer import schemes, tee_ops
from splitinfer.engine import CAUSAL_BLOCKS, SplitLlama
from splitinfer.inputs import build_batch
from splitinfer.models import load_model
from splitinfer.reference import compare, reference_logits
from splitinfer.schemes import Matrix, Otp, make_scheme
from splitinfer.tee_ops import grouped_matmul

CPU = torch.device("cpu")
PROMPTS = ["The quick brown fox jumps over the lazy dog.", "Private prompts stay in the TEE."]


def _weights(out_features: int, in_features: int) -> dict[str, torch.Tensor]:
    return {"w": torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(7))}


@pytest.mark.parametrize("scheme_cls", [Matrix, Otp])
@pytest.mark.parametrize("shape", [(2, 9, 16), (3, 16), (1, 16), (2, 1, 16)], ids=["seq", "rows", "one-row", "n=1"])
def test_linear_recovery(scheme_cls, shape):
    weights = _weights(24, 16)
    scheme = scheme_cls(seed=3)
    scheme.prepare({"w": shape}, {}, weights.get)
    x = torch.randn(shape) * torch.rand(shape[:-1] + (1,)) * 10  # rows of very different norms
    masked, secret = scheme.protect_linear(x, "w")
    rows = x.reshape(-1, shape[-1])
    assert not torch.allclose(masked.reshape(-1, shape[-1])[: len(rows)], rows)
    y = scheme.recover_linear(masked @ weights["w"].T, secret)
    torch.testing.assert_close(y, x @ weights["w"].T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scheme_cls", [Matrix, Otp])
@pytest.mark.parametrize("heads,groups", [(4, 4), (4, 2), (6, 1)])
def test_matmul_recovery(scheme_cls, heads, groups):
    a_shape, b_shape = (2, heads, 7, 5), (2, groups, 5, 7)
    scheme = scheme_cls(seed=5)
    scheme.prepare({}, {"mm": (a_shape, b_shape)})
    a, b = torch.randn(a_shape), torch.randn(b_shape)
    a_masked, b_masked, secret = scheme.protect_matmul(a, b, "mm")
    assert b_masked.shape == b.shape  # the K/V side is never expanded to the query heads
    c = scheme.recover_matmul(grouped_matmul(a_masked, b_masked), secret)
    torch.testing.assert_close(c, grouped_matmul(a, b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch,heads,groups,n,split,dtype,compiled", [
    (2, 4, 2, 150, True, torch.float16, False), (1, 6, 3, 40, False, torch.float16, False),
    (1, 4, 1, 200, True, torch.float16, False), (2, 4, 2, 150, True, torch.bfloat16, False),
    (1, 6, 3, 40, False, torch.bfloat16, False), (1, 4, 1, 200, True, torch.bfloat16, False),
    # compiled, one block and several, each dtype once (each shape and dtype is a build of its own)
    (2, 4, 2, 150, True, torch.float16, True), (1, 6, 3, 40, False, torch.bfloat16, True)])
def test_otp_scores_cross_terms_in_integers(batch, heads, groups, n, split, dtype, compiled):
    """The scores' cross terms as int8 digit products (`_integer_scores`) give the float32 products' answer to
    within c's own rounding, as one block and as several, eager and compiled, with rows and columns of very
    different sizes (each gets its own scale)."""
    from splitinfer import kernels
    from splitinfer.tee_ops import CausalBlocks
    torch.manual_seed(11)
    k = 16
    q = (torch.randn(batch, heads, n, k) * torch.rand(batch, heads, n, 1) * 8).to(dtype)
    k_t = (torch.randn(batch, groups, k, n) * torch.rand(batch, groups, 1, n) * 8).to(dtype)
    otp = Otp(seed=2)
    otp.prepare({}, {"s": (q.shape, k_t.shape)}, dtype=dtype)
    a, b, secret = otp.protect_matmul(q, k_t, "s")
    product = CausalBlocks.of(batch, heads, n, split=split).scores
    c = product(a.float(), b.float()).to(dtype)  # the GPU's answer, rounded to its dtype
    truth = product(q.double(), k_t.double())
    kernels.select(compiled, chosen=False)
    try:
        answers = {form: f(*secret, c, product) for form, f in schemes.CROSS_FORMS.items()}
    finally:
        kernels.select(False)
    assert all(x.shape == truth.shape and x.dtype == dtype for x in answers.values())
    # within 2 units in the last place of the largest score, and as far from the truth as float32's answer
    ulp = torch.finfo(dtype).eps * 2.0 ** torch.log2(truth.abs().max()).floor()
    assert (answers["integer"].double() - answers["float32"].double()).abs().max() <= 2 * ulp
    errors = {form: (x.double() - truth).abs().max() for form, x in answers.items()}
    assert errors["integer"] <= errors["float32"] + ulp


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_otp_pad_product_in_row_blocks(dtype):
    """otp's offline N·Wᵀ converts W to float32 a block of rows at a time (uneven blocks here: 37 rows in
    blocks of 8), and equals the product of whole float32 copies, kept in the model's dtype."""
    noise = torch.randn(3, 5, 16).to(dtype)
    weight = torch.randn(37, 16).to(dtype)
    product = schemes._float32_product(noise, weight, dtype, block_bytes=4 * 16 * 8)
    assert product.dtype == dtype and product.shape == (3, 5, 37)
    # a block's product may sum in another order than the whole one: within one rounding of the model's dtype
    # (a float16 ulp flipped 2 of 555 entries in one full-suite run)
    rtol = max(torch.finfo(dtype).eps, 1e-6)
    torch.testing.assert_close(product, (noise.float() @ weight.float().T).to(dtype), rtol=rtol, atol=1e-5)


def test_otp_drops_the_last_pads_before_drawing_new_ones(monkeypatch):
    """Each offline phase lets the last inference's pads go before drawing its own, so that two sets are
    never held at once (they were 637 MiB of otp's peak at the 1B shape and 512 tokens)."""
    weights, shapes = _weights(24, 16), ({"w": (2, 9, 16)}, {"s": ((1, 2, 9, 4), (1, 1, 4, 9))})
    scheme = Otp(seed=1)
    scheme.prepare(*shapes, weights.get)
    held, draw = [], scheme._gaussians

    def counting_draw(*args):
        held.append(len(scheme.linear_pads) + len(scheme.matmul_pads))
        return draw(*args)

    monkeypatch.setattr(scheme, "_gaussians", counting_draw)
    scheme.prepare(*shapes, weights.get)
    assert held == [0] and set(scheme.linear_pads) == {"w"} and set(scheme.matmul_pads) == {"s"}


def test_matrix_permutations_are_not_identity():
    scheme = Matrix(seed=0)
    scheme.prepare({}, {"mm": ((1, 2, 16, 8), (1, 1, 8, 16))})
    masks = scheme.matmul_masks["mm"]
    identity = torch.arange(16)
    assert not torch.equal(masks["p1"][0, 0, 0], identity) and not torch.equal(masks["p3"][0, 0], identity)
    assert not torch.equal(masks["p2"][0, 0], torch.arange(8))
    assert torch.equal(masks["p1"].gather(-1, masks["p1_inverse"]), identity.expand(1, 1, 2, 16))
    # undoing a permutation with itself instead of its inverse (the original implementation's bug) fails
    a, b = torch.randn(1, 2, 16, 8), torch.randn(1, 1, 8, 16)
    a_masked, b_masked, secret = scheme.protect_matmul(a, b, "mm")
    wrong = dict(masks, rows_p1_inverse=masks["rows_p1"])
    c_wrong = scheme.recover_matmul(grouped_matmul(a_masked, b_masked), (wrong, 1, False))
    assert not torch.allclose(c_wrong, grouped_matmul(a, b), atol=1e-3)


@pytest.mark.parametrize("rank", [1, 3])
def test_matrix_woodbury_is_stable(rank):
    scheme = Matrix(seed=1, rank=rank)
    scheme.prepare({"w": (64, 128, 8)}, {})
    m = scheme.linear_masks["w"]
    core = torch.eye(rank) + m["b"].transpose(1, 2) @ (m["a"] / m["d"][..., None])
    assert torch.allclose(core, core.transpose(1, 2), atol=1e-5)
    assert torch.linalg.eigvalsh(core).min() >= 1 - 1e-5  # recovery never divides by a small number
    assert m["d"].abs().min() >= Matrix.D_RANGE[0] and m["d"].abs().max() <= Matrix.D_RANGE[1]


@pytest.mark.parametrize("rank,mix_scale", [(2, 1.0), (4, 1.0), (16, 1.0), (1, 64.0), (4, 16.0)])
def test_matrix_rank_k_recovery(rank, mix_scale):
    torch.manual_seed(rank)  # the inputs must not depend on which tests ran before
    weights = _weights(24, 16)
    scheme = Matrix(seed=2, rank=rank, mix_scale=mix_scale)
    scheme.prepare({"w": (2, 9, 16)}, {}, weights.get)
    x = torch.randn(2, 9, 16)
    masked, secret = scheme.protect_linear(x, "w")
    # M really is D + ABᵀ of rank k: removing D leaves a rank-k mixing
    m = scheme.linear_masks["w"]
    mixing = m["a"] @ m["b"].transpose(1, 2)
    assert torch.linalg.matrix_rank(mixing[0]) == min(rank, 9)
    # float32 rounding of the mixed rows grows with the mixing scale
    tolerance = 1e-4 * max(1.0, mix_scale / 16)
    torch.testing.assert_close(scheme.recover_linear(masked @ weights["w"].T, secret), x @ weights["w"].T,
                               rtol=tolerance, atol=tolerance)


def test_masks_of_one_shape_are_drawn_together_and_apart():
    """Masks of one shape are drawn in one go (`_drawn_by_shape`), yet every linear and matmul gets its own:
    a mask reused between layers (the original implementation's bug) would show as equal values."""
    linears = {f"{i}.{w}": (1, 6, 8) for i in range(3) for w in ("qkv", "o")} | {"lm_head": (1, 8)}
    matmuls = {f"{i}.scores": ((1, 4, 6, 3), (1, 2, 3, 6)) for i in range(3)}
    scheme = Matrix(seed=3)
    scheme.prepare(linears, matmuls)
    d = [scheme.linear_masks[name]["d"] for name in linears if name != "lm_head"]
    assert all(not torch.equal(x, y) for i, x in enumerate(d) for y in d[i + 1:])
    p1 = [scheme.matmul_masks[name]["p1"] for name in matmuls]
    assert all(not torch.equal(x, y) for i, x in enumerate(p1) for y in p1[i + 1:])
    for m in scheme.matmul_masks.values():  # each mask's own indices, not offset into its neighbours'
        assert torch.equal(m["p1"].gather(-1, m["p1_inverse"]), torch.arange(6).expand(1, 2, 2, 6))
        assert m["rows_p1"].min() >= 0 and m["rows_p1"].max() < 1 * 4 * 6
    assert scheme.linear_masks["lm_head"]["dummy"].shape == (1, 1, 8)  # one row: padded with a dummy


def test_masks_are_fresh_and_seedable():
    shapes = ({"w": (1, 4, 8)}, {"mm": ((1, 2, 4, 3), (1, 2, 3, 4))})
    first, second, again = Matrix(seed=1), Matrix(seed=None), Matrix(seed=1)
    for s in (first, second, again):
        s.prepare(*shapes)
    assert torch.equal(first.linear_masks["w"]["d"], again.linear_masks["w"]["d"])
    assert not torch.equal(first.linear_masks["w"]["d"], second.linear_masks["w"]["d"])
    before = first.linear_masks["w"]["d"].clone()
    first.prepare(*shapes)  # the next inference draws new masks
    assert not torch.equal(before, first.linear_masks["w"]["d"])


@pytest.mark.parametrize("scheme", ["matrix", "otp"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_masked_engine_matches_transformers(tiny_models, scheme, variant):
    model = load_model(tiny_models[variant], torch.float32, CPU)
    for batch, ragged in ((1, False), (2, True)):
        ids, mask = build_batch(model.tokenizer, PROMPTS, 12, batch, ragged)
        engine = SplitLlama(model.config, model.state_dict, make_scheme(scheme), CPU, torch.float32)
        logits, figures = engine.timed_forward(ids, mask)
        err = compare(logits, reference_logits(model.config, model.state_dict, ids, mask))
        assert err["rel_logit_error"] <= 1e-3, (batch, err)
        assert err["top1_agreement"] == 1.0
        assert figures["categories"]["crypto"] > 0 and figures["categories"]["offline"] > 0


@pytest.mark.parametrize("heads,groups", [(4, 2), (3, 1)])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_scores_kept_in_mask_order(heads, groups, compiled):
    """ours with the scores left in its masks' order (softmax_of): the softmax over that order, with the
    causal and padding mask moved along, gives the same probabilities, and P·V's protect gathers from it
    exactly the A' = D₁P₁ A P₂D₂ that its own fresh masks make of the probabilities in order."""
    from splitinfer import kernels
    from splitinfer.tee_ops import attention_bias, masked_softmax, softmax_in_order
    kernels.select(compiled)
    try:
        n, k = 9, 5
        attention_mask = torch.tensor([[1] * n, [1] * 6 + [0] * 3])
        q, k_t, v = torch.randn(2, heads, n, k), torch.randn(2, groups, k, n), torch.randn(2, groups, n, k)
        scheme = Matrix(seed=11)
        scheme.prepare({}, {"s": (q.shape, k_t.shape), "p": ((2, heads, n, n), v.shape)}, softmax_of={"p": "s"})
        a_masked, b_masked, secret = scheme.protect_matmul(q, k_t, "s")
        kept = scheme.recover_matmul(grouped_matmul(a_masked, b_masked), secret)
        rows, keys = scheme.scores_order("s")
        probs = masked_softmax(grouped_matmul(q, k_t), attention_bias(attention_mask, torch.float32))
        kept_probs = softmax_in_order(kept, rows, keys, attention_mask).view(2, groups, heads // groups, n, n)
        sent = scheme.protect_matmul(kept_probs.view(probs.shape), v, "p")[0].view(kept_probs.shape)
        m = scheme.matmul_masks["p"]
        in_order = probs.view(kept_probs.shape)
        for b, g, r in [(b, g, r) for b in range(2) for g in range(groups) for r in range(heads // groups)]:
            mine = in_order[b, g, r]
            torch.testing.assert_close(kept_probs[b, g, r], mine[rows[b, g, r]][:, keys[b, g]], rtol=1e-5, atol=1e-6)
            want = mine[m["p1"][b, g, r]][:, m["p2"][b, g]] * m["d1"][b, g, r, :, None] * m["d2"][b, g]
            torch.testing.assert_close(sent[b, g, r], want, rtol=1e-5, atol=1e-6)
    finally:
        kernels.select(False)


@pytest.mark.parametrize("scheme_cls", [Matrix, Otp])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_softmax_hop_is_the_steps(scheme_cls, padded, compiled):
    """The fused softmax hop (`softmax_hop`: recover the scores, their masked softmax, protect P·V's operands)
    sends the GPU the very operands the three steps would, and keeps the same secret: ours with the scores in its
    masks' order (its unscaling and key hiding one kernel, positions made offline where nothing is padded), otp
    in its causal blocks."""
    from splitinfer import kernels
    from splitinfer.tee_ops import CausalBlocks, attention_bias, softmax_in_order
    kernels.select(compiled)
    try:
        heads, groups, n, k = 4, 2, 9, 5
        attention_mask = torch.tensor([[1] * n, [1] * 6 + [0] * 3] if padded else [[1] * n] * 2)
        bias = attention_bias(attention_mask, torch.float32)
        blocks = CausalBlocks.of(2, heads, n, split=scheme_cls.causal_blocks, padded=padded, rows=4)
        q, k_t, v = torch.randn(2, heads, n, k), torch.randn(2, groups, k, n), torch.randn(2, groups, n, k)
        sent = []
        for fused in (False, True):
            scheme = scheme_cls(seed=3)
            scheme.prepare({}, {"s": (q.shape, k_t.shape), "p": (blocks.shape, v.shape)},
                           softmax_of={"p": "s"} if compiled else None)
            a_masked, b_masked, secret = scheme.protect_matmul(q, k_t, "s")
            c = blocks.scores(a_masked, b_masked)
            if fused:
                sent.append(scheme.softmax_hop(c, secret, v, "p", blocks, bias, attention_mask))
                continue
            scores = scheme.recover_matmul(c, secret, blocks.scores)
            order = scheme.scores_order("s")
            probs = blocks.softmax(scores, bias) if order is None else softmax_in_order(scores, *order, attention_mask)
            sent.append(scheme.protect_matmul(probs, v, "p"))
        (a, b, secret), (fused_a, fused_b, fused_secret) = sent
        assert torch.equal(a, fused_a) and torch.equal(b, fused_b)
        if scheme_cls is Otp:  # the probabilities and pads that recovery takes
            assert all(torch.equal(x, y) for x, y in zip(secret, fused_secret))
    finally:
        kernels.select(False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("padded", [False, True, "empty"], ids=["unpadded", "padded", "empty"])
@pytest.mark.parametrize("n", [9, 150])
def test_ours_softmax_hop_in_one_pass_is_its_steps(dtype, padded, n):
    """ours' softmax hop in one pass (`native.ours_softmax_hop`, C++: float32 throughout, rounded once) sends the
    GPU what its steps would: the probabilities under P·V's masks within rounding, with a zero exactly where the
    steps' have one (every later and padding key); v's operand within rounding (`native.permute_scales`' job, in the
    same call), and the secret the very same. Rows of 9 keys are permuted in registers, rows of 150 by gathers of
    the visible keys alone; a sequence all padding ("empty") has rows with no visible key, whose weights are even."""
    from splitinfer.tee_ops import CausalBlocks, key_positions
    heads, groups, k = 4, 2, 5
    second = {False: [1] * n, True: [1] * 6 + [0] * (n - 6), "empty": [0] * n}[padded]
    attention_mask = torch.tensor([[1] * n, second])
    padded = padded is not False
    blocks = CausalBlocks.of(2, heads, n, split=False, padded=padded)
    # scores of a few units, so that no visible key's weight underflows float16 (only hidden keys weigh 0)
    q, k_t, v = ((torch.randn(shape) / 2).to(dtype) for shape in ((2, heads, n, k), (2, groups, k, n), (2, groups, n, k)))
    scheme = Matrix(seed=3)
    scheme.prepare({}, {"s": (q.shape, k_t.shape), "p": (blocks.shape, v.shape)}, dtype=dtype, softmax_of={"p": "s"})
    a_masked, b_masked, (m, _, kept_order) = scheme.protect_matmul(q, k_t, "s")
    assert kept_order
    c5 = blocks.scores(a_masked, b_masked).view(2, groups, heads // groups, n, n)
    positions = key_positions(m["keys_at"], attention_mask, blocks.padded)
    a, b, secret = scheme._softmax_steps(c5.clone(), m, positions, v, "p")
    one_a, one_b, one_secret = scheme._softmax_one_pass(c5.clone(), m, positions, v, "p")
    assert one_a.shape == a.shape and one_a.dtype == dtype
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(one_a, a, rtol=tolerance, atol=tolerance * a.abs().max().item())
    assert torch.equal(one_a == 0, a == 0) and (a == 0).sum() >= (2 if second[0] else 1) * heads * n * (n - 1) // 2
    torch.testing.assert_close(one_b, b, rtol=tolerance, atol=0)
    assert one_secret[0] is secret[0] and one_secret[1:] == secret[1:]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("k", [8, 40, 100, 136])
def test_ours_matmul_masks_in_one_call_are_their_steps(dtype, k):
    """ours' masks on a matmul's operands in one C++ call (`native.permute_scales`) give what the steps give:
    q as the engine has it (a view of the rotated heads), kᵀ a transposed view, the probabilities and v a strided
    one, for two sequences: every value in the same place, within one rounding. Head widths up to 128 are permuted
    in registers (in two, four or eight of them, a tail past a whole 16 here), wider ones by vector gathers."""
    from splitinfer import kernels
    from splitinfer.schemes import _permute_scale
    torch.manual_seed(k)
    heads, groups, n = 4, 2, 9
    rotated = torch.randn(2, heads + groups, n, k).to(dtype)
    q, k_t = rotated[:, :heads], rotated[:, heads:].transpose(-1, -2)
    probs, v = torch.rand(2, heads, n, n).to(dtype), torch.randn(2, groups, 3 * n, k).to(dtype)[:, :, ::3]
    scheme = Matrix(seed=4)
    scheme.prepare({}, {"s": (q.shape, k_t.shape), "p": (probs.shape, v.shape)}, dtype=dtype)
    # a float16 product below its normal range is one 2⁻²⁴ step from the steps' at most (they round twice)
    rtol, atol = {torch.float32: (1e-6, 0.0), torch.float16: (1e-3, 2.0 ** -24)}[dtype]
    for name, a, b in (("s", q, k_t), ("p", probs, v)):
        steps = _permute_scale(kernels.as_chosen, a, b, *scheme._permute_args(name, dtype))
        one_call = scheme._permuted(a, b, name)
        for got, want in zip(one_call, steps):
            assert got.shape == want.shape and got.dtype == dtype
            torch.testing.assert_close(got, want, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("op_name", ["gated", "sum_and_norm"])
def test_ours_linear_hop_in_one_call_is_its_steps(dtype, op_name):
    """ours' hop between two linears in one C++ call (`native.ours_linear_hop`: float32 throughout) gives what its
    steps give (`_unmix_op_mix`): the next linear's masked input, the mask's row scales and what the op keeps,
    within rounding, for two sequences under rank-2 masks, across more rows than one thread's run."""
    from splitinfer import kernels
    from splitinfer.kernels import fused
    from splitinfer.schemes import _rows_of, _unmix_op_mix
    from splitinfer.tee_ops import RmsNorm, gated, sum_and_norm
    n, d, inner = 13, 16, 24
    gate_up = op_name == "gated"
    op = gated if gate_up else sum_and_norm
    width_in, width_out, next_width = (d, 2 * inner, inner) if gate_up else (d, d, d)
    scheme = Matrix(seed=5, rank=2)
    scheme.prepare({"before": (2, n, width_in), "after": (2, n, next_width)}, {}, dtype=dtype)
    secret = scheme.protect_linear(torch.randn(2, n, width_in).to(dtype), "before")[1]
    mask, _, scale, rows = secret
    z = (torch.randn(2, n, width_out) * 3).to(dtype)
    norm = RmsNorm.of(torch.rand(d) + 0.5, 1e-5)
    op_args = () if gate_up else (torch.randn(2, n, d).to(dtype), norm.scaled, norm.eps_d)
    mix_args = scheme._mix_args("after", next_width, dtype)
    kept, mixed, next_scale = fused(_unmix_op_mix, op)(_rows_of(z.clone(), scale), mask["woodbury_rows"], mask["a"],
                                                       scale, rows, None, op_args, *mix_args)  # overwrites z
    mixed = mixed.clone()  # the one call writes the same buffer where there is one
    one_kept, one_mixed, one_scale = scheme._linear_hop_one_pass(_rows_of(z, scale), mask, scale, op, op_args,
                                                                 mix_args)
    assert one_mixed.shape == mixed.shape and one_mixed.dtype == dtype
    tolerance = {torch.float32: 1e-5, torch.float16: 4e-3}[dtype]
    torch.testing.assert_close(one_mixed, mixed, rtol=tolerance, atol=tolerance * mixed.abs().max().item())
    torch.testing.assert_close(one_scale, next_scale, rtol=tolerance, atol=0)
    if gate_up:
        assert kept is None and one_kept is None
    else:
        torch.testing.assert_close(one_kept, kept, rtol=tolerance, atol=tolerance * kept.abs().max().item())
    assert not kernels.on()  # the steps ran eager


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ours_attend_hop_in_one_call_is_its_steps(dtype):
    """ours' hop from P·V to the o projection in one C++ call (`native.ours_attend_hop`: float32 throughout) gives
    what its steps give (`_unpermute_op_mix` with the heads merged): o's masked input and its mask's row scales,
    within rounding, for two sequences, under GQA."""
    from splitinfer.kernels import fused
    from splitinfer.schemes import _unpermute_op_mix
    from splitinfer.tee_ops import merged
    heads, groups, n, h = 4, 2, 11, 8
    probs, v = torch.rand(2, heads, n, n).to(dtype), torch.randn(2, groups, n, h).to(dtype)
    scheme = Matrix(seed=6, rank=2)
    scheme.prepare({"o": (2, n, heads * h)}, {"p": (probs.shape, v.shape)}, dtype=dtype)
    a, b, secret = scheme.protect_matmul(probs, v, "p")
    c = (a.float() @ b.float().repeat_interleave(heads // groups, dim=1)).to(dtype)  # the GPU's answer
    m = secret[0]
    mix_args = scheme._mix_args("o", heads * h, dtype)
    _, mixed, scale = fused(_unpermute_op_mix, merged)(c.clone(), m["d1"], m["d3"], m["rows_p1_inverse"], m["cols_c"],
                                                       (), *mix_args)  # overwrites c
    mixed = mixed.clone()
    kept, one_mixed, one_scale = scheme._attend_hop_one_pass(c, m, mix_args)
    assert kept is None and one_mixed.shape == mixed.shape == (2, n, heads * h) and one_mixed.dtype == dtype
    tolerance = {torch.float32: 1e-5, torch.float16: 4e-3}[dtype]
    torch.testing.assert_close(one_mixed, mixed, rtol=tolerance, atol=tolerance * mixed.abs().max().item())
    torch.testing.assert_close(one_scale, scale, rtol=tolerance, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("h", [8, 32])
def test_ours_rope_hop_in_cpp_is_its_steps(dtype, h):
    """ours' RoPE hop in `native`'s kernels (the recovery, RoPE and the operands' masks in one call,
    `native.ours_unmix_rope`) gives what its one TEE kernel gives (`_unmix_op_permute`): v, and the scores' two masked
    operands, within rounding, for two sequences under GQA and a rank-2 mask; heads of 32 are rotated in registers."""
    from splitinfer import kernels
    from splitinfer.kernels import fused
    from splitinfer.schemes import _rows_of, _unmix_op_permute
    from splitinfer.tee_ops import rotated_heads
    heads, groups, n = 4, 2, 10
    width = (heads + 2 * groups) * h
    scheme = Matrix(seed=7, rank=2)
    scheme.prepare({"qkv": (2, n, 16)}, {"s": ((2, heads, n, h), (2, groups, h, n))}, dtype=dtype)
    secret = scheme.protect_linear(torch.randn(2, n, 16).to(dtype), "qkv")[1]
    mask, _, scale, rows = secret
    z = (torch.randn(2, n, width) * 2).to(dtype)
    cos, sin = torch.rand(n, h).to(dtype), torch.rand(n, h).to(dtype)

    def rope_args():
        return cos, sin, heads, torch.empty(2, heads + groups, n, h, dtype=dtype)

    steps = fused(_unmix_op_permute, rotated_heads)(_rows_of(z.clone(), scale), mask["woodbury_rows"], mask["a"], scale,
                                                    rows, None, rope_args(), *scheme._permute_args("s", dtype))
    steps = [t.clone() for t in steps]  # the one call writes the same operand buffers
    one = scheme._rope_hop_one_pass(z, secret, None, rotated_heads, rope_args(), "s")
    tolerance = {torch.float32: 1e-5, torch.float16: 4e-3}[dtype]
    for got, want in zip(one, steps):
        assert got.shape == want.shape and got.dtype == dtype
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance * want.abs().max().item())
    assert not kernels.on()  # the steps ran eager


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_otp_sum_rounded_in_one_call_is_its_steps(dtype):
    """otp's answer plus its float32 cross terms, rounded once in C++ (`native.add_cross_terms`), is the in-place sum
    rounded, bit for bit, over a size that is no whole number of the kernel's chunks."""
    from splitinfer import native
    torch.manual_seed(9)
    cross, c = torch.randn(3 * 1000 + 7) * 100, (torch.randn(3 * 1000 + 7) * 100).to(dtype)
    want = cross.clone().add_(c).to(dtype)
    assert torch.equal(native.add_cross_terms(cross, c, torch.empty_like(c)), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("op_name", ["gated", "sum_and_norm"])
def test_otp_linear_hop_in_one_call_is_its_steps(dtype, op_name):
    """otp's hop between two linears in one C++ call (`native.otp_linear_hop`) gives what its steps give
    (`_add_op_pad`): the next linear's padded input, its row scales and what the op keeps, within rounding, for two
    sequences across more rows than one thread's share; and the pad it subtracts is the one its scales and noise make,
    so that the next recovery adds back what was taken."""
    from splitinfer import kernels, native
    from splitinfer.kernels import fused
    from splitinfer.schemes import _add_op_pad
    from splitinfer.tee_ops import RmsNorm, gated, sum_and_norm
    n, d, inner = 13, 40, 264  # widths off the C++ chunks' 8 and 256
    gate_up = op_name == "gated"
    op = gated if gate_up else sum_and_norm
    width, next_width = (2 * inner, inner) if gate_up else (d, d)
    generator = torch.Generator().manual_seed(3)
    draw = lambda *shape, scale=1.0: (torch.randn(*shape, generator=generator) * scale).to(dtype)  # noqa: E731
    z, projected, sigma = draw(2, n, width, scale=3.0), draw(2, n, width), draw(2, n, 1).abs() + 0.25
    noise = draw(2, n, next_width)
    norm = RmsNorm.of(torch.rand(d, generator=generator) + 0.5, 1e-5)
    op_args = () if gate_up else (draw(2, n, d), norm.scaled, norm.eps_d)
    kept, masked, next_sigma = fused(_add_op_pad, op)(z, sigma, projected, None, op_args, noise, 1.5, None)
    one_kept = None if gate_up else torch.empty_like(z)
    one_masked = torch.empty_like(noise)
    one_sigma = native.otp_linear_hop(z, sigma, projected, None if gate_up else op_args, noise, 1.5, one_masked,
                                      one_kept)
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    assert one_masked.dtype == one_sigma.dtype == dtype and one_sigma.shape == (2, n, 1)
    torch.testing.assert_close(one_sigma, next_sigma, rtol=tolerance, atol=0)
    torch.testing.assert_close(one_masked, masked, rtol=tolerance, atol=tolerance * masked.abs().max().item())
    if gate_up:
        assert kept is None
    else:
        torch.testing.assert_close(one_kept, kept, rtol=tolerance, atol=tolerance * kept.abs().max().item())
    # what crossed plus the pad its scales and noise make is the op's result, as the steps make it
    h = (masked.float() + next_sigma.float() * noise.float())
    unpadded = one_masked.float() + one_sigma.float() * noise.float()
    torch.testing.assert_close(unpadded, h, rtol=4 * tolerance, atol=4 * tolerance * h.abs().max().item())
    assert not kernels.on()  # the steps ran eager


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_otp_rope_hop_in_one_call_is_its_steps(dtype):
    """otp's hop from the qkv projection to the scores in one C++ call (`native.otp_rope_hop`) gives what its steps
    give (`_add_op_pad_both` with `rotated_heads`): v, q and kᵀ padded, q and both pads, within rounding, for two
    sequences under GQA, across more rows than one thread's share; each operand less its pad is what crossed, and
    the scores recovered from what crossed are q·kᵀ."""
    from splitinfer import kernels, native
    from splitinfer.kernels import fused
    from splitinfer.schemes import _add_op_pad_both
    from splitinfer.tee_ops import rotated_heads
    heads, groups, n, h = 4, 2, 37, 8
    width = (heads + 2 * groups) * h
    generator = torch.Generator().manual_seed(11)
    draw = lambda *shape, scale=1.0: (torch.randn(*shape, generator=generator) * scale).to(dtype)  # noqa: E731
    z, projected, sigma = draw(2, n, width, scale=2.0), draw(2, n, width), draw(2, n, 1).abs() + 0.25
    cos, sin = torch.rand(n, h, generator=generator).to(dtype), torch.rand(n, h, generator=generator).to(dtype)
    noise_a, noise_b = draw(2, heads, n, h), draw(2, groups, h, n)

    def args():  # where RoPE and the pads write: fresh for each form
        return ((cos, sin, heads, torch.empty(2, heads + groups, n, h, dtype=dtype)), noise_a, noise_b, 1.5,
                torch.empty(noise_a.shape, dtype=dtype), torch.empty(noise_b.shape, dtype=dtype))

    rope_args, *pad_args = args()
    steps = fused(_add_op_pad_both, rotated_heads, exact=True)(z, sigma, projected, None, rope_args, *pad_args)
    rope_args, *pad_args = args()
    one = native.otp_rope_hop(z, sigma, projected, *rope_args, *pad_args)
    tolerance = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    for got, want in zip(one, steps):
        assert got.shape == want.shape and got.dtype == dtype
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance * want.abs().max().item())
    v, masked_a, masked_b, a, pad_a, pad_b = one
    b = rope_args[-1][:, heads:].transpose(-1, -2)
    torch.testing.assert_close((masked_a.float() + pad_a.float()), a.float(), rtol=0, atol=tolerance * 4)
    torch.testing.assert_close((masked_b.float() + pad_b.float()), b.float(), rtol=0, atol=tolerance * 4)
    scores = grouped_matmul(masked_a.float(), masked_b.float())  # what the GPU computes
    recovered = Otp().recover_matmul(scores.to(dtype), (a, pad_a, pad_b, masked_b))
    want = grouped_matmul(a.float(), b.float())
    torch.testing.assert_close(recovered.float(), want, rtol=0, atol=8 * tolerance * want.abs().max().item())
    assert not kernels.on()  # the steps ran eager


# ours' steps that set-up may run as `native`'s C++ kernels, as `kernels.chosen` names them
OURS_CPP_STEPS = (schemes.SOFTMAX_HOP, schemes.PROTECT_MATMUL, schemes.ROPE_HOP, schemes.ATTEND_HOP,
                  *(f"{schemes.LINEAR_HOP}_{op}" for op in ("gated", "sum_and_norm")))


def run_cpp_forms(form: str = "one_pass") -> None:
    """Every step that set-up timed a C++ form of runs `form` (the C++ form on torch's threads, or on one:
    `native.ONE_PASS_ONE_THREAD`) from now on, whatever it picked."""
    from splitinfer import kernels, native
    for times in kernels.picks.values():
        if f"{native.ONE_PASS}_ms" in times:
            times["runs"] = form


def test_ours_runs_its_steps_where_its_kernels_cannot_be_built(tiny_models, monkeypatch, capsys):
    """Where the C++ kernels fail to build (no compiler, say), set-up leaves their form of ours' steps out (the
    softmax hop, the matmul operands' masks, the RoPE hop, the hops between two linears and from P·V), with a
    warning, the JSON's list of failed kernels says why, and the inference runs the steps, giving transformers'
    logits."""
    from splitinfer import kernels, native
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(cpp_extension, "load_inline", no_compiler)
    monkeypatch.setattr(native, "_built", functools.cache(native._built.__wrapped__))  # a fresh try
    monkeypatch.setattr(kernels, "failed", {})
    monkeypatch.setattr(kernels, "picks", {})
    model = load_model(tiny_models["gqa-tied"], torch.float32, CPU)
    ids, mask = build_batch(model.tokenizer, ["No compiler for the one pass."], 8, 1, False)
    try:
        engine = SplitLlama(model.config, model.state_dict, make_scheme("matrix", seed=1), CPU, torch.float32,
                            compiled=True, fuse_hops=True)
        engine.warm_kernels(*ids.shape)
        logits = engine.timed_forward(ids, mask)[0]
    finally:
        kernels.select(False)
    assert kernels.failed == {native.NAME: "Ninja is required to load C++ extensions"}
    assert f"{native.ONE_PASS} form is left out: {native.NAME} could not be built" in capsys.readouterr().err
    picked = {k: v for k, v in kernels.chosen().items() if k.startswith(OURS_CPP_STEPS)}
    assert {k.split()[0] for k in picked} == set(OURS_CPP_STEPS)
    assert all(v["runs"] == schemes.STEPS and f"{native.ONE_PASS}_ms" not in v for v in picked.values())
    assert compare(logits, reference_logits(model.config, model.state_dict, ids, mask))["rel_logit_error"] < 1e-4


@pytest.mark.parametrize("threads, mode", [(2, "compiled"), (1, "compiled"), (2, "cpp")])
def test_ours_runs_its_cpp_kernels_where_set_up_picks_them(tiny_models, monkeypatch, threads, mode):
    """Set-up times both forms of each of ours' steps that a C++ kernel takes (every hop of a layer, the matmul
    operands' masks), the C++ form on torch's two threads and on one, and an inference with every one of those
    kernels in force on either count gives transformers' logits, for two sequences, one padded; beside compiled
    kernels and beside eager ones (`cpp`)."""
    from splitinfer import kernels, native
    monkeypatch.setattr(kernels, "picks", {})
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    # the shapes of the compiled engines' test of protected operands (`test_engine.py`): fewer builds. A model
    # without biases: with them, the C++ hops are not offered
    model = load_model(tiny_models["gqa-tied"], torch.float32, CPU)
    ids, mask = build_batch(model.tokenizer, ["Every kernel in C++.", "And a longer second prompt, padded."], 10, 2,
                            True)
    try:
        engine = SplitLlama(model.config, model.state_dict, make_scheme("matrix", seed=1), CPU, torch.float32,
                            fuse_hops=True, **{mode: True})
        engine.warm_kernels(*ids.shape)
        picked = {k: v for k, v in kernels.chosen().items() if k.startswith(OURS_CPP_STEPS)}
        assert {k.split()[0] for k in picked} == set(OURS_CPP_STEPS)
        assert all(v[f"{native.ONE_PASS}_ms"] > 0 and v[f"{schemes.STEPS}_ms"] > 0
                   and v[f"{native.ONE_PASS_ONE_THREAD}_ms"] > 0 for v in picked.values())
        run_cpp_forms(native.ONE_PASS if threads == 2 else native.ONE_PASS_ONE_THREAD)
        counts, on_one_thread = [], kernels.on_one_thread
        monkeypatch.setattr(kernels, "on_one_thread",  # a C++ call on one thread takes no arguments, an eager op some
                            lambda fn, args: (args or counts.append(fn), on_one_thread(fn, args))[1])
        logits = engine.timed_forward(ids, mask)[0]
    finally:
        kernels.select(False)
        torch.set_num_threads(torch_threads)
    assert len(counts) == 0 if threads == 2 else len(counts) >= len(picked)
    assert compare(logits, reference_logits(model.config, model.state_dict, ids, mask))["rel_logit_error"] < 1e-4


# otp's steps that set-up may run as `native`'s C++ kernels, as `kernels.chosen` names them
OTP_CPP_STEPS = {schemes.OTP_ROPE_HOP, schemes.ADD_CROSS_TERMS,
                 *(f"{schemes.OTP_LINEAR_HOP}_{op}" for op in ("gated", "sum_and_norm"))}


@pytest.mark.parametrize("mode, dtype", [("compiled", torch.float32), ("cpp", torch.float32), ("cpp", torch.float16)])
def test_otp_runs_its_cpp_hops_where_set_up_picks_them(tiny_models, monkeypatch, mode, dtype):
    """Set-up times otp's hops between two linears (SiLU's, and the residual sum's RMSNorm) and from the qkv
    projection to the scores, and the scores' sum with their cross terms, as one C++ call each against their steps,
    beside compiled kernels and beside eager ones (`cpp`), and an inference with those calls in force (five a layer
    but the first layer's first, four where the scores' cross terms run as integer products) gives transformers'
    logits, for two sequences, one padded."""
    from splitinfer import kernels, native
    monkeypatch.setattr(kernels, "picks", {})
    model = load_model(tiny_models["gqa-tied"], dtype, CPU)  # the shapes of ours' test above
    ids, mask = build_batch(model.tokenizer, ["otp's hops in C++.", "And a longer second prompt, padded."], 10, 2,
                            True)
    calls = []

    def counted(fn):  # each call named by its hop: the RoPE hop's, SiLU's, a norm's (`norm` given), the scores' sum
        name = {native.otp_rope_hop: "rope", native.add_cross_terms: "cross"}.get(fn)

        def call(*args):
            calls.append(name or ("gated" if args[3] is None else "norm"))
            return fn(*args)
        return call

    for fn in (native.otp_linear_hop, native.otp_rope_hop, native.add_cross_terms):
        monkeypatch.setattr(native, fn.__name__, counted(fn))
    try:
        engine = SplitLlama(model.config, model.state_dict, make_scheme("otp", seed=1), CPU, dtype, fuse_hops=True,
                            **{mode: True})
        engine.warm_kernels(*ids.shape)
        picked = {k.split()[0]: v for k, v in kernels.chosen().items() if k.startswith("otp_")}
        assert set(picked) - {schemes.SCORES_CROSS} == OTP_CPP_STEPS
        assert all(v[f"{native.ONE_PASS}_ms"] > 0 and v[f"{schemes.STEPS}_ms"] > 0
                   for k, v in picked.items() if k in OTP_CPP_STEPS)
        run_cpp_forms()
        calls.clear()
        logits = engine.timed_forward(ids, mask)[0]
    finally:
        kernels.select(False)
    layers = model.config.num_hidden_layers
    cross = [k for k in kernels.picks if k[0] == schemes.SCORES_CROSS]  # in half precision: the form picked
    summed = not cross or kernels.picks[cross[0]]["runs"] == schemes.FLOAT32
    assert sorted(calls) == sorted(["norm"] * (2 * layers - 1) + ["gated", "rope"] * layers + ["cross"] * layers * summed)
    float32 = model if dtype == torch.float32 else load_model(tiny_models["gqa-tied"], torch.float32, CPU)
    reference = reference_logits(float32.config, float32.state_dict, ids, mask)
    assert compare(logits, reference)["rel_logit_error"] < (1e-4 if dtype == torch.float32 else 2e-2)


# the plain split's steps with a C++ form (and the TEE-only runner's)
PLAIN_CPP_STEPS = {tee_ops.RMS_NORM, tee_ops.RESIDUAL_RMS_NORM, tee_ops.SILU_GATE, tee_ops.ROPE, tee_ops.SOFTMAX_BLOCKS}


def counted_plain_cpp_calls(monkeypatch) -> list[str]:
    """The names of the plain split's C++ kernels (`native.rms_norm`, `silu_gate`, `rope`, `softmax_blocks`), one a
    call, in a list that fills as they run."""
    from splitinfer import native
    calls = []
    for name in ("rms_norm", "silu_gate", "rope", "softmax_blocks"):
        monkeypatch.setattr(native, name, functools.partial(lambda fn, name, *a: (calls.append(name), fn(*a))[1],
                                                            getattr(native, name), name))
    return calls


def plain_cpp_calls(layers: int) -> list[str]:
    """The C++ calls (sorted) of one inference of `layers` layers with every C++ form in force: two RMSNorms a layer
    and the final one, and SiLU·up, RoPE and the softmax a layer."""
    return sorted(["rms_norm"] * (2 * layers + 1) + ["silu_gate", "rope", "softmax_blocks"] * layers)


@pytest.mark.parametrize("mode", ["compiled", "cpp"])
def test_the_plain_split_runs_its_cpp_kernels_where_set_up_picks_them(tiny_models, monkeypatch, mode):
    """Set-up times the C++ form of the plain split's TEE ops (RMSNorm with the residual add and without, SiLU·up,
    RoPE, the causal blocks' softmax) against their TEE kernels, compiled or eager (`cpp`: no kernel compiled), and
    an inference with every C++ form in force gives transformers' logits, for two sequences, one padded, with GQA
    and a head_dim of its own."""
    from splitinfer import kernels, native
    monkeypatch.setattr(kernels, "picks", {})
    model = load_model(tiny_models["gqa-head-dim"], torch.float32, CPU)
    ids, mask = build_batch(model.tokenizer, ["The plain split in C++.", "And a longer second prompt, padded."], 12,
                            2, True)
    calls = counted_plain_cpp_calls(monkeypatch)
    try:
        engine = SplitLlama(model.config, model.state_dict, make_scheme("plain"), CPU, torch.float32, **{mode: True})
        builds = kernels.builds()
        engine.warm_kernels(*ids.shape)
        assert (kernels.builds() == builds and not kernels.on()) is (mode == "cpp")  # cpp: inductor built nothing
        steps = {k.split()[0] for k, v in kernels.chosen().items() if f"{native.ONE_PASS}_ms" in v}
        assert steps == PLAIN_CPP_STEPS
        run_cpp_forms()
        calls.clear()
        logits = engine.timed_forward(ids, mask)[0]
    finally:
        kernels.select(False)
    assert sorted(calls) == plain_cpp_calls(model.config.num_hidden_layers)
    assert compare(logits, reference_logits(model.config, model.state_dict, ids, mask))["rel_logit_error"] < 1e-4


def test_the_tee_only_runner_runs_its_cpp_kernels_in_bfloat16(tiny_models, monkeypatch):
    """The TEE-only runner beside a GPU runs in bfloat16: with the C++ kernels beside eager ones (`cpp`, its default),
    set-up times their bfloat16 form of its RMSNorms, SiLU·up, RoPE and the causal blocks' softmax, and an inference
    with every one of them in force gives transformers' float32 logits within bfloat16's error, and the eager ops'
    logits within a few of its rounding steps, for two sequences, one padded."""
    from splitinfer import kernels, native
    monkeypatch.setattr(kernels, "picks", {})
    model = load_model(tiny_models["gqa-head-dim"], torch.bfloat16, CPU)
    ids, mask = build_batch(model.tokenizer, ["The TEE alone, in bfloat16.", "And a second prompt, padded."], 12, 2,
                            True)
    calls = counted_plain_cpp_calls(monkeypatch)
    logits = {}
    try:
        for cpp in (False, True):
            engine = SplitLlama(model.config, model.state_dict, make_scheme("plain"), CPU, torch.bfloat16,
                                tee_only=True, attention=CAUSAL_BLOCKS, cpp=cpp)
            engine.warm_kernels(*ids.shape)
            if cpp:
                steps = {k.split()[0] for k, v in kernels.chosen().items()
                         if f"{native.ONE_PASS}_ms" in v and k.endswith("bfloat16")}
                assert steps == PLAIN_CPP_STEPS
                run_cpp_forms()
            calls.clear()
            logits[cpp] = engine.timed_forward(ids, mask)[0]
    finally:
        kernels.select(False)
    assert sorted(calls) == plain_cpp_calls(model.config.num_hidden_layers)
    float32 = load_model(tiny_models["gqa-head-dim"], torch.float32, CPU)
    reference = reference_logits(float32.config, float32.state_dict, ids, mask)
    # on this model both read 0.011 against transformers, 0.006 apart
    assert compare(logits[True], reference)["rel_logit_error"] < 2e-2
    assert compare(logits[True], logits[False])["rel_logit_error"] < 1.5e-2


def test_an_engine_without_cpp_kernels_runs_none(tiny_models, monkeypatch):
    """`SplitLlama(native_kernels=False)` runs every step in its other form, whatever set-up picked (here the C++
    form everywhere), giving transformers' logits; set-up's picks and the kernels' offer are as they were after."""
    from splitinfer import kernels, native
    monkeypatch.setattr(kernels, "picks", {})
    model = load_model(tiny_models["gqa-tied"], torch.float32, CPU)
    ids, mask = build_batch(model.tokenizer, ["Without the C++ kernels."], 8, 1, False)
    try:
        engine = SplitLlama(model.config, model.state_dict, make_scheme("matrix", seed=1), CPU, torch.float32,
                            compiled=True, fuse_hops=True, native_kernels=False)
        engine.warm_kernels(*ids.shape)
        run_cpp_forms()
        picks = {k: dict(v) for k, v in kernels.picks.items()}

        def no_kernels():
            raise AssertionError("a C++ kernel ran")

        monkeypatch.setattr(native, "_module", no_kernels)
        logits = engine.timed_forward(ids, mask)[0]
        assert native.offered(torch.zeros(1)) and kernels.picks == picks
    finally:
        kernels.select(False)
    assert compare(logits, reference_logits(model.config, model.state_dict, ids, mask))["rel_logit_error"] < 1e-4


@pytest.mark.parametrize("scheme_cls", [Matrix, Otp])
@pytest.mark.parametrize("bias, dtype, compiled", [(False, torch.float32, False), (True, torch.float32, False),
                                                   (True, torch.float16, True)],
                         ids=["eager", "eager-bias", "compiled-float16-bias"])
def test_rope_hop_is_the_steps(scheme_cls, bias, dtype, compiled):
    """The fused hop from the qkv projection to the scores (`rope_hop`: recover qkv and add its bias, RoPE on q and
    k, protect q and kᵀ) sends the GPU the operands the steps would, keeps the secret they would, and hands back v
    as they do: eager the very values, compiled (one kernel, `kernels.fused`) within rounding; in either form laid
    out as the steps lay them out, so that the kernels after it find the layouts set-up built them for."""
    from splitinfer import kernels
    from splitinfer.tee_ops import apply_rope, rotated_heads, split_heads
    kernels.select(compiled, chosen=False)
    try:
        batch, n, d, heads, groups, h = 2, 7, 24, 4, 2, 6
        width = (heads + 2 * groups) * h
        weight = torch.randn(width, d, generator=torch.Generator().manual_seed(1)).to(dtype)
        x = torch.randn(batch, n, d).to(dtype)
        qkv_bias = torch.randn(width).to(dtype) if bias else None
        cos, sin = torch.rand(n, h).to(dtype), torch.rand(n, h).to(dtype)
        sent = []
        for fused in (False, True):
            scheme = scheme_cls(seed=3)
            scheme.prepare({"qkv": (batch, n, d)}, {"s": ((batch, heads, n, h), (batch, groups, h, n))},
                           weights=lambda name: weight, dtype=dtype)
            masked, secret = scheme.protect_linear(x, "qkv")
            z = (masked.float() @ weight.float().T).to(dtype)
            if fused:
                rotated = torch.empty(batch, heads + groups, n, h, dtype=dtype)
                sent.append(scheme.rope_hop(z, secret, qkv_bias, rotated_heads, (cos, sin, heads, rotated), "s"))
                continue
            y = scheme.recover_linear(z, secret)
            per_head = split_heads(y if qkv_bias is None else y + qkv_bias, h)
            rotated = apply_rope(per_head[:, : heads + groups], cos, sin)
            sent.append((per_head[:, heads + groups:],
                         *scheme.protect_matmul(rotated[:, :heads], rotated[:, heads:].transpose(-1, -2), "s")))
        kept = [t for t in sent[0] if isinstance(t, torch.Tensor)], [t for t in sent[1] if isinstance(t, torch.Tensor)]
        secrets = [s[-1] for s in sent] if scheme_cls is Otp else [(), ()]  # otp's: q and the pads recovery takes
        for steps, hop in zip([*kept[0], *secrets[0]], [*kept[1], *secrets[1]]):
            assert steps.shape == hop.shape and steps.stride() == hop.stride() and steps.dtype == hop.dtype
            if compiled:
                torch.testing.assert_close(hop, steps, atol=1e-2 if dtype == torch.float16 else 1e-5, rtol=1e-2)
            else:
                assert torch.equal(hop, steps)
        assert "unmix_op_permute_rotated_heads" not in kernels.failed
        assert "add_op_pad_both_rotated_heads" not in kernels.failed
    finally:
        kernels.select(False)


@pytest.mark.parametrize("scheme_cls", [Matrix, Otp])
@pytest.mark.parametrize("dtype, compiled", [(torch.float32, False), (torch.float16, True)],
                         ids=["eager", "compiled-float16"])
def test_attend_hop_is_the_steps(scheme_cls, dtype, compiled):
    """The fused hop from P·V to the o projection (`attend_hop`: recover P·V from its causal blocks, merge the
    heads, protect o's input) sends the GPU the input the steps would and keeps the secret they would: eager the
    very values, compiled (one kernel, `kernels.fused`) within rounding, laid out alike."""
    from splitinfer import kernels
    from splitinfer.tee_ops import CausalBlocks, merge_heads, merged
    kernels.select(compiled, chosen=False)
    try:
        batch, heads, groups, n, h = 2, 4, 2, 9, 5
        blocks = CausalBlocks.of(batch, heads, n, split=scheme_cls.causal_blocks, padded=False, rows=4)
        probs, v = torch.rand(blocks.shape).to(dtype), torch.randn(batch, groups, n, h).to(dtype)
        weight = torch.randn(6, heads * h).to(dtype)
        sent = []
        for fused in (False, True):
            scheme = scheme_cls(seed=3)
            scheme.prepare({"o": (batch, n, heads * h)}, {"p": (blocks.shape, v.shape)},
                           weights=lambda name: weight, dtype=dtype)
            a, b, secret = scheme.protect_matmul(probs, v, "p")
            c = blocks.attend(a, b)
            sent.append(scheme.attend_hop(c, secret, blocks.attend, merged, (), "o")[1:] if fused else
                        scheme.protect_linear(merge_heads(scheme.recover_matmul(c, secret, blocks.attend)), "o"))
        (steps, steps_secret), (hop, hop_secret) = sent
        pairs = [(steps, hop)] + [(x, y) for x, y in zip(steps_secret, hop_secret) if isinstance(x, torch.Tensor)]
        pairs += [(steps_secret[2], hop_secret[2])] if scheme_cls is Matrix else []  # ours' scale D diag(1/r)
        for x, y in pairs:
            assert x.shape == y.shape and x.stride() == y.stride() and x.dtype == y.dtype
            if compiled:
                torch.testing.assert_close(y, x, atol=1e-2 if dtype == torch.float16 else 1e-5, rtol=1e-2)
            else:
                assert torch.equal(y, x)
        assert not {"unpermute_op_mix_merged", "cross_op_pad_merged"} & set(kernels.failed)
    finally:
        kernels.select(False)
