"""The compiled position-delta attention op (hogwild_C::hogwild_attention, csrc/cpu) against the fp32 references.

Grids as the reference tests (tests/attention_cases.py): head sizes 64 / 128 (and 72-112 for the op's vector
tails), GQA 1 / 3 / 4 / 5, block sizes
16 / 32 / 128, 1-8 workers, fp32 / bf16 / fp16, neox / gptj / partial rotary, in a garbage-filled cache with
shuffled block tables, segments starting and ending mid-block, empty segments and negative deltas. Each case runs
on two cache packings: dim-contiguous pages and vLLM's CPU packing (keys dim-major inside a page), both as strided
views of one buffer. Needs the compiled extension: a missing build fails (with how to build it), it is not skipped.
Pure torch (no vLLM). The GPU path is the Triton kernel, tested on the same cases in tests/test_triton_attention.py.
"""

from __future__ import annotations

import random

import pytest
import torch
from attention_cases import (
    BLOCK_SIZES,
    NUM_KV_HEADS,
    ROPE_STYLES,
    Scenario,
    TestRope,
    Tolerance,
    build_scenario,
    make_rope,
    oracle,
    table_from_views,
)

from hogwild_vllm.ops import hogwild_attention, hogwild_attention_reference
from hogwild_vllm.ops._ext import load_ops
from hogwild_vllm.ops.layouts import cpu_page_views

DEVICE = "cpu"
IMPL = "ext"
HEAD_SIZES = [64, 128]
GQA_RATIOS = [1, 3, 4, 5]
NUM_WORKERS = [1, 2, 3, 5, 8]
PACKINGS = ["contiguous", "vllm-cpu"]
CASES = [("neox", torch.float32), ("gptj", torch.bfloat16), ("neox-partial", torch.bfloat16),
         ("gptj-partial", torch.float32), ("neox", torch.float16)]
# Against the fp32 oracle. fp32: summation order only (seen 1e-6). bf16 / fp16: one rounding of the output to the
# dtype (relative 2**-8 / 2**-11) on top; lse is fp32 math on the same rounded inputs.
OUT_TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float32: {"atol": 2e-5, "rtol": 2e-5},
    torch.bfloat16: {"atol": 2e-5, "rtol": 2**-7},
    torch.float16: {"atol": 2e-5, "rtol": 2**-10},
}
LSE_TOLERANCE: Tolerance = {"atol": 2e-5, "rtol": 2e-5}

pytestmark = pytest.mark.usefixtures("one_thread")




def repack(sc: Scenario, packing: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The scenario's caches, on DEVICE, as strided views of one vLLM-style buffer [num_blocks, Hkv, bs, 2D]."""
    num_blocks, block_size, num_kv_heads, head_size = sc.key_cache.shape
    buffer = torch.randn(num_blocks, num_kv_heads, block_size, 2 * head_size).to(sc.key_cache.dtype).to(DEVICE)
    if packing == "vllm-cpu":
        key, value = cpu_page_views(buffer)
    else:
        paged = buffer.permute(0, 2, 1, 3)  # [num_blocks, block_size, Hkv, 2D]
        key, value = paged[..., :head_size], paged[..., head_size:]
    key.copy_(sc.key_cache)
    value.copy_(sc.value_cache)
    return key, value


def run_op(sc: Scenario, rope: TestRope, scale: float, packing: str = "contiguous",
           ) -> tuple[torch.Tensor, torch.Tensor]:
    key, value = repack(sc, packing)
    out, lse = hogwild_attention(sc.query.to(DEVICE), key, value, sc.block_tables.to(DEVICE), sc.table.to(DEVICE),
                                 rope.to(DEVICE), scale, return_lse=True, impl=IMPL)
    return out.cpu(), lse.cpu()


@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize(("rope_style", "dtype"), CASES, ids=lambda case: str(case).split(".")[-1])
@pytest.mark.parametrize("num_workers", NUM_WORKERS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("gqa_ratio", GQA_RATIOS)
@pytest.mark.parametrize("head_size", HEAD_SIZES)
def test_op_matches_dense_oracle(head_size: int, gqa_ratio: int, block_size: int, num_workers: int,
                                 dtype: torch.dtype, rope_style: str, packing: str, rng: random.Random) -> None:
    rope = make_rope("double", rope_style, head_size)
    assert isinstance(rope, TestRope)
    sc = build_scenario(num_workers, block_size, NUM_KV_HEADS * gqa_ratio, dtype, rope, rng)
    scale = head_size**-0.5
    out, lse = run_op(sc, rope, scale, packing)
    want_out, want_lse = oracle(sc, rope, scale)
    assert out.dtype == dtype and out.shape == sc.query.shape and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), want_out, **OUT_TOLERANCES[dtype])
    torch.testing.assert_close(lse, want_lse, **LSE_TOLERANCE)



