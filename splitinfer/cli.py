"""What every runner does: parse flags (defaults from its config.py), load, run, check, write the JSON.

The runners are thin entry points that call `main` with their config file and scheme.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

import torch

from splitinfer import kernels
from splitinfer.audit import AuditLog, prepare_audit_dir
from splitinfer.engine import ATTENTION_FORMS, AUTO, SplitLlama
from splitinfer.errors import OneLineParser, UserError, one_line_errors
from splitinfer.inputs import build_batch, read_prompts
from splitinfer.metrics import synchronize
from splitinfer.models import DEFAULT_MODEL, PRESETS, LoadedModel, load_model
from splitinfer.reference import compare, reference_logits
from splitinfer.files import write_atomically, write_json
from splitinfer.results import (MemoryPhases, environment_block, memory_block, percentage_block, steady_state_block,
                                timing_block)
from splitinfer.schemes import RUNNER_OF, make_scheme

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
KERNEL_MODES = ("compiled", "cpp", "eager")  # --kernels: see `kernel_options`
SWITCH = {"on": True, "off": False, AUTO: AUTO}  # --cuda-graphs, --fuse-hops: as SplitLlama takes them
TEE_ONLY = "tee_only"


def load_config(path: str):
    spec = importlib.util.spec_from_file_location(f"_runner_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def keeps_embedding(config, scheme: str) -> bool:
    """Whether config.py has this masked scheme's runner keep its own copy of a tied embedding table
    (RESIDENT_EMBEDDING: the runners that do, or a bool for both)."""
    setting = getattr(config, "RESIDENT_EMBEDDING", ())
    return setting if isinstance(setting, bool) else RUNNER_OF[scheme] in setting


def build_parser(config, scheme: str, prog: str) -> argparse.ArgumentParser:
    runner = {"plain": "optimized: no protection", "matrix": "ours: matrix-transformation masks",
              "otp": "otp: additive one-time pads"}
    where = "everything on the CPU (the TEE-only baseline)" if scheme == TEE_ONLY else (
        f"split between the CPU TEE and the GPU ({runner[scheme]})")
    p = OneLineParser(prog=prog, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                      description=f"LLaMA prefill, {where}. Writes a timing JSON and checks the logits "
                                  "against transformers' LlamaForCausalLM. Defaults come from config.py.")
    p.add_argument("--model", default=config.MODEL,
                   help=f"checkpoint directory, '{DEFAULT_MODEL}' (SmolLM2-135M-Instruct), or preset:NAME with NAME "
                        f"in {', '.join(PRESETS)} (random weights of the real shape)")
    p.add_argument("--prefill-length", type=int, default=config.PREFILL_TOKEN_LENGTH,
                   help="tokens per sequence; the prompt is cut or repeated to exactly this many")
    p.add_argument("--batch-size", type=int, default=config.BATCH_SIZE,
                   help="sequences per inference; sequence b uses prompt b of the prompts file (cycling)")
    p.add_argument("--ragged", action="store_true",
                   help="give later sequences fewer real tokens (right padding) to exercise the padding mask")
    p.add_argument("--dtype", choices=list(DTYPES), default=config.DTYPE,
                   help="weights and activations; unset: float16 with CUDA, float32 without")
    p.add_argument("--gpu-device", default=config.GPU_DEVICE,
                   help="the untrusted device; falls back to the CPU, with a warning, when CUDA is absent")
    p.add_argument("--prompts-file", default=config.PROMPTS_FILE, help="one prompt per line")
    p.add_argument("--output", default=config.OUTPUT_FILE, help="where the timing JSON goes")
    p.add_argument("--seed", type=int, default=config.SEED,
                   help="seed for the masks (unset: drawn from the OS CSPRNG); the weights do not depend on it")
    p.add_argument("--weights-seed", type=int, default=config.WEIGHTS_SEED,
                   help="seed of a preset's random weights (the same for every runner unless changed)")
    p.add_argument("--warmup", type=int, default=config.WARMUP,
                   help="untimed inferences before the timed one (0: the first inference is the one timed)")
    p.add_argument("--repeat", type=int, default=config.REPEAT,
                   help="further inferences after the timed one, summarised under steady_state, and as many "
                        "that time only their total (steady_state.uninstrumented_total_ms)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch; unset keeps torch's own choice")
    add_kernels_flag(p, getattr(config, "KERNELS", None))
    p.add_argument("--per-layer", action="store_true",
                   help="add a per-layer table (time per category in each decoder layer) to the output and JSON")
    p.add_argument("--save-logits", metavar="PATH", default=None,
                   help="torch.save {input_ids, attention_mask, logits} (float32, last real position) here")
    p.add_argument("--no-reference", action="store_true",
                   help="skip the transformers reference (for models too large to run twice)")
    if scheme == TEE_ONLY:
        p.add_argument("--attention", choices=("auto", *ATTENTION_FORMS), default=getattr(config, "ATTENTION", "auto"),
                       help="the attention's form: the scores as one n×n block, as the causal block triangle, or the "
                            "three steps as one op (torch's scaled_dot_product_attention); auto: each timed on one "
                            "layer's shapes in set-up, the fastest kept (JSON: environment.tee_attention)")
    if scheme != TEE_ONLY:
        add_switch(p, "--cuda-graphs", getattr(config, "CUDA_GRAPHS", AUTO),
                   "replay each of the GPU's calls (a linear, an attention matmul) from a CUDA graph captured in set-up: "
                   "one launch where it makes several host calls; copies stay outside the graphs. CUDA only (on: "
                   "elsewhere a warning, and no graphs). JSON: benchmark_info.cuda_graphs", "on CUDA (else off)")
        p.add_argument("--audit-dir", default=None,
                       help="write every tensor sent to the GPU during the timed inference here, in order, "
                            "labelled with layer and op (a new or empty folder)")
    if scheme == "plain":
        p.add_argument("--overlap", action="store_true", default=getattr(config, "OVERLAP", False),
                       help="on CUDA, send the scores and gate/up's output to the TEE and back in parts, so that "
                            "copies run while the TEE works on other parts (timing JSON: overlap_ms)")
    if scheme in ("matrix", "otp"):
        p.add_argument("--resident-embedding", nargs="?", choices=("on", "off"), const="on",
                       default="on" if keeps_embedding(config, scheme) else "off",
                       help="with a tied LM head, keep a copy of the embedding table in the TEE (on) instead of "
                            "reading the GPU's whole at every inference (off): one table's copy less per inference "
                            "(about 10 ms at the 1B shape on a GPU host), a table's size more host memory (501 MiB "
                            "there). The flag alone means on. JSON: benchmark_info.resident_embedding")
        add_switch(p, "--fuse-hops", getattr(config, "FUSE_HOPS", AUTO),
                   "make each of the TEE's hops one call, one compiled or C++ kernel where set-up measures that "
                   "faster: between two linears, recovering the answer, the residual add and RMSNorm (or SiLU·up), "
                   "and protecting the next input (three such hops a layer); from the qkv projection to the scores, "
                   "recovering it, RoPE, and protecting q and kᵀ; between the attention matmuls, recovering the "
                   "scores, their softmax and protecting P·V's operands; from P·V to the o projection, recovering "
                   "it and protecting o's input. The JSON then times those RMSNorms, SiLUs, RoPEs and softmaxes as "
                   "crypto (timing.fused_hops_ms). JSON: benchmark_info.fused_hops",
                   "with compiled or C++ kernels (else off)")
    if scheme == "matrix":
        p.add_argument("--mask-rank", type=int, default=config.MASK_RANK,
                       help="rank k of the token-mixing part of M = D + ABᵀ (1: the original D + αβᵀ); "
                            "recovery costs O(n·k·out)")
        p.add_argument("--mix-scale", type=float, default=config.MIX_SCALE,
                       help="size of the mixing ABᵀX against DX (1: about equal); larger hides more and loses "
                            "more precision in half precision")
    if scheme == "otp":
        p.add_argument("--pad-scale", type=float, default=config.OTP_PAD_SCALE,
                       help="pad standard deviation as a multiple of the padded tensor's RMS: larger hides more "
                            "and loses more precision")
    return p


@one_line_errors
def main(config_path: str, scheme: str, argv: list[str] | None = None) -> int:
    """Entry point shared by every runner. Returns the process exit status."""
    config = load_config(config_path)
    run(build_parser(config, scheme, os.path.basename(sys.argv[0])).parse_args(argv), scheme)
    return 0


def add_switch(p: argparse.ArgumentParser, flag: str, default: bool | str, help: str, auto_where: str) -> None:
    """An option that is on, off, or left to set-up where it can pay (`auto_where`; auto: each way timed on this
    machine before the first inference, the faster kept: `SplitLlama.choose_configuration`). The flag alone means
    on."""
    p.add_argument(flag, nargs="?", choices=list(SWITCH), const="on",
                   default={True: "on", False: "off"}.get(default, default),
                   help=f"{help}. auto, {auto_where}: set-up times it both ways on zeros and keeps the faster "
                        "(JSON: benchmark_info.configuration, timing.configuration_choice_ms)")


def resolve_gpu_device(name: str) -> tuple[torch.device, bool]:
    """The device the GPU side runs on, and whether it fell back to the CPU."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"'{name}' is not a device name (use cuda, cuda:N or cpu)") from None
    if device.type == "cpu":
        return device, True
    if device.type != "cuda":
        raise UserError(f"--gpu-device must be a CUDA device (cuda or cuda:N) or cpu, not '{name}'")
    if not torch.cuda.is_available():
        print(f"warning: CUDA is not available, so the GPU side ('{name}') runs on the CPU; "
              "the JSON records the fallback", file=sys.stderr)
        return torch.device("cpu"), True
    index = device.index or 0
    if index >= torch.cuda.device_count():
        raise UserError(f"CUDA device '{name}' does not exist ({torch.cuda.device_count()} visible)")
    return torch.device("cuda", index), False


