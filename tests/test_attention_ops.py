"""The compiled position-delta attention op (hogwild_C::hogwild_attention, csrc/cpu) against the fp32 references.

Grids as the reference tests (tests/attention_cases.py): head sizes 64 / 128 (and 72-112 for the op's vector
tails), GQA 1 / 3 / 4 / 5, block sizes
16 / 32 / 128, 1-8 workers, fp32 / bf16 / fp16, neox / gptj / partial rotary, in a garbage-filled cache with
shuffled block tables, segments starting and ending mid-block, empty segments and negative deltas. Each case runs
on four cache packings: dim-contiguous pages and vLLM's ``vec`` CPU packing (keys dim-major inside a page), both as
strided views of one buffer, and vLLM's ``amx`` CPU packing (``packing="amx"``: 16-bit pairs in 32-bit lanes), on
the cases it applies to (bf16 / fp16, block and head sizes multiples of 32; the grids list only those), twice: as
the op runs it on this CPU (AMX tiles for bf16 where the CPU has them: queries and weights rounded to bf16, with
tolerances bounded from that rounding) and with the tiles switched off (``vllm-amx-vectors``: fp32 vectors). Needs the
compiled extension: a missing build fails (with how to build it), it is not skipped. Pure torch (no vLLM; the amx
packer is checked against vLLM's own in tests/test_layouts.py). The GPU path is the Triton kernel, tested on the
same cases in tests/test_triton_attention.py.
"""

from __future__ import annotations

import itertools
import math
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
    paged_cache,
    table_from_views,
)

from hogwild_vllm.ops import (
    SegmentTable,
    amx_tiles_switched_off,
    cpu_amx_tiles,
    hogwild_attention,
    hogwild_attention_reference,
)
from hogwild_vllm.ops._ext import load_ops
from hogwild_vllm.ops.layouts import AMX_ALIGN, amx_pack_, amx_pages, cpu_page_views

DEVICE = "cpu"
IMPL = "ext"
HEAD_SIZES = [64, 128]
GQA_RATIOS = [1, 3, 4, 5]
NUM_WORKERS = [1, 2, 3, 5, 8]
# vllm-amx: as the op runs on this CPU (AMX tiles for bf16 where it has them); vllm-amx-vectors: tiles switched off
PACKINGS = ["contiguous", "vllm-cpu", "vllm-amx", "vllm-amx-vectors"]
OP_PACKING = {"contiguous": "strided", "vllm-cpu": "strided", "vllm-amx": "amx",  # -> hogwild_attention(packing=)
              "vllm-amx-vectors": "amx"}
AMX_DTYPES = (torch.bfloat16, torch.float16)
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


def on_amx_tiles(dtype: torch.dtype, packing: str) -> bool:
    """Whether the op multiplies this case with AMX tiles (bf16 amx pages, tiles on in this process)."""
    return packing == "vllm-amx" and dtype == torch.bfloat16 and cpu_amx_tiles()


def tile_tolerances(sc: Scenario, scale: float) -> tuple[Tolerance, Tolerance]:
    """(out, lse) tolerances of the AMX tile path against the fp32 oracle, bounded from its two roundings:
    * each rotated, scaled query is rounded to bf16 (relative 2**-9 a dim), so a score moves by at most
      2**-9 * scale * |q| * |k| (Cauchy-Schwarz; the rotation keeps norms): lse by at most that much;
    * the weights move relatively by at most exp(2 * that) - 1 and are rounded to bf16 for the value product
      (relative 2**-9; 2**-8 with the fp32 sums' order): the output by at most their sum times max |v|,
      on top of the output's own bf16 rounding (relative 2**-8, the rtol of every bf16 case)."""
    q_norm = float(sc.query.float().norm(dim=-1).max())
    k_norm = float(sc.key_cache.float().nan_to_num().norm(dim=-1).max())
    v_max = float(sc.value_cache.float().nan_to_num().abs().max())
    score = 2**-9 * scale * q_norm * k_norm
    out_atol = (math.expm1(2 * score) + 2**-8) * v_max
    return ({"atol": out_atol + 2e-5, "rtol": 2**-7}, {"atol": score + 2e-5, "rtol": 2e-5})


