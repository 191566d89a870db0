"""The Triton kernel (hogwild_vllm/ops/triton_attention.py) against the dense oracle, on CPU and (when present) CUDA.

CPU tensors run the kernels in Triton's interpreter inside this pytest process, without TRITON_INTERPRET:
``ops/_triton_kernels.py`` wraps them in ``InterpretedFunction`` itself and uses no ``triton.language`` helper that
triton decorates at import (``tl.sum`` / ``tl.max`` / ``tl.zeros`` are ``@jit`` functions, interpreted only when
TRITON_INTERPRET=1 was set before ``import triton``; the kernels call ``tl.reduce`` with triton's own combine
functions, which the interpreter recognises). So nothing leaks into other tests or child processes. The "cuda"
cases run the compiled kernels; they are skipped without a GPU and when TRITON_INTERPRET is set.

The interpreter costs about 1-3 s per call on one core, so the grid is reduced but covering (MAIN_CASES): head sizes
64 / 128, GQA ratios 1 / 3 / 4 / 5, block sizes 16 / 32 / 128, 1-8 workers, every RoPE style, fp32 / bf16, 1-4
splits; each scenario has segments starting and ending mid-block, empty segments, shuffled block tables and a
non-contiguous query. Beside it: exact visibility, queries with no visible key, vLLM's CPU page layout (dim-major
K pages) as a strided view, a transposed query, lse on / off, splits and tile sizes, fp16 with head size 80 (padded)
and Dv != D, inputs left unmodified, the dispatcher, and importing without triton. About 2 minutes on 2 cores.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from attention_cases import (
    NUM_KV_HEADS,
    OUT_TOLERANCES,
    ROPE_STYLES,
    Scenario,
    Tolerance,
    build_scenario,
    oracle,
    paged_cache,
    table_from_views,
    token_slots,
)
from attention_cases import TestRope as RopeDouble  # under its own name pytest would try to collect it

from hogwild_vllm.ops import (
    SegmentTable,
    dense_view_attention_reference,
    hogwild_attention,
    materialize_views_reference,
)
from hogwild_vllm.ops.triton_attention import has_triton, hogwild_attention_triton

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not has_triton(), reason="triton is not importable")]

ROOT = Path(__file__).resolve().parents[1]
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.cuda, pytest.mark.skipif(INTERPRETING, reason="TRITON_INTERPRET is set: would not compile")])]
# Kernel output against the fp32 oracle: out as for the reference (fp32 rounding; one bf16 rounding of the result);
# lse of 16-bit caches: scores from a query split into two 16-bit parts keep ~16 mantissa bits (seen: 1.3e-5).
TRITON_OUT_TOLERANCES: dict[torch.dtype, Tolerance] = {**OUT_TOLERANCES, torch.float16: {"atol": 1e-4, "rtol": 2e-3}}
TRITON_LSE_TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.bfloat16: {"atol": 1e-4, "rtol": 1e-5},
    torch.float16: {"atol": 1e-4, "rtol": 1e-5},
}
# (head_size, gqa_ratio, block_size, num_workers, rope_style, dtype, num_splits); None = the default choice
MAIN_CASES = [
    (64, 1, 16, 1, "neox", torch.float32, 1),
    (128, 3, 32, 2, "gptj", torch.bfloat16, 2),
    (64, 4, 128, 3, "neox-partial", torch.bfloat16, 3),
    (128, 5, 16, 4, "gptj-partial", torch.float32, 4),
    (128, 4, 16, 8, "neox", torch.bfloat16, None),
    (64, 5, 32, 6, "gptj", torch.float32, 1),
    (128, 1, 128, 5, "neox-partial", torch.float32, 2),
    (64, 3, 16, 7, "gptj-partial", torch.bfloat16, 3),
    (64, 4, 32, 3, "gptj-partial", torch.float32, 2),
    (128, 3, 128, 1, "gptj", torch.float32, None),
    (64, 1, 32, 4, "neox", torch.bfloat16, 4),
    (128, 5, 128, 2, "neox-partial", torch.bfloat16, 1),
]


def _case_id(case: tuple) -> str:
    head, gqa, block, workers, style, dtype, splits = case
    return f"h{head}-gqa{gqa}-bs{block}-n{workers}-{style}-{str(dtype)[6:]}-s{splits}"




def _rope(style: str, head_size: int) -> RopeDouble:
    is_neox_style, fraction = ROPE_STYLES[style]
    return RopeDouble(head_size, int(head_size * fraction), is_neox_style)


def _table_to(table: SegmentTable, device: str) -> SegmentTable:
    return SegmentTable(table.segments.to(device), table.view_offsets.to(device), table.query_view.to(device),
                        table.query_pos.to(device))


def _strided_to(tensor: torch.Tensor, device: str) -> torch.Tensor:
    """tensor on device with the same strides and offset (its whole storage is copied): .to() would make a view
    with gaps, such as vLLM's CPU page layout or a sliced query, contiguous."""
    if tensor.device.type == device:
        return tensor
    storage = tensor.new_empty(0).set_(tensor.untyped_storage()).to(device)  # [storage elements]
    return storage.as_strided(tensor.shape, tensor.stride(), tensor.storage_offset())


