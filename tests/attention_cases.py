"""Shared attention test cases: a Hogwild! batch in a paged cache, a test double of the delta RoPE, the dense oracle.

Used by the reference tests, the compiled-op tests, the Triton tests and the GPU check. Pure torch (no vLLM), so
it runs on a machine that has only torch.

The main case builds a batch in the combined layout (prompt, history steps of several workers, the other workers'
current steps, the own step with causal queries) in a garbage-filled paged cache with shuffled block tables.
"""

from __future__ import annotations

import importlib.util
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypedDict

import torch

from hogwild_vllm.ops import (
    DeltaRotation,
    SegmentTable,
    dense_view_attention_reference,
    materialize_views_reference,
    write_kv_reference,
)

HEAD_SIZES = [64, 128]
GQA_RATIOS = [1, 4, 5]  # query heads per KV head
NUM_KV_HEADS = 2
BLOCK_SIZES = [16, 32, 128]
NUM_WORKERS = [1, 2, 3, 4]
DTYPES = [torch.float32, torch.bfloat16]
# style -> (is_neox_style, rotary_dim / head_size)
ROPE_STYLES = {"neox": (True, 1.0), "gptj": (False, 1.0), "neox-partial": (True, 0.5), "gptj-partial": (False, 0.25)}
# The main grid pairs styles with dtypes instead of crossing them (half the runtime): every style and every dtype
# appears, and the rotation is fp32 math on upcast inputs whatever the dtype.
STYLE_DTYPE_CASES = [("neox", torch.float32), ("gptj", torch.bfloat16), ("neox-partial", torch.bfloat16),
                     ("gptj-partial", torch.float32)]
ROPE_BASE = 10000.0
MAX_POSITION = 4096


class Tolerance(TypedDict):
    atol: float
    rtol: float


# Reference output (in the input dtype) against the fp32 oracle: fp32 rounding (seen: 2e-6), and for bf16 one rounding
# of the result (relative 2**-8 at most). lse is fp32 math on the same inputs in both (seen: 2e-6).
OUT_TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.bfloat16: {"atol": 1e-5, "rtol": 2**-7},
}
LSE_TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float32: {"atol": 1e-5, "rtol": 1e-5},
    torch.bfloat16: {"atol": 1e-5, "rtol": 1e-5},
}
GLUE = {"others_header": 4, "unfinished": 2, "own_header": 3}  # glue strings, in glue-sequence order
PADDING_SLOT = -1


