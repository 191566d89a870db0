"""Turn the layout's per-worker segments and queries into the tensors the attention ops read.

Two producers:

* :func:`segment_table`: views whose sources are layout source ids (``PROMPT``, ``GLUE``, worker index) and a
  direct map from source to block-table row (the reference engine).
* The vLLM path: the scheduler turns a group's pass into :class:`RowPlan` s (:func:`plan_rows`), where every
  source is named by the **request id** that stores it, and sends them in a :class:`HogwildStepMeta` with the
  ``SchedulerOutput``. The attention metadata builder then calls :func:`build_table` with the runner's final row
  order: group rows read their plans, every other row gets the plain single segment (:func:`plain_segment_table`).

Storage of a group in vLLM (``docs/architecture.md``, "A group's life in the engine"): the group's prompt request
holds the common prompt C at positions ``0..|C|-1`` and glue token ``j`` at ``|C| + j``; worker ``w``'s own token
``i`` sits at position ``|C| + i`` of worker ``w``'s request. These are exactly the layout's natural positions, so
a segment keeps its ``start`` and only its source changes: ``PROMPT`` and ``GLUE`` -> the prompt request's id,
``w`` -> worker w's id.

Pure Python + torch (no vLLM import): the payload must unpickle in the worker process and be unit-testable.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from typing import NamedTuple

import torch

from hogwild_vllm.layout import GLUE, PROMPT, GroupState, Query, Segment, WorkerPass
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


def plain_segment_table(query_start_loc: torch.Tensor, seq_lens: torch.Tensor, num_tokens: int) -> SegmentTable:
    """One view per request with one segment: its own tokens 0..seq_len-1, causal, delta 0.

    query_start_loc: [num_reqs + 1] int32 (CPU); seq_lens: [num_reqs] int32 (CPU), tokens after this step.
    """
    num_reqs = seq_lens.shape[0]
    qsl = query_start_loc[: num_reqs + 1].long()  # [R + 1]
    q_lens = qsl[1:] - qsl[:-1]  # [R]
    rows = torch.arange(num_reqs)  # [R]
    lens = seq_lens[:num_reqs].long()  # [R]
    zeros = torch.zeros_like(rows)  # [R]
    segments = torch.stack([rows, zeros, lens, zeros], dim=1)  # [R, 4]: (row, start, length, view_start)
    query_view = torch.repeat_interleave(rows, q_lens)  # [T]
    first = (lens - q_lens)[query_view]  # [T] position of each request's first query
    pos = first + torch.arange(int(qsl[-1])) - qsl[:-1][query_view]  # [T]
    query_pos = torch.stack([pos, pos], dim=1)  # [T, 2]: natural == view
    assert int(qsl[-1]) <= num_tokens
    return SegmentTable(segments.int(), torch.arange(num_reqs + 1, dtype=torch.int32), query_view.int(),
                        query_pos.int())


# ---- the per-step payload (scheduler -> worker) -------------------------------------------------------------


class Seg(NamedTuple):
    """Tokens ``start .. start+length-1`` of request ``source_id`` (its positions) at view positions from
    ``view_start``: a :class:`~hogwild_vllm.layout.Segment` whose source is named by request id."""

    source_id: str
    start: int
    length: int
    view_start: int


class QueryRun(NamedTuple):
    """``length`` consecutive query tokens: natural positions ``natural + k``, view positions ``view + k``."""

    natural: int
    view: int
    length: int


class RowView(NamedTuple):
    """One view of a row and the row's queries that use it (in token order)."""

    segments: tuple[Seg, ...]
    queries: tuple[QueryRun, ...]


