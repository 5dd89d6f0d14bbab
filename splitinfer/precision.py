"""Half-precision logit error of every split runner against the float32 transformers reference, in one
process, over several mask seeds: the check that masking costs at most a few times plain's rounding.

    python -m splitinfer.precision --model preset:smollm2-135m --length 128 --seeds 1,2,3 --out precision.json

The reference is computed once; each masked runner runs once per seed (plain needs no seed). The JSON
holds every run and, per runner, the worst relative error and its ratio to plain's.
"""
from __future__ import annotations

import argparse
import sys

import torch

from splitinfer import kernels
from splitinfer.cli import DTYPES, add_kernels_flag, kernel_options, progress, resolve_gpu_device
from splitinfer.engine import SplitLlama
from splitinfer.errors import OneLineParser, UserError, one_line_errors
from splitinfer.inputs import build_batch, read_prompts
from splitinfer.models import load_model
from splitinfer.perf import DEFAULT_PROMPTS
from splitinfer.reference import compare, reference_logits
from splitinfer.files import write_json
from splitinfer.results import environment_block
from splitinfer.schemes import RUNNERS, SCHEMES, make_scheme


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="splitinfer.precision", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="preset:smollm2-135m", help="checkpoint directory, 'default' or preset:NAME")
    p.add_argument("--length", type=int, default=128, help="tokens per sequence")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--ragged", action="store_true", help="right-pad later sequences (exercises the padding mask)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float16")
    p.add_argument("--seeds", default="1,2,3", help="comma-separated mask seeds for the masked runners")
    p.add_argument("--gpu-device", default="cuda:0")
    add_kernels_flag(p)
    p.add_argument("--out", default="precision.json", help="the JSON goes here")
    return p


def measure(args) -> dict:
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise UserError(f"--seeds must be comma-separated integers, got '{args.seeds}'") from None
    if args.length < 1 or args.batch_size < 1:
        raise UserError("--length and --batch-size must be at least 1")
    gpu_device, fallback = resolve_gpu_device(args.gpu_device)
    dtype = DTYPES[args.dtype]
    progress(f"loading {args.model} ({args.dtype})")
    model = load_model(args.model, dtype, gpu_device)
    ids, mask = build_batch(model.tokenizer, read_prompts(DEFAULT_PROMPTS), args.length, args.batch_size, args.ragged)
    runs: dict[str, list[dict]] = {}
    reference = None
    for runner, scheme in RUNNERS.items():
        for seed in seeds if SCHEMES[scheme].masked else seeds[:1]:
            progress(f"{runner}, mask seed {seed}")
            engine = SplitLlama(model.config, model.state_dict, make_scheme(scheme, seed=seed), gpu_device, dtype,
                                **kernel_options(args.kernels, gpu_device))
            if seed == seeds[0]:  # set-up, as the runners': the forms it keeps (for every seed: the same shapes)
                engine.warm_kernels(*ids.shape)
            logits, _ = engine.timed_forward(ids, mask)
            mode = engine.kernels
            if reference is None:
                progress("transformers reference (float32, CPU)")
                reference = reference_logits(model.config, engine.export_state_dict(), ids, mask)
            runs.setdefault(runner, []).append({"seed": seed, **compare(logits, reference)})
            del engine
    plain = max(r["rel_logit_error"] for r in runs["optimized"])
    worst = {runner: max(r["rel_logit_error"] for r in rs) for runner, rs in runs.items()}
    return {"setup": {"model": model.name, "length": args.length, "batch_size": args.batch_size,
                      "ragged": args.ragged, "dtype": args.dtype, "seeds": seeds, "gpu_device": str(gpu_device),
                      "gpu_fallback_to_cpu": fallback, "kernels": mode,
                      "kernel_choices": kernels.chosen()},  # the last engine's set-up's (otp's cross terms among them)
            "runs": runs, "worst_rel_logit_error": worst,
            "worst_over_plain": {runner: w / plain if plain else float("inf") for runner, w in worst.items()},
            "environment": environment_block(gpu_device, fallback, torch.get_num_threads())}


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = measure(args)
    for runner, worst in result["worst_rel_logit_error"].items():
        print(f"{runner:<10} worst relative logit error {worst:.3g}  ({result['worst_over_plain'][runner]:.2f}x plain)")
    write_json(args.out, result)
    progress(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
