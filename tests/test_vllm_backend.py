"""The HOGWILD attention backend inside the real vLLM engine (CPU build): selected only when the plugin is switched
on, and exact for requests outside any group (greedy outputs equal vLLM's own CPU attention)."""

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


def test_register_is_idempotent():
    import hogwild_vllm
    from hogwild_vllm import compat

    hogwild_vllm.register()
    hogwild_vllm.register()
    assert compat._PATCHED == [True]
