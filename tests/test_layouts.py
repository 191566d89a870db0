"""The cache page views and packers of hogwild_vllm/ops/layouts.py: vLLM's ``amx`` CPU packing.

The packing is checked three ways: element offsets against the formulas (pure torch), pack / unpack round trips,
and the bytes of vLLM's own ``cpu_attn_reshape_and_cache(..., "amx")`` (plain C++, any x86 CPU; that test needs
vLLM and is skipped, with the reason, without it).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from hogwild_vllm.ops.layouts import AMX_ALIGN, amx_pack_, amx_pages, amx_unpacked

# (num_blocks, Hkv, block_size, D): the smallest pages, the engine's common ones, and D / block_size not powers of 2
SHAPES = [(2, 1, 32, 32), (3, 2, 128, 64), (2, 3, 64, 128), (2, 2, 96, 96)]
DTYPES = [torch.bfloat16, torch.float16]

pytestmark = pytest.mark.usefixtures("one_thread")


def shape_id(shape: tuple[int, int, int, int]) -> str:
    return "x".join(map(str, shape))


def amx_offsets(block_size: int, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Element offsets inside one amx page of key (t, d) and value (t, d): [block_size, D] int64 each."""
    t = torch.arange(block_size)[:, None]  # [bs, 1]
    d = torch.arange(head_size)[None, :]  # [1, D]
    key = (t // 16) * 16 * head_size + (d // 2) * 32 + (t % 16) * 2 + d % 2  # [bs, D]
    value = (d // 16) * (block_size * 16) + (t // 2) * 32 + (d % 16) * 2 + t % 2  # [bs, D]
    return key, value


@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_amx_pages_are_the_halves_of_each_row(shape: tuple[int, int, int, int]) -> None:
    num_blocks, num_kv_heads, block_size, head_size = shape
    kv_cache = torch.zeros(num_blocks, num_kv_heads, block_size, 2 * head_size, dtype=torch.bfloat16)
    key_pages, value_pages = amx_pages(kv_cache)
    assert key_pages.shape == value_pages.shape == shape
    key_pages.fill_(1.0)
    value_pages.fill_(2.0)
    rows = kv_cache.view(num_blocks, num_kv_heads, 2 * block_size * head_size)  # one (block, head) row each
    assert bool((rows[..., : block_size * head_size] == 1.0).all())
    assert bool((rows[..., block_size * head_size :] == 2.0).all())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_pack_puts_each_element_at_its_offset(shape: tuple[int, int, int, int], dtype: torch.dtype) -> None:
    num_blocks, num_kv_heads, block_size, head_size = shape
    key = torch.randn(num_blocks, block_size, num_kv_heads, head_size).to(dtype)
    value = torch.randn(num_blocks, block_size, num_kv_heads, head_size).to(dtype)
    key_pages, value_pages = amx_pages(torch.full((num_blocks, num_kv_heads, block_size, 2 * head_size),
                                                  float("nan"), dtype=dtype))
    amx_pack_(key_pages, value_pages, key, value)
    key_at, value_at = amx_offsets(block_size, head_size)
    key_flat = key_pages.reshape(num_blocks, num_kv_heads, block_size * head_size)  # [nb, Hkv, bs * D]
    value_flat = value_pages.reshape(num_blocks, num_kv_heads, block_size * head_size)
    assert torch.equal(key_flat[:, :, key_at], key.permute(0, 2, 1, 3))  # [nb, Hkv, bs, D]
    assert torch.equal(value_flat[:, :, value_at], value.permute(0, 2, 1, 3))
    assert not bool(key_flat.isnan().any()) and not bool(value_flat.isnan().any())  # every slot written
    unpacked_key, unpacked_value = amx_unpacked(key_pages, value_pages)
    assert unpacked_key.is_contiguous() and unpacked_value.is_contiguous()
    assert torch.equal(unpacked_key, key) and torch.equal(unpacked_value, value)


def test_pages_with_a_block_stride_round_trip() -> None:
    """Pages of a cache whose blocks are not adjacent (a slice of blocks of a wider tensor) pack and unpack."""
    kv_cache = torch.zeros(7, 2, 32, 128, dtype=torch.bfloat16)[1::2]  # [3, 2, 32, 2D], block stride 2x
    key_pages, value_pages = amx_pages(kv_cache)
    key, value = torch.randn(2, 3, 32, 2, 64).bfloat16().unbind(0)  # [3, 32, 2, 64] each
    amx_pack_(key_pages, value_pages, key, value)
    unpacked_key, unpacked_value = amx_unpacked(key_pages, value_pages)
    assert torch.equal(unpacked_key, key) and torch.equal(unpacked_value, value)


BAD_PAGES = {
    "block-16": (lambda: amx_pages(torch.zeros(2, 2, 16, 128)), "multiples of 32"),
    "head-80": (lambda: amx_pages(torch.zeros(2, 2, 32, 160)), "multiples of 32"),
    "strided-pages": (lambda: (torch.zeros(2, 2, 32, 128)[..., :64],) * 2, "contiguous"),
    "mismatched": (lambda: (torch.zeros(2, 2, 32, 64), torch.zeros(2, 2, 64, 64)), "two \\[num_blocks"),
}


@pytest.mark.parametrize("name", BAD_PAGES)
def test_bad_pages_are_refused(name: str) -> None:
    make, message = BAD_PAGES[name]
    key_pages, value_pages = make()
    with pytest.raises(ValueError, match=message):
        amx_unpacked(key_pages, value_pages)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_pack_matches_vllms_own_writer(shape: tuple[int, int, int, int], dtype: torch.dtype) -> None:
    """The bytes of the test packer equal those vLLM's cpu_attn_reshape_and_cache writes with isa "amx", for every
    slot written in a shuffled order (and the unwritten ones left alone by both)."""
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed: its amx writer cannot be compared")
    from vllm import _custom_ops as vllm_ops

    num_blocks, num_kv_heads, block_size, head_size = shape
    assert block_size % AMX_ALIGN == 0 and head_size % AMX_ALIGN == 0
    written = num_blocks * block_size - 5  # a few slots stay unwritten (zeros in both)
    slots = torch.randperm(num_blocks * block_size)[:written]  # [W] int64
    key = torch.randn(written, num_kv_heads, head_size).to(dtype)  # [W, Hkv, D]
    value = torch.randn(written, num_kv_heads, head_size).to(dtype)
    theirs = torch.zeros(num_blocks, num_kv_heads, block_size, 2 * head_size, dtype=dtype)
    their_key_pages, their_value_pages = amx_pages(theirs)
    vllm_ops.cpu_attn_reshape_and_cache(key, value, their_key_pages, their_value_pages, slots, "amx")
    token_major = torch.zeros(2, num_blocks * block_size, num_kv_heads, head_size, dtype=dtype)  # key, value
    token_major[0, slots], token_major[1, slots] = key, value
    ours = torch.zeros_like(theirs)
    our_key_pages, our_value_pages = amx_pages(ours)
    amx_pack_(our_key_pages, our_value_pages, *token_major.view(2, num_blocks, block_size, num_kv_heads,
                                                                  head_size).unbind(0))
    assert torch.equal(ours.view(torch.int16), theirs.view(torch.int16))

