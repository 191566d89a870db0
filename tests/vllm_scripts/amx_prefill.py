"""Plain bf16 prompts through a real vLLM engine, plugin on or off, with their prompt logprobs; with the plugin on,
also a group whose common prompt is long enough for the AMX path. Prints the result as one JSON line.

usage: python amx_prefill.py MODEL on|off

The prompts are long enough (>= 64 tokens a chunk) for the backend's AMX path, and the token budget cuts the longest
into chunks that read earlier chunks from the cache: with the plugin on and off the engine schedules the same
batches, so vLLM's AMX kernel gets the same calls and the prompt logprobs are bitwise equal.
"""

import random
import sys

from launch import emit_result  # this folder is the script's sys.path[0]

# With a budget of 256 tokens a step: the first prompt in two chunks (the second reads the first from the cache),
# then the other two in one batch. Every chunk is a run of >= 64 queries (shorter ones keep the vec kernel).
PROMPT_LENS = (512, 160, 96)
TOKEN_BUDGET = 256
GROUP = {"workers": 2, "max_tokens": 8}


def prompts(vocab_size: int) -> list[list[int]]:
    rng = random.Random(1234)
    return [[rng.randrange(1, vocab_size) for _ in range(n)] for n in PROMPT_LENS]


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model, mode = sys.argv[1], sys.argv[2]
    extra = {"additional_config": {"hogwild": {"enabled": True}}} if mode == "on" else {}
    llm = LLM(model=model, dtype="bfloat16", enforce_eager=True, max_model_len=1024, block_size=32, seed=0,
              max_num_batched_tokens=TOKEN_BUDGET, enable_prefix_caching=False, **extra)
    amx = llm.llm_engine.collective_rpc(
        lambda self: getattr(self.model_runner.attn_groups[0][0].metadata_builders[0], "_amx", None) is not None)
    ids = prompts(llm.llm_engine.model_config.get_vocab_size())
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids], params, use_tqdm=False)
    logprobs = [[None if lp is None else [(t, v.logprob) for t, v in sorted(lp.items())] for lp in o.prompt_logprobs]
                for o in outs]
    result = {"amx": amx, "logprobs": logprobs, "tokens": [list(o.outputs[0].token_ids) for o in outs]}
    if mode == "on":
        group = llm.generate(TokensPrompt(prompt_token_ids=ids[1]),
                             SamplingParams(temperature=0, max_tokens=1, extra_args={"hogwild": GROUP}),
                             use_tqdm=False)[0]
        result["group"] = group.kv_transfer_params["hogwild"]
    emit_result(result)


if __name__ == "__main__":
    main()
