"""Turn the layout's per-worker segments and queries into the tensors the attention ops read.

Two producers:

* :func:`segment_table`: views whose sources are layout source ids (``PROMPT``, ``GLUE``, worker index) and a
  direct map from source to block-table row (the reference engine).
* The vLLM path: the scheduler turns a group's pass into :class:`RowPlan` s (:func:`plan_rows`), where every
  source is named by the **request id** that stores it, and sends them in a :class:`HogwildStepMeta` with the
  ``SchedulerOutput``. The attention metadata builder then calls :func:`build_table` with the runner's final row
  order: group rows read their plans, every other row gets the plain single segment (:func:`plain_segment_table`).

This runs every step for every group row, so it is written for the decode step's cost: a pass's worker views start
with parts of one common sequence (``GroupState.plan_pass``: the prompt, the committed steps, the open steps), which
:func:`plan_rows` names once, every row of the group holds (``RowPlan.common``), the payload pickles once and
:func:`build_table` maps once; per row there remain only the segments after its part (timed piece by piece
by benchmarks/bench_planning.py).

Storage of a group in vLLM (``docs/architecture.md``, "A group's life in the engine"): the group's prompt request
holds the common prompt C at positions ``0..|C|-1`` and glue token ``j`` at ``|C| + j``; worker ``w``'s own token
``i`` sits at position ``log_start + i`` of worker ``w``'s request (``log_start``: the first KV block boundary at
or after ``|C|``, ``group.worker_log_start``). These are exactly the layout's natural positions, so
a segment keeps its ``start`` and only its source changes: ``PROMPT`` and ``GLUE`` -> the prompt request's id,
``w`` -> worker w's id.

Pure Python + torch (no vLLM import): the payload must unpickle in the worker process and be unit-testable.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain, islice, repeat
from operator import attrgetter, itemgetter
from typing import NamedTuple
from weakref import WeakKeyDictionary

import torch

from hogwild_vllm.layout import GLUE, PROMPT, GroupState, Query, Segment, SegmentTuple, WorkerPass
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


def _flat(items: Iterable[tuple]) -> tuple:
    """Named tuples as one flat tuple of their fields."""
    return tuple(chain.from_iterable(items))


def _unflat(kind: type, wire: tuple) -> Iterable:
    """The named tuples of ``kind`` that :func:`_flat` flattened (made without a Python call each)."""
    fields = iter(wire)
    return map(tuple.__new__, repeat(kind), zip(*[fields] * len(kind._fields), strict=True))  # type: ignore[attr-defined]


@dataclass(frozen=True)
class RowPlan:
    """One scheduled child request (worker or glue) of a group in one step.

    ``views`` in order; the row's scheduled tokens are the queries of ``views[0]``, then of ``views[1]``, ...
    A worker row has one view; the glue row has one view per glue piece. Queries come as runs (a prompt chunk of
    thousands of tokens is one run), so the payload stays small. ``views[0].segments`` starts with
    ``common[:common_len]``: its part of the sequence that the group's worker views start with parts of in this
    step (``GroupState.plan_pass``), one object in all its rows, pickled and mapped once (neither field is
    compared). Invariants (checked at construction, not on unpickling): the row's naturals are consecutive (they
    are a contiguous range of its request), every query token is a key of its own view at its own view position,
    in a segment of this request, and each view's segments are sorted by view position without overlap (those of
    ``common`` are checked once for all rows, by :func:`plan_rows`).
    """

    request_id: str
    views: tuple[RowView, ...]
    common: tuple[Seg, ...] = field(default=(), compare=False, repr=False)
    common_len: int = field(default=0, compare=False, repr=False)

    def __post_init__(self) -> None:
        rid, n = self.request_id, self.common_len
        assert self.views, f"{rid}: a row needs at least one view"
        assert 0 <= n <= len(self.common) and self.views[0].segments[:n] == self.common[:n], (
            f"{rid}: its view does not start with its common part")
        expect: int | None = None
        for i, (segments, queries) in enumerate(self.views):
            assert queries, f"{rid}: a view without queries"
            end = 0
            for _, start, length, view_start in islice(segments, n - 1 if i == 0 and n else 0, None):
                assert start >= 0 and length > 0 and view_start >= end, (rid, segments)
                end = view_start + length
            for natural, view, length in queries:
                assert length > 0 and (expect is None or natural == expect), (rid, queries)
                expect = natural + length
                assert _own_segment(segments, rid, natural, view, length), (
                    f"{rid}: queries {QueryRun(natural, view, length)} are not own keys of their view")

    def __reduce__(self) -> tuple[Callable[..., RowPlan], tuple[tuple]]:
        return _row_plan_from_wire, (_rows_wire([self]),)

    @property
    def num_queries(self) -> int:
        return sum(run.length for view in self.views for run in view.queries)

    @property
    def first_natural(self) -> int:
        return self.views[0].queries[0].natural

    def sources(self) -> set[str]:
        out: set[str] = set()
        for view in self.views:
            out.update(map(_SOURCE_ID, view.segments))
        return out


_SOURCE_ID = itemgetter(0)  # Seg.source_id


def _own_segment(segments: Sequence[Seg], rid: str, natural: int, view: int, length: int) -> bool:
    """Whether a segment of ``rid`` holds the query run at its view positions; searched from the view's end,
    where a row's queries are (its newest tokens)."""
    for source_id, start, count, view_start in reversed(segments):
        if source_id == rid and view_start - start == view - natural and start <= natural and \
                natural + length <= start + count:
            return True
    return False


