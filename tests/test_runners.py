"""The runners end to end on tiny checkpoints: the JSON, --save-logits, and every bad-input case."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT

from splitinfer import cli, engine, results
from splitinfer.reference import compare, reference_logits
from splitinfer.models import load_model

SPLIT_CONFIG = os.path.join(ROOT, "tee_gpu", "config.py")
TEE_CONFIG = os.path.join(ROOT, "tee_only_llama", "config.py")
RUNNERS = {"plain": SPLIT_CONFIG, "matrix": SPLIT_CONFIG, "otp": SPLIT_CONFIG, cli.TEE_ONLY: TEE_CONFIG}
CRYPTO_STEPS = {"matrix": ("encryption", "decryption"), "otp": ("masking", "recovery")}


def run(scheme: str, *argv: str) -> int:
    return cli.main(RUNNERS[scheme], scheme, list(argv))


@pytest.mark.parametrize("scheme", list(RUNNERS))
def test_json_result(tiny_models, tmp_path, scheme):
    out = tmp_path / "r.json"
    logits_path = tmp_path / "l.pt"
    # the plain runner's hops in parts (nothing to overlap here); a masked runner's steps apart, each timed on its own
    # (fused hops time both steps of a hop as one: `test_kernels_flag`)
    overlap = ["--overlap"] if scheme == "plain" else ["--fuse-hops", "off"] if scheme in CRYPTO_STEPS else []
    assert run(scheme, "--model", tiny_models["gqa-tied"], "--prefill-length", "10", "--batch-size", "2",
               "--ragged", "--repeat", "2", "--output", str(out), "--save-logits", str(logits_path), *overlap) == 0
    r = json.loads(out.read_text())
    t = r["timing"]
    parts = t["total_transfer_ms"] + t["gpu_compute_ms"] + t["cpu_compute_ms"] + t["total_crypto_ms"] + t["other_ms"]
    assert t["overlap_ms"] == 0 and abs(parts - t["total_ms"]) <= 0.02 * t["total_ms"]
    assert abs(sum(r["timing_percentage"].values()) - 100) < 2
    info = r["benchmark_info"]
    assert info["scheme"] == scheme and info["batch_size"] == 2 and info["prefill_length"] == 10
    assert info["logits_shape"] == [2, 320] and info["real_tokens"] == 10 + 7
    assert info["random_weights"] is False and info["params"] > 0
    assert r["correctness"]["rel_logit_error"] <= (1e-3 if scheme in CRYPTO_STEPS else 1e-4)
    assert r["correctness"]["top1_agreement"] == 1.0
    assert r["steady_state"]["runs"] == 2 and set(r["steady_state"]["total_ms"]) == {"median", "min", "max", "p90"}
    assert r["steady_state"]["uninstrumented_total_ms"]["min"] > 0
    env = r["environment"]
    assert {"python", "torch", "transformers", "gpu", "cuda", "cpu", "threads", "tdx_guest", "argv"} <= set(env)
    assert set(env["cpu_matrix_flags"]) <= results.CPU_MATRIX_FLAGS and env["cpu_capability"]
    if scheme == cli.TEE_ONLY:
        assert r["data_transfer"]["total_mb"] == 0
        forms = env["tee_attention_ms_per_layer"]  # --attention auto: every form timed in set-up, the fastest kept
        assert set(forms) == set(engine.ATTENTION_FORMS) and env["tee_attention"] == min(forms, key=forms.get)
    else:
        assert env["tee_attention"] is None
        assert info["gpu_fallback_to_cpu"] is True and r["data_transfer"]["to_gpu_calls"] > 0
    if scheme in CRYPTO_STEPS:
        protect, recover = CRYPTO_STEPS[scheme]
        assert info["encryption_scheme"] and t["total_crypto_ms"] > 0 and t["offline_ms"] > 0
        assert abs(t[f"{protect}_ms"] + t[f"{recover}_ms"] - t["total_crypto_ms"]) < 1e-6
        for kind in ("linear_attn", "linear_mlp", "matmul", "lm_head"):
            assert t[f"{protect}_{kind}_ms"] > 0 and t[f"{recover}_{kind}_ms"] > 0
        assert r["operation_counts"][protect] == r["operation_counts"][recover] > 0
        assert "gpu_embedding" not in r["operation_counts"] and r["operation_counts"]["cpu_embedding"] == 1
        assert r["memory"]["offline_mask_mb"] > 0
    # the TEE's weights: the norms (5 of 64 floats, as given and scaled); the 320 x 64 embedding table is the
    # tied LM head's, so ours reads it from the GPU at each inference, and otp keeps a copy (tee_gpu/config.py)
    table = 320 * 64 * 4
    assert info["resident_embedding"] == (scheme == "otp")
    assert r["memory"]["tee_weights_mb"] == pytest.approx((2 * 5 * 64 * 4 + table * info["resident_embedding"]) / 2 ** 20)
    if scheme in CRYPTO_STEPS:
        streamed = "embedding" in r["timing_breakdown"]["transfer_to_cpu"]  # the GPU's table, read whole
        assert streamed != info["resident_embedding"]
        assert 0 <= r["data_transfer"]["excess_over_minimum"] <= 0.10
    assert r["data_transfer"].get("offline_weights_to_cpu_bytes", 0) == 0  # the "GPU" is the CPU: nothing to fetch
    memory = r["memory"]
    assert memory["peak_host_rss_mb"] > 0 and memory["pinned_host_mb"] is None  # no CUDA: no pinned cache
    # the host's figures after each phase: the peak never falls, the last phase's is the run's, and the phase it
    # was reached in is the first whose peak is that
    phases = memory["by_phase"]
    assert list(phases) == ["model_loaded", "weights_placed", "kernels_built", "device_warmed", "configuration_chosen",
                            "timed_inference", "repeats"]
    peaks = [phase["peak_host_rss_mb"] for phase in phases.values()]
    assert peaks == sorted(peaks) and peaks[-1] <= memory["peak_host_rss_mb"]
    assert all(0 < phase["host_rss_mb"] for phase in phases.values())
    assert memory["peak_reached_in"] == next(name for name, phase in phases.items()
                                             if phase["peak_host_rss_mb"] >= peaks[-1])
    saved = torch.load(logits_path)
    assert saved["input_ids"].shape == (2, 10) and saved["logits"].dtype == torch.float32
    model = load_model(tiny_models["gqa-tied"], torch.float32, torch.device("cpu"))
    ref = reference_logits(model.config, model.state_dict, saved["input_ids"], saved["attention_mask"])
    assert compare(saved["logits"], ref)["rel_logit_error"] <= 1e-4


@pytest.mark.parametrize("kernels", ["compiled", "cpp", "eager"])
def test_kernels_flag(tiny_models, tmp_path, kernels, capsys, monkeypatch):
    """Compiled kernels are built in set-up (timing.kernel_compile_ms) and the JSON says which ran; without CUDA the
    default is cpp: eager kernels and the C++ ones, each step's forms timed in set-up (no compiler started), the
    picks in the JSON. With either, fused hops too: their time is crypto, apart from either step's. CUDA graphs
    asked for without CUDA: a warning, and the JSON says none ran. With either, fused hops are left to set-up by
    default (auto): it times the engine both ways and keeps the faster (benchmark_info.configuration); eager, they
    stay off, untimed."""
    from splitinfer import kernels as tee_kernels
    monkeypatch.setattr(tee_kernels, "choices", {})  # process-wide: not another test's
    monkeypatch.setattr(tee_kernels, "picks", {})
    out = tmp_path / "r.json"
    flag = ["--cuda-graphs"] if kernels == "cpp" else ["--kernels", kernels]
    assert run("matrix", "--model", tiny_models["gqa-tied"], "--prefill-length", "8", "--output", str(out), *flag) == 0
    r = json.loads(out.read_text())
    assert r["environment"]["tee_kernels"].startswith(kernels)
    assert (r["environment"]["tee_kernel_vector_isa"] is None) == (kernels != "compiled")  # what it is built for
    assert (r["timing"]["kernel_compile_ms"] > 0) == (kernels != "eager")
    picks = r["environment"]["tee_kernel_choices"]
    if kernels == "cpp":  # the steps' picks alone: no kernel compiled, so none timed against its eager form
        assert r["timing"]["compiler_start_ms"] == 0 and picks
        assert all("compiled_ms" not in v and any(k.startswith("one_pass") for k in v) for v in picks.values())
    assert r["timing"]["device_warmup_ms"] > 0  # each GPU op once, in set-up
    assert r["timing"]["setup_ms"] >= r["timing"]["kernel_compile_ms"] + r["timing"]["device_warmup_ms"]
    assert 0 <= r["timing"]["compiler_start_ms"] <= r["timing"]["kernel_compile_ms"]
    assert r["correctness"]["rel_logit_error"] <= 1e-3
    t, chosen = r["timing"], r["benchmark_info"]["configuration"]
    fused = chosen.get("kept") == "fuse_hops"
    assert r["benchmark_info"]["fused_hops"] is fused and (t["fused_hops_ms"] > 0) is fused
    if kernels != "eager":
        assert chosen["options"] == ["fuse_hops"] and set(chosen["median_ms"]) == {"neither", "fuse_hops"}
        assert 0 < t["configuration_choice_ms"] <= t["setup_ms"]
    else:
        assert chosen == {} and t["configuration_choice_ms"] == 0
    assert abs(t["encryption_ms"] + t["decryption_ms"] + t["fused_hops_ms"] - t["total_crypto_ms"]) < 1e-6
    assert r["benchmark_info"]["cuda_graphs"] is False and r["benchmark_info"]["cuda_graphs_captured"] == 0
    assert ("CUDA graphs need a CUDA device" in capsys.readouterr().err) is (kernels == "cpp")


def test_preset_and_half_precision(tmp_path):
    out = tmp_path / "r.json"
    assert run("plain", "--model", "preset:smollm2-135m", "--dtype", "bfloat16", "--output", str(out)) == 0
    r = json.loads(out.read_text())
    assert r["benchmark_info"]["random_weights"] is True and r["benchmark_info"]["dtype"] == "bfloat16"
    assert r["benchmark_info"]["params"] == 134_515_008
    assert r["correctness"]["top1_agreement"] == 1.0


@pytest.fixture
def not_llama(tmp_path):
    path = tmp_path / "gpt2ish"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    return str(path)


BAD_INPUTS = {
    "missing path": (["--model", "/no/such/checkpoint"], "not a directory"),
    "non-llama": (["--model", "{not_llama}"], "only model_type 'llama'"),
    "no weights": (["--model", "{empty_llama}"], "no safetensors"),
    "unknown preset": (["--model", "preset:gpt-5"], "unknown preset"),
    "unknown dtype": (["--dtype", "float8"], "invalid choice"),
    "prefill zero": (["--prefill-length", "0"], "at least 1"),
    "prefill too long": (["--prefill-length", "65"], "max_position_embeddings"),
    "batch zero": (["--batch-size", "0"], "at least 1"),
    "empty prompts": (["--prompts-file", "{empty_prompts}"], "holds no prompt"),
    "unreadable prompts": (["--prompts-file", "/no/such/prompts.txt"], "cannot read prompts"),
    "bad device name": (["--gpu-device", "banana"], "not a device name"),
    "output folder missing": (["--output", "/no/such/folder/r.json"], "does not exist"),
    "audit dir not empty": (["--audit-dir", "{tee_only_dir}"], "not empty"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input(tiny_models, tmp_path, capsys, not_llama, case):
    empty_prompts = tmp_path / "empty.txt"
    empty_prompts.write_text("\n# only a comment\n")
    empty_llama = tmp_path / "empty_llama"
    empty_llama.mkdir()
    (empty_llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    argv, expected = BAD_INPUTS[case]
    argv = [a.format(not_llama=not_llama, empty_prompts=empty_prompts, empty_llama=empty_llama,
                     tee_only_dir=os.path.join(ROOT, "tee_only_llama")) for a in argv]
    out = tmp_path / "r.json"
    out.write_text("previous result")
    if "--model" not in argv:
        argv = ["--model", tiny_models["mha-untied"], *argv]
    if "--output" not in argv:
        argv += ["--output", str(out)]
    with pytest.raises(SystemExit) if case == "unknown dtype" else _no_raise() as caught:
        status = run("plain", *argv)
    if case == "unknown dtype":
        status = caught.value.code
    assert status == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(err) == 1 and expected in err[0], err
    assert out.read_text() == "previous result"  # nothing written or overwritten
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_pad_scale_must_be_positive(tiny_models, tmp_path, capsys):
    assert run("otp", "--model", tiny_models["mha-untied"], "--pad-scale", "0", "--output", str(tmp_path / "r.json")) == 2
    assert "--pad-scale must be positive" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_missing_cuda_device(tiny_models, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert run("plain", "--model", tiny_models["mha-untied"], "--gpu-device", "cuda:3",
               "--output", str(tmp_path / "r.json")) == 2
    assert "does not exist (1 visible)" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_script_bad_input_has_no_traceback(tmp_path):
    """As a user runs it: one line on stderr, exit 2, no traceback."""
    script = os.path.join(ROOT, "tee_gpu", "tee_runner_optimized.py")
    done = subprocess.run([sys.executable, script, "--model", "preset:nope", "--output", str(tmp_path / "r.json")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == "error: unknown preset 'nope'; choose one of: " \
        "smollm2-135m, llama-3.2-1b, llama-3.2-3b, llama-2-7b, llama-3.1-8b, llama-3.2-1b-narrow"


def test_resident_embedding_defaults_per_runner():
    """config.py names the masked runners that keep their own copy of a tied table: otp (its memory target holds
    it), not ours; the flag alone means on, and either runner takes on or off."""
    config = cli.load_config(SPLIT_CONFIG)
    defaults = {scheme: cli.build_parser(config, scheme, "r").parse_args([]).resident_embedding
                for scheme in ("matrix", "otp")}
    assert defaults == {"matrix": "off", "otp": "on"}
    for scheme in ("matrix", "otp"):
        parser = cli.build_parser(config, scheme, "r")
        assert parser.parse_args(["--resident-embedding"]).resident_embedding == "on"
        assert parser.parse_args(["--resident-embedding", "off"]).resident_embedding == "off"
    assert not hasattr(cli.build_parser(config, "plain", "r").parse_args([]), "resident_embedding")
    config.RESIDENT_EMBEDDING = True  # a bool sets both
    assert cli.keeps_embedding(config, "matrix") and cli.keeps_embedding(config, "otp")


def test_help_lists_every_flag():
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tee_only_llama", "tee_runner.py"), "--help"],
                          capture_output=True, text=True)
    assert done.returncode == 0
    for flag in ("--model", "--prefill-length", "--batch-size", "--dtype", "--gpu-device", "--output", "--seed",
                 "--warmup", "--repeat", "--save-logits", "--no-reference", "--attention"):
        assert flag in done.stdout
