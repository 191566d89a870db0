"""Hogwild! inference for vLLM: several workers share one paged KV cache.

Importing this package is cheap: heavy modules (torch, vllm) load only when used.
"""

__version__ = "0.1.0"
