"""Hogwild groups inside the real vLLM engine (CPU build) against the reference engine, token for token.

One engine run (a subprocess) holds every batch; the reference engine computes its side in this process while the
engine runs. Greedy decoding on the tiny qwen2 model, ``max_tokens`` 256 per worker. The tiny model ends lines
with single newline tokens and never writes the answer marker chosen here, so the templates use a one-newline step
separator (steps commit often) and the groups run to their budget.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from vllm_scripts.launch import GroupBatches

from hogwild_vllm.config import GroupConfig
from hogwild_vllm.prompt import HFCodec, banned_token_ids, build_prompt_ids
from hogwild_vllm.testing.tiny_models import build_tiny_model

pytestmark = [pytest.mark.engine, pytest.mark.slow, pytest.mark.timeout(1800)]  # the fixture runs both engines

LAYOUTS = ("combined", "interleaved", "contiguous")
WORKERS = (1, 2, 3, 4)
MAX_TOKENS = 256
MAX_MODEL_LEN = 2048  # a worker's view holds every worker's tokens: 4 x 256 plus prompt and headers
TEMPLATES = {"step_separator": "\n", "answer_marker": "ANSWER{", "finisher_suffix": "\nSo the final ANSWER{"}
PLAIN = ["Hello there. We start", "The sum of 3 and 4 is", "**Bob [2]:** we", "x" * 120]
MIXED = ((2, "combined", {}), (3, "interleaved", {}), (4, "contiguous", {}),
         (2, "combined", {"temperature": 0.9, "seed": 7}))  # seeded sampling: reproducible, batch-independent
CHOICES_BATCH = 5 + len(MIXED)
CHOICE_GROUPS = (("combined", 2), ("interleaved", 3))  # as one choice per worker (n = workers)


def options(workers: int, layout: str, max_tokens: int = MAX_TOKENS, **extra: Any) -> dict[str, Any]:
    return {"workers": workers, "layout": layout, "max_tokens": max_tokens, "templates": TEMPLATES, **extra}


class Runs:
    """The engine's results per batch and the reference engine's per group."""

    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        from transformers import AutoTokenizer

        from hogwild_vllm.reference_engine import ReferenceEngine

        self.model = str(build_tiny_model("qwen2"))
        tok = AutoTokenizer.from_pretrained(self.model)
        self.codec = HFCodec(tok)

        def group_item(n: int, layout: str, problem: str, **kw: Any) -> dict[str, Any]:
            opts = options(n, layout, **kw)
            ids = build_prompt_ids(tok, problem, GroupConfig.from_dict(opts))
            return {"prompt_token_ids": ids, "hogwild": opts}

        self.groups = [group_item(n, lay, f"Problem {n}-{lay}: what is {n} + 3? Explain.")
                       for lay in LAYOUTS for n in WORKERS]
        self.finisher = group_item(2, "combined", "Say the answer.", max_tokens=24, finisher=True,
                                   finisher_max_tokens=12)
        self.plain = [{"prompt_token_ids": self.codec.encode(p), "max_tokens": 24} for p in PLAIN]
        # N = 1 (contiguous) is ordinary decoding of prompt + intro with the banned tokens masked.
        one = self.groups[LAYOUTS.index("contiguous") * len(WORKERS)]
        cfg = GroupConfig.from_dict(one["hogwild"])
        intro = self.codec.encode(cfg.templates.intro_text(cfg.worker_names[0]))
        reference = ReferenceEngine(self.model)
        self.banned = banned_token_ids(tok, cfg, reference.eos_ids)
        self.n1_plain = {"prompt_token_ids": one["prompt_token_ids"] + intro, "max_tokens": MAX_TOKENS - len(intro),
                         "ignore_eos": True, "logit_bias": {str(b): -100.0 for b in self.banned}}
        self.mixed = [{**group_item(n, lay, f"Mixed {n}: name {n} colours.", max_tokens=48), **sampling}
                      for n, lay, sampling in MIXED]
        # Collaboration checks due every 48 generated tokens, custom worker names.
        self.checks = group_item(3, "combined", "Check each other.", max_tokens=128, collab_check_every=48,
                                 worker_names=["Ann", "Ben", "Cid"])
        self.too_long = group_item(2, "combined", "Too long.", max_tokens=MAX_MODEL_LEN)
        # The same groups as in batch 0, asked for as n choices: greedy as temperature 0 (workers left out: they
        # default to n) and as temperature 1 with top_k 1 (workers given).
        first, second = (self.groups[LAYOUTS.index(lay) * len(WORKERS) + WORKERS.index(n)] for lay, n in CHOICE_GROUPS)
        self.choices = [
            {**first, "hogwild": {k: v for k, v in first["hogwild"].items() if k != "workers"}, "n": 2},
            {**second, "n": 3, "temperature": 1.0, "top_k": 1},
        ]
        batches = [
            self.groups + self.plain + [self.finisher, self.checks],  # 0: everything at once
            self.plain,  # 1
            [self.n1_plain],  # 2
            self.mixed + self.plain,  # 3: the mixed batch
            [self.too_long, self.plain[0]],  # 4
            *[[g] for g in self.mixed],  # 5, ...: each mixed group alone
            [*self.choices, self.plain[0]],  # CHOICES_BATCH
        ]
        self.engine = GroupBatches(tmp_path_factory.mktemp("groups"), self.model, batches,
                                   {"max_model_len": MAX_MODEL_LEN})
        ref_groups = [*self.groups, self.finisher, self.checks]  # in lockstep: one reference pass for all
        self.reference = reference.generate_many([g["prompt_token_ids"] for g in ref_groups],
                                                 [GroupConfig.from_dict(g["hogwild"]) for g in ref_groups])
        self.engine.wait()

    def outputs(self, batch: int) -> list[dict[str, Any]]:
        return self.engine.outputs(batch)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(tmp_path_factory)


def group_result(output: dict[str, Any]) -> dict[str, Any]:
    params = output["kv_transfer_params"]
    assert params and "hogwild" in params, output
    return params["hogwild"]


@pytest.mark.parametrize("index", range(len(LAYOUTS) * len(WORKERS)),
                         ids=[f"{lay}-N{n}" for lay in LAYOUTS for n in WORKERS])
def test_group_equals_reference_engine(runs: Runs, index: int):
    got = group_result(runs.outputs(0)[index])
    ref = runs.reference[index]
    for w_got, w_ref in zip(got["workers"], ref.workers, strict=True):
        assert w_got["name"] == w_ref.name
        tokens = w_got["token_ids"]
        first = next((i for i, (a, b) in enumerate(zip(tokens, w_ref.token_ids, strict=False)) if a != b), None)
        assert tokens == w_ref.token_ids, f"{w_ref.name}: first difference at own token {first}"
        assert w_got["forced"] == w_ref.forced
    assert got["transcript"] == ref.transcript
    assert got["answer"] == ref.answer and got["finish_reason"] == ref.finish_reason == "length"
    assert got["banned_token_ids"] == ref.banned_token_ids
    assert got["usage"]["forward_passes"] == ref.usage.forward_passes
    assert got["usage"]["generated_tokens"] == ref.usage.generated_tokens
    # Enough work to mean something: every worker reached the budget's neighbourhood, steps were committed.
    assert all(len(w["token_ids"]) >= MAX_TOKENS - 1 for w in got["workers"]) or any(
        len(w["token_ids"]) >= MAX_TOKENS for w in got["workers"])
    if got["config"]["layout"] != "contiguous":
        headers = sum(w["forced"].count(True) > 0 for w in got["workers"])
        commits = got["transcript"].count("]:**") - headers
        assert commits >= 2 * got["config"]["workers"], got["transcript"][:500]


def test_parent_output_is_the_transcript(runs: Runs):
    for out in runs.outputs(0)[: len(runs.groups)]:
        result = group_result(out)
        assert out["finish_reason"] == "length"
        assert runs.codec.decode(out["token_ids"]) == result["transcript"]


def test_n1_equals_plain_greedy(runs: Runs):
    n1 = group_result(runs.outputs(0)[LAYOUTS.index("contiguous") * len(WORKERS)])
    plain = runs.outputs(2)[0]["token_ids"]
    sampled = [t for t, f in zip(n1["workers"][0]["token_ids"], n1["workers"][0]["forced"], strict=True) if not f]
    assert not set(plain) & set(runs.banned), "the plain run emitted a banned token: the comparison is void"
    assert sampled == plain


def test_plain_requests_unchanged_by_groups_in_the_batch(runs: Runs):
    alone = [o["token_ids"] for o in runs.outputs(1)]
    assert all(len(ids) == 24 for ids in alone)
    assert [o["token_ids"] for o in runs.outputs(0)[len(runs.groups): len(runs.groups) + len(PLAIN)]] == alone
    assert [o["token_ids"] for o in runs.outputs(3)[len(MIXED):]] == alone


def test_mixed_batch_equals_each_run_alone(runs: Runs):
    together = runs.outputs(3)[: len(MIXED)]
    for k, out in enumerate(together):
        alone = runs.outputs(5 + k)[0]
        assert group_result(out)["workers"] == group_result(alone)["workers"]
        assert out["token_ids"] == alone["token_ids"]
        assert len(group_result(out)["workers"]) == MIXED[k][0]


def test_seeded_sampling_differs_from_greedy(runs: Runs):
    sampled, greedy = group_result(runs.outputs(3)[3]), group_result(runs.outputs(3)[0])
    assert sampled["config"]["workers"] == greedy["config"]["workers"] == 2
    assert sampled["workers"] != greedy["workers"]  # same problem text class, other tokens: sampling happened


def test_collaboration_checks_and_names_equal_reference(runs: Runs):
    got = group_result(runs.outputs(0)[-1])
    ref = runs.reference[-1]
    assert [w["token_ids"] for w in got["workers"]] == [w.token_ids for w in ref.workers]
    assert [w["name"] for w in got["workers"]] == ["Ann", "Ben", "Cid"]
    question = GroupConfig().templates.check_question.strip()
    assert question in got["transcript"]  # a forced check question appeared, equally in both engines
    assert got["transcript"] == ref.transcript


def test_finisher_equals_reference(runs: Runs):
    got = group_result(runs.outputs(0)[-2])
    ref = runs.reference[-2]
    assert ref.finisher_text is not None and ref.usage.finisher_tokens > 0
    assert got["finisher_text"] == ref.finisher_text
    assert got["answer"] == ref.answer
    assert got["usage"]["finisher_tokens"] == ref.usage.finisher_tokens
    assert [w["token_ids"] for w in got["workers"]] == [w.token_ids for w in ref.workers]


def test_group_too_long_for_the_engine_is_refused_before_it_runs(runs: Runs):
    got = runs.engine.batches[4]
    assert "outputs" not in got and got["error"]["type"] == "VLLMValidationError", got
    assert f"exceeds max_model_len {MAX_MODEL_LEN}" in got["error"]["message"]
    assert runs.outputs(5)  # the engine goes on serving


def test_one_choice_per_worker_equals_reference(runs: Runs):
    outs = runs.outputs(CHOICES_BATCH)
    for out, (layout, n) in zip(outs, CHOICE_GROUPS, strict=False):
        ref = runs.reference[LAYOUTS.index(layout) * len(WORKERS) + WORKERS.index(n)]
        choices = out["choices"]
        assert [c["token_ids"] for c in choices] == [w.token_ids for w in ref.workers]
        assert [c["text"] for c in choices] == [runs.codec.decode(w.token_ids) for w in ref.workers]
        assert {c["finish_reason"] for c in choices} == {"length"}
        for c in choices:
            summary = json.loads(c["stop_reason"])["hogwild"]
            assert summary["transcript"] == ref.transcript and summary["finish_reason"] == "length"
        assert [w["token_ids"] for w in group_result(out)["workers"]] == [w.token_ids for w in ref.workers]
    assert outs[-1]["token_ids"] == runs.outputs(1)[0]["token_ids"]  # a plain request beside them