def _rows_wire(rows: Iterable[RowPlan]) -> tuple[tuple, tuple, tuple, tuple]:
    """Rows as plain data, to pickle: sent every step for every group row, where named tuples would (un)pickle
    several times slower (their generic protocol calls back into Python for each) and so would a reduce per row.
    Each distinct common sequence goes once; the rest of every view goes flat, in two tuples for all rows."""
    index: dict[int, int] = {}  # id(common) -> its place in ``commons``
    commons: list[tuple] = []
    heads: list[tuple[str, int, int, tuple[int, ...]]] = []  # request id, common's place (or -1), its length, sizes
    segments: list = []  # Seg fields of every view past its common part
    queries: list = []  # QueryRun fields
    for row in rows:
        place = index.get(id(row.common), -1) if row.common else -1
        if place < 0 and row.common:
            place = index[id(row.common)] = len(commons)
            commons.append(_flat(row.common))
        sizes: list[int] = []
        skip = row.common_len  # of the first view only
        for segs, runs in row.views:
            segments += chain.from_iterable(islice(segs, skip, None))
            queries += chain.from_iterable(runs)
            sizes += (len(segs) - skip, len(runs))
            skip = 0
        heads.append((row.request_id, place, row.common_len, tuple(sizes)))
    return tuple(commons), tuple(heads), tuple(segments), tuple(queries)


def _rows_from_wire(wire: tuple[tuple, tuple, tuple, tuple]) -> list[RowPlan]:
    """The rows of :func:`_rows_wire` (not re-checked: they were checked where they were built)."""
    flat_commons, heads, flat_segments, flat_queries = wire
    commons = [tuple(_unflat(Seg, flat)) for flat in flat_commons]
    segments, queries = tuple(_unflat(Seg, flat_segments)), tuple(_unflat(QueryRun, flat_queries))
    new = tuple.__new__
    out = []
    s = q = 0
    for rid, place, n, sizes in heads:
        views = []
        for k in range(0, len(sizes), 2):
            views.append(new(RowView, (segments[s: s + sizes[k]], queries[q: q + sizes[k + 1]])))
            s, q = s + sizes[k], q + sizes[k + 1]
        common = commons[place] if place >= 0 else ()
        if n:
            views[0] = new(RowView, (common[:n] + views[0].segments, views[0].queries))
        plan = object.__new__(RowPlan)
        plan.__dict__.update(request_id=rid, views=tuple(views), common=common, common_len=n)
        out.append(plan)
    return out