def add_kernels_flag(p: argparse.ArgumentParser, default: str | None = None, more: str = "") -> None:
    """--kernels, as every entry point takes it (`kernel_options` reads it)."""
    p.add_argument("--kernels", choices=KERNEL_MODES, default=default,
                   help="the TEE's fused kernels (RMSNorm with the residual add, SiLU, RoPE, the softmax, ours' "
                        "masks): 'compiled' by inductor in set-up (needs a C++ compiler; eager with a warning "
                        "without one), 'cpp': eager PyTorch ops and hand-written C++ kernels (built once per "
                        "machine), or 'eager' PyTorch ops alone; with either of the first two, set-up times each "
                        "step's forms at this input's shapes and keeps the fastest. Unset: compiled with CUDA, cpp "
                        "without (with the linears on the CPU between them, inductor's kernels measured slower)"
                        + more)


def kernel_options(choice: str | None, gpu_device: torch.device) -> dict[str, bool]:
    """`SplitLlama`'s `compiled` and `cpp` for --kernels `choice`; unset, compiled where the linears run on a GPU,
    cpp where they do not. On the 2-core VM, with the linears' CPU products between them, inductor's kernels ran
    slower than the eager ops (default model, float32, 128 tokens: RMSNorm 10.5 against 6.5 ms per inference,
    ours' crypto 46 against 33); while the TEE waits on a GPU, as in a busy-wait between calls, they ran up to 3x
    faster. The C++ kernels beside eager ops need no compile in set-up (tee_gpu/ROUNDS.md, "Thirty-fourth round")."""
    mode = choice or ("compiled" if gpu_device.type == "cuda" else "cpp")
    return {"compiled": mode == "compiled", "cpp": mode == "cpp"}


