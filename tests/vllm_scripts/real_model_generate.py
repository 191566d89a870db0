"""Plain greedy requests on a real model through a vLLM engine, loaded offline; emits the result as JSON.

usage: python real_model_generate.py MODEL on|off PROMPTS_JSON MAX_TOKENS [DTYPE]

PROMPTS_JSON is a file holding a list of token-id lists. The requests stop at the model's EOS (no ignore_eos), like
a user's. The result: each request's sampled ids, their logprobs and finish reason, the attention backend class the
worker runs, and the decode seconds.
"""

import json
import sys
import time

from launch import emit_result  # this folder is the script's sys.path[0]


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model, mode, prompts_path, max_tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    dtype = sys.argv[5] if len(sys.argv) > 5 else "float32"
    with open(prompts_path, encoding="utf-8") as f:
        prompts = [TokensPrompt(prompt_token_ids=ids) for ids in json.load(f)]
    extra = {"additional_config": {"hogwild": {}}} if mode == "on" else {}
    llm = LLM(model=model, dtype=dtype, enforce_eager=True, max_model_len=1024, seed=0, **extra)
    backend = llm.llm_engine.collective_rpc(lambda self: self.model_runner.attn_groups[0][0].backend.__name__)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=1)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    done = [o.outputs[0] for o in outs]
    emit_result({
        "backend": backend,
        "ids": [list(c.token_ids) for c in done],
        "logprobs": [[d[t].logprob for t, d in zip(c.token_ids, c.logprobs, strict=True)] for c in done],
        "finish_reasons": [c.finish_reason for c in done],
        "eos_token_id": llm.get_tokenizer().eos_token_id,
        "seconds": seconds,
    })


if __name__ == "__main__":
    main()
