"""Frontend validation of hogwild requests: a ``vllm.logits_processors`` entry point (``hogwild_validate``).

vLLM loads every installed logits-processor plugin in every engine (plugin switched on or off) and calls its
``validate_params`` for each request in the frontend (``v1/engine/input_processor.py`` ->
``validate_logits_processors_parameters``). A bad ``extra_args["hogwild"]`` therefore fails that request only:
``VLLMValidationError`` -> HTTP 400 from the OpenAI server, an exception from ``LLM.generate``. The processor
itself changes nothing: ``apply`` returns the logits as they are and ``update_state`` does nothing.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import torch
from vllm.exceptions import VLLMValidationError
from vllm.sampling_params import SamplingParams
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from hogwild_vllm.compat import CONFIG_KEY, groups_enabled_here
from hogwild_vllm.config import GroupConfig, HogwildConfigError

if TYPE_CHECKING:
    from vllm.config import VllmConfig

PLUGIN_OFF = ("the hogwild plugin is not switched on for this engine; start it with "
              "additional_config={'hogwild': {}} (vllm serve --additional-config '{\"hogwild\": {}}')")


def _reject(message: str, value: Any = None) -> VLLMValidationError:
    return VLLMValidationError(f"hogwild: {message}", parameter=f"extra_args.{CONFIG_KEY}", value=value)


def request_options(sampling_params: SamplingParams) -> Any:
    """The raw ``extra_args["hogwild"]`` of a request, or None when it asks for no group."""
    extra = sampling_params.extra_args
    if not isinstance(extra, dict):
        return None
    return extra.get(CONFIG_KEY)


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
    try:
        group = GroupConfig.from_dict(options)
    except HogwildConfigError as e:
        raise _reject(str(e), raw) from None
    except TypeError as e:  # e.g. a template value of the wrong type reaching a dataclass constructor
        raise _reject(f"bad hogwild options: {e}", raw) from None
    problems = []
    if sampling_params.n != 1:
        problems.append(f"n={sampling_params.n} (a group returns one transcript; use n=1)")
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


class HogwildRequestValidator(LogitsProcessor):
    """Validates ``extra_args["hogwild"]`` in the frontend; leaves the logits untouched."""

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        if parse_request(sampling_params) is not None and not groups_enabled_here():
            raise _reject(PLUGIN_OFF, request_options(sampling_params))

    def __init__(self, vllm_config: VllmConfig, device: torch.device, is_pin_memory: bool) -> None:
        pass

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def is_argmax_invariant(self) -> bool:
        return True

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        pass
