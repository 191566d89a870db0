"""A hogwild group's per-step Python planning, piece by piece, against the same code at a git revision.

    python benchmarks/bench_planning.py [--workers 2 4 8] [--prompt 1024] [--history 40] [--steps 100]
        [--repeats 5] [--baseline REV | --baseline ''] [--out benchmarks/results]

No model and no engine: a :class:`~hogwild_vllm.layout.GroupState` is driven with scripted samples, the way the
scheduler and the HOGWILD metadata builder drive it in a decode step. Each repeat starts a fresh group (combined
layout, default templates, a ``--prompt``-token common prompt) and commits short steps, untimed, until ``--history``
steps are committed; then ``--steps`` decode steps are timed, with every worker ending a step every 48 to 104
sampled tokens (so a few commits fall inside the timed window and the history grows by about
``steps * workers / 70``). Per step, each piece once, timed with ``time.perf_counter``:

* ``plan_pass``:   ``GroupState.plan_pass()`` (scheduler): every worker's fed tokens, view and queries;
* ``plan_rows``:   ``metadata.plan_rows(state, names, plans=...)`` (scheduler): the rows sent to the workers;
* ``payload``:     ``HogwildStepMeta`` made (rows, ``extra_blocks`` for ``unscheduled_sources(rows)``: the prompt
                   request's blocks, forced headers), pickled and unpickled (scheduler -> worker process);
* ``build_table``: ``metadata.plain_runs`` + ``metadata.build_table`` (the CPU builder calls both) over a batch of
                   two plain decode rows and the group's rows, with the unpickled payload;
* ``on_sampled``:  ``GroupState.mark_fed()`` + ``GroupState.on_sampled(tokens)`` (scheduler);
* ``total``:       their sum.

The codec is a stand-in for a BPE tokenizer (about four characters a token; a step ends with one ``".\\n\\n"``
token). ``--baseline REV`` loads ``hogwild_vllm`` as committed at REV (``git archive``, renamed ``hogwild_base``, so
both live in one process and pickle as themselves) and runs it beside the working tree on the same scripted
samples, step by step in turn, so that load changes on the machine hit both alike; the table then gives before /
after / ratio (by default REV is the last commit before the planning work of issue 7). Times: medians over
``repeats * steps`` steps; also the pickled payload's size, the view's segments and the committed steps. Writes
``<name>.csv`` / ``.md`` / ``.png`` under --out.
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import io
import pickle
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import torch
from _report import describe, line_panels, machine_info, print_table, write_results

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PIECES = ("plan_pass", "plan_rows", "payload", "build_table", "on_sampled")
WORDS = (" the", " sheep", " are", " 17", " plus", " 5", ",", " so", " each", " week", " makes", " 47")
STEP_END = ".\n\n"
WARMUP_STEP = 6  # sampled tokens per step while the history is being built
BLOCK_SIZE = 16
PLAIN_ROWS = ((777, "plain-a"), (1503, "plain-b"))  # (tokens after this step, request id): decode rows
BEFORE_ISSUE_7 = "53eb182"  # the last commit before the planning work of issue 7: the default baseline


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--prompt", type=int, default=1024, help="common prompt tokens")
    ap.add_argument("--history", type=int, default=40, help="committed steps before the timed steps")
    ap.add_argument("--steps", type=int, default=100, help="timed decode steps a repeat")
    ap.add_argument("--repeats", type=int, default=5, help="fresh groups per worker count")
    ap.add_argument("--baseline", default=BEFORE_ISSUE_7,
                    help="git revision timed beside the working tree ('' for the working tree alone)")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--name", default="bench_planning")
    return ap.parse_args()


class WordCodec:
    """Text in pieces the size of BPE tokens (a ``".\\n\\n"`` ending, an optional space and up to four letters or
    digits, or one other character); ids are handed out in order of first use."""

    PIECE = re.compile(r"[.?!]\n\n|\n\n|\s?[A-Za-z0-9]{1,4}|.", re.DOTALL)

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}
        self.texts: list[str] = []

    def id(self, piece: str) -> int:
        tok = self.ids.get(piece)
        if tok is None:
            tok = self.ids[piece] = len(self.texts)
            self.texts.append(piece)
        return tok

    def encode(self, text: str) -> list[int]:
        return [self.id(p) for p in self.PIECE.findall(text)]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.texts[i] for i in ids)


def load_at(rev: str) -> ModuleType:
    """``hogwild_vllm`` as committed at ``rev``, imported as the package ``hogwild_base`` from a temporary folder
    (every ``hogwild_vllm`` in its sources renamed), without the compiled extension."""
    tar = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "hogwild_vllm"], check=True,
                         capture_output=True).stdout
    folder = Path(tempfile.mkdtemp(prefix="bench_planning_"))
    atexit.register(shutil.rmtree, folder, True)
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        archive.extractall(folder, filter="data")
    (folder / "hogwild_vllm").rename(folder / "hogwild_base")
    for path in (folder / "hogwild_base").rglob("*.py"):
        path.write_text(re.sub(r"\bhogwild_vllm\b", "hogwild_base", path.read_text()))
    sys.path.insert(0, str(folder))
    try:
        return importlib.import_module("hogwild_base")
    finally:
        sys.path.remove(str(folder))


@dataclass
class Impl:
    """One version of the code: its modules."""

    label: str
    config: ModuleType
    layout: ModuleType
    metadata: ModuleType

    @classmethod
    def of(cls, label: str, package: str) -> Impl:
        mods = [importlib.import_module(f"{package}.{m}") for m in ("config", "layout", "metadata")]
        return cls(label, *mods)


@dataclass
class Run:
    """One group driven by one implementation, and its per-piece times (seconds, one entry a timed step)."""

    impl: Impl
    state: Any
    names: dict[int, str]
    times: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PIECES})
    payload: list[int] = field(default_factory=list)  # pickled bytes a step
    segments: list[int] = field(default_factory=list)  # segments of worker 0's view a step


def new_run(impl: Impl, workers: int, prompt_len: int, codec: WordCodec) -> Run:
    cfg = impl.config.GroupConfig(workers=workers, max_tokens=1_000_000, collab_check_every=1024)
    state = impl.layout.GroupState(cfg, prompt_len, codec)
    names = impl.metadata.source_names(state, [f"g::w{w}" for w in range(workers)], "g::prompt")
    return Run(impl, state, names)


def samples(state: Any, k: int, history: int) -> list[int]:
    """One token a worker for pass ``k``: a step ends after WARMUP_STEP sampled tokens until ``history`` steps are
    committed, then after 48 + 8 * (w mod 8) sampled tokens."""
    long = len(state.history) >= history
    out = []
    for w, log in enumerate(state.workers):
        sampled = log.forced[log.step_start:].count(False)
        end = sampled >= (48 + 8 * (w % 8) if long else WARMUP_STEP)
        out.append(state.codec.id(STEP_END if end else WORDS[(k + 3 * w) % len(WORDS)]))
    return out


def step(run: Run, tokens: list[int], prompt_blocks: tuple[int, ...], forced: dict[str, tuple[int, ...]],
         timed: bool) -> None:
    """One decode step of the scheduler and the builder; each piece timed when ``timed``."""
    m, state = run.impl.metadata, run.state
    clock = time.perf_counter
    t0 = clock()
    plans = state.plan_pass()
    t1 = clock()
    rows = m.plan_rows(state, run.names, plans=plans)
    t2 = clock()
    extra = {rid: prompt_blocks for rid in m.unscheduled_sources(rows)}
    meta = m.HogwildStepMeta(rows=rows, extra_blocks=extra, forced=forced)
    blob = pickle.dumps(meta, protocol=pickle.HIGHEST_PROTOCOL)
    got = pickle.loads(blob)
    t3 = clock()
    # The runner's batch: two plain decode rows, then the workers (one row each, its fed tokens as queries).
    ids = [rid for _, rid in PLAIN_ROWS] + [run.names[w] for w in range(len(plans))]
    q_lens = [1] * len(PLAIN_ROWS) + [len(p.tokens) for p in plans]
    lens = [n for n, _ in PLAIN_ROWS] + [state.prompt_len + len(log.tokens) for log in state.workers]
    qsl = [0]
    for q in q_lens:
        qsl.append(qsl[-1] + q)
    block_table = torch.zeros(len(ids), 4096 // BLOCK_SIZE, dtype=torch.int32)  # [num_reqs, max_blocks]
    t4 = clock()
    m.plain_runs(got, ids, qsl, lens)
    m.build_table(got, ids, qsl, lens, block_table, device="cpu")
    t5 = clock()
    state.mark_fed()
    state.on_sampled(tokens)
    t6 = clock()
    if timed:
        for piece, dt in zip(PIECES, (t1 - t0, t2 - t1, t3 - t2, t5 - t4, t6 - t5), strict=True):
            run.times[piece].append(dt)
        run.payload.append(len(blob))
        run.segments.append(len(getattr(plans[0], "view", None) or plans[0].segments))


def forced_after(state: Any, names: dict[int, str]) -> dict[str, tuple[int, ...]]:
    """Forced tokens each worker request gains after its sample (the next step's headers)."""
    return {names[w]: tuple(log.tokens[log.fed + 1:]) for w, log in enumerate(state.workers)
            if len(log.tokens) > log.fed + 1}


def measure(impls: list[Impl], workers: int, args: argparse.Namespace, progress: Any) -> tuple[list[Run], list[int]]:
    """``args.repeats`` fresh groups an implementation, each repeat's groups driven in turn on the same samples;
    returns the runs and the committed steps at the start and at the end of every timed window."""
    runs: list[Run] = []
    history: list[int] = []
    prompt_blocks = tuple(range(1, -(-args.prompt // BLOCK_SIZE) + 2))
    for _ in range(args.repeats):
        codec = WordCodec()  # one vocabulary for the repeat's groups: they read the same token ids
        group = [new_run(impl, workers, args.prompt, codec) for impl in impls]
        lead = group[0].state
        forced = forced_after(lead, group[0].names)
        k = timed_steps = 0
        while timed_steps < args.steps:
            timed = len(lead.history) >= args.history
            if timed and timed_steps == 0:
                history.append(len(lead.history))
            tokens = samples(lead, k, args.history)
            for run in group:
                step(run, tokens, prompt_blocks, forced, timed)
            forced = forced_after(lead, group[0].names)
            k += 1
            if timed:
                timed_steps += 1
                progress.update(1)
        history.append(len(lead.history))
        for run in group[1:]:
            assert run.state.history == lead.history and [log.tokens for log in run.state.workers] == [
                log.tokens for log in lead.workers], "the implementations drove different groups"
        runs += group
    return runs, history


def summary(runs: list[Run], impls: list[Impl], workers: int, history: list[int]) -> list[dict[str, Any]]:
    """Table rows of one worker count: per piece, each implementation's median ms a step (and the ratio)."""
    ms: dict[str, dict[str, float]] = {}
    for impl in impls:
        mine = [r for r in runs if r.impl is impl]
        times = {p: [t for r in mine for t in r.times[p]] for p in PIECES}
        times["total"] = [sum(step) for step in zip(*times.values(), strict=True)]
        ms[impl.label] = {p: statistics.median(t) * 1e3 for p, t in times.items()}
        payload = statistics.median(b for r in mine for b in r.payload)
        segments = statistics.median(s for r in mine for s in r.segments)
        print(f"N={workers} {impl.label}: committed steps {min(history)}..{max(history)}, view of {segments:.0f} "
              f"segments, payload {payload:.0f} bytes", flush=True)
        ms[impl.label]["payload_bytes"] = payload
    rows = []
    for piece in (*PIECES, "total"):
        row: dict[str, Any] = {"workers": workers, "piece": piece, **{f"{i.label}_ms": ms[i.label][piece]
                                                                    for i in impls}}
        if len(impls) == 2:
            row["ratio"] = ms["before"][piece] / ms["after"][piece]
        if piece == "payload":
            row.update({f"{i.label}_bytes": ms[i.label]["payload_bytes"] for i in impls})
        if piece == "total":
            row.update(segments=segments, history=f"{min(history)}..{max(history)}")
        rows.append(row)
    return rows


def main() -> int:
    args = parse_args()
    info = machine_info()
    impls = [Impl.of("after", "hogwild_vllm")]
    if args.baseline:
        load_at(args.baseline)
        impls.insert(0, Impl.of("before", "hogwild_base"))
    try:
        from tqdm import tqdm
    except ImportError:
        tqdm = None
    rows: list[dict[str, Any]] = []
    for workers in args.workers:
        total = args.repeats * args.steps
        progress = tqdm(total=total, desc=f"N={workers}", unit="step") if tqdm else SimpleNamespace(
            update=lambda n: None, close=lambda: None)
        runs, history = measure(impls, workers, args, progress)
        progress.close()
        rows += summary(runs, impls, workers, history)
    header = [f"command: {shlex.join(['python', *sys.argv])}", f"machine: {describe(info)}",
              f"combined layout, default templates, prompt {args.prompt} tokens, history {args.history}+ committed "
              f"steps, {args.repeats} groups x {args.steps} timed decode steps a worker count; batch: the workers "
              f"and {len(PLAIN_ROWS)} plain decode rows; medians a step, pieces timed one after another in a step",
              "before: " + (f"hogwild_vllm at {args.baseline} (git archive), run in turn with after on the same "
                            "samples" if args.baseline else "not run"),
              f"after: the working tree ({_git_head()}{' + changes' if _git_dirty() else ''})",
              "*_bytes: the pickled HogwildStepMeta; segments: worker 0's view (median); history: committed steps "
              "while timed",
              f"date: {time.strftime('%Y-%m-%d %H:%M:%S')}"]
    print("\n".join(header))
    labels = [i.label for i in impls]
    columns = ["workers", "piece", *[f"{label}_ms" for label in labels], *(["ratio"] if len(impls) == 2 else []),
               *[f"{label}_bytes" for label in labels], "segments", "history"]
    markdown = print_table(rows, columns)
    out = write_results(rows, args.out, args.name, header, markdown)
    panels: dict[str, dict[str, tuple[list[float], list[float]]]] = {}
    for row in rows:
        for label in labels:
            xs, ys = panels.setdefault(row["piece"], {}).setdefault(label, ([], []))
            xs.append(row["workers"])
            ys.append(row[f"{label}_ms"])
    line_panels(panels, out / f"{args.name}.png", "workers", "ms a step (median)", describe(info), logy=True,
                style=lambda label: {"linestyle": "--" if label == "before" else "-"})
    print(f"results: {out / args.name}.csv / .md / .png")
    return 0


def _git_head() -> str:
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()


def _git_dirty() -> bool:
    files = ["hogwild_vllm/layout.py", "hogwild_vllm/metadata.py", "hogwild_vllm/ops/segments.py"]
    return bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", *files], capture_output=True,
                               text=True).stdout.strip())


if __name__ == "__main__":
    sys.exit(main())
