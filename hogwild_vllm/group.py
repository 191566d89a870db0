"""One hogwild group as the engine runs it, without vLLM: its size and whether it fits an engine, the plan of each
step (all of the group's rows or none; pass 0 chunked to the token budget), and what each worker has produced since
it was last reported (the live stream of that worker's choice).

The scheduler (``scheduler.py``) turns these plans into vLLM requests and ``SchedulerOutput`` rows; everything here
is plain Python over :class:`~hogwild_vllm.layout.GroupState` and is unit-tested without an engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from hogwild_vllm.config import GroupConfig
from hogwild_vllm.layout import GroupState, TokenCodec
from hogwild_vllm.metadata import RowPlan, plan_rows, source_names


@dataclass(frozen=True)
class EngineLimits:
    """What an engine offers one group (read from the vLLM scheduler by ``HogwildScheduler``)."""

    max_model_len: int
    block_size: int
    total_blocks: int  # KV blocks of the whole cache (the null block excluded)
    max_rows: int  # max_num_seqs
    token_budget: int  # tokens one step may feed (max_num_batched_tokens)


@dataclass(frozen=True)
class Sizing:
    """What a group holds for its whole life, reserved at admission so it never allocates or is preempted."""

    tmax: int  # per-worker token slots from log_start (max_tokens, the longest step header, one spare)
    blocks: int  # KV blocks: the prompt request's (C + glue) plus each worker's own, C's blocks shared
    rows: int  # batch rows (one per worker; pass 0 uses one)
    widest_pass: int  # the most tokens one step of the group feeds
    longest_view: int  # the largest view a query can sit in (positions), bounded by max_model_len
    block_size: int  # of the KV cache it was sized for
    log_start: int  # natural position of each worker's own token 0: the first block boundary at or after |C|


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def worker_log_start(prompt_len: int, block_size: int) -> int:
    """Where worker logs start in the engine: the first KV block boundary at or after the prompt's end. A worker
    request holds C's blocks (shared with the prompt request, the last, partial one included, which the worker
    only reads) and then blocks of its own from their first slot: at most one partial block a worker (its last)
    instead of two (a copy of C's partial last block, mostly unused, and its last)."""
    return cdiv(prompt_len, block_size) * block_size


def engine_state(cfg: GroupConfig, prompt_len: int, codec: TokenCodec, block_size: int) -> GroupState:
    """A new group's state as an engine with ``block_size``-token KV blocks runs it (worker logs on a boundary)."""
    return GroupState(cfg, prompt_len, codec, log_start=worker_log_start(prompt_len, block_size))


def size_group(cfg: GroupConfig, state: GroupState, codec: TokenCodec, block_size: int) -> Sizing:
    """What ``state``'s group holds in an engine with ``block_size``-token KV blocks. Worker logs must start where
    the engine puts them (``state.log_start == worker_log_start(...)``)."""
    p, n, g, start = state.prompt_len, cfg.workers, len(state.glue_tokens), state.log_start
    if start != worker_log_start(p, block_size):
        raise ValueError(f"worker logs start at {start}, not at the block boundary "
                         f"{worker_log_start(p, block_size)} after the {p}-token prompt (block size {block_size})")
    header = max(len(codec.encode(cfg.templates.header_text(name, cfg.max_tokens + 1, True)))
                 for name in cfg.worker_names)
    longest_start = max(len(log.tokens) for log in state.workers)
    tmax = max(cfg.max_tokens, longest_start) + header + 1
    blocks = cdiv(p + g, block_size) + n * cdiv(tmax, block_size)
    widest = max(sum(len(log.tokens) for log in state.workers), n * (header + 1), g + 1)
    return Sizing(tmax, blocks, n, widest, state.longest_view(tmax), block_size, start)


def fit_problems(cfg: GroupConfig, prompt_len: int, size: Sizing, limits: EngineLimits) -> list[str]:
    """Why a group cannot run on an engine, each naming the setting it exceeds (empty when it fits)."""
    problems = []
    if size.log_start + size.tmax > limits.max_model_len:
        problems.append(f"the prompt ({prompt_len} tokens, rounded up to {size.log_start}: worker logs start on a "
                        f"KV block boundary) plus a worker's budget ({size.tmax} token slots: max_tokens "
                        f"{cfg.max_tokens} + the longest step header + 1) exceeds max_model_len "
                        f"{limits.max_model_len}")
    if size.longest_view > limits.max_model_len:  # queries sit at view positions: the whole group must fit
        problems.append(f"a worker's view can reach {size.longest_view} positions (the prompt, {cfg.workers} "
                        f"workers x {size.tmax} token slots and the layout's markers), which exceeds "
                        f"max_model_len {limits.max_model_len}")
    if size.blocks > limits.total_blocks:
        problems.append(f"the group needs {size.blocks} KV blocks of {limits.block_size} tokens, the whole cache "
                        f"has {limits.total_blocks}")
    if size.rows > limits.max_rows:
        problems.append(f"the group needs {size.rows} batch rows, max_num_seqs is {limits.max_rows}")
    if size.widest_pass > limits.token_budget:
        problems.append(f"one pass of the group feeds up to {size.widest_pass} tokens, max_num_batched_tokens is "
                        f"{limits.token_budget}")
    return problems


def pass0_end(done: int, prompt_len: int, glue: int, avail: int) -> int:
    """Where the next pass-0 chunk of the prompt ends (``done`` when nothing fits ``avail`` tokens). The glue rides
    with the last chunk, so a chunk that cannot also carry it stops one token short of the prompt's end."""
    if prompt_len - done + glue <= avail:
        return prompt_len
    return done + max(0, min(prompt_len - done - 1, avail))


@dataclass(frozen=True)
class StepPlan:
    """One group's part of one step: tokens per child request id, the rows' views, and whether workers sample."""

    counts: dict[str, int]
    rows: dict[str, RowPlan]
    decode: bool  # a worker pass (every worker samples), not a pass-0 prompt chunk

    @property
    def tokens(self) -> int:
        return sum(self.counts.values())


@dataclass
class Group:
    """A group's progress: pass 0 over the prompt, worker passes, forced tokens owed to the runner, and how much
    of each worker's log has been reported. Child requests are named by id only (``prompt_id``, ``worker_ids``)."""

    cfg: GroupConfig
    prompt: list[int]
    state: GroupState
    banned: list[int]
    size: Sizing
    prompt_id: str
    worker_ids: list[str]
    prompt_done: int = 0  # prompt tokens written (pass 0) or found in the prefix cache
    prompt_cached: int = 0  # prompt tokens found in the prefix cache at admission (never computed)
    passes: int = 0  # steps the group ran in
    prefill_started: float | None = None  # clock reading when pass 0 was first planned (set by the engine)
    prefill_seconds: float | None = None  # pass 0's wall time, from its first plan to its last chunk's result
    reported: list[int] = field(default_factory=list)  # per worker: log tokens already streamed
    forced: dict[str, tuple[int, ...]] = field(default_factory=dict)  # worker id -> forced tokens for the runner
    step: StepPlan | None = None  # the step in flight

    def __post_init__(self) -> None:
        self.sources = source_names(self.state, self.worker_ids, self.prompt_id)
        if not self.reported:
            self.reported = [0] * len(self.worker_ids)

    @property
    def in_pass0(self) -> bool:
        return self.prompt_done < len(self.prompt)

    @property
    def cacheable_prompt(self) -> int:
        """Prompt tokens whose KV blocks a prefix cache may take and give: C's full blocks and nothing after (a
        block holding glue has KV that attends to C alone, not causally, so it must never be shared)."""
        return len(self.prompt) // self.size.block_size * self.size.block_size

    def start_from_cache(self, tokens: int) -> None:
        """Pass 0 starts after ``tokens`` prompt tokens found in the prefix cache (whole blocks, fewer than the
        prompt: the last chunk always computes at least one prompt token, with the glue)."""
        if self.passes or not 0 <= tokens < len(self.prompt) or tokens % self.size.block_size:
            raise ValueError(f"cannot start from {tokens} cached prompt tokens (prompt {len(self.prompt)}, block "
                             f"size {self.size.block_size}, passes run {self.passes})")
        self.prompt_done = self.prompt_cached = tokens

    def plan(self, avail: int) -> StepPlan | None:
        """This step's rows within ``avail`` tokens, or None (the group sits the step out, all rows together)."""
        state, p = self.state, len(self.prompt)
        if state.finished:
            return None
        if self.in_pass0:
            glue = len(state.glue_tokens)
            end = pass0_end(self.prompt_done, p, glue, avail)
            if end <= self.prompt_done:
                return None
            rows = plan_rows(state, self.sources, pass0_chunk=(self.prompt_done, end))
            plan = StepPlan({self.prompt_id: end - self.prompt_done + (glue if end == p else 0)}, rows, False)
            self.prompt_done = end
        else:
            passes = state.plan_pass()
            if sum(len(wp.tokens) for wp in passes) > avail:
                return None
            rows = plan_rows(state, self.sources, plans=passes)
            plan = StepPlan({wid: len(wp.tokens) for wid, wp in zip(self.worker_ids, passes, strict=True)}, rows,
                            True)
            state.mark_fed()
        self.step = plan
        self.passes += 1
        return plan

    def take_forced(self, worker_id: str) -> tuple[int, ...] | None:
        return self.forced.pop(worker_id, None)

    def on_sampled(self, tokens: Sequence[int]) -> list[list[int]]:
        """Apply one worker pass's samples; per worker, the tokens its request gains (the sampled one first, then
        any forced header, which the runner must also write: :meth:`take_forced`)."""
        self.state.on_sampled(tokens)
        gained = []
        for wid, log, tok in zip(self.worker_ids, self.state.workers, tokens, strict=True):
            new = list(log.tokens[log.fed:])
            assert new and new[0] == tok, (wid, new, tok)
            if len(new) > 1:
                self.forced[wid] = tuple(new[1:])
            gained.append(new)
        return gained

    def take_report(self, w: int) -> list[int]:
        """Worker ``w``'s log tokens not yet streamed (intro and headers included), marking them streamed."""
        log = self.state.workers[w]
        new = list(log.tokens[self.reported[w]:])
        self.reported[w] = len(log.tokens)
        return new