def check_writable(path: str, flag: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UserError(f"{flag} '{path}' is a directory")
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise UserError(f"{flag} '{path}': folder '{folder}' does not exist or is not writable")


def validate(args) -> None:
    for flag, value, least in (("--prefill-length", args.prefill_length, 1), ("--batch-size", args.batch_size, 1),
                               ("--warmup", args.warmup, 0), ("--repeat", args.repeat, 0)):
        if value < least:
            raise UserError(f"{flag} must be at least {least}, got {value}")
    if args.threads is not None and args.threads < 1:
        raise UserError(f"--threads must be at least 1, got {args.threads}")
    check_writable(args.output, "--output")
    if args.save_logits:
        check_writable(args.save_logits, "--save-logits")
    if getattr(args, "mix_scale", 1.0) <= 0:
        raise UserError(f"--mix-scale must be positive, got {args.mix_scale}")
    if getattr(args, "mask_rank", 1) < 1:
        raise UserError(f"--mask-rank must be at least 1, got {args.mask_rank}")
    if getattr(args, "pad_scale", 1.0) <= 0:
        raise UserError(f"--pad-scale must be positive, got {args.pad_scale}")
    if getattr(args, "audit_dir", None):
        prepare_audit_dir(args.audit_dir)


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(args, scheme_name: str) -> dict:
    """Load, run the timed inference(s), check against transformers, write the result. Returns it."""
    validate(args)
    tee_only = scheme_name == TEE_ONLY
    gpu_device, fallback = (torch.device("cpu"), False) if tee_only else resolve_gpu_device(args.gpu_device)
    dtype_name = args.dtype or ("float16" if gpu_device.type == "cuda" else "float32")
    dtype = DTYPES[dtype_name]
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = read_prompts(args.prompts_file)

    progress(f"loading model '{args.model}' ({dtype_name})")
    phases = MemoryPhases(gpu_device)
    model = load_model(args.model, dtype, gpu_device, args.weights_seed)
    phases.mark("model_loaded")
    if args.prefill_length > model.config.max_position_embeddings:
        raise UserError(f"--prefill-length {args.prefill_length} exceeds the model's max_position_embeddings "
                        f"({model.config.max_position_embeddings})")
    ids, mask = build_batch(model.tokenizer, prompts, args.prefill_length, args.batch_size, args.ragged)

    progress(f"setting up: weights to {gpu_device}" + (" (the TEE)" if tee_only else ""))
    start = time.perf_counter()
    options = ({"pad_scale": args.pad_scale} if scheme_name == "otp" else
               {"rank": args.mask_rank, "mix_scale": args.mix_scale} if scheme_name == "matrix" else {})
    scheme = make_scheme("plain" if tee_only else scheme_name, seed=args.seed, **options)
    engine = SplitLlama(model.config, model.state_dict, scheme, gpu_device, dtype, tee_only=tee_only,
                        overlap=getattr(args, "overlap", False),
                        resident_embedding=getattr(args, "resident_embedding", "off") == "on",
                        fuse_hops=SWITCH[getattr(args, "fuse_hops", "off")],
                        cuda_graphs=SWITCH[getattr(args, "cuda_graphs", "off")],
                        **kernel_options(args.kernels, gpu_device),
                        attention=None if getattr(args, "attention", "auto") == "auto" else args.attention)
    phases.mark("weights_placed")
    if gpu_device.type == "cuda":  # context and cuBLAS handle belong to set-up, not to the first inference
        torch.ones(8, 8, device=gpu_device, dtype=dtype) @ torch.ones(8, 8, device=gpu_device, dtype=dtype)
    if engine.compiled:
        progress("compiling the TEE's kernels for this input's shapes (inductor)")
    elif engine.cpp:
        progress("timing the TEE's steps in their eager and C++ forms at this input's shapes (--kernels cpp)")
    started = kernels.start_ms()  # nonzero: an earlier engine in this process started the compiler
    compile_ms = engine.warm_kernels(*ids.shape)
    phases.mark("kernels_built")
    progress("set-up: the attention's forms timed on one layer's shapes (--attention auto)"
             if tee_only and not engine.attention_pinned else
             "warming the device: each GPU op once on zeros of this input's shapes"
             + ("; one inference captures every GPU call's CUDA graph" if engine.cuda_graphs else ""))
    warmup_ms = engine.warm_device(*ids.shape)
    phases.mark("device_warmed")
    if engine.auto:
        progress(f"set-up: {' and '.join(sorted(engine.auto))} timed both ways on zeros (auto), the faster kept")
    choice_ms = engine.choose_configuration(*ids.shape)
    synchronize(gpu_device)
    setup_ms = (time.perf_counter() - start) * 1e3
    phases.mark("configuration_chosen")
    info = model_info(model)
    model.state_dict = {}  # the engine holds what it needs; drop the loader's copies

    for _ in range(args.warmup):
        engine.timed_forward(ids, mask)
    if args.warmup:
        phases.mark("warmup")
    progress(f"timed inference: batch {args.batch_size} x {args.prefill_length} tokens")
    audit = AuditLog() if getattr(args, "audit_dir", None) else None
    engine.link.audit = audit
    logits, figures = engine.timed_forward(ids, mask)
    engine.link.audit = None
    phases.mark("timed_inference")
    repeats = [engine.timed_forward(ids, mask)[1] for _ in range(args.repeat)]
    uninstrumented = [engine.timed_forward(ids, mask, instrumented=False)[1]["total_ms"] for _ in range(args.repeat)]
    if args.repeat:
        phases.mark("repeats")
    # before the reference adds its own
    memory = memory_block(gpu_device, figures["offline_mask_bytes"], engine.tee_weight_bytes(), phases)
    if audit is not None:
        audit.write(args.audit_dir)
        progress(f"wrote {len(audit.records)} crossings to {args.audit_dir}")

    correctness = {"reference": None, "skipped": True}
    if not args.no_reference:
        progress("transformers reference (float32, CPU), outside the timed region")
        correctness = compare(logits, reference_logits(model.config, engine.export_state_dict(), ids, mask))

    predictions = [{"prompt": model.tokenizer.decode(ids[b, : int(mask[b].sum())].tolist()),
                    "next_token_id": int(t), "next_token": model.tokenizer.decode([int(t)])}
                   for b, t in enumerate(logits.argmax(-1))]
    print_summary(predictions, figures, correctness, model.random_weights)

    real_tokens = int(mask.sum())
    result = {
        "timing": timing_block(figures, setup_ms, scheme.steps if scheme.masked else (), compile_ms, warmup_ms,
                               0.0 if started else kernels.start_ms(), choice_ms),
        "timing_breakdown": figures["breakdown"],
        "timing_percentage": percentage_block(figures),
        "data_transfer": figures["data_transfer"],
        "operation_counts": figures["counts"],
        "benchmark_info": {**info, "prefill_length": args.prefill_length, "batch_size": args.batch_size,
                           "real_tokens": real_tokens, "ragged": args.ragged, "dtype": dtype_name,
                           "scheme": scheme_name, "encryption_scheme": scheme.encryption_scheme,
                           "fused_hops": engine.fuse_hops, "cuda_graphs": engine.cuda_graphs,
                           "resident_embedding": engine.embed_table is not None and engine.tied,
                           "cuda_graphs_captured": engine.cuda_graphs_captured,
                           "configuration": engine.configuration,
                           "throughput_tokens_per_sec": real_tokens / (figures["total_ms"] / 1e3),
                           "logits_shape": list(logits.shape), "lm_head_positions": "last real token",
                           "gpu_device": str(gpu_device), "gpu_fallback_to_cpu": fallback,
                           "warmup": args.warmup, "repeat": args.repeat, "seed": args.seed,
                           "weights_seed": args.weights_seed if model.random_weights else None,
                           "prompts_file": os.path.abspath(args.prompts_file)},
        "correctness": correctness,
        "memory": memory,
        "predictions": predictions,
        "environment": {**environment_block(gpu_device, fallback, torch.get_num_threads()),
                        "model": info["model"], "random_weights": info["random_weights"], "params": info["params"],
                        "dtype": dtype_name, "seed": args.seed, "tee_allocator": engine.allocator,
                        "tee_kernels": engine.kernels, "tee_kernels_failed": dict(kernels.failed),
                        "tee_kernel_vector_isa": kernels.vector_isa(engine.kernels),
                        "tee_kernel_choices": kernels.chosen(),
                        "tee_attention": engine.attention_form, "tee_attention_ms_per_layer": engine.attention_ms,
                        "lm_head_forms_ms": engine.gpu.head_ms},
    }
    if args.per_layer:
        result["per_layer"] = figures["per_layer"]
        print_per_layer(figures["per_layer"])
    if repeats:
        result["steady_state"] = steady_state_block(repeats, uninstrumented)
    write_json(args.output, result)
    progress(f"wrote {args.output}")
    if args.save_logits:
        payload = {"input_ids": ids, "attention_mask": mask, "logits": logits}
        write_atomically(args.save_logits, lambda f: torch.save(payload, f))
        progress(f"wrote {args.save_logits}")
    return result


def print_per_layer(rows: list[dict]) -> None:
    columns = ("total_ms", "transfer_to_gpu_ms", "transfer_to_cpu_ms", "gpu_compute_ms", "cpu_compute_ms",
               "crypto_ms", "other_ms", "overlap_ms")
    print("layer " + " ".join(f"{c[:-3]:>15}" for c in columns))
    for row in rows:
        print(f"{row['layer']:>5} " + " ".join(f"{row[c]:>15.2f}" for c in columns))


def model_info(model: LoadedModel) -> dict:
    c = model.config
    return {"model": model.name, "model_source": model.source, "random_weights": model.random_weights,
            "params": model.n_params, "layers": c.num_hidden_layers, "hidden_size": c.hidden_size,
            "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads, "vocab_size": c.vocab_size}


def print_summary(predictions: list[dict], figures: dict, correctness: dict, random_weights: bool) -> None:
    for p in predictions[:4]:
        prompt = p["prompt"] if len(p["prompt"]) <= 100 else p["prompt"][:100] + "..."
        print(f"prompt: {prompt!r}")
        print(f"next token: {p['next_token']!r} (id {p['next_token_id']})"
              + ("  [random weights: meaningless]" if random_weights else ""))
    if len(predictions) > 4:
        print(f"... and {len(predictions) - 4} more sequences")
    c = figures["categories"]
    print(f"total {figures['total_ms']:.1f} ms: transfer {c['transfer_to_gpu'] + c['transfer_to_cpu']:.1f}, "
          f"gpu {c['gpu_compute']:.1f}, cpu {c['cpu_compute']:.1f}, crypto {c['crypto']:.1f}, "
          f"other {c['other']:.1f}" + (f"; less overlap {c['overlap']:.1f}" if c["overlap"] else "")
          + (f"; offline {c['offline']:.1f}" if c["offline"] else ""))
    if not correctness.get("skipped"):
        print(f"vs transformers: max abs logit error {correctness['max_abs_logit_error']:.3g}, "
              f"relative {correctness['rel_logit_error']:.3g}, top-1 agreement {correctness['top1_agreement']:.2f}")

