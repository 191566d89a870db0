"""``HogwildScheduler``: the vLLM scheduler that runs hogwild groups next to ordinary requests.

The config hook (``compat.py``, patch 2) sets ``scheduler_config.scheduler_cls`` to this class. Requests without
``extra_args["hogwild"]`` go to the stock synchronous ``Scheduler`` untouched. A group request ("parent") never
enters the base queues: it becomes one hidden prompt request (``"<parent>::prompt"``: the common prompt C, then the
glue text) and N hidden worker requests (``"<parent>::w<k>"``: C + the worker's intro) that the base scheduler never
sees, so it never preempts, stops, caches or reports them. Each step:

1. ``_admit``: pending groups are admitted in arrival order when their whole KV budget and their rows fit. The
   budget is reserved at once, so a running group never allocates and is never preempted; the workers share the
   prompt request's full blocks of C (the prompt is stored once).
2. ``_plan``: every live group gets all of its rows this step or none (gang rule). Pass 0 writes the common
   prompt C through the prompt request (chunked to the token budget), the glue joins in C's last chunk; every
   later step feeds each worker's unfed tokens (``GroupState.plan_pass``): the sampled token plus any forced
   header, as one chunk.
3. ``super().schedule()`` runs with the token and row budgets reduced by what the groups take.
4. ``_inject``: the children go into the ``SchedulerOutput`` as the base code would put them, and
   ``out.hogwild`` (:class:`~hogwild_vllm.metadata.HogwildStepMeta`) carries each row's view segments and the forced
   tokens to the runner (``compat.py`` patch 3 and the attention backend).
5. ``update_from_output``: each worker's sample drives ``GroupState.on_sampled`` (steps, commits, headers, stop
   rules); a finished group frees every block and emits one output for the parent: ``new_token_ids`` = the
   transcript's token ids and ``kv_transfer_params = {"hogwild": GroupOutput.to_dict()}``.

See docs/architecture.md ("vLLM integration") for every base-class attribute this relies on.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from vllm.logger import init_logger
from vllm.sampling_params import SamplingParams
from vllm.v1.core.sched.interface import PauseState
from vllm.v1.core.sched.output import NewRequestData, SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus

from hogwild_vllm.config import GroupConfig
from hogwild_vllm.layout import GroupState, find_answer
from hogwild_vllm.metadata import HogwildStepMeta, RowPlan, plan_rows, source_names, unscheduled_sources
from hogwild_vllm.outputs import GroupOutput, group_output
from hogwild_vllm.prompt import HFCodec, banned_token_ids, eos_token_ids
from hogwild_vllm.validation import parse_request, request_options

logger = init_logger(f"vllm.{__name__}")

CHILD_SEP = "::"
FINISH_REASONS = {"answer": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.ABORT}


def child_id(parent_id: str, suffix: str) -> str:
    return f"{parent_id}{CHILD_SEP}{suffix}"


def derive_seed(seed: int, worker: int) -> int:
    """A per-worker seed from the request's seed: each worker has its own generator, independent of batching."""
    digest = hashlib.blake2b(f"{seed}/{worker}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


@dataclass
class _Step:
    """What one group runs in the step in flight (set by ``schedule``, read by ``update_from_output``)."""

    counts: dict[str, int]  # child id -> scheduled tokens
    decode: bool  # a worker pass (every worker samples), not a pass-0 prompt chunk


@dataclass
class _Group:
    parent: Request
    cfg: GroupConfig
    prompt: list[int]
    state: GroupState
    banned: list[int]
    tmax: int  # per-worker token slots reserved after the prompt
    rows: int  # batch rows held for the group's whole life (one per worker; pass 0 uses one)
    blocks: int  # KV blocks the group needs (reserved at admission)
    workers: list[Request] = field(default_factory=list)
    prompt_req: Request | None = None  # holds C then the glue; computed in pass 0, read by every worker
    admitted: bool = False
    prompt_done: int = 0  # prompt tokens written (pass 0)
    passes: int = 0  # steps the group ran in
    sent: set[str] = field(default_factory=set)  # children the runner has been told about
    forced: dict[str, tuple[int, ...]] = field(default_factory=dict)  # to write into the runner's history
    step: _Step | None = None
    error: str | None = None

    @property
    def request_id(self) -> str:
        return self.parent.request_id

    def children(self) -> list[Request]:
        return ([self.prompt_req] if self.prompt_req is not None else []) + self.workers

    def source_ids(self) -> dict[int, str]:
        assert self.prompt_req is not None
        return source_names(self.state, [w.request_id for w in self.workers], self.prompt_req.request_id)


@dataclass
class _Finisher:
    group: _Group
    out: GroupOutput
    request: Request
    tokens: list[int] = field(default_factory=list)


class HogwildScheduler(Scheduler):
    """The synchronous vLLM scheduler plus hogwild groups (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Budgets are lowered around each super().schedule(); never touch the engine-wide config object.
        self.scheduler_config = copy.copy(self.scheduler_config)  # type: ignore[has-type]
        groups = self.kv_cache_config.kv_cache_groups
        if len(groups) != 1:
            raise ValueError(f"hogwild: groups need exactly one KV cache group (one attention type, no sliding "
                             f"window or hybrid layers); this model has {len(groups)}")
        self._groups: dict[str, _Group] = {}  # parent id -> group, in arrival order (pending, live, errored)
        self._finishers: dict[str, _Finisher] = {}  # finisher request id -> its group's pending result
        self._codec: HFCodec | None = None
        self._eos_ids: list[int] | None = None

    # ---- requests in ----------------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        params = request.sampling_params
        if params is None or request_options(params) is None:
            super().add_request(request)
            return
        if request.request_id in self._groups or request.request_id in self.requests:
            raise ValueError(f"hogwild: duplicate request id {request.request_id!r}")
        try:
            cfg = parse_request(params)
            assert cfg is not None
            group = self._new_group(request, cfg)
        except ValueError as e:  # VLLMValidationError is a ValueError; the frontend normally catches these first
            group = _Group(request, GroupConfig(), [], None, [], 0, 0, 0, error=str(e))  # type: ignore[arg-type]
        self._groups[request.request_id] = group
        request.status = RequestStatus.WAITING

    def _new_group(self, request: Request, cfg: GroupConfig) -> _Group:
        prompt = list(request.prompt_token_ids or [])
        if not prompt:
            raise ValueError("hogwild: a group needs a non-empty token prompt (prompt embeddings are not supported)")
        if request.lora_request is not None or request.mm_features:
            raise ValueError("hogwild: LoRA and multimodal inputs are not supported for group requests")
        codec = self.codec
        state = GroupState(cfg, len(prompt), codec)
        eos = set(self.eos_ids) | set(request.sampling_params.all_stop_token_ids if request.sampling_params else ())
        banned = banned_token_ids(codec.tokenizer, cfg, sorted(eos))
        header = max(len(codec.encode(cfg.templates.header_text(n, cfg.max_tokens + 1, True)))
                     for n in cfg.worker_names)
        longest_start = max(len(log.tokens) for log in state.workers)
        tmax = max(cfg.max_tokens, longest_start) + header + 1
        bs = self.block_size
        p, n, g = len(prompt), cfg.workers, len(state.glue_tokens)
        blocks = _cdiv(p + g, bs) + n * (_cdiv(p + tmax, bs) - p // bs)
        group = _Group(request, cfg, prompt, state, banned, tmax, n, blocks)
        problems = []
        if p + tmax > self.max_model_len:
            problems.append(f"the prompt ({p} tokens) plus a worker's budget ({tmax} token slots: max_tokens "
                            f"{cfg.max_tokens} + the longest step header + 1) exceeds max_model_len "
                            f"{self.max_model_len}")
        view = state.longest_view(tmax)
        if view > self.max_model_len:  # queries sit at view positions: the whole group must fit the context
            problems.append(f"a worker's view can reach {view} positions (the prompt, {n} workers x {tmax} token "
                            f"slots and the layout's markers), which exceeds max_model_len {self.max_model_len}")
        total = self.kv_cache_manager.block_pool.num_gpu_blocks - 1
        if blocks > total:
            problems.append(f"the group needs {blocks} KV blocks of {bs} tokens, the whole cache has {total}")
        if group.rows > self.max_num_running_reqs:
            problems.append(f"the group needs {group.rows} batch rows, max_num_seqs is {self.max_num_running_reqs}")
        widest = max(sum(len(log.tokens) for log in state.workers), n * (header + 1), g + 1)
        budget = self._token_budget()
        if widest > budget:
            problems.append(f"one pass of the group feeds up to {widest} tokens, max_num_batched_tokens is {budget}")
        if problems:
            raise ValueError("hogwild: this group cannot run on this engine: " + "; ".join(problems))
        return group

    @property
    def codec(self) -> HFCodec:
        if self._codec is None:
            from vllm.tokenizers import cached_tokenizer_from_config

            self._codec = HFCodec(cached_tokenizer_from_config(self.vllm_config.model_config))
        return self._codec

    @property
    def eos_ids(self) -> list[int]:
        if self._eos_ids is None:
            model_config = self.vllm_config.model_config
            self._eos_ids = eos_token_ids(getattr(model_config.hf_config, "eos_token_id", None),
                                          model_config.try_get_generation_config().get("eos_token_id"))
        return self._eos_ids

    # ---- scheduling -----------------------------------------------------------------------------------------
    def _token_budget(self) -> int:
        return min(self.max_num_scheduled_tokens, self.scheduler_config.max_num_batched_tokens)

    def _reserved_rows(self) -> int:
        return sum(g.rows for g in self._groups.values() if g.admitted)

    def schedule(self, throttle_prefills: bool = False) -> SchedulerOutput:
        # Paused engines (PAUSED_NEW: admit nothing new; PAUSED_ALL: run nothing) treat groups like requests.
        waiting = self._admit() if self.pause_state == PauseState.UNPAUSED else False
        planned, tokens = self._plan() if self.pause_state != PauseState.PAUSED_ALL else ([], 0)
        rows = self._reserved_rows()
        config = self.scheduler_config
        scheduled = int(self.max_num_scheduled_tokens)  # type: ignore[has-type]
        batched = int(config.max_num_batched_tokens)
        running = int(self.max_num_running_reqs)  # type: ignore[has-type]
        active = int(self.max_num_active_reqs)  # type: ignore[has-type]
        try:
            self.max_num_scheduled_tokens = scheduled - tokens
            config.max_num_batched_tokens = batched - tokens
            self.max_num_running_reqs = running - rows
            self.max_num_active_reqs = max(0, active - rows)
            if waiting:  # a group waits for blocks or rows: admit no newer plain request meanwhile
                self.max_num_active_reqs = min(self.max_num_active_reqs, len(self.running))
            out = super().schedule(throttle_prefills)
        finally:
            self.max_num_scheduled_tokens, config.max_num_batched_tokens = scheduled, batched
            self.max_num_running_reqs, self.max_num_active_reqs = running, active
        self._inject(out, planned)
        return out

    def _admit(self) -> bool:
        """Admit pending groups in arrival order; True when one is still waiting for room."""
        pool = self.kv_cache_manager.block_pool
        for g in self._groups.values():
            if g.admitted or g.error is not None:
                continue
            free = pool.get_num_free_blocks() - self.kv_cache_manager.watermark_blocks
            if g.blocks > free or len(self.running) + self._reserved_rows() + g.rows > self.max_num_running_reqs:
                return True
            self._start(g)
        return False

    def _start(self, g: _Group) -> None:
        """Build the children and reserve the group's whole KV budget (the prompt request owns C's blocks).

        C is computed by its own greedy request, never by a worker: a worker whose prompt were computed in
        discarded partial-prefill chunks would rewind its seeded generator, which CPU generators cannot do."""
        pid, parent, state = g.request_id, g.parent, g.state
        kv = self.kv_cache_manager
        p = len(g.prompt)
        g.prompt_req = self._child(parent, child_id(pid, "prompt"), g.prompt + state.glue_tokens, 1, [], worker=None)
        for w, log in enumerate(state.workers):
            cid = child_id(pid, f"w{w}")
            g.workers.append(self._child(parent, cid, g.prompt + log.tokens, g.tmax, g.banned, worker=w))
        owner = g.prompt_req
        if kv.allocate_slots(owner, owner.num_tokens, delay_cache_blocks=True, has_scheduled_reqs=False) is None:
            raise RuntimeError("hogwild: KV reservation failed after the free-block check")
        full = p // self.block_size
        for child in g.workers:
            for manager in kv.coordinator.single_type_managers:
                shared = manager.req_to_blocks[owner.request_id][:full]
                manager.block_pool.touch(shared)
                manager.req_to_blocks[child.request_id].extend(shared)
            child.num_computed_tokens = p
            if kv.allocate_slots(child, g.tmax, delay_cache_blocks=True, has_scheduled_reqs=False) is None:
                raise RuntimeError("hogwild: KV reservation failed after the free-block check")
        for child in g.children():
            child.status = RequestStatus.RUNNING
        parent.status = RequestStatus.RUNNING
        g.admitted = True

    @staticmethod
    def _child(parent: Request, cid: str, prompt: list[int], max_tokens: int, banned: list[int],
               worker: int | None) -> Request:
        src = parent.sampling_params
        assert src is not None
        params = src.clone()
        params.n = 1
        params.stop = []
        params.stop_token_ids = []
        params.ignore_eos = True
        params.min_tokens = 0
        params.logprobs = None
        params.prompt_logprobs = None
        params.max_tokens = max_tokens
        params.extra_args = {"hogwild_child": cid}
        params._bad_words_token_ids = [[t] for t in banned]
        if worker is None:  # the prompt request: its one sample is ignored
            params.temperature, params.top_p, params.top_k, params.seed = 0.0, 1.0, 0, None
        elif src.seed is not None:
            params.seed = derive_seed(src.seed, worker)
        return Request(request_id=cid, prompt_token_ids=prompt, sampling_params=params, pooling_params=None,
                       client_index=parent.client_index, arrival_time=parent.arrival_time, priority=parent.priority)

    def _plan(self) -> tuple[list[tuple[_Group, dict[str, RowPlan]]], int]:
        """Each live group's rows for this step (all or none), within the token budget."""
        avail = self._token_budget()
        planned: list[tuple[_Group, dict[str, RowPlan]]] = []
        for g in self._groups.values():
            if not g.admitted or g.state.finished:
                continue
            state, p = g.state, len(g.prompt)
            if g.prompt_done < p:
                glue = len(state.glue_tokens)
                end = p if p - g.prompt_done + glue <= avail else g.prompt_done + min(p - g.prompt_done - 1, avail)
                if end <= g.prompt_done:
                    continue
                rows = plan_rows(state, g.source_ids(), pass0_chunk=(g.prompt_done, end))
                assert g.prompt_req is not None
                counts = {g.prompt_req.request_id: end - g.prompt_done + (glue if end == p else 0)}
                g.step = _Step(counts, decode=False)
                g.prompt_done = end
            else:
                plans = state.plan_pass()
                need = sum(len(plan.tokens) for plan in plans)
                if need > avail:
                    continue
                rows = plan_rows(state, g.source_ids(), plans=plans)
                counts = {}
                for child, plan in zip(g.workers, plans, strict=True):
                    assert len(plan.tokens) == child.num_tokens - child.num_computed_tokens, (
                        child.request_id, plan.tokens, child.num_tokens, child.num_computed_tokens)
                    counts[child.request_id] = len(plan.tokens)
                state.mark_fed()
                g.step = _Step(counts, decode=True)
            avail -= sum(g.step.counts.values())
            planned.append((g, rows))
        return planned, self._token_budget() - avail

    def _inject(self, out: SchedulerOutput, planned: list[tuple[_Group, dict[str, RowPlan]]]) -> None:
        rows: dict[str, RowPlan] = {}
        extra: dict[str, tuple[int, ...]] = {}
        forced: dict[str, tuple[int, ...]] = {}
        cached = out.scheduled_cached_reqs
        for g, group_rows in planned:
            assert g.step is not None
            by_id = {c.request_id: c for c in g.children()}
            for cid, n in g.step.counts.items():
                child = by_id[cid]
                if cid not in g.sent:
                    out.scheduled_new_reqs.append(
                        NewRequestData.from_request(child, self.kv_cache_manager.get_block_ids(cid)))
                    g.sent.add(cid)
                else:
                    cached.req_ids.append(cid)
                    cached.new_block_ids.append(None)
                    cached.num_computed_tokens.append(child.num_computed_tokens)
                    cached.num_output_tokens.append(child.num_output_tokens)
                out.num_scheduled_tokens[cid] = n
                out.total_num_scheduled_tokens += n
                child.num_computed_tokens += n
                if cid in g.forced:
                    forced[cid] = g.forced.pop(cid)
            rows.update(group_rows)
            for rid in unscheduled_sources(group_rows):
                extra[rid] = tuple(self.kv_cache_manager.get_block_ids(rid)[0])
            g.passes += 1
        out.hogwild = HogwildStepMeta(rows=rows, extra_blocks=extra, forced=forced)

    # ---- results --------------------------------------------------------------------------------------------
    def update_from_output(self, scheduler_output: SchedulerOutput,
                           model_runner_output: ModelRunnerOutput) -> dict[int, EngineCoreOutputs]:
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        sampled = model_runner_output.sampled_token_ids
        index = model_runner_output.req_id_to_index
        for g in list(self._groups.values()):
            if g.error is not None:
                self._emit(outputs, g, FinishReason.ERROR, [], {"error": g.error})
                del self._groups[g.request_id]
                continue
            step, g.step = g.step, None
            if step is None or not step.decode or g.state.finished:
                continue
            got = [sampled[index[c.request_id]] if c.request_id in index and sampled else [] for c in g.workers]
            if any(len(t) != 1 for t in got):  # never expected; end this group alone, keep the engine serving
                logger.error("hogwild: group %s got %s tokens from one worker pass; ending the group", g.request_id,
                             [len(t) for t in got])
                self._release(g, RequestStatus.FINISHED_ERROR)
                self._emit(outputs, g, FinishReason.ERROR, [], {"error": "hogwild: internal error: a worker pass "
                                                                "returned no token (see the engine log)"})
                continue
            tokens = [int(t[0]) for t in got]
            g.state.on_sampled(tokens)
            for w, (child, log) in enumerate(zip(g.workers, g.state.workers, strict=True)):
                start = child.num_tokens - len(g.prompt)
                new = log.tokens[start:]
                assert new and new[0] == tokens[w], (child.request_id, new, tokens[w])
                child.append_output_token_ids(new)
                if len(new) > 1:
                    g.forced[child.request_id] = tuple(new[1:])
            if g.state.finished:
                self._finish_group(outputs, g)
        self._collect_finishers(outputs)
        return outputs

    def _finish_group(self, outputs: dict[int, EngineCoreOutputs], g: _Group) -> None:
        state = g.state
        out = group_output(state, g.prompt, g.banned, g.passes, g.blocks)
        reason = FINISH_REASONS[state.finish_reason or "length"]
        self._release(g, RequestStatus.FINISHED_STOPPED if reason == FinishReason.STOP
                      else RequestStatus.FINISHED_LENGTH_CAPPED)
        if g.cfg.finisher and out.answer is None and self._start_finisher(g, out):
            return
        self._emit(outputs, g, reason, state.transcript_token_ids(), out.to_dict())

    # ---- the finisher: one ordinary greedy request over prompt + transcript + suffix --------------------------
    def _start_finisher(self, g: _Group, out: GroupOutput) -> bool:
        """Queue the finisher as a plain request the base scheduler runs (chunking, preemption and prefix
        caching as usual); False when it cannot run on this engine (``out.finisher_skipped`` says why)."""
        suffix = g.cfg.templates.finisher_suffix
        ids = out.prompt_token_ids + self.codec.encode(out.transcript + suffix)
        budget = g.cfg.finisher_max_tokens
        if len(ids) + budget > self.max_model_len:
            out.finisher_skipped = (f"prompt + transcript + suffix ({len(ids)} tokens) plus finisher_max_tokens "
                                    f"({budget}) exceeds max_model_len {self.max_model_len}")
            return False
        fid = child_id(g.request_id, "finisher")
        params = SamplingParams(temperature=0.0, max_tokens=budget, stop_token_ids=list(self.eos_ids),
                                extra_args={"hogwild_finisher": g.request_id})
        request = Request(request_id=fid, prompt_token_ids=ids, sampling_params=params, pooling_params=None,
                          client_index=g.parent.client_index, arrival_time=g.parent.arrival_time,
                          priority=g.parent.priority, block_hasher=g.parent._block_hasher)
        self._finishers[fid] = _Finisher(g, out, request)
        super().add_request(request)
        return True

    def _collect_finishers(self, outputs: dict[int, EngineCoreOutputs]) -> None:
        """Take the finishers' outputs out of what goes to the frontend; end each at EOS, length or an answer."""
        if not self._finishers:
            return
        for eco in outputs.values():
            mine = [o for o in eco.outputs if o.request_id in self._finishers]
            if not mine:
                continue
            eco.outputs = [o for o in eco.outputs if o.request_id not in self._finishers]
            if eco.finished_requests:
                eco.finished_requests -= set(self._finishers)
            for o in mine:
                f = self._finishers[o.request_id]
                f.tokens.extend(o.new_token_ids)
                marker = f.group.cfg.templates.answer_marker
                answer = find_answer(f.group.cfg.templates.finisher_suffix + self.codec.decode(f.tokens), marker)
                if o.finish_reason is None and answer is not None:
                    super().finish_requests(o.request_id, RequestStatus.FINISHED_STOPPED)
                if o.finish_reason is not None or answer is not None:
                    self._end_finisher(outputs, o.request_id, answer)

    def _end_finisher(self, outputs: dict[int, EngineCoreOutputs], fid: str, answer: str | None) -> None:
        f = self._finishers.pop(fid)
        out, state = f.out, f.group.state
        out.finisher_text = self.codec.decode(f.tokens)
        out.answer = answer
        out.usage.finisher_tokens = len(f.tokens)
        reason = FinishReason.STOP if answer is not None else FINISH_REASONS[state.finish_reason or "length"]
        self._emit(outputs, f.group, reason, state.transcript_token_ids(), out.to_dict())

    def _release(self, g: _Group, status: RequestStatus) -> None:
        """Free every child's blocks (shared prompt blocks return at the last free) and drop the group."""
        for child in g.children():
            if child.request_id in g.sent:
                self.finished_req_ids.add(child.request_id)
            self.kv_cache_manager.free(child)
            child.status = status
        g.parent.status = status
        self._groups.pop(g.request_id, None)

    def _emit(self, outputs: dict[int, EngineCoreOutputs], g: _Group, reason: FinishReason, token_ids: list[int],
              payload: dict[str, Any]) -> None:
        client = g.parent.client_index
        eco = outputs.get(client)
        if eco is None:
            eco = outputs[client] = EngineCoreOutputs()
        eco.outputs.append(EngineCoreOutput(request_id=g.request_id, new_token_ids=token_ids, finish_reason=reason,
                                            kv_transfer_params={"hogwild": payload}))
        if self.finished_req_ids_dict is not None:
            eco.finished_requests = (eco.finished_requests or set()) | {g.request_id}

    # ---- aborts and bookkeeping -----------------------------------------------------------------------------
    def finish_requests(self, request_ids: str | Iterable[str] | None,
                        finished_status: RequestStatus) -> list[Request]:
        if request_ids is None:
            ended = [self._abort_group(g, finished_status) for g in list(self._groups.values())]
            internal = set(self._finishers)
            for f in self._finishers.values():
                f.group.parent.status = finished_status
                ended.append(f.group.parent)
            self._finishers.clear()
            return ended + [r for r in super().finish_requests(None, finished_status) if r.request_id not in internal]
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        ended = [self._abort_group(self._groups[i], finished_status) for i in ids if i in self._groups]
        for fid, f in list(self._finishers.items()):  # a group whose finisher runs: end the finisher with it
            if f.group.request_id in ids:
                del self._finishers[fid]
                super().finish_requests(fid, finished_status)
                f.group.parent.status = finished_status
                ended.append(f.group.parent)
        rest = [i for i in ids if i not in self._groups]
        return ended + (super().finish_requests(rest, finished_status) if rest else [])

    def _abort_group(self, g: _Group, status: RequestStatus) -> Request:
        if g.state is not None:
            g.state.abort()
        self._release(g, status)
        return g.parent

    def get_num_unfinished_requests(self) -> int:
        base = super().get_num_unfinished_requests()
        if self.pause_state == PauseState.PAUSED_ALL:
            return base
        return base + len(self._groups)

    def group_ids(self) -> list[str]:
        """Parent ids of the groups held (pending, running, or with an error not yet reported)."""
        return list(self._groups)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)
