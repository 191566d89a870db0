"""``group.py`` without vLLM: a group's sizing and fit check against an engine's limits, pass-0 chunking, the
all-rows-or-none step plan, forced tokens owed to the runner, and each worker's live report."""

from __future__ import annotations

import random

import pytest
from test_layout import CharCodec

from hogwild_vllm.config import GroupConfig
from hogwild_vllm.group import EngineLimits, Group, cdiv, fit_problems, pass0_end, size_group
from hogwild_vllm.layout import GroupState

TEMPLATES = {"step_separator": "\n", "answer_marker": "ANSWER{", "system_prompt": "Team {names}."}


def make_group(workers: int = 3, prompt_len: int = 50, max_tokens: int = 40, **options) -> Group:
    cfg = GroupConfig.from_dict({"workers": workers, "max_tokens": max_tokens, "templates": TEMPLATES, **options})
    codec = CharCodec()
    state = GroupState(cfg, prompt_len, codec)
    size = size_group(cfg, state, codec, block_size=16)
    return Group(cfg, list(range(prompt_len)), state, [], size, "g::prompt", [f"g::w{w}" for w in range(workers)])


def test_sizing_counts_the_shared_prompt_once():
    g = make_group(workers=3, prompt_len=50, max_tokens=40)
    header = len(g.cfg.templates.header_text("Alice", 41, True))  # one token a character
    longest_intro = max(len(log.tokens) for log in g.state.workers)
    assert g.size.tmax == max(40, longest_intro) + header + 1
    glue = len(g.state.glue_tokens)
    # The prompt request's blocks (C + glue), then each worker's blocks past C's full ones (shared).
    assert g.size.blocks == cdiv(50 + glue, 16) + 3 * (cdiv(50 + g.size.tmax, 16) - 50 // 16)
    assert g.size.rows == 3 and g.size.longest_view == g.state.longest_view(g.size.tmax)


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
