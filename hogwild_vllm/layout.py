"""The group state machine: worker logs, steps, commits, forced tokens, and every worker's view as segments.

Pure Python over token ids. Natural positions: prompt token i sits at i; worker w's own token i at
``prompt_len + i``; glue token j at ``prompt_len + j``. A :class:`Segment` places a run of one source's tokens
at consecutive view positions, so its position delta is ``view_start - start``.

Driving loop (the reference engine and the vLLM scheduler both do this)::

    state = GroupState(cfg, prompt_len, codec)
    while not state.finished:
        plan = state.plan_pass()      # tokens each worker feeds now, its view, its queries' positions
        ...run the model, writing K/V of every fed token before any attention...
        state.mark_fed()
        state.on_sampled(sampled)     # one sampled token per worker: steps, commits, headers, stop rules
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from hogwild_vllm.config import GroupConfig, Layout

PROMPT = -1  # source id of the common prompt
GLUE = -2  # source id of the glue log


class TokenCodec(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class Segment:
    """Tokens ``start .. start+length-1`` (natural positions) of ``source`` at view positions from ``view_start``."""

    source: int
    start: int
    length: int
    view_start: int

    def __post_init__(self) -> None:
        assert self.source >= GLUE and self.start >= 0 and self.length > 0 and self.view_start >= 0, self

    @property
    def delta(self) -> int:
        return self.view_start - self.start

    @property
    def view_end(self) -> int:
        return self.view_start + self.length


@dataclass(frozen=True)
class Query:
    """A fed token: its natural position and its view position in its worker's view."""

    natural: int
    view: int


@dataclass(frozen=True)
class WorkerPass:
    tokens: list[int]  # fed this pass, in log order
    segments: list[Segment]  # the worker's whole view after this pass's tokens are written
    queries: list[Query]  # one per fed token


@dataclass(frozen=True)
class GluePiece:
    """One glue text: its tokens sit at ``offset..offset+len-1`` of the glue log."""

    offset: int
    tokens: tuple[int, ...]


@dataclass
class WorkerLog:
    name: str
    tokens: list[int] = field(default_factory=list)  # own tokens, forced and sampled
    forced: list[bool] = field(default_factory=list)
    step_start: int = 0  # own-token index where the uncommitted step starts
    step_index: int = 1  # number of the uncommitted step
    step_text: str = ""  # text of the uncommitted step, token by token
    text: str = ""  # text of all own tokens, token by token
    fed: int = 0  # own tokens whose K/V is written
    last_check: int = 0  # group generated-token count at this worker's last collaboration check

    def extend(self, ids: Sequence[int], texts: Sequence[str], forced: bool) -> None:
        self.tokens.extend(ids)
        self.forced.extend([forced] * len(ids))
        self.text += "".join(texts)


