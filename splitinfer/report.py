"""Comparison report from runner JSONs: a Markdown table, a CSV and a PNG, for one length or a sweep.

Everything is rendered in memory first and only then written (each file atomically), so a failure
leaves no partial report behind.
"""
from __future__ import annotations

import csv
import io
import json

from splitinfer.errors import UserError
from splitinfer.files import read_json, write_atomically

METHODS = ("optimized", "ours", "otp", "tee_only")  # report order; "optimized" is the plain split
PLAIN, TEE_ONLY = "optimized", "tee_only"
CATEGORIES = (("transfer", "total_transfer_ms"), ("gpu", "gpu_compute_ms"), ("cpu", "cpu_compute_ms"),
              ("crypto", "total_crypto_ms"), ("other", "other_ms"))
COLORS = {"transfer": "#4c72b0", "gpu": "#55a868", "cpu": "#c44e52", "crypto": "#8172b2", "other": "#937860"}


def load_result(path: str) -> dict:
    result = read_json(path, "result file")
    if "timing" not in result or "benchmark_info" not in result:
        raise UserError(f"'{path}' is not a runner result (no timing or benchmark_info block)")
    return result


def load_privacy(path: str) -> dict[str, str]:
    """runner -> "best attack: rate" from an evaluate_leakage.py result."""
    try:
        with open(path) as f:
            leakage = json.load(f)
        return {r["runner"]: f"{100 * r['best']['token_recovery_rate']:.0f}% ({r['best']['attack']})"
                for r in leakage["schemes"].values()}
    except FileNotFoundError:
        raise UserError(f"leakage file '{path}' does not exist") from None
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"'{path}' is not an evaluate_leakage.py result: {e}") from None


def warm_median(result: dict) -> float | None:
    """The median of a runner's repeated inferences that timed only their total (`--repeat`), or None."""
    return result.get("steady_state", {}).get("uninstrumented_total_ms", {}).get("median")


def split_configuration(result: dict) -> str | None:
    """A split runner's CUDA graphs and fused hops as it ran: those on, joined by '+', or 'neither'; '(set-up)'
    after it where set-up chose them (auto). None for the TEE-only runner, and for results that predate them."""
    info = result["benchmark_info"]
    if info.get("scheme") == "tee_only" or "cuda_graphs" not in info:
        return None
    on = "+".join(name for name, key in (("cuda_graphs", "cuda_graphs"), ("fuse_hops", "fused_hops")) if info.get(key))
    on = on or "neither"  # named as set-up's ways are (`SplitLlama.choose_configuration`)
    return on + (" (set-up)" if info.get("configuration") else "")


def comparison_rows(results: dict[str, dict], privacy: dict[str, str] | None = None) -> list[dict]:
    """One row per method: total, each category, offline, overhead against the plain split, speedup
    against the TEE-only runner (of the timed inference, a process's first unless `--warmup`); where every
    runner repeated (`--repeat`), the warm median and the same two ratios of it; each split runner's
    `split_configuration`; the TEE-only runner's attention form, logit error and top-1, and with `privacy` the
    best attack's token recovery rate from the leakage evaluation."""
    plain = results[PLAIN]["timing"]["total_ms"] if PLAIN in results else None
    tee = results[TEE_ONLY]["timing"]["total_ms"] if TEE_ONLY in results else None
    warm = {method: warm_median(r) for method, r in results.items()}
    repeated = all(ms is not None for ms in warm.values())
    rows = []
    for method in sorted(results, key=lambda m: METHODS.index(m) if m in METHODS else len(METHODS)):
        r = results[method]
        t, info, corr = r["timing"], r["benchmark_info"], r["correctness"]
        row = {"method": method, "tokens": info["prefill_length"], "batch": info["batch_size"],
               "dtype": info["dtype"], "device": info["gpu_device"], "total_ms": t["total_ms"]}
        row.update({f"{name}_ms": t[key] for name, key in CATEGORIES})
        row["overlap_ms"] = t.get("overlap_ms", 0.0)  # results from before overlap_ms existed had none
        row["offline_ms"] = t["offline_ms"]
        row["overhead_vs_plain"] = t["total_ms"] / plain if plain and method != TEE_ONLY else None
        row["speedup_vs_tee_only"] = tee / t["total_ms"] if tee and method != TEE_ONLY else None
        if repeated:
            row["warm_median_ms"] = warm[method]
            row["warm_overhead_vs_plain"] = warm[method] / warm[PLAIN] if PLAIN in warm and method != TEE_ONLY else None
            row["warm_speedup_vs_tee_only"] = (warm[TEE_ONLY] / warm[method] if TEE_ONLY in warm and method != TEE_ONLY
                                               else None)
        row["configuration"] = split_configuration(r)
        row["tee_attention"] = r["environment"].get("tee_attention")  # the TEE-only runner's form (set-up chose it)
        row["rel_logit_error"] = None if corr.get("skipped") else corr["rel_logit_error"]
        row["top1_agreement"] = None if corr.get("skipped") else corr["top1_agreement"]
        if privacy is not None:
            row["best_attack_recovery"] = privacy.get(method)
        rows.append(row)
    return rows


