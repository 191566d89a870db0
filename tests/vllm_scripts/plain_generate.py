"""Run plain greedy requests through a real vLLM engine and print the result as one JSON line.

usage: python plain_generate.py MODEL on|off  (on: the hogwild plugin is switched on for this engine)

Before the plain requests, two hogwild requests go through the same engine: a valid small group and one with a bad
option. Their errors (type and message, or none) are reported, so the plain outputs also show that the engine is
unharmed by group requests, run or rejected.
"""

import sys

PROMPTS = ["Hello there. We start", "The sum of 3 and 4 is", "**Bob [2]:** we", "x" * 200]


def rejection(llm, hogwild) -> dict:
    from vllm import SamplingParams

    try:
        llm.generate(PROMPTS[0], SamplingParams(max_tokens=4, extra_args={"hogwild": hogwild}), use_tqdm=False)
    except Exception as e:  # noqa: BLE001 - the type is what we report
        return {"type": type(e).__name__, "message": str(e)}
    return {"type": None, "message": ""}

from launch import emit_result  # noqa: E402 - this folder is the script's sys.path[0]


def main() -> None:
    from vllm import LLM, SamplingParams

    model, mode = sys.argv[1], sys.argv[2]
    extra = {"additional_config": {"hogwild": {"enabled": True}}} if mode == "on" else {}
    llm = LLM(model=model, dtype="float32", enforce_eager=True, max_model_len=512, block_size=32, seed=0, **extra)
    backend = llm.llm_engine.collective_rpc(lambda self: self.model_runner.attn_groups[0][0].backend.__name__)
    runner = llm.llm_engine.collective_rpc(lambda self: type(self.model_runner).__name__)
    hooked = llm.llm_engine.collective_rpc(
        lambda self: getattr(type(self.model_runner)._update_states, "__hogwild_wrapped__", False))
    scheduler_config = llm.llm_engine.vllm_config.scheduler_config
    scheduler = scheduler_config.get_scheduler_cls()
    rejected = [rejection(llm, {"workers": 2, "max_tokens": 8}), rejection(llm, '{"workers": 0}')]
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    emit_result({
        "backend": backend,
        "ids": [list(o.outputs[0].token_ids) for o in outs],
        "scheduler": f"{scheduler.__module__}.{scheduler.__qualname__}",
        "async_scheduling": scheduler_config.async_scheduling,
        "runner": runner,
        "runner_hook": hooked,
        "rejected": rejected,
    })


if __name__ == "__main__":
    main()