def assert_matches_oracle(out: torch.Tensor, lse: torch.Tensor, sc: Scenario, rope: TestRope, scale: float,
                          packing: str) -> None:
    dtype = sc.query.dtype
    want_out, want_lse = oracle(sc, rope, scale)
    out_tol, lse_tol = tile_tolerances(sc, scale) if on_amx_tiles(dtype, packing) else (OUT_TOLERANCES[dtype],
                                                                                         LSE_TOLERANCE)
    torch.testing.assert_close(out.float(), want_out, **out_tol)
    torch.testing.assert_close(lse, want_lse, **lse_tol)

pytestmark = pytest.mark.usefixtures("one_thread")


def packing_applies(packing: str, dtype: torch.dtype, block_size: int, head_size: int) -> bool:
    """Every packing but amx holds any case; amx pages hold 16-bit caches with block and head sizes % 32 == 0."""
    return not packing.startswith("vllm-amx") or (dtype in AMX_DTYPES and block_size % AMX_ALIGN == 0
                                                  and head_size % AMX_ALIGN == 0)


def case_id(case: object) -> str:
    return "-".join(str(x).split(".")[-1] for x in (case if isinstance(case, tuple) else (case,)))


# (head_size, gqa_ratio, block_size, num_workers, (rope_style, dtype), packing), the packings where they apply
MAIN_GRID = [case for case in itertools.product(HEAD_SIZES, GQA_RATIOS, BLOCK_SIZES, NUM_WORKERS, CASES, PACKINGS)
             if packing_applies(case[5], case[4][1], case[2], case[0])]