# Value sizes that are not a whole number of the op's two-vector value chunks (16 fp32 lanes with AVX-512, 8 with
# AVX2): 80 and 112 end on a one-vector chunk, 72 is not a whole number of 16-lane vectors (scalar path there).
@pytest.mark.parametrize("packing", PACKINGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("block_size", [16, 128])
@pytest.mark.parametrize("head_size", [72, 80, 96, 112])
def test_op_matches_dense_oracle_other_head_sizes(head_size: int, block_size: int, dtype: torch.dtype, packing: str,
                                                  rng: random.Random) -> None:
    rope = make_rope("double", "neox", head_size)
    assert isinstance(rope, TestRope)
    sc = build_scenario(3, block_size, NUM_KV_HEADS * 3, dtype, rope, rng)
    scale = head_size**-0.5
    out, lse = run_op(sc, rope, scale, packing)
    want_out, want_lse = oracle(sc, rope, scale)
    torch.testing.assert_close(out.float(), want_out, **OUT_TOLERANCES[dtype])
    torch.testing.assert_close(lse, want_lse, **LSE_TOLERANCE)


@pytest.mark.parametrize("rope_style", list(ROPE_STYLES))
def test_hand_made_views_negative_deltas_and_empty_views(rope_style: str, rng: random.Random) -> None:
    """Segments that start and end mid-block, a peer's tokens at view positions far below their natural ones
    (negative deltas), a view with no segment, one with only empty segments: equal to the reference."""
    head_size, num_heads, block_size = 64, NUM_KV_HEADS * 3, 16
    rope = make_rope("double", rope_style, head_size)
    bt = torch.stack([torch.randperm(40)[:12], torch.randperm(40)[:12]]).int()  # [2, 12]: shared pool, shuffled
    key_cache = torch.randn(40, block_size, NUM_KV_HEADS, head_size)
    value_cache = torch.randn(40, block_size, NUM_KV_HEADS, head_size)
    views = [[(0, 3, 20, 0), (1, 150, 17, 20), (0, 100, 0, 37), (1, 7, 9, 37)], [], [(0, 5, 0, 0), (1, 9, 0, 3)]]
    queries = [[(12, 40), (13, 45), (30, 10), (150, 0)], [(4, 4)], [(9, 2)]]
    table = table_from_views(views, queries)
    query = torch.randn(table.num_tokens, num_heads, head_size)  # [T, Hq, D]
    got, got_lse = hogwild_attention(query, key_cache, value_cache, bt, table, rope, 0.125, return_lse=True,
                                     impl=IMPL)
    want, want_lse = hogwild_attention_reference(query, key_cache, value_cache, bt, table, rope, 0.125, True)
    torch.testing.assert_close(got, want, **OUT_TOLERANCES[torch.float32])
    torch.testing.assert_close(got_lse, want_lse, **LSE_TOLERANCE)
    assert bool((got_lse[4:] == float("-inf")).all()) and torch.equal(got[4:], torch.zeros_like(got[4:]))


def test_writes_only_out_and_lse(rng: random.Random) -> None:
    """A strided ``out`` (a slice of a wider buffer): the op writes exactly its elements; inputs are unchanged."""
    rope = make_rope("double", "neox", 64)
    sc = build_scenario(4, 32, NUM_KV_HEADS * 4, torch.bfloat16, rope, rng)
    key, value = repack(sc, "vllm-cpu")
    inputs = [sc.query, key, value, sc.block_tables, sc.table.segments, sc.table.view_offsets, sc.table.query_view,
              sc.table.query_pos]
    before = [t.clone() for t in inputs]
    wide = torch.full((sc.query.shape[0], sc.query.shape[1], 3 * 64), 7.0, dtype=torch.bfloat16)  # [T, Hq, 3D]
    out = wide[..., 64:128]  # [T, Hq, D], strided
    hogwild_attention(sc.query, key, value, sc.block_tables, sc.table, rope, 0.125, out=out, impl=IMPL)
    want = hogwild_attention(sc.query, key, value, sc.block_tables, sc.table, rope, 0.125, impl="reference")
    assert isinstance(want, torch.Tensor)
    torch.testing.assert_close(out.float(), want.float(), **OUT_TOLERANCES[torch.bfloat16])
    assert bool((wide[..., :64] == 7.0).all()) and bool((wide[..., 128:] == 7.0).all())
    for tensor, saved in zip(inputs, before, strict=True):
        assert torch.equal(tensor, saved)


BAD_SEGMENTS = {"block table row": [5, 0, 4, 0], "past the block table": [0, 60, 10, 0],
                "negative length": [0, 0, -3, 0]}


@pytest.mark.parametrize("segment", list(BAD_SEGMENTS.values()), ids=list(BAD_SEGMENTS))
def test_out_of_bounds_tables_raise_instead_of_reading(segment: list[int]) -> None:
    rope = make_rope("double", "neox", 64)
    table = table_from_views([[tuple(segment)]], [[(3, 3)]])  # type: ignore[list-item]
    cache = torch.randn(4, 16, NUM_KV_HEADS, 64)
    with pytest.raises(RuntimeError, match="reads outside"):
        hogwild_attention(torch.randn(1, NUM_KV_HEADS, 64), cache, cache, torch.tensor([[3, 1, 0, 2]]).int(), table,
                          rope, 0.125, impl=IMPL)


def test_huge_delta_outside_the_rope_table_raises() -> None:
    rope = make_rope("double", "neox", 64)
    rows = rope.cos_sin_table.shape[0]
    table = table_from_views([[(0, 0, 4, 0)]], [[(0, rows + 12)]])  # delta = rows + 12
    cache = torch.randn(4, 16, NUM_KV_HEADS, 64)
    with pytest.raises(RuntimeError, match="RoPE table"):
        hogwild_attention(torch.randn(1, NUM_KV_HEADS, 64), cache, cache, torch.tensor([[3, 1, 0, 2]]).int(), table,
                          rope, 0.125, impl=IMPL)


def test_bad_shapes_and_dtypes_are_refused() -> None:
    rope = make_rope("double", "neox", 64)
    table = table_from_views([[(0, 0, 4, 0)]], [[(3, 3)]])
    cache, bt = torch.randn(4, 16, NUM_KV_HEADS, 64), torch.tensor([[3, 1, 0, 2]]).int()
    with pytest.raises(RuntimeError, match="multiple of"):
        hogwild_attention(torch.randn(1, 3, 64), cache, cache, bt, table, rope, 0.125, impl=IMPL)
    with pytest.raises(RuntimeError, match="dtypes must be"):
        hogwild_attention(torch.randn(1, 2, 64), cache.half(), cache.half(), bt, table, rope, 0.125, impl=IMPL)
    with pytest.raises(RuntimeError, match="block_tables must be int32"):
        hogwild_attention(torch.randn(1, 2, 64), cache, cache, bt.long(), table, rope, 0.125, impl=IMPL)


def test_opcheck(rng: random.Random) -> None:
    rope = make_rope("double", "gptj-partial", 64)
    assert isinstance(rope, TestRope)
    sc = build_scenario(3, 16, NUM_KV_HEADS * 2, torch.float32, rope, rng)
    t = sc.table
    out = torch.empty(sc.query.shape)
    lse = torch.empty(sc.query.shape[:2])
    args = (out, sc.query, sc.key_cache, sc.value_cache, sc.block_tables, t.segments, t.view_offsets, t.query_view,
            t.query_pos, rope.cos_sin_table, rope.rotary_dim, rope.is_neox_style, 0.125, lse)
    torch.library.opcheck(load_ops().hogwild_attention.default, args)
