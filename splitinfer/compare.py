"""Print result JSONs side by side: `python -m splitinfer.compare NAME=FILE [NAME=FILE ...]`."""
from __future__ import annotations

import json
import sys

COLUMNS = (("total ms", "total_ms"), ("transfer", "total_transfer_ms"), ("gpu", "gpu_compute_ms"),
           ("cpu", "cpu_compute_ms"), ("crypto", "total_crypto_ms"), ("other", "other_ms"), ("offline", "offline_ms"))


def load(pairs: list[str]) -> list[tuple[str, dict]]:
    rows = []
    for pair in pairs:
        name, _, path = pair.partition("=")
        try:
            with open(path) as f:
                rows.append((name, json.load(f)))
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"error: cannot read result '{path}': {e}")
    return rows


def table(rows: list[tuple[str, dict]]) -> str:
    header = ["runner", *(c for c, _ in COLUMNS), "rel err", "top-1", "device", "dtype"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, r in rows:
        t, info, corr = r["timing"], r["benchmark_info"], r["correctness"]
        err = "skipped" if corr.get("skipped") else f"{corr['rel_logit_error']:.2e}"
        top1 = "" if corr.get("skipped") else f"{corr['top1_agreement']:.2f}"
        cells = [name, *(f"{t[k]:.1f}" for _, k in COLUMNS), err, top1, info["gpu_device"], info["dtype"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m splitinfer.compare NAME=RESULT.json [NAME=RESULT.json ...]", file=sys.stderr)
        return 2
    print(table(load(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
