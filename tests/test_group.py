"""``group.py`` without vLLM: a group's sizing and fit check against an engine's limits, pass-0 chunking, the
all-rows-or-none step plan, forced tokens owed to the runner, and each worker's live report."""

from __future__ import annotations

import random

import pytest
from test_layout import CharCodec

from hogwild_vllm.config import GroupConfig
from hogwild_vllm.group import (
    EngineLimits,
    Group,
    cdiv,
    engine_state,
    fit_problems,
    pass0_end,
    size_group,
    worker_log_start,
)
from hogwild_vllm.layout import GroupState

TEMPLATES = {"step_separator": "\n", "answer_marker": "ANSWER{", "system_prompt": "Team {names}."}


def make_group(workers: int = 3, prompt_len: int = 50, max_tokens: int = 40, **options) -> Group:
    cfg = GroupConfig.from_dict({"workers": workers, "max_tokens": max_tokens, "templates": TEMPLATES, **options})
    codec = CharCodec()
    state = engine_state(cfg, prompt_len, codec, block_size=16)
    size = size_group(cfg, state, codec, block_size=16)
    return Group(cfg, list(range(prompt_len)), state, [], size, "g::prompt", [f"g::w{w}" for w in range(workers)])


def test_sizing_counts_the_shared_prompt_once():
    g = make_group(workers=3, prompt_len=50, max_tokens=40)
    header = len(g.cfg.templates.header_text("Alice", 41, True))  # one token a character
    longest_intro = max(len(log.tokens) for log in g.state.workers)
    assert g.size.tmax == max(40, longest_intro) + header + 1
    glue = len(g.state.glue_tokens)
    # The prompt request's blocks (C + glue), then each worker's own blocks from the boundary after C (C's blocks,
    # the partial last one included, shared).
    assert g.size.log_start == g.state.log_start == 64
    assert g.size.blocks == cdiv(50 + glue, 16) + 3 * cdiv(g.size.tmax, 16)
    assert g.size.rows == 3 and g.size.longest_view == g.state.longest_view(g.size.tmax)


@pytest.mark.parametrize("prompt_len", [1, 15, 16, 17, 50, 64, 200])
@pytest.mark.parametrize("workers", [1, 2, 5])
def test_blocks_are_unique_tokens_plus_one_partial_block_a_log(prompt_len, workers):
    g = make_group(workers=workers, prompt_len=prompt_len, max_tokens=37)
    slots = prompt_len + len(g.state.glue_tokens) + workers * g.size.tmax  # every token slot the group reserves
    # Whole blocks of those slots, plus at most one partial block for C + glue and one for each worker log.
    assert g.size.blocks <= slots // 16 + 1 + workers
    assert g.size.blocks >= cdiv(slots, 16)
    assert g.size.log_start % 16 == 0 and 0 <= g.size.log_start - prompt_len < 16
    assert g.state.plan_pass()[0].positions[0][0] == g.size.log_start  # worker 0's first own token (its intro)


def test_worker_log_start_is_the_next_block_boundary():
    assert [worker_log_start(p, 16) for p in (1, 15, 16, 17, 32, 33)] == [16, 16, 16, 32, 32, 48]
    assert worker_log_start(3400, 128) == 3456 and worker_log_start(1024, 128) == 1024


def test_sizing_refuses_logs_off_the_engine_boundary():
    cfg = GroupConfig.from_dict({"workers": 2, "max_tokens": 10, "templates": TEMPLATES})
    with pytest.raises(ValueError, match="not at the block boundary 64"):
        size_group(cfg, GroupState(cfg, 50, CharCodec()), CharCodec(), block_size=16)
    with pytest.raises(ValueError, match="inside the 50-token prompt"):
        GroupState(cfg, 50, CharCodec(), log_start=49)


def test_fit_problems_name_each_limit():
    g = make_group(workers=4, prompt_len=50, max_tokens=40)
    roomy = EngineLimits(max_model_len=4096, block_size=16, total_blocks=1000, max_rows=8, token_budget=2048)
    assert fit_problems(g.cfg, 50, g.size, roomy) == []
    tight = EngineLimits(max_model_len=100, block_size=16, total_blocks=5, max_rows=2, token_budget=10)
    text = " | ".join(fit_problems(g.cfg, 50, g.size, tight))
    for needle in ("exceeds max_model_len 100", "a worker's view can reach", "the whole cache has 5",
                   "max_num_seqs is 2", "max_num_batched_tokens is 10"):
        assert needle in text


@pytest.mark.parametrize(("done", "avail", "want"), [(0, 100, 50), (0, 30, 30), (10, 43, 50), (10, 42, 49),
                                                     (49, 4, 50), (49, 3, 49), (0, 0, 0)])
def test_pass0_end_keeps_the_glue_with_the_last_chunk(done, avail, want):
    # 50 prompt tokens, 3 glue tokens: the last chunk carries the glue, so it needs room for both.
    assert pass0_end(done, 50, 3, avail) == want


def test_plan_is_all_rows_or_none_and_reports_every_token():
    g = make_group(workers=3, prompt_len=50, max_tokens=30)
    glue = len(g.state.glue_tokens)
    first = g.plan(avail=20)
    assert first is not None and not first.decode and first.counts == {"g::prompt": 20}
    assert g.plan(avail=10) is not None and g.prompt_done == 30  # another chunk; the glue waits for the last
    last = g.plan(avail=1000)
    assert last is not None and last.counts == {"g::prompt": 20 + glue} and not g.in_pass0
    rng = random.Random(0)
    text = "We add.\nThen more.\n"
    k = 0
    streamed: list[list[int]] = [[] for _ in range(3)]
    while not g.state.finished:
        need = sum(len(log.tokens) - log.fed for log in g.state.workers)
        assert g.plan(avail=need - 1) is None  # too little room: the whole group sits the step out
        plan = g.plan(avail=need)
        assert plan is not None and plan.decode and plan.tokens == need and set(plan.rows) == set(g.worker_ids)
        gained = g.on_sampled([ord(text[(k + w) % len(text)]) for w in range(3)])
        k += 1
        for w, wid in enumerate(g.worker_ids):
            forced = g.take_forced(wid)
            assert gained[w][1:] == list(forced or ())  # the sampled token, then any forced header
            if rng.random() < 0.7:  # a client reads its stream at its own pace: nothing is lost or repeated
                streamed[w] += g.take_report(w)
    for w, log in enumerate(g.state.workers):
        streamed[w] += g.take_report(w)
        assert streamed[w] == log.tokens and g.take_report(w) == []
    assert g.plan(avail=1000) is None  # finished
    assert g.passes == 3 + k