@dataclass(frozen=True)
class RowPlan:
    """One scheduled child request (worker or glue) of a group in one step.

    ``views`` in order; the row's scheduled tokens are the queries of ``views[0]``, then of ``views[1]``, ...
    A worker row has one view; the glue row has one view per glue piece. Queries come as runs (a prompt chunk of
    thousands of tokens is one run), so the payload stays small. Invariants (checked at construction, not on
    unpickling): the row's naturals are consecutive (they are a contiguous range of its request), and every query
    token is a key of its own view at its own view position, in a segment of this request.
    """

    request_id: str
    views: tuple[RowView, ...]

    def __post_init__(self) -> None:
        assert self.views, f"{self.request_id}: a row needs at least one view"
        expect: int | None = None
        for view in self.views:
            assert view.queries, f"{self.request_id}: a view without queries"
            end = 0
            for s in view.segments:
                assert s.start >= 0 and s.length > 0 and s.view_start >= end, (self.request_id, view.segments)
                end = s.view_start + s.length
            for run in view.queries:
                assert run.length > 0 and (expect is None or run.natural == expect), (self.request_id, view.queries)
                expect = run.natural + run.length
                assert any(s.source_id == self.request_id and s.view_start - s.start == run.view - run.natural
                           and s.start <= run.natural and expect <= s.start + s.length for s in view.segments), (
                    f"{self.request_id}: queries {run} are not own keys of their view")

    def __reduce__(self) -> tuple[Callable[..., RowPlan], tuple[str, tuple]]:
        # Sent every step for every group row: as plain tuples it (un)pickles several times faster than as named
        # tuples (whose generic protocol calls back into Python for every segment).
        wire = tuple((tuple(map(tuple, view.segments)), tuple(map(tuple, view.queries))) for view in self.views)
        return _row_plan_from_wire, (self.request_id, wire)

    @property
    def num_queries(self) -> int:
        return sum(run.length for view in self.views for run in view.queries)

    @property
    def first_natural(self) -> int:
        return self.views[0].queries[0].natural

    def sources(self) -> set[str]:
        return {s.source_id for view in self.views for s in view.segments}


def _row_plan_from_wire(request_id: str, wire: tuple) -> RowPlan:
    """Unpickle a :class:`RowPlan` (not re-checked: it was checked where it was built)."""
    plan = object.__new__(RowPlan)
    new = tuple.__new__  # named tuples without a Python call each
    views = tuple(new(RowView, (tuple(map(new, repeat(Seg), segments)), tuple(map(new, repeat(QueryRun), queries))))
                  for segments, queries in wire)
    object.__setattr__(plan, "request_id", request_id)
    object.__setattr__(plan, "views", views)
    return plan


@dataclass(frozen=True)
class HogwildStepMeta:
    """What the scheduler sends with ``SchedulerOutput`` (as ``out.hogwild``) for one step.

    rows:         scheduled group child id -> its plan (plain rows are absent: they get the plain single segment).
    extra_blocks: request id -> block ids, for every source a row reads that is not scheduled this step (so not
                  in the runner's batch): the prompt request after pass 0. ``unscheduled_sources(rows)`` lists them.
    forced:       request id -> forced token ids appended after the sampled token (plan section 4.1, option B).
    """

    rows: dict[str, RowPlan] = field(default_factory=dict)
    extra_blocks: dict[str, tuple[int, ...]] = field(default_factory=dict)
    forced: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for rid, row in self.rows.items():
            assert rid == row.request_id, f"rows[{rid!r}] holds the plan of {row.request_id!r}"
        both = set(self.extra_blocks) & set(self.rows)
        assert not both, f"scheduled rows {sorted(both)} must not be in extra_blocks"


def unscheduled_sources(rows: Mapping[str, RowPlan]) -> list[str]:
    """Request ids read by some row but not scheduled as a row (sorted): each needs ``extra_blocks``."""
    read: set[str] = set()
    for row in rows.values():
        read |= row.sources()
    return sorted(read - set(rows))


def _runs(queries: Sequence[Query]) -> tuple[QueryRun, ...]:
    runs: list[QueryRun] = []
    for q in queries:
        last = runs[-1] if runs else None
        if last and q.natural == last.natural + last.length and q.view == last.view + last.length:
            runs[-1] = QueryRun(last.natural, last.view, last.length + 1)
        else:
            runs.append(QueryRun(q.natural, q.view, 1))
    return tuple(runs)