class TestRope:
    __test__ = False  # a test double, not a test class
    """Test double of hogwild_vllm.rope.DeltaRope: plain RoPE (base 10000) computed from scratch in fp64."""

    def __init__(self, head_size: int, rotary_dim: int, is_neox_style: bool) -> None:
        self.head_size, self.rotary_dim, self.is_neox_style = head_size, rotary_dim, is_neox_style
        self.inv_freq = ROPE_BASE ** -(torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)  # [R/2]
        angle = torch.arange(MAX_POSITION, dtype=torch.float64)[:, None] * self.inv_freq  # [P, R/2]
        self.cos_sin_table = torch.cat([angle.cos(), angle.sin()], dim=-1).float()  # [P, R]: what the kernels read

    def to(self, device: torch.device | str) -> TestRope:
        """The same rotation with its table on ``device`` (the kernels read the table where the query is)."""
        moved = TestRope(self.head_size, self.rotary_dim, self.is_neox_style)
        moved.cos_sin_table = self.cos_sin_table.to(device)
        return moved

    def rotate(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        angle = delta.double()[:, None] * self.inv_freq  # [T, R/2]
        cos, sin = angle.cos().float()[:, None, :], angle.sin().float()[:, None, :]  # [T, 1, R/2]
        out = x.float().clone()  # [T, H, D]
        rot = out[..., : self.rotary_dim]  # [T, H, R]
        x1, x2 = rot.chunk(2, dim=-1) if self.is_neox_style else (rot[..., 0::2], rot[..., 1::2])  # [T, H, R/2]
        y1, y2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin  # [T, H, R/2] each
        pairs = torch.cat((y1, y2), -1) if self.is_neox_style else torch.stack((y1, y2), -1).flatten(-2)
        out[..., : self.rotary_dim] = pairs  # [T, H, R]
        return out.to(x.dtype)


def _vllm_rope(head_size: int, rotary_dim: int, is_neox_style: bool) -> DeltaRotation:
    from hogwild_vllm.rope import DeltaRope, RopeSpec

    spec = RopeSpec(head_size=head_size, rotary_dim=rotary_dim, max_position=MAX_POSITION, base=ROPE_BASE,
                    is_neox_style=is_neox_style)
    return DeltaRope(spec)


ROPE_IMPLS: dict[str, Callable[[int, int, bool], DeltaRotation]] = {"double": TestRope}
if importlib.util.find_spec("vllm") and importlib.util.find_spec("hogwild_vllm.rope"):
    ROPE_IMPLS["vllm"] = _vllm_rope


def make_rope(impl: str, style: str, head_size: int) -> DeltaRotation:
    is_neox_style, fraction = ROPE_STYLES[style]
    return ROPE_IMPLS[impl](head_size, int(head_size * fraction), is_neox_style)


def allocate_blocks(lengths: list[int], block_size: int, spare: int,
                     rng: random.Random) -> tuple[torch.Tensor, int]:
    """(block tables [num_seqs, max_blocks + 1] int32, num_blocks): a randperm'd pool, sequences' blocks interleaved,
    `spare` blocks unused. Unused entries hold an out-of-range block id, so reading past a sequence raises."""
    needed = [-(-length // block_size) for length in lengths]
    num_blocks = sum(needed) + spare
    pool = torch.randperm(num_blocks).tolist()
    owners = [seq for seq, count in enumerate(needed) for _ in range(count)]
    rng.shuffle(owners)
    tables = torch.full((len(lengths), max(needed) + 1), num_blocks + 1000, dtype=torch.int32)
    filled = [0] * len(lengths)
    for seq in owners:
        tables[seq, filled[seq]] = pool.pop()
        filled[seq] += 1
    return tables, num_blocks


def token_slots(block_tables: torch.Tensor, seq: int, index: torch.Tensor, block_size: int) -> torch.Tensor:
    """Cache slots [n] int64 of the tokens index [n] of one sequence."""
    return block_tables[seq].long()[index // block_size] * block_size + index % block_size


@dataclass
class Layout:
    lengths: list[int]  # per sequence
    first_written: list[int]  # per sequence: tokens before this index are never written (garbage in the cache)
    views: list[list[tuple[int, int, int]]]  # per view: (seq, start, length) in view order
    queries: list[list[tuple[int, int]]]  # per view: (natural, view) position of each query token


def combined_layout(num_workers: int, rng: random.Random, prompt_lengths: tuple[int, int] = (1, 100),
                    prefill_tail: int = 3) -> Layout:
    """Sequence 0 is the prompt (a length drawn from ``prompt_lengths``), 1..N the worker logs (prompt, then own
    tokens), N + 1 the glue strings. View w - 1 is worker w's: C . history . header . (peer step . marker)* .
    header . own step (causal queries). View N prefills the prompt's last ``prefill_tail`` tokens (causal). One or
    two empty segments are dropped at random places in every view."""
    prompt, workers, glue = rng.randint(*prompt_lengths), range(1, num_workers + 1), num_workers + 1
    glue_start = dict(zip(GLUE, [prompt + sum(list(GLUE.values())[:i]) for i in range(len(GLUE))], strict=True))
    glue_seg = {name: (glue, glue_start[name], GLUE[name]) for name in GLUE}
    steps = {w: [rng.randint(1, 24) for _ in range(rng.randint(0, 2))] for w in workers}
    step_starts = {w: [prompt + sum(steps[w][:i]) for i in range(len(steps[w]) + 1)] for w in workers}
    num_queries = {w: rng.randint(1, 4) for w in workers}
    current = {w: rng.randint(num_queries[w], num_queries[w] + 12) for w in workers}  # uncommitted step length
    commit_order = [w for w in workers for _ in steps[w]]
    rng.shuffle(commit_order)
    committed = {w: 0 for w in workers}
    history = []
    for w in commit_order:
        history.append((w, step_starts[w][committed[w]], steps[w][committed[w]]))
        committed[w] += 1
    lengths = [prompt] + [step_starts[w][-1] + current[w] for w in workers] + [prompt + sum(GLUE.values())]
    views, queries = [], []
    for w in workers:
        view = [(0, 0, prompt), *history, glue_seg["others_header"]]
        for peer in workers:
            if peer != w:
                view += [(peer, step_starts[peer][-1], current[peer]), glue_seg["unfinished"]]
        view += [glue_seg["own_header"], (w, step_starts[w][-1], current[w])]
        own_view_start = sum(length for _, _, length in view[:-1])
        queries.append([(step_starts[w][-1] + j, own_view_start + j)
                        for j in range(current[w] - num_queries[w], current[w])])
        views.append(view)
    views.append([(0, 0, prompt)])
    queries.append([(i, i) for i in range(max(0, prompt - prefill_tail), prompt)])
    for view in views:
        for _ in range(rng.randint(1, 2)):
            seq = rng.randrange(len(lengths))
            view.insert(rng.randint(0, len(view)), (seq, rng.randint(0, lengths[seq]), 0))
    return Layout(lengths, [0] + [prompt] * (num_workers + 1), views, queries)


@dataclass
class Scenario:
    query: torch.Tensor  # [T, Hq, D] input dtype, rotated at natural positions, non-contiguous
    raw_query: torch.Tensor  # [T, Hq, D] fp32, before rotation
    key_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    value_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    table: SegmentTable
    raw_keys: list[torch.Tensor]  # per sequence [L_s, Hkv, D] fp32, before rotation
    keys: list[torch.Tensor]  # per sequence [L_s, Hkv, D] as stored (rotated at natural positions)
    values: list[torch.Tensor]  # per sequence [L_s, Hkv, D] as stored


def make_scenario(layout: Layout, rope: DeltaRotation, block_size: int, num_heads: int, dtype: torch.dtype,
                   rng: random.Random) -> Scenario:
    """Write every sequence (in one shuffled write with padding tokens) into a garbage-filled paged cache."""
    head_size = rope.head_size
    block_tables, num_blocks = allocate_blocks(layout.lengths, block_size, spare=rng.randint(1, 3), rng=rng)
    cache_shape = (num_blocks, block_size, NUM_KV_HEADS, head_size)
    key_cache, value_cache = torch.randn(cache_shape).to(dtype), torch.randn(cache_shape).to(dtype)
    raw_keys = [torch.randn(length, NUM_KV_HEADS, head_size) for length in layout.lengths]
    keys = [rope.rotate(raw, torch.arange(raw.shape[0])).to(dtype) for raw in raw_keys]
    values = [torch.randn(length, NUM_KV_HEADS, head_size).to(dtype) for length in layout.lengths]
    written = [torch.arange(first, length) for first, length in zip(layout.first_written, layout.lengths, strict=True)]
    written_slots = [token_slots(block_tables, seq, index, block_size) for seq, index in enumerate(written)]
    num_padding = rng.randint(1, 3)
    slot_mapping = torch.cat([*written_slots, torch.full((num_padding,), PADDING_SLOT)])  # [W]
    order = torch.randperm(slot_mapping.shape[0])  # [W]
    padding = [torch.randn(num_padding, *cache_shape[2:])]  # [P, Hkv, D]: must never reach the cache
    new_keys = torch.cat([k[i] for k, i in zip(keys, written, strict=True)] + padding)  # [W, Hkv, D]
    new_values = torch.cat([v[i] for v, i in zip(values, written, strict=True)] + padding)  # [W, Hkv, D]
    write_kv_reference(new_keys[order], new_values[order], key_cache, value_cache, slot_mapping[order])

    segments, offsets, query_view, query_pos = [], [0], [], []
    for view, (segs, queries) in enumerate(zip(layout.views, layout.queries, strict=True)):
        view_start = 0
        for seq, start, length in segs:
            segments.append((seq, start, length, view_start))
            view_start += length
        offsets.append(len(segments))
        query_view += [view] * len(queries)
        query_pos += queries
    order = torch.randperm(len(query_view))  # [T] tokens of different views interleaved in the batch
    positions = torch.tensor(query_pos, dtype=torch.int64)[order]  # [T, 2]
    table = SegmentTable(torch.tensor(segments, dtype=torch.int32).reshape(-1, 4),
                         torch.tensor(offsets, dtype=torch.int32), torch.tensor(query_view, dtype=torch.int32)[order],
                         positions.to(torch.int32))
    raw_query = torch.randn(positions.shape[0], num_heads, head_size)  # [T, Hq, D]
    storage = torch.randn(positions.shape[0], num_heads, 2 * head_size).to(dtype)  # [T, Hq, 2D]
    storage[..., :head_size] = rope.rotate(raw_query, positions[:, 0]).to(dtype)
    return Scenario(storage[..., :head_size], raw_query, key_cache, value_cache, block_tables, table,
                     raw_keys, keys, values)


def build_scenario(num_workers: int, block_size: int, num_heads: int, dtype: torch.dtype, rope: DeltaRotation,
           rng: random.Random, prompt_lengths: tuple[int, int] = (1, 100), prefill_tail: int = 3) -> Scenario:
    return make_scenario(combined_layout(num_workers, rng, prompt_lengths, prefill_tail), rope, block_size, num_heads,
                         dtype, rng)


def oracle(sc: Scenario, rope: DeltaRotation, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense oracle over every materialized view -> (out [T, Hq, D] fp32, lse [T, Hq] fp32)."""
    out = torch.full((*sc.query.shape[:2], sc.value_cache.shape[3]), float("nan"))  # [T, Hq, Dv]
    lse = torch.full(sc.query.shape[:2], float("nan"))  # [T, Hq]
    views = materialize_views_reference(sc.key_cache, sc.value_cache, sc.block_tables, sc.table)
    for view, dense in enumerate(views):
        rows = torch.nonzero(sc.table.query_view == view).squeeze(1)  # [Tv]
        n_q, p_q = sc.table.query_pos[rows].long().unbind(1)  # [Tv] each
        out[rows], lse[rows] = dense_view_attention_reference(
            sc.query[rows], n_q, p_q, dense.keys, dense.values, dense.natural_pos, dense.view_pos, rope, scale)
    return out, lse




def table_from_views(views: list[list[tuple[int, int, int, int]]],
                     queries: list[list[tuple[int, int]]]) -> SegmentTable:
    """SegmentTable from per-view segment rows and per-view (natural, view) query positions, views in order."""
    rows = [row for view in views for row in view]
    offsets = [0] + [sum(len(view) for view in views[: v + 1]) for v in range(len(views))]
    query_view = [v for v, qs in enumerate(queries) for _ in qs]
    positions = [pos for qs in queries for pos in qs]
    return SegmentTable(torch.tensor(rows, dtype=torch.int32).reshape(-1, 4), torch.tensor(offsets, dtype=torch.int32),
                        torch.tensor(query_view, dtype=torch.int32),
                        torch.tensor(positions, dtype=torch.int32).reshape(-1, 2))


def paged_cache(lengths: list[int], block_size: int, head_size: int, value_size: int,
                rng: random.Random) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(key_cache, value_cache, block_tables) full of random fp32 data, for hand-made tables."""
    block_tables, num_blocks = allocate_blocks(lengths, block_size, spare=2, rng=rng)
    key_cache = torch.randn(num_blocks, block_size, NUM_KV_HEADS, head_size)
    return key_cache, torch.randn(num_blocks, block_size, NUM_KV_HEADS, value_size), block_tables
