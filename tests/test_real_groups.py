"""Hogwild groups on a real model (SmolLM2-135M-Instruct, fp32) inside vLLM, against the reference engine.

The default templates throughout (ChatML prompt, "\\n\\n" steps after punctuation, "\\boxed{" answers), 256 tokens
per worker, greedy. One engine run (a subprocess) holds the batches; the reference engine computes its side in
this process meanwhile, with the compiled position-delta op for its attention (the pure-torch op would take most of
an hour over 30 layers; the compiled op is checked against that oracle on random inputs in test_attention_ops.py,
and the tiny-model engine tests compare vLLM with the pure reference). So this test checks what a real model adds:
its tokenizer, its steps and its 30 layers through vLLM's scheduler, cache and backend.
Marked ``real_model``: ``-m "not real_model"`` skips it.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
from vllm_scripts.launch import GroupBatches

from hogwild_vllm.config import GroupConfig, Layout
from hogwild_vllm.ops import hogwild_attention
from hogwild_vllm.prompt import HFCodec, banned_token_ids, build_prompt_ids

pytestmark = [pytest.mark.real_model, pytest.mark.engine, pytest.mark.slow, pytest.mark.timeout(1800)]

MAX_TOKENS = 256
CASES = [(n, layout) for n in (2, 4) for layout in Layout]
PROBLEMS = {2: "A farmer has 17 sheep and buys 25 more, then sells 9. How many sheep are left?",
            4: "Four friends share 96 stickers equally, then each gives 5 to a sister. How many does each keep?"}


def forced_runs(forced: list[bool]) -> int:
    """How many forced pieces (the intro, then one header per committed step) a worker's tokens hold."""
    return sum(1 for i, f in enumerate(forced) if f and (i == 0 or not forced[i - 1]))


class Runs:
    def __init__(self, model: Path, tmp: Path) -> None:
        from transformers import AutoTokenizer

        from hogwild_vllm.reference_engine import ReferenceEngine

        tok = AutoTokenizer.from_pretrained(str(model))
        codec = HFCodec(tok)
        self.groups = []
        for n, layout in CASES:
            opts = {"workers": n, "layout": layout.value, "max_tokens": MAX_TOKENS}
            ids = build_prompt_ids(tok, PROBLEMS[n], GroupConfig.from_dict(opts))
            self.groups.append({"prompt_token_ids": ids, "hogwild": opts})
        # A group of one (contiguous: no steps) is ordinary greedy decoding of prompt + intro, banned tokens masked.
        one_opts = {"workers": 1, "layout": "contiguous", "max_tokens": MAX_TOKENS}
        one_cfg = GroupConfig.from_dict(one_opts)
        one_ids = build_prompt_ids(tok, PROBLEMS[2], one_cfg)
        self.one = {"prompt_token_ids": one_ids, "hogwild": one_opts}
        reference = ReferenceEngine(str(model), attention=functools.partial(hogwild_attention, impl="ext"))
        intro = codec.encode(one_cfg.templates.intro_text(one_cfg.worker_names[0]))
        banned = banned_token_ids(tok, one_cfg, reference.eos_ids)
        self.plain = {"prompt_token_ids": one_ids + intro, "max_tokens": MAX_TOKENS - len(intro), "ignore_eos": True,
                      "logit_bias": {str(b): -100.0 for b in banned}}
        self.intro = len(intro)
        self.engine = GroupBatches(tmp, str(model), [self.groups, [self.one, self.plain]], {"max_model_len": 2048})
        self.reference = reference.generate_many([g["prompt_token_ids"] for g in self.groups],  # one pass for all
                                                 [GroupConfig.from_dict(g["hogwild"]) for g in self.groups])
        self.engine.wait()

    def outputs(self, batch: int) -> list[dict[str, Any]]:
        return self.engine.outputs(batch)


@pytest.fixture(scope="module")
def runs(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(smollm2_path, tmp_path_factory.mktemp("real-groups"))


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"{lay.value}-N{n}" for n, lay in CASES])
def test_group_equals_reference_engine(runs: Runs, index: int) -> None:
    got = runs.outputs(0)[index]["kv_transfer_params"]["hogwild"]
    ref = runs.reference[index]
    for w_got, w_ref in zip(got["workers"], ref.workers, strict=True):
        assert w_got["name"] == w_ref.name
        assert w_got["token_ids"] == w_ref.token_ids, w_got["name"]
        assert w_got["forced"] == w_ref.forced
    assert got["transcript"] == ref.transcript and got["answer"] == ref.answer
    assert got["finish_reason"] == ref.finish_reason
    assert got["usage"]["forward_passes"] == ref.usage.forward_passes
    n, layout = CASES[index]
    if layout.has_steps:  # real text, real steps: the workers committed several beyond their intros
        commits = sum(forced_runs(w["forced"]) - 1 for w in got["workers"])
        assert commits >= 2, got["transcript"]


def test_group_of_one_equals_plain_greedy(runs: Runs) -> None:
    group, plain = runs.outputs(1)
    worker = group["kv_transfer_params"]["hogwild"]["workers"][0]
    assert worker["forced"] == [True] * runs.intro + [False] * (len(worker["forced"]) - runs.intro)
    sampled = worker["token_ids"][runs.intro:]
    assert plain["token_ids"][: len(sampled)] == sampled
    if group["kv_transfer_params"]["hogwild"]["finish_reason"] == "length":
        assert len(sampled) == MAX_TOKENS - runs.intro
