"""The reference engine: one worker equals plain transformers greedy decoding; N workers' logits equal dense
attention over each worker's materialized view of the stored K/V; finisher; stop rules on a real model."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from hogwild_vllm.config import GroupConfig, Layout, Templates
from hogwild_vllm.ops.reference import (
    SegmentTable,
    dense_view_attention_reference,
    materialize_views_reference,
)
from hogwild_vllm.reference_engine import PassRecord, ReferenceEngine
from hogwild_vllm.testing.tiny_models import build_tiny_model

PROBLEM = "Tom has 3 apples and buys 4 more. How many apples does he have?"
# An answer marker the tiny models never write, so runs last their whole budget.
NO_ANSWER = Templates(answer_marker="\\neveranswered{")
# The tiny models write paragraph breaks as two "\n" tokens; a one-newline separator makes steps commit often, so
# views hold history, headers and collaboration checks.
STEPPY = Templates(answer_marker="\\neveranswered{", step_separator="\n")
ENGINE_KINDS = ("qwen2", "llama3", "glm4")
LOGIT_ATOL = 2e-4  # fp32: paged op vs dense oracle, after a whole forward pass


def dense_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                    block_tables: torch.Tensor, table: SegmentTable, rope, scale: float) -> torch.Tensor:
    """Same signature as the paged op: materialize each view, re-rotate keys to view positions, dense softmax."""
    out = torch.zeros(query.shape[0], query.shape[1], value_cache.shape[-1])  # [T, Hq, Dv]
    views = materialize_views_reference(key_cache, value_cache, block_tables, table)
    qv = table.query_view.long()
    for v, dense in enumerate(views):
        rows = (qv == v).nonzero().squeeze(1)  # [Tv]
        if rows.numel() == 0:
            continue
        pos = table.query_pos[rows].long()  # [Tv, 2]
        o, _ = dense_view_attention_reference(query[rows], pos[:, 0], pos[:, 1], dense.keys, dense.values,
                                              dense.natural_pos, dense.view_pos, rope, scale)
        out[rows] = o
    return out.to(query.dtype)


@pytest.fixture(scope="module", params=ENGINE_KINDS)
def model_path(request):
    return build_tiny_model(request.param)


@pytest.fixture(scope="module")
def engines(model_path):
    return ReferenceEngine(model_path), ReferenceEngine(model_path, attention=dense_attention, block_size=32)


def test_one_worker_equals_plain_greedy(model_path, engines):
    paged, _ = engines
    cfg = GroupConfig(workers=1, layout=Layout.CONTIGUOUS, max_tokens=48, templates=NO_ANSWER)
    out = paged.generate(PROBLEM, cfg)
    intro = [t for t, f in zip(out.workers[0].token_ids, out.workers[0].forced, strict=True) if f]
    assert out.workers[0].forced == [True] * len(intro) + [False] * (48 - len(intro))

    hf = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32, attn_implementation="eager")
    hf.eval()
    ids = torch.tensor([out.prompt_token_ids + intro])
    gen = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=48 - len(intro),
                      bad_words_ids=[[t] for t in out.banned_token_ids], eos_token_id=None, pad_token_id=0)
    expected = gen[0, ids.shape[1]:].tolist()
    assert out.workers[0].token_ids[len(intro):] == expected
    assert out.finish_reason == "length"


@pytest.mark.parametrize("layout", list(Layout))
@pytest.mark.parametrize("workers", [2, 3, 4])
def test_logits_equal_dense_views(engines, layout, workers):
    paged, dense = engines
    cfg = GroupConfig(workers=workers, layout=layout, max_tokens=48, collab_check_every=30, templates=STEPPY)
    got: list[PassRecord] = []
    want: list[PassRecord] = []
    out = paged.generate(PROBLEM, cfg, record=got)
    ref = dense.generate(PROBLEM, cfg, record=want)
    assert [w.token_ids for w in out.workers] == [w.token_ids for w in ref.workers]
    assert len(got) == len(want) == out.usage.forward_passes - 1
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a.logits, b.logits, atol=LOGIT_ATOL, rtol=0)
        assert torch.equal(a.table.segments, b.table.segments)
    if layout.has_steps:  # steps were committed: headers beyond the intro were forced
        intro = len(paged.codec.encode(cfg.templates.intro_text(cfg.worker_names[0])))
        assert max(out.usage.forced_tokens) > intro + 4
    # The views grew: every worker read its peers' tokens (the combined/contiguous views hold them).
    last = got[-1].table
    assert last.num_views == workers
    if layout is not Layout.INTERLEAVED:
        for v in range(workers):
            rows = {seg[0] for seg in last.view_segments(v)}
            assert len(rows) >= workers, rows  # prompt row + every worker's row (+ glue row)


def test_groups_in_lockstep_equal_each_group_alone(engines):
    """generate_many feeds several groups per forward pass; each reads only its own rows."""
    paged, _ = engines
    cfgs = [GroupConfig(workers=2, layout=Layout.COMBINED, max_tokens=40, templates=STEPPY),
            GroupConfig(workers=3, layout=Layout.INTERLEAVED, max_tokens=24, templates=STEPPY),
            GroupConfig(workers=1, layout=Layout.CONTIGUOUS, max_tokens=32, templates=NO_ANSWER)]
    prompts = [paged.codec.encode(f"Problem {k}: what is {k} + 4?") for k in range(3)]
    together = paged.generate_many(prompts, cfgs, temperature=0.8, seeds=[5, 6, 7])
    for prompt, cfg, seed, got in zip(prompts, cfgs, [5, 6, 7], together, strict=True):
        alone = paged.generate(prompt_ids=prompt, cfg=cfg, temperature=0.8, seed=seed)
        assert [w.token_ids for w in got.workers] == [w.token_ids for w in alone.workers]
        assert got.usage == alone.usage and got.transcript == alone.transcript
    with pytest.raises(ValueError, match="one prompt"):
        paged.generate_many(prompts[:2], cfgs)


def test_sampling_is_seeded(engines):
    paged, _ = engines
    cfg = GroupConfig(workers=2, max_tokens=24, templates=NO_ANSWER)
    a = paged.generate(PROBLEM, cfg, temperature=1.0, top_p=0.9, seed=7)
    b = paged.generate(PROBLEM, cfg, temperature=1.0, top_p=0.9, seed=7)
    c = paged.generate(PROBLEM, cfg, temperature=1.0, top_p=0.9, seed=8)
    assert [w.token_ids for w in a.workers] == [w.token_ids for w in b.workers]
    assert [w.token_ids for w in a.workers] != [w.token_ids for w in c.workers]


def test_banned_tokens_never_sampled(engines):
    paged, _ = engines
    out = paged.generate(PROBLEM, GroupConfig(workers=3, max_tokens=40, templates=NO_ANSWER), temperature=1.5)
    banned = set(out.banned_token_ids)
    assert banned  # eos, end-of-turn, header start
    for w in out.workers:
        assert not any(t in banned for t, f in zip(w.token_ids, w.forced, strict=True) if not f)


def test_finisher_is_plain_greedy_over_transcript(model_path, engines):
    paged, _ = engines
    cfg = GroupConfig(workers=2, max_tokens=30, finisher=True, finisher_max_tokens=12, templates=NO_ANSWER)
    out = paged.generate(PROBLEM, cfg)
    assert out.finisher_text is not None and 1 <= out.usage.finisher_tokens <= 12
    suffix = cfg.templates.finisher_suffix
    ids = out.prompt_token_ids + paged.codec.encode(out.transcript + suffix)
    hf = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32, attn_implementation="eager")
    x = torch.tensor([ids])
    gen = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=12,
                      eos_token_id=None, pad_token_id=0)[0, x.shape[1]:].tolist()
    assert paged.codec.decode(gen[: out.usage.finisher_tokens]) == out.finisher_text
