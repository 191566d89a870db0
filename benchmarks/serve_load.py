"""Load on a real server: concurrent streaming hogwild groups through the OpenAI API, beside plain vLLM (plugin off)
answering the same number of streamed samples (``n`` = workers).

    python benchmarks/serve_load.py [--model qwen2] [--workers 2] [--concurrency 1 4 16] [--requests 16]
        [--max-tokens 64] [--out benchmarks/results]

For each system the script starts ``vllm serve`` on 127.0.0.1 (``plain-off``: no ``--additional-config``;
``group``: the plugin on), then, per concurrency level C, sends ``--requests`` streaming requests with at most C in
flight (asyncio, the ``openai`` client): a group of N workers (one choice a worker, ``max_tokens`` per worker, an
answer marker the model never writes, so every group runs its whole budget), or plain ``n = N`` samples of
``max_tokens`` tokens (``ignore_eos``). Per request: time to the first token of each choice (worker), latency to the
last chunk, errors. Reports requests/s, output tokens/s, TTFT p50 / p99, latency p50 / p99, errors; the group's
figures as ratios to plain vLLM's at the same C. Writes ``serve_load.csv`` / ``.md`` / ``.png`` under --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from _report import describe, line_panels, machine_info, print_table, write_results
from tqdm import tqdm

from hogwild_vllm.testing.server import vllm_server

HERE = Path(__file__).resolve().parent
SERVER_ENV = {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_TARGET_DEVICE": "cpu", "TOKENIZERS_PARALLELISM": "false"}
SYSTEMS = ("plain-off", "group")
TEMPLATES = {"answer_marker": "\\neveranswered{"}
COLUMNS = ["system", "N", "concurrency", "requests", "errors", "req_per_s", "req_x", "out_tok_s", "ttft_p50_s",
           "ttft_p99_s", "ttft_x", "latency_p50_s", "latency_p99_s", "latency_x"]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2", help="a tiny-model kind (qwen2, smollm2, ...) or a model folder")
    ap.add_argument("--workers", type=int, default=2, help="N: workers a group, samples a plain request")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=64, help="tokens per worker / sample")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--out", default=str(HERE / "results"))
    return ap.parse_args()


async def one_request(client: Any, model: str, prompt: list[int], system: str, args: argparse.Namespace,
                      seed: int) -> dict[str, Any]:
    n = args.workers
    if system == "group":
        extra = {"vllm_xargs": {"hogwild": json.dumps({"max_tokens": args.max_tokens, "templates": TEMPLATES})}}
    else:
        extra = {"ignore_eos": True}
    start = time.perf_counter()
    first: dict[int, float] = {}
    tokens = 0
    try:
        stream = await client.completions.create(model=model, prompt=prompt, n=n, stream=True, temperature=0.8,
                                                 seed=seed, max_tokens=args.max_tokens if system != "group" else 1,
                                                 stream_options={"include_usage": True}, extra_body=extra)
        async for chunk in stream:
            now = time.perf_counter() - start
            for choice in chunk.choices:
                if choice.text:
                    first.setdefault(choice.index, now)
            if chunk.usage is not None:  # the last chunk: every choice's tokens (a group's forced ones included)
                tokens = chunk.usage.completion_tokens
        error = None if len(first) == n else f"{len(first)} of {n} choices streamed"
    except Exception as e:  # noqa: BLE001 - counted and reported
        error = f"{type(e).__name__}: {e}"
    return {"ttft": list(first.values()), "latency": time.perf_counter() - start, "tokens": tokens, "error": error}


async def run_level(base: str, model: str, prompts: list[list[int]], system: str, args: argparse.Namespace,
                    concurrency: int, bar: tqdm) -> tuple[list[dict[str, Any]], float]:
    import openai

    client = openai.AsyncOpenAI(base_url=base, api_key="none", timeout=1200, max_retries=0)
    gate = asyncio.Semaphore(concurrency)

    async def gated(k: int) -> dict[str, Any]:
        async with gate:
            result = await one_request(client, model, prompts[k], system, args, seed=k)
            bar.update()
            return result

    start = time.perf_counter()
    results = await asyncio.gather(*(gated(k) for k in range(len(prompts))))
    wall = time.perf_counter() - start
    await client.close()
    return list(results), wall


def pct(values: list[float], q: float) -> float | None:
    """The nearest-rank ``q`` quantile (None without values)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> int:
    args = parse_args()
    from throughput import resolve_model
    from transformers import AutoTokenizer

    from hogwild_vllm.config import GroupConfig, Templates
    from hogwild_vllm.prompt import build_prompt_ids

    info = machine_info()
    path, _ = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    cfg = GroupConfig(workers=args.workers, max_tokens=args.max_tokens, templates=Templates(**TEMPLATES))
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    total = len(SYSTEMS) * len(args.concurrency) * args.requests
    with tqdm(total=total, unit="request") as bar:
        for system in SYSTEMS:
            log = out / "logs" / f"serve_load_{system}.log"
            with vllm_server(path, log, "--dtype", args.dtype, "--max-model-len", "2048", "--enforce-eager", "--seed",
                             "0", plugin=system == "group", env=SERVER_ENV) as base:
                for level in args.concurrency:
                    # A unique problem per request: no prefix-cache hit past the shared system rules.
                    prompts = [build_prompt_ids(tokenizer, f"Load {system} {level}-{k}: what is {k} * {level}?", cfg)
                               for k in range(args.requests)]
                    results, wall = asyncio.run(run_level(base, path, prompts, system, args, level, bar))
                    ok = [r for r in results if r["error"] is None]
                    ttft = [t for r in ok for t in r["ttft"]]
                    latency = [r["latency"] for r in ok]
                    rows.append({"system": system, "N": args.workers, "concurrency": level,
                                 "requests": len(results), "errors": len(results) - len(ok),
                                 "req_per_s": round(len(ok) / wall, 3),
                                 "out_tok_s": round(sum(r["tokens"] for r in ok) / wall, 1),
                                 "ttft_p50_s": pct(ttft, 0.5), "ttft_p99_s": pct(ttft, 0.99),
                                 "latency_p50_s": pct(latency, 0.5), "latency_p99_s": pct(latency, 0.99),
                                 "first_error": next((r["error"] for r in results if r["error"]), "")})
    for row in rows:
        base_row = next(r for r in rows if r["system"] == "plain-off" and r["concurrency"] == row["concurrency"])
        for key, col in (("req_per_s", "req_x"), ("ttft_p50_s", "ttft_x"), ("latency_p50_s", "latency_x")):
            row[col] = round(row[key] / base_row[key], 3) if row[key] and base_row[key] else None
    header = [f"command: {shlex.join(['python', *sys.argv])}", f"machine: {describe(info)}",
              f"model {args.model} ({path}), {args.dtype}, enforce_eager, max_model_len 2048; N {args.workers}; "
              f"{args.max_tokens} tokens per worker / sample; temperature 0.8; {args.requests} requests a level",
              "plain-off: plain vLLM, plugin off, n = N samples (ignore_eos); group: one hogwild group, one "
              "streamed choice a worker; ratios: group / plain-off at the same concurrency",
              f"date: {time.strftime('%Y-%m-%d %H:%M:%S')}"]
    print("\n".join(header))
    markdown = print_table(rows, COLUMNS)
    write_results(rows, args.out, "serve_load", header, markdown)
    panels = {title: {s: ([r["concurrency"] for r in rows if r["system"] == s], [r[key] for r in rows
                                                                              if r["system"] == s])
                      for s in SYSTEMS}
              for title, key in (("requests / s", "req_per_s"), ("TTFT p50 (s)", "ttft_p50_s"),
                                 ("latency p50 (s)", "latency_p50_s"))}
    line_panels(panels, out / "serve_load.png", "concurrent requests", "", describe(info))
    print(f"results: {out / 'serve_load'}.csv / .md / .png")
    errors = sum(r["errors"] for r in rows)
    if errors:
        print(f"{errors} requests failed; first: {next(r['first_error'] for r in rows if r['first_error'])}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
