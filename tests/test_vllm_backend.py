"""The HOGWILD attention backend inside the real vLLM engine (CPU build): selected only when the plugin is switched
on, and exact for requests outside any group (greedy outputs equal vLLM's own CPU attention). The same two engine
runs check the config hook (HogwildScheduler only when on) and the frontend validator."""

from __future__ import annotations

import pytest
from vllm_scripts.launch import run_script

from hogwild_vllm.testing.tiny_models import build_tiny_model

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def plain_runs() -> dict[str, dict]:
    model = str(build_tiny_model("qwen2"))
    return {mode: run_script("plain_generate.py", model, mode) for mode in ("on", "off")}


def test_backend_selected_only_when_switched_on(plain_runs):
    assert plain_runs["on"]["backend"] == ["HogwildAttentionBackend"]
    assert plain_runs["off"]["backend"] == ["CPUAttentionBackend"]


def test_plain_requests_exact_with_plugin_on(plain_runs):
    on, off = plain_runs["on"]["ids"], plain_runs["off"]["ids"]
    assert len(on) == 4 and all(len(ids) == 24 for ids in on)
    assert on == off


def test_scheduler_and_runner_only_changed_when_switched_on(plain_runs):
    on, off = plain_runs["on"], plain_runs["off"]
    assert on["scheduler"] == "hogwild_vllm.scheduler.HogwildScheduler"
    assert off["scheduler"] == "vllm.v1.core.sched.scheduler.Scheduler"
    assert on["async_scheduling"] is False and off["async_scheduling"] is False  # CPU: never async
    assert on["runner"] == off["runner"] == ["CPUModelRunner"]
    # The runner hook (row order + forced tokens) is installed by the backend's builder, so only when on.
    assert on["runner_hook"] == [True] and off["runner_hook"] == [False]


@pytest.mark.parametrize("mode", ["on", "off"])
def test_hogwild_requests_validated_in_the_frontend(plain_runs, mode):
    """The validator entry point is loaded in every engine: a bad option raises VLLMValidationError from
    LLM.generate naming it; a valid group runs when the plugin is on and is refused when it is off. The plain
    requests that follow in the same engine still give the exact outputs checked above."""
    valid, bad = plain_runs[mode]["rejected"]
    assert bad["type"] == "VLLMValidationError"
    assert "'workers' must be an integer" in bad["message"]
    if mode == "on":
        assert valid["type"] is None, valid
    else:
        assert valid["type"] == "VLLMValidationError"
        assert "the hogwild plugin is not switched on for this engine" in valid["message"]


def test_register_is_idempotent():
    import hogwild_vllm
    from hogwild_vllm import compat

    hogwild_vllm.register()
    hogwild_vllm.register()
    assert compat._PATCHED == [True]
    assert compat._CONFIG_PATCHED == [True]
