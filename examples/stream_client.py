"""Stream a hogwild group from a running server with the stock ``openai`` client: one choice per worker.

    vllm serve /path/to/model --additional-config '{"hogwild": {}}'          # in another shell
    python examples/stream_client.py --base-url http://127.0.0.1:8000/v1 --model /path/to/model \\
        --workers 3 "What is 17 * 23?"

The request asks for ``n`` = workers choices with the group options in ``vllm_xargs``; each streamed delta carries
its worker's ``index``. Deltas are printed as they arrive, each run tagged with its worker's name; at the end the
group's result (the answer and usage; the transcript with ``--transcript``) comes from any choice's ``stop_reason``.
"""

from __future__ import annotations

import argparse
import json
import sys

from hogwild_vllm.config import GroupConfig


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("problem")
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    p.add_argument("--model", required=True, help="the model the server serves (its path or name)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=256, help="own tokens per worker")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--options", default="{}", help="more group options as JSON (layout, templates, ...)")
    p.add_argument("--transcript", action="store_true", help="print the group's transcript at the end")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import openai
    from transformers import AutoTokenizer

    from hogwild_vllm.prompt import build_prompt_ids

    args = parse_args(argv)
    options = {"max_tokens": args.max_tokens, **json.loads(args.options)}
    cfg = GroupConfig.from_dict({**options, "workers": args.workers})
    # The common prompt (rules, problem, history header) as token ids, so the workers see the hogwild rules.
    prompt = build_prompt_ids(AutoTokenizer.from_pretrained(args.model), args.problem, cfg)
    client = openai.OpenAI(base_url=args.base_url, api_key="none")
    stream = client.completions.create(
        model=args.model, prompt=prompt, n=args.workers, stream=True, max_tokens=1,
        temperature=args.temperature, seed=args.seed, extra_body={"vllm_xargs": {"hogwild": json.dumps(options)}})
    last = None
    result = None
    for chunk in stream:
        for choice in chunk.choices:
            if choice.text:
                if choice.index != last:
                    sys.stdout.write(f"\n[{cfg.worker_names[choice.index]}] ")
                    last = choice.index
                sys.stdout.write(choice.text)
                sys.stdout.flush()
            stop = (choice.model_extra or {}).get("stop_reason")
            if choice.finish_reason is not None and isinstance(stop, str) and stop.startswith("{"):
                result = json.loads(stop)["hogwild"]
    print()
    if result is None:
        print("no group result received", file=sys.stderr)
        return 1
    if "error" in result:
        print(f"group refused: {result['error']}", file=sys.stderr)
        return 1
    print(f"== finish: {result['finish_reason']}   answer: {result['answer']!r} (by {result['answer_worker']})")
    usage = result["usage"]
    print(f"== sampled tokens per worker: {usage['generated_tokens']}, forward passes: {usage['forward_passes']}")
    if args.transcript:
        print("== transcript\n" + result["transcript"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
