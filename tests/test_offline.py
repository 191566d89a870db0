"""The typed offline layer: request parameters carry the group's options losslessly, results come back typed."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest

from hogwild_vllm import offline
from hogwild_vllm.config import GroupConfig, Templates
from hogwild_vllm.outputs import GroupOutput, Usage, WorkerOutput


def test_sampling_params_carry_the_options_losslessly():
    cfg = GroupConfig(workers=3, layout="interleaved", worker_names=("A", "B", "C"), max_tokens=77,
                      templates=Templates(step_separator="\n"), collab_check_every=0, finisher=True,
                      banned_token_ids=(5, 9))
    params = offline.sampling_params(cfg, temperature=0.7, top_p=0.9, seed=3)
    raw = params.extra_args["hogwild"]
    assert GroupConfig.from_dict(json.loads(json.dumps(raw))) == cfg  # also through JSON (the OpenAI path)
    assert (params.temperature, params.top_p, params.seed) == (0.7, 0.9, 3)


def sample_output() -> GroupOutput:
    workers = [WorkerOutput("Alice", [1, 2, 3], [True, False, False], "abc"),
               WorkerOutput("Bob", [4, 5], [True, False], "de")]
    return GroupOutput([7, 8], [0, 2], workers, "abc [...]", "42", "Bob", "answer",
                       Usage(2, [2, 1], [1, 1], 5, kv_blocks=3), config=GroupConfig().to_dict())


def test_group_output_to_dict_is_asdict_with_its_own_lists():
    out = sample_output()
    d = out.to_dict()
    assert d == dataclasses.asdict(out) and list(d) == list(dataclasses.asdict(out))
    d["prompt_token_ids"].append(9)
    d["workers"][0]["token_ids"].append(9)
    d["usage"]["forced_tokens"].append(9)
    d["config"]["templates"]["system_prompt"] = "changed"
    assert out == sample_output()  # nothing of the output is shared with the dict


def test_group_output_round_trips_through_a_request_output():
    out = sample_output()
    request_output = SimpleNamespace(request_id="r", kv_transfer_params={"hogwild": json.loads(json.dumps(
        out.to_dict()))})
    assert offline.group_output_of(request_output) == out


def test_errors_and_non_group_outputs_raise():
    with pytest.raises(offline.GroupRequestError, match="exceeds max_model_len"):
        offline.group_output_of(SimpleNamespace(request_id="r", kv_transfer_params={
            "hogwild": {"error": "hogwild: ... exceeds max_model_len 1024"}}))
    with pytest.raises(offline.GroupRequestError, match="not a group"):
        offline.group_output_of(SimpleNamespace(request_id="r", kv_transfer_params=None))
