"""The TEE's steps of one decoder layer, timed with eager and with compiled kernels, as the engine runs them in
each mode, the fixed cost of a call at each thread count (`--threads`), the CPU's matrix product rates in
float32, bfloat16 and int8, its memory rates, and on a GPU (`--round-trip-device`) one layer's GPU calls, op
by op and replayed from CUDA graphs, and one hop with its copies made each way they could be (`hop_forms`).
Each step is timed after a busy-wait that stands for the TEE waiting on the GPU (so the CPU's threads are as
idle as they are between hops), median of `--repeat`.

    python -m splitinfer.kernel_bench --preset llama-3.2-1b --lengths 128,512 --out kernel_bench.json

No model is loaded: the steps run on random tensors of the preset's shapes, in float16 by default.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import weakref
from typing import Callable

import torch
import torch.nn.functional as F

from splitinfer import kernels, native
from splitinfer.cli import DTYPES, progress
from splitinfer.engine import attention_operands, keep_freed_memory, layer_hops
from splitinfer.errors import OneLineParser, UserError, one_line_errors
from splitinfer.graphs import CallGraphs, CudaGraphCall
from splitinfer.kernels import WAIT_S, timed
from splitinfer.metrics import synchronize
from splitinfer.models import PRESETS
from splitinfer.perf import parse_counts
from splitinfer.files import write_json
from splitinfer.results import environment_block
from splitinfer.schemes import CROSS_FORMS, FLOAT32, INTEGER_DTYPES, Matrix, Otp, _rows_of
from splitinfer.tee_ops import (CausalBlocks, RmsNorm, apply_rope, attention_bias, grouped_matmul, key_positions,
                                masked_softmax, merge_heads, merged, residual_rms_norm, rms_norm, rotated_heads,
                                silu_gate, softmax_in_order, split_heads)


def layer_steps(preset: str, n: int, dtype: torch.dtype, compiled: bool, repeat: int) -> dict[str, float]:
    """ms per TEE step of one layer at n tokens, batch 1, with the kernels compiled or not."""
    kernels.select(compiled)
    p = PRESETS[preset]
    d, inner, heads, groups = p.hidden_size, p.intermediate_size, p.num_attention_heads, p.num_key_value_heads
    h = d // heads
    linears = {"qkv": (d, (heads + 2 * groups) * h), "o": (heads * h, d), "gate_up": (d, 2 * inner), "down": (inner, d)}
    x, branch, gate_up = (torch.randn(1, n, width).to(dtype) for width in (d, d, 2 * inner))
    inputs = {name: torch.randn(1, n, width_in).to(dtype) for name, (width_in, _) in linears.items()}
    outputs = {name: torch.randn(1, n, width_out).to(dtype) for name, (_, width_out) in linears.items()}
    # views, as the inference has them (since the twelfth round; contiguous before): a transposed kᵀ costs otp's
    # eager pads over three times what a contiguous one does
    q, k_t, v = attention_operands(1, n, heads, groups, h, dtype, make=torch.randn)
    mask = torch.ones(1, n, dtype=torch.long)
    bias = attention_bias(mask, dtype)
    # as the plain split's TEE receives q and k (contiguous on the host), with random positions' tables
    q_and_k = split_heads(torch.randn(1, n, (heads + groups) * h).to(dtype), h)
    cos, sin, rotated = torch.rand(n, h).to(dtype), torch.rand(n, h).to(dtype), torch.empty(q_and_k.shape, dtype=dtype)
    ours = Matrix(seed=1)
    ours.prepare({name: (1, n, width_in) for name, (width_in, _) in linears.items()},
                 {"s": (q.shape, k_t.shape), "p": ((1, heads, n, n), v.shape)}, dtype=dtype,
                 softmax_of={"p": "s"} if compiled else None)  # as `SplitLlama.softmax_of` chooses
    secrets = {name: ours.protect_linear(inputs[name], name)[1] for name in linears}
    a, b, scores_secret = ours.protect_matmul(q, k_t, "s")
    masked_scores = grouped_matmul(a, b)
    scores = ours.recover_matmul(masked_scores.clone(), scores_secret)
    order = ours.scores_order("s")

    def softmax(s: torch.Tensor) -> torch.Tensor:
        return masked_softmax(s, bias) if order is None else softmax_in_order(s, *order, mask, False)

    probs = softmax(scores.clone())
    a, b, attend_secret = ours.protect_matmul(probs, v, "p")
    masked_out = grouped_matmul(a, b)
    norm = RmsNorm.of(torch.rand(d).to(dtype) + 0.5, 1e-5)
    blocks = CausalBlocks.of(1, heads, n, padded=False)  # as the plain split and otp pack an unpadded prompt
    packed = blocks.pack(grouped_matmul(q, k_t)).view(blocks.shape)  # as the engine has them, one block or more
    otp = Otp(seed=1)  # its pads only, without the offline N·Wᵀ: only protect is timed
    otp.linear_pads = {name: (torch.randn(t.shape).to(dtype), outputs[name]) for name, t in inputs.items()}
    otp.matmul_pads = {name: tuple(torch.randn(t.shape).to(dtype) for t in pair)
                       for name, pair in (("s", (q, k_t)), ("p", (packed, v)))}
    otp_secrets = {name: otp.protect_linear(inputs[name], name)[1] for name in linears}
    # otp's matmuls recovered from the GPU's answers, in their causal blocks: the scores' cross terms in each form
    # (`schemes.CROSS_FORMS`; the integer one in half precision only, as set-up offers it), P·V's in float32
    *otp_scores_operands, otp_scores_secret = otp.protect_matmul(q, k_t, "s")
    otp_scores = blocks.scores(*otp_scores_operands)
    *otp_attend_operands, otp_attend_secret = otp.protect_matmul(packed, v, "p")
    otp_attend = blocks.attend(*otp_attend_operands)
    cross_forms = {form: f for form, f in CROSS_FORMS.items() if form == FLOAT32 or dtype in INTEGER_DTYPES}
    # the three hops between two linears (`SplitLlama.fused_hop`): the answer recovered, the TEE op, the next
    # input protected, as three calls (the separate steps) or as one (the fused hop)
    hops = layer_hops(x, norm, norm, layer="")

    def three_hops(scheme, hop_secrets, fused: bool) -> float:
        def separate(z, source, op, args, target):
            recovered = scheme.recover_linear(z, hop_secrets[source])
            return scheme.protect_linear(op(kernels.as_chosen, recovered, *args)[1], target)

        def one_call(z, source, op, args, target):
            return scheme.hop(z, hop_secrets[source], None, op, args, target)

        return sum(timed(lambda z, hop=hop: (one_call if fused else separate)(z, *hop), outputs[hop[0]].clone, repeat)
                   for hop in hops)

    def rope_args() -> tuple:  # as `SplitLlama.rope_args` gives them: a fresh tensor for q and k at each call
        return cos, sin, heads, torch.empty(q_and_k.shape, dtype=dtype)

    # the hop from the qkv projection to the scores (`SplitLlama.rope_hop`): qkv's answer recovered, RoPE on q and k,
    # the scores' operands protected, as the unfused engine's three calls or as one
    def rope_hop(scheme, qkv_secret, fused: bool) -> float:
        def separate(z):
            _, (q_rotated, k_t_rotated) = rotated_heads(kernels.as_chosen, scheme.recover_linear(z, qkv_secret),
                                                        *rope_args())
            return scheme.protect_matmul(q_rotated, k_t_rotated, "s")

        def one_call(z):
            return scheme.rope_hop(z, qkv_secret, None, rotated_heads, rope_args(), "s")

        return timed(one_call if fused else separate, outputs["qkv"].clone, repeat)

    # the hop from P·V to the o projection (`SplitLlama.attend_hop`): P·V's answer recovered, the heads merged, o's
    # input protected, as the unfused engine's two calls (the merge between them) or as one
    def attend_hop(scheme, answer, secret, product, fused: bool) -> float:
        def separate(c):
            return scheme.protect_linear(merge_heads(scheme.recover_matmul(c, secret, product)), "o")

        def one_call(c):
            return scheme.attend_hop(c, secret, product, merged, (), "o")

        return timed(one_call if fused else separate, answer.clone, repeat)

    # the hop between the two attention matmuls (`SplitLlama.softmax_hop`): the scores' answer recovered, its
    # softmax, P·V's operands protected, as the unfused engine's three calls or as one
    whole = CausalBlocks.of(1, heads, n, split=False, padded=False)  # ours' scores are every n² entry

    def softmax_hop(scheme, answer, secret, hop_blocks, fused: bool) -> float:
        def separate(c):
            scores = scheme.recover_matmul(c, secret, hop_blocks.scores)
            order = scheme.scores_order("s")
            probs = (hop_blocks.softmax(scores, bias) if order is None else
                     softmax_in_order(scores, *order, mask, hop_blocks.padded))
            return scheme.protect_matmul(probs, v, "p")

        def one_call(c):
            return scheme.softmax_hop(c, secret, v, "p", hop_blocks, bias, mask)

        return timed(one_call if fused else separate, answer.clone, repeat)

    def otp_hop_args(source, op, args, target) -> tuple:  # as `Otp.hop` gives `_linear_hop_one_pass` them, after z
        return otp_secrets[source], op, args, otp.linear_pads[target][0], None

    def linear_hop_args(z, source, op, args, target) -> tuple:  # as `Matrix.hop` gives `_linear_hop_one_pass` them
        mask, _, scale, _ = secrets[source]
        return _rows_of(z, scale), mask, scale, op, args, ours._mix_args(target, ours.linear_shapes[target][-1], dtype)

    # the softmaxes as `native`'s C++ kernels take them, in one pass (compiled kernels only: they are offered there,
    # ours' where its scores stay in their masks' order, and set-up picks them per shape)
    def one_pass() -> dict[str, float]:
        m = scores_secret[0]
        positions = key_positions(m["keys_at"], mask, whole.padded)
        out = torch.empty_like(packed)
        try:
            return {"plain: 2 x RMSNorm with the residual add (C++)": 2 * timed(
                        lambda _: native.rms_norm(x, branch, norm.scaled, norm.eps_d, torch.empty_like(x)),
                        repeat=repeat),
                    "plain: RoPE on q and k (C++)": timed(lambda _: native.rope(q_and_k, cos, sin, rotated),
                                                          repeat=repeat),
                    "plain: SiLU·up (C++)": timed(lambda _: native.silu_gate(gate_up, torch.empty_like(inputs["down"])),
                                                  repeat=repeat),
                    "plain, otp: softmax of the causal blocks, one pass (C++)": timed(
                        lambda s: native.softmax_blocks(s, bias, out, 1, heads, blocks.starts, blocks.padded), packed.clone,
                        repeat),
                    "ours: softmax hop, one pass (C++)": timed(
                        lambda c: ours._softmax_one_pass(c.view(1, groups, heads // groups, n, n), m, positions, v, "p"),
                        masked_scores.clone, repeat),
                    "ours: both matmuls' masks, C++ permutations": (
                        timed(lambda _: ours._permuted(q, k_t, "s"), repeat=repeat)
                        + timed(lambda c: ours.recover_matmul(c, scores_secret), masked_scores.clone, repeat)
                        + timed(lambda _: ours._permuted(probs, v, "p"), repeat=repeat)
                        + timed(lambda c: ours.recover_matmul(c, attend_secret), masked_out.clone, repeat)),
                    "ours: RoPE hop, C++ kernels": timed(
                        lambda z: ours._rope_hop_one_pass(z, secrets["qkv"], None, rotated_heads, rope_args(), "s"),
                        outputs["qkv"].clone, repeat),
                    "ours: P·V hop, one C++ call": timed(
                        lambda c: ours._attend_hop_one_pass(c, attend_secret[0], ours._mix_args(
                            "o", ours.linear_shapes["o"][-1], dtype)), masked_out.clone, repeat),
                    "ours: 3 hops, one C++ call each": sum(
                        timed(lambda z, hop=hop: ours._linear_hop_one_pass(*linear_hop_args(z, *hop)),
                              outputs[hop[0]].clone, repeat) for hop in hops),
                    "otp: RoPE hop, one C++ call": timed(
                        lambda z: otp._rope_hop_one_pass(z, otp_secrets["qkv"], rope_args(), otp._pad_args("s", dtype)),
                        outputs["qkv"].clone, repeat),
                    "otp: 3 hops, one C++ call each": sum(
                        timed(lambda z, hop=hop: otp._linear_hop_one_pass(z, *otp_hop_args(*hop)), outputs[hop[0]].clone,
                              repeat) for hop in hops)}
        except RuntimeError as e:  # they could not be built here
            print(f"warning: {e}", file=sys.stderr)
            return {}

    return {
        "2 x RMSNorm with the residual add": 2 * timed(lambda _: norm.after(x, branch), repeat=repeat),
        "RoPE on q and k": timed(lambda _: apply_rope(q_and_k, cos, sin, rotated), repeat=repeat),
        "SiLU·up": timed(lambda _: silu_gate(gate_up), repeat=repeat),
        "plain, otp: softmax of the causal blocks": timed(lambda s: blocks.softmax(s, bias), packed.clone, repeat),
        "ours: protect 4 linears": sum(timed(lambda _, k=k: ours.protect_linear(inputs[k], k), repeat=repeat)
                                       for k in linears),
        "ours: recover 4 linears": sum(timed(lambda z, k=k: ours.recover_linear(z, secrets[k]),
                                             lambda k=k: outputs[k].clone(), repeat) for k in linears),
        "ours: both matmuls' masks": (timed(lambda _: ours.protect_matmul(q, k_t, "s"), repeat=repeat)
                                      + timed(lambda c: ours.recover_matmul(c, scores_secret), masked_scores.clone, repeat)
                                      + timed(lambda _: ours.protect_matmul(probs, v, "p"), repeat=repeat)
                                      + timed(lambda c: ours.recover_matmul(c, attend_secret), masked_out.clone, repeat)),
        "ours: softmax": timed(softmax, scores.clone, repeat),
        "otp: pad 4 linears": sum(timed(lambda _, k=k: otp.protect_linear(inputs[k], k), repeat=repeat)
                                  for k in linears),
        "otp: pad both matmuls' operands": (timed(lambda _: otp.protect_matmul(q, k_t, "s"), repeat=repeat)
                                            + timed(lambda _: otp.protect_matmul(packed, v, "p"), repeat=repeat)),
        **{f"otp: recover the scores, {form} cross terms":
           timed(lambda _, f=f: f(*otp_scores_secret, otp_scores, blocks.scores), repeat=repeat)
           for form, f in cross_forms.items()},
        "otp: recover P·V": timed(lambda _: otp.recover_matmul(otp_attend, otp_attend_secret, blocks.attend),
                                  repeat=repeat),
        "ours: 3 hops, separate steps": three_hops(ours, secrets, fused=False),
        "ours: 3 hops, fused": three_hops(ours, secrets, fused=True),
        "otp: 3 hops, separate steps": three_hops(otp, otp_secrets, fused=False),
        "otp: 3 hops, fused": three_hops(otp, otp_secrets, fused=True),
        "ours: RoPE hop, separate steps": rope_hop(ours, secrets["qkv"], fused=False),
        "ours: RoPE hop, fused": rope_hop(ours, secrets["qkv"], fused=True),
        "otp: RoPE hop, separate steps": rope_hop(otp, otp_secrets["qkv"], fused=False),
        "otp: RoPE hop, fused": rope_hop(otp, otp_secrets["qkv"], fused=True),
        "ours: P·V hop, separate steps": attend_hop(ours, masked_out, attend_secret, grouped_matmul, fused=False),
        "ours: P·V hop, fused": attend_hop(ours, masked_out, attend_secret, grouped_matmul, fused=True),
        "otp: P·V hop, separate steps": attend_hop(otp, otp_attend, otp_attend_secret, blocks.attend, fused=False),
        "otp: P·V hop, fused": attend_hop(otp, otp_attend, otp_attend_secret, blocks.attend, fused=True),
        "ours: softmax hop, separate steps": softmax_hop(ours, masked_scores, scores_secret, whole, fused=False),
        "ours: softmax hop, fused": softmax_hop(ours, masked_scores, scores_secret, whole, fused=True),
        "otp: softmax hop, separate steps": softmax_hop(otp, otp_scores, otp_scores_secret, blocks, fused=False),
        "otp: softmax hop, fused": softmax_hop(otp, otp_scores, otp_scores_secret, blocks, fused=True),
        **(one_pass() if order is not None and native.offered(masked_scores) else {}),
    }


IDLE_WAITS = (("", WAIT_S), (", no idle wait", 0.0), (", after 2 ms idle", 2e-3), (", after 30 ms idle", 3e-2))


def fixed_costs(d: int, dtype: torch.dtype, threads: list[int], repeat: int, hop: torch.device | None = None
                ) -> dict[int, dict[str, float]]:
    """ms of a call that does next to nothing, eager and compiled, and of one RMSNorm over 128 tokens, at each
    torch thread count: what a TEE op costs beyond its arithmetic on this CPU, and whether fewer threads
    cut it. The RMSNorm is also timed straight after the call before, and after 2 and 30 ms idle: OpenMP's
    threads spin a while after a parallel region, then sleep, and waking them is a cost of its own (on the
    H100 machine a TEE op cost 100-170 µs at 128 tokens, against about 40 on the 2-core VM). With more than
    one thread, the RMSNorm's kernel is also timed built with one (inductor's cpp.threads: fused, and waking
    no thread), whatever the count. With `hop`, also straight after a round trip to that device, as the
    engine's TEE ops come (`round_trip`). Last, the RMSNorm as one C++ call and an OpenMP team that does nothing,
    after each wait (`cpp_calls`)."""
    tiny, x, branch = torch.randn(8).to(dtype), torch.randn(1, 128, d).to(dtype), torch.randn(1, 128, d).to(dtype)
    norm = RmsNorm.of(torch.rand(d).to(dtype) + 0.5, 1e-5)
    scaled, eps_d, out = norm.scaled[:8], norm.eps_d, torch.empty(8, dtype=dtype)
    waits = [(label, wait_s, None) for label, wait_s in IDLE_WAITS]
    if hop is not None:
        waits.append((f", straight after a round trip to {hop}", 0.0, round_trip(x, hop)))
    default, costs = torch.get_num_threads(), {}
    try:
        for count in threads:
            torch.set_num_threads(count)
            row = costs[count] = {}
            for mode in ("eager", "compiled"):
                kernels.select(mode == "compiled")  # a changed count rebuilds the compiled kernels
                row[f"a kernel on 8 values, {mode}"] = timed(lambda _: rms_norm(tiny, scaled, eps_d, out),
                                                              repeat=repeat)
                for label, wait_s, before in waits:
                    row[f"RMSNorm with the residual add, 128 tokens, {mode}{label}"] = timed(
                        lambda _: norm.after(x, branch), before or (lambda: None), repeat=repeat, wait_s=wait_s)
            if count > 1 and kernels.select(True) == kernels.COMPILED:
                on_one = kernels.Built(residual_rms_norm.__wrapped__, {"cpp.threads": 1})
                for label, wait_s, before in waits:
                    row[f"RMSNorm with the residual add, 128 tokens, compiled on one thread{label}"] = timed(
                        lambda _: on_one(x, branch, norm.scaled, norm.eps_d, torch.empty_like(x)),
                        before or (lambda: None), repeat=repeat, wait_s=wait_s)
            row["an eager add of 8 values"] = timed(lambda _: torch.add(tiny, tiny, out=out), repeat=repeat)
            row.update(cpp_calls(waits, repeat, x, branch, norm))
    finally:
        torch.set_num_threads(default)
        kernels.select(False)
    return costs


def cpp_calls(waits: list[tuple[str, float, Callable[[], None] | None]], repeat: int, x: torch.Tensor,
              branch: torch.Tensor, norm: RmsNorm) -> dict[str, float]:
    """ms of `fixed_costs`' RMSNorm as one C++ call (`native.rms_norm`: one team of every torch thread), and with
    more than one thread as that call on one (`kernels.on_one_thread`), after each of `waits`; of one OpenMP team
    that does nothing (`native.empty_team`: as each C++ kernel call starts one), after each, and with 4 barriers
    inside (as a kernel's passes wait for each other). None where the C++ kernels cannot be built."""
    def rms_norm_call(_) -> None:
        native.rms_norm(x, branch, norm.scaled, norm.eps_d, torch.empty_like(x))

    calls = {"RMSNorm with the residual add, 128 tokens, C++": rms_norm_call}
    if torch.get_num_threads() > 1:
        calls["RMSNorm with the residual add, 128 tokens, C++ on one thread"] = \
            lambda _: kernels.on_one_thread(rms_norm_call, (None,))
    calls["an empty team of every thread (C++)"] = lambda _: native.empty_team()
    try:
        row = {f"{name}{label}": timed(call, before or (lambda: None), repeat=repeat, wait_s=wait_s)
               for name, call in calls.items() for label, wait_s, before in waits}
        row["an empty team of every thread (C++), 4 barriers"] = timed(lambda _: native.empty_team(4), repeat=repeat)
        return row
    except RuntimeError as e:  # they could not be built here
        print(f"warning: {e}", file=sys.stderr)
        return {}


def product_rates(preset: str, repeat: int, n: int = 512) -> dict[str, float]:
    """Billions of multiply-adds a second of one product of the shape otp's scores' cross terms take per KV group
    at n tokens ([H/G·n, 2·head size] by [2·head size, n]), in each operand type the TEE could take: float32,
    bfloat16 (its result rounded to bfloat16), and int8 with int32 sums (`torch._int_mm`): whether this CPU's
    matrix units (AMX, VNNI) run them, and so which form of the cross terms set-up may keep."""
    p = PRESETS[preset]
    head = p.hidden_size // p.num_attention_heads
    rows, inner = p.num_attention_heads // p.num_key_value_heads * n, 2 * head
    left, right = torch.randn(rows, inner), torch.randn(inner, n)
    products = {"float32": lambda: left @ right,
                "bfloat16": lambda b=left.bfloat16(), c=right.bfloat16(): b @ c,
                "int8, int32 sums": lambda b=left.to(torch.int8), c=right.to(torch.int8): torch._int_mm(b, c)}
    return {kind: rows * inner * n / (timed(lambda _, f=f: f(), repeat=repeat) * 1e-3) / 1e9
            for kind, f in products.items()}


def memory_rates(repeat: int, mib: int = 256) -> dict[str, float]:
    """GB/s (read and written together) of a pass over `mib` MiB of host memory: a copy, and a float16 scale
    (read, converted, multiplied, written, as the TEE's element-wise ops do), on torch's threads and on one;
    with CUDA, the copy from pinned memory too, where the GPU's answers land. The TEE's element-wise ops make
    one or two such passes over their tensors: on the H100 machine the plain split's softmax moved about
    22 GB/s at 512 tokens (tenth round: 0.87 ms a layer for 9.4 MB each way); this rate says what the host
    allows."""
    source = torch.randn(mib * 2 ** 19).half()
    target = torch.empty_like(source)
    passes = {"copy": lambda: target.copy_(source), "float16 scale": lambda: torch.mul(source, 0.5, out=target)}
    if torch.cuda.is_available():
        pinned = source.pin_memory()
        passes["copy from pinned memory"] = lambda: target.copy_(pinned)
    out = {}
    for name, run in passes.items():
        for threads, form in (("", run), (", one thread", lambda run=run: kernels.on_one_thread(run, ()))):
            ms = timed(lambda _, form=form: form(), repeat=repeat, wait_s=0.0)
            out[name + threads] = 2 * source.numel() * source.element_size() / (ms * 1e-3) / 1e9
    return out


def gpu_calls(preset: str, n: int, dtype: torch.dtype, device: torch.device, repeat: int,
              graphs: CallGraphs | None = None) -> dict[str, float]:
    """ms of one layer's GPU calls at n tokens, each with the wait for it as a hop has it, issued op by op and
    replayed from a CUDA graph (`graphs`, whose landings hold the operands, as in the engine): what the graphs
    save a call on this host (`--cuda-graphs`, seventeenth round). The plain split's calls: the qkv and
    gate/up projections, the scores' causal blocks, and P·V."""
    graphs = CallGraphs(device) if graphs is None else graphs
    p = PRESETS[preset]
    d, inner, heads, groups = p.hidden_size, p.intermediate_size, p.num_attention_heads, p.num_key_value_heads
    h = d // heads

    def landed(name: str, *shape: int) -> torch.Tensor:  # random operands where the copies to the GPU land
        return graphs.landing((name, 0, 0), torch.empty(shape, dtype=dtype)).normal_()

    x = landed("linear_attn", 1, n, d)
    weights = {name: torch.randn(width, d, dtype=dtype, device=device) / d ** 0.5
               for name, width in (("qkv", (heads + 2 * groups) * h), ("gate_up", 2 * inner))}
    q_and_k = landed("matmul", 1, heads + groups, n, h)
    q, k_t = q_and_k[:, :heads], q_and_k[:, heads:].transpose(-1, -2)
    v = split_heads(landed("qkv", 1, n, (heads + 2 * groups) * h), h)[:, heads + groups:]  # as qkv's graph leaves it
    blocks = CausalBlocks.of(1, heads, n, padded=False)
    probs = graphs.landing(("softmax", 0, 0), torch.empty(blocks.shape, dtype=dtype)).uniform_()
    calls = {"qkv projection": (lambda t: F.linear(t, weights["qkv"]), (x,)),
             "gate/up projection": (lambda t: F.linear(t, weights["gate_up"]), (x,)),
             "scores (causal blocks)": (blocks.scores, (q, k_t)), "P·V": (blocks.attend, (probs, v))}
    out, keep = {}, blocks.constants(device)
    for label, (fn, inputs) in calls.items():
        def op_by_op(_, fn=fn, inputs=inputs) -> None:
            fn(*inputs)
            synchronize(device)

        def replayed(_, label=label, fn=fn, inputs=inputs) -> None:
            graphs(label, fn, *inputs, keep=keep)
            synchronize(device)

        out[f"{label}, op by op"] = timed(op_by_op, repeat=repeat)
        out[f"{label}, replayed"] = timed(replayed, repeat=repeat)
    return out


def registered(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A host tensor page-locked by cudaHostRegister, outside PyTorch's pinned cache: a CUDA graph may copy to
    and from it (the cache records an event per copy, which a capture may not hold). Unregistered when freed."""
    t = torch.empty(shape, dtype=dtype)
    cudart, size = torch.cuda.cudart(), t.numel() * t.element_size()
    error = cudart.cudaHostRegister(t.data_ptr(), size, 0)
    if error != cudart.cudaError.success:
        raise RuntimeError(f"cudaHostRegister failed ({error})")
    weakref.finalize(t, cudart.cudaHostUnregister, t.data_ptr())
    return t


def hop_forms(preset: str, n: int, dtype: torch.dtype, device: torch.device, repeat: int) -> dict[str, float | str]:
    """ms of one whole hop at n tokens, the plain split's q and k projection (the TEE's result in, the product,
    q and k back, the wait for them), in each way its copies could be made: as the engine makes them (a fresh
    pinned buffer each way, the product replayed from a graph, the copies issued apart from it), with pinned
    buffers kept from hop to hop, and with both copies inside the graph (one launch a hop), from and into
    buffers page-locked outside PyTorch's cache or from its cache; and the graph's replay and wait alone, with no
    copy. What the copies' own calls cost the host per hop, beside the launch. A way that fails (a capture
    PyTorch refuses) has its error instead."""
    p = PRESETS[preset]
    d, heads, groups = p.hidden_size, p.num_attention_heads, p.num_key_value_heads
    width = (heads + groups) * (d // heads)
    weight = torch.randn(width, d, dtype=dtype, device=device) / d ** 0.5
    tee_result = torch.randn(1, n, d).to(dtype)  # what the TEE's op writes, where the copy to the GPU reads it
    landing, stream = torch.empty(1, n, d, dtype=dtype, device=device), torch.cuda.Stream(device)
    product = CudaGraphCall(lambda t: F.linear(t, weight), (landing,), stream)
    kept_in = torch.empty_like(tee_result, pin_memory=True)
    kept_out = torch.empty(1, n, width, dtype=dtype, pin_memory=True)

    def wait() -> None:
        torch.cuda.current_stream(device).synchronize()

    def fresh_buffers(_) -> None:
        host = torch.empty_like(tee_result, pin_memory=True).copy_(tee_result)
        landing.copy_(host, non_blocking=True)
        product.replay()
        product.output.to("cpu", non_blocking=True)
        wait()

    def kept_buffers(_) -> None:
        landing.copy_(kept_in.copy_(tee_result), non_blocking=True)
        product.replay()
        kept_out.copy_(product.output, non_blocking=True)
        wait()

    def graph_alone(_) -> None:
        product.replay()
        wait()

    def in_graph(host_in: torch.Tensor, host_out: torch.Tensor) -> Callable[[object], None]:
        def whole(t: torch.Tensor) -> torch.Tensor:
            landing.copy_(t, non_blocking=True)
            return host_out.copy_(F.linear(landing, weight), non_blocking=True)

        hop = CudaGraphCall(whole, (host_in,), stream)

        def step(_) -> None:
            host_in.copy_(tee_result)
            hop.replay()
            wait()
        return step

    forms: dict[str, Callable[[], Callable[[object], None]]] = {
        "as the engine: fresh pinned buffers, copies apart from the graph": lambda: fresh_buffers,
        "pinned buffers kept, copies apart from the graph": lambda: kept_buffers,
        "copies in the graph, buffers page-locked by cudaHostRegister":
            lambda: in_graph(registered(tuple(tee_result.shape), dtype), registered((1, n, width), dtype)),
        "the graph's replay and wait alone, no copies": lambda: graph_alone,
        # last: a capture the cache's events break may leave the device unusable
        "copies in the graph, buffers from PyTorch's pinned cache":
            lambda: in_graph(torch.empty_like(kept_in, pin_memory=True), torch.empty_like(kept_out, pin_memory=True)),
    }
    out: dict[str, float | str] = {}
    for label, make in forms.items():
        try:
            out[label] = timed(make(), repeat=repeat)
        except RuntimeError as e:
            out[label] = f"failed: {kernels.first_line(e)}"
    return out


def round_trip(x: torch.Tensor, device: torch.device) -> Callable[[], None]:
    """A hop as the engine's: x from pinned memory to `device`, an op there, back, and a wait for it (where the
    TEE sits while the GPU works); on the CPU, copies."""
    pinned = device.type == "cuda"
    host = x.pin_memory() if pinned else x.clone()
    back, on_device = torch.empty_like(host, pin_memory=pinned), torch.empty_like(x, device=device)

    def hop() -> None:
        on_device.copy_(host, non_blocking=True).mul_(2)
        back.copy_(on_device, non_blocking=True)
        if pinned:
            torch.cuda.synchronize(device)

    return hop


def fixed_costs_under(policy: str, args) -> dict:
    """The fixed costs measured in a fresh process whose OpenMP threads wait as OMP_WAIT_POLICY=`policy` says
    (PASSIVE: sleep at once; ACTIVE: spin), which is read once, when a process starts; or why not."""
    with tempfile.TemporaryDirectory() as folder:
        out = os.path.join(folder, "fixed.json")
        command = [sys.executable, "-m", "splitinfer.kernel_bench", "--preset", args.preset, "--lengths", "",
                   "--dtype", args.dtype, "--repeat", str(args.repeat), "--out", out]
        if args.threads:
            command += ["--threads", args.threads]
        if args.round_trip_device:
            command += ["--round-trip-device", args.round_trip_device]
        try:
            done = subprocess.run(command, env={**os.environ, "OMP_WAIT_POLICY": policy}, capture_output=True,
                                  text=True, timeout=300)
        except subprocess.TimeoutExpired:
            return {"error": "timed out after 300 s"}
        if done.returncode != 0:
            return {"error": (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]}
        with open(out) as f:
            return json.load(f)["fixed_costs"]


def print_fixed_costs(costs: dict, title: str = "") -> None:
    for count, row in costs.items():
        for step, ms in row.items():
            print(f"{title}{count:>3} threads  {step:<84} {ms * 1e3:8.1f} µs")


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="splitinfer.kernel_bench", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="llama-3.2-1b", help=f"shape to time, one of {', '.join(PRESETS)}")
    p.add_argument("--lengths", default="128,512", help="comma-separated token counts")
    p.add_argument("--dtype", choices=list(DTYPES), default="float16")
    p.add_argument("--repeat", type=int, default=30, help="timed calls per step (the median is kept)")
    p.add_argument("--threads", default=None, metavar="N,N",
                   help="torch thread counts to time the fixed costs per call at (default: the current count)")
    p.add_argument("--wait-policies", default="", metavar="POLICY,POLICY",
                   help="also time the fixed costs in a fresh process under each OMP_WAIT_POLICY named (PASSIVE, "
                        "ACTIVE), after them (fixed_costs_by_wait_policy)")
    p.add_argument("--round-trip-device", default="cuda:0" if torch.cuda.is_available() else "",
                   help="also time the fixed costs straight after a round trip to this device, as the engine's TEE "
                        "ops come after a hop ('cpu': copies only; empty: none)")
    p.add_argument("--out", default="kernel_bench.json", help="the JSON goes here")
    args = p.parse_args(argv)
    if args.preset not in PRESETS:
        raise UserError(f"unknown preset '{args.preset}' (one of {', '.join(PRESETS)})")
    if args.repeat < 1:
        raise UserError(f"--repeat must be at least 1, got {args.repeat}")
    keep_freed_memory()
    lengths = parse_counts(args.lengths, "--lengths")
    threads = parse_counts(args.threads, "--threads") or [torch.get_num_threads()]
    policies = [x.strip().upper() for x in args.wait_policies.split(",") if x.strip()]
    if set(policies) - {"PASSIVE", "ACTIVE"}:
        raise UserError(f"--wait-policies takes PASSIVE and ACTIVE, got '{args.wait_policies}'")
    # written after each stage, marked incomplete until the last: a run cut at its time limit keeps what it took
    results: dict = {"preset": args.preset, "dtype": args.dtype, "wait_us": WAIT_S * 1e6, "repeat": args.repeat,
                     "incomplete": "stopped before the end (a time limit?)",
                     "environment": environment_block(torch.device("cpu"), False, torch.get_num_threads()),
                     "fixed_costs": {}, "product_rates_gmacs": {}, "memory_gbs": {}, "gpu_calls": {}, "hop_forms": {},
                     "fixed_costs_by_wait_policy": {}, "lengths": {}}
    progress("fixed costs per call")  # first: the cheapest stage, and the one a GPU run's budget cut twice
    try:
        hop = torch.device(args.round_trip_device) if args.round_trip_device else None
    except RuntimeError:
        raise UserError(f"--round-trip-device: not a device: '{args.round_trip_device}'") from None
    if hop is not None and hop.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--round-trip-device {hop}: CUDA is not available")
    results["fixed_costs"] = fixed_costs(PRESETS[args.preset].hidden_size, DTYPES[args.dtype], threads, args.repeat,
                                         hop)
    print_fixed_costs(results["fixed_costs"])
    results["product_rates_gmacs"] = product_rates(args.preset, args.repeat)
    for kind, rate in results["product_rates_gmacs"].items():
        print(f"matrix product, {kind:<17} {rate:8.1f} G multiply-adds/s")
    results["memory_gbs"] = memory_rates(min(args.repeat, 10))
    for kind, rate in results["memory_gbs"].items():
        print(f"host memory, {kind:<37} {rate:8.1f} GB/s")
    if hop is not None and hop.type == "cuda":  # a few seconds: what CUDA graphs save a GPU call
        for n in lengths:
            progress(f"{n} tokens: one layer's GPU calls on {hop}, op by op and replayed from CUDA graphs")
            calls = results["gpu_calls"][n] = gpu_calls(args.preset, n, DTYPES[args.dtype], hop, args.repeat)
            for label, ms in calls.items():
                print(f"{n:>5} GPU call {label:<40} {ms * 1e3:8.1f} µs")
            progress(f"{n} tokens: one hop's copies, apart from its graph and in it")
            try:
                forms = hop_forms(args.preset, n, DTYPES[args.dtype], hop, args.repeat)
            except RuntimeError as e:
                forms = {"error": kernels.first_line(e)}
            results["hop_forms"][n] = forms
            for label, ms in forms.items():
                print(f"{n:>5} hop, {label:<80} " + (f"{ms * 1e3:8.1f} µs" if isinstance(ms, float) else ms))
    write_json(args.out, results)
    for policy in policies:  # before the per-layer steps, which earlier GPU runs already have
        progress(f"fixed costs per call, OMP_WAIT_POLICY={policy} (a fresh process)")
        costs = results["fixed_costs_by_wait_policy"][policy] = fixed_costs_under(policy, args)
        if "error" in costs:
            print(f"warning: the fixed costs under OMP_WAIT_POLICY={policy} failed: {costs['error']}", file=sys.stderr)
        else:
            print_fixed_costs(costs, f"{policy:<8}")
        write_json(args.out, results)
    for n in lengths:
        modes = {}
        for mode in ("eager", "compiled"):
            progress(f"{n} tokens: {mode} kernels")
            modes[mode] = layer_steps(args.preset, n, DTYPES[args.dtype], mode == "compiled", args.repeat)
        modes["kernels"] = kernels.select(True)
        modes["vector_isa"] = kernels.vector_isa(modes["kernels"])
        results["lengths"][n] = modes
        for step, compiled in modes["compiled"].items():
            eager = modes["eager"].get(step)  # none for a form offered only with compiled kernels
            ratio = "" if eager is None or not compiled else f"  x{eager / compiled:.2f}"
            print(f"{n:>5} {step:<40} " + ("" if eager is None else f"eager {eager:8.3f} ms  ")
                  + f"compiled {compiled:8.3f} ms{ratio}")
        write_json(args.out, results)
    kernels.select(False)
    del results["incomplete"]
    write_json(args.out, results)
    progress(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
