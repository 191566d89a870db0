"""Hogwild! inference for vLLM: several workers share one paged KV cache.

Importing this package is cheap: heavy modules (torch, vllm) load only when used.
"""

__version__ = "0.1.0"


def register() -> None:
    """vLLM ``general_plugins`` entry point (runs in every vLLM process, maybe more than once).

    Registers nothing yet: the attention backend, scheduler and sampler arrive with the vLLM integration.
    Must stay idempotent and cheap (no heavy imports at call time).
    """