def repack(sc: Scenario, packing: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The scenario's caches, on DEVICE, in one vLLM-style buffer [num_blocks, Hkv, bs, 2D]: strided
    [num_blocks, block_size, Hkv, D] views of it, or (vllm-amx) its amx pages [num_blocks, Hkv, block_size, D]."""
    num_blocks, block_size, num_kv_heads, head_size = sc.key_cache.shape
    buffer = torch.randn(num_blocks, num_kv_heads, block_size, 2 * head_size).to(sc.key_cache.dtype).to(DEVICE)
    if packing.startswith("vllm-amx"):
        key_pages, value_pages = amx_pages(buffer)
        amx_pack_(key_pages, value_pages, sc.key_cache.to(DEVICE), sc.value_cache.to(DEVICE))
        return key_pages, value_pages
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
    with amx_tiles_switched_off(packing == "vllm-amx-vectors"):
        out, lse = hogwild_attention(sc.query.to(DEVICE), key, value, sc.block_tables.to(DEVICE),
                                     sc.table.to(DEVICE), rope.to(DEVICE), scale, return_lse=True, impl=IMPL,
                                     packing=OP_PACKING[packing])
    return out.cpu(), lse.cpu()


def check_grid_case(head_size: int, gqa_ratio: int, block_size: int, num_workers: int, case: tuple[str, torch.dtype],
                    packing: str, rng: random.Random, prompt_lengths: tuple[int, int] = (1, 100),
                    prefill_tail: int = 3) -> None:
    """One case of a combined-layout grid: the op on ``packing`` against the fp32 oracle."""
    rope_style, dtype = case
    rope = make_rope("double", rope_style, head_size)
    assert isinstance(rope, TestRope)
    sc = build_scenario(num_workers, block_size, NUM_KV_HEADS * gqa_ratio, dtype, rope, rng, prompt_lengths,
                        prefill_tail)
    scale = head_size**-0.5
    out, lse = run_op(sc, rope, scale, packing)
    assert out.dtype == dtype and out.shape == sc.query.shape and lse.dtype == torch.float32
    assert_matches_oracle(out, lse, sc, rope, scale, packing)


@pytest.mark.parametrize(("head_size", "gqa_ratio", "block_size", "num_workers", "case", "packing"), MAIN_GRID,
                         ids=case_id)
def test_op_matches_dense_oracle(head_size: int, gqa_ratio: int, block_size: int, num_workers: int,
                                 case: tuple[str, torch.dtype], packing: str, rng: random.Random) -> None:
    check_grid_case(head_size, gqa_ratio, block_size, num_workers, case, packing, rng)


# Prompts of 260-700 tokens in 128-token blocks: long segments whose rows see whole aligned runs of keys (the CPU
# op's unmasked softmax path; the main grid's prompts are at most 100 tokens), beside the partial runs at their ends;
# the prompt's last 160 tokens are prefilled as one chunk, so causal rows also end inside whole runs (on AMX tiles
# such a run's weights go to the tiles straight from the softmax, masked rows included).
LONG_GRID = [case for case in itertools.product(HEAD_SIZES, [1, 4], [128], [1, 4], CASES, PACKINGS)
             if packing_applies(case[5], case[4][1], case[2], case[0])]


@pytest.mark.parametrize(("head_size", "gqa_ratio", "block_size", "num_workers", "case", "packing"), LONG_GRID,
                         ids=case_id)
def test_op_matches_dense_oracle_on_long_prompts(head_size: int, gqa_ratio: int, block_size: int, num_workers: int,
                                                 case: tuple[str, torch.dtype], packing: str,
                                                 rng: random.Random) -> None:
    check_grid_case(head_size, gqa_ratio, block_size, num_workers, case, packing, rng, prompt_lengths=(260, 700),
                    prefill_tail=160)


# Value sizes that are not a whole number of the op's two-vector value chunks (16 fp32 lanes with AVX-512, 8 with
# AVX2): 80 and 112 end on a one-vector chunk, 72 is not a whole number of 16-lane vectors (scalar path there);
# amx pages take 96 (a 64-dim chunk, then two single vectors).
OTHER_HEAD_SIZE_GRID = [case for case in itertools.product([72, 80, 96, 112], [16, 128],
                                                           [torch.float32, torch.bfloat16], PACKINGS)
                        if packing_applies(case[3], case[2], case[1], case[0])]


@pytest.mark.parametrize(("head_size", "block_size", "dtype", "packing"), OTHER_HEAD_SIZE_GRID, ids=case_id)
def test_op_matches_dense_oracle_other_head_sizes(head_size: int, block_size: int, dtype: torch.dtype, packing: str,
                                                  rng: random.Random) -> None:
    rope = make_rope("double", "neox", head_size)
    assert isinstance(rope, TestRope)
    sc = build_scenario(3, block_size, NUM_KV_HEADS * 3, dtype, rope, rng)
    scale = head_size**-0.5
    out, lse = run_op(sc, rope, scale, packing)
    assert_matches_oracle(out, lse, sc, rope, scale, packing)


class IdentityRope(TestRope):
    """A rotation by angle 0 for every delta (cos 1, sin 0): queries reach the tiles unchanged."""

    def __init__(self, head_size: int) -> None:
        super().__init__(head_size, head_size, True)
        self.inv_freq = torch.zeros_like(self.inv_freq)
        self.cos_sin_table = torch.cat([torch.ones_like(self.cos_sin_table[:, : head_size // 2]),
                                        torch.zeros_like(self.cos_sin_table[:, : head_size // 2])], dim=-1)

    def to(self, device: torch.device | str) -> IdentityRope:
        return self


# The AMX tile path on bf16 queries that need no rounding: with no rotation and a power-of-two scale the rotated,
# scaled query is the bf16 query times 2**-3, exact in bf16, and bf16 x bf16 products are exact in fp32, so the
# scores (and lse) equal the oracle's to fp32 summation order: what is left is the weights' bf16 rounding in the
# value product (relative 2**-9 of each weight: at most 2**-9 max |v| on the output; 2**-8 with the sums' order).
# Row counts cross 16-row tiles (GQA 5 x up to 16 tokens), segments start and end mid-page and mid-pair; head sizes
# 32-128 keep their query chunks in tiles over a run, 256 loads them again for every key group.
AMX_TILE_GRID = (list(itertools.product(HEAD_SIZES, GQA_RATIOS, [32, 128], [1, 3, 8]))
                 + [(head_size, 4, 128, 3) for head_size in (32, 96, 256)])


@pytest.mark.skipif(not cpu_amx_tiles(), reason="needs a CPU with AMX-BF16 tiles (the vector path is tested above)")
@pytest.mark.parametrize(("head_size", "gqa_ratio", "block_size", "num_workers"), AMX_TILE_GRID, ids=case_id)
def test_amx_tiles_score_exactly_without_rounding(head_size: int, gqa_ratio: int, block_size: int, num_workers: int,
                                                   rng: random.Random) -> None:
    rope = IdentityRope(head_size)
    sc = build_scenario(num_workers, block_size, NUM_KV_HEADS * gqa_ratio, torch.bfloat16, rope, rng)
    out, lse = run_op(sc, rope, 0.125, "vllm-amx")
    want_out, want_lse = oracle(sc, rope, 0.125)
    v_max = float(sc.value_cache.float().abs().max())
    torch.testing.assert_close(lse, want_lse, **LSE_TOLERANCE)
    torch.testing.assert_close(out.float(), want_out, atol=2**-8 * v_max, rtol=2**-7)


# Scores that jump far past a row's running max from one run of keys to the next: every page's keys scaled by its
# own factor (1 to ~20), so along a segment the runs' score ranges rise and fall by tens. A row keeps its max until
# a run passes it by more than the op's slack (8), then rescales its sums: with scores of +-1 (the other tests)
# only a row's first run ever moves it that far. No rotation and a power-of-two scale keep the tiles' scores exact
# (as above), so the tolerances stay those of the bf16 weights and outputs.
# Pages of 256 tokens hold two whole runs each (the tiles' value product of a run waits for the next run).
@pytest.mark.parametrize("block_size", [128, 256])
@pytest.mark.parametrize(("dtype", "packing"), [(dtype, packing) for dtype in AMX_DTYPES for packing in PACKINGS]
                         + [(torch.float32, "contiguous")], ids=case_id)
def test_scores_jumping_past_the_running_max(dtype: torch.dtype, packing: str, block_size: int,
                                             rng: random.Random) -> None:
    rope = IdentityRope(64)
    sc = build_scenario(3, block_size, NUM_KV_HEADS * 4, dtype, rope, rng, prompt_lengths=(600, 900),
                        prefill_tail=160)
    factors = 2.0 ** (4.3 * torch.rand(sc.key_cache.shape[0]))  # [num_blocks]
    sc.key_cache.copy_((sc.key_cache.float() * factors[:, None, None, None]).to(dtype))
    out, lse = run_op(sc, rope, 0.125, packing)
    want_out, want_lse = oracle(sc, rope, 0.125)
    out_tol = ({"atol": 2**-8 * float(sc.value_cache.float().abs().max()), "rtol": 2**-7}
               if on_amx_tiles(dtype, packing) else OUT_TOLERANCES[dtype])
    torch.testing.assert_close(lse, want_lse, **LSE_TOLERANCE)
    torch.testing.assert_close(out.float(), want_out, **out_tol)


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("num_workers", [1, 2, 3, 4, 5, 8])
def test_op_on_several_threads(num_workers: int, threads: int, rng: random.Random) -> None:
    """Work items spread over threads (tokens cut into chunks of sizes that differ by at most one, times the KV
    heads): every token is computed once, whatever the cut."""
    rope = make_rope("double", "neox", 64)
    assert isinstance(rope, TestRope)
    sc = build_scenario(num_workers, 16, NUM_KV_HEADS * 3, torch.bfloat16, rope, rng)
    torch.set_num_threads(threads)  # the module's one_thread fixture puts the count back
    out, lse = run_op(sc, rope, 0.125)
    want_out, want_lse = oracle(sc, rope, 0.125)
    torch.testing.assert_close(out.float(), want_out, **OUT_TOLERANCES[torch.bfloat16])
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


def amx_case(block_size: int, head_size: int, dtype: torch.dtype, rng: random.Random,
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(key_pages, value_pages, key_cache, value_cache): a random 16-bit cache for hand-made tables, token-major
    [num_blocks, block_size, Hkv, D] and packed the amx way [num_blocks, Hkv, block_size, D]."""
    key_cache, value_cache, _ = paged_cache([3 * block_size], block_size, head_size, head_size, rng)
    key_cache, value_cache = key_cache.to(dtype), value_cache.to(dtype)
    buffer = torch.empty(key_cache.shape[0], NUM_KV_HEADS, block_size, 2 * head_size, dtype=dtype)
    key_pages, value_pages = amx_pages(buffer)
    amx_pack_(key_pages, value_pages, key_cache, value_cache)
    return key_pages, value_pages, key_cache, value_cache


# Runs that start and end on either token of an amx pair (values of tokens t, t + 1 share one 32-bit lane), at the
# start, in the middle and at the end of a page, and across a page boundary: (start, length) in one sequence.
ODD_RUNS = [(3, 10), (1, 1), (6, 1), (33, 30), (60, 9), (95, 2), (31, 34)]


@pytest.mark.parametrize("dtype", AMX_DTYPES, ids=case_id)
@pytest.mark.parametrize("packing", PACKINGS)
def test_runs_ending_mid_pair_never_read_unwritten_slots(packing: str, dtype: torch.dtype,
                                                         rng: random.Random) -> None:
    """Every slot outside the segments holds NaN bits (what an unwritten cache slot may hold): the tokens beside a
    run, inside its 32-bit lanes and vectors, must be left out, not weighted by 0. The output is finite and equals
    the oracle."""
    head_size, block_size = 64, 32
    rope = make_rope("double", "gptj", head_size)
    assert isinstance(rope, TestRope)
    num_blocks = 5
    block_tables = torch.randperm(num_blocks)[:4].int()[None]  # [1, 4]: one sequence of 128 tokens, shuffled
    segments = [(0, start, length, 0) for start, length in ODD_RUNS]
    views = [[seg] for seg in segments]
    queries = [[(start + length - 1, length - 1), (start + length // 2, length // 2)] for start, length in ODD_RUNS]
    table = table_from_views(views, queries)
    written = torch.cat([torch.arange(start, start + length) for start, length in ODD_RUNS]).unique()  # [W]
    slots = block_tables[0].long()[written // block_size] * block_size + written % block_size  # [W]
    shape = (num_blocks * block_size, NUM_KV_HEADS, head_size)
    key_cache = torch.full(shape, float("nan"), dtype=dtype)  # [slots, Hkv, D] first, then paged
    value_cache = torch.full(shape, float("nan"), dtype=dtype)
    key_cache[slots] = torch.randn(len(slots), NUM_KV_HEADS, head_size).to(dtype)
    value_cache[slots] = torch.randn(len(slots), NUM_KV_HEADS, head_size).to(dtype)
    paged = (num_blocks, block_size, NUM_KV_HEADS, head_size)
    sc = Scenario(torch.randn(table.num_tokens, NUM_KV_HEADS * 3, head_size).to(dtype), torch.empty(0),
                  key_cache.view(paged), value_cache.view(paged), block_tables, table, [], [], [])
    out, lse = run_op(sc, rope, 0.125, packing)
    assert bool(out.isfinite().all()) and bool(lse.isfinite().all())
    assert_matches_oracle(out, lse, sc, rope, 0.125, packing)


def test_amx_reference_reads_the_pages(rng: random.Random) -> None:
    """impl="reference" with packing="amx" unpacks the pages: the same as the reference on the token-major cache."""
    rope = make_rope("double", "neox", 64)
    key_pages, value_pages, key_cache, value_cache = amx_case(32, 64, torch.bfloat16, rng)
    table = table_from_views([[(0, 5, 40, 0), (0, 70, 9, 40)]], [[(78, 48), (50, 20)]])
    block_tables = torch.randperm(key_cache.shape[0])[:3].int()[None]  # [1, 3]
    query = torch.randn(2, NUM_KV_HEADS * 2, 64).bfloat16()
    got = hogwild_attention(query, key_pages, value_pages, block_tables, table, rope, 0.125, impl="reference",
                            packing="amx")
    want = hogwild_attention_reference(query, key_cache, value_cache, block_tables, table, rope, 0.125)
    assert isinstance(got, torch.Tensor) and isinstance(want, torch.Tensor)
    assert torch.equal(got, want)


def amx_call(key_pages: torch.Tensor, value_pages: torch.Tensor, packing: int = 1, head_size: int = 64,
             dtype: torch.dtype = torch.bfloat16) -> None:
    """The raw op on one query token that reads 4 keys of sequence 0."""
    rope = make_rope("double", "neox", head_size)
    table = table_from_views([[(0, 0, 4, 0)]], [[(3, 3)]])
    query = torch.randn(1, NUM_KV_HEADS, head_size).to(dtype)  # [T, Hq, D]
    load_ops().hogwild_attention(torch.empty(1, NUM_KV_HEADS, value_pages.shape[-1], dtype=dtype), query, key_pages,
                                 value_pages, torch.zeros(1, 1, dtype=torch.int32), table.segments,
                                 table.view_offsets, table.query_view, table.query_pos, rope.cos_sin_table,
                                 rope.rotary_dim, True, 0.125, None, packing)


def pages(num_blocks: int, block_size: int, head_size: int, dtype: torch.dtype = torch.bfloat16,
          ) -> tuple[torch.Tensor, torch.Tensor]:
    return amx_pages(torch.randn(num_blocks, NUM_KV_HEADS, block_size, 2 * head_size).to(dtype))


BAD_AMX_ARGUMENTS = {
    "float32": (lambda: pages(2, 32, 64, torch.float32), 1, 64, torch.float32, "bfloat16 or float16"),
    "block-16": (lambda: pages(2, 16, 64), 1, 64, torch.bfloat16, "multiples of 32"),
    "head-80": (lambda: pages(2, 32, 80), 1, 80, torch.bfloat16, "multiples of 32"),
    # [num_blocks, block_size, Hkv, D] views read as [num_blocks, Hkv, block_size, D]: block_size 2
    "token-major-views": (lambda: cpu_page_views(torch.randn(2, NUM_KV_HEADS, 32, 128).bfloat16()), 1, 64,
                          torch.bfloat16, "multiples of 32"),
    "strided-pages": (lambda: (torch.randn(2, NUM_KV_HEADS, 32, 128).bfloat16()[..., :64],) * 2, 1, 64,
                      torch.bfloat16, "each amx page must be contiguous"),
    "value-size": (lambda: (pages(2, 32, 64)[0], pages(2, 32, 96)[1]), 1, 64, torch.bfloat16, "value size = D"),
    "packing-2": (lambda: pages(2, 32, 64), 2, 64, torch.bfloat16, "packing must be 0"),
}


@pytest.mark.parametrize("name", BAD_AMX_ARGUMENTS)
def test_bad_amx_arguments_are_refused(name: str) -> None:
    make_pages, packing, head_size, dtype, message = BAD_AMX_ARGUMENTS[name]
    key_pages, value_pages = make_pages()
    with pytest.raises(RuntimeError, match=message):
        amx_call(key_pages, value_pages, packing, head_size, dtype)


def test_bad_packing_names_and_triton_amx_are_refused() -> None:
    rope = make_rope("double", "neox", 64)
    table = table_from_views([[(0, 0, 4, 0)]], [[(3, 3)]])
    key_pages, value_pages = pages(2, 32, 64)
    args = (torch.randn(1, NUM_KV_HEADS, 64).bfloat16(), key_pages, value_pages, torch.zeros(1, 1, dtype=torch.int32),
            table, rope, 0.125)
    with pytest.raises(ValueError, match="packing='vec'"):
        hogwild_attention(*args, impl=IMPL, packing="vec")
    with pytest.raises(ValueError, match="Triton kernel reads strided caches only"):
        hogwild_attention(*args, impl="triton", packing="amx")


def test_opcheck_amx_pages(rng: random.Random) -> None:
    rope = make_rope("double", "neox-partial", 64)
    key_pages, value_pages, _, _ = amx_case(32, 64, torch.bfloat16, rng)
    table: SegmentTable = table_from_views([[(0, 3, 50, 0)], [(0, 20, 61, 0)]], [[(52, 49)], [(80, 60), (60, 40)]])
    block_tables = torch.randperm(key_pages.shape[0])[:3].int()[None]  # [1, 3]
    query = torch.randn(3, NUM_KV_HEADS * 3, 64).bfloat16()
    out, lse = torch.empty(3, NUM_KV_HEADS * 3, 64, dtype=torch.bfloat16), torch.empty(3, NUM_KV_HEADS * 3)
    args = (out, query, key_pages, value_pages, block_tables, table.segments, table.view_offsets, table.query_view,
            table.query_pos, rope.cos_sin_table, rope.rotary_dim, rope.is_neox_style, 0.125, lse, 1)
    torch.library.opcheck(load_ops().hogwild_attention.default, args)
