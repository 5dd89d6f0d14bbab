"""Run the runners side by side and report: the engine behind the scripts in */benchmarks/.

    python -m splitinfer.bench split   [options] [runner flags]   # the three split runners
    python -m splitinfer.bench tee     [options] [runner flags]   # the TEE-only runner
    python -m splitinfer.bench compare [options] [runner flags]   # all four, with the comparison report
    python -m splitinfer.bench report  [--out-dir DIR] METHOD=RESULT.json ...   # report existing results

Each runner runs in its own process, so every first inference is a real first inference. Flags the
bench does not know are checked against the runners' own and passed through (e.g. --model, --dtype).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

from splitinfer.cli import SWITCH, TEE_ONLY, build_parser, load_config
from splitinfer.errors import OneLineParser, UserError
from splitinfer.report import comparison_report, load_privacy, load_result, sweep_report, write_files
from splitinfer.schemes import RUNNERS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"optimized": os.path.join(ROOT, "tee_gpu", "tee_runner_optimized.py"),
           "ours": os.path.join(ROOT, "tee_gpu", "tee_runner_ours.py"),
           "otp": os.path.join(ROOT, "tee_gpu", "tee_runner_otp.py"),
           "tee_only": os.path.join(ROOT, "tee_only_llama", "tee_runner.py")}
MODES = {"split": ("optimized", "ours", "otp"), "tee": ("tee_only",), "compare": tuple(SCRIPTS)}
SET_BY_BENCH = ("--output", "--audit-dir", "--save-logits")  # one value per runner: the bench chooses
# scheme-specific runner flags, and the runners that take them; switches take no value
ONLY_FOR = {"--pad-scale": ("otp",), "--mask-rank": ("ours",), "--mix-scale": ("ours",), "--overlap": ("optimized",),
            "--resident-embedding": ("ours", "otp"), "--fuse-hops": ("ours", "otp"),
            "--cuda-graphs": ("optimized", "ours", "otp")}
SWITCHES = ("--overlap", "--resident-embedding", "--fuse-hops", "--cuda-graphs")
MAYBE_VALUED = ("--fuse-hops", "--cuda-graphs", "--resident-embedding")  # alone: on; or followed by on, off (or auto)
RUNNER_SCHEMES = {**RUNNERS, "tee_only": TEE_ONLY}


class RunnerFailed(Exception):
    """A runner exited non-zero; its own output says why."""


def parse_lengths(text: str) -> list[int]:
    try:
        lengths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--lengths '{text}' is not a comma-separated list of whole numbers") from None
    if not lengths or min(lengths) < 1:
        raise UserError(f"--lengths '{text}' must list lengths of at least 1")
    return sorted(set(lengths))


def build_bench_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="splitinfer.bench", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.RawDescriptionHelpFormatter,
                      epilog="Runner flags (--model, --dtype, --batch-size, --repeat, ...) pass through; see a "
                             "runner's --help.")
    p.add_argument("mode", choices=[*MODES, "report"])
    p.add_argument("--out-dir", default="results", help="where the JSONs and the report go (default: results)")
    p.add_argument("--lengths", help="sweep over these prefill lengths, e.g. 8,32,128,512 (one table and a "
                                     "scaling plot across them)")
    p.add_argument("--leakage", metavar="LEAKAGE_JSON",
                   help="an evaluate_leakage.py result: adds each method's best attack recovery rate (privacy)")
    p.add_argument("--tee-dtype", choices=["float32", "float16", "bfloat16"],
                   help="dtype of the TEE-only runner alone (default: the same as the split runners)")
    return p


def check_runner_flags(methods: tuple[str, ...], flags: list[str], tee_dtype: str | None) -> None:
    """Check the flags meant for the runners with each runner's own parser: one clear line if any is wrong."""
    for flag in SET_BY_BENCH:
        if any(arg == flag or arg.startswith(flag + "=") for arg in flags):
            raise UserError(f"{flag} is set per runner by the bench; use --out-dir")
    for method in methods:
        folder = "tee_only_llama" if method == "tee_only" else "tee_gpu"
        parser = build_parser(load_config(os.path.join(ROOT, folder, "config.py")), RUNNER_SCHEMES[method],
                              f"{method} runner flags")
        parser.parse_args(flags_for(method, flags, tee_dtype))  # exits 2 with one line on a bad flag or value


