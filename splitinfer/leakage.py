"""Leakage evaluation: run each scheme on real prompts, keep what crossed to the GPU, attack it, and score.

Each inference's crossings go through an audit folder on disk and the attacks read them back from there,
so an attack gets exactly what the GPU got, plus the public model, and nothing of the TEE's state.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile

import torch

from splitinfer.attacks import ATTACKS, POSITIONAL, PublicModel, recovery_rate
from splitinfer.audit import AuditLog, read_audit
from splitinfer.cli import progress
from splitinfer.engine import SplitLlama
from splitinfer.errors import OneLineParser, UserError, one_line_errors
from splitinfer.inputs import read_prompts
from splitinfer.models import load_model
from splitinfer.report import markdown_table, write_files
from splitinfer.files import write_json
from splitinfer.schemes import RUNNER_OF, make_scheme

LATER_LAYER_ATTACKS = ("naive_match", "shared_direction")


def parse_list(text: str, kind, flag: str) -> list:
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"{flag} '{text}' is not a comma-separated list") from None
    if not values:
        raise UserError(f"{flag} is empty")
    return values


# Every scheme faces the dictionary attacks on the linear inputs; the attention operands get the natural
# attack for what each scheme sends: profiles against permuted rows (ours), nearest match in place (otp).
OPERAND_ATTACKS = {"plain": ("query_match",), "matrix": ("query_profile", "value_profile"),
                   "otp": ("query_match", "value_match")}


def attack_plan(scheme: str, layers: list[int]) -> list[tuple[str, int | None]]:
    plan = [("ids_in_clear", None)]
    plan += [(attack, layer) for layer in layers for attack in LATER_LAYER_ATTACKS]
    return plan + [(attack, 0) for attack in OPERAND_ATTACKS[scheme]]


def run_scheme(model, public: PublicModel, scheme_name: str, prompt_ids: list[torch.Tensor], layers: list[int],
               workdir: str, seed: int | None, **options) -> dict:
    """Attack every prompt's crossings under one scheme; returns per-attack rates and the crypto time."""
    scheme = make_scheme(scheme_name, seed=seed, **options)
    engine = SplitLlama(model.config, model.state_dict, scheme, torch.device("cpu"), torch.float32)
    hits: dict[tuple, int] = {}
    totals: dict[tuple, int] = {}
    crypto_ms = []
    for i, ids in enumerate(prompt_ids):
        log = AuditLog()
        engine.link.audit = log
        _, figures = engine.timed_forward(ids, torch.ones_like(ids))
        crypto_ms.append(figures["categories"]["crypto"])
        folder = tempfile.mkdtemp(dir=workdir, prefix=f"{scheme_name}-{i}-")
        log.write(folder)
        records = read_audit(folder)
        for attack, layer in attack_plan(scheme_name, layers):
            extra = {"k": options.get("rank", 1)} if attack == "shared_direction" else {}
            guess = ATTACKS[attack](records, public, layer if layer is not None else 0, **extra)
            if guess is None:
                continue
            key = (attack, layer)
            truth = ids.repeat_interleave(guess.shape[0] // ids.shape[0], dim=0)  # one guess per head, maybe
            hits[key] = hits.get(key, 0) + recovery_rate(guess, truth, attack in POSITIONAL)
            totals[key] = totals.get(key, 0) + truth.numel()
    attacks = [{"attack": a, "layer": layer, "token_recovery_rate": hits[(a, layer)] / totals[(a, layer)],
                "tokens": totals[(a, layer)], "correct": hits[(a, layer)]} for a, layer in totals]
    best = max(attacks, key=lambda r: r["token_recovery_rate"])
    return {"runner": RUNNER_OF[scheme_name], "options": options, "attacks": attacks, "best": best,
            "crypto_ms_median": statistics.median(crypto_ms)}


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="evaluate_leakage.py", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                      description="Measure how much of the prompt each split scheme gives away to the GPU: run "
                                  "each scheme on the prompts, attack what crossed, and report the token "
                                  "recovery rate per scheme and attack.")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p.add_argument("--model", default="default", help="checkpoint directory, 'default' or preset:NAME")
    p.add_argument("--prompt-file", default=os.path.join(here, "tee_only_llama", "prompts.txt"))
    p.add_argument("--schemes", default="plain,matrix,otp", help="comma-separated: plain, matrix (ours), otp")
    p.add_argument("--layers", default="0,1", help="layers whose q/k/v input is attacked (0 is exact; later "
                                                   "layers use context-free candidates)")
    p.add_argument("--mask-rank", type=int, default=1, help="rank k of ours' token mixing")
    p.add_argument("--mix-scale", type=float, default=1.0, help="ours' mixing scale (ABᵀX against DX)")
    p.add_argument("--pad-scale", type=float, default=1.0, help="otp's pad scale")
    p.add_argument("--rank-sweep", help="also run ours at these ranks, e.g. 1,2,4,8,16: the privacy/crypto-time curve")
    p.add_argument("--mix-scale-sweep", help="also run ours at these mixing scales, e.g. 1,4,16,64")
    p.add_argument("--pad-scale-sweep", help="also run otp at these pad scales, e.g. 0.5,1,2,4")
    p.add_argument("--seed", type=int, default=None, help="mask seed (default: the OS CSPRNG)")
    p.add_argument("--out-dir", default="leakage_results", help="leakage.json, leakage.md and the plot go here")
    return p


