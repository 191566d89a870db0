"""Run plain greedy requests through a real vLLM engine and print the result as one JSON line.

usage: python plain_generate.py MODEL on|off  (on: the hogwild plugin is switched on for this engine)
"""

import json
import sys

PROMPTS = ["Hello there. We start", "The sum of 3 and 4 is", "**Bob [2]:** we", "x" * 200]


def main() -> None:
    from vllm import LLM, SamplingParams

    model, mode = sys.argv[1], sys.argv[2]
    extra = {"additional_config": {"hogwild": {"enabled": True}}} if mode == "on" else {}
    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=512, block_size=32, seed=0, **extra)
    backend = llm.llm_engine.collective_rpc(lambda self: self.model_runner.attn_groups[0][0].backend.__name__)
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    print("RESULT=" + json.dumps({"backend": backend, "ids": [list(o.outputs[0].token_ids) for o in outs]}))


if __name__ == "__main__":
    main()
