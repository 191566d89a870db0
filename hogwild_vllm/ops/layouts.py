"""Strided views of vLLM's per-layer KV caches as the ``[num_blocks, block_size, Hkv, D]`` pages the ops read.

Pure torch: the same memory, nothing copied, so the ops read the cache vLLM's own kernels write.
"""

from __future__ import annotations

import torch


def cpu_page_views(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's CPU cache of one layer, [num_blocks, Hkv, block_size, 2 * D] with the ``vec`` / ``vec16`` packing,
    -> (key, value) views [num_blocks, block_size, Hkv, D].

    Inside a (block, KV head) page the first ``block_size * D`` elements are the keys stored dim-major (token j's dim
    d at ``d * block_size + j``), the next ``block_size * D`` the values stored row-major (at ``j * D + d``).
    """
    num_blocks, num_kv_heads, block_size, two_d = kv_cache.shape
    d = two_d // 2
    key, value = kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, d).chunk(2, dim=2)
    shape = (num_blocks, block_size, num_kv_heads, d)
    key_view = torch.as_strided(key, shape, (key.stride(0), 1, key.stride(1), block_size), key.storage_offset())
    value_view = torch.as_strided(value, shape, (value.stride(0), d, value.stride(1), 1), value.storage_offset())
    return key_view, value_view


def flash_page_views(kv_cache: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The backend's own LBHNC cache [num_blocks, Hkv, block_size, 2 * D] (keys in the first D channels) ->
    (key, value) views [num_blocks, block_size, Hkv, D], dim-contiguous."""
    paged = kv_cache.permute(0, 2, 1, 3)  # [num_blocks, block_size, Hkv, 2D]
    return paged[..., :head_size], paged[..., head_size:]
