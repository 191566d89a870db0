"""Loader for the compiled extension `hogwild_vllm._C` (C++/CUDA ops under `torch.ops.hogwild_C`).

The extension is imported lazily, on the first `load_ops()`: importing `hogwild_vllm` never needs it. Loading also
registers the ops' fake (meta) implementations so that torch.compile can trace them.

    ops = load_ops()
    ops.rotate_by_delta(x, delta, cos_sin_table, rotary_dim, is_neox)  # in place on x
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import torch

EXT_MODULE = "hogwild_vllm._C"
OPS_NAMESPACE = "hogwild_C"
BUILD_HINT = (
    "The compiled extension hogwild_vllm._C is not available. Build it against the installed torch with "
    "`make setup`, or `pip install --no-build-isolation -e .` in an environment that has torch "
    "(HOGWILD_SKIP_EXT=1 skips the build on purpose)."
)


@functools.cache
def load_ops() -> ModuleType:
    """Imports the extension once and returns `torch.ops.hogwild_C`; raises ImportError saying how to build it."""
    try:
        importlib.import_module(EXT_MODULE)
    except ImportError as e:
        raise ImportError(f"{BUILD_HINT} (import error: {e})") from e
    _register_fakes()
    ops: ModuleType = getattr(torch.ops, OPS_NAMESPACE)
    return ops


def has_ext() -> bool:
    """True when the compiled extension loads."""
    try:
        load_ops()
    except ImportError:
        return False
    return True


def _register_fakes() -> None:
    """Fake implementations: shapes and dtypes only, run under FakeTensorMode (torch.compile, opcheck)."""

    @torch.library.register_fake(f"{OPS_NAMESPACE}::rotate_by_delta")
    def _rotate_by_delta_fake(
        x: torch.Tensor,  # [num_tokens, num_heads, head_size], modified in place
        delta: torch.Tensor,  # [num_tokens] int64
        cos_sin_table: torch.Tensor,  # [table_rows, rotary_dim] float32
        rotary_dim: int,
        is_neox: bool,
    ) -> None:
        torch._check(x.dim() == 3, lambda: f"rotate_by_delta: x must be 3-D, got {x.dim()}-D")
        torch._check(delta.dim() == 1, lambda: f"rotate_by_delta: delta must be 1-D, got {delta.dim()}-D")
        torch._check(delta.dtype == torch.int64, lambda: f"rotate_by_delta: delta must be int64, got {delta.dtype}")
        torch._check(
            cos_sin_table.dim() == 2 and cos_sin_table.dtype == torch.float32,
            lambda: "rotate_by_delta: cos_sin_table must be 2-D float32",
        )
        return None

    @torch.library.register_fake(f"{OPS_NAMESPACE}::hogwild_attention")
    def _hogwild_attention_fake(
        out: torch.Tensor,  # [T, Hq, Dv], written
        query: torch.Tensor,  # [T, Hq, D]
        key_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, D]; packing 1: [num_blocks, Hkv, block_size, D]
        value_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, Dv]; packing 1: [num_blocks, Hkv, block_size, D]
        block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
        segments: torch.Tensor,  # [S, 4] int32
        view_offsets: torch.Tensor,  # [V + 1] int32
        query_view: torch.Tensor,  # [T] int32
        query_pos: torch.Tensor,  # [T, 2] int32
        cos_sin_table: torch.Tensor,  # [rows, rotary_dim] fp32
        rotary_dim: int,
        is_neox: bool,
        scale: float,
        lse: torch.Tensor | None,  # [T, Hq] fp32, written
        packing: int = 0,  # 0: strided views, 1: vLLM's amx pages
    ) -> None:
        torch._check(packing in (0, 1), lambda: f"hogwild_attention: packing must be 0 or 1, got {packing}")
        torch._check(query.dim() == 3 and key_cache.dim() == 4, lambda: "hogwild_attention: query [T, Hq, D], "
                     "key_cache [num_blocks, block_size, Hkv, D] (amx pages: [num_blocks, Hkv, block_size, D])")
        torch._check(out.shape == (*query.shape[:2], value_cache.shape[3]),
                     lambda: f"hogwild_attention: out must be [T, Hq, Dv], got {tuple(out.shape)}")
        return None
