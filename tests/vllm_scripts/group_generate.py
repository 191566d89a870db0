"""Run hogwild groups (and plain requests) through a real vLLM engine; print the results as one JSON line.

usage: python group_generate.py SPEC_JSON

SPEC_JSON (a file path) holds {"model": path, "engine": {LLM kwargs}, "batches": [[item, ...], ...]}; an item is
{"prompt_token_ids": [...], "hogwild": {...} or absent, "max_tokens": n, "ignore_eos": bool, "logit_bias": {...},
"n": choices, "top_k": k}.
Each batch is one ``LLM.generate`` call. Every item's result: token ids, finish reason and ``kv_transfer_params``
(the group output) of its first choice, every choice's token ids, finish and stop reason, or the error type and
message when the call raised. With "check_free_blocks", the engine core
runs in this process and the block pool's free count is reported before and after each batch.
"""

import json
import os
import sys

from launch import emit_result  # noqa: E402 - this folder is the script's sys.path[0]


def main() -> None:
    with open(sys.argv[1]) as f:
        spec = json.load(f)
    if spec.get("check_free_blocks"):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    engine = dict(dtype="float32", enforce_eager=True, max_model_len=1024, block_size=32, seed=0,
                  additional_config={"hogwild": {}})
    engine.update(spec.get("engine", {}))
    llm = LLM(model=spec["model"], **engine)
    pool = None
    if spec.get("check_free_blocks"):
        pool = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
    results = []
    for batch in spec["batches"]:
        prompts, params = [], []
        for item in batch:
            prompts.append(TokensPrompt(prompt_token_ids=item["prompt_token_ids"]))
            extra = {"hogwild": item["hogwild"]} if "hogwild" in item else None
            bias = {int(k): v for k, v in item.get("logit_bias", {}).items()} or None
            params.append(SamplingParams(temperature=item.get("temperature", 0.0), seed=item.get("seed"),
                                         n=item.get("n", 1), top_k=item.get("top_k", 0),
                                         max_tokens=item.get("max_tokens", 16), extra_args=extra,
                                         ignore_eos=item.get("ignore_eos", False), logit_bias=bias))
        free_before = pool.get_num_free_blocks() if pool is not None else None
        try:
            outs = llm.generate(prompts, params, use_tqdm=False)
        except Exception as e:  # noqa: BLE001 - reported to the test
            results.append({"error": {"type": type(e).__name__, "message": str(e)}})
            continue
        results.append({
            "outputs": [{"token_ids": list(o.outputs[0].token_ids), "finish_reason": o.outputs[0].finish_reason,
                         "text": o.outputs[0].text, "kv_transfer_params": o.kv_transfer_params,
                         "choices": [{"token_ids": list(c.token_ids), "finish_reason": c.finish_reason,
                                      "stop_reason": c.stop_reason, "text": c.text} for c in o.outputs]}
                        for o in outs],
            "free_before": free_before,
            "free_after": pool.get_num_free_blocks() if pool is not None else None,
        })
    report = {"batches": results}
    if not engine.get("disable_log_stats", True):
        report["preemptions"] = sum(m.value for m in llm.get_metrics() if m.name == "vllm:num_preemptions")
    emit_result(report)


if __name__ == "__main__":
    main()
