"""Hogwild! paged attention in Triton: the semantics of ``hogwild_attention_reference``, fused and split-K.

    hogwild_attention_triton(query, key_cache, value_cache, block_tables, table, rope, scale, out, lse)

Every query token attends over its view's segments in one softmax; the query is rotated in registers once per
segment by ``(p_q - n_q) - (view_start - start)`` (the cached keys are never rotated). One program handles one
query token, one KV head with all of its query heads (GQA: each K/V tile is loaded once for the group) and one
split of the visible key range; a second kernel merges the splits' partial (out, lse) by log-sum-exp. The kernels
live in ``ops/_triton_kernels.py``.

No host syncs: the table is read inside the kernels (loop bounds come from tensors) and the grid depends on shapes
only (T, Hkv and a number of splits chosen from T, Hkv and the device), so a launch can be captured in a CUDA graph
for fixed shapes. The table is trusted (the reference checks it); |delta| must be below ``cos_sin_table.shape[0]``
(larger ones are clamped to the last row).

GPU tensors run the compiled kernels; CPU tensors run the same kernels in Triton's interpreter (slow: for tests).
Importing this module never needs triton; :func:`has_triton` says whether it can run.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math

import torch

from hogwild_vllm.ops.reference import DeltaRotation
from hogwild_vllm.ops.segments import SegmentTable

LOG2_E = 1.4426950408889634
MAX_SPLITS = 32  # per (token, KV head) on GPU
CPU_SPLITS = 2  # default under the interpreter: exercises the merge without many programs
MIN_DOT = 16  # tl.dot needs every dimension >= 16
KV_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def has_triton() -> bool:
    """True when triton is importable (the kernels can then run: compiled on GPU, interpreted on CPU)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # type: ignore[import-untyped]  # noqa: F401
        import triton.language  # type: ignore[import-untyped]  # noqa: F401
    except Exception:  # a broken install (missing driver libraries, ...) counts as absent
        return False
    return True


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, n - 1).bit_length())


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def default_num_splits(num_tokens: int, num_kv_heads: int, device: torch.device) -> int:
    """Splits per (token, KV head): on GPU enough programs for about two waves of the SMs, 1 when the batch alone
    fills them (prefill); a shape-only choice, so fixed for fixed shapes (CUDA graphs)."""
    programs = max(1, num_tokens * num_kv_heads)
    if device.type != "cuda":
        return CPU_SPLITS
    return max(1, min(MAX_SPLITS, math.ceil(2 * _multiprocessors(device) / programs)))


def default_block_n(head_size: int, dtype: torch.dtype, device: torch.device) -> int:
    """Keys per tile: 64, or 32 on GPU for fp32 caches and head sizes above 128 (registers: with 64, fp32 K/V tiles
    of head size 128 spill under triton 3.6 on sm_90)."""
    if device.type == "cuda" and (head_size > 128 or dtype == torch.float32):
        return 32
    return 64


def _check_args(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_tables: torch.Tensor,
                table: SegmentTable, rope: DeltaRotation, out: torch.Tensor, lse: torch.Tensor | None) -> None:
    """Shapes, dtypes and devices only (no values: that would sync)."""
    _check(query.dim() == 3 and key_cache.dim() == 4 and value_cache.dim() == 4,
           "query must be [T, Hq, D] and the caches [num_blocks, block_size, Hkv, D]")
    num_tokens, num_heads, head_size = query.shape
    _check(key_cache.shape[3] == head_size, "query and key_cache need the same head size")
    _check(value_cache.shape[:3] == key_cache.shape[:3], "key_cache and value_cache need the same blocks and heads")
    _check(num_heads % key_cache.shape[2] == 0, "query heads must be a multiple of KV heads")
    _check(key_cache.dtype in KV_DTYPES and value_cache.dtype == key_cache.dtype,
           f"caches must share one dtype of {KV_DTYPES}, got {key_cache.dtype} and {value_cache.dtype}")
    _check(block_tables.dim() == 2 and block_tables.dtype == torch.int32, "block_tables must be [num_seqs, B] int32")
    _check(table.num_tokens == num_tokens, "query and table.query_view need one row a token")
    _check(out.shape == (num_tokens, num_heads, value_cache.shape[3]), "out must be [T, Hq, Dv]")
    _check(out.dtype == query.dtype, "out must have the query dtype")
    _check(lse is None or (lse.shape == (num_tokens, num_heads) and lse.dtype == torch.float32),
           "lse must be [T, Hq] fp32")
    rotary_dim = rope.rotary_dim
    _check(0 < rotary_dim <= head_size and rotary_dim % 2 == 0, "rotary_dim must be even and in (0, head_size]")
    cos_sin = rope.cos_sin_table
    _check(cos_sin.dim() == 2 and cos_sin.shape[1] == rotary_dim and cos_sin.dtype == torch.float32,
           "rope.cos_sin_table must be [rows, rotary_dim] fp32")
    tensors = [key_cache, value_cache, block_tables, table.segments, cos_sin, out] + ([lse] if lse is not None else [])
    _check(all(t.device == query.device for t in tensors),
           f"every tensor (table and rope.cos_sin_table too) must be on the query's device {query.device}")


