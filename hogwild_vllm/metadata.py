"""Turn the layout's per-worker segments and queries into the tensors the attention ops read."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from hogwild_vllm.layout import Query, Segment
from hogwild_vllm.ops.reference import SegmentTable


def segment_table(
    views: Sequence[Sequence[Segment]],
    queries: Sequence[Sequence[Query]],
    row_of: Callable[[int], int],
    device: torch.device | str = "cpu",
) -> SegmentTable:
    """One view per entry of ``views``; ``queries[v]`` are view v's query tokens in batch order.

    ``row_of(source)`` gives the block-table row that stores a source; a token's natural position is its index
    in that row. The result's query order is the concatenation of ``queries``.
    """
    segs: list[tuple[int, int, int, int]] = []
    offsets = [0]
    query_view: list[int] = []
    query_pos: list[tuple[int, int]] = []
    for v, (segments, qs) in enumerate(zip(views, queries, strict=True)):
        segs.extend((row_of(s.source), s.start, s.length, s.view_start) for s in segments)
        offsets.append(len(segs))
        query_view.extend([v] * len(qs))
        query_pos.extend((q.natural, q.view) for q in qs)

    def i32(data: list, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.tensor(data, dtype=torch.int32, device=device).reshape(shape)

    return SegmentTable(
        segments=i32(segs, (len(segs), 4)),  # [S, 4]
        view_offsets=i32(offsets, (len(offsets),)),  # [V + 1]
        query_view=i32(query_view, (len(query_view),)),  # [T]
        query_pos=i32(query_pos, (len(query_pos), 2)),  # [T, 2]
    )
