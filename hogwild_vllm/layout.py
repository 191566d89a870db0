"""The group state machine: worker logs, steps, commits, forced tokens, and every worker's view as segments.

Pure Python over token ids. Natural positions: prompt token i sits at i; worker w's own token i at
``log_start + i`` (``log_start`` is ``prompt_len`` unless the engine starts worker logs on a KV block boundary);
glue token j at ``prompt_len + j``. A :class:`Segment` places a run of one source's tokens
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

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from hogwild_vllm.config import GroupConfig, Layout

PROMPT = -1  # source id of the common prompt
GLUE = -2  # source id of the glue log

Run = tuple[int, int, int]  # (source, natural start, length): tokens a view places next
NO_RUN: Run = (GLUE, 0, 0)  # a glue piece whose template is empty
# A Segment as a plain tuple (source, start, length, view_start): the form views are built in, several times
# cheaper to make than Segment objects (each pass makes a few per view).
SegmentTuple = tuple[int, int, int, int]


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


class WorkerPass(NamedTuple):
    """One worker's part of a pass. The view is kept as plain tuples (:data:`SegmentTuple`), the form it is built
    in; ``segments`` and ``queries`` make the typed objects."""

    tokens: list[int]  # fed this pass, in log order
    view: list[SegmentTuple]  # the worker's whole view after this pass's tokens are written
    positions: list[tuple[int, int]]  # (natural, view position) of each fed token
    # The first ``common`` entries of ``view`` are those of the sequence every view of the pass starts with a part
    # of (:class:`_Common`): the same objects in every worker's plan, so a consumer converts them once.
    common: int = 0

    @property
    def segments(self) -> list[Segment]:
        return [Segment(*s) for s in self.view]

    @property
    def queries(self) -> list[Query]:  # one per fed token
        return [Query(*q) for q in self.positions]


class _Common(NamedTuple):
    """The sequence every view of a pass starts with a part of: the shared start (prompt, committed steps), the
    others header (combined), then every worker's runs that its peers' views place there, as a view that skipped
    no worker would hold them. Worker w's view is the sequence up to w's runs, then its own part."""

    segments: list[SegmentTuple]
    shared: int  # segments of the shared start
    runs: list[Run]  # the workers' runs after the head (the others header), in worker index order
    # v -> (index of v's first run in ``runs``, index after its last, segments of ``segments`` before its runs or
    # None where its first run merged into the segment before it) for each worker with runs there
    spans: dict[int, tuple[int, int, int | None]]


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

    def __init__(self, cfg: GroupConfig, prompt_len: int, codec: TokenCodec, log_start: int | None = None) -> None:
        """``log_start``: the natural position of every worker's own token 0 (default ``prompt_len``; a later start
        leaves positions ``prompt_len..log_start-1`` of every worker log empty: no token, no key)."""
        if prompt_len < 1:
            raise ValueError("the common prompt must hold at least one token")
        if log_start is not None and log_start < prompt_len:
            raise ValueError(f"worker logs cannot start at {log_start}, inside the {prompt_len}-token prompt")
        self.cfg = cfg
        self.tpl = cfg.templates
        self.prompt_len = prompt_len
        self.log_start = prompt_len if log_start is None else log_start
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
        self._glue_runs = {name: (GLUE, prompt_len + piece.offset, len(piece.tokens))
                           for name, piece in self.glue.items()}
        # The start every view shares, built up to the first ``_shared_steps`` entries of the history.
        self._shared: tuple[SegmentTuple, ...] = ((PROMPT, 0, prompt_len, 0),)
        self._shared_steps = 0
        for w in self.workers:
            self._force(w, codec.encode(self.tpl.intro_text(w.name)))

    # ---- views -------------------------------------------------------------------------------------------
    def view(self, w: int) -> list[Segment]:
        """Worker ``w``'s view over every token decided so far (fed or about to be fed)."""
        return [Segment(*s) for s in self._view(w, self._common())[0]]

    def shared_start(self) -> tuple[SegmentTuple, ...]:
        """The start every view shares: the prompt, then (step layouts) the committed steps. The same tuple from
        pass to pass until a commit, then extended by the steps committed since (commits only append to the
        history)."""
        if self.cfg.layout is Layout.CONTIGUOUS or self._shared_steps == len(self.history):
            return self._shared
        if self._shared_steps > len(self.history):  # never done by this class: start again from the prompt
            self._shared, self._shared_steps = self._shared[:1], 0
        out = list(self._shared)
        _extend(out, ((v, self.log_start + a, b - a) for v, a, b in self.history[self._shared_steps:]))
        self._shared, self._shared_steps = tuple(out), len(self.history)
        return self._shared

    def _peer_runs(self) -> list[tuple[int, tuple[Run, ...]]]:
        """(v, runs) for each worker v, in index order, whose tokens its peers' views place after the shared start:
        combined, its uncommitted step then the unfinished marker (none while the step is empty); contiguous, its
        whole log; interleaved, none."""
        p = self.log_start
        if self.cfg.layout is Layout.CONTIGUOUS:
            return [(v, ((v, p, len(log.tokens)),)) for v, log in enumerate(self.workers)]
        if self.cfg.layout is Layout.INTERLEAVED:
            return []
        marker = self._glue_runs.get("unfinished_marker", NO_RUN)
        return [(v, ((v, p + log.step_start, len(log.tokens) - log.step_start), marker))
                for v, log in enumerate(self.workers) if len(log.tokens) > log.step_start]

    def _common(self) -> _Common:
        """This pass's common sequence (:class:`_Common`)."""
        shared = self.shared_start()
        segments = list(shared)
        _extend(segments, self._head())
        runs: list[Run] = []
        placed = []
        for v, theirs in self._peer_runs():
            placed.append((v, len(runs), len(runs) + len(theirs), len(segments), segments[-1]))
            runs += theirs
            _extend(segments, theirs)
        spans = {v: (begin, end, cut if segments[cut - 1] is last else None)  # a merge replaces the last one
                 for v, begin, end, cut, last in placed}
        return _Common(segments, len(shared), runs, spans)

    def _head(self) -> list[Run]:
        """What a view places between the shared start and the peers' runs: the others header (combined)."""
        return [self._glue_runs.get("others_header", NO_RUN)] if self.cfg.layout is Layout.COMBINED else []

    def _view(self, w: int, common: _Common) -> tuple[list[SegmentTuple], int]:
        """Worker ``w``'s view, and how many of its first segments are those of ``common`` (the same objects):
        the common sequence up to w's runs (all of it when w has none there), then the peers' runs after w's and
        w's own part (the own header and uncommitted step, or the whole log in the contiguous layout)."""
        me = self.workers[w]
        if self.cfg.layout is Layout.CONTIGUOUS:
            own: list[Run] = [(w, self.log_start, len(me.tokens))]
        else:
            own = [self._glue_runs.get("own_header", NO_RUN),
                   (w, self.log_start + me.step_start, len(me.tokens) - me.step_start)]
        span = common.spans.get(w)
        if span is None:  # w has no runs there: all of it
            cut = len(common.segments)
            out, runs = list(common.segments), own
        elif span[2] is not None:  # the common sequence up to w's runs, then the peers' runs after them
            cut = span[2]
            out, runs = common.segments[:cut], common.runs[span[1]:] + own
        else:  # w's first run merged into the segment before it, which w's view does not hold: from the shared start
            cut = common.shared
            out, runs = list(self.shared_start()), self._head() + common.runs[:span[0]] + common.runs[span[1]:] + own
        _extend(out, runs)
        return out, (cut if out[cut - 1] is common.segments[cut - 1] else cut - 1)

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
        """Per worker: the tokens to feed now (all not yet fed), its view including them, their query positions,
        and how many of the view's first segments are those of the pass's common sequence (:class:`_Common`)."""
        plans = []
        common = self._common()
        p = self.log_start
        for w, log in enumerate(self.workers):
            view, shared = self._view(w, common)
            positions = [(p + i, _view_pos(view, w, p + i)) for i in range(log.fed, len(log.tokens))]
            plans.append(WorkerPass(log.tokens[log.fed:], view, positions, shared))
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
        steps = self.cfg.layout.has_steps
        for w, (log, tok) in enumerate(zip(self.workers, sampled, strict=True)):
            text = self.token_text(tok)
            ends = steps and self._ends_step(log.step_text, text)
            log.tokens.append(tok)
            log.forced.append(False)
            log.text += text
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
        if sep[-1] not in token_text:  # an occurrence ending in this token ends with one of its characters
            return False
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


def _extend(out: list[SegmentTuple], runs: Iterable[Run]) -> None:
    """Append runs ``(source, start, length)`` of tokens at the view's end, each merged into the last segment when
    it continues it; a run of length <= 0 adds nothing. Segments are never modified: a merge replaces the last
    one, so a list copied from a shared start stays independent of it."""
    source, start, length, view_start = out[-1] if out else (GLUE - 1, 0, 0, 0)
    for s, a, n in runs:
        if n <= 0:
            continue
        assert s >= GLUE and a >= 0, (s, a)
        if s == source and start + length == a:
            length += n
            out[-1] = (source, start, length, view_start)
        else:
            source, start, length, view_start = s, a, n, view_start + length
            out.append((source, start, length, view_start))


def _view_pos(view: list[SegmentTuple], source: int, natural: int) -> int:
    """The view position of a token of ``source``; searched from the view's end, where a worker's fed tokens are:
    its uncommitted step last, or a step it committed in this pass near the end of the shared start."""
    for s, start, length, view_start in reversed(view):
        if s == source and start <= natural < start + length:
            return view_start + natural - start
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
