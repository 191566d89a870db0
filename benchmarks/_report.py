"""Shared by the benchmarks: their options, the problem they run, and their output (a printed table, a CSV and a
bar plot, PNG, if matplotlib is installed)."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path
from typing import Any

PROBLEM = "A farmer has 17 sheep and buys 5 more each week. How many sheep after 6 weeks?"


def parse_args(doc: str | None, tokens: int, tokens_help: str) -> argparse.Namespace:
    """The options every benchmark takes: --model, --workers, --tokens, --out."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model path (default: the project's tiny qwen2 model)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--tokens", type=int, default=tokens, help=tokens_help)
    ap.add_argument("--out", default="results")
    return ap.parse_args()


def write_report(rows: list[dict[str, Any]], environment: str, out_dir: str, name: str, title: str) -> None:
    """rows: dicts with at least ``run``, ``workers``, ``tokens``, ``tokens_per_s`` and ``ratio`` (vs the baseline);
    writes ``<out_dir>/<name>.csv`` and ``<out_dir>/<name>.png``; grey bars for runs named ``plain ...``."""
    print(environment)
    print(f"{'run':<16}{'workers':>8}{'tokens':>8}{'tok/s':>10}{'vs baseline':>13}")
    for r in rows:
        print(f"{r['run']:<16}{r['workers']:>8}{r['tokens']:>8}{r['tokens_per_s']:>10.1f}{r['ratio']:>13.2f}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{name}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) + ["environment"])
        w.writeheader()
        w.writerows({**r, "environment": environment} for r in rows)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 3.5))
    colors = ["tab:gray" if str(r["run"]).startswith("plain") else "tab:blue" for r in rows]
    ax.bar([r["run"] for r in rows], [r["tokens_per_s"] for r in rows], color=colors)
    ax.set_ylabel("total tokens / s")
    ax.set_title(title, fontsize=10)
    fig.text(0.01, 0.01, environment, fontsize=6)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(out / f"{name}.png", dpi=120)
