"""Tests of the pure-PyTorch references in hogwild_vllm/ops/reference.py (vLLM kernel-test style).

The main grid builds a Hogwild! batch in the combined layout (prompt, history steps of several workers, the other
workers' current steps, the own step with causal queries) in a paged cache with shuffled block tables, and compares
the segment-wise reference with plain causal attention over each materialized view.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from attention_cases import (
    BLOCK_SIZES,
    DTYPES,
    GQA_RATIOS,
    HEAD_SIZES,
    LSE_TOLERANCES,
    NUM_KV_HEADS,
    NUM_WORKERS,
    OUT_TOLERANCES,
    PADDING_SLOT,
    ROPE_IMPLS,
    ROPE_STYLES,
    STYLE_DTYPE_CASES,
    Scenario,
    allocate_blocks,
    build_scenario,
    make_rope,
    oracle,
    paged_cache,
    table_from_views,
    token_slots,
)

from hogwild_vllm.ops import (
    DeltaRotation,
    SegmentTable,
    dense_view_attention_reference,
    hogwild_attention_reference,
    materialize_views_reference,
    write_kv_reference,
)

pytestmark = pytest.mark.usefixtures("one_thread")




def _attend(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_tables: torch.Tensor,
            table: SegmentTable, rope: DeltaRotation, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """hogwild_attention_reference with return_lse=True -> (out [T, Hq, Dv], lse [T, Hq])."""
    result = hogwild_attention_reference(query, key_cache, value_cache, block_tables, table, rope, scale, True)
    assert isinstance(result, tuple)
    return result


def _run(sc: Scenario, rope: DeltaRotation, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _attend(sc.query, sc.key_cache, sc.value_cache, sc.block_tables, sc.table, rope, scale)


@pytest.mark.parametrize("rope_impl", list(ROPE_IMPLS))
@pytest.mark.parametrize(("rope_style", "dtype"), STYLE_DTYPE_CASES, ids=lambda case: str(case).split(".")[-1])
@pytest.mark.parametrize("num_workers", NUM_WORKERS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("gqa_ratio", GQA_RATIOS)
@pytest.mark.parametrize("head_size", HEAD_SIZES)
def test_attention_matches_denseoracle(head_size: int, gqa_ratio: int, block_size: int, num_workers: int,
                                        dtype: torch.dtype, rope_style: str, rope_impl: str,
                                        rng: random.Random) -> None:
    """The segment-wise reference equals plain causal attention over each materialized view (keys re-rotated)."""
    rope = make_rope(rope_impl, rope_style, head_size)
    sc = build_scenario(num_workers, block_size, NUM_KV_HEADS * gqa_ratio, dtype, rope, rng)
    out, lse = _run(sc, rope, head_size**-0.5)
    expected_out, expected_lse = oracle(sc, rope, head_size**-0.5)
    assert out.dtype == dtype and out.shape == sc.query.shape and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), expected_out, **OUT_TOLERANCES[dtype])
    torch.testing.assert_close(lse, expected_lse, **LSE_TOLERANCES[dtype])


@pytest.mark.parametrize("rope_impl", list(ROPE_IMPLS))
@pytest.mark.parametrize("rope_style", list(ROPE_STYLES))
@pytest.mark.parametrize("num_workers", NUM_WORKERS)
def test_scores_are_the_models_at_view_positions(num_workers: int, rope_style: str, rope_impl: str,
                                                 rng: random.Random) -> None:
    """Independent of the oracle: rotate the raw (pre-RoPE) queries and keys straight to their view positions, as the
    model would for one dense sequence laid out like the view; lse must be torch.logsumexp of those scores."""
    head_size, gqa_ratio, scale = 64, 4, 0.125
    rope = make_rope(rope_impl, rope_style, head_size)
    sc = build_scenario(num_workers, 16, NUM_KV_HEADS * gqa_ratio, torch.float32, rope, rng)
    out, lse = _run(sc, rope, scale)
    for view in range(sc.table.num_views):
        rows = torch.nonzero(sc.table.query_view == view).squeeze(1)  # [Tv]
        segs = sc.table.view_segments(view)
        raw_keys = torch.cat([sc.raw_keys[seq][start : start + n] for seq, start, n, _ in segs])  # [L, Hkv, D]
        values = torch.cat([sc.values[seq][start : start + n] for seq, start, n, _ in segs])  # [L, Hkv, D]
        key_view_pos = torch.cat([torch.arange(view_start, view_start + n) for _, _, n, view_start in segs])  # [L]
        p_q = sc.table.query_pos[rows, 1].long()  # [Tv]
        q = rope.rotate(sc.raw_query[rows], p_q)  # [Tv, Hq, D]
        k = rope.rotate(raw_keys, key_view_pos).repeat_interleave(gqa_ratio, dim=1)  # [L, Hq, D]
        scores = torch.einsum("qhd,khd->qhk", q, k) * scale  # [Tv, Hq, L]
        scores = scores.masked_fill((key_view_pos[None, :] > p_q[:, None])[:, None, :], float("-inf"))
        expected = torch.einsum("qhk,khd->qhd", scores.softmax(-1), values.repeat_interleave(gqa_ratio, dim=1))
        torch.testing.assert_close(lse[rows], torch.logsumexp(scores, dim=-1), **LSE_TOLERANCES[torch.float32])
        torch.testing.assert_close(out[rows], expected, **OUT_TOLERANCES[torch.float32])




@pytest.mark.parametrize("rope_style", list(ROPE_STYLES))
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_segment_is_visible_up_to_the_query_view_position(block_size: int, rope_style: str,
                                                          rng: random.Random) -> None:
    """Segments A (view 0..9), B (10..39, starts mid-block) and C (45..54): queries see exactly the keys at view
    positions <= p_q. Checked against the oracle given only those keys, and by overwriting the invisible ones."""
    head_size, value_size, num_heads, scale = 64, 32, NUM_KV_HEADS * 5, 0.125
    rope = make_rope("double", rope_style, head_size)
    key_cache, value_cache, block_tables = paged_cache([70, 140], block_size, head_size, value_size, rng)
    p_q = torch.tensor([9, 10, 25, 39, 44, 45, 54])  # [Tq]
    n_q = torch.randint(0, 140, p_q.shape)  # [Tq]
    queries = list(zip(n_q.tolist(), p_q.tolist(), strict=True))
    table = table_from_views([[(0, 0, 10, 0), (1, 100, 30, 10), (0, 55, 10, 45)]], [queries])
    query = torch.randn(p_q.shape[0], num_heads, head_size)  # [Tq, Hq, D]
    out, lse = _attend(query, key_cache, value_cache, block_tables, table, rope, scale)
    dense = materialize_views_reference(key_cache, value_cache, block_tables, table)[0]
    for i in range(p_q.shape[0]):
        seen = int((dense.view_pos <= p_q[i]).sum())  # keys are in view order
        expected_out, expected_lse = dense_view_attention_reference(
            query[i : i + 1], n_q[i : i + 1], p_q[i : i + 1], dense.keys[:seen], dense.values[:seen],
            dense.natural_pos[:seen], dense.view_pos[:seen], rope, scale)
        torch.testing.assert_close(out[i : i + 1], expected_out, **OUT_TOLERANCES[torch.float32])
        torch.testing.assert_close(lse[i : i + 1], expected_lse, **LSE_TOLERANCES[torch.float32])
    hidden = torch.cat([token_slots(block_tables, 1, torch.arange(116, 130), block_size),
                        token_slots(block_tables, 0, torch.arange(55, 65), block_size)])  # B past view 25, and C
    key_cache.flatten(0, 1)[hidden] = 100 * torch.randn(hidden.shape[0], NUM_KV_HEADS, head_size)
    value_cache.flatten(0, 1)[hidden] = 100 * torch.randn(hidden.shape[0], NUM_KV_HEADS, value_size)
    again, _ = _attend(query, key_cache, value_cache, block_tables, table, rope, scale)
    assert torch.equal(again[:3], out[:3])  # p_q <= 25
    assert not torch.allclose(again[3:], out[3:])  # the overwritten keys were really read by the others


def test_query_without_visible_key_gets_zeros(rng: random.Random) -> None:
    """View 0 holds tokens 5..12 of sequence 0 at view 10..17; view 1 has no segment, view 2 only empty ones.
    A query at view position 10 sees exactly one key: its output is that key's value (from KV head h // 5), and its
    lse is the score with the query rotated by (p_q - n_q) - (view_start - start)."""
    head_size, value_size, gqa_ratio, scale = 64, 32, 5, 0.125
    rope = make_rope("double", "gptj-partial", head_size)
    key_cache, value_cache, block_tables = paged_cache([40], 16, head_size, value_size, rng)
    queries = [[(30, 0), (30, 9), (30, 10)], [(7, 7)], [(12, 50)]]
    table = table_from_views([[(0, 5, 8, 10)], [], [(0, 3, 0, 0), (0, 20, 0, 4)]], queries)
    query = torch.randn(5, NUM_KV_HEADS * gqa_ratio, head_size)  # [T, Hq, D]
    out, lse = _attend(query, key_cache, value_cache, block_tables, table, rope, scale)
    hidden = torch.tensor([0, 1, 3, 4])
    assert torch.equal(out[hidden], torch.zeros_like(out[hidden]))
    assert bool((lse[hidden] == float("-inf")).all())
    slot = token_slots(block_tables, 0, torch.tensor([5]), 16)  # [1]
    key, value = key_cache.flatten(0, 1)[slot], value_cache.flatten(0, 1)[slot]  # [1, Hkv, D], [1, Hkv, Dv]
    torch.testing.assert_close(out[2], value[0].repeat_interleave(gqa_ratio, dim=0))  # [Hq, Dv]
    q = rope.rotate(query[2:3], torch.tensor([(10 - 30) - (10 - 5)]))  # [1, Hq, D]
    score = (q[0] * key[0].repeat_interleave(gqa_ratio, dim=0)).sum(-1) * scale  # [Hq]
    torch.testing.assert_close(lse[2], score)
    for view in (0, 1, 2):  # the oracle agrees, including on the empty views
        rows = torch.nonzero(table.query_view == view).squeeze(1)
        dense = materialize_views_reference(key_cache, value_cache, block_tables, table)[view]
        n, p = table.query_pos[rows].long().unbind(1)
        expected_out, expected_lse = dense_view_attention_reference(
            query[rows], n, p, dense.keys, dense.values, dense.natural_pos, dense.view_pos, rope, scale)
        torch.testing.assert_close(out[rows], expected_out)
        torch.testing.assert_close(lse[rows], expected_lse)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_write_kv_changes_exactly_the_giventoken_slots(block_size: int, dtype: torch.dtype, rng: random.Random) -> None:
    """Four sequences write their new tokens (the tail of each) into one cache in one shuffled call, with padding
    tokens at slot -1. The cache has one extra last block that no table uses: slot -1 taken as an index lands there."""
    head_size, value_size = 64, 32
    lengths = [rng.randint(1, 3 * block_size) for _ in range(4)]
    block_tables, num_blocks = allocate_blocks(lengths, block_size, spare=2, rng=rng)
    key_cache = torch.randn(num_blocks + 1, block_size, NUM_KV_HEADS, head_size).to(dtype)
    value_cache = torch.randn(num_blocks + 1, block_size, NUM_KV_HEADS, value_size).to(dtype)
    key_before, value_before = key_cache.clone(), value_cache.clone()
    new_tokens = [torch.arange(rng.randint(0, length - 1), length) for length in lengths]
    slots = [token_slots(block_tables, seq, index, block_size) for seq, index in enumerate(new_tokens)]
    slot_mapping = torch.cat([*slots, torch.full((3,), PADDING_SLOT)])[torch.randperm(sum(map(len, slots)) + 3)]
    key = torch.randn(slot_mapping.shape[0], NUM_KV_HEADS, head_size)  # [W, Hkv, D] fp32, cast on write
    value = torch.randn(slot_mapping.shape[0], NUM_KV_HEADS, value_size)  # [W, Hkv, Dv]
    write_kv_reference(key, value, key_cache, value_cache, slot_mapping)
    keep = slot_mapping >= 0  # [W]
    written = torch.zeros(key_cache.shape[0] * block_size, dtype=torch.bool)  # [num_slots]
    written[slot_mapping[keep]] = True
    for cache, before, new in ((key_cache, key_before, key), (value_cache, value_before, value)):
        assert torch.equal(cache.flatten(0, 1)[slot_mapping[keep]], new[keep].to(dtype))
        assert torch.equal(cache.flatten(0, 1)[~written], before.flatten(0, 1)[~written])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_reads_do_not_modify_their_inputs(dtype: torch.dtype, rng: random.Random) -> None:
    rope = make_rope("double", "neox", 64)
    sc = build_scenario(3, 16, NUM_KV_HEADS * 4, dtype, rope, rng)
    table = [sc.table.segments, sc.table.view_offsets, sc.table.query_view, sc.table.query_pos]
    inputs = [sc.query, sc.key_cache, sc.value_cache, sc.block_tables, *table]
    before = [tensor.clone() for tensor in inputs]
    _run(sc, rope, 0.125)
    materialize_views_reference(sc.key_cache, sc.value_cache, sc.block_tables, sc.table)
    for tensor, saved in zip(inputs, before, strict=True):
        assert torch.equal(tensor, saved)


@pytest.mark.parametrize("num_workers", NUM_WORKERS)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
def test_materialized_views_hold_the_written_tokens(block_size: int, num_workers: int, rng: random.Random) -> None:
    rope = make_rope("double", "neox", 64)
    sc = build_scenario(num_workers, block_size, NUM_KV_HEADS, torch.float32, rope, rng)
    views = materialize_views_reference(sc.key_cache, sc.value_cache, sc.block_tables, sc.table)
    assert len(views) == sc.table.num_views
    for view, dense in enumerate(views):
        segs = sc.table.view_segments(view)
        assert torch.equal(dense.keys, torch.cat([sc.keys[seq][start : start + n] for seq, start, n, _ in segs]))
        assert torch.equal(dense.values, torch.cat([sc.values[seq][start : start + n] for seq, start, n, _ in segs]))
        assert dense.natural_pos.tolist() == [start + i for _, start, n, _ in segs for i in range(n)]
        assert dense.view_pos.tolist() == [view_start + i for _, _, n, view_start in segs for i in range(n)]


def _i32(data: list) -> torch.Tensor:
    return torch.tensor(data, dtype=torch.int32)


GOOD_TABLE: dict[str, Any] = {"segments": [[0, 0, 10, 0], [0, 12, 4, 10]], "view_offsets": [0, 2], "query_view": [0],
              "query_pos": [[16, 13]]}
# (change to GOOD_TABLE, error message fragment) the constructor or the reference must refuse
BAD_TABLES: list[tuple[dict[str, Any], str]] = [
    ({"segments": torch.zeros(2, 4, dtype=torch.int64)}, "segments must be an int32"),
    ({"segments": [[0, 0, 10], [0, 12, 4]]}, r"segments must be \[S, 4\]"),
    ({"query_pos": [[16, 13, 0]]}, r"query_pos must be \[T, 2\]"),
    ({"query_view": [0, 0]}, r"query_pos must be \[T, 2\]"),
    ({"view_offsets": [0, 1]}, "view_offsets must rise"),
    ({"view_offsets": [1, 2]}, "view_offsets must rise"),
    ({"query_view": [1]}, "missing view"),
    ({"segments": [[0, 0, 10, 0], [2, 12, 4, 10]]}, "no block table row"),
    ({"segments": [[0, 0, 10, 0], [0, 12, -4, 10]]}, "must be >= 0"),
    ({"segments": [[0, 0, 10, 0], [0, 60, 5, 10]]}, "past its block table"),
    ({"segments": [[0, 0, 10, 0], [0, 12, 4, 9]]}, "no overlap"),
    ({"segments": [[0, 12, 4, 10], [0, 0, 10, 0]]}, "no overlap"),
]


@pytest.mark.parametrize(("change", "message"), BAD_TABLES, ids=lambda x: x if isinstance(x, str) else None)
def test_bad_tables_are_refused(change: dict[str, Any], message: str) -> None:
    fields = {name: value if isinstance(value, torch.Tensor) else _i32(value)
              for name, value in {**GOOD_TABLE, **change}.items()}
    key_cache = torch.randn(4, 16, NUM_KV_HEADS, 64)  # one table row of 4 blocks: tokens 0..63
    rope = make_rope("double", "neox", 64)
    with pytest.raises(ValueError, match=message):
        table = SegmentTable(**fields)
        hogwild_attention_reference(torch.randn(1, NUM_KV_HEADS, 64), key_cache, key_cache, _i32([[3, 1, 0, 2]]),
                                    table, rope, 0.125)


def test_good_table_is_accepted_and_lse_is_optional() -> None:
    table = SegmentTable(**{name: _i32(value) for name, value in GOOD_TABLE.items()})
    key_cache, query = torch.randn(4, 16, NUM_KV_HEADS, 64), torch.randn(1, NUM_KV_HEADS, 64)
    rope = make_rope("double", "neox", 64)
    out = hogwild_attention_reference(query, key_cache, key_cache, _i32([[3, 1, 0, 2]]), table, rope, 0.125)
    out_with_lse, lse = _attend(query, key_cache, key_cache, _i32([[3, 1, 0, 2]]), table, rope, 0.125)
    assert isinstance(out, torch.Tensor) and torch.equal(out, out_with_lse) and bool(lse.isfinite().all())


@pytest.mark.parametrize(("slots", "message"), [([3, 3], "twice"), ([0, 64], "past the cache")])
def test_write_kv_refuses_badtoken_slots(slots: list[int], message: str) -> None:
    cache = torch.zeros(4, 16, NUM_KV_HEADS, 8)
    with pytest.raises(ValueError, match=message):
        write_kv_reference(torch.ones(2, NUM_KV_HEADS, 8), torch.ones(2, NUM_KV_HEADS, 8), cache, cache.clone(),
                           torch.tensor(slots))


@pytest.mark.parametrize("rope_impl", list(ROPE_IMPLS))
@pytest.mark.parametrize("rope_style", list(ROPE_STYLES))
def test_rope_is_a_relative_rotation(rope_style: str, rope_impl: str) -> None:
    """What the references rely on: rotations compose additively, scores depend on the relative delta only, the
    pass-through dims are copied, and the pairing is neox halves or gptj neighbours (first frequency is 1 rad)."""
    head_size = 64
    rope = make_rope(rope_impl, rope_style, head_size)
    torch.manual_seed(0)
    x, y = torch.randn(2, 6, 3, head_size).unbind(0)  # [T, H, D] each
    a, b = torch.tensor([0, 1, -7, 300, 2, -1000]), torch.tensor([5, -1, 7, -299, 0, 999])  # [T]
    torch.testing.assert_close(rope.rotate(rope.rotate(x, a), b), rope.rotate(x, a + b), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rope.rotate(rope.rotate(x, a), -a), x, atol=1e-4, rtol=1e-4)
    dot = (rope.rotate(x, a) * rope.rotate(y, b)).sum(-1)  # [T, H]
    shifted = (rope.rotate(x, a + 13) * rope.rotate(y, b + 13)).sum(-1)  # [T, H]
    torch.testing.assert_close(dot, shifted, atol=1e-4, rtol=1e-4)
    assert torch.equal(rope.rotate(x, a)[..., rope.rotary_dim :], x[..., rope.rotary_dim :])
    unit = torch.zeros(1, 1, head_size)
    unit[0, 0, 0] = 1.0
    partner = rope.rotary_dim // 2 if rope.is_neox_style else 1
    turned = rope.rotate(unit, torch.tensor([1]))[0, 0]  # [D]
    expected = torch.zeros(head_size)
    expected[0], expected[partner] = torch.cos(torch.tensor(1.0)), torch.sin(torch.tensor(1.0))
    torch.testing.assert_close(turned, expected)
    assert rope.rotate(x.to(torch.bfloat16), a).dtype == torch.bfloat16


@pytest.mark.parametrize("rope_impl", [impl for impl in ROPE_IMPLS if impl != "double"])
@pytest.mark.parametrize("rope_style", list(ROPE_STYLES))
def test_test_rope_matches_the_real_one(rope_style: str, rope_impl: str) -> None:
    """The test double rotates like hogwild_vllm.rope.DeltaRope (when vLLM is importable). vLLM builds its cos/sin
    table in fp32, so its angles are off by up to about |delta| * 2**-24 rad against the fp64 double."""
    torch.manual_seed(0)
    x, delta = torch.randn(8, 3, 128), torch.tensor([0, 1, -1, 17, -250, 1000, -3000, 4095])
    real, double = make_rope(rope_impl, rope_style, 128), make_rope("double", rope_style, 128)
    torch.testing.assert_close(real.rotate(x, delta), double.rotate(x, delta), atol=1e-3, rtol=1e-3)
