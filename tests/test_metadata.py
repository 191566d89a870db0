"""The per-step payload for the vLLM path (hogwild_vllm.metadata): plan_rows, HogwildStepMeta, build_table.

A small simulated scheduler drives a GroupState through pass 0 (the prompt in chunks, then the glue) and decode
passes with commits, storing every request the way vLLM does (worker 0 holds the prompt, workers 1.. share its full
prompt blocks, the glue request holds the glue). Each step, build_table over a shuffled batch that mixes plain rows
and group rows (the glue request absent after pass 0, read through extra_blocks) must give the same views as
segment_table over the layout's views with a direct source -> row map, and the same attention numerically.
"""

from __future__ import annotations

import pickle
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import pytest
import torch

from hogwild_vllm.config import GroupConfig, Layout, Templates
from hogwild_vllm.layout import GLUE, PROMPT, GroupState, Query, Segment
from hogwild_vllm.metadata import (
    HogwildStepMeta,
    PlainRun,
    QueryRun,
    RowPlan,
    RowView,
    Seg,
    StaleStepError,
    build_table,
    plain_runs,
    plain_segment_table,
    plan_rows,
    segment_table,
    source_names,
    unscheduled_sources,
)
from hogwild_vllm.ops.reference import SegmentTable, hogwild_attention_reference


