"""Test helpers: the project's tiny local models (``tiny_models``) and their corpus (``corpus``).

Names are re-exported lazily so that importing this package stays cheap and
``python -m hogwild_vllm.testing.tiny_models`` does not import the module twice.
"""

from typing import Any

__all__ = ["BENCH_KINDS", "MODEL_KINDS", "SPECS", "TinyModelSpec", "build_tiny_model", "tiny_model_path"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import tiny_models

        return getattr(tiny_models, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
