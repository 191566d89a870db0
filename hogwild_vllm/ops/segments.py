"""Which keys every query token attends over, and at which view positions: the table all attention ops read.

Produced once per step by the metadata builder (``hogwild_vllm.metadata``) or the reference engine; read by the
compiled CPU op, the Triton kernel and the pure-torch reference alike. Pure torch, no vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True)
class SegmentTable:
    """Which keys each query token attends over, at which view positions (produced by the metadata builder).

    segments:     [S, 4] int32, rows (seq, start, length, view_start).
    view_offsets: [V + 1] int32, CSR: view v owns segments[view_offsets[v]:view_offsets[v + 1]], sorted by
                  view_start and not overlapping (empty segments may sit anywhere).
    query_view:   [T] int32, the view of each query token.
    query_pos:    [T, 2] int32, (natural position n_q, view position p_q) of each query token.
    Construction checks shapes, dtypes and devices only (no device sync); the references also check values.
    """

    segments: torch.Tensor
    view_offsets: torch.Tensor
    query_view: torch.Tensor
    query_pos: torch.Tensor

    def __post_init__(self) -> None:
        # Built every step: the messages are formatted only on failure (a tensor's device in an f-string costs
        # more than all the checks).
        device = self.segments.device
        for name in ("segments", "view_offsets", "query_view", "query_pos"):
            tensor = getattr(self, name)
            if not (isinstance(tensor, torch.Tensor) and tensor.dtype == torch.int32):
                raise ValueError(f"SegmentTable.{name} must be an int32 tensor")
            if tensor.device != device:
                raise ValueError(f"SegmentTable.{name} is on {tensor.device}, segments on {device}")
        _check(self.segments.dim() == 2 and self.segments.shape[1] == 4, "segments must be [S, 4]")
        _check(self.view_offsets.dim() == 1 and self.view_offsets.numel() >= 1, "view_offsets must be [V + 1]")
        _check(self.query_view.dim() == 1, "query_view must be [T]")
        _check(self.query_pos.shape == (self.query_view.shape[0], 2), "query_pos must be [T, 2]")

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SegmentTable:
        """The same table on ``device``."""
        return SegmentTable(*(t.to(device, non_blocking=non_blocking) for t in
                              (self.segments, self.view_offsets, self.query_view, self.query_pos)))

    @property
    def num_views(self) -> int:
        return self.view_offsets.numel() - 1

    @property
    def num_tokens(self) -> int:
        return self.query_view.shape[0]

    def view_segments(self, view: int) -> list[tuple[int, int, int, int]]:
        """The (seq, start, length, view_start) rows of one view, as Python ints (syncs the device)."""
        begin, end = self.view_offsets[view : view + 2].tolist()
        return [(row[0], row[1], row[2], row[3]) for row in self.segments[begin:end].tolist()]


def check_table_values(table: SegmentTable, block_tables: torch.Tensor, block_size: int) -> None:
    """Value invariants of a SegmentTable against the block tables it indexes (syncs the device)."""
    segments = table.segments.long().cpu()  # [S, 4]
    offsets = table.view_offsets.long().cpu()  # [V + 1]
    seq, start, length, view_start = segments.unbind(1)  # each [S]
    _check(int(offsets[0]) == 0 and int(offsets[-1]) == segments.shape[0] and bool((offsets.diff() >= 0).all()),
           "view_offsets must rise from 0 to the number of segments")
    query_view = table.query_view.cpu()  # [T]
    _check(bool(((query_view >= 0) & (query_view < table.num_views)).all()), "query_view names a missing view")
    _check(bool(((seq >= 0) & (seq < block_tables.shape[0])).all()), "segment seq has no block table row")
    _check(bool(((start >= 0) & (length >= 0) & (view_start >= 0)).all()), "segment fields must be >= 0")
    _check(bool((start + length <= block_tables.shape[1] * block_size).all()), "segment runs past its block table")
    for view in range(table.num_views):
        rows = segments[offsets[view] : offsets[view + 1]]  # [S_v, 4]
        rows = rows[rows[:, 2] > 0]  # non-empty segments
        ends = rows[:-1, 3] + rows[:-1, 2]  # [S_v - 1] view end of each segment but the last
        _check(bool((ends <= rows[1:, 3]).all()), f"view {view}: segments must be sorted by view_start, no overlap")
