"""The common prompt through vLLM's prefix cache, in the real engine: two engines (prefix caching on and off) run the
same batches one after another; every output is equal (greedy), although the engine with the cache computed less of
the prompts, and a cache too small for everything evicts and recomputes a system prompt seen before.

Batches: two groups with one system prompt S1, a plain request on S1, groups on other system prompts (enough new
blocks to evict every block of S1 from a 48-block cache), then the first S1 group again.
"""

from __future__ import annotations

from typing import Any

import pytest
from vllm_scripts.launch import GroupBatches

from hogwild_vllm.config import GroupConfig
from hogwild_vllm.prompt import build_prompt_ids
from hogwild_vllm.testing.tiny_models import build_tiny_model

pytestmark = [pytest.mark.engine, pytest.mark.slow, pytest.mark.timeout(1200)]

BLOCK = 32
OPTIONS = {"workers": 2, "layout": "combined", "max_tokens": 40,
           "templates": {"step_separator": "\n", "answer_marker": "ANSWER{"}}
ENGINE = {"max_model_len": 1024, "block_size": BLOCK, "num_gpu_blocks_override": 48}


def _system(name: str) -> dict[str, Any]:
    rules = f"House rules of team {name}: " + " ".join(f"rule {k} says to check step {k}." for k in range(30))
    return {**OPTIONS, "templates": {**OPTIONS["templates"], "system_prompt": rules + " Team {names}."}}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, GroupBatches]:
    from transformers import AutoTokenizer

    model = str(build_tiny_model("qwen2"))
    tok = AutoTokenizer.from_pretrained(model)

    def group(system: str, problem: str) -> dict[str, Any]:
        options = _system(system)
        return {"prompt_token_ids": build_prompt_ids(tok, problem, GroupConfig.from_dict(options)),
                "hogwild": options}

    first = group("S1", "What is 2 + 3?")
    batches = [
        [first],
        [group("S1", "What is 7 + 1?")],
        [{"prompt_token_ids": first["prompt_token_ids"][:-4] + tok.encode(" go on"), "max_tokens": 12}],
        [group("S2", "What is 4 + 4?"), group("S3", "What is 5 + 4?")],
        [group("S4", "What is 6 + 4?"), group("S5", "What is 1 + 4?")],
        [first],
    ]
    engines = {on: GroupBatches(tmp_path_factory.mktemp(f"cache-{on}"), model, batches,
                                {**ENGINE, "enable_prefix_caching": on}) for on in (True, False)}
    for engine in engines.values():
        engine.wait()
    return engines


def _cached(out: dict[str, Any]) -> int:
    return int(out["kv_transfer_params"]["hogwild"]["usage"]["cached_prompt_tokens"])


def test_outputs_equal_with_the_prefix_cache_on_and_off(runs):
    on, off = runs[True], runs[False]
    for batch in range(6):
        for a, b in zip(on.outputs(batch), off.outputs(batch), strict=True):
            assert a["token_ids"] == b["token_ids"], batch
            if a["kv_transfer_params"]:
                assert a["kv_transfer_params"]["hogwild"]["workers"] == b["kv_transfer_params"]["hogwild"]["workers"]
                assert _cached(b) == 0


def test_second_group_reads_the_first_groups_prompt_and_evicted_blocks_are_recomputed(runs):
    on = runs[True]
    first, second, again = on.outputs(0)[0], on.outputs(1)[0], on.outputs(5)[0]
    assert _cached(first) == 0
    # The shared system prompt is most of the prompt: the second group computed only its last blocks.
    prompt = len(second["kv_transfer_params"]["hogwild"]["prompt_token_ids"])
    assert _cached(second) >= prompt - 3 * BLOCK and _cached(second) % BLOCK == 0
    assert _cached(again) < _cached(second)  # S1's blocks were evicted by the groups in between