def flags_for(method: str, flags: list[str], tee_dtype: str | None) -> list[str]:
    out, skip = [], False
    for i, arg in enumerate(flags):
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in ONLY_FOR and method not in ONLY_FOR[name]:
            valued = name in MAYBE_VALUED and i + 1 < len(flags) and flags[i + 1] in SWITCH
            skip = "=" not in arg and (name not in SWITCHES or valued)
            continue
        if method == "tee_only" and tee_dtype and name == "--dtype":
            skip = "=" not in arg
            continue
        out.append(arg)
    if method == "tee_only" and tee_dtype:
        out += ["--dtype", tee_dtype]
    return out


def run_runners(methods: tuple[str, ...], flags: list[str], lengths: list[int | None], out_dir: str,
                tee_dtype: str | None) -> dict[int | None, dict[str, dict]]:
    """Run every method at every length; {length: {method: result}}. Stops at the first failure."""
    results: dict[int | None, dict[str, dict]] = {}
    jobs = [(n, m) for n in lengths for m in methods]
    for i, (n, method) in enumerate(jobs, 1):
        extra = [] if n is None else ["--prefill-length", str(n)]
        output = os.path.join(out_dir, f"{method}" + ("" if n is None else f"_n{n}") + ".json")
        label = method + ("" if n is None else f", {n} tokens")
        print(f"[{i}/{len(jobs)}] {label}", file=sys.stderr, flush=True)
        cmd = [sys.executable, SCRIPTS[method], *flags_for(method, flags, tee_dtype), *extra, "--output", output]
        done = subprocess.run(cmd)
        if done.returncode != 0:
            where = "" if n is None else f" at {n} tokens"
            raise RunnerFailed(f"runner {method} failed (exit {done.returncode}){where}; no report written")
        results.setdefault(n, {})[method] = load_result(output)
    return results


def main(argv: list[str] | None = None) -> int:
    args, passthrough = build_bench_parser().parse_known_args(argv)
    try:
        privacy = load_privacy(args.leakage) if args.leakage else None
        if args.mode == "report":
            pairs = [a.partition("=") for a in passthrough]
            if not pairs or any(not sep or not name for name, sep, _ in pairs):
                raise UserError("report takes METHOD=RESULT.json pairs, e.g. optimized=results/optimized.json")
            sweep = {None: {name: load_result(path) for name, _, path in pairs}}
        else:
            flags = passthrough
            check_runner_flags(MODES[args.mode], flags, args.tee_dtype)
            lengths = parse_lengths(args.lengths) if args.lengths else [None]
            if args.lengths and any(a.split("=")[0] == "--prefill-length" for a in flags):
                raise UserError("give either --lengths or --prefill-length, not both")
            if args.mode == "compare" and not any(a.split("=")[0] == "--dtype" for a in flags):
                flags = [*flags, "--dtype", "float32"]  # like with like: the split and the TEE-only runner
            os.makedirs(args.out_dir, exist_ok=True)
            sweep = run_runners(MODES[args.mode], flags, lengths, args.out_dir, args.tee_dtype)
        os.makedirs(args.out_dir, exist_ok=True)
        if len(sweep) > 1:
            table, files = sweep_report(sweep, os.path.join(args.out_dir, "sweep"))
        else:
            table, files = comparison_report(next(iter(sweep.values())), os.path.join(args.out_dir, "comparison"),
                                             privacy)
        write_files(files)
    except (UserError, RunnerFailed) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2 if isinstance(e, UserError) else 1
    print(table)
    for path in files:
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