def _row_view(segments: Sequence[Segment], queries: Sequence[Query], name: Callable[[int], str]) -> RowView:
    return RowView(tuple(Seg(name(s.source), s.start, s.length, s.view_start) for s in segments), _runs(queries))


def source_names(state: GroupState, worker_ids: Sequence[str], prompt_id: str) -> dict[int, str]:
    """The request id of every layout source: ``PROMPT`` and ``GLUE`` -> the prompt request's (it holds the common
    prompt C at positions ``0..|C|-1`` and the glue after it), ``w`` -> worker w's."""
    if len(worker_ids) != len(state.workers) or len(set(worker_ids)) != len(worker_ids):
        raise ValueError(f"need {len(state.workers)} distinct worker request ids, got {list(worker_ids)}")
    if prompt_id in worker_ids:
        raise ValueError(f"the prompt request id {prompt_id!r} is also a worker's")
    return {PROMPT: prompt_id, GLUE: prompt_id, **dict(enumerate(worker_ids))}


def plan_rows(state: GroupState, source_ids: Mapping[int, str], pass0_chunk: tuple[int, int] | None = None,
              plans: Sequence[WorkerPass] | None = None) -> dict[str, RowPlan]:
    """The rows of one group for one step, keyed by request id (see :func:`source_names` for ``source_ids``).

    Pass 0 (``pass0_chunk=(start, end)``): the prompt's request computes prompt tokens ``start..end-1`` over the
    prompt written so far (``0..end-1``, causal); in the step of the last chunk (``end == prompt_len``) the glue
    joins with one view per glue piece (``GroupState.glue_views``): in the same row when one request holds both
    (the vLLM scheduler's layout), else as its own row. Every later step (``pass0_chunk=None``): one row per worker
    from ``plans`` (default ``state.plan_pass()``; call before ``state.mark_fed()``): its fed tokens are its queries.
    """
    def name(source: int) -> str:
        try:
            return source_ids[source]
        except KeyError:
            raise ValueError(f"no request id for layout source {source}") from None

    rows: list[RowPlan] = []
    if pass0_chunk is not None:
        start, end = pass0_chunk
        if not 0 <= start < end <= state.prompt_len:
            raise ValueError(f"pass-0 chunk {pass0_chunk} is not a non-empty range of the prompt "
                             f"(length {state.prompt_len})")
        if plans is not None:
            raise ValueError("pass 0 takes no worker plans")
        view = [Segment(PROMPT, 0, end, 0)]
        prompt_views = [_row_view(view, [Query(i, i) for i in range(start, end)], name)]
        glue = state.glue_views()
        if end == state.prompt_len and glue:
            glue_views = [_row_view(segs, qs, name) for segs, qs in glue]
            if name(GLUE) == name(PROMPT):  # one request holds C then the glue: one row, one view per piece
                prompt_views += glue_views
            else:
                rows.append(RowPlan(name(GLUE), tuple(glue_views)))
        rows.insert(0, RowPlan(name(PROMPT), tuple(prompt_views)))
    else:
        plans = state.plan_pass() if plans is None else plans
        if len(plans) != len(state.workers):
            raise ValueError(f"expected {len(state.workers)} worker plans, got {len(plans)}")
        for w, plan in enumerate(plans):
            if not plan.queries:
                raise ValueError(f"worker {w} feeds no token in this pass")
            rows.append(RowPlan(name(w), (_row_view(plan.segments, plan.queries, name),)))
    out = {row.request_id: row for row in rows}
    if len(out) != len(rows):
        raise ValueError(f"two rows share a request id: {[row.request_id for row in rows]}")
    return out


# ---- the builder side (worker process) ----------------------------------------------------------------------


class StaleStepError(ValueError):
    """The step payload does not match the batch the runner built (row set, query counts or lengths)."""


