"""Decode-shaped timings of the Triton Hogwild! attention beside torch SDPA and a device copy (used by gpu_check.py).

A case: N workers, one query token each, every view holding ``keys`` keys in combined-layout segments: the prompt
(keys / 4), 2N history steps (keys / 2), the N - 1 peers' current steps and the own step (keys / (4N) each), in a
paged cache with shuffled blocks. Layout "shared": the views share the cache as Hogwild! does (the K/V bytes the
kernel reads are N times the bytes stored; repeated reads may hit L2); "private": every view has its own copy of
every token (bytes read == bytes stored, like SDPA). SDPA reads the same number of keys per query, contiguous:
q [N, Hq, 1, D], k / v [N, Hkv, keys, D]. Pure torch + the project's ops; no vLLM.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from attention_cases import TestRope

from hogwild_vllm.ops import SegmentTable, hogwild_attention_reference
from hogwild_vllm.ops.triton_attention import default_num_splits, hogwild_attention_triton


@dataclass(frozen=True)
class Shape:
    workers: int
    keys: int  # per view
    heads: int = 28  # Qwen2.5-7B attention
    kv_heads: int = 4
    head_size: int = 128
    block_size: int = 16
    dtype: torch.dtype = torch.bfloat16


@dataclass
class Batch:
    query: torch.Tensor  # [N, Hq, D]
    key_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    value_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor  # [num_seqs, max_blocks] int32
    table: SegmentTable
    rope: TestRope
    stored_tokens: int  # tokens held in the cache (each read by one or more views)


def _views(shape: Shape) -> tuple[list[int], list[list[tuple[int, int, int]]], list[tuple[int, int]]]:
    """(sequence lengths, per view (seq, start, length) in view order, per view (n_q, p_q)): one shared layout."""
    n, keys = shape.workers, shape.keys
    prompt, step = keys // 4, max(1, keys // (4 * n))
    current = (keys - prompt - 2 * n * step) // n
    history = [(w, prompt + k * step, step) for k in range(2) for w in range(1, n + 1)]
    lengths = [prompt] + [prompt + 2 * step + current] * n
    views, queries = [], []
    for w in range(1, n + 1):
        peers = [(p, prompt + 2 * step, current) for p in range(1, n + 1) if p != w]
        view = [(0, 0, prompt), *history, *peers, (w, prompt + 2 * step, current)]
        views.append(view)
        queries.append((lengths[w] - 1, sum(length for _, _, length in view) - 1))
    return lengths, views, queries


def make_batch(shape: Shape, layout: str, device: str, gen: torch.Generator) -> Batch:
    """Random keys / values / queries in a paged cache; layout "shared" or "private" (one copy of all per view)."""
    lengths, views, queries = _views(shape)
    if layout == "private":  # view v reads sequences v * S .. v * S + S - 1
        count = len(lengths)
        views = [[(seq + v * count, start, length) for seq, start, length in view] for v, view in enumerate(views)]
        lengths = lengths * len(views)
    bs = shape.block_size
    first_read = [0 if seq % (shape.workers + 1) == 0 else shape.keys // 4 for seq in range(len(lengths))]
    needed = [-(-length // bs) - first // bs for length, first in zip(lengths, first_read, strict=True)]
    num_blocks = sum(needed) + 1  # block 0: never read (the unwritten prompt part of the worker logs)
    pool = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    tables = torch.zeros(len(lengths), max(-(-length // bs) for length in lengths), dtype=torch.int32)
    for seq, first in enumerate(first_read):
        for b in range(first // bs, first // bs + needed[seq]):
            tables[seq, b] = pool.pop()
    cache_shape = (num_blocks, bs, shape.kv_heads, shape.head_size)
    key_cache = torch.randn(cache_shape, generator=gen).to(shape.dtype)
    value_cache = torch.randn(cache_shape, generator=gen).to(shape.dtype)
    segments, offsets = [], [0]
    for view in views:
        view_start = 0
        for seq, start, length in view:
            segments.append((seq, start, length, view_start))
            view_start += length
        offsets.append(len(segments))
    table = SegmentTable(torch.tensor(segments, dtype=torch.int32), torch.tensor(offsets, dtype=torch.int32),
                         torch.arange(len(views), dtype=torch.int32), torch.tensor(queries, dtype=torch.int32))
    rope = TestRope(shape.head_size, shape.head_size, True)
    max_delta = max(abs((p - n) - (vs - st)) for v, (n, p) in enumerate(queries) for _, st, _, vs in
                    segments[offsets[v] : offsets[v + 1]])
    angle = torch.arange(max_delta + 1, dtype=torch.float64)[:, None] * rope.inv_freq  # [rows, D / 2]
    rope.cos_sin_table = torch.cat([angle.cos(), angle.sin()], dim=-1).float()  # enough rows for every delta
    query = torch.randn(len(views), shape.heads, shape.head_size, generator=gen).to(shape.dtype)
    stored = sum(length - first for length, first in zip(lengths, first_read, strict=True))
    table = SegmentTable(*(t.to(device) for t in (table.segments, table.view_offsets, table.query_view,
                                                  table.query_pos)))
    return Batch(query.to(device), key_cache.to(device), value_cache.to(device), tables.to(device), table,
                 rope.to(device), stored)


def median_seconds(fn: Callable[[], object], device: str, warmup: int, reps: int) -> float:
    """Median wall time of fn() over reps runs after warmup runs: CUDA events on GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            began = time.perf_counter()
            fn()
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def as_graph(fn: Callable[[], object]) -> Callable[[], object]:
    """fn captured in a CUDA graph (fn must have run once, so its kernels are compiled); returns the replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def copy_bandwidth(device: str, num_bytes: int, warmup: int, reps: int) -> float:
    """Bytes read + written per second by torch.empty_like(x).copy_(x) of a num_bytes buffer."""
    x = torch.empty(num_bytes // 2, dtype=torch.bfloat16, device=device).fill_(1.0)
    seconds = median_seconds(lambda: torch.empty_like(x).copy_(x), device, warmup, reps)
    return 2 * x.numel() * x.element_size() / seconds


def bench_triton(batch: Batch, shape: Shape, device: str, splits: int | None, warmup: int, reps: int,
                 **options: int) -> dict[str, object]:
    """Times one launch (eager, and replayed from a CUDA graph on GPU); checks the output against the reference.
    ``options``: block_n / num_warps / num_stages for hogwild_attention_triton."""
    out = torch.empty_like(batch.query)  # [N, Hq, D]
    scale = shape.head_size**-0.5

    def run() -> None:
        hogwild_attention_triton(batch.query, batch.key_cache, batch.value_cache, batch.block_tables, batch.table,
                                 batch.rope, scale, out, None, num_splits=splits, **options)

    eager = median_seconds(run, device, warmup, reps)
    graph = median_seconds(as_graph(run), device, warmup, reps) if device == "cuda" else float("nan")
    expected = hogwild_attention_reference(batch.query, batch.key_cache, batch.value_cache, batch.block_tables,
                                           batch.table, batch.rope, scale)
    assert isinstance(expected, torch.Tensor)
    error = float((out.float() - expected.float()).abs().max())
    used = splits or default_num_splits(shape.workers, shape.kv_heads, torch.device(device))
    return {"splits": used, "eager_s": eager, "graph_s": graph, "max_err": error,
            "ok": bool(torch.allclose(out.float(), expected.float(), atol=2e-3, rtol=2**-7))}


SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


def bench_sdpa(shape: Shape, device: str, gen: torch.Generator, warmup: int,
               reps: int) -> list[tuple[str, float | None, float | None, str]]:
    """Torch SDPA over `keys` contiguous keys per query, each backend forced: rows (backend, eager seconds,
    graph-replay seconds (nan on CPU), note), the times None where the backend refused."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    n, hq, hkv, d = shape.workers, shape.heads, shape.kv_heads, shape.head_size
    q = torch.randn(n, hq, 1, d, generator=gen).to(device, shape.dtype)  # [N, Hq, 1, D]
    k = torch.randn(n, hkv, shape.keys, d, generator=gen).to(device, shape.dtype)  # [N, Hkv, L, D]
    v = torch.randn(n, hkv, shape.keys, d, generator=gen).to(device, shape.dtype)  # [N, Hkv, L, D]
    rows: list[tuple[str, float | None, float | None, str]] = []
    for name in SDPA_BACKENDS if device == "cuda" else ("MATH",):
        backend = getattr(SDPBackend, name)

        def run(backend: SDPBackend = backend) -> torch.Tensor:
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)

        try:
            eager = median_seconds(run, device, warmup, reps)
            graph = median_seconds(as_graph(run), device, warmup, reps) if device == "cuda" else float("nan")
            rows.append((name.lower(), eager, graph, ""))
        except Exception as error:  # backend not available for these shapes / this build, or not capturable
            rows.append((name.lower(), None, None, str(error).strip().splitlines()[0][:80]))
    return rows
