"""Hogwild! inference for vLLM: several workers share one paged KV cache.

Importing this package is cheap: heavy modules (torch, vllm) load only when used. Offline use::

    import hogwild_vllm
    llm = hogwild_vllm.make_llm("/path/to/model")
    outs = hogwild_vllm.generate(llm, ["What is 17 * 23?"], hogwild_vllm.GroupConfig(workers=4))
"""

__version__ = "0.1.0"

from hogwild_vllm.config import GroupConfig, Layout, Templates  # noqa: E402 - cheap: no torch, no vLLM
from hogwild_vllm.offline import generate, make_llm  # noqa: E402
from hogwild_vllm.outputs import GroupOutput  # noqa: E402

__all__ = ["GroupConfig", "GroupOutput", "Layout", "Templates", "generate", "make_llm", "register"]


def register() -> None:
    """vLLM ``general_plugins`` entry point (runs in every vLLM process, maybe more than once; idempotent).

    Registers the HOGWILD attention backend and the selector hook that picks it when an engine switches the
    plugin on (``additional_config={"hogwild": {...}}``), and the config hook that makes such an engine use
    HogwildScheduler, synchronous scheduling and the V1 model runner (or refuses features groups cannot run with);
    with the plugin off, vLLM behaves as without it. Also lets a group request ask for one choice per worker at
    temperature 0 (``compat.allow_greedy_choices``; other requests keep vLLM's check), and adds the hogwild series
    to the server's ``/metrics`` (``metrics.register_collector``).
    """
    from hogwild_vllm.compat import allow_greedy_choices, register_backend, register_config_hook
    from hogwild_vllm.metrics import register_collector

    register_backend()
    register_config_hook()
    allow_greedy_choices()
    register_collector()
