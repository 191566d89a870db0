"""Typed offline use through vLLM's ``LLM`` class: build the engine with the plugin on, run problems as groups.

    from hogwild_vllm import offline
    llm = offline.make_llm("Qwen/QwQ-32B-AWQ")
    outs = offline.generate(llm, ["What is 17 * 23?"], GroupConfig(workers=4, max_tokens=4096))
    print(outs[0].answer, outs[0].transcript)

``generate`` is a thin layer over ``LLM.generate``: each problem becomes the common prompt (system rules, problem,
history header; :func:`hogwild_vllm.prompt.build_prompt_ids`) and one request with
``SamplingParams.extra_args["hogwild"] = cfg.to_dict()``; the engine returns the group's result in the request
output's ``kv_transfer_params["hogwild"]``, which becomes a :class:`~hogwild_vllm.outputs.GroupOutput`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hogwild_vllm.config import CONFIG_KEY, GroupConfig
from hogwild_vllm.outputs import GroupOutput
from hogwild_vllm.prompt import build_prompt_ids


class GroupRequestError(RuntimeError):
    """The engine could not run a group (the message says why, e.g. it does not fit ``max_model_len``)."""


def make_llm(model: str, **kwargs: Any) -> Any:
    """``vllm.LLM(model, **kwargs)`` with the plugin switched on (``additional_config={"hogwild": {}}``)."""
    from vllm import LLM

    extra = dict(kwargs.pop("additional_config", None) or {})
    extra.setdefault(CONFIG_KEY, {})
    return LLM(model=model, additional_config=extra, **kwargs)


def sampling_params(cfg: GroupConfig, *, temperature: float = 0.0, top_p: float = 1.0,
                    seed: int | None = None, per_worker: bool = False) -> Any:
    """The ``SamplingParams`` of one group request (the budget is ``cfg.max_tokens`` per worker).

    ``per_worker``: ask for one choice per worker (``n = cfg.workers``): ``LLM.generate`` then returns each
    worker's text as ``outputs[w]`` (and streams them, through the server), the group's result still in
    ``kv_transfer_params["hogwild"]``. Otherwise the one choice is the group's transcript."""
    from vllm import SamplingParams

    from hogwild_vllm.compat import allow_greedy_choices

    allow_greedy_choices()  # greedy with n > 1 (a no-op after the plugin's register())
    return SamplingParams(temperature=temperature, top_p=top_p, seed=seed, max_tokens=1,
                          n=cfg.workers if per_worker else 1, extra_args={CONFIG_KEY: cfg.to_dict()})


def generate(llm: Any, problems: str | Sequence[str], cfg: GroupConfig | None = None, *, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None, use_tqdm: bool = True) -> list[GroupOutput]:
    """Run each problem as one group (all in one batch); results in input order.

    Raises :class:`GroupRequestError` for a group the engine refused, ``VLLMValidationError`` (from vLLM's
    frontend) for bad options, before anything runs.
    """
    from vllm.inputs import TokensPrompt

    cfg = cfg or GroupConfig()
    items = [problems] if isinstance(problems, str) else list(problems)
    tokenizer = llm.get_tokenizer()
    prompts = [TokensPrompt(prompt_token_ids=build_prompt_ids(tokenizer, p, cfg)) for p in items]
    params = sampling_params(cfg, temperature=temperature, top_p=top_p, seed=seed)
    outs = llm.generate(prompts, [params] * len(prompts), use_tqdm=use_tqdm)
    return [group_output_of(o) for o in outs]


def group_output_of(request_output: Any) -> GroupOutput:
    """The :class:`GroupOutput` carried by a vLLM ``RequestOutput`` of a group request."""
    payload = (request_output.kv_transfer_params or {}).get(CONFIG_KEY)
    if payload is None:
        raise GroupRequestError(f"request {request_output.request_id} carries no hogwild result (not a group?)")
    if "error" in payload:
        raise GroupRequestError(payload["error"])
    return GroupOutput.from_dict(payload)