def _ints(values: torch.Tensor | Sequence[int], count: int, what: str) -> list[int]:
    out = values.tolist() if isinstance(values, torch.Tensor) else list(values)
    if len(out) < count:
        raise StaleStepError(f"{what} has {len(out)} entries, the batch needs {count}")
    return [int(v) for v in out[:count]]


def build_table(meta: HogwildStepMeta | None, batch_req_ids: Sequence[str],
                query_start_loc: torch.Tensor | Sequence[int], seq_lens: torch.Tensor | Sequence[int],
                block_table: torch.Tensor, device: torch.device | str | None = None,
                ) -> tuple[SegmentTable, torch.Tensor]:
    """The SegmentTable of one step for the runner's rows, and the block table it indexes.

    batch_req_ids: request id of each batch row (the runner's final order); query_start_loc: [num_reqs + 1]
    (row r's query tokens are ``query_start_loc[r]..query_start_loc[r+1]-1``); seq_lens: [num_reqs], tokens of
    each request after this step; block_table: [>= num_reqs, max_blocks] int32.
    Group rows (in ``meta.rows``) get their plan's views, sources mapped to the row of their request id, or to an
    extra block-table row appended (in order of first use) from ``meta.extra_blocks``, zero-padded to the table
    width. Other rows get one plain segment, as :func:`plain_segment_table`. Query order is batch order. Raises
    :class:`StaleStepError` when the payload and the batch disagree. The table lands on ``device`` (default: the
    block table's); the block table is returned unchanged when no extra row is needed.
    """
    device = block_table.device if device is None else device
    num_reqs = len(batch_req_ids)
    qsl = _ints(query_start_loc, num_reqs + 1, "query_start_loc")
    lens = _ints(seq_lens, num_reqs, "seq_lens")
    if block_table.dim() != 2 or block_table.shape[0] < num_reqs:
        raise StaleStepError(f"block table {tuple(block_table.shape)} has fewer than {num_reqs} rows")
    rows = meta.rows if meta is not None else {}
    index = {rid: r for r, rid in enumerate(batch_req_ids)}
    if len(index) != num_reqs:
        raise StaleStepError(f"a request id appears twice in the batch: {list(batch_req_ids)}")
    missing = [rid for rid in rows if rid not in index]
    if missing:
        raise StaleStepError(f"group rows {missing} are planned but not in the batch {list(batch_req_ids)}")

    extra: list[str] = []
    where = {rid: (r, lens[r]) for rid, r in index.items()}  # request id -> (table row, tokens it holds)

    def extra_row(rid: str, reader: str) -> tuple[int, int]:
        if meta is None or rid not in meta.extra_blocks:
            raise StaleStepError(f"{reader} reads {rid!r}, which is neither in the batch nor in extra_blocks")
        extra.append(rid)
        # its length is not sent: the op bounds-checks reads against its blocks
        where[rid] = (num_reqs + len(extra) - 1, sys.maxsize)
        return where[rid]

    segs: list[int] = []  # flat: (row, start, length, view_start) a segment
    offsets = [0]
    # Per query token, in batch order: its view, natural and view position. Plain Python lists, one tensor each at
    # the end: a decode step has a few dozen tokens, where every small torch op costs more than the whole loop.
    query_view: list[int] = []
    naturals: list[int] = []
    view_pos: list[int] = []

    def add_queries(natural: int, view: int, count: int) -> None:
        query_view.extend([len(offsets) - 2] * count)
        naturals.extend(range(natural, natural + count))
        view_pos.extend(range(view, view + count))

    for r, rid in enumerate(batch_req_ids):
        q_len = qsl[r + 1] - qsl[r]
        plan = rows.get(rid)
        if plan is None:
            segs += (r, 0, lens[r], 0)
            offsets.append(len(segs) // 4)
            add_queries(lens[r] - q_len, lens[r] - q_len, q_len)
            continue
        if plan.num_queries != q_len or plan.first_natural + q_len != lens[r]:
            raise StaleStepError(
                f"row {r} ({rid!r}) is scheduled for {q_len} tokens ending at position {lens[r]}, but its plan has "
                f"{plan.num_queries} queries from position {plan.first_natural}")
        for segments, queries in plan.views:
            for source_id, start, length, view_start in segments:
                row, held = where.get(source_id) or extra_row(source_id, rid)
                if start + length > held:
                    raise StaleStepError(f"{rid} reads tokens {start}..{start + length - 1} of {source_id!r}, "
                                         f"which holds {held}")
                segs += (row, start, length, view_start)
            offsets.append(len(segs) // 4)
            for natural, view, count in queries:
                add_queries(natural, view, count)

    if len(query_view) != qsl[num_reqs] - qsl[0]:
        raise StaleStepError(f"the rows hold {len(query_view)} query tokens, query_start_loc says "
                             f"{qsl[num_reqs] - qsl[0]}")
    table = SegmentTable(
        segments=torch.tensor(segs, dtype=torch.int32).reshape(-1, 4).to(device),  # [S, 4]
        view_offsets=torch.tensor(offsets, dtype=torch.int32).to(device),  # [V + 1]
        query_view=torch.tensor(query_view, dtype=torch.int32).to(device),  # [T]
        query_pos=torch.tensor([naturals, view_pos], dtype=torch.int32).T.contiguous().to(device),  # [T, 2]
    )
    if not extra:
        return table, block_table
    width = block_table.shape[1]
    assert meta is not None
    added = torch.zeros(len(extra), width, dtype=block_table.dtype)  # [E, max_blocks]
    for i, rid in enumerate(extra):
        blocks = meta.extra_blocks[rid]
        if len(blocks) > width:
            raise StaleStepError(f"{rid!r} has {len(blocks)} blocks, the block table holds {width} per row")
        added[i, : len(blocks)] = torch.tensor(blocks, dtype=block_table.dtype)
    return table, torch.cat([block_table[:num_reqs], added.to(block_table.device)])


# ---- which tokens take the plain kernel -------------------------------------------------------------------------


class PlainRun(NamedTuple):
    """A run of batch tokens that is ordinary causal attention over its own row: tokens ``token_start ..
    token_start + length - 1`` of the batch are the row's positions ``seq_len - length .. seq_len - 1`` and see
    positions ``0 ..`` themselves (what a plain paged kernel computes for a row of ``length`` queries and
    ``seq_len`` keys)."""

    row: int
    token_start: int
    length: int
    seq_len: int


def plain_runs(meta: HogwildStepMeta | None, batch_req_ids: Sequence[str], query_start_loc: Sequence[int],
               seq_lens: Sequence[int]) -> list[PlainRun]:
    """The plain runs of a step, in batch order: every row outside a group whole, and the leading queries of a
    group row whose first view is its own tokens from position 0 at view positions equal to their own (the
    prompt request's chunk of the common prompt C). Everything else needs the position-delta op.

    query_start_loc: [num_reqs + 1]; seq_lens: [num_reqs] (tokens of each row after this step).
    """
    rows = meta.rows if meta is not None else {}
    runs: list[PlainRun] = []
    for r, rid in enumerate(batch_req_ids):
        q_start, q_len, seq_len = int(query_start_loc[r]), int(query_start_loc[r + 1] - query_start_loc[r]), \
            int(seq_lens[r])
        if q_len == 0:
            continue
        plan = rows.get(rid)
        if plan is None:
            runs.append(PlainRun(r, q_start, q_len, seq_len))
            continue
        first = plan.views[0]
        own = first.segments[0] if len(first.segments) == 1 else None
        if own is None or own.source_id != rid or own.start != 0 or own.view_start != 0:
            continue
        if any(run.natural != run.view for run in first.queries):
            continue
        length = sum(run.length for run in first.queries)
        end = first.queries[-1].natural + first.queries[-1].length  # its queries are consecutive (RowPlan)
        runs.append(PlainRun(r, q_start, length, end))
    return runs
