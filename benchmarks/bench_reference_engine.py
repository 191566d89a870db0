"""Throughput of the reference engine: a hogwild group of N workers against one plain sequence, same script.

    python benchmarks/bench_reference_engine.py [--model PATH] [--workers 1 2 4] [--tokens 64] [--out results/]

The baseline is ``ReferenceEngine.generate_plain`` (one ordinary greedy sequence through the same paged
reference attention) run in the same process, so the ratio isolates the cost of serving N workers in one batch.
This engine is the correctness oracle, not the fast path: the figures say how long the oracle takes, nothing more.
A group's token count includes its forced tokens (intro, step headers), which are fed as chunks, so a group with
one worker already counts more tokens per pass than the plain sequence.
Writes a CSV and a PNG plot (if matplotlib is installed) under --out.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path

import torch
import transformers
from _report import PROBLEM, parse_args, write_report  # benchmarks/ is the script's sys.path[0]

from hogwild_vllm.config import GroupConfig, Templates
from hogwild_vllm.reference_engine import ReferenceEngine


def main() -> None:
    args = parse_args(__doc__, 64, "own tokens per worker")
    model = args.model
    if model is None:
        from hogwild_vllm.testing.tiny_models import build_tiny_model

        model = str(build_tiny_model("qwen2"))
    engine = ReferenceEngine(model)
    no_answer = Templates(answer_marker="\\neveranswered{")
    rows = []
    prompt = engine.generate(PROBLEM, GroupConfig(workers=1, max_tokens=2, templates=no_answer)).prompt_token_ids
    t0 = time.perf_counter()
    engine.generate_plain(prompt, args.tokens)
    base = args.tokens / (time.perf_counter() - t0)
    rows.append({"run": "plain sequence", "workers": 1, "tokens": args.tokens, "tokens_per_s": base, "ratio": 1.0})
    for n in args.workers:
        cfg = GroupConfig(workers=n, max_tokens=args.tokens, templates=no_answer)
        t0 = time.perf_counter()
        out = engine.generate(PROBLEM, cfg)
        total = sum(len(w.token_ids) for w in out.workers)
        rate = total / (time.perf_counter() - t0)
        rows.append({"run": f"hogwild x{n}", "workers": n, "tokens": total, "tokens_per_s": rate,
                     "ratio": rate / base})
    env = (f"{platform.machine()} {torch.get_num_threads()} threads, torch {torch.__version__}, "
           f"transformers {transformers.__version__}, model {Path(model).name}")
    write_report(rows, env, args.out, "bench_reference_engine", "Reference engine (oracle) throughput")


if __name__ == "__main__":
    main()
