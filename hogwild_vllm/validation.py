"""Frontend validation of hogwild requests: a ``vllm.logits_processors`` entry point (``hogwild_validate``).

vLLM loads every installed logits-processor plugin in every engine (plugin switched on or off) and calls its
``validate_params`` for each request in the frontend (``v1/engine/input_processor.py`` ->
``validate_logits_processors_parameters``). A bad ``extra_args["hogwild"]`` therefore fails that request only:
``VLLMValidationError`` -> HTTP 400 from the OpenAI server, an exception from ``LLM.generate``. The processor
itself changes nothing: ``apply`` returns the logits as they are and ``update_state`` does nothing.

A group request comes in one of two shapes:

* ``n == 1``: one choice, the group's transcript, with the result in ``kv_transfer_params["hogwild"]``.
* ``n == workers`` (``workers`` may be left out: it defaults to ``n``): one choice per worker, streamed live. vLLM's
  frontend fans the request out into n engine requests ``"{i}_{id}"`` with ``n = 1`` each; the validator records n
  in ``extra_args["hogwild_choices"]`` so that the engine knows how many siblings make the group.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from hogwild_vllm.compat import engine_config_here, groups_enabled_here
from hogwild_vllm.config import CHOICES_KEY, CONFIG_KEY, GroupConfig, HogwildConfigError

if TYPE_CHECKING:
    from vllm.config import VllmConfig

PLUGIN_OFF = ("the hogwild plugin is not switched on for this engine; start it with "
              "additional_config={'hogwild': {}} (vllm serve --additional-config '{\"hogwild\": {}}')")


def _reject(message: str, value: Any = None, parameter: str = f"extra_args.{CONFIG_KEY}") -> VLLMValidationError:
    return VLLMValidationError(f"hogwild: {message}", parameter=parameter, value=value)


def request_options(sampling_params: SamplingParams) -> Any:
    """The raw ``extra_args["hogwild"]`` of a request, or None when it asks for no group."""
    extra = sampling_params.extra_args
    if not isinstance(extra, dict):
        return None
    return extra.get(CONFIG_KEY)


def choice_count(sampling_params: SamplingParams) -> int:
    """How many choices the request asked for: its ``n`` in the frontend, ``extra_args["hogwild_choices"]`` in the
    engine (where each of the n fanned-out requests has ``n = 1``)."""
    if sampling_params.n > 1:
        return int(sampling_params.n)
    extra = sampling_params.extra_args
    count = extra.get(CHOICES_KEY, 1) if isinstance(extra, dict) else 1
    return count if isinstance(count, int) and not isinstance(count, bool) and count > 1 else 1


def parse_request(sampling_params: SamplingParams) -> GroupConfig | None:
    """The group a request asks for (None for a plain request); ``VLLMValidationError`` naming the problem."""
    raw = request_options(sampling_params)
    if raw is None:
        return None
    options = raw
    if isinstance(raw, (str, bytes)):
        # The OpenAI ``vllm_xargs`` field admits no nested objects, so the options may come as a JSON string.
        try:
            options = json.loads(raw)
        except ValueError as e:
            raise _reject(f"extra_args['{CONFIG_KEY}'] is a string but not valid JSON ({e})", raw) from None
    n = choice_count(sampling_params)
    if n > 1 and isinstance(options, Mapping):
        workers = options.get("workers")
        if workers is None:
            options = {**options, "workers": n}  # one choice per worker: the workers default to n
        elif workers != n:
            raise _reject(f"n={n} asks for one choice per worker, but the hogwild option 'workers' is {workers!r}; "
                          "leave 'workers' out (it defaults to n), make them equal, or use n=1 for the group's "
                          "transcript as one choice", n, parameter="n")
    try:
        group = GroupConfig.from_dict(options)
    except HogwildConfigError as e:
        raise _reject(str(e), raw) from None
    except TypeError as e:  # e.g. a template value of the wrong type reaching a dataclass constructor
        raise _reject(f"bad hogwild options: {e}", raw) from None
    problems = []
    if sampling_params.stop:
        problems.append("stop strings (the group decides where it stops; remove 'stop')")
    if sampling_params.logprobs is not None:
        problems.append("logprobs")
    if sampling_params.prompt_logprobs is not None:
        problems.append("prompt_logprobs")
    if sampling_params.structured_outputs is not None:
        problems.append("structured outputs")
    if sampling_params.min_tokens:
        problems.append("min_tokens")
    if problems:
        raise _reject("not supported for hogwild requests: " + "; ".join(problems), raw)
    return group


def check_group_fits(processed_inputs: Any, params: Any) -> None:
    """Refuse (``VLLMValidationError``: HTTP 400) a group that cannot run on the engine configured in this process:
    its longest view beyond ``max_model_len``, more rows than ``max_num_seqs``, a pass wider than
    ``max_num_batched_tokens``. The same checks as the scheduler's (``group.fit_problems``), with the prompt's
    token ids; the cache's block count is checked by the engine alone (the frontend does not know it)."""
    if not isinstance(params, SamplingParams) or request_options(params) is None:
        return
    config = engine_config_here()
    prompt = processed_inputs.get("prompt_token_ids") if isinstance(processed_inputs, Mapping) else None
    if config is None or not prompt:
        return
    from vllm.tokenizers import cached_tokenizer_from_config

    from hogwild_vllm.group import EngineLimits, engine_state, fit_problems, size_group
    from hogwild_vllm.prompt import HFCodec

    cfg = parse_request(params)
    assert cfg is not None
    codec = HFCodec(cached_tokenizer_from_config(config.model_config))
    block_size = int(config.cache_config.block_size)
    size = size_group(cfg, engine_state(cfg, len(prompt), codec, block_size), codec, block_size)
    scheduler = config.scheduler_config
    limits = EngineLimits(int(config.model_config.max_model_len), block_size, sys.maxsize,
                          int(scheduler.max_num_seqs), int(scheduler.max_num_batched_tokens))
    problems = fit_problems(cfg, len(prompt), size, limits)
    if problems:
        raise _reject("this group cannot run on this engine: " + "; ".join(problems), request_options(params))


class HogwildRequestValidator(LogitsProcessor):
    """Validates ``extra_args["hogwild"]`` in the frontend; leaves the logits untouched."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        if parse_request(sampling_params) is None:
            return
        if not groups_enabled_here():
            raise _reject(PLUGIN_OFF, request_options(sampling_params))
        if sampling_params.n > 1:
            # The engine sees n requests with n = 1 each; this tells it how many make the group. A pure function
            # of these params (the same n every time), so params shared across requests stay consistent.
            assert isinstance(sampling_params.extra_args, dict)
            sampling_params.extra_args[CHOICES_KEY] = sampling_params.n

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        pass
