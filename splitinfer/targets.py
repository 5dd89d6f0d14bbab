"""The performance issue's targets, judged from a benchmark's files: met, not met, or not judged.

    python -m splitinfer.targets OUT_DIR     # after gpu_benchmark.sh OUT_DIR, or perf --out-dir OUT_DIR

Reads OUT_DIR/perf.json (the in-process comparison) and, where there is one, OUT_DIR/runners.json (each runner
in its own process: first inference, memory, bytes). A comparison on a GPU is judged against the GPU targets,
one on the CPU fallback against the CPU-only ones. Each target's row carries its figure, its limit, whether it is
met, and where the figure came from (for a ratio of two methods timed side by side, its middle half round by
round too); a target whose figure is missing, or that is stated for another model or
length, is `not judged`. Beside the shipped runners, each ratio and time also names the fastest configuration
that was measured (`best`: a variant such as `ours_fused_hops_cuda_graphs`), so a run shows what making a
variant the default would buy. Writes OUT_DIR/targets.json and OUT_DIR/targets.md, and prints the table.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import asdict, dataclass

from splitinfer.errors import OneLineParser, UserError, one_line_errors
from splitinfer.files import read_json, write_atomically, write_json
from splitinfer.report import warm_median

SPLIT = ("optimized", "ours", "otp")
TARGET_MODEL = "preset:llama-3.2-1b"
PLAIN_MS = {128: 15.0, 512: 60.0}  # the plain split's warm median on the GPU, by length
OVER_PLAIN = {"ours": 1.25, "otp": 2.0}  # on the GPU
CPU_OVER_PLAIN = {"ours": 1.3, "otp": 1.6}  # on the CPU fallback, float32, 128 tokens
CPU_PLAIN_OVER_TRANSFORMERS = 1.25
SPEEDUP_VS_TEE_ONLY = 5.0
FIRST_MINUS_WARM_MS = 150.0
PEAK_RSS_MIB = {"optimized": 1536.0, "ours": 1536.0, "otp": 4096.0}  # TARGET_MODEL at 512 tokens
EXCESS_BYTES = 0.10
# a runner's configurations that may be shipped: the runner itself and these variants of it (not the ablations
# that undo a measure, such as pageable copies, the full scores or otp's table read from the GPU, nor ours with its
# own table, which its memory target rules out)
VARIANT = re.compile(r"_(cuda_graphs|fused_hops|fused_hops_cuda_graphs|eager_kernels|all_compiled|overlap|blocks128|"
                     r"copy_streams|no_cpp_kernels|cpp_kernels|threads\d+)")
SAME_FUNCTION = 1e-2  # a variant whose logits differ from the plain split's by more is not counted as a configuration


@dataclass
class Row:
    target: str
    tokens: int | None
    figure: float | None
    limit: float | None  # None: no limit stated at this length
    met: bool | None  # None: not judged
    source: str
    best: str = ""  # the fastest configuration measured, where it is not the shipped runner
    rounds: str = ""  # a ratio taken round by round, where its two methods were timed side by side (`per_round`)


def load(path: str, required: bool = True) -> dict | None:
    if not os.path.isfile(path):
        if required:
            raise UserError(f"'{path}' does not exist (run gpu_benchmark.sh or splitinfer.perf into that folder first)")
        return None
    return read_json(path, "benchmark file")


def judged(figure: float | None, limit: float, at_most: bool = True) -> bool | None:
    if figure is None:
        return None
    return figure <= limit if at_most else figure >= limit


def configurations(row: dict, runner: str) -> dict[str, float]:
    """A runner's measured configurations at one length: name -> warm median ms (the runner and its variants)."""
    out = {}
    for name, r in row.items():
        if name != runner and not (name.startswith(runner + "_") and VARIANT.fullmatch(name[len(runner):])):
            continue
        if "error" in r or "median_ms" not in r or (r.get("rel_diff_from_optimized") or 0.0) > SAME_FUNCTION:
            continue
        out[name] = r["median_ms"]
    return out