class Chars:
    """One token per character (id = code point)."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(map(chr, ids))


CODEC = Chars()
TEMPLATES = Templates(intro="{name}1:", step_header="{name}{step}:", check_question="(c)", others_header="<O>",
                      unfinished_marker="~", own_header="<M>", step_separator="\n")
PROMPT_LEN = 11
CHUNKS = [(0, 4), (4, 9), (9, PROMPT_LEN)]
BLOCK = 4
HEADS, KV_HEADS, HEAD_SIZE = 4, 2, 8


class Rope:
    """Plain RoPE (neox pairing, base 10000) by a delta, fp64 angles: a test double of DeltaRope."""

    head_size = rotary_dim = HEAD_SIZE
    is_neox_style = True

    def rotate(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        inv = 10000.0 ** -(torch.arange(0, HEAD_SIZE, 2, dtype=torch.float64) / HEAD_SIZE)  # [D/2]
        angle = delta.double()[:, None] * inv  # [T, D/2]
        cos, sin = angle.cos().float()[:, None], angle.sin().float()[:, None]  # [T, 1, D/2]
        x1, x2 = x.float().chunk(2, dim=-1)  # [T, H, D/2] each
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), -1).to(x.dtype)


# ---- a tiny vLLM-like store: requests, shared prompt blocks, a NaN-filled paged cache ----------------------------


@dataclass
class Store:
    """Paged K/V of every request. Slots never written hold NaN, so reading one poisons the output."""

    rng: random.Random
    num_blocks: int = 400
    pool: list[int] = field(default_factory=list)
    blocks: dict[str, list[int]] = field(default_factory=dict)
    key: torch.Tensor = field(init=False)
    value: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.pool = list(range(1, self.num_blocks))  # block 0 is vLLM's null block: never handed out
        self.rng.shuffle(self.pool)
        self.key = torch.full((self.num_blocks, BLOCK, KV_HEADS, HEAD_SIZE), float("nan"))
        self.value = torch.full((self.num_blocks, BLOCK, KV_HEADS, HEAD_SIZE), float("nan"))

    def add(self, rid: str, share: Sequence[int] = ()) -> None:
        self.blocks[rid] = list(share)

    def write(self, rid: str, pos: int, kv: tuple[torch.Tensor, torch.Tensor]) -> None:
        row = self.blocks[rid]
        while len(row) <= pos // BLOCK:
            row.append(self.pool.pop())
        self.key[row[pos // BLOCK], pos % BLOCK], self.value[row[pos // BLOCK], pos % BLOCK] = kv

    def table(self, rids: Sequence[str], width: int = 24) -> torch.Tensor:
        out = torch.zeros(len(rids), width, dtype=torch.int32)
        for r, rid in enumerate(rids):
            out[r, : len(self.blocks[rid])] = torch.tensor(self.blocks[rid], dtype=torch.int32)
        return out


@dataclass
class Step:
    """One step of one group: the payload rows, the same step as layout views/queries, and the tokens written."""

    rows: dict[str, RowPlan]
    views: list[list[Segment]]
    queries: list[list[Query]]
    owners: list[str]  # request id whose queries each view holds
    written: list[tuple[int, int]]  # (layout source, natural) of every token computed in this step


def script(w: int) -> str:
    return ("ab" * (w + 1) + ".\n") * 20  # worker w ends a step every 2w + 4 tokens


def group_steps(state: GroupState, names: dict[int, str], decode_passes: int) -> Iterator[Step]:
    """Pass 0 in CHUNKS (glue with the last chunk), then decode passes with scripted samples (commits happen)."""
    for start, end in CHUNKS:
        rows = plan_rows(state, names, pass0_chunk=(start, end))
        views = [[Segment(PROMPT, 0, end, 0)]]
        queries = [[Query(i, i) for i in range(start, end)]]
        written = [(PROMPT, i) for i in range(start, end)]
        owners = [names[PROMPT]]
        if end == state.prompt_len:
            for segs, qs in state.glue_views():
                views.append(segs)
                queries.append(qs)
                owners.append(names[GLUE])
                written += [(GLUE, q.natural) for q in qs]
        yield Step(rows, views, queries, owners, written)
    for k in range(decode_passes):
        plans = state.plan_pass()
        rows = plan_rows(state, names, plans=plans)
        written = [(w, q.natural) for w, p in enumerate(plans) for q in p.queries]
        yield Step(rows, [p.segments for p in plans], [p.queries for p in plans], [names[w] for w in range(len(plans))],
                   written)
        state.mark_fed()
        state.on_sampled([CODEC.encode(script(w)[k])[0] for w in range(len(plans))])


def describe(table: SegmentTable, row_names: Sequence[str], owners: Sequence[str]) -> list[tuple]:
    """Every view as (owner, segments with row names, queries), sorted: equal iff equal up to row renaming."""
    out = []
    for v in range(table.num_views):
        tokens = (table.query_view == v).nonzero().squeeze(1).tolist()
        owner = {owners[t] for t in tokens}
        assert len(owner) <= 1, owner
        segs = tuple((row_names[s], start, length, vs) for s, start, length, vs in table.view_segments(v))
        out.append((owner.pop() if owner else None, segs, tuple(map(tuple, table.query_pos[tokens].tolist()))))
    return sorted(out)


def make_state(layout: str, workers: int) -> GroupState:
    cfg = GroupConfig(workers=workers, layout=layout, worker_names=tuple("ABCD"[:workers]), templates=TEMPLATES,
                      collab_check_every=0, max_tokens=500)
    return GroupState(cfg, PROMPT_LEN, CODEC)


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- the main check ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", [m.value for m in Layout])
@pytest.mark.parametrize("workers", [1, 2, 3, 4])
def test_build_table_equals_direct_segment_table(layout: str, workers: int) -> None:
    rng = random.Random(f"{layout}-{workers}")
    torch.manual_seed(rng.randrange(2**31))
    state = make_state(layout, workers)
    worker_ids = [f"7-ab::w{w}" for w in range(workers)]
    prompt_id = "7-ab::prompt"
    names = source_names(state, worker_ids, prompt_id)
    store = Store(rng)
    store.add(prompt_id)
    direct = Store(rng)  # reference-engine style: one row per layout source, no sharing
    direct_rows = {PROMPT: "prompt", GLUE: "glue", **{w: f"w{w}" for w in range(workers)}}
    for name in direct_rows.values():
        direct.add(name)
    kv = {}  # (request id, natural) -> (key, value); the prompt and the glue live in the prompt request
    query_vec = {}  # (request id, natural) -> query
    shared_added = False
    plain_count = 0
    for step_no, step in enumerate(group_steps(state, names, decode_passes=14)):
        # Store this step's group tokens in both layouts (vLLM writes every K/V before attention runs). Once the
        # prompt is complete, the workers share the prompt request's full prompt blocks.
        for source, natural in sorted(step.written, key=lambda t: t[0] != PROMPT):
            if source >= 0 and not shared_added:
                full = store.blocks[prompt_id][: PROMPT_LEN // BLOCK]
                for rid in worker_ids:
                    store.add(rid, share=full)
                shared_added = True
            rid = names[source]
            kv[rid, natural] = (torch.randn(KV_HEADS, HEAD_SIZE), torch.randn(KV_HEADS, HEAD_SIZE))
            query_vec[rid, natural] = torch.randn(HEADS, HEAD_SIZE)
            store.write(rid, natural, kv[rid, natural])
            direct.write(direct_rows[source], natural, kv[rid, natural])
        # The runner's batch: this step's group rows and fresh plain rows, shuffled.
        plain = []
        for _ in range(rng.randrange(0, 4)):
            rid, plain_count = f"plain{plain_count}", plain_count + 1
            length = rng.randrange(1, 30)
            q_len = rng.randrange(1, length + 1)
            store.add(rid)
            for n in range(length):
                kv[rid, n] = (torch.randn(KV_HEADS, HEAD_SIZE), torch.randn(KV_HEADS, HEAD_SIZE))
                query_vec[rid, n] = torch.randn(HEADS, HEAD_SIZE)
                store.write(rid, n, kv[rid, n])
            plain.append((rid, q_len, length))
        batch = [(rid, row.num_queries, row.first_natural + row.num_queries) for rid, row in step.rows.items()]
        batch += plain
        rng.shuffle(batch)
        batch_ids = [rid for rid, _, _ in batch]
        qsl = [0]
        for _, q_len, _ in batch:
            qsl.append(qsl[-1] + q_len)
        seq_lens = [length for _, _, length in batch]
        extra = {rid: tuple(store.blocks[rid]) for rid in unscheduled_sources(step.rows)}
        if step_no >= len(CHUNKS):
            assert list(extra) == [prompt_id]  # decode passes: the prompt (and glue) is read, never scheduled
        else:
            assert not extra
        meta = HogwildStepMeta(step.rows, extra)
        meta = pickle.loads(pickle.dumps(meta))  # what the worker process receives
        block_table = store.table(batch_ids)
        table, bt = build_table(meta, batch_ids, torch.tensor(qsl, dtype=torch.int32),
                                torch.tensor(seq_lens, dtype=torch.int32), block_table, "cpu")

        # Same views as the direct table, up to row renaming.
        owners = [rid for rid, q_len, _ in batch for _ in range(q_len)]
        extra_names = []
        for row in bt[len(batch_ids):]:
            (match,) = [rid for rid, blocks in extra.items() if row[: len(blocks)].tolist() == list(blocks)]
            extra_names.append(match)
        built = describe(table, batch_ids + extra_names, owners)
        group_views = [v for v in built if v[0] in step.rows]
        names_by_direct_row = [names.get(s, "-") for s in direct_rows]
        direct_index = {s: i for i, s in enumerate(direct_rows)}
        want = segment_table(step.views, step.queries, direct_index.__getitem__)
        direct_owners = [o for o, qs in zip(step.owners, step.queries, strict=True) for _ in qs]
        assert group_views == describe(want, names_by_direct_row, direct_owners)
        # Plain rows: exactly plain_segment_table's views.
        plain_ids = [rid for rid, _, _ in plain]
        plain_qsl = [0]
        for _, q_len, _ in plain:
            plain_qsl.append(plain_qsl[-1] + q_len)
        plain_want = plain_segment_table(torch.tensor(plain_qsl, dtype=torch.int32),
                                         torch.tensor([n for _, _, n in plain], dtype=torch.int32), plain_qsl[-1])
        plain_owners = [rid for rid, q_len, _ in plain for _ in range(q_len)]
        assert [v for v in built if v[0] not in step.rows] == describe(plain_want, plain_ids, plain_owners)

        # Numerically: attention over the built table == attention over the direct table (NaN slots never read).
        rope, scale = Rope(), HEAD_SIZE**-0.5
        q_batch = torch.stack([query_vec[rid, seq - q_len + i] for rid, q_len, seq in batch for i in range(q_len)])
        out = hogwild_attention_reference(q_batch, store.key, store.value, bt, table, rope, scale)
        assert isinstance(out, torch.Tensor) and not out.isnan().any()
        direct_q = [(o, q.natural) for o, qs in zip(step.owners, step.queries, strict=True) for q in qs]
        want_out = hogwild_attention_reference(torch.stack([query_vec[k] for k in direct_q]), direct.key,
                                               direct.value, direct.table(list(direct_rows.values())), want,
                                               rope, scale)
        assert isinstance(want_out, torch.Tensor)
        got = dict(zip([(o, int(p[0])) for o, p in zip(owners, table.query_pos.tolist(), strict=True)], out,
                       strict=True))
        for key, row in zip(direct_q, want_out, strict=True):
            torch.testing.assert_close(got[key], row, rtol=1e-5, atol=1e-5)
        if plain:
            plain_out = hogwild_attention_reference(
                torch.stack([query_vec[rid, n - q_len + i] for rid, q_len, n in plain for i in range(q_len)]),
                store.key, store.value, store.table(plain_ids), plain_want, rope, scale)
            for (rid, n), row in zip([(rid, n - q + i) for rid, q, n in plain for i in range(q)], plain_out,
                                     strict=True):
                torch.testing.assert_close(got[rid, n], row, rtol=1e-5, atol=1e-5)
    if state.cfg.layout.has_steps:
        assert len(state.history) >= 2, state.history  # the views held committed steps and headers


# ---- shapes of the payload ---------------------------------------------------------------------------------------


def test_pass0_rows_and_glue_pieces() -> None:
    state = make_state("combined", 2)
    names = source_names(state, ["w0", "w1"], "g")
    first = plan_rows(state, names, pass0_chunk=(0, 4))
    assert first == {"g": RowPlan("g", (RowView((Seg("g", 0, 4, 0),), (QueryRun(0, 0, 4),)),))}
    last = plan_rows(state, names, pass0_chunk=(4, PROMPT_LEN))
    assert set(last) == {"g"}  # the rest of the prompt, then the glue pieces, in one row
    row = last["g"]
    assert len(row.views) == 4  # the prompt chunk; others header, unfinished marker, own header
    assert row.num_queries == PROMPT_LEN - 4 + len(state.glue_tokens)
    assert row.views[2] == RowView((Seg("g", 0, PROMPT_LEN, 0), Seg("g", PROMPT_LEN + 3, 1, PROMPT_LEN)),
                                   (QueryRun(PROMPT_LEN + 3, PROMPT_LEN, 1),))
    assert unscheduled_sources(last) == []
    # A glue held by another request than the prompt gets its own row.
    split = plan_rows(state, {**names, GLUE: "glue"}, pass0_chunk=(4, PROMPT_LEN))
    assert set(split) == {"g", "glue"} and split["glue"].num_queries == len(state.glue_tokens)
    decode = plan_rows(state, names)
    assert set(decode) == {"w0", "w1"} and unscheduled_sources(decode) == ["g"]
    assert decode["w1"].first_natural == PROMPT_LEN  # the intro is worker 1's first scheduled token
    with pytest.raises(ValueError, match="chunk"):
        plan_rows(state, names, pass0_chunk=(3, 3))
    with pytest.raises(ValueError, match="also a worker's"):
        source_names(state, ["w0", "w1"], "w1")


def test_header_after_commit_is_a_second_query_run() -> None:
    state = make_state("combined", 2)
    names = source_names(state, ["w0", "w1"], "g")
    for text in ["x", ".", "\n"]:  # worker 0 ends its step with "\n"
        state.mark_fed()
        state.on_sampled([ord(text), ord("y")])
    (view,) = plan_rows(state, names)["w0"].views
    # "\n" is now in the history, the forced header "A2:" in the own step: two runs with different deltas.
    assert len(view.queries) == 2 and view.queries[0].length == 1 and view.queries[1].length == 3
    assert view.queries[1].natural == view.queries[0].natural + 1 and view.queries[1].view > view.queries[0].view


def test_payload_pickles_small() -> None:
    state = make_state("combined", 4)
    names = source_names(state, [f"1-abcdef::w{w}" for w in range(4)], "1-abcdef::prompt")
    for k in range(40):
        state.mark_fed()
        state.on_sampled([ord(script(w)[k]) for w in range(4)])
    rows = plan_rows(state, names)
    meta = HogwildStepMeta(rows, {"1-abcdef::prompt": tuple(range(3))}, {"1-abcdef::w0": (65, 50, 58)})
    data = pickle.dumps(meta)
    back = pickle.loads(data)
    assert back == meta
    for plan in back.rows.values():  # the compact wire form comes back as the named types
        assert type(plan) is RowPlan and all(type(v) is RowView for v in plan.views)
        assert all(type(s) is Seg for v in plan.views for s in v.segments)
        assert all(type(q) is QueryRun for v in plan.views for q in v.queries)
        assert plan.num_queries == meta.rows[plan.request_id].num_queries
    assert len(data) < 2500, len(data)
    chunk = plan_rows(make_state("contiguous", 1), {PROMPT: "p", GLUE: "p", 0: "w0"}, pass0_chunk=(0, PROMPT_LEN))
    assert len(pickle.dumps(HogwildStepMeta(chunk))) < 500  # a prompt chunk is one query run, whatever its size


def test_rows_share_one_common_sequence_through_commits_and_pickling() -> None:
    """A pass's rows hold one common object (named once, kept from the last commit), equal to naming each view
    from scratch; after pickling, still one object and the same views."""
    state = make_state("combined", 4)
    names = source_names(state, [f"g::w{w}" for w in range(4)], "g::prompt")
    for k in range(30):
        plans = state.plan_pass()
        rows = plan_rows(state, names, plans=plans)
        assert len({id(row.common) for row in rows.values()}) == 1
        for w, plan in enumerate(plans):
            row = rows[names[w]]
            (view,) = row.views
            assert view.segments == tuple(Seg(names[s.source], s.start, s.length, s.view_start)
                                          for s in plan.segments)
            assert row.common_len == plan.common and view.segments[: plan.common] == row.common[: plan.common]
        back = pickle.loads(pickle.dumps(HogwildStepMeta(rows, {"g::prompt": (1, 2)})))
        assert len({id(row.common) for row in back.rows.values()}) == 1
        for rid, row in rows.items():
            assert back.rows[rid].views == row.views and back.rows[rid].common_len == row.common_len
        state.mark_fed()
        state.on_sampled([ord(script(w)[k]) for w in range(4)])
    assert len(state.history) >= 4
    # Other request ids for the same state and pass: nothing named with the first ids comes back.
    other = source_names(state, [f"h::w{w}" for w in range(4)], "h::prompt")
    plans = state.plan_pass()
    plan_rows(state, names, plans=plans)
    rows = plan_rows(state, other, plans=plans)
    assert {s.source_id for row in rows.values() for s in row.views[0].segments} <= set(other.values())


def test_row_plan_invariants() -> None:
    own = (Seg("a", 0, 5, 0),)
    RowPlan("a", (RowView(own, (QueryRun(3, 3, 2),)),))
    with pytest.raises(AssertionError, match="not own keys"):
        RowPlan("a", (RowView(own, (QueryRun(3, 2, 2),)),))  # wrong view position
    with pytest.raises(AssertionError, match="not own keys"):
        RowPlan("b", (RowView(own, (QueryRun(3, 3, 2),)),))  # queries of another request
    with pytest.raises(AssertionError):
        RowPlan("a", (RowView(own, (QueryRun(0, 0, 2), QueryRun(3, 3, 1))),))  # a gap in the naturals
    with pytest.raises(AssertionError):
        RowPlan("a", (RowView((Seg("b", 0, 3, 0), Seg("a", 0, 5, 2)), (QueryRun(4, 6, 1),)),))  # overlap
    with pytest.raises(AssertionError):
        HogwildStepMeta({"x": RowPlan("a", (RowView(own, (QueryRun(3, 3, 2),)),))})
    common = (Seg("b", 0, 3, 0), Seg("a", 0, 5, 3))
    RowPlan("a", (RowView(common, (QueryRun(4, 7, 1),)),), common, 1)
    with pytest.raises(AssertionError, match="common part"):
        RowPlan("a", (RowView(common[1:], (QueryRun(4, 7, 1),)),), common, 1)  # does not start with it
    with pytest.raises(AssertionError):  # an overlap right after the common part is still found
        RowPlan("a", (RowView((common[0], Seg("a", 0, 5, 2)), (QueryRun(4, 6, 1),)),), common, 1)


# ---- stale or mismatched steps -----------------------------------------------------------------------------------


def _decode_meta() -> tuple[HogwildStepMeta, list[str], list[int], list[int], torch.Tensor]:
    state = make_state("combined", 2)
    names = source_names(state, ["w0", "w1"], "g")
    for k in range(3):
        state.mark_fed()
        state.on_sampled([ord(script(w)[k]) for w in range(2)])
    meta = HogwildStepMeta(plan_rows(state, names), {"g": (5, 6, 7)})
    ids = ["p", "w1", "w0"]
    n1, n0 = meta.rows["w1"].num_queries, meta.rows["w0"].num_queries
    qsl = [0, 2, 2 + n1, 2 + n1 + n0]
    lens = [9, meta.rows["w1"].first_natural + n1, meta.rows["w0"].first_natural + n0]
    return meta, ids, qsl, lens, torch.arange(30, dtype=torch.int32).reshape(3, 10)


def test_good_step_extends_the_block_table() -> None:
    meta, ids, qsl, lens, bt = _decode_meta()
    table, out = build_table(meta, ids, qsl, lens, bt)
    assert out.shape == (4, 10) and out[3].tolist() == [5, 6, 7] + [0] * 7 and torch.equal(out[:3], bt)
    assert table.view_segments(0) == [(0, 0, 9, 0)] and table.num_tokens == qsl[-1]
    plain_only, same = build_table(None, ["p"], [0, 2], [9], bt[:1])
    assert same is bt[:1] or torch.equal(same, bt[:1])
    want = plain_segment_table(torch.tensor([0, 2]), torch.tensor([9]), 2)
    assert all(torch.equal(a, b) for a, b in zip(
        (plain_only.segments, plain_only.view_offsets, plain_only.query_view, plain_only.query_pos),
        (want.segments, want.view_offsets, want.query_view, want.query_pos), strict=True))


@pytest.mark.parametrize("case", ["count", "length", "absent", "no_blocks", "short_lens", "too_many_blocks"])
def test_stale_step_is_refused(case: str) -> None:
    meta, ids, qsl, lens, bt = _decode_meta()
    if case == "count":  # the runner scheduled one token more than the plan
        qsl = [*qsl[:-1], qsl[-1] + 1]
        lens = [*lens[:-1], lens[-1] + 1]
        match = "scheduled for"
    elif case == "length":  # same count, but the request is one token further on
        lens = [*lens[:-1], lens[-1] + 1]
        match = "scheduled for"
    elif case == "absent":  # a planned row is missing from the batch
        ids, qsl, lens = ids[:2], qsl[:3], lens[:2]
        match = "not in the batch"
    elif case == "no_blocks":
        meta = HogwildStepMeta(meta.rows, {})
        match = "neither in the batch nor in extra_blocks"
    elif case == "short_lens":  # a peer row in the batch holds fewer tokens than a view reads
        meta = HogwildStepMeta({"w0": meta.rows["w0"]}, {**meta.extra_blocks, "w1": (1,)})
        ids, qsl, lens = ["w1", "w0"], [0, 1, 1 + meta.rows["w0"].num_queries], [PROMPT_LEN, lens[2]]
        match = "which holds"
    else:
        meta = HogwildStepMeta(meta.rows, {"g": tuple(range(11))})
        match = "blocks"
    with pytest.raises(StaleStepError, match=match):
        build_table(meta, ids, qsl, lens, bt)


@pytest.mark.parametrize("layout", ["combined", "interleaved", "contiguous"])
def test_plain_runs_are_plain_rows_and_the_prompt_chunk_of_c(layout: str) -> None:
    """Rows outside groups are plain whole; the prompt request's chunk of C is plain (not its glue tokens, which
    follow in the same row); worker rows never are."""
    state = make_state(layout, 2)
    names = source_names(state, ["g::w0", "g::w1"], "g::prompt")
    glue = len(state.glue_tokens)
    chunk = plan_rows(state, names, pass0_chunk=(0, 5))
    runs = plain_runs(HogwildStepMeta(rows=chunk), ["p", "g::prompt"], [0, 3, 8], [10, 5])
    assert runs == [PlainRun(0, 0, 3, 10), PlainRun(1, 3, 5, 5)]
    last = plan_rows(state, names, pass0_chunk=(5, PROMPT_LEN))
    total = PROMPT_LEN + glue
    runs = plain_runs(HogwildStepMeta(rows=last), ["g::prompt", "p"], [0, total - 5, total - 4], [total, 7])
    assert runs == [PlainRun(0, 0, PROMPT_LEN - 5, PROMPT_LEN), PlainRun(1, total - 5, 1, 7)]
    workers = plan_rows(state, names)
    counts = [workers[name].num_queries for name in ("g::w0", "g::w1")]
    qsl = [0, counts[0], counts[0] + 2, counts[0] + 2 + counts[1]]
    lens = [workers["g::w0"].first_natural + counts[0], 9, workers["g::w1"].first_natural + counts[1]]
    runs = plain_runs(HogwildStepMeta(rows=workers), ["g::w0", "p", "g::w1"], qsl, lens)
    assert runs == [PlainRun(1, counts[0], 2, 9)]
    assert plain_runs(None, ["a", "b"], [0, 0, 4], [6, 4]) == [PlainRun(1, 0, 4, 4)]  # a row without queries: none
