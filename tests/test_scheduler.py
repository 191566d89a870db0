"""HogwildScheduler driven in-process without a model: a fake runner answers every step, so the invariants of
gang scheduling (all of a group's rows or none), budgets, admission, block accounting and the parent outputs are
checked at every step, quickly. The token values are irrelevant here (the engine tests check the outputs)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402
from vllm.engine.arg_utils import EngineArgs  # noqa: E402
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.v1.core.sched.output import SchedulerOutput  # noqa: E402
from vllm.v1.engine import FinishReason  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec  # noqa: E402
from vllm.v1.outputs import ModelRunnerOutput  # noqa: E402
from vllm.v1.request import Request, RequestStatus  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402

import hogwild_vllm  # noqa: E402
from hogwild_vllm.config import CHOICES_KEY  # noqa: E402
from hogwild_vllm.scheduler import CHILD_SEP, HogwildScheduler  # noqa: E402
from hogwild_vllm.testing.tiny_models import build_tiny_model  # noqa: E402

BLOCK = 16
TEMPLATES = {"step_separator": "\n", "answer_marker": "ANSWER{", "system_prompt": "Team {names}."}


@pytest.fixture(scope="module")
def tiny() -> str:
    hogwild_vllm.register()
    return str(build_tiny_model("qwen2"))


@pytest.fixture(autouse=True)
def v1_runner_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VLLM_USE_V2_MODEL_RUNNER", raising=False)


def make_scheduler(model: str, num_blocks: int, batched: int = 256, seqs: int = 8,
                   max_model_len: int = 512, prefix_caching: bool = False) -> HogwildScheduler:
    # Prefix caching needs requests made with a block hasher (``hashed``); the other tests' requests have none.
    args = EngineArgs(model=model, dtype="float32", max_model_len=max_model_len, block_size=BLOCK, max_num_seqs=seqs,
                      max_num_batched_tokens=batched, additional_config={"hogwild": {}},
                      enable_prefix_caching=prefix_caching)
    config = args.create_engine_config()
    config.cache_config.num_gpu_blocks = num_blocks
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=32, dtype=torch.float32)
    kv = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["l0"], spec)])
    return HogwildScheduler(config, kv, StructuredOutputManager(config), block_size=BLOCK)


def group_request(rid: str, prompt: list[int], **options: Any) -> Request:
    params = SamplingParams(temperature=0.0, max_tokens=1,
                            extra_args={"hogwild": {"templates": TEMPLATES, **options}})
    return Request(rid, prompt, params, None)


def plain_request(rid: str, prompt: list[int], max_tokens: int) -> Request:
    return Request(rid, prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens), None)


class FakeRunner:
    """Answers a step like the model runner: one token for every request whose scheduled tokens reach its end,
    none for a partial prefill chunk. Tokens cycle through a sentence and a newline, so steps commit."""

    def __init__(self, sched: HogwildScheduler) -> None:
        self.sched = sched
        codec = sched.codec
        self.cycle = codec.encode("We add the numbers.") + codec.encode("\n")
        self.count: dict[str, int] = {}  # tokens sampled per request: each one walks the cycle on its own

    def children(self) -> dict[str, Request]:
        return {c.request_id: c for g in self.sched._entries.values() for c in g.children()}

    def __call__(self, out: SchedulerOutput) -> ModelRunnerOutput:
        known = {**self.sched.requests, **self.children()}
        ids = list(out.num_scheduled_tokens)
        sampled = []
        for rid in ids:
            req = known[rid]
            if req.num_computed_tokens >= req.num_tokens:
                k = self.count.get(rid, 0)
                sampled.append([self.cycle[k % len(self.cycle)]])
                self.count[rid] = k + 1
            else:
                sampled.append([])
        return ModelRunnerOutput(req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
                                 sampled_token_ids=sampled)


def run(sched: HogwildScheduler, limit: int = 3000) -> Iterator[tuple[SchedulerOutput, dict]]:
    runner = FakeRunner(sched)
    for _ in range(limit):
        if not sched.has_requests():
            return
        out = sched.schedule()
        outputs = sched.update_from_output(out, runner(out))
        yield out, {o.request_id: o for eco in outputs.values() for o in eco.outputs}
    raise AssertionError("the scheduler did not drain")


def prompt_ids(sched: HogwildScheduler, text: str) -> list[int]:
    return sched.codec.encode(text)


def test_gang_rows_budgets_admission_and_blocks(tiny):
    sched = make_scheduler(tiny, num_blocks=90, batched=256, seqs=8)
    pool = sched.kv_cache_manager.block_pool
    free0 = pool.get_num_free_blocks()
    shapes = {"g2": (2, "combined"), "g3": (3, "interleaved"), "g4": (4, "contiguous")}
    for rid, (n, layout) in shapes.items():
        sched.add_request(group_request(rid, prompt_ids(sched, f"Problem {rid}: " + "add the numbers. " * 12),
                                        workers=n, layout=layout, max_tokens=40))
    for k in range(3):
        sched.add_request(plain_request(f"p{k}", prompt_ids(sched, "story " * 60), max_tokens=30))
    finished_children: set[str] = set()
    results: dict[str, Any] = {}
    admitted_first = None
    for out, outputs in run(sched):
        if admitted_first is None:
            admitted_first = sum(g.admitted for g in sched._entries.values())
        finished_children |= {r for r in out.finished_req_ids if CHILD_SEP in r}
        assert out.total_num_scheduled_tokens <= 256
        assert len(out.num_scheduled_tokens) <= 8
        assert not any(CHILD_SEP in r.request_id for r in sched.running)
        scheduled = {r for r in out.num_scheduled_tokens if CHILD_SEP in r}
        assert set(out.hogwild.rows) == scheduled
        for parent, (n, _) in shapes.items():
            mine = {r.split(CHILD_SEP)[1] for r in scheduled if r.split(CHILD_SEP)[0] == parent}
            workers = {f"w{w}" for w in range(n)}
            assert mine in (set(), {"prompt"}, workers), (parent, mine)
        results.update({rid: o for rid, o in outputs.items() if rid in shapes})
    assert admitted_first is not None and admitted_first < 3  # rows (2 + 3 + 4 > 8): one group had to wait
    assert set(results) == set(shapes)
    for rid, out in results.items():
        payload = out.kv_transfer_params["hogwild"]
        assert out.finish_reason == FinishReason.LENGTH and payload["finish_reason"] == "length"
        assert len(payload["workers"]) == shapes[rid][0]
        assert out.new_token_ids and payload["usage"]["forward_passes"] > 1
        if shapes[rid][1] != "contiguous":
            assert any(f for w in payload["workers"] for f in w["forced"][15:])  # headers forced after commits
    expected = {f"{p}{CHILD_SEP}w{w}" for p, (n, _) in shapes.items() for w in range(n)}
    assert expected <= finished_children
    assert pool.get_num_free_blocks() == free0
    assert sched.group_ids() == [] and not sched.requests


def test_group_waits_for_blocks_and_plain_requests_do_not_jump_the_queue(tiny):
    sched = make_scheduler(tiny, num_blocks=40, batched=512, seqs=8)
    pool = sched.kv_cache_manager.block_pool
    free0 = pool.get_num_free_blocks()
    sched.add_request(plain_request("early", prompt_ids(sched, "story " * 300), max_tokens=100))
    steps = run(sched)
    next(steps)  # "early" is running and holds most of the cache
    sched.add_request(group_request("g", prompt_ids(sched, "Count. " * 20), workers=2, max_tokens=64))
    sched.add_request(plain_request("late", prompt_ids(sched, "tale " * 20), max_tokens=10))
    waited, done = 0, []
    for _, outputs in steps:
        done += [rid for rid, o in outputs.items() if o.finish_reason is not None]
        if "g" in sched._entries and not sched._entries["g"].admitted:
            waited += 1
            assert "late" not in {r.request_id for r in sched.running}  # no overtaking while the group waits
    assert waited > 0 and sorted(done) == ["early", "g", "late"]
    assert pool.get_num_free_blocks() == free0


@pytest.mark.parametrize("steps", [0, 1, 6, 30])
def test_abort_at_any_stage_frees_every_block(tiny, steps):
    sched = make_scheduler(tiny, num_blocks=200, batched=160, max_model_len=1024)  # a view holds all 3 budgets
    pool = sched.kv_cache_manager.block_pool
    free0 = pool.get_num_free_blocks()
    prompt = prompt_ids(sched, "Think about it. " * 50)
    assert len(prompt) > 160  # pass 0 takes two steps
    sched.add_request(group_request("g", prompt, workers=3, max_tokens=100))
    sched.add_request(plain_request("p", prompt_ids(sched, "story " * 10), max_tokens=60))
    runner = FakeRunner(sched)
    for _ in range(steps):
        out = sched.schedule()
        sched.update_from_output(out, runner(out))
    if steps > 1:
        assert pool.get_num_free_blocks() < free0 - 1
    ended = sched.finish_requests("g", RequestStatus.FINISHED_ABORTED)
    assert [r.request_id for r in ended] == ["g"] and sched.group_ids() == []
    # The runner is told to drop exactly the children it was told about (after one step: the first prompt chunk).
    told = {"prompt"} if steps == 1 else {"prompt", "w0", "w1", "w2"} if steps > 1 else set()
    assert {r for r in sched.finished_req_ids if CHILD_SEP in r} == {f"g{CHILD_SEP}{c}" for c in told}
    outputs = [o for _, outs in run(sched) for o in outs.values()]
    assert [o.request_id for o in outputs if o.finish_reason is not None] == ["p"]
    assert pool.get_num_free_blocks() == free0


@pytest.mark.parametrize(("words", "gap"), [(5, 0), (8, 7)])  # 16 prompt tokens (C ends on a boundary), 25
def test_worker_logs_start_on_a_block_boundary_sharing_the_prompts_blocks(tiny, words, gap):
    """At admission the group takes exactly ``size.blocks``: each worker holds C's blocks (the prompt request's,
    its partial last one included) then blocks of its own from their first slot; its own tokens start at the
    boundary (the positions between C's end and it are never computed)."""
    sched = make_scheduler(tiny, num_blocks=200)
    pool = sched.kv_cache_manager.block_pool
    free0 = pool.get_num_free_blocks()
    prompt = prompt_ids(sched, "Add. " * words)
    sched.add_request(group_request("g", prompt, workers=3, max_tokens=40))
    runner = FakeRunner(sched)
    out = sched.schedule()
    entry = sched._entries["g"]
    g = entry.group
    assert g is not None and entry.admitted
    p, start = len(g.prompt), g.size.log_start
    assert start % BLOCK == 0 and start - p == gap
    assert free0 - pool.get_num_free_blocks() == g.size.blocks
    blocks = {c.request_id: [b.block_id for b in sched.kv_cache_manager.coordinator.single_type_managers[0]
                             .req_to_blocks[c.request_id]] for c in entry.children()}
    owner = blocks[g.prompt_id]
    assert len(owner) == -(-(p + len(g.state.glue_tokens)) // BLOCK)
    own: set[int] = set()
    for w, wid in enumerate(g.worker_ids):
        child = entry.workers[w]
        assert blocks[wid][: start // BLOCK] == owner[: start // BLOCK]
        assert len(blocks[wid]) == start // BLOCK + -(-g.size.tmax // BLOCK)
        own |= set(blocks[wid][start // BLOCK:])
        assert child.num_computed_tokens == start and child.all_token_ids[start:] == g.state.workers[w].tokens
    assert len(own) == 3 * -(-g.size.tmax // BLOCK) and not own & set(owner)  # no worker block is shared
    sched.update_from_output(out, runner(out))
    fed = dict.fromkeys(g.worker_ids, 0)
    for out, _ in run(sched):  # each worker row's queries sit where its request's positions are: start + fed
        for rid in set(out.hogwild.rows) & set(fed):
            assert out.hogwild.rows[rid].first_natural == start + fed[rid]
            fed[rid] += out.num_scheduled_tokens[rid]
    assert min(fed.values()) >= 39 and pool.get_num_free_blocks() == free0  # the last sample is never fed


def test_group_that_cannot_fit_gets_an_error_output(tiny):
    sched = make_scheduler(tiny, num_blocks=200)
    sched.add_request(group_request("big", prompt_ids(sched, "x " * 10), workers=2, max_tokens=600))
    sched.add_request(group_request("wide", prompt_ids(sched, "x " * 10), workers=16, max_tokens=20))
    outputs = {rid: o for _, outs in run(sched) for rid, o in outs.items()}
    assert outputs["big"].finish_reason == FinishReason.ERROR
    assert "exceeds max_model_len 512" in outputs["big"].kv_transfer_params["hogwild"]["error"]
    assert "max_num_seqs is 8" in outputs["wide"].kv_transfer_params["hogwild"]["error"]
    assert sched.group_ids() == []


def test_group_whose_views_outgrow_the_context_gets_an_error_output(tiny):
    """Each worker alone fits max_model_len, but a worker's view holds all workers' tokens: refused up front,
    never sent to the attention op, which would read outside the RoPE table."""
    sched = make_scheduler(tiny, num_blocks=200)
    prompt = prompt_ids(sched, "x " * 10)
    sched.add_request(group_request("wide", prompt, workers=4, max_tokens=150))
    sched.add_request(group_request("fits", prompt, workers=2, max_tokens=150))
    outputs = {rid: o for _, outs in run(sched) for rid, o in outs.items()}
    error = outputs["wide"].kv_transfer_params["hogwild"]["error"]
    assert outputs["wide"].finish_reason == FinishReason.ERROR and "a worker's view can reach" in error
    assert "exceeds max_model_len 512" in error and "a worker's budget" not in error
    assert outputs["fits"].finish_reason != FinishReason.ERROR


def test_pause_states_hold_groups_like_requests(tiny):
    from vllm.v1.core.sched.interface import PauseState

    sched = make_scheduler(tiny, num_blocks=200)
    runner = FakeRunner(sched)
    sched.add_request(group_request("running", prompt_ids(sched, "One. " * 5), workers=2, max_tokens=30))
    out = sched.schedule()
    sched.update_from_output(out, runner(out))
    sched.add_request(group_request("new", prompt_ids(sched, "Two. " * 5), workers=2, max_tokens=30))
    sched.set_pause_state(PauseState.PAUSED_ALL)
    out = sched.schedule()
    assert out.total_num_scheduled_tokens == 0 and not sched._entries["new"].admitted
    sched.update_from_output(out, runner(out))
    sched.set_pause_state(PauseState.PAUSED_NEW)
    out = sched.schedule()
    assert any(r.startswith("running" + CHILD_SEP) for r in out.num_scheduled_tokens)
    assert not sched._entries["new"].admitted
    sched.update_from_output(out, runner(out))
    sched.set_pause_state(PauseState.UNPAUSED)
    finished = {rid for _, outs in run(sched) for rid, o in outs.items() if o.finish_reason is not None}
    assert finished == {"running", "new"}


def test_a_broken_worker_pass_ends_only_that_group(tiny):
    """If the runner ever returned no token for a worker, the group ends with an error output; the engine and the
    other requests go on, and every block returns."""
    sched = make_scheduler(tiny, num_blocks=200)
    pool = sched.kv_cache_manager.block_pool
    free0 = pool.get_num_free_blocks()
    sched.add_request(group_request("bad", prompt_ids(sched, "One. " * 5), workers=2, max_tokens=30))
    sched.add_request(group_request("good", prompt_ids(sched, "Two. " * 5), workers=2, max_tokens=30))
    runner = FakeRunner(sched)
    outputs = {}
    for step in range(200):
        if not sched.has_requests():
            break
        out = sched.schedule()
        result = runner(out)
        if step == 3:  # a decode pass of both groups: drop one worker's token of "bad"
            result.sampled_token_ids[result.req_id_to_index[f"bad{CHILD_SEP}w1"]] = []
        for eco in sched.update_from_output(out, result).values():
            outputs.update({o.request_id: o for o in eco.outputs})
    assert outputs["bad"].finish_reason == FinishReason.ERROR
    assert "internal error" in outputs["bad"].kv_transfer_params["hogwild"]["error"]
    assert outputs["good"].finish_reason == FinishReason.LENGTH
    assert pool.get_num_free_blocks() == free0


def choice_requests(key: str, prompt: list[int], n: int, seed: int | None = None, **options: Any) -> list[Request]:
    """The n engine requests vLLM's frontend makes of a group request with ``n`` choices: ids ``"{i}_{key}"``,
    ``n = 1`` each, the seed ``seed + i``, the validator's choice count in ``extra_args``."""
    out = []
    for i in range(n):
        params = SamplingParams(temperature=0.0, max_tokens=1, seed=None if seed is None else seed + i,
                                extra_args={"hogwild": {"templates": TEMPLATES, **options}, CHOICES_KEY: n})
        out.append(Request(f"{i}_{key}", prompt, params, None))
    return out


def test_choices_wait_for_every_sibling_then_stream_each_worker(tiny):
    sched = make_scheduler(tiny, num_blocks=120)
    pool = sched.kv_cache_manager.block_pool
    free0 = pool.get_num_free_blocks()
    choices = choice_requests("q", prompt_ids(sched, "Add them. " * 6), 3, seed=10, max_tokens=40)
    runner = FakeRunner(sched)
    for request in choices[:2]:
        sched.add_request(request)
        out = sched.schedule()
        assert out.total_num_scheduled_tokens == 0  # not admitted until all three have arrived
        sched.update_from_output(out, runner(out))
        assert sched.get_num_unfinished_requests() == 1 and sched.group_ids() == []
    sched.add_request(choices[2])
    assert sched.group_ids() == ["q"]
    streamed: dict[str, list[int]] = {c.request_id: [] for c in choices}
    chunks: dict[str, int] = dict.fromkeys(streamed, 0)
    finals = {}
    seeds = None
    for _, outputs in run(sched):
        entry = sched._entries.get("q")
        if entry is not None and entry.workers:
            seeds = [w.sampling_params.seed for w in entry.workers]
        for rid, o in outputs.items():
            assert rid in streamed, rid  # only the clients are reported: never a hidden child
            streamed[rid] += o.new_token_ids
            chunks[rid] += 1
            if o.finish_reason is not None:
                finals[rid] = o
    assert seeds == [10, 11, 12]  # worker i samples with choice i's seed, as vLLM seeds n choices
    assert set(finals) == set(streamed)
    payload = finals["0_q"].kv_transfer_params["hogwild"]
    for w, c in enumerate(choices):
        o = finals[c.request_id]
        assert o.finish_reason == FinishReason.LENGTH and o.kv_transfer_params["hogwild"] == payload
        assert streamed[c.request_id] == payload["workers"][w]["token_ids"]  # every token, intro and headers
        assert chunks[c.request_id] > 10  # streamed step by step, not at the end
        summary = json.loads(o.stop_reason)["hogwild"]
        assert summary["transcript"] == payload["transcript"] and summary["usage"] == payload["usage"]
        assert "workers" not in summary
    assert pool.get_num_free_blocks() == free0 and not sched._client_key


@pytest.mark.parametrize("steps", [0, 5])
def test_aborting_a_choice_ends_the_whole_group(tiny, steps):
    sched = make_scheduler(tiny, num_blocks=120)
    pool = sched.kv_cache_manager.block_pool
    free0 = pool.get_num_free_blocks()
    for request in choice_requests("q", prompt_ids(sched, "Add them. " * 6), 2, max_tokens=60):
        sched.add_request(request)
    lone = choice_requests("r", prompt_ids(sched, "Still arriving."), 2, max_tokens=60)[0]
    sched.add_request(lone)
    runner = FakeRunner(sched)
    for _ in range(steps):
        out = sched.schedule()
        sched.update_from_output(out, runner(out))
    ended = sched.finish_requests(["1_q"], RequestStatus.FINISHED_ABORTED)
    assert sorted(r.request_id for r in ended) == ["0_q", "1_q"] and sched.group_ids() == []
    assert [r.request_id for r in sched.finish_requests(["0_r"], RequestStatus.FINISHED_ABORTED)] == ["0_r"]
    assert sched.get_num_unfinished_requests() == 0 and not sched._client_key
    assert [o for _, outs in run(sched) for o in outs.values()] == []
    assert pool.get_num_free_blocks() == free0


def test_choices_that_disagree_with_workers_end_with_an_error_each(tiny):
    sched = make_scheduler(tiny, num_blocks=120)
    for request in choice_requests("q", prompt_ids(sched, "Add."), 3, workers=2, max_tokens=20):
        sched.add_request(request)
    outputs = {rid: o for _, outs in run(sched) for rid, o in outs.items()}
    assert set(outputs) == {"0_q", "1_q", "2_q"}
    for o in outputs.values():
        assert o.finish_reason == FinishReason.ERROR
        assert "n=3 asks for one choice per worker" in o.kv_transfer_params["hogwild"]["error"]


def hashed(request: Request) -> Request:
    """The request as the engine core builds it with prefix caching on: with a block hasher."""
    from vllm.utils.hashing import sha256
    from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash

    init_none_hash(sha256)
    hasher = get_request_block_hasher(BLOCK, sha256)
    return Request(request.request_id, request.prompt_token_ids, request.sampling_params, None, block_hasher=hasher)


def test_groups_share_the_common_prompt_through_the_prefix_cache(tiny):
    """A second group with the same system prompt adopts the first group's cached blocks of C (computes only the
    rest), a plain request reads them too, and no block holding glue is ever shared."""
    sched = make_scheduler(tiny, num_blocks=200, max_model_len=1024, prefix_caching=True)
    pool = sched.kv_cache_manager.block_pool
    free0 = pool.get_num_free_blocks()
    system = prompt_ids(sched, "Rules for everyone. " * 20)
    first, second = system + prompt_ids(sched, "Problem one."), system + prompt_ids(sched, "Problem two!")
    assert len(system) > 5 * BLOCK and len(first) % BLOCK
    results, scheduled = {}, {}
    for rid, prompt in (("a", first), ("b", second)):
        sched.add_request(hashed(group_request(rid, prompt, workers=2, max_tokens=20)))
        for out, outputs in run(sched):
            scheduled[rid] = scheduled.get(rid, 0) + out.num_scheduled_tokens.get(f"{rid}{CHILD_SEP}prompt", 0)
            results.update(outputs)
    common = len(system) // BLOCK * BLOCK  # the shared start, in whole blocks
    usage_a = results["a"].kv_transfer_params["hogwild"]["usage"]
    usage_b = results["b"].kv_transfer_params["hogwild"]["usage"]
    glue = scheduled["a"] - len(first)
    assert usage_a["cached_prompt_tokens"] == 0 and glue > 0
    assert usage_b["cached_prompt_tokens"] == common
    assert scheduled["b"] == len(second) - common + glue  # pass 0 computed only the rest of C, and the glue
    # The same prompt again, and a plain request holding C then exactly the glue: hits stop at C's full blocks.
    again = hashed(group_request("c", first, workers=2, max_tokens=20))
    sched.add_request(again)
    glue_ids = sched._entries["c"].group.state.glue_tokens
    plain = hashed(plain_request("p", first + glue_ids, max_tokens=2))
    sched.add_request(plain)
    plain_first = None
    for out, outputs in run(sched):
        results.update(outputs)
        if plain_first is None and "p" in out.num_scheduled_tokens:
            plain_first = out.num_scheduled_tokens["p"]  # the whole prompt fits one step: all it computes
    assert results["c"].kv_transfer_params["hogwild"]["usage"]["cached_prompt_tokens"] == len(first) // BLOCK * BLOCK
    assert plain_first == len(plain.prompt_token_ids) - len(first) // BLOCK * BLOCK  # C's full blocks, no glue
    assert pool.get_num_free_blocks() == free0  # cached blocks are free (evictable) once no request holds them
