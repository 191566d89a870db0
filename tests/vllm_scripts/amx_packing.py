"""bf16 requests through a real vLLM engine on a CPU with AMX tiles: plugin off, plugin on (vLLM's ``amx`` cache
packing, groups on AMX tiles), plugin on with the op's tiles switched off (``HOGWILD_CPU_AMX_TILES=0``: the same
pages on fp32 vectors), or plugin on with the ``vec`` packing pinned (``HOGWILD_CPU_PACKING=vec``). Prints the result
as one JSON line.

usage: python amx_packing.py MODEL off|on|on-vectors|on-vec

Plain prompts with their prompt logprobs and a few greedy tokens (the token budget cuts the longest prompt into
chunks that read earlier chunks from the cache); with the plugin on, also a greedy group of 2 workers whose pass 0
and worker passes read the same cache through the position-delta op, and a group beside a plain request in the same
steps.
"""

import os
import random
import sys

from launch import emit_result  # this folder is the script's sys.path[0]

PROMPT_LENS = (512, 160, 96)
TOKEN_BUDGET = 256
GROUP = {"workers": 2, "max_tokens": 24}


def prompts(vocab_size: int) -> list[list[int]]:
    rng = random.Random(1234)
    return [[rng.randrange(1, vocab_size) for _ in range(n)] for n in PROMPT_LENS]


def main() -> None:
    model, mode = sys.argv[1], sys.argv[2]
    if mode == "on-vec":
        os.environ["HOGWILD_CPU_PACKING"] = "vec"
    if mode == "on-vectors":
        os.environ["HOGWILD_CPU_AMX_TILES"] = "0"  # the engine's worker process inherits it
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    extra = {"additional_config": {"hogwild": {"enabled": True}}} if mode != "off" else {}
    llm = LLM(model=model, dtype="bfloat16", enforce_eager=True, max_model_len=1024, block_size=32, seed=0,
              max_num_batched_tokens=TOKEN_BUDGET, enable_prefix_caching=False, **extra)
    packing = llm.llm_engine.collective_rpc(
        lambda self: self.model_runner.attn_groups[0][0].metadata_builders[0]._cpu.isa if hasattr(
            self.model_runner.attn_groups[0][0].metadata_builders[0], "_cpu") else "native")
    tiles = llm.llm_engine.collective_rpc(lambda self: __import__("hogwild_vllm.ops").ops.cpu_amx_tiles())
    ids = prompts(llm.llm_engine.model_config.get_vocab_size())
    params = SamplingParams(temperature=0, max_tokens=8, prompt_logprobs=0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids], params, use_tqdm=False)
    logprobs = [[None if lp is None else [(t, v.logprob) for t, v in sorted(lp.items())] for lp in o.prompt_logprobs]
                for o in outs]
    result = {"packing": packing, "tiles": tiles, "logprobs": logprobs,
              "tokens": [list(o.outputs[0].token_ids) for o in outs]}
    if mode != "off":
        group_params = SamplingParams(temperature=0, max_tokens=1, extra_args={"hogwild": GROUP})
        group = llm.generate(TokensPrompt(prompt_token_ids=ids[1]), group_params, use_tqdm=False)[0]
        result["group"] = group.kv_transfer_params["hogwild"]
        mixed = llm.generate([TokensPrompt(prompt_token_ids=ids[1]), TokensPrompt(prompt_token_ids=ids[2])],
                             [group_params, SamplingParams(temperature=0, max_tokens=8)], use_tqdm=False)
        result["mixed_group"] = mixed[0].kv_transfer_params["hogwild"]
        result["mixed_plain"] = list(mixed[1].outputs[0].token_ids)
    emit_result(result)


if __name__ == "__main__":
    main()