def _attend(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, block_tables: torch.Tensor,
            table: SegmentTable, rope: RopeDouble, scale: float, device: str, with_lse: bool = True,
            **options: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The kernel on ``device`` (inputs moved there, strides kept) -> (out [T, Hq, Dv], lse [T, Hq] or None), on CPU."""
    moved = [_strided_to(t, device) for t in (query, key_cache, value_cache, block_tables)]
    out = query.new_empty(*query.shape[:2], value_cache.shape[3], device=device)  # [T, Hq, Dv]
    lse = torch.empty(query.shape[:2], device=device) if with_lse else None  # [T, Hq]
    hogwild_attention_triton(*moved, _table_to(table, device), rope.to(device), scale, out, lse, **options)
    return out.cpu(), (lse.cpu() if lse is not None else None)


def _run(sc: Scenario, rope: RopeDouble, scale: float, device: str,
         **options: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _attend(sc.query, sc.key_cache, sc.value_cache, sc.block_tables, sc.table, rope, scale, device,
                       **options)
    assert lse is not None
    return out, lse


def _assert_matches_oracle(out: torch.Tensor, lse: torch.Tensor, sc: Scenario, rope: RopeDouble, scale: float) -> None:
    expected_out, expected_lse = oracle(sc, rope, scale)
    dtype = sc.query.dtype
    assert out.dtype == dtype and out.shape == expected_out.shape and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), expected_out, **TRITON_OUT_TOLERANCES[dtype])
    torch.testing.assert_close(lse, expected_lse, **TRITON_LSE_TOLERANCES[dtype])


def _assert_same(a: torch.Tensor, b: torch.Tensor, device: str) -> None:
    """Same kernel arithmetic on the same values: bitwise on the interpreter, to fp32 rounding when compiled."""
    if device == "cpu":
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def _main_scenario(case: tuple) -> tuple[Scenario, RopeDouble]:
    """The batch of one MAIN_CASES entry, seeded by the case (the same on every device)."""
    head_size, gqa_ratio, block_size, num_workers, style, dtype, _ = case
    seed = zlib.crc32(_case_id(case).encode())
    torch.manual_seed(seed)
    rope = _rope(style, head_size)
    return build_scenario(num_workers, block_size, NUM_KV_HEADS * gqa_ratio, dtype, rope, random.Random(seed)), rope


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", MAIN_CASES, ids=_case_id)
def test_attention_matches_dense_oracle(case: tuple, device: str) -> None:
    sc, rope = _main_scenario(case)
    head_size, splits = case[0], case[-1]
    out, lse = _run(sc, rope, head_size**-0.5, device, num_splits=splits)
    _assert_matches_oracle(out, lse, sc, rope, head_size**-0.5)


def test_main_grid_has_negative_deltas_and_mid_block_segments() -> None:
    """What the MAIN_CASES batches cover (host-side, no kernel): a query rotated by a negative delta for a segment
    it sees, visible segments starting and ending inside a block, and empty segments."""
    negative = mid_start = mid_end = empty = False
    for case in MAIN_CASES:
        sc, _ = _main_scenario(case)
        block_size = case[2]
        empty |= bool((sc.table.segments[:, 2] == 0).any())
        for view, (n_q, p_q) in zip(sc.table.query_view.tolist(), sc.table.query_pos.tolist(), strict=True):
            for _, start, length, view_start in sc.table.view_segments(view):
                if length and view_start <= p_q:
                    negative |= (p_q - n_q) - (view_start - start) < 0
                    mid_start |= start % block_size != 0
                    mid_end |= (start + length) % block_size != 0
    assert negative and mid_start and mid_end and empty




@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("block_size", "splits"), [(16, 3), (32, 1)])
def test_keys_are_visible_exactly_up_to_the_query_view_position(block_size: int, splits: int, device: str,
                                                                rng: random.Random) -> None:
    """Segments A (view 0..9), B (10..39, starts mid-block) and C (45..54), Dv = 32 != D: each query matches the
    oracle given only the keys at view positions <= p_q, and overwriting the invisible keys changes nothing."""
    head_size, value_size, num_heads, scale = 64, 32, NUM_KV_HEADS * 5, 0.125
    rope = _rope("gptj", head_size)
    key_cache, value_cache, block_tables = paged_cache([70, 140], block_size, head_size, value_size, rng)
    p_q = torch.tensor([9, 10, 25, 39, 44, 45, 54])  # [Tq]
    n_q = torch.randint(0, 140, p_q.shape)  # [Tq]
    queries = list(zip(n_q.tolist(), p_q.tolist(), strict=True))
    table = table_from_views([[(0, 0, 10, 0), (1, 100, 30, 10), (0, 55, 10, 45)]], [queries])
    query = torch.randn(p_q.shape[0], num_heads, head_size)  # [Tq, Hq, D]
    out, lse = _attend(query, key_cache, value_cache, block_tables, table, rope, scale, device, num_splits=splits)
    assert lse is not None
    dense = materialize_views_reference(key_cache, value_cache, block_tables, table)[0]
    for i in range(p_q.shape[0]):
        seen = int((dense.view_pos <= p_q[i]).sum())  # keys are in view order
        expected_out, expected_lse = dense_view_attention_reference(
            query[i : i + 1], n_q[i : i + 1], p_q[i : i + 1], dense.keys[:seen], dense.values[:seen],
            dense.natural_pos[:seen], dense.view_pos[:seen], rope, scale)
        torch.testing.assert_close(out[i : i + 1], expected_out, **TRITON_OUT_TOLERANCES[torch.float32])
        torch.testing.assert_close(lse[i : i + 1], expected_lse, **TRITON_LSE_TOLERANCES[torch.float32])
    hidden = torch.cat([token_slots(block_tables, 1, torch.arange(116, 130), block_size),
                        token_slots(block_tables, 0, torch.arange(55, 65), block_size)])  # B past view 25, and C
    key_cache.flatten(0, 1)[hidden] = 100 * torch.randn(hidden.shape[0], NUM_KV_HEADS, head_size)
    value_cache.flatten(0, 1)[hidden] = 100 * torch.randn(hidden.shape[0], NUM_KV_HEADS, value_size)
    again, _ = _attend(query, key_cache, value_cache, block_tables, table, rope, scale, device, num_splits=splits)
    assert torch.equal(again[:3], out[:3])  # p_q <= 25
    assert not torch.allclose(again[3:], out[3:])  # the overwritten keys were really read by the others


@pytest.mark.parametrize("device", DEVICES)
def test_query_without_visible_key_gets_zeros(device: str, rng: random.Random) -> None:
    """View 0 holds tokens 5..12 of sequence 0 at view 10..17; view 1 has no segment, view 2 only empty ones. A query
    at view position 10 sees one key: its output is that key's value, its lse the score of the rotated query."""
    head_size, value_size, gqa_ratio, scale = 64, 32, 5, 0.125
    rope = _rope("gptj-partial", head_size)
    key_cache, value_cache, block_tables = paged_cache([40], 16, head_size, value_size, rng)
    queries = [[(30, 0), (30, 9), (30, 10)], [(7, 7)], [(12, 50)]]
    table = table_from_views([[(0, 5, 8, 10)], [], [(0, 3, 0, 0), (0, 20, 0, 4)]], queries)
    query = torch.randn(5, NUM_KV_HEADS * gqa_ratio, head_size)  # [T, Hq, D]
    out, lse = _attend(query, key_cache, value_cache, block_tables, table, rope, scale, device, num_splits=3)
    assert lse is not None
    hidden = torch.tensor([0, 1, 3, 4])
    assert torch.equal(out[hidden], torch.zeros_like(out[hidden]))
    assert bool((lse[hidden] == float("-inf")).all())
    slot = token_slots(block_tables, 0, torch.tensor([5]), 16)  # [1]
    key, value = key_cache.flatten(0, 1)[slot], value_cache.flatten(0, 1)[slot]  # [1, Hkv, D], [1, Hkv, Dv]
    torch.testing.assert_close(out[2], value[0].repeat_interleave(gqa_ratio, dim=0))  # [Hq, Dv]
    q = rope.rotate(query[2:3], torch.tensor([(10 - 30) - (10 - 5)]))  # [1, Hq, D]
    score = (q[0] * key[0].repeat_interleave(gqa_ratio, dim=0)).sum(-1) * scale  # [Hq]
    torch.testing.assert_close(lse[2], score)


def _cpu_page_layout(cache_shape: torch.Size, key_cache: torch.Tensor,
                     value_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Copies of the caches in vLLM's CPU page layout: per (block, KV head) one K page stored dim-major (element
    (token j, dim d) at d * block_size + j) followed by one V page stored row-major; returned as strided
    [num_blocks, block_size, Hkv, D] views of that one buffer."""
    num_blocks, block_size, num_kv_heads, head_size = cache_shape
    page = block_size * head_size
    buffer = torch.full((num_blocks, num_kv_heads, 2 * page), float("nan"), dtype=key_cache.dtype)
    keys = buffer[..., :page].view(num_blocks, num_kv_heads, head_size, block_size).permute(0, 3, 1, 2)
    values = buffer[..., page:].view(num_blocks, num_kv_heads, block_size, head_size).permute(0, 2, 1, 3)
    assert keys.stride() == (num_kv_heads * 2 * page, 1, 2 * page, block_size)
    keys.copy_(key_cache)
    values.copy_(value_cache)
    return keys, values


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpu_page_layout_and_transposed_query(dtype: torch.dtype, device: str, rng: random.Random) -> None:
    """The same batch read from vLLM's CPU page layout (dim-major K) with a head-major query gives the same result
    as from contiguous caches."""
    rope = _rope("neox", 64)
    sc = build_scenario(3, 16, NUM_KV_HEADS * 4, dtype, rope, rng)
    out, lse = _run(sc, rope, 0.125, device, num_splits=2)
    _assert_matches_oracle(out, lse, sc, rope, 0.125)
    keys, values = _cpu_page_layout(sc.key_cache.shape, sc.key_cache, sc.value_cache)
    query = sc.query.transpose(0, 1).contiguous().transpose(0, 1)  # [T, Hq, D], strides (D, T * D, 1)
    paged_out, paged_lse = _attend(query, keys, values, sc.block_tables, sc.table, rope, 0.125, device, num_splits=2)
    assert paged_lse is not None
    _assert_same(paged_out, out, device)
    _assert_same(paged_lse, lse, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("splits", [1, 3])
def test_lse_is_optional(splits: int, device: str, rng: random.Random) -> None:
    rope = _rope("gptj", 64)
    sc = build_scenario(2, 32, NUM_KV_HEADS * 3, torch.bfloat16, rope, rng)
    out, lse = _run(sc, rope, 0.125, device, num_splits=splits)
    alone, none = _attend(sc.query, sc.key_cache, sc.value_cache, sc.block_tables, sc.table, rope, 0.125, device,
                          with_lse=False, num_splits=splits)
    assert none is None
    _assert_same(alone, out, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("splits", "block_n"), [(1, 16), (2, 32), (5, 64), (1, 128)])
def test_splits_and_tile_sizes(splits: int, block_n: int, device: str) -> None:
    """One batch (block size 32) under every split count and tile size: tiles shorter than, equal to and spanning
    several blocks, splits that end mid-segment or get no key."""
    rope = _rope("neox-partial", 64)
    torch.manual_seed(7)
    sc = build_scenario(4, 32, NUM_KV_HEADS * 4, torch.float32, rope, random.Random(7))
    out, lse = _run(sc, rope, 0.125, device, num_splits=splits, block_n=block_n)
    _assert_matches_oracle(out, lse, sc, rope, 0.125)


@pytest.mark.parametrize("device", DEVICES)
def test_fp16_with_padded_head_size(device: str, rng: random.Random) -> None:
    """fp16 caches, head size 80 (padded to 128 inside the kernel), partial rotary 64, GQA 2."""
    rope = RopeDouble(80, 64, True)
    sc = build_scenario(2, 16, NUM_KV_HEADS * 2, torch.float16, rope, rng)
    out, lse = _run(sc, rope, 80**-0.5, device, num_splits=2)
    _assert_matches_oracle(out, lse, sc, rope, 80**-0.5)


@pytest.mark.parametrize("device", DEVICES)
def test_inputs_are_not_modified_and_the_dispatcher_runs_it(device: str, rng: random.Random) -> None:
    rope = _rope("neox", 64)
    sc = build_scenario(3, 16, NUM_KV_HEADS * 4, torch.bfloat16, rope, rng)
    table = _table_to(sc.table, device)
    inputs = [_strided_to(t, device) for t in (sc.query, sc.key_cache, sc.value_cache, sc.block_tables)]
    fields = [table.segments, table.view_offsets, table.query_view, table.query_pos]
    moved_rope = rope.to(device)
    before = [t.clone() for t in [*inputs, *fields, moved_rope.cos_sin_table]]
    environ = dict(os.environ)
    result = hogwild_attention(*inputs, table, moved_rope, 0.125, return_lse=True, impl="triton")
    assert isinstance(result, tuple)
    for tensor, saved in zip([*inputs, *fields, moved_rope.cos_sin_table], before, strict=True):
        assert torch.equal(tensor, saved)
    assert dict(os.environ) == environ, "running the kernel changed the environment"
    _assert_matches_oracle(result[0].cpu(), result[1].cpu(), sc, rope, 0.125)


def test_imports_without_triton() -> None:
    """With triton unimportable, the module imports and has_triton() is False (run in a child process)."""
    code = (
        "import sys\n"
        "sys.modules['triton'] = None\n"
        "from hogwild_vllm.ops.triton_attention import has_triton\n"
        "import hogwild_vllm.ops\n"
        "assert not has_triton()\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
