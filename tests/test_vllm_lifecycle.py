"""A group's life in the real vLLM engine: aborted as a unit at any stage with every block back in the pool and
nothing left in the model runner; a tiny KV cache preempts plain requests while groups wait, and no output changes.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from vllm_scripts.launch import Script, run_script

from hogwild_vllm.config import GroupConfig
from hogwild_vllm.prompt import HFCodec, build_prompt_ids
from hogwild_vllm.testing.tiny_models import build_tiny_model

pytestmark = [pytest.mark.engine, pytest.mark.slow]


@pytest.fixture(scope="module")
def model() -> str:
    return str(build_tiny_model("qwen2"))


@pytest.fixture(scope="module")
def lifecycle(model: str) -> dict[str, Any]:
    from transformers import AutoTokenizer

    prompt = build_prompt_ids(AutoTokenizer.from_pretrained(model), "What is 3 + 4? Explain.", GroupConfig())
    assert len(prompt) > 200  # two prefill chunks at max_num_batched_tokens=200
    return run_script("group_lifecycle.py", model, json.dumps(prompt))


@pytest.mark.parametrize("name", ["abort_decoding", "abort_pending", "abort_prefill", "finished"])
def test_every_block_returns_and_the_runner_forgets_the_children(lifecycle, name):
    run = lifecycle[name]
    assert run["free_after"] == run["free_before"]
    assert run["groups_left"] == []
    assert run["runner_children"] == []


def test_aborts_happen_while_the_group_holds_blocks(lifecycle):
    decoding, prefill = lifecycle["abort_decoding"], lifecycle["abort_prefill"]
    # The group held its reservation and its children were live in the runner when the abort came.
    assert decoding["free_mid"] < decoding["free_before"] and prefill["free_mid"] < prefill["free_before"]
    assert {c.split("::")[1] for c in decoding["runner_children_mid"]} == {"prompt", "w0", "w1", "w2"}
    assert {c.split("::")[1] for c in prefill["runner_children_mid"]} == {"prompt"}  # the first prompt chunk only
    assert lifecycle["abort_pending"]["runner_children_mid"] == []
    # An aborted group emits nothing (as an aborted plain request); the plain request next to it is unharmed.
    assert "g1" not in decoding["outputs"] and "g3" not in prefill["outputs"]
    assert decoding["outputs"]["p1"] == {"finish_reason": "length", "num_tokens": 20, "hogwild": False}
    assert lifecycle["finished"]["outputs"]["g4"]["hogwild"] is True


def test_tiny_kv_cache_preempts_and_changes_no_output(model: str, tmp_path):
    """64 blocks of 16 tokens for two 2-worker groups (about 25 blocks each) and six long plain requests."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    codec = HFCodec(tok)
    short = {"system_prompt": "Work together, {names}.", "step_separator": "\n", "answer_marker": "ANSWER{"}
    groups = []
    for n, layout in ((2, "combined"), (2, "contiguous")):
        opts = {"workers": n, "layout": layout, "max_tokens": 96, "templates": short}
        ids = build_prompt_ids(tok, f"Count to {n + 5}.", GroupConfig.from_dict(opts))
        groups.append({"prompt_token_ids": ids, "hogwild": opts})
    plain = [{"prompt_token_ids": codec.encode(f"Story {k}: " + "the cat sat on the mat. " * 20), "max_tokens": 120,
              "ignore_eos": True} for k in range(6)]
    batch = plain[:3] + groups + plain[3:]
    engine = {"block_size": 16, "max_model_len": 512, "disable_log_stats": False}
    results = {}
    for name, blocks in (("tiny", 64), ("roomy", None)):
        spec = tmp_path / f"{name}.json"
        extra = {"num_gpu_blocks_override": blocks} if blocks else {}
        spec.write_text(json.dumps({"model": model, "engine": {**engine, **extra}, "batches": [batch]}))
        results[name] = Script("group_generate.py", str(spec)).result(timeout=900)
    tiny, roomy = results["tiny"], results["roomy"]
    assert tiny["preemptions"] > 0 and roomy["preemptions"] == 0
    for a, b in zip(tiny["batches"][0]["outputs"], roomy["batches"][0]["outputs"], strict=True):
        assert a["token_ids"] == b["token_ids"]
        if a["kv_transfer_params"] is not None:
            ga, gb = a["kv_transfer_params"]["hogwild"], b["kv_transfer_params"]["hogwild"]
            assert ga["workers"] == gb["workers"] and ga["transcript"] == gb["transcript"]
    assert sum(o["kv_transfer_params"] is not None for o in tiny["batches"][0]["outputs"]) == 2
