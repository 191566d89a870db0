"""The HOGWILD attention backend inside the real vLLM engine (CPU build): selected only when the plugin is switched
on, and exact for requests outside any group (greedy outputs equal vLLM's own CPU attention). The same two engine
runs check the config hook (HogwildScheduler only when on) and the frontend validator (hogwild requests refused)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hogwild_vllm.testing.tiny_models import build_tiny_model

SCRIPTS = Path(__file__).parent / "vllm_scripts"
pytestmark = pytest.mark.engine


def run_script(name: str, *args: str, timeout: int = 600) -> dict:
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_TARGET_DEVICE="cpu",
               VLLM_ALLOW_INSECURE_SERIALIZATION="1")  # collective_rpc with a lambda, to read the backend in use
    proc = subprocess.run([sys.executable, str(SCRIPTS / name), *args], capture_output=True, text=True,
                          timeout=timeout, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT=")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    return json.loads(lines[-1][len("RESULT="):])


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


@pytest.mark.parametrize("mode", ["on", "off"])
def test_hogwild_requests_rejected_in_the_frontend(plain_runs, mode):
    """The validator entry point is loaded in every engine: a group request raises VLLMValidationError from
    LLM.generate (groups are not available yet; bad options are named first), and the plain requests that follow
    in the same engine still give the exact outputs checked above."""
    not_yet, bad = plain_runs[mode]["rejected"]
    assert not_yet["type"] == bad["type"] == "VLLMValidationError"
    assert "hogwild groups inside vLLM are not available yet" in not_yet["message"]
    assert "'workers' must be an integer" in bad["message"]


def test_register_is_idempotent():
    import hogwild_vllm
    from hogwild_vllm import compat

    hogwild_vllm.register()
    hogwild_vllm.register()
    assert compat._PATCHED == [True]
    assert compat._CONFIG_PATCHED == [True]