def _row_plan_from_wire(wire: tuple[tuple, tuple, tuple, tuple]) -> RowPlan:
    (plan,) = _rows_from_wire(wire)
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

    def __reduce__(self) -> tuple[Callable[..., HogwildStepMeta], tuple]:
        # All rows in one wire (_rows_wire), rebuilt in one sweep.
        return _meta_from_wire, (_rows_wire(self.rows.values()), self.extra_blocks, self.forced)


def _meta_from_wire(rows: tuple[tuple, tuple, tuple, tuple], extra_blocks: dict[str, tuple[int, ...]],
                    forced: dict[str, tuple[int, ...]]) -> HogwildStepMeta:
    meta = object.__new__(HogwildStepMeta)
    meta.__dict__.update(rows={row.request_id: row for row in _rows_from_wire(rows)}, extra_blocks=extra_blocks,
                         forced=forced)
    return meta


def unscheduled_sources(rows: Mapping[str, RowPlan]) -> list[str]:
    """Request ids read by some row but not scheduled as a row (sorted): each needs ``extra_blocks``."""
    read: set[str] = set()
    commons: dict[int, tuple[tuple[Seg, ...], int]] = {}  # id(common) -> (it, the longest part of it a row holds)
    for row in rows.values():
        n = row.common_len
        if n and n > commons.get(id(row.common), ((), 0))[1]:
            commons[id(row.common)] = (row.common, n)
        first, *more = row.views
        read.update(map(_SOURCE_ID, islice(first.segments, n, None)))
        for view in more:
            read.update(map(_SOURCE_ID, view.segments))
    for common, n in commons.values():
        read.update(map(_SOURCE_ID, islice(common, n)))
    return sorted(read - set(rows))


def _runs(positions: Iterable[tuple[int, int]]) -> tuple[QueryRun, ...]:
    """Query tokens, (natural, view position) each, as runs."""
    runs: list[QueryRun] = []
    for natural, view in positions:
        last = runs[-1] if runs else None
        if last and natural == last.natural + last.length and view == last.view + last.length:
            runs[-1] = QueryRun(last.natural, last.view, last.length + 1)
        else:
            runs.append(QueryRun(natural, view, 1))
    return tuple(runs)


def _segs(segments: Iterable[SegmentTuple], source_ids: Mapping[int, str]) -> list[Seg]:
    """Layout segments (as tuples) with their sources named by request id."""
    new = tuple.__new__
    try:
        return [new(Seg, (source_ids[source], start, length, view_start))
                for source, start, length, view_start in segments]
    except KeyError as e:
        raise ValueError(f"no request id for layout source {e.args[0]}") from None


def _row_view(segments: Sequence[Segment], queries: Sequence[Query], source_ids: Mapping[int, str]) -> RowView:
    return RowView(tuple(_segs([(s.source, s.start, s.length, s.view_start) for s in segments], source_ids)),
                   _runs([(q.natural, q.view) for q in queries]))


def _check_sorted(segments: Sequence[Seg]) -> None:
    end = 0
    for _, start, length, view_start in segments:
        assert start >= 0 and length > 0 and view_start >= end, segments
        end = view_start + length


_COMMON_LEN = attrgetter("common")  # WorkerPass.common

# Per group state, its shared start (prompt and committed steps) named by request id and checked, as of its last
# commit: (the layout's tuple, the names used, the named segments). Named once a commit, not once a step.
_NAMED_STARTS: WeakKeyDictionary[GroupState, tuple[tuple[SegmentTuple, ...], dict[int, str], list[Seg]]] = (
    WeakKeyDictionary())