def evaluate(args) -> dict:
    schemes = parse_list(args.schemes, str, "--schemes")
    unknown = [s for s in schemes if s not in RUNNER_OF]
    if unknown:
        raise UserError(f"unknown scheme(s) {', '.join(unknown)}; choose from plain, matrix, otp")
    layers = parse_list(args.layers, int, "--layers")
    ranks = parse_list(args.rank_sweep, int, "--rank-sweep") if args.rank_sweep else []
    scales = parse_list(args.pad_scale_sweep, float, "--pad-scale-sweep") if args.pad_scale_sweep else []
    mixes = parse_list(args.mix_scale_sweep, float, "--mix-scale-sweep") if args.mix_scale_sweep else []
    if min(layers) < 0 or min([args.mask_rank, *ranks]) < 1 or min([args.pad_scale, args.mix_scale, *scales,
                                                                    *mixes]) <= 0:
        raise UserError("layers must be >= 0, ranks >= 1 and pad and mixing scales > 0")
    prompts = read_prompts(args.prompt_file)
    progress(f"loading model '{args.model}' (float32, CPU)")
    model = load_model(args.model, torch.float32, torch.device("cpu"))
    if max(layers) >= model.config.num_hidden_layers:
        raise UserError(f"--layers: the model has {model.config.num_hidden_layers} layers")
    prompt_ids = [torch.tensor([model.tokenizer.encode(p)]) for p in prompts]
    progress(f"building the attacker's candidate tables for layers {layers} ({model.config.vocab_size} tokens)")
    public = PublicModel(model.config, model.state_dict)
    public.candidates(max(layers))
    options = {"plain": {}, "matrix": {"rank": args.mask_rank, "mix_scale": args.mix_scale},
               "otp": {"pad_scale": args.pad_scale}}
    result = {"model": model.name, "random_weights": model.random_weights, "prompts": len(prompts),
              "tokens": sum(ids.numel() for ids in prompt_ids), "layers": layers, "schemes": {}, "sweeps": {}}
    with tempfile.TemporaryDirectory() as workdir:
        for name in schemes:
            progress(f"{name}: running and attacking {len(prompts)} prompts")
            result["schemes"][name] = run_scheme(model, public, name, prompt_ids, layers, workdir, args.seed,
                                                 **options[name])
        for rank in ranks:
            progress(f"rank sweep: ours at k = {rank}")
            result["sweeps"].setdefault("mask_rank", []).append(
                run_scheme(model, public, "matrix", prompt_ids, [0], workdir, args.seed, rank=rank,
                           mix_scale=args.mix_scale))
        for mix in mixes:
            progress(f"mixing-scale sweep: ours at {mix}")
            result["sweeps"].setdefault("mix_scale", []).append(
                run_scheme(model, public, "matrix", prompt_ids, [0], workdir, args.seed, rank=args.mask_rank,
                           mix_scale=mix))
        for scale in scales:
            progress(f"pad-scale sweep: otp at {scale}")
            result["sweeps"].setdefault("pad_scale", []).append(
                run_scheme(model, public, "otp", prompt_ids, [0], workdir, args.seed, pad_scale=scale))
    return result


def table_rows(result: dict) -> list[dict]:
    rows = []
    for name, r in result["schemes"].items():
        for a in r["attacks"]:
            rows.append({"scheme": f"{name} ({r['runner']})", "attack": a["attack"],
                         "layer": "—" if a["layer"] is None else a["layer"],
                         "token recovery": f"{100 * a['token_recovery_rate']:.1f}%", "tokens": a["tokens"]})
    return rows


def sweep_rows(result: dict) -> list[dict]:
    rows = []
    for sweep, runs in result["sweeps"].items():
        for r in runs:
            setting = r["options"][{"mask_rank": "rank", "mix_scale": "mix_scale", "pad_scale": "pad_scale"}[sweep]]
            rows.append({"sweep": sweep, "setting": setting, "best attack": r["best"]["attack"],
                         "token recovery": f"{100 * r['best']['token_recovery_rate']:.1f}%",
                         "crypto ms (median per inference)": r["crypto_ms_median"]})
    return rows


def tradeoff_png(runs: list[dict], title: str) -> bytes:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    x = [r["crypto_ms_median"] for r in runs]
    y = [100 * r["best"]["token_recovery_rate"] for r in runs]
    ax.plot(x, y, marker="o")
    for r, xi, yi in zip(runs, x, y):
        ax.annotate(f"k={r['options']['rank']}", (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("crypto time per inference (ms, median)")
    ax.set_ylabel("best attack's token recovery (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = evaluate(args)
    table = markdown_table(table_rows(result))
    text = f"# Token recovery by an attacker on the GPU · {result['model']} · {result['tokens']} tokens\n\n{table}"
    if result["sweeps"]:
        text += "\n" + markdown_table(sweep_rows(result))
    os.makedirs(args.out_dir, exist_ok=True)
    files = {os.path.join(args.out_dir, "leakage.md"): text}
    if "mask_rank" in result["sweeps"]:
        files[os.path.join(args.out_dir, "rank_tradeoff.png")] = tradeoff_png(
            result["sweeps"]["mask_rank"], f"ours, mask rank k · {result['model']}")
    write_json(os.path.join(args.out_dir, "leakage.json"), result)
    write_files(files)
    print(text)
    progress(f"wrote {', '.join([os.path.join(args.out_dir, 'leakage.json'), *files])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
