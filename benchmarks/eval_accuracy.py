"""Accuracy vs per-worker token budget: does collaboration help on this model?

    python benchmarks/eval_accuracy.py [--model PATH] [--problems benchmarks/data/arithmetic_100.jsonl]
        [--limit K] [--budgets 64 128 256] [--workers 2 4] [--layouts combined interleaved contiguous]
        [--systems single sc:2 hogwild:2:combined ...] [--temperature 0.6] [--top-p 0.95] [--seed 0]
        [--finisher] [--few-shot] [--keep-text] [--out benchmarks/results] [--name eval_accuracy]

Systems, all on one engine with the plugin on (plain requests run on it exactly as in plain vLLM), each at every
budget B (tokens per worker / per sample), all problems of one (system, B) in one ``LLM.generate`` call:
  - ``single``: one plain request per problem (``SamplingParams(n=1, max_tokens=B)``): the model reasoning alone,
    with an ordinary prompt (system message asking for ``\\boxed{}``, then the problem), as a user runs it today;
  - ``sc:N``: self-consistency, one plain request with ``n=N`` (N independent samples, same prompt and per-sample
    budget B), majority vote of the normalised extracted answers (samples without an answer do not vote; a tie
    goes to the tied answer sampled first);
  - ``hogwild:N:LAYOUT``: a hogwild group of N workers (``GroupConfig(workers=N, layout=LAYOUT, max_tokens=B)``),
    the engine's own answer (``GroupOutput.answer``); B counts the forced intro and step headers, and the group
    stops at the first answer. ``hogwild:1:combined`` is a group of one: the groups' prompt, headers and stop
    rule, so it separates the effect of collaboration from that of the prompt.
``single`` is a plain request rather than a group of one because that is the baseline a user has without the
plugin (and the paper's single-thread baseline), and because it makes ``sc:1`` the same system.
Default systems: ``single``, ``sc:N`` and ``hogwild:N:L`` for every N in --workers and L in --layouts.

Answers: the engine's extraction rule, ``hogwild_vllm.layout.find_answer`` (the first balanced ``\\boxed{...}``;
a group's answer already comes from it), compared after ``_scoring.normalize_answer`` ("4,320", "4320.0",
"$4320" all count as 4320). --finisher: a group without an answer runs the engine's finisher (one greedy
continuation after "... the final answer is \\boxed{", up to --finisher-tokens); a plain sample without one gets
the same continuation here, so every system has the same second chance. --few-shot puts
``config.FEW_SHOT_EXAMPLES`` in the groups' system message.

Per (system, B): accuracy, problems answered, wall time of its ``generate`` call(s), forward passes per problem
(groups: ``usage.forward_passes``, the prompt's chunks included, plus the finisher's tokens; plain: the longest
sample's tokens, plus its finisher's) and tokens per problem. Writes ``<name>.csv`` / ``.md`` (command, machine,
versions, settings in the header), ``<name>.png`` (accuracy vs budget, one line per system) and
``<name>_answers.jsonl`` (every problem's extracted answers; with --keep-text also the texts) under --out.

Without CUDA the engine runs in float32, eager, and without chunked prefill: vLLM rewinds a seeded request's
generator after a partial prefill chunk, which CPU generators cannot do.
"""

from __future__ import annotations

import argparse
import functools
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from _report import describe, machine_info, print_table, write_results
from _scoring import ProblemsFileError, load_problems
from _systems import System, make_engine, parse_system, run_system, warm_up
from tqdm import tqdm

from hogwild_vllm.testing import named_model_path

HERE = Path(__file__).resolve().parent
DEFAULT_PROBLEMS = HERE / "data" / "arithmetic_100.jsonl"
LAYOUTS = ("combined", "interleaved", "contiguous")
COLUMNS = ["system", "budget", "problems", "correct", "accuracy", "answered", "wall_s", "forward_passes_mean",
           "tokens_mean"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="model folder or hub id; 'smollm2' (the default): "
                    "SmolLM2-135M-Instruct; "
                    "'tiny': the tiny qwen2 model")
    ap.add_argument("--problems", type=Path, default=DEFAULT_PROBLEMS, help="JSONL: {id, problem, answer} a line")
    ap.add_argument("--limit", type=int, default=None, help="the first K problems only")
    ap.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 256], help="tokens per worker / sample")
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 4], help="N of the default systems")
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=LAYOUTS)
    ap.add_argument("--systems", nargs="+", default=None, metavar="SYSTEM",
                    help="single | sc:N | hogwild:N:LAYOUT (default: single, sc:N, hogwild:N:L from --workers, "
                         "--layouts)")
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--top-p", type=float, default=0.95)
    ap.add_argument("--seed", type=int, default=0, help="problem i's request has seed SEED + i")
    ap.add_argument("--finisher", action="store_true", help="ask once more for the answer where there is none")
    ap.add_argument("--finisher-tokens", type=int, default=16)
    ap.add_argument("--few-shot", action="store_true", help="config.FEW_SHOT_EXAMPLES in the groups' prompt")
    ap.add_argument("--instruction", default="Write the final answer, a number, inside \\boxed{}.",
                    help="appended to every problem (after a blank line), for every system")
    ap.add_argument("--keep-text", action="store_true", help="also write every sample's text / group transcript "
                    "into <name>_answers.jsonl")
    ap.add_argument("--max-model-len", type=int, default=None, help="default: what the longest group needs")
    ap.add_argument("--dtype", default=None, help="default: float32 without CUDA (faster on CPU), else auto")
    ap.add_argument("--kv-cache-gib", type=float, default=2.0, help="VLLM_CPU_KVCACHE_SPACE (CPU builds only)")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--name", default="eval_accuracy", help="stem of the output files")
    args = ap.parse_args(argv)
    if any(b < 1 for b in args.budgets) or (args.limit is not None and args.limit < 1):
        ap.error("--budgets and --limit must be positive")
    specs = args.systems or (["single"] + [f"sc:{n}" for n in args.workers]
                             + [f"hogwild:{n}:{lay}" for n in args.workers for lay in args.layouts])
    try:
        args.system_list = [parse_system(s) for s in specs]
    except ValueError as e:
        ap.error(str(e))
    if args.temperature == 0 and any(s.kind == "sc" and s.workers > 1 for s in args.system_list):
        ap.error("self-consistency (sc:N, N > 1) needs --temperature > 0: greedy samples would all be equal")
    return args