def _named_common(state: GroupState, base: list[SegmentTuple], source_ids: Mapping[int, str]) -> tuple[Seg, ...]:
    """A pass's common sequence ``base`` named by request id and checked (sorted, no overlap)."""
    start = state.shared_start()
    kept = _NAMED_STARTS.get(state)
    if kept is None or kept[0] is not start or kept[1] != source_ids:
        kept = (start, dict(source_ids), _segs(start, source_ids))
        _check_sorted(kept[2])
        _NAMED_STARTS[state] = kept
    k = len(start)
    if len(base) < k or tuple(base[:k]) != start:  # not this state's plans of this pass: name it all
        named = _segs(base, source_ids)
        _check_sorted(named)
    else:
        named = kept[2] + _segs(base[k:], source_ids)
        _check_sorted(named[k - 1:])
    return tuple(named)


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
        # The chunk's queries, at their own positions, as one run (not token by token: a chunk may be all of C)
        prompt_views = [RowView(tuple(_segs([(PROMPT, 0, end, 0)], source_ids)),
                                (QueryRun(start, start, end - start),))]
        glue = state.glue_views()
        if end == state.prompt_len and glue:
            glue_views = [_row_view(segs, qs, source_ids) for segs, qs in glue]
            if name(GLUE) == name(PROMPT):  # one request holds C then the glue: one row, one view per piece
                prompt_views += glue_views
            else:
                rows.append(RowPlan(name(GLUE), tuple(glue_views)))
        rows.insert(0, RowPlan(name(PROMPT), tuple(prompt_views)))
    else:
        plans = state.plan_pass() if plans is None else plans
        if len(plans) != len(state.workers):
            raise ValueError(f"expected {len(state.workers)} worker plans, got {len(plans)}")
        # The views' common sequence, named and checked once: every row's plan holds the same object.
        longest = max(plans, key=_COMMON_LEN)
        base = longest.view[: longest.common]
        common = _named_common(state, base, source_ids)
        for w, plan in enumerate(plans):
            if not plan.positions:
                raise ValueError(f"worker {w} feeds no token in this pass")
            n = plan.common if plan.view[: plan.common] == base[: plan.common] else 0
            row = tuple.__new__(RowView, (common[:n] + tuple(_segs(plan.view[n:], source_ids)),
                                          _runs(plan.positions)))
            rows.append(RowPlan(name(w), (row,), common, n))
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


def _tensor(values: array) -> torch.Tensor:
    """An int32 array as a tensor over the same memory (which the tensor keeps alive)."""
    assert values.typecode == "i" and values.itemsize == 4
    return torch.frombuffer(values, dtype=torch.int32) if values else torch.empty(0, dtype=torch.int32)


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

    sources = _Sources(meta, {rid: (r, lens[r]) for rid, r in index.items()}, num_reqs)
    out = _TableBuilder(sources)
    for r, rid in enumerate(batch_req_ids):
        q_len, end = qsl[r + 1] - qsl[r], lens[r]
        plan = rows.get(rid)
        if plan is None:
            out.add_plain(r, q_len, end)
        elif plan.views[0].queries[0].natural + q_len != end or out.add_plan(plan, rid) != q_len:
            raise StaleStepError(f"row {r} ({rid!r}) is scheduled for {q_len} tokens ending at position {end}, but "
                                 f"its plan has {plan.num_queries} queries from position {plan.first_natural}")
    if len(out.query_view) != qsl[num_reqs] - qsl[0]:
        raise StaleStepError(f"the rows hold {len(out.query_view)} query tokens, query_start_loc says "
                             f"{qsl[num_reqs] - qsl[0]}")
    table = out.table(device)
    if not sources.extra:
        return table, block_table
    return table, torch.cat([block_table[:num_reqs], sources.block_rows(block_table)])


def _position_pairs(natural: int, view: int, count: int) -> array:
    """(natural + k, view + k) for k < count, flat, built by slices (a prompt chunk has thousands)."""
    pairs = array("i", bytes(8 * count))
    pairs[0::2] = array("i", range(natural, natural + count))
    pairs[1::2] = array("i", range(view, view + count))
    return pairs


