"""Group lifecycle in a real vLLM engine whose scheduler runs in this process: aborts, block accounting, the
runner's request table. Emits one JSON result (launch.emit_result).

usage: python group_lifecycle.py MODEL PROMPT_IDS_JSON

Scenarios (each starts from the free-block count of an idle engine and steps ``LLMEngine`` by hand):
  abort_decoding: a 3-worker combined group and a plain request; the group is aborted after 12 steps.
  abort_pending:  a group aborted before the engine ever steps.
  abort_prefill:  a group aborted after one step, while its prompt is still being written in chunks.
  finished:       a 2-worker group that runs to its budget.
Reported per scenario: free blocks before/after, the groups the scheduler still holds, the child requests the
model runner still holds, and the outputs the frontend received.
"""

import json
import os
import sys

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the scheduler (and its block pool) live in this process

from launch import emit_result  # noqa: E402 - this folder is the script's sys.path[0]


def main() -> None:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    model, prompt = sys.argv[1], json.loads(sys.argv[2])
    # A small batch budget so that a 300-token prompt takes two chunks.
    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=1024, block_size=32, seed=0,
              max_num_batched_tokens=200, additional_config={"hogwild": {}})
    engine = llm.llm_engine
    scheduler = engine.engine_core.engine_core.scheduler
    pool = scheduler.kv_cache_manager.block_pool

    def runner_children() -> list[str]:
        held = engine.collective_rpc(lambda self: sorted(self.model_runner.requests))
        return sorted({rid for ids in held for rid in ids if "::" in rid})

    def group(workers: int, layout: str, max_tokens: int) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=16, extra_args={"hogwild": {
            "workers": workers, "layout": layout, "max_tokens": max_tokens,
            "templates": {"step_separator": "\n", "answer_marker": "ANSWER{"}}})

    def drain(limit: int = 2000) -> dict[str, dict]:
        done: dict[str, dict] = {}
        for _ in range(limit):
            if not engine.has_unfinished_requests() and not scheduler.has_requests():
                break
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = {"finish_reason": out.outputs[0].finish_reason,
                                            "num_tokens": len(out.outputs[0].token_ids),
                                            "hogwild": out.kv_transfer_params is not None}
        engine.step()  # one more step flushes the finished children to the runner
        return done

    def scenario(adds: list[tuple[str, SamplingParams]], abort: str | None, steps_before_abort: int) -> dict:
        free0 = pool.get_num_free_blocks()
        for rid, params in adds:
            engine.add_request(rid, TokensPrompt(prompt_token_ids=prompt), params)
        seen: dict[str, dict] = {}
        held_mid = None
        for _ in range(steps_before_abort):
            for out in engine.step():
                if out.finished:
                    seen[out.request_id] = {"finish_reason": out.outputs[0].finish_reason,
                                            "params": out.kv_transfer_params}
        children_mid = runner_children()
        if abort is not None:
            held_mid = pool.get_num_free_blocks()
            engine.abort_request([abort])
        seen.update(drain())
        return {"free_before": free0, "free_mid": held_mid, "runner_children_mid": children_mid,
                "free_after": pool.get_num_free_blocks(), "groups_left": scheduler.group_ids(),
                "runner_children": runner_children(), "outputs": seen}

    plain = SamplingParams(temperature=0.0, max_tokens=20)
    result = {
        "abort_decoding": scenario([("g1", group(3, "combined", 64)), ("p1", plain)], "g1", 12),
        "abort_pending": scenario([("g2", group(2, "interleaved", 64))], "g2", 0),
        "abort_prefill": scenario([("g3", group(4, "combined", 64))], "g3", 1),
        "finished": scenario([("g4", group(2, "contiguous", 24))], None, 0),
    }
    emit_result(result)


if __name__ == "__main__":
    main()
