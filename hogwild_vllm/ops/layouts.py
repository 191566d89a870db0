"""vLLM's per-layer KV caches as the pages the ops read, and the ``amx`` packing's (un)packers for tests.

The ``vec`` packing and the backend's own cache are strided ``[num_blocks, block_size, Hkv, D]`` views; the ``amx``
packing is read as its ``[num_blocks, Hkv, block_size, D]`` page halves (``packing="amx"`` in the ops). Pure torch:
the views are the same memory, nothing copied, so the ops read the cache vLLM's own kernels write.
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


# vLLM's ``amx`` packing (bf16 / fp16, block_size % 32 == 0, D % 32 == 0): each (block, KV head) page of keys and
# of values is block_size * D contiguous elements. Keys come in groups of AMX_TOKENS tokens; inside a group, each
# pair of dims is one 64-byte row of (token, dim pair) int32 lanes:
#     key (t, d)   at (t // 16) * 16 * D + (d // 2) * 32 + (t % 16) * 2 + d % 2
# Values come in groups of AMX_DIMS dims; inside a group, each pair of tokens is one row of (dim, token pair) lanes:
#     value (t, d) at (d // 16) * (block_size * 16) + (t // 2) * 32 + (d % 16) * 2 + t % 2
AMX_TOKENS = 16  # tokens of one key group
AMX_DIMS = 16  # dims of one value group
AMX_ALIGN = 32  # block_size and D must be multiples of this


def amx_pages(kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM's CPU cache of one layer, [num_blocks, Hkv, block_size, 2 * D] with the ``amx`` packing, -> (key_pages,
    value_pages) [num_blocks, Hkv, block_size, D]: the halves of each (block, head) row, the same memory. Their
    [block_size, D] pages hold the packed elements above, not a [token, dim] matrix."""
    num_blocks, num_kv_heads, block_size, two_d = kv_cache.shape
    key_pages, value_pages = kv_cache.view(num_blocks, num_kv_heads, 2 * block_size, two_d // 2).chunk(2, dim=2)
    return key_pages, value_pages


def _amx_views(key_pages: torch.Tensor, value_pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """6-D views of the packed pages, ordered so that a reshape gives [num_blocks, block_size, Hkv, D]:
    keys [nb, bs / 16, 16, Hkv, D / 2, 2] (group, token in group, head, dim pair, dim in pair);
    values [nb, bs / 2, 2, Hkv, D / 16, 16] (token pair, token in pair, head, dim group, dim in group)."""
    num_blocks, num_kv_heads, block_size, head_size = key_pages.shape
    _check_amx_pages(key_pages, value_pages)
    sb, sh = key_pages.stride(0), key_pages.stride(1)
    # key page as [bs / 16, D / 2, 16, 2] with strides (16 D, 32, 2, 1)
    key = torch.as_strided(key_pages, (num_blocks, num_kv_heads, block_size // AMX_TOKENS, head_size // 2,
                                       AMX_TOKENS, 2), (sb, sh, AMX_TOKENS * head_size, 2 * AMX_TOKENS, 2, 1),
                           key_pages.storage_offset())
    vb, vh = value_pages.stride(0), value_pages.stride(1)
    # value page as [D / 16, bs / 2, 16, 2] with strides (16 bs, 32, 2, 1)
    value = torch.as_strided(value_pages, (num_blocks, num_kv_heads, head_size // AMX_DIMS, block_size // 2,
                                           AMX_DIMS, 2), (vb, vh, AMX_DIMS * block_size, 2 * AMX_DIMS, 2, 1),
                             value_pages.storage_offset())
    return key.permute(0, 2, 4, 1, 3, 5), value.permute(0, 3, 5, 1, 2, 4)


def _check_amx_pages(key_pages: torch.Tensor, value_pages: torch.Tensor) -> None:
    shape = key_pages.shape
    if key_pages.dim() != 4 or value_pages.shape != shape:
        raise ValueError(f"amx pages must be two [num_blocks, Hkv, block_size, D] tensors, got {tuple(shape)} and "
                         f"{tuple(value_pages.shape)}")
    if shape[2] % AMX_ALIGN or shape[3] % AMX_ALIGN:
        raise ValueError(f"the amx packing needs block_size and D multiples of {AMX_ALIGN}, got {tuple(shape)}")
    for pages in (key_pages, value_pages):
        if pages.stride(3) != 1 or pages.stride(2) != shape[3]:
            raise ValueError(f"each amx page must be contiguous, got strides {pages.stride()}")


def amx_unpacked(key_pages: torch.Tensor, value_pages: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """amx pages [num_blocks, Hkv, block_size, D] -> (key, value) [num_blocks, block_size, Hkv, D], contiguous
    copies in token-major order (what the references and the strided packing read)."""
    num_blocks, num_kv_heads, block_size, head_size = key_pages.shape
    key, value = _amx_views(key_pages, value_pages)
    shape = (num_blocks, block_size, num_kv_heads, head_size)
    return key.reshape(shape), value.reshape(shape)


def amx_pack_(key_pages: torch.Tensor, value_pages: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> None:
    """Writes key and value [num_blocks, block_size, Hkv, D] into amx pages [num_blocks, Hkv, block_size, D]
    (modified in place: every element of every page), the inverse of :func:`amx_unpacked`."""
    num_blocks, num_kv_heads, block_size, head_size = key_pages.shape
    if key.shape != (num_blocks, block_size, num_kv_heads, head_size) or value.shape != key.shape:
        raise ValueError(f"key and value must be [num_blocks, block_size, Hkv, D] = "
                         f"{(num_blocks, block_size, num_kv_heads, head_size)}, got {tuple(key.shape)} and "
                         f"{tuple(value.shape)}")
    key_view, value_view = _amx_views(key_pages, value_pages)
    key_view.copy_(key.reshape(key_view.shape))
    value_view.copy_(value.reshape(value_view.shape))
