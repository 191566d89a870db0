"""Run one hogwild group on a problem and print what the workers wrote.

    python examples/offline_generate.py                       # the project's tiny model, 2 workers, vLLM
    python examples/offline_generate.py --workers 4 --layout interleaved --max-tokens 256 --json
    python examples/offline_generate.py --engine reference    # the transformers oracle instead of vLLM

Without ``--model`` the project's own tiny random-weight model is built (cached) and used: its text is noise, but
every mechanism (steps, commits, headers, shared KV) runs for real. ``--engine vllm`` (the default) runs the group
inside vLLM's ``LLM`` class with the plugin switched on; ``--json`` prints one JSON object: the group's result
(``prompt_token_ids``, ``banned_token_ids``, ``workers`` with ``name`` / ``token_ids`` / ``forced``,
``transcript``, ``answer``, ``usage``, ...) plus ``model`` and ``engine``.
"""

from __future__ import annotations

import argparse
import json
import sys

DEFAULT_PROBLEM = "Compute the sum of all integers from 1 to 100, then divide it by 5. Show the final number."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model path (default: the project's tiny qwen2 model)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--layout", default="combined", choices=["combined", "interleaved", "contiguous"])
    p.add_argument("--max-tokens", type=int, default=128, help="own tokens per worker (forced ones included)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default=DEFAULT_PROBLEM, help="the problem text")
    p.add_argument("--finisher", action="store_true", help="ask for the answer once more if nobody gave one")
    p.add_argument("--engine", default="vllm", choices=["vllm", "reference"],
                   help="vllm: vLLM's LLM class with the plugin on; reference: the transformers oracle engine")
    p.add_argument("--max-model-len", type=int, default=4096, help="vLLM engine context length")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p.parse_args(argv)


def run_vllm(model: str, args: argparse.Namespace, cfg: object) -> object:
    import os

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on a CPU build (ignored on GPUs)
    if args.json:  # vLLM logs to stdout: keep it to errors so that stdout is one JSON object
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    from hogwild_vllm import offline

    llm = offline.make_llm(model, max_model_len=args.max_model_len, seed=args.seed)
    return offline.generate(llm, args.prompt, cfg, temperature=args.temperature, top_p=args.top_p,  # type: ignore[arg-type]
                            seed=args.seed, use_tqdm=not args.json)[0]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from hogwild_vllm.config import GroupConfig, HogwildConfigError

    try:
        cfg = GroupConfig(workers=args.workers, layout=args.layout, max_tokens=args.max_tokens,
                          finisher=args.finisher)
    except HogwildConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    model = args.model
    if model is None:
        from hogwild_vllm.testing.tiny_models import build_tiny_model

        model = str(build_tiny_model("qwen2"))
    if args.engine == "vllm":
        out = run_vllm(model, args, cfg)
    else:
        from hogwild_vllm.reference_engine import ReferenceEngine

        engine = ReferenceEngine(model)
        out = engine.generate(args.prompt, cfg, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                              progress=not args.json)
    if args.json:
        result = out.to_dict()
        result.update(model=model, engine=args.engine)
        print(json.dumps(result))
        return 0
    print(f"model: {model}\nlayout: {cfg.layout.value}, workers: {cfg.workers}\n")
    print("=== transcript ===")
    print(out.transcript)
    print("=== answer ===")
    print(out.answer if out.answer is not None else "(none)", f"[by {out.answer_worker}]" if out.answer_worker else "")
    u = out.usage
    print(f"\nfinish: {out.finish_reason}; prompt tokens {u.prompt_tokens}; sampled per worker "
          f"{u.generated_tokens}; forced per worker {u.forced_tokens}; forward passes {u.forward_passes}; "
          f"KV blocks {u.kv_blocks}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