def summarize(system: System, budget: int, records: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    """One CSV row from the per-problem records of one (system, budget)."""
    n = len(records)
    correct = sum(r["correct"] for r in records)
    return {"system": system.label, "kind": system.kind, "layout": system.layout or "", "workers": system.workers,
            "budget": budget, "problems": n, "correct": correct, "accuracy": correct / n,
            "answered": sum(r["answer"] is not None for r in records) / n,
            "errors": sum(r["error"] is not None for r in records), "wall_s": round(wall, 2),
            "forward_passes_mean": sum(r["forward_passes"] for r in records) / n,
            "tokens_mean": sum(r["tokens"] for r in records) / n,
            "finisher_runs": sum(r["finisher_ran"] for r in records)}


def write_outputs(args: argparse.Namespace, rows: list[dict[str, Any]], records: list[dict[str, Any]],
                  header: list[str]) -> Path:
    """The table (printed, Markdown), the CSV, the per-problem answers, and the accuracy-vs-budget plot."""
    import json

    table = print_table(rows, COLUMNS)
    budgets = sorted({r["budget"] for r in rows})
    labels = list(dict.fromkeys(r["system"] for r in rows))
    acc = {(r["system"], r["budget"]): r["accuracy"] for r in rows}
    pivot = ["| system | " + " | ".join(f"B={b}" for b in budgets) + " |", "|" + " --- |" * (len(budgets) + 1)]
    pivot += [f"| {s} | " + " | ".join(f"{100 * acc[s, b]:.1f}" for b in budgets) + " |" for s in labels]
    markdown = "Accuracy (%) by per-worker budget:\n\n" + "\n".join(pivot) + "\n\nAll figures:\n\n" + table
    out = write_results(rows, args.out, args.name, header, markdown)
    with open(out / f"{args.name}_answers.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    series = {s: [100 * acc[s, b] for b in budgets] for s in labels}
    plot_accuracy(series, budgets, out / f"{args.name}.png", f"{Path(args.model).name}, {rows[0]['problems']} "
                  f"problems ({Path(args.problems).name})", f"{header[1]}\n{header[0]}")
    return out


def plot_accuracy(series: dict[str, list[float]], budgets: list[int], path: Path, title: str, footer: str) -> None:
    """Accuracy (%) vs budget (log2 axis), one line per system: hogwild groups solid, baselines dashed, the y axis
    from 0 to 100 so that equal accuracies overlap visibly; a PNG if matplotlib is installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(8.5, 4.4))
    for k, (label, ys) in enumerate(series.items()):
        group = label.startswith("hogwild")
        ax.plot(budgets, ys, label=label, marker="o" if group else "s", linestyle="-" if group else "--",
                markersize=7 - 0.5 * k, alpha=0.85)
    ax.set_xscale("log", base=2)
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.minorticks_off()
    ax.set_ylim(-2, 102)
    ax.set_xlabel("budget: tokens per worker / per sample")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.text(0.01, 0.01, footer, fontsize=5.5, va="bottom")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        problems = load_problems(args.problems, args.limit)
    except ProblemsFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.model = named_model_path(args.model)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{args.kv_cache_gib:g}")
    started, t_start = time.strftime("%Y-%m-%d %H:%M:%S"), time.perf_counter()
    engine = make_engine(args, problems)
    warm_up(engine, problems[0])
    setup = time.perf_counter() - t_start
    rows: list[dict[str, Any]] = []
    records: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    runs = [(b, s) for b in args.budgets for s in args.system_list]
    bar = tqdm(runs, desc="systems x budgets", unit="run")
    for budget, system in bar:
        bar.set_postfix_str(f"{system.label} B={budget}")
        t0 = time.perf_counter()
        progress = functools.partial(tqdm, leave=False, position=1, desc=f"{system.label} B={budget}")
        recs = run_system(engine, system, problems, budget, progress)
        rows.append(summarize(system, budget, recs, time.perf_counter() - t0))
        drop = () if args.keep_text else ("texts",)
        records += [{"system": system.label, "budget": budget, **{k: v for k, v in r.items() if k not in drop}}
                    for r in recs]
        row = rows[-1]
        errors = f", {row['errors']} groups refused (see error in the answers file)" if row["errors"] else ""
        tqdm.write(f"{system.label:<24} B={budget:<6} accuracy {row['accuracy']:.3f} "
                   f"({row['correct']}/{len(problems)}), {row['wall_s']:.1f} s{errors}")
    total = time.perf_counter() - t_all
    info = machine_info()
    header = [f"command: python {shlex.join(['benchmarks/eval_accuracy.py', *(argv or sys.argv[1:])])}",
              f"machine: {describe(info)}", f"date: {started}; engine start and warm-up {setup:.0f} s, then systems x "
              f"budgets {total:.0f} s", *engine.describe(args, problems)]
    out = write_outputs(args, rows, records, header)
    print(f"wrote {out / args.name}.csv / .md / .png / _answers.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