class _TableBuilder:
    """A SegmentTable's int32 arrays, filled row by row, then one tensor each over the same memory: a decode step
    has a few dozen tokens and a few hundred segments, where every small torch op costs more than the loop, and
    building the tensors from Python lists would cost as much again."""

    def __init__(self, sources: _Sources) -> None:
        self.sources = sources
        self.segs = array("i")  # flat: (row, start, length, view_start) a segment
        self.offsets = array("i", [0])
        self.query_view = array("i")  # per query token, in batch order: its view
        self.query_pos = array("i")  # flat: (natural, view position) a query token
        self.commons: dict[int, array] = {}  # id(plan.common) -> its segments mapped: once for a group's rows

    def add_plain(self, row: int, q_len: int, seq_len: int) -> None:
        """A row outside groups: its own tokens, causal, delta 0."""
        self.segs.fromlist([row, 0, seq_len, 0])
        self.offsets.append(len(self.segs) >> 2)
        self.query_view.extend(repeat(len(self.offsets) - 2, q_len))
        first = seq_len - q_len
        self.query_pos.extend(_position_pairs(first, first, q_len))

    def add_plan(self, plan: RowPlan, reader: str) -> int:
        """A group row's views, its sources mapped; returns how many query tokens it added."""
        segs, offsets, query_view, query_pos = self.segs, self.offsets, self.query_view, self.query_pos
        mapped = self.sources.mapped
        added = len(query_view)
        n = plan.common_len
        for segments, queries in plan.views:
            if n:
                common = self.commons.get(id(plan.common))
                if common is None:
                    common = self.commons[id(plan.common)] = array("i", mapped(plan.common, reader))
                segs.extend(common[: 4 * n])
                segments, n = segments[n:], 0
            segs.fromlist(mapped(segments, reader))
            view = len(offsets) - 1
            offsets.append(len(segs) >> 2)
            for natural, view_pos, count in queries:
                if count == 1:  # decode
                    query_view.append(view)
                    query_pos.fromlist([natural, view_pos])
                else:
                    query_view.extend(repeat(view, count))
                    query_pos.extend(_position_pairs(natural, view_pos, count))
        return len(query_view) - added

    def table(self, device: torch.device | str) -> SegmentTable:
        return SegmentTable(
            segments=_tensor(self.segs).view(-1, 4).to(device),  # [S, 4]
            view_offsets=_tensor(self.offsets).to(device),  # [V + 1]
            query_view=_tensor(self.query_view).to(device),  # [T]
            query_pos=_tensor(self.query_pos).view(-1, 2).to(device),  # [T, 2]
        )


class _Sources:
    """Where :func:`build_table` finds each request a row reads: its batch row, or an extra block-table row
    (appended in order of first use) for a request in ``meta.extra_blocks``."""

    def __init__(self, meta: HogwildStepMeta | None, where: dict[str, tuple[int, int]], num_reqs: int) -> None:
        self.meta = meta
        self.where = where  # request id -> (table row, tokens it holds)
        self.num_reqs = num_reqs
        self.extra: list[str] = []

    def extra_row(self, rid: str, reader: str) -> tuple[int, int]:
        if self.meta is None or rid not in self.meta.extra_blocks:
            raise StaleStepError(f"{reader} reads {rid!r}, which is neither in the batch nor in extra_blocks")
        self.extra.append(rid)
        # its length is not sent: the op bounds-checks reads against its blocks
        self.where[rid] = (self.num_reqs + len(self.extra) - 1, sys.maxsize)
        return self.where[rid]

    def mapped(self, segments: Iterable[Seg], reader: str) -> list[int]:
        """Segments as flat (row, start, length, view_start) ints."""
        out: list[int] = []
        where = self.where
        for source_id, start, length, view_start in segments:
            try:
                row, held = where[source_id]
            except KeyError:
                row, held = self.extra_row(source_id, reader)
            if start + length > held:
                raise StaleStepError(f"{reader} reads tokens {start}..{start + length - 1} of {source_id!r}, "
                                     f"which holds {held}")
            out += (row, start, length, view_start)
        return out

    def block_rows(self, block_table: torch.Tensor) -> torch.Tensor:
        """[E, max_blocks]: the extra rows' block ids, zero-padded to the table's width, on its device."""
        assert self.meta is not None
        width = block_table.shape[1]
        flat = array("i")
        for rid in self.extra:
            blocks = self.meta.extra_blocks[rid]
            if len(blocks) > width:
                raise StaleStepError(f"{rid!r} has {len(blocks)} blocks, the block table holds {width} per row")
            flat.fromlist(list(blocks))
            flat.frombytes(bytes(4 * (width - len(blocks))))
        return _tensor(flat).view(-1, width).to(block_table.dtype).to(block_table.device)


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