class GroupState:
    """One group's logs and history; builds each pass's feeds and views."""

    def __init__(self, cfg: GroupConfig, prompt_len: int, codec: TokenCodec) -> None:
        if prompt_len < 1:
            raise ValueError("the common prompt must hold at least one token")
        self.cfg = cfg
        self.tpl = cfg.templates
        self.prompt_len = prompt_len
        self.codec = codec
        self._token_text: dict[int, str] = {}
        self.workers = [WorkerLog(name) for name in cfg.worker_names]
        self.history: list[tuple[int, int, int]] = []  # committed steps: (worker, own start, own end)
        self.generated = 0  # sampled tokens of the whole group
        self.finished = False
        self.finish_reason: str | None = None  # "answer" | "length" | "abort"
        self.answer: str | None = None
        self.answer_worker: int | None = None
        self.glue_tokens: list[int] = []
        self.glue: dict[str, GluePiece] = {}
        names = ["others_header", "unfinished_marker", "own_header"]
        if cfg.layout is Layout.INTERLEAVED:
            names = ["own_header"]
        elif cfg.layout is Layout.CONTIGUOUS:
            names = []
        for name in names:
            ids = codec.encode(getattr(self.tpl, name))
            if ids:
                self.glue[name] = GluePiece(len(self.glue_tokens), tuple(ids))
                self.glue_tokens.extend(ids)
        for w in self.workers:
            self._force(w, codec.encode(self.tpl.intro_text(w.name)))

    # ---- views -------------------------------------------------------------------------------------------
    def view(self, w: int) -> list[Segment]:
        """Worker ``w``'s view over every token decided so far (fed or about to be fed)."""
        return self._view(w, self._shared_view())

    def _shared_view(self) -> list[Segment]:
        """The start every view shares: the prompt, then (step layouts) the committed steps; :meth:`plan_pass`
        builds it once for all workers."""
        out: list[Segment] = []
        _put(out, PROMPT, 0, self.prompt_len)
        if self.cfg.layout is not Layout.CONTIGUOUS:
            for v, a, b in self.history:
                _put(out, v, self.prompt_len + a, b - a)
        return out

    def _view(self, w: int, shared: list[Segment]) -> list[Segment]:
        """Worker ``w``'s view: ``shared`` (:meth:`_shared_view`, not modified) and what only this view has."""
        out = list(shared)

        def put_glue(name: str) -> None:
            piece = self.glue.get(name)
            if piece:
                _put(out, GLUE, self.prompt_len + piece.offset, len(piece.tokens))

        def put_own(v: int, a: int, b: int) -> None:
            _put(out, v, self.prompt_len + a, b - a)

        if self.cfg.layout is Layout.CONTIGUOUS:
            for v, log in enumerate(self.workers):
                if v != w:
                    put_own(v, 0, len(log.tokens))
            put_own(w, 0, len(self.workers[w].tokens))
            return out
        if self.cfg.layout is Layout.COMBINED:
            put_glue("others_header")
            for v, log in enumerate(self.workers):
                if v != w and len(log.tokens) > log.step_start:
                    put_own(v, log.step_start, len(log.tokens))
                    put_glue("unfinished_marker")
        put_glue("own_header")
        me = self.workers[w]
        put_own(w, me.step_start, len(me.tokens))
        return out

    def longest_view(self, own_tokens: int) -> int:
        """An upper bound on any worker's view length (the largest position a query can take, plus one) when every
        worker holds at most ``own_tokens`` own tokens: the prompt, all workers' tokens, and the glue a view places
        (the unfinished marker once per peer)."""
        glue = sum(len(piece.tokens) * (len(self.workers) - 1 if name == "unfinished_marker" else 1)
                   for name, piece in self.glue.items())
        return self.prompt_len + len(self.workers) * own_tokens + glue

    def glue_views(self) -> list[tuple[list[Segment], list[Query]]]:
        """Views that compute the glue: each piece attends to the prompt and causally to itself."""
        views = []
        for piece in self.glue.values():
            start = self.prompt_len + piece.offset
            segs = [Segment(PROMPT, 0, self.prompt_len, 0), Segment(GLUE, start, len(piece.tokens), self.prompt_len)]
            queries = [Query(start + i, self.prompt_len + i) for i in range(len(piece.tokens))]
            views.append((segs, queries))
        return views

    def plan_pass(self) -> list[WorkerPass]:
        """Per worker: the tokens to feed now (all not yet fed), its view including them, their query positions."""
        plans = []
        shared = self._shared_view()
        for w, log in enumerate(self.workers):
            segs = self._view(w, shared)
            queries = [Query(self.prompt_len + i, _view_pos(segs, w, self.prompt_len + i))
                       for i in range(log.fed, len(log.tokens))]
            plans.append(WorkerPass(log.tokens[log.fed:], segs, queries))
        return plans

    def mark_fed(self) -> None:
        for log in self.workers:
            log.fed = len(log.tokens)

    # ---- sampling results ------------------------------------------------------------------------------
    def on_sampled(self, sampled: Sequence[int]) -> None:
        """Append each worker's sampled token; commit steps (worker-index order), force headers, apply stop rules."""
        if self.finished:
            raise RuntimeError("the group has finished")
        if len(sampled) != len(self.workers):
            raise ValueError(f"expected {len(self.workers)} sampled tokens, got {len(sampled)}")
        self.generated += len(sampled)
        ended = []
        for w, (log, tok) in enumerate(zip(self.workers, sampled, strict=True)):
            text = self.token_text(tok)
            ends = self.cfg.layout.has_steps and self._ends_step(log.step_text, text)
            log.extend([tok], [text], forced=False)
            log.step_text += text
            if self.answer is None and "}" in text:
                answer = find_answer(log.text, self.tpl.answer_marker)
                if answer is not None:
                    # Take the answer's text from the decoded sequence: token-by-token text can differ from it
                    # (a character split over byte tokens, leading spaces a tokenizer drops for a lone token).
                    decoded = find_answer(self.codec.decode(log.tokens), self.tpl.answer_marker)
                    self.answer, self.answer_worker = (answer if decoded is None else decoded), w
            if ends:
                ended.append(w)
        if self.answer is not None:
            return self._finish("answer")
        if any(len(log.tokens) >= self.cfg.max_tokens for log in self.workers):
            return self._finish("length")
        for w in ended:
            self._commit(w)

    def abort(self) -> None:
        if not self.finished:
            self._finish("abort")

    def _commit(self, w: int) -> None:
        log = self.workers[w]
        self.history.append((w, log.step_start, len(log.tokens)))
        log.step_start = len(log.tokens)
        log.step_index += 1
        every = self.cfg.collab_check_every
        check = every > 0 and self.generated - log.last_check >= every
        if check:
            log.last_check = self.generated
        log.step_text = ""
        self._force(log, self.codec.encode(self.tpl.header_text(log.name, log.step_index, check)))

    def _force(self, log: WorkerLog, ids: list[int]) -> None:
        texts = [self.token_text(t) for t in ids]
        log.extend(ids, texts, forced=True)
        log.step_text += "".join(texts)

    def _ends_step(self, step_text: str, token_text: str) -> bool:
        """Whether this token completes a separator that follows sentence punctuation (spaces and tabs between
        them allowed). The separator may lie inside the token or begin in earlier tokens of the step ("\n" then
        "\n"): only an occurrence whose last character is this token's counts, so a step ends exactly once."""
        sep = self.tpl.step_separator
        text = step_text + token_text
        at = text.find(sep, max(len(step_text) - len(sep) + 1, 0))
        while at >= 0:
            before = text[:at].rstrip(" \t")
            if before and before[-1] in self.tpl.sentence_end:
                return True
            at = text.find(sep, at + 1)
        return False

    def _finish(self, reason: str) -> None:
        self.finished = True
        self.finish_reason = reason

    # ---- text --------------------------------------------------------------------------------------------
    def token_text(self, tok: int) -> str:
        text = self._token_text.get(tok)
        if text is None:
            text = self._token_text[tok] = self.codec.decode([tok])
        return text

    def _transcript_parts(self) -> list[tuple[list[int], bool]]:
        """The transcript's pieces as (own token ids, unfinished?): committed steps in commit order, then each
        worker's uncommitted tokens (contiguous layout: every worker's whole log, unfinished)."""
        if self.cfg.layout is Layout.CONTIGUOUS:
            return [(list(log.tokens), True) for log in self.workers]
        parts = [(self.workers[w].tokens[a:b], False) for w, a, b in self.history]
        parts += [(log.tokens[log.step_start:], True) for log in self.workers if len(log.tokens) > log.step_start]
        return parts

    def transcript(self) -> str:
        """History in commit order, then each worker's uncommitted tokens marked unfinished."""
        marker = self.tpl.unfinished_marker
        return "".join(self.codec.decode(ids) + (marker if open_ else "") for ids, open_ in self._transcript_parts())

    def transcript_token_ids(self) -> list[int]:
        """The transcript as token ids (each piece's own ids; the unfinished marker encoded after open pieces)."""
        marker = self.codec.encode(self.tpl.unfinished_marker)
        return [t for ids, open_ in self._transcript_parts() for t in (ids + marker if open_ else ids)]


def _put(out: list[Segment], source: int, start: int, length: int) -> None:
    """Append a run of ``length`` tokens of ``source`` from natural position ``start`` at the view's end, merged
    into the last segment when it continues it; nothing for ``length`` <= 0. Segments are never modified: a merge
    replaces the last one, so a list copied from a shared start stays independent of it."""
    if length <= 0:
        return
    last = out[-1] if out else None
    if last is not None and last.source == source and last.start + last.length == start:
        out[-1] = Segment(source, last.start, last.length + length, last.view_start)
    else:
        out.append(Segment(source, start, length, last.view_end if last is not None else 0))


def _view_pos(segs: list[Segment], source: int, natural: int) -> int:
    for s in segs:
        if s.source == source and s.start <= natural < s.start + s.length:
            return s.view_start + natural - s.start
    raise AssertionError(f"token at natural position {natural} of source {source} is not in the view")


def find_answer(text: str, marker: str) -> str | None:
    """The content of the first balanced ``marker ... }`` in ``text`` (the marker ends with its open brace)."""
    start = text.find(marker)
    while start >= 0:
        depth, i = 1, start + len(marker)
        while i < len(text):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[start + len(marker): i]
            i += 1
        start = text.find(marker, start + 1)
    return None