def _cell(value) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.2e}" if 0 < abs(value) < 1e-2 else f"{value:.2f}"
    return str(value)


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def csv_text(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    return out.getvalue()


def _title(results: dict[str, dict]) -> str:
    info = next(iter(results.values()))["benchmark_info"]
    env = next(iter(results.values()))["environment"]
    where = env.get("gpu") or "no GPU: the GPU side ran on the CPU"
    return f"{info['model']} · {info['dtype']} · batch {info['batch_size']} · {where}"


def breakdown_png(rows: list[dict], title: str) -> bytes:
    """Stacked bars of where each method's time went; offline time drawn apart, since it is not in the total.
    Where copies overlapped TEE work, the bar is that much taller than the total it is labelled with."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    positions = list(range(len(rows)))
    bottom = [0.0] * len(rows)
    for name, _ in CATEGORIES:
        values = [r[f"{name}_ms"] for r in rows]
        ax.bar([x - 0.12 for x in positions], values, width=0.55, bottom=bottom, label=name, color=COLORS[name])
        bottom = [b + v for b, v in zip(bottom, values)]
    offline = [r["offline_ms"] for r in rows]
    if any(offline):
        ax.bar([x + 0.3 for x in positions], offline, width=0.2, fill=False, hatch="//",
               label="offline (not in total)")
    for x, top, r in zip(positions, bottom, rows):
        shared = f"\n({r['overlap_ms']:.1f} overlapped)" if r["overlap_ms"] else ""
        ax.annotate(f"{r['total_ms']:.1f} ms{shared}", (x - 0.12, top), ha="center", va="bottom", fontsize=8)
    ax.set_xticks(positions, [r["method"] for r in rows])
    ax.set_ylabel("time per inference (ms)")
    ax.set_title(f"{rows[0]['tokens']} tokens · {title}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def sweep_rows(sweep: dict[int, dict[str, dict]]) -> list[dict]:
    """Long format: one comparison row per (length, method), ready to plot."""
    return [row for length in sorted(sweep) for row in comparison_rows(sweep[length])]


def sweep_summary(sweep: dict[int, dict[str, dict]]) -> list[dict]:
    """One row per length: each method's total, masked overheads, and speedups against TEE-only."""
    rows = []
    for length in sorted(sweep):
        by_method = {r["method"]: r for r in comparison_rows(sweep[length])}
        row = {"tokens": length}
        row.update({f"{m} ms": r["total_ms"] for m, r in by_method.items()})
        row.update({f"{m}/plain": r["overhead_vs_plain"] for m, r in by_method.items() if m in ("ours", "otp")})
        row.update({f"{m} speedup vs TEE": r["speedup_vs_tee_only"] for m, r in by_method.items()
                    if r["speedup_vs_tee_only"] is not None})
        row.update({f"{m} warm ms": r["warm_median_ms"] for m, r in by_method.items() if "warm_median_ms" in r})
        row.update({f"{m}/plain warm": r["warm_overhead_vs_plain"] for m, r in by_method.items()
                    if m in ("ours", "otp") and r.get("warm_overhead_vs_plain") is not None})
        row.update({f"{m} speedup vs TEE warm": r["warm_speedup_vs_tee_only"] for m, r in by_method.items()
                    if r.get("warm_speedup_vs_tee_only") is not None})
        rows.append(row)
    return rows


def scaling_png(sweep: dict[int, dict[str, dict]], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=120)
    methods = [m for m in METHODS if all(m in sweep[n] for n in sweep)]
    lengths = sorted(sweep)
    for method in methods:
        ax.plot(lengths, [sweep[n][method]["timing"]["total_ms"] for n in lengths], marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("prefill tokens")
    ax.set_ylabel("time per inference (ms)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def write_files(files: dict[str, bytes | str]) -> None:
    """Write every rendered file; each lands whole or not at all."""
    for path, content in files.items():
        data = content.encode() if isinstance(content, str) else content
        write_atomically(path, lambda f, data=data: f.write(data))


def comparison_report(results: dict[str, dict], stem: str,
                      privacy: dict[str, str] | None = None) -> tuple[str, dict[str, bytes | str]]:
    """(Markdown table, files to write) for one length: STEM.md, STEM.csv, STEM.png."""
    rows = comparison_rows(results, privacy)
    table = markdown_table(rows)
    return table, {f"{stem}.md": f"# {_title(results)}\n\n{table}", f"{stem}.csv": csv_text(rows),
                   f"{stem}.png": breakdown_png(rows, _title(results))}


def sweep_report(sweep: dict[int, dict[str, dict]], stem: str) -> tuple[str, dict[str, bytes | str]]:
    """(Markdown table, files to write) across lengths: STEM.md, STEM.csv (long format), STEM.png."""
    title = _title(next(iter(sweep.values())))
    table = markdown_table(sweep_summary(sweep))
    return table, {f"{stem}.md": f"# {title}\n\n{table}", f"{stem}.csv": csv_text(sweep_rows(sweep)),
                   f"{stem}.png": scaling_png(sweep, title)}
