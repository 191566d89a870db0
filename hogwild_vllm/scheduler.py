"""``HogwildScheduler``: the vLLM scheduler that runs hogwild groups next to ordinary requests.

The config hook (``compat.py``, patch 2) sets ``scheduler_config.scheduler_cls`` to this class. Requests without
``extra_args["hogwild"]`` go to the stock synchronous ``Scheduler`` untouched. A group is asked for in one of two
shapes (``validation.py``): one request with ``n = 1`` (one choice: the group's transcript, at the end), or the n
requests ``"{i}_{id}"`` that vLLM's frontend makes of a request with ``n`` = workers (one choice per worker, streamed
live; the group is admitted once all n have arrived). Either way the requests the frontend waits on ("clients")
never enter the base queues: the group runs as one hidden prompt request (``"<key>::prompt"``: the common prompt C,
then the glue text) and N hidden worker requests (``"<key>::w<k>"``: C + the worker's intro) that the base
scheduler never sees, so it never preempts, stops, caches or reports them. Each step:

1. ``_admit``: pending groups are admitted in arrival order when their whole KV budget and their rows fit. The
   budget is reserved at once, so a running group never allocates and is never preempted; the workers share the
   prompt request's full blocks of C (the prompt is stored once).
2. ``_plan``: every live group plans all of its rows this step or none (``Group.plan``).
3. ``super().schedule()`` runs with the token and row budgets reduced by what the groups take.
4. ``_inject``: the children go into the ``SchedulerOutput`` as the base code would put them, and the step payload
   (:class:`~hogwild_vllm.metadata.HogwildStepMeta`) carries each row's view segments and the forced tokens to the
   runner (``compat.py`` patch 3 and the attention backend).
5. ``update_from_output``: each worker's sample drives ``Group.on_sampled`` (steps, commits, headers, stop rules);
   with one choice per worker, each worker's new tokens go to its client at once. A finished group frees every
   block and ends its clients with the group's result in ``kv_transfer_params["hogwild"]``.

Everything that is not a vLLM override lives elsewhere: the group's sizing and step plans in ``group.py`` (pure),
the finisher in ``finisher.py``, every private vLLM touch point in ``compat.py``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from vllm.exceptions import VLLMValidationError
from vllm.logger import init_logger
from vllm.v1.core.sched.interface import PauseState
from vllm.v1.core.sched.output import NewRequestData, SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, FinishReason
from vllm.v1.outputs import ModelRunnerOutput
from vllm.v1.request import Request, RequestStatus

from hogwild_vllm import compat
from hogwild_vllm.config import GroupConfig
from hogwild_vllm.finisher import Finishers
from hogwild_vllm.group import EngineLimits, Group, engine_state, fit_problems, size_group
from hogwild_vllm.metadata import HogwildStepMeta, RowPlan, unscheduled_sources
from hogwild_vllm.metrics import EngineMetrics, MetricsWriter
from hogwild_vllm.outputs import GroupOutput, group_output
from hogwild_vllm.prompt import HFCodec, banned_token_ids, eos_token_ids
from hogwild_vllm.validation import choice_count, parse_request

logger = init_logger(f"vllm.{__name__}")

CHILD_SEP = "::"
FINISH_REASONS = {"answer": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.ABORT}
_CHOICE_ID = re.compile(r"(\d+)_(.+)", re.DOTALL)  # vLLM's id of choice i of request r: f"{i}_{r}"


def child_id(key: str, suffix: str) -> str:
    return f"{key}{CHILD_SEP}{suffix}"


def derive_seed(seed: int, worker: int) -> int:
    """A per-worker seed from the request's seed: each worker has its own generator, independent of batching."""
    digest = hashlib.blake2b(f"{seed}/{worker}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & 0x7FFF_FFFF_FFFF_FFFF


@dataclass
class _Entry:
    """One group as the scheduler holds it: the requests the frontend waits on, the group, its vLLM children."""

    key: str  # the group's id: the request's (n = 1) or the id the n choices were made from
    clients: list[Request]  # [request] (n = 1) or choice i's request at index i (one per worker)
    group: Group | None = None  # None when the request was refused (``error``)
    error: str | None = None
    prompt_req: Request | None = None  # holds C then the glue; computed in pass 0, read by every worker
    workers: list[Request] = field(default_factory=list)
    admitted: bool = False
    sent: set[str] = field(default_factory=set)  # children the runner has been told about
    result: GroupOutput | None = None  # set when the group ended and its finisher runs

    @property
    def choices(self) -> bool:
        return len(self.clients) > 1

    @property
    def lead(self) -> Request:
        return self.clients[0]

    def children(self) -> list[Request]:
        return ([self.prompt_req] if self.prompt_req is not None else []) + self.workers


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
        self._entries: dict[str, _Entry] = {}  # key -> group, in arrival order (pending, live, errored, finishing)
        self._client_key: dict[str, str] = {}  # client request id -> its group's key (arriving groups too)
        self._arriving: dict[str, dict[int, Request]] = {}  # key -> the choices arrived so far, by index
        self._finishers = Finishers()
        self._codec: HFCodec | None = None
        self._eos_ids: list[int] | None = None
        self._metrics = EngineMetrics()  # finished groups' totals; the live part is added per snapshot
        self._metrics_writer = MetricsWriter()

    # ---- requests in ----------------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        params = request.sampling_params
        problem: str | None = None
        try:
            cfg = parse_request(params) if params is not None else None
        except (ValueError, VLLMValidationError) as e:  # the frontend normally refuses these first (HTTP 400)
            cfg, problem = None, str(e)
        else:
            if cfg is None:
                super().add_request(request)
                return
        rid = request.request_id
        if rid in self._client_key or rid in self.requests:
            raise ValueError(f"hogwild: duplicate request id {rid!r}")
        request.status = RequestStatus.WAITING
        n = choice_count(params) if params is not None else 1
        if n == 1:
            self._add_entry(rid, [request], cfg, problem)
            return
        match = _CHOICE_ID.fullmatch(rid)
        if match is None or int(match.group(1)) >= n:
            self._add_entry(rid, [request], None, f"hogwild: request {rid!r} asks for {n} choices but is not one "
                            "of the requests vLLM's frontend makes of a request with n > 1 ('<i>_<id>', i < n)")
            return
        index, key = int(match.group(1)), match.group(2)
        arrived = self._arriving.setdefault(key, {})
        arrived[index] = request
        self._client_key[rid] = key
        if len(arrived) == n:
            del self._arriving[key]
            self._add_entry(key, [arrived[i] for i in range(n)], cfg, problem)

    def _add_entry(self, key: str, clients: list[Request], cfg: GroupConfig | None, problem: str | None) -> None:
        entry = _Entry(key, clients)
        for c in clients:
            self._client_key[c.request_id] = key
        if problem is None:
            assert cfg is not None
            try:
                entry.group = self._new_group(key, clients[0], cfg)
            except ValueError as e:
                problem = str(e)
        entry.error = problem
        self._entries[key] = entry

    def _new_group(self, key: str, request: Request, cfg: GroupConfig) -> Group:
        prompt = list(request.prompt_token_ids or [])
        if not prompt:
            raise ValueError("hogwild: a group needs a non-empty token prompt (prompt embeddings are not supported)")
        if request.lora_request is not None or request.mm_features:
            raise ValueError("hogwild: LoRA and multimodal inputs are not supported for group requests")
        codec = self.codec
        state = engine_state(cfg, len(prompt), codec, self.block_size)
        params = request.sampling_params
        eos = set(self.eos_ids) | set(params.all_stop_token_ids if params else ())
        banned = banned_token_ids(codec.tokenizer, cfg, sorted(eos))
        size = size_group(cfg, state, codec, self.block_size)
        kv = self.kv_cache_manager
        limits = EngineLimits(self.max_model_len, self.block_size, compat.total_blocks(kv),
                              self.max_num_running_reqs, self._token_budget())
        problems = fit_problems(cfg, len(prompt), size, limits)
        if problems:
            raise ValueError("hogwild: this group cannot run on this engine: " + "; ".join(problems))
        return Group(cfg, prompt, state, banned, size, child_id(key, "prompt"),
                     [child_id(key, f"w{w}") for w in range(cfg.workers)])

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
        return sum(e.group.size.rows for e in self._entries.values() if e.admitted and e.group is not None)

    def schedule(self, throttle_prefills: bool = False) -> SchedulerOutput:
        # Paused engines (PAUSED_NEW: admit nothing new; PAUSED_ALL: run nothing) treat groups like requests.
        waiting = self._admit() if self.pause_state == PauseState.UNPAUSED else False
        planned = self._plan() if self.pause_state != PauseState.PAUSED_ALL else []
        tokens = sum(plan_tokens for _, _, plan_tokens in planned)
        with compat.lowered_budgets(self, tokens, self._reserved_rows(), hold_new=waiting):
            out = super().schedule(throttle_prefills)
        self._inject(out, planned)
        return out

    def _admit(self) -> bool:
        """Admit pending groups in arrival order; True when one is still waiting for room."""
        for e in self._entries.values():
            if e.admitted or e.group is None or e.result is not None:
                continue
            size = e.group.size
            if (size.blocks > compat.usable_free_blocks(self.kv_cache_manager)
                    or len(self.running) + self._reserved_rows() + size.rows > self.max_num_running_reqs):
                return True
            self._start(e)
        return False

    def _start(self, e: _Entry) -> None:
        """Build the children and reserve the group's whole KV budget (the prompt request owns C's blocks).

        C is computed by its own greedy request, never by a worker: a worker whose prompt were computed in
        discarded partial-prefill chunks would rewind its seeded generator, which CPU generators cannot do."""
        g = e.group
        assert g is not None
        kv = self.kv_cache_manager
        p, start = len(g.prompt), g.size.log_start
        e.prompt_req = self._child(e, g.prompt_id, g.prompt + g.state.glue_tokens, 1, worker=None)
        # A worker's log starts on a block boundary: the positions between C's end and it hold a filler token
        # (C's last, so the prompt's token set, which repetition penalties read, is unchanged) that is never
        # computed, written or read.
        gap = [g.prompt[-1]] * (start - p)
        for w, (wid, log) in enumerate(zip(g.worker_ids, g.state.workers, strict=True)):
            e.workers.append(self._child(e, wid, g.prompt + gap + log.tokens, g.size.tmax, worker=w))
        owner = e.prompt_req
        # The common prompt's start may be in the prefix cache (another group's, or a plain request's): adopt
        # those blocks; pass 0 computes the rest. At most p - 1 tokens: the last chunk carries the glue.
        hit = compat.cached_prefix(kv, owner, min(g.cacheable_prompt, p - 1), self.block_size)
        compat.reserve(kv, owner, owner.num_tokens - hit.tokens, hit)
        owner.num_computed_tokens = hit.tokens
        g.start_from_cache(hit.tokens)
        for child in e.workers:  # C's blocks, its partial last one included (held, never written, by workers)
            compat.share_blocks(kv, owner.request_id, child.request_id, start // self.block_size)
            child.num_computed_tokens = start
            compat.reserve(kv, child, g.size.tmax)
        for child in e.children():
            child.status = RequestStatus.RUNNING
        for c in e.clients:
            c.status = RequestStatus.RUNNING
        e.admitted = True

    def _child(self, e: _Entry, cid: str, prompt: list[int], max_tokens: int, worker: int | None) -> Request:
        """A hidden request of the group. Worker ``w`` samples like its client (choice ``w``'s params, whose seed
        vLLM made ``seed + w``) or, with one client, like it with a seed derived from the request's."""
        assert e.group is not None
        src = e.clients[worker if worker is not None and e.choices else 0].sampling_params
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
        compat.set_banned_tokens(params, e.group.banned)
        if worker is None:  # the prompt request: its one sample is ignored
            params.temperature, params.top_p, params.top_k, params.seed = 0.0, 1.0, 0, None
        elif src.seed is not None and not e.choices:
            params.seed = derive_seed(src.seed, worker)
        lead = e.lead
        # Only the prompt request hashes its blocks (C may enter the prefix cache); workers' blocks never do.
        hashing = worker is None
        return Request(request_id=cid, prompt_token_ids=prompt, sampling_params=params, pooling_params=None,
                       client_index=lead.client_index, arrival_time=lead.arrival_time, priority=lead.priority,
                       cache_salt=compat.request_cache_salt(lead) if hashing else None,
                       block_hasher=compat.request_block_hasher(lead) if hashing else None)

    def _plan(self) -> list[tuple[_Entry, dict[str, RowPlan], int]]:
        """Each live group's rows for this step (all or none), within the token budget."""
        avail = self._token_budget()
        planned = []
        for e in self._entries.values():
            if not e.admitted or e.group is None:
                continue
            plan = e.group.plan(avail)
            if plan is None:
                continue
            if not plan.decode and e.group.prefill_started is None:
                e.group.prefill_started = time.perf_counter()
            if plan.decode:
                for child in e.workers:
                    assert plan.counts[child.request_id] == child.num_tokens - child.num_computed_tokens, (
                        child.request_id, plan.counts, child.num_tokens, child.num_computed_tokens)
            avail -= plan.tokens
            planned.append((e, plan.rows, plan.tokens))
        return planned

    def _inject(self, out: SchedulerOutput, planned: list[tuple[_Entry, dict[str, RowPlan], int]]) -> None:
        rows: dict[str, RowPlan] = {}
        extra: dict[str, tuple[int, ...]] = {}
        forced: dict[str, tuple[int, ...]] = {}
        cached = out.scheduled_cached_reqs
        for e, group_rows, _ in planned:
            g = e.group
            assert g is not None and g.step is not None
            by_id = {c.request_id: c for c in e.children()}
            for cid, n in g.step.counts.items():
                child = by_id[cid]
                if cid not in e.sent:
                    out.scheduled_new_reqs.append(
                        NewRequestData.from_request(child, self.kv_cache_manager.get_block_ids(cid)))
                    e.sent.add(cid)
                else:
                    cached.req_ids.append(cid)
                    cached.new_block_ids.append(None)
                    cached.num_computed_tokens.append(child.num_computed_tokens)
                    cached.num_output_tokens.append(child.num_output_tokens)
                out.num_scheduled_tokens[cid] = n
                out.total_num_scheduled_tokens += n
                child.num_computed_tokens += n
                toks = g.take_forced(cid)
                if toks:
                    forced[cid] = toks
            rows.update(group_rows)
            for rid in unscheduled_sources(group_rows):
                extra[rid] = tuple(self.kv_cache_manager.get_block_ids(rid)[0])
        compat.attach_step_meta(out, HogwildStepMeta(rows=rows, extra_blocks=extra, forced=forced))

    # ---- results --------------------------------------------------------------------------------------------
    def update_from_output(self, scheduler_output: SchedulerOutput,
                           model_runner_output: ModelRunnerOutput) -> dict[int, EngineCoreOutputs]:
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        sampled = model_runner_output.sampled_token_ids
        index = model_runner_output.req_id_to_index
        for e in list(self._entries.values()):
            g = e.group
            if g is None:
                self._end(outputs, e, FinishReason.ERROR, {"error": e.error})
                continue
            step, g.step = g.step, None
            if step is not None and not step.decode and e.prompt_req is not None:
                # A pass-0 chunk is computed: C's full blocks in it may now serve other requests' prompts.
                compat.cache_computed(self.kv_cache_manager, e.prompt_req, min(g.prompt_done, g.cacheable_prompt))
                if not g.in_pass0 and g.prefill_started is not None:
                    g.prefill_seconds = time.perf_counter() - g.prefill_started
            if step is None or not step.decode or g.state.finished:
                continue
            got = [sampled[index[c.request_id]] if c.request_id in index and sampled else [] for c in e.workers]
            if any(len(t) != 1 for t in got):  # never expected; end this group alone, keep the engine serving
                logger.error("hogwild: group %s got %s tokens from one worker pass; ending the group", e.key,
                             [len(t) for t in got])
                self._release(e, RequestStatus.FINISHED_ERROR)
                self._end(outputs, e, FinishReason.ERROR, {"error": "hogwild: internal error: a worker pass "
                                                           "returned no token (see the engine log)"})
                continue
            gained = g.on_sampled([int(t[0]) for t in got])
            for child, new in zip(e.workers, gained, strict=True):
                child.append_output_token_ids(new)
            if g.state.finished:
                self._finish_group(outputs, e)
            elif e.choices:
                for w, client in enumerate(e.clients):
                    _emit(outputs, client, EngineCoreOutput(request_id=client.request_id,
                                                            new_token_ids=g.take_report(w)))
        self._collect_finishers(outputs)
        self._write_metrics()
        return outputs

    def _write_metrics(self, force: bool = False) -> None:
        """A snapshot for ``/metrics`` (``metrics.py``): the finished groups' totals plus the live groups' part;
        built only when the writer is due (at most every 0.2 s, or ``force``), not every step."""
        if not self._metrics_writer.due(force):
            return
        snap = copy.deepcopy(self._metrics)
        for e in self._entries.values():
            g = e.group
            if g is None:
                continue
            _add_group_tokens(snap, g)
            if e.admitted:
                snap.groups_running += 1
                snap.workers_running += g.size.rows
            elif e.result is None:
                snap.groups_waiting += 1
        snap.groups_waiting += len(self._arriving)
        self._metrics_writer.write(snap, force)

    def _count_finished(self, e: _Entry, reason: FinishReason) -> None:
        g = e.group
        if g is not None:
            _add_group_tokens(self._metrics, g)
        self._metrics.observe_finished(reason.name.lower(), max(0.0, time.time() - e.lead.arrival_time))
        self._write_metrics(force=True)

    def shutdown(self) -> None:
        self._metrics_writer.close()
        super().shutdown()

    def _finish_group(self, outputs: dict[int, EngineCoreOutputs], e: _Entry) -> None:
        g = e.group
        assert g is not None
        state = g.state
        result = group_output(state, g.prompt, g.banned, g.passes, g.size.blocks)
        result.usage.cached_prompt_tokens = g.prompt_cached
        result.usage.prefill_seconds = g.prefill_seconds
        reason = FINISH_REASONS[state.finish_reason or "length"]
        self._release(e, RequestStatus.FINISHED_STOPPED if reason == FinishReason.STOP
                      else RequestStatus.FINISHED_LENGTH_CAPPED)
        if g.cfg.finisher and result.answer is None:
            request = self._finishers.make(e.key, child_id(e.key, "finisher"), g.cfg, result, self.codec,
                                           self.eos_ids, self.max_model_len, like=e.lead)
            if request is not None:  # it runs as a plain request; the group ends when it does
                e.result = result
                super().add_request(request)
                return
        self._end(outputs, e, reason, result.to_dict())

    def _collect_finishers(self, outputs: dict[int, EngineCoreOutputs]) -> None:
        for done in self._finishers.collect(outputs, self.codec):
            if done.stop_now:
                super().finish_requests(done.finisher.request.request_id, RequestStatus.FINISHED_STOPPED)
            e = self._entries[done.finisher.key]
            assert e.group is not None and e.result is not None
            state = e.group.state
            reason = FinishReason.STOP if done.answer is not None else FINISH_REASONS[state.finish_reason or "length"]
            self._end(outputs, e, reason, e.result.to_dict())

    def _release(self, e: _Entry, status: RequestStatus) -> None:
        """Free every child's blocks (shared prompt blocks return to the pool at the last free)."""
        for child in e.children():
            if child.request_id in e.sent:
                self.finished_req_ids.add(child.request_id)
            self.kv_cache_manager.free(child)
            child.status = status
        e.prompt_req, e.workers, e.admitted = None, [], False
        for c in e.clients:
            c.status = status

    def _end(self, outputs: dict[int, EngineCoreOutputs], e: _Entry, reason: FinishReason,
             payload: dict[str, Any]) -> None:
        """The group's last output: its clients end with the result in ``kv_transfer_params["hogwild"]``; one
        client gets the transcript's token ids, a worker's client its last tokens and (in ``stop_reason``, which
        streamed responses also carry) the result's summary as JSON."""
        self._forget(e)
        self._count_finished(e, reason)
        result = {"hogwild": payload}
        track = self.finished_req_ids_dict is not None
        if not e.choices:
            g = e.group
            ids = g.state.transcript_token_ids() if g is not None and "error" not in payload else []
            _emit(outputs, e.lead, EngineCoreOutput(request_id=e.key, new_token_ids=ids, finish_reason=reason,
                                                    kv_transfer_params=result), finished_set=track)
            return
        summary = json.dumps({"hogwild": _summary(payload)})
        for w, client in enumerate(e.clients):
            new = e.group.take_report(w) if e.group is not None else []
            _emit(outputs, client, EngineCoreOutput(request_id=client.request_id, new_token_ids=new,
                                                    finish_reason=reason, stop_reason=summary,
                                                    kv_transfer_params=result), finished_set=track)

    def _forget(self, e: _Entry) -> None:
        self._entries.pop(e.key, None)
        for c in e.clients:
            self._client_key.pop(c.request_id, None)

    # ---- aborts and bookkeeping -----------------------------------------------------------------------------
    def finish_requests(self, request_ids: str | Iterable[str] | None,
                        finished_status: RequestStatus) -> list[Request]:
        """Aborts: a group ends as a whole, whichever of its clients is named (all of them: the frontend aborts
        every choice of a request); a group still waiting for choices to arrive is dropped."""
        ended: list[Request] = []
        if request_ids is None:
            keys = list(self._entries)
            ended = [c for arrived in self._arriving.values() for c in arrived.values()]
            for c in ended:
                c.status = finished_status
                self._client_key.pop(c.request_id, None)
            self._arriving.clear()
            ended += [c for key in keys for c in self._abort(self._entries[key], finished_status)]
            return ended + super().finish_requests(None, finished_status)
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        rest = []
        for rid in ids:
            key = self._client_key.get(rid)
            if key is None:
                rest.append(rid)
            elif key in self._entries:
                ended += self._abort(self._entries[key], finished_status)
            elif key in self._arriving:
                request = self._arriving[key].pop(int(_CHOICE_ID.fullmatch(rid).group(1)))  # type: ignore[union-attr]
                request.status = finished_status
                ended.append(request)
                del self._client_key[rid]
                if not self._arriving[key]:
                    del self._arriving[key]
        return ended + (super().finish_requests(rest, finished_status) if rest else [])

    def _abort(self, e: _Entry, status: RequestStatus) -> list[Request]:
        if e.group is not None:
            e.group.state.abort()
        for fid in self._finishers.of_group(e.key):
            self._finishers.pop(fid)
            super().finish_requests(fid, status)
        self._release(e, status)
        self._forget(e)
        self._count_finished(e, FinishReason.ABORT)
        return list(e.clients)

    def get_num_unfinished_requests(self) -> int:
        base = super().get_num_unfinished_requests()
        if self.pause_state == PauseState.PAUSED_ALL:
            return base
        return base + len(self._entries) + len(self._arriving)

    def group_ids(self) -> list[str]:
        """Keys of the groups held (pending, running, finishing, or with an error not yet reported)."""
        return list(self._entries)


def _emit(outputs: dict[int, EngineCoreOutputs], client: Request, output: EngineCoreOutput,
          finished_set: bool = False) -> None:
    """Add ``output`` to its client's outputs; ``finished_set``: also name the client in ``finished_requests``
    (kept only when the engine tracks finished ids per client, ``Scheduler.finished_req_ids_dict``)."""
    eco = outputs.get(client.client_index)
    if eco is None:
        eco = outputs[client.client_index] = EngineCoreOutputs()
    eco.outputs.append(output)
    if finished_set:
        eco.finished_requests = (eco.finished_requests or set()) | {client.request_id}


def _add_group_tokens(metrics: EngineMetrics, g: Group) -> None:
    """A group's part of the token counters, once it has run a pass (live and finished alike, so counters
    never go down)."""
    if not g.passes:
        return
    state = g.state
    forced = sum(sum(log.forced) for log in state.workers)
    generated = sum(len(log.tokens) for log in state.workers) - forced
    metrics.add_tokens(len(state.history), forced, generated, len(g.prompt), g.prompt_cached)


def _summary(payload: dict[str, Any]) -> dict[str, Any]:
    """What a streamed choice carries at its end: the result without its token lists."""
    if "error" in payload:
        return payload
    keep = ("answer", "answer_worker", "finish_reason", "transcript", "usage", "finisher_text", "finisher_skipped")
    return {k: payload[k] for k in keep if k in payload}
