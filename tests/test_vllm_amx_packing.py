"""bf16 on CPUs with AMX tiles: vLLM packs the cache for its AMX kernel, and with the plugin on it keeps that
packing: plain requests run vLLM's AMX kernel exactly as with the plugin off (bitwise prompt logprobs and tokens,
chunked prompts and several prompts in a batch), and groups read the same cache through the position-delta op's
``packing="amx"`` path. With the op's AMX tiles switched off (``HOGWILD_CPU_AMX_TILES=0``) a group's results equal
those of the ``vec`` packing (``HOGWILD_CPU_PACKING=vec``): the same sums in the same order, alone and beside a plain
request. With the tiles on (the default) the queries and weights are rounded to bf16 for the tile products, so a
group's tokens may differ from the fp32-vector path's; there the engine must use the tiles, and a group's result
must not depend on what shares its steps. The op's packing and tiles themselves are tested against the fp32 oracle
in tests/test_attention_ops.py; this file needs AMX tiles, which vLLM requires for the ``amx`` packing."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from hogwild_vllm.testing.tiny_models import build_tiny_model

AMX = torch.cpu._is_amx_tile_supported()
needs_amx = pytest.mark.skipif(not AMX, reason="vLLM packs caches for AMX only on CPUs with AMX tiles")


@pytest.fixture(scope="module")
def engine_runs() -> dict[str, dict]:
    from vllm_scripts.launch import Script

    model = str(build_tiny_model("qwen2"))
    runs = {}
    for mode in ("off", "on", "on-vectors", "on-vec"):  # one at a time: engines at once starve a 2-core machine
        runs[mode] = Script("amx_packing.py", model, mode).result()
    return runs


def _comparable(group: dict[str, Any]) -> dict[str, Any]:
    """A group's result without its wall-clock figures."""
    usage = {k: v for k, v in group["usage"].items() if k != "prefill_seconds"}
    return {**group, "usage": usage}


@needs_amx
@pytest.mark.engine
def test_the_plugin_keeps_vllms_amx_packing(engine_runs: dict[str, dict]) -> None:
    assert engine_runs["on"]["packing"] == engine_runs["on-vectors"]["packing"] == ["amx"]
    assert engine_runs["on-vec"]["packing"] == ["vec"]
    assert engine_runs["on"]["tiles"] == [True] and engine_runs["on-vectors"]["tiles"] == [False]


@needs_amx
@pytest.mark.engine
def test_plain_requests_bitwise_the_plugin_off_engine(engine_runs: dict[str, dict]) -> None:
    off = engine_runs["off"]
    for mode in ("on", "on-vectors"):
        on = engine_runs[mode]
        assert [len(lp) for lp in on["logprobs"]] == [512, 160, 96]
        assert on["logprobs"] == off["logprobs"]
        assert on["tokens"] == off["tokens"]


@needs_amx
@pytest.mark.engine
def test_groups_read_the_amx_packing_as_the_vec_one(engine_runs: dict[str, dict]) -> None:
    amx, vec = engine_runs["on-vectors"], engine_runs["on-vec"]
    group = amx["group"]
    assert "error" not in group and group["usage"]["prompt_tokens"] == 160
    assert min(group["usage"]["generated_tokens"]) > 0
    assert _comparable(group) == _comparable(vec["group"])
    assert _comparable(amx["mixed_group"]) == _comparable(group)  # beside a plain request, in the same steps
    assert amx["mixed_plain"] == amx["tokens"][2]


@needs_amx
@pytest.mark.engine
def test_groups_on_amx_tiles_do_not_depend_on_their_batch(engine_runs: dict[str, dict]) -> None:
    tiles = engine_runs["on"]
    group = tiles["group"]
    assert "error" not in group and group["usage"]["prompt_tokens"] == 160
    assert min(group["usage"]["generated_tokens"]) > 0
    assert _comparable(tiles["mixed_group"]) == _comparable(group)  # beside a plain request, in the same steps
    assert tiles["mixed_plain"] == tiles["tokens"][2]


def test_touching_runs_are_one_slice() -> None:
    """Plain runs that touch are sliced from the batch, not gathered."""
    from hogwild_vllm.attention.backend import _tokens

    assert _tokens([(0, 3077)], torch.device("cpu")) == slice(0, 3077)
    assert _tokens([(4, 2), (6, 3)], torch.device("cpu")) == slice(4, 9)
    index = _tokens([(0, 2), (5, 1)], torch.device("cpu"))
    assert isinstance(index, torch.Tensor) and index.tolist() == [0, 1, 5]
