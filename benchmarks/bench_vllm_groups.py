"""Throughput of hogwild groups inside vLLM against plain requests, side by side in one engine (plugin on).

    python benchmarks/bench_vllm_groups.py [--model PATH] [--workers 1 2 4] [--tokens 128] [--out results/]

Runs, each timed around one ``LLM.generate`` call after a warm-up:
  - ``plain x1``: one ordinary greedy request of ``--tokens`` new tokens (the baseline, ratio 1.0);
  - ``plain xN``: N independent requests batched together (what N workers cost without sharing anything);
  - ``hogwild xN``: one group of N workers, ``--tokens`` own tokens each (forced intro and headers included).
All go through the same HOGWILD attention backend (the pure-torch reference op for now), so the ratios isolate the
cost of the group machinery (views with several segments, the scheduler's planning) against plain batching.
Writes a CSV and a PNG plot (if matplotlib is installed) under --out.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

from _report import PROBLEM, parse_args, write_report  # benchmarks/ is the script's sys.path[0]


def main() -> None:
    args = parse_args(__doc__, 128, "new tokens per request / own tokens per worker")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch
    import vllm
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from hogwild_vllm import offline
    from hogwild_vllm.config import GroupConfig, Templates
    from hogwild_vllm.prompt import build_prompt_ids

    model = args.model
    if model is None:
        from hogwild_vllm.testing.tiny_models import build_tiny_model

        model = str(build_tiny_model("qwen2"))
    llm = offline.make_llm(model, max_model_len=2048, seed=0, enforce_eager=True)
    no_answer = Templates(answer_marker="\\neveranswered{")
    prompt = build_prompt_ids(llm.get_tokenizer(), PROBLEM, GroupConfig(templates=no_answer))
    plain = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)

    def timed_plain(n: int) -> tuple[int, float]:
        t0 = time.perf_counter()
        outs = llm.generate([TokensPrompt(prompt_token_ids=prompt)] * n, plain, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs), time.perf_counter() - t0

    def timed_group(n: int) -> tuple[int, float]:
        cfg = GroupConfig(workers=n, max_tokens=args.tokens, templates=no_answer)
        t0 = time.perf_counter()
        (out,) = offline.generate(llm, PROBLEM, cfg, use_tqdm=False)
        return sum(len(w.token_ids) for w in out.workers), time.perf_counter() - t0

    timed_plain(1)  # warm-up
    timed_group(1)
    tokens, seconds = timed_plain(1)
    base = tokens / seconds
    rows = [{"run": "plain x1", "workers": 1, "tokens": tokens, "seconds": seconds, "tokens_per_s": base,
             "ratio": 1.0}]
    for n in args.workers:
        for name, fn in ((f"plain x{n}", timed_plain), (f"hogwild x{n}", timed_group)):
            if name == "plain x1":
                continue
            tokens, seconds = fn(n)
            rate = tokens / seconds
            rows.append({"run": name, "workers": n, "tokens": tokens, "seconds": seconds, "tokens_per_s": rate,
                         "ratio": rate / base})
    env = (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, vllm {vllm.__version__}, "
           f"model {Path(model).name}, {args.tokens} tokens per request / worker")
    write_report(rows, env, args.out, "bench_vllm_groups",
                 "vLLM (HOGWILD backend, reference op): hogwild groups vs plain requests")


if __name__ == "__main__":
    main()