def hogwild_attention_triton(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                             block_tables: torch.Tensor, table: SegmentTable, rope: DeltaRotation, scale: float,
                             out: torch.Tensor, lse: torch.Tensor | None = None, *, num_splits: int | None = None,
                             block_n: int | None = None, num_warps: int = 4, num_stages: int = 2) -> None:
    """Attention of every query token over its view; writes ``out`` (and ``lse``) in place, reads everything else.

    query: [T, Hq, D] rotated at natural positions, any strides; key_cache: [num_blocks, block_size, Hkv, D] and
    value_cache: [num_blocks, block_size, Hkv, Dv], any strides (vLLM's CPU page layout with dim-major keys is
    such a view), fp32 / fp16 / bf16; block_tables: [num_seqs, max_blocks] int32; ``rope.cos_sin_table``
    [rows, rotary_dim] fp32 on the query's device. out: [T, Hq, Dv] in the query dtype, written; lse: [T, Hq] fp32,
    natural log, written when given. Query head h reads KV head h // (Hq // Hkv); a query with no visible key gets
    zeros and lse = -inf. ``num_splits`` / ``block_n`` override the shape-based defaults; ``num_warps`` /
    ``num_stages`` are the split kernel's launch options (tests, tuning).
    """
    _check_args(query, key_cache, value_cache, block_tables, table, rope, out, lse)
    num_tokens, num_heads, head_size = query.shape
    block_size, num_kv_heads, value_size = key_cache.shape[1], key_cache.shape[2], value_cache.shape[3]
    if num_tokens == 0:
        return
    from hogwild_vllm.ops._triton_kernels import kernels

    device = query.device
    split_kernel, merge_kernel = kernels(device.type == "cpu")
    splits = num_splits or default_num_splits(num_tokens, num_kv_heads, device)
    tile = block_n or default_block_n(head_size, key_cache.dtype, device)
    _check(splits >= 1 and tile >= MIN_DOT and tile & (tile - 1) == 0, "num_splits >= 1, block_n a power of 2 >= 16")
    group = num_heads // num_kv_heads
    value_pad = _pow2(value_size, MIN_DOT)
    # The small table tensors are read as contiguous rows (a no-op when they already are).
    segments, view_offsets = table.segments.contiguous(), table.view_offsets.contiguous()  # [S, 4], [V + 1]
    query_view, query_pos = table.query_view.contiguous(), table.query_pos.contiguous()  # [T], [T, 2]
    cos_sin = rope.cos_sin_table.contiguous()  # [rows, rotary_dim]
    if splits > 1:
        part_out = torch.empty(num_tokens, num_heads, splits, value_pad, device=device, dtype=torch.float32)
        part_lse = torch.empty(num_tokens, num_heads, splits, device=device, dtype=torch.float32)
    else:
        part_out = part_lse = cos_sin  # never touched
    lse_arg = lse if lse is not None else cos_sin  # never touched without HAS_LSE
    lse_strides = lse.stride() if lse is not None else (0, 0)
    launch = {"num_warps": num_warps, "num_stages": num_stages}
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        split_kernel[(num_tokens, num_kv_heads, splits)](
            query, key_cache, value_cache, block_tables, segments, view_offsets, query_view, query_pos, cos_sin,
            out, lse_arg, part_out, part_lse, float(scale) * LOG2_E, cos_sin.shape[0],
            *query.stride(), *key_cache.stride(), *value_cache.stride(), *block_tables.stride(), *out.stride(),
            *lse_strides,
            NUM_HEADS=num_heads, GROUP=group, GROUP_PAD=_pow2(group, MIN_DOT),
            HEAD=head_size, HEAD_PAD=_pow2(head_size, MIN_DOT), VHEAD=value_size, VHEAD_PAD=value_pad,
            ROT=rope.rotary_dim, IS_NEOX=bool(rope.is_neox_style), BLOCK_SIZE=block_size, BLOCK_N=tile,
            NUM_SPLITS=splits, SPLIT_DOT=key_cache.dtype != torch.float32, UPCAST_DOT=device.type == "cpu",
            HAS_LSE=lse is not None, **launch)
        if splits > 1:
            merge_kernel[(num_tokens, num_heads)](
                part_out, part_lse, out, lse_arg, *out.stride(), *lse_strides,
                NUM_HEADS=num_heads, NUM_SPLITS=splits, SPLITS_PAD=_pow2(splits), VHEAD=value_size,
                VHEAD_PAD=value_pad, HAS_LSE=lse is not None, num_warps=4)

