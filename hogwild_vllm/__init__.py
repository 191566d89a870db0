"""Hogwild! inference for vLLM: several workers share one paged KV cache.

Importing this package is cheap: heavy modules (torch, vllm) load only when used.
"""

__version__ = "0.1.0"


def register() -> None:
    """vLLM ``general_plugins`` entry point (runs in every vLLM process, maybe more than once; idempotent).

    Registers the HOGWILD attention backend and the selector hook that picks it when an engine switches the
    plugin on (``additional_config={"hogwild": {...}}``), and the config hook that makes such an engine use
    HogwildScheduler, synchronous scheduling and the V1 model runner (or refuses features groups cannot run with);
    with the plugin off, vLLM behaves as without it.
    """
    from hogwild_vllm.compat import register_backend, register_config_hook

    register_backend()
    register_config_hook()