def fastest(row: dict, runner: str) -> tuple[str, float] | None:
    found = configurations(row, runner)
    return min(found.items(), key=lambda kv: kv[1]) if found else None


def best_note(best: tuple[str, float] | None, runner: str, text: str) -> str:
    return "" if best is None or best[0] == runner else text


def median(row: dict, method: str) -> float | None:
    r = row.get(method, {})
    return None if "error" in r else r.get("median_ms")


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def per_round(row: dict, a: str, b: str) -> str:
    """a ÷ b inference by inference, where perf timed the two side by side (b in a's `timed_with`: their `runs_ms`
    pair up round by round), as the middle half of those ratios and how many rounds there were. A drift in the
    host's speed from round to round cancels in each pair, so this is how far the figure can be trusted."""
    first, second = row.get(a, {}), row.get(b, {})
    if b not in first.get("timed_with", []) or not first.get("runs_ms") or not second.get("runs_ms"):
        return ""
    pairs = sorted(x / y for x, y in zip(first["runs_ms"], second["runs_ms"]))
    low, high = pairs[len(pairs) // 4], pairs[(3 * len(pairs) - 1) // 4]
    return f"{low:.2f}–{high:.2f} ({len(pairs)} round{'' if len(pairs) == 1 else 's'})"


def as_run(row: dict, method: str) -> str:
    """A method's name, with what set-up kept of the options left to it where it chose (`configuration`)."""
    kept = (row.get(method, {}).get("configuration") or {}).get("kept")
    return f"{method} [{kept}]" if kept else method


def runners_finished(path: str, lengths: str) -> bool:
    """Whether the perf run that wrote `path` timed the three split runners at every length of 'N,N,...', none of
    them failed (`gpu_benchmark.sh` runs the headline without CUDA graphs where the overhead floor's run did not)."""
    try:
        rows = read_json(path, "perf result")["lengths"]
    except (UserError, KeyError, TypeError):
        return False
    return all(isinstance(rows.get(n), dict) and all("error" not in rows[n].get(runner, {"error": "missing"})
                                                     for runner in SPLIT) for n in lengths.split(","))


def gpu_rows(perf: dict) -> list[Row]:
    """The GPU targets from the comparison, judged for TARGET_MODEL at 128 and 512 tokens: the plain split's time,
    each masked runner over it, and every split runner against the TEE-only baseline."""
    rows, model = [], perf["setup"]["model"]
    for n_text, row in perf["lengths"].items():
        n = int(n_text)
        plain, fastest_of = median(row, "optimized"), {runner: fastest(row, runner) for runner in SPLIT}
        plain_best = fastest_of["optimized"]
        stated = model == TARGET_MODEL and n in PLAIN_MS  # the GPU targets' model and lengths
        rows.append(Row("plain split, warm ms", n, plain, PLAIN_MS.get(n),
                        judged(plain, PLAIN_MS[n]) if stated else None, f"perf.json: {as_run(row, 'optimized')}",
                        best_note(plain_best, "optimized", f"{plain_best[0]}: {plain_best[1]:.1f} ms" if plain_best else "")))
        for runner, limit in OVER_PLAIN.items():
            value, best = ratio(median(row, runner), plain), fastest_of[runner]
            note = ""
            if best is not None and plain_best is not None and (best[0], plain_best[0]) != (runner, "optimized"):
                note = f"{best[0]} ÷ {plain_best[0]}: {best[1] / plain_best[1]:.2f}"
            rows.append(Row(f"{runner} ÷ plain", n, value, limit, judged(value, limit) if stated else None,
                            f"perf.json: {as_run(row, runner)} / {as_run(row, 'optimized')}", note,
                            per_round(row, runner, "optimized")))
        tee_only = median(row, "tee_only")
        for runner in SPLIT:
            value, best = ratio(tee_only, median(row, runner)), fastest_of[runner]
            rows.append(Row(f"{runner}: speedup over TEE-only", n, value, SPEEDUP_VS_TEE_ONLY,
                            judged(value, SPEEDUP_VS_TEE_ONLY, at_most=False) if stated else None,
                            f"perf.json: tee_only / {as_run(row, runner)}",
                            best_note(best, runner, f"{best[0]}: {tee_only / best[1]:.1f}×" if best and tee_only else ""),
                            per_round(row, "tee_only", runner)))
    return rows


def split_runs(runners: dict | None) -> list[tuple[str, str, dict]]:
    """(name, runner, result) of each split runner's process in runners.json (named RUNNER_nLENGTH), by name."""
    runs = [(name, name.rsplit("_n", 1)[0], result) for name, result in sorted((runners or {}).items())]
    return [run for run in runs if run[1] in SPLIT]


def first_inference_rows(perf: dict, runners: dict | None, on_gpu: bool) -> list[Row]:
    """First inference minus the warm one, from the runners' own processes where there are some (a fresh process,
    as a researcher runs one), else from the comparison's (its first inference after each engine's set-up). Judged
    on a GPU only: the target is the device's first use after its set-up."""
    rows = []
    if runners:
        for name, runner, result in split_runs(runners):
            warm = warm_median(result)
            value = None if warm is None else result["timing"]["total_ms"] - warm
            info = result["benchmark_info"]
            rows.append(Row(f"{runner}: first inference − warm, ms", info["prefill_length"], value,
                            FIRST_MINUS_WARM_MS, judged(value, FIRST_MINUS_WARM_MS) if ran_on_gpu(info) else None,
                            f"runners.json: {name}"))
        return rows
    for n, row in perf["lengths"].items():
        for runner in SPLIT:
            value = row.get("ratios", {}).get(f"{runner}_first_minus_warm_ms")
            rows.append(Row(f"{runner}: first inference − warm, ms", int(n), value, FIRST_MINUS_WARM_MS,
                            judged(value, FIRST_MINUS_WARM_MS) if on_gpu else None, "perf.json: first_ms − median_ms"))
    return rows


def runner_rows(runners: dict | None) -> list[Row]:
    """Peak host memory (judged for TARGET_MODEL at 512 tokens on a GPU: on the CPU fallback the host holds the
    "GPU's" weights too) and bytes over the placement's minimum."""
    rows = []
    for name, runner, result in split_runs(runners):
        info = result["benchmark_info"]
        n = info["prefill_length"]
        of_target = info["model"] == TARGET_MODEL and n == 512 and ran_on_gpu(info)
        memory = result["memory"]
        rss = memory["peak_host_rss_mb"]
        rows.append(Row(f"{runner}: peak host RSS, MiB", n, rss, PEAK_RSS_MIB[runner],
                        judged(rss, PEAK_RSS_MIB[runner]) if of_target else None,
                        f"runners.json: {name}" + where_memory_peaked(memory)))
        excess = result["data_transfer"].get("excess_over_minimum")
        rows.append(Row(f"{runner}: bytes over the minimum", n, excess, EXCESS_BYTES, judged(excess, EXCESS_BYTES),
                        f"runners.json: {name}"))
    return rows


def where_memory_peaked(memory: dict) -> str:
    """The phase a runner's host peak was reached in, and the pinned cache's own peak, where its JSON has them."""
    pinned = memory.get("pinned_host_mb")
    return ((f"; reached in {memory['peak_reached_in']}" if memory.get("peak_reached_in") else "")
            + (f"; pinned cache peak {pinned['peak']:.0f} MiB" if pinned else ""))


def ran_on_gpu(info: dict) -> bool:
    """Whether a run's GPU side was a GPU (its `setup` in perf.json, `benchmark_info` in a runner's JSON)."""
    return not info.get("gpu_fallback_to_cpu", True)


def cpu_rows(perf: dict) -> list[Row]:
    """The CPU-only targets: float32, 128 tokens, on the default model or TARGET_MODEL."""
    rows, setup = [], perf["setup"]
    # the default model by how it was loaded (its name is only for display), or the 1B preset
    of_model = setup.get("model_source") == "default" or setup["model"] == TARGET_MODEL
    of_target = of_model and setup["dtype"] == "float32"
    for n_text, row in perf["lengths"].items():
        n = int(n_text)
        judge = of_target and n == 128
        plain = median(row, "optimized")
        value = ratio(plain, median(row, "transformers_cpu"))
        rows.append(Row("plain split ÷ transformers (CPU)", n, value, CPU_PLAIN_OVER_TRANSFORMERS,
                        judged(value, CPU_PLAIN_OVER_TRANSFORMERS) if judge else None,
                        "perf.json: optimized / transformers_cpu", rounds=per_round(row, "optimized", "transformers_cpu")))
        for runner, limit in CPU_OVER_PLAIN.items():
            value = ratio(median(row, runner), plain)
            rows.append(Row(f"{runner} ÷ plain (CPU)", n, value, limit, judged(value, limit) if judge else None,
                            f"perf.json: {runner} / optimized", rounds=per_round(row, runner, "optimized")))
    return rows


def scorecard(folder: str) -> dict:
    perf = load(os.path.join(folder, "perf.json"))
    runners = load(os.path.join(folder, "runners.json"), required=False)
    if "lengths" not in perf or "setup" not in perf:
        raise UserError(f"'{os.path.join(folder, 'perf.json')}' is not a splitinfer.perf result")
    on_gpu = ran_on_gpu(perf["setup"])
    rows = gpu_rows(perf) if on_gpu else cpu_rows(perf)
    rows += first_inference_rows(perf, runners, on_gpu) + runner_rows(runners)
    env = perf.get("environment", {})
    return {"folder": os.path.abspath(folder), "on_gpu": on_gpu, "gpu": env.get("gpu"), "cpu": env.get("cpu"),
            "threads": env.get("threads"), "model": perf["setup"]["model"], "dtype": perf["setup"]["dtype"],
            "incomplete": perf.get("incomplete"),
            "met": sum(r.met is True for r in rows), "not_met": sum(r.met is False for r in rows),
            "not_judged": sum(r.met is None for r in rows), "targets": [asdict(r) for r in rows]}


def number(x: float | None) -> str:
    return "—" if x is None else f"{x:.3g}" if abs(x) < 1 else f"{x:.2f}"


def markdown(card: dict) -> str:
    where = f"GPU: {card['gpu']}" if card["on_gpu"] else "no GPU (the CPU fallback: CPU-only targets)"
    lines = [f"Targets from {card['folder']}: {card['model']}, {card['dtype']}; {where}; CPU: {card['cpu']}, "
             f"{card['threads']} threads.",
             f"{card['met']} met, {card['not_met']} not met, {card['not_judged']} not judged"
             + (f"; the comparison stopped early: {card['incomplete']}" if card["incomplete"] else "") + ".", "",
             "| target | tokens | figure | limit | met | round by round, middle half | fastest configuration measured "
             "| from |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in card["targets"]:
        met = {True: "yes", False: "no", None: "not judged"}[r["met"]]
        lines.append(f"| {r['target']} | {r['tokens']} | {number(r['figure'])} | {number(r['limit'])} | {met} | "
                     f"{r['rounds']} | {r['best']} | {r['source']} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="splitinfer.targets", description=__doc__.split("\n\n")[0])
    p.add_argument("folder", help="a benchmark's output folder, holding perf.json (and runners.json, if any)")
    return p


@one_line_errors
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    card = scorecard(args.folder)
    text = markdown(card)
    write_json(os.path.join(args.folder, "targets.json"), card)
    write_atomically(os.path.join(args.folder, "targets.md"), lambda f: f.write(text.encode()))
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
