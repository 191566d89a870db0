"""The group state machine (hogwild_vllm.layout): steps, commits, forced headers, stop rules and every view.

Two toy codecs make token text explicit: ``CharCodec`` has one token per character (id = ord(c)), and
``MergeCodec`` adds a few multi-character tokens (".\\n\\n", "\\boxed{", ...) so that "a token whose text contains
the separator" can happen. Scripts are lists of passes; a pass holds one token text per worker.

Part 1 is hand-built cases with exact segment lists. Part 2 drives random scripts with hypothesis and compares the
state with an oracle written here from the spec (the layouts in docs/architecture.md), then checks view invariants.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hogwild_vllm.config import GroupConfig, Layout, Templates
from hogwild_vllm.layout import GLUE, PROMPT, GroupState, Query, Segment, find_answer

S = Segment

# ---- codecs ------------------------------------------------------------------------------------------------------


class CharCodec:
    """One token per character."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(chr(i) for i in ids)

    def id(self, piece: str) -> int:
        (tok,) = self.encode(piece)
        return tok


class MergeCodec(CharCodec):
    """Characters plus a few merged tokens (ids above the unicode range); encode is greedy longest match."""

    MERGES = ("\n\n", ".\n\n", "?\n\n", "!\n\n", " \n\n", "\t\n\n", "x.\n\nY", "\\boxed{", ".\n")
    BASE = 0x110000

    def encode(self, text: str) -> list[int]:
        out, i = [], 0
        while i < len(text):
            best = max((m for m in self.MERGES if text.startswith(m, i)), key=len, default=None)
            if best is None:
                out.append(ord(text[i]))
                i += 1
            else:
                out.append(self.BASE + self.MERGES.index(best))
                i += len(best)
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.MERGES[i - self.BASE] if i >= self.BASE else chr(i) for i in ids)

    def id(self, piece: str) -> int:
        return self.BASE + self.MERGES.index(piece) if len(piece) > 1 else ord(piece)


CHAR = CharCodec()
MERGE = MergeCodec()

# Short templates keep hand-computed positions readable: "A1:" is A's intro, "A2:" its step 2 header.
SHORT = Templates(intro="{name}1:", step_header="{name}{step}:", check_question="(c)",
                  others_header="<O>", unfinished_marker="~", own_header="<M>")
NAMES = ("A", "B", "C", "D", "E", "F")


def make(layout: str, workers: int, prompt_len: int = 10, codec: CharCodec = MERGE, templates: Templates = SHORT,
         **kw: object) -> GroupState:
    kw.setdefault("collab_check_every", 0)
    cfg = GroupConfig(workers=workers, layout=layout, worker_names=NAMES[:workers], templates=templates,
                      **kw)  # type: ignore[arg-type]
    return GroupState(cfg, prompt_len, codec)


def run(state: GroupState, passes: Sequence[Sequence[str]]) -> None:
    """Each pass: plan, mark fed, then sample one token text per worker."""
    codec = state.codec
    for texts in passes:
        state.plan_pass()
        state.mark_fed()
        state.on_sampled([codec.id(t) for t in texts])  # type: ignore[attr-defined]


def expand(segs: Sequence[Segment]) -> list[tuple[int, int]]:
    """The view as (source, natural position) per view position."""
    out: list[tuple[int, int]] = []
    for s in sorted(segs, key=lambda s: s.view_start):
        assert s.view_start == len(out), f"gap or overlap at {s}"
        out.extend((s.source, s.start + i) for i in range(s.length))
    return out


def text_of(state: GroupState, w: int) -> str:
    return state.codec.decode(state.workers[w].tokens)


# ---- Part 1: hand-built cases ------------------------------------------------------------------------------------

class TestCombined:
    def test_initial_views_and_first_pass(self) -> None:
        st_ = make("combined", 2)
        # glue log: "<O>" at 10..12, "~" at 13, "<M>" at 14..16; marker and own header are adjacent -> one segment
        assert st_.glue_tokens == CHAR.encode("<O>~<M>")
        assert st_.view(0) == [S(PROMPT, 0, 10, 0), S(GLUE, 10, 3, 10), S(1, 10, 3, 13), S(GLUE, 13, 4, 16),
                               S(0, 10, 3, 20)]
        assert st_.view(1) == [S(PROMPT, 0, 10, 0), S(GLUE, 10, 3, 10), S(0, 10, 3, 13), S(GLUE, 13, 4, 16),
                               S(1, 10, 3, 20)]
        plans = st_.plan_pass()
        for w, name in enumerate("AB"):
            assert plans[w].tokens == CHAR.encode(f"{name}1:")
            assert plans[w].queries == [Query(10, 20), Query(11, 21), Query(12, 22)]
            assert plans[w].segments == st_.view(w)
        st_.mark_fed()
        st_.on_sampled([MERGE.id("x"), MERGE.id("y")])
        plans = st_.plan_pass()
        # the peer's token sampled in the same pass is already in the view (instant visibility)
        assert plans[0].segments == [S(PROMPT, 0, 10, 0), S(GLUE, 10, 3, 10), S(1, 10, 4, 13), S(GLUE, 13, 4, 17),
                                     S(0, 10, 4, 21)]
        assert plans[0].tokens == [ord("x")] and plans[0].queries == [Query(13, 24)]
        assert plans[1].tokens == [ord("y")] and plans[1].queries == [Query(13, 24)]

    def test_commits_headers_and_coalescing(self) -> None:
        st_ = make("combined", 2)
        run(st_, [["x", "y"], [".\n\n", ".\n\n"]])
        # both steps end in one pass: committed in worker-index order, each followed by its forced step-2 header
        assert st_.history == [(0, 0, 5), (1, 0, 5)]
        assert text_of(st_, 0) == "A1:x.\n\nA2:" and text_of(st_, 1) == "B1:y.\n\nB2:"
        assert st_.workers[0].forced == [True] * 3 + [False] * 2 + [True] * 3
        assert st_.workers[0].step_start == 5
        plans = st_.plan_pass()
        assert plans[0].segments == [S(PROMPT, 0, 10, 0), S(0, 10, 5, 10), S(1, 10, 5, 15), S(GLUE, 10, 3, 20),
                                     S(1, 15, 3, 23), S(GLUE, 13, 4, 26), S(0, 15, 3, 30)]
        # the step-ending token is fed after its commit: its query sits in the history part of the view
        assert plans[0].tokens == [MERGE.id(".\n\n")] + CHAR.encode("A2:")
        assert plans[0].queries == [Query(14, 14), Query(15, 30), Query(16, 31), Query(17, 32)]
        st_.mark_fed()
        st_.on_sampled([MERGE.id("z"), MERGE.id("!\n\n")])  # only B ends ("B2:!")
        run(st_, [["?\n\n", "q"]])  # then A ends ("A2:z?")
        assert st_.history == [(0, 0, 5), (1, 0, 5), (1, 5, 9), (0, 5, 10)]
        assert text_of(st_, 0) == "A1:x.\n\nA2:z?\n\nA3:" and text_of(st_, 1) == "B1:y.\n\nB2:!\n\nB3:q"
        # B's two consecutive history steps are one segment; A's uncommitted step is only its header
        assert st_.view(1) == [S(PROMPT, 0, 10, 0), S(0, 10, 5, 10), S(1, 10, 9, 15), S(0, 15, 5, 24),
                               S(GLUE, 10, 3, 29), S(0, 20, 3, 32), S(GLUE, 13, 4, 35), S(1, 19, 4, 39)]
        assert st_.transcript() == "A1:x.\n\n" "B1:y.\n\n" "B2:!\n\n" "A2:z?\n\n" "A3:~" "B3:q~"

    def test_three_workers_same_pass_order(self) -> None:
        st_ = make("combined", 3, prompt_len=4)
        run(st_, [["a", "b", "c"], ["c", "b", "a"]])
        run(st_, [[".\n\n", "x", "!\n\n"]])  # C (index 2) and A (index 0) end together; B continues
        assert st_.history == [(0, 0, 6), (2, 0, 6)]
        run(st_, [["y", ".\n\n", "z"]])
        assert st_.history == [(0, 0, 6), (2, 0, 6), (1, 0, 7)]
        assert [text_of(st_, w) for w in range(3)] == ["A1:ac.\n\nA2:y", "B1:bbx.\n\nB2:", "C1:ca!\n\nC2:z"]
        # B's view: prompt, history in commit order, others header, A's and C's steps each with the marker,
        # then own header and own step. Glue: "<O>" 4..6, "~" 7, "<M>" 8..10.
        assert st_.view(1) == [S(PROMPT, 0, 4, 0), S(0, 4, 6, 4), S(2, 4, 6, 10), S(1, 4, 7, 16), S(GLUE, 4, 3, 23),
                               S(0, 10, 4, 26), S(GLUE, 7, 1, 30), S(2, 10, 4, 31), S(GLUE, 7, 4, 35),
                               S(1, 11, 3, 39)]
        assert st_.view(0) == [S(PROMPT, 0, 4, 0), S(0, 4, 6, 4), S(2, 4, 6, 10), S(1, 4, 7, 16), S(GLUE, 4, 3, 23),
                               S(1, 11, 3, 26), S(GLUE, 7, 1, 29), S(2, 10, 4, 30), S(GLUE, 7, 4, 34),
                               S(0, 10, 4, 38)]

    def test_single_worker(self) -> None:
        st_ = make("combined", 1, prompt_len=3)
        # no peers: the others header is still there, but no marker; "<O>" 3..5 and "<M>" 7..9 are not adjacent
        assert st_.view(0) == [S(PROMPT, 0, 3, 0), S(GLUE, 3, 3, 3), S(GLUE, 7, 3, 6), S(0, 3, 3, 9)]
        run(st_, [["k"], ["."], ["\n\n"]])
        assert st_.history == [(0, 0, 6)]
        assert st_.view(0) == [S(PROMPT, 0, 3, 0), S(0, 3, 6, 3), S(GLUE, 3, 3, 9), S(GLUE, 7, 3, 12),
                               S(0, 9, 3, 15)]

    def test_empty_marker_coalesces_glue(self) -> None:
        tpl = Templates(intro="{name}1:", step_header="{name}{step}:", others_header="<O>", unfinished_marker="",
                        own_header="<M>")
        st_ = make("combined", 2, prompt_len=2, templates=tpl)
        assert st_.glue_tokens == CHAR.encode("<O><M>")
        assert st_.view(0) == [S(PROMPT, 0, 2, 0), S(GLUE, 2, 3, 2), S(1, 2, 3, 5), S(GLUE, 5, 3, 8), S(0, 2, 3, 11)]
        # Alone, nothing sits between the two headers, which are adjacent in the glue log: one segment.
        st1 = make("combined", 1, prompt_len=2, templates=tpl)
        assert st1.view(0) == [S(PROMPT, 0, 2, 0), S(GLUE, 2, 6, 2), S(0, 2, 3, 8)]
        assert len(st1.glue_views()) == 2

    def test_glue_views(self) -> None:
        st_ = make("combined", 2)
        P = S(PROMPT, 0, 10, 0)
        assert st_.glue_views() == [
            ([P, S(GLUE, 10, 3, 10)], [Query(10, 10), Query(11, 11), Query(12, 12)]),
            ([P, S(GLUE, 13, 1, 10)], [Query(13, 10)]),
            ([P, S(GLUE, 14, 3, 10)], [Query(14, 10), Query(15, 11), Query(16, 12)]),
        ]


class TestInterleaved:
    def test_views(self) -> None:
        st_ = make("interleaved", 2)
        assert st_.glue_tokens == CHAR.encode("<M>")
        assert st_.glue_views() == [([S(PROMPT, 0, 10, 0), S(GLUE, 10, 3, 10)],
                                     [Query(10, 10), Query(11, 11), Query(12, 12)])]
        assert st_.view(0) == [S(PROMPT, 0, 10, 0), S(GLUE, 10, 3, 10), S(0, 10, 3, 13)]
        run(st_, [["x", "."], ["y", "\n\n"]])  # B: "B1:." then a bare separator ends its step
        assert st_.history == [(1, 0, 5)]
        # A does not see B's new step; B does not see A's unfinished step
        assert st_.view(0) == [S(PROMPT, 0, 10, 0), S(1, 10, 5, 10), S(GLUE, 10, 3, 15), S(0, 10, 5, 18)]
        plans = st_.plan_pass()
        assert plans[1].segments == [S(PROMPT, 0, 10, 0), S(1, 10, 5, 10), S(GLUE, 10, 3, 15), S(1, 15, 3, 18)]
        assert plans[1].queries == [Query(14, 14), Query(15, 18), Query(16, 19), Query(17, 20)]
        assert plans[0].queries == [Query(14, 22)]
        st_.mark_fed()
        st_.on_sampled([MERGE.id("!\n\n"), MERGE.id("z")])
        assert st_.history == [(1, 0, 5), (0, 0, 6)]
        assert st_.view(1) == [S(PROMPT, 0, 10, 0), S(1, 10, 5, 10), S(0, 10, 6, 15), S(GLUE, 10, 3, 21),
                               S(1, 15, 4, 24)]
        assert st_.transcript() == "B1:.\n\nA1:xy!\n\nA2:~B2:z~"

    def test_single_worker(self) -> None:
        st_ = make("interleaved", 1, prompt_len=1)
        run(st_, [["?\n\n"], ["w"]])
        assert st_.view(0) == [S(PROMPT, 0, 1, 0), S(0, 1, 4, 1), S(GLUE, 1, 3, 5), S(0, 5, 4, 8)]


class TestContiguous:
    def test_views_have_no_steps(self) -> None:
        st_ = make("contiguous", 3, prompt_len=4)
        assert st_.glue_tokens == [] and st_.glue_views() == []
        assert st_.view(1) == [S(PROMPT, 0, 4, 0), S(0, 4, 3, 4), S(2, 4, 3, 7), S(1, 4, 3, 10)]
        run(st_, [[".\n\n", "a", "b"], ["c", "x.\n\nY", "!\n\n"], ["d", "e", "f"]])
        assert st_.history == [] and all(log.step_start == 0 for log in st_.workers)
        assert [text_of(st_, w) for w in range(3)] == ["A1:.\n\ncd", "B1:ax.\n\nYe", "C1:b!\n\nf"]
        assert all(log.forced == [True] * 3 + [False] * 3 for log in st_.workers)  # no headers forced
        assert st_.view(1) == [S(PROMPT, 0, 4, 0), S(0, 4, 6, 4), S(2, 4, 6, 10), S(1, 4, 6, 16)]
        assert st_.view(2) == [S(PROMPT, 0, 4, 0), S(0, 4, 6, 4), S(1, 4, 6, 10), S(2, 4, 6, 16)]
        plans = st_.plan_pass()
        assert [p.queries for p in plans] == [[Query(9, 21)]] * 3
        assert st_.transcript() == "A1:.\n\ncd~B1:ax.\n\nYe~C1:b!\n\nf~"

    def test_single_worker(self) -> None:
        st_ = make("contiguous", 1, prompt_len=2)
        run(st_, [["."], ["\n\n"]])
        assert st_.view(0) == [S(PROMPT, 0, 2, 0), S(0, 2, 5, 2)]


# ---- step rule ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pieces,ends", [
    ([".\n\n"], True),  # punctuation and separator in one token
    (["a", ".", "\n\n"], True),
    (["a", "?\n\n"], True),
    (["a", "!", " \n\n"], True),  # trailing spaces before the separator are ignored
    (["a", ".", " ", "\t\n\n"], True),  # and tabs
    (["a", "\n\n"], False),  # no punctuation
    (["a", ",", "\n\n"], False),
    (["a", " \n\n"], False),
    (["a", ".", "\n", "\n"], True),  # the separator split over two tokens: the second one completes it
    (["a", ".\n", "\n"], True),
    (["a", ".", " ", "\n", "\n"], True),
    (["a", "\n", "\n"], False),
    (["a", ".", "\n", "\n\n"], True),  # "\n" + the first "\n" of the token complete it
    (["a", ",", "\n", "\n\n"], False),
    (["a", ".", "\n", "b", "\n"], False),  # text between the newlines
    (["x.\n\nY"], True),  # separator inside a token; the text after it stays in the ended step
])
def test_step_rule(pieces: list[str], ends: bool) -> None:
    st_ = make("combined", 1)
    run(st_, [[p] for p in pieces])
    if ends:
        assert st_.history == [(0, 0, 3 + len(pieces))]
        assert st_.codec.decode(st_.workers[0].tokens[st_.workers[0].step_start:]) == "A2:"
    else:
        assert st_.history == [] and st_.workers[0].step_start == 0


def test_step_rule_reads_forced_text() -> None:
    # The default intro ends with "." so a bare separator right after it ends step 1.
    st_ = make("combined", 2, templates=Templates())
    run(st_, [["\n\n", "\n\n"]])
    assert [w for w, _, _ in st_.history] == [0, 1]
    assert text_of(st_, 1) == "**B [1]:** Hi, I'm B.\n\n**B [2]:** "
    # The default header ends with ":** " -> a separator right after it does not end step 2.
    run(st_, [["\n\n", "k"]])
    assert len(st_.history) == 2


def test_step_rule_char_codec() -> None:
    # One token per character: the separator always spans two tokens, and the second one ends the step.
    st_ = make("combined", 1, codec=CHAR)
    run(st_, [[c] for c in "ab.\n\ncd!\n\ne\n\n"])
    assert st_.history == [(0, 0, 8), (0, 8, 16)]
    assert text_of(st_, 0) == "A1:ab.\n\nA2:cd!\n\nA3:e\n\n"
    # A one-character separator works with it.
    tpl = Templates(intro="{name}1:", step_header="{name}{step}:", step_separator="|", sentence_end=";")
    st_ = make("combined", 1, codec=CHAR, templates=tpl)
    run(st_, [[c] for c in "a.|b;|c; |"])  # "." is no sentence end here
    assert st_.history == [(0, 0, 9), (0, 9, 16)]
    assert text_of(st_, 0) == "A1:a.|b;|A2:c; |A3:"


# ---- forced headers and collaboration checks ----------------------------------------------------------------------

def test_collaboration_check() -> None:
    st_ = make("combined", 2, collab_check_every=4)
    run(st_, [
        ["a", "b"],  # group sampled 2
        [".\n\n", "c"],  # 4: A commits, 4 - 0 >= 4 -> check
        ["d", ".\n\n"],  # 6: B commits, 6 - 0 >= 4 -> check
        [".\n\n", "e"],  # 8: A commits, 8 - 4 >= 4 -> check
        ["!\n\n", "f"],  # 10: A commits, 10 - 8 < 4 -> no check
        ["g", "?\n\n"],  # 12: B commits, 12 - 6 >= 4 -> check
    ])
    assert text_of(st_, 0) == "A1:a.\n\nA2:(c)d.\n\nA3:(c)!\n\nA4:g"
    assert text_of(st_, 1) == "B1:bc.\n\nB2:(c)ef?\n\nB3:(c)"
    f, s = True, False
    assert st_.workers[0].forced == [f] * 3 + [s, s] + [f] * 6 + [s, s] + [f] * 6 + [s] + [f] * 3 + [s]
    assert st_.workers[1].forced == [f] * 3 + [s, s, s] + [f] * 6 + [s, s, s] + [f] * 6


def test_collaboration_check_off() -> None:
    st_ = make("combined", 1, collab_check_every=0)
    run(st_, [[".\n\n"]] * 5)
    assert text_of(st_, 0) == "A1:.\n\nA2:.\n\nA3:.\n\nA4:.\n\nA5:.\n\nA6:"


def test_default_header_and_check_text() -> None:
    tpl = Templates()
    st_ = make("interleaved", 2, templates=tpl, collab_check_every=1)
    run(st_, [["\n\n", "x"]])
    assert text_of(st_, 0) == tpl.intro_text("A") + "\n\n" + "**A [2]:** " + tpl.check_question
    assert text_of(st_, 1) == tpl.intro_text("B") + "x"


# ---- stop rules ----------------------------------------------------------------------------------------------------

def test_answer_nested_braces() -> None:
    st_ = make("combined", 2)
    run(st_, [["\\boxed{", "u"], ["{", "v"], ["1", "w"], ["}", "."]])
    assert not st_.finished and st_.answer is None
    run(st_, [["}", "\n\n"]])  # B's step ends in the finishing pass: not committed
    assert (st_.finished, st_.finish_reason, st_.answer, st_.answer_worker) == (True, "answer", "{1}", 0)
    assert st_.history == []
    with pytest.raises(RuntimeError):
        st_.on_sampled([1, 2])
    st_.abort()
    assert st_.finish_reason == "answer"


def test_answer_marker_split_across_tokens() -> None:
    st_ = make("contiguous", 2, codec=CHAR)
    run(st_, [["}", c] for c in "so \\boxed{4"])  # "}" alone is no answer
    assert not st_.finished
    run(st_, [["a", "2"]])
    assert not st_.finished
    run(st_, [["b", "}"]])
    assert (st_.finish_reason, st_.answer, st_.answer_worker) == ("answer", "42", 1)


def test_answer_first_worker_wins_and_beats_length() -> None:
    st_ = make("interleaved", 3, max_tokens=6)
    run(st_, [["\\boxed{", "\\boxed{", "\\boxed{"], ["7", "8", "9"]])
    assert not st_.finished  # 5 tokens each
    run(st_, [["z", "}", "}"]])  # 6 tokens: the length limit is also reached, the answer wins
    assert (st_.finish_reason, st_.answer, st_.answer_worker) == ("answer", "8", 1)


class ByteCodec:
    """UTF-8 bytes as tokens, like byte-level BPE: one token of a multi-byte character decodes alone to U+FFFD."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def test_answer_decoded_from_the_whole_sequence() -> None:
    codec = ByteCodec()
    st_ = make("combined", 1, codec=codec)  # type: ignore[arg-type]
    for b in codec.encode("so \\boxed{\u00e9\u4e2d}"):
        st_.plan_pass()
        st_.mark_fed()
        st_.on_sampled([b])
    assert st_.finish_reason == "answer" and st_.answer == "\u00e9\u4e2d"
    assert st_.transcript() == "A1:so \\boxed{\u00e9\u4e2d}~"


def test_answer_skips_unbalanced_marker() -> None:
    assert find_answer("\\boxed{a \\boxed{b}", "\\boxed{") == "b"
    assert find_answer("x \\boxed{{a}{b}} \\boxed{c}", "\\boxed{") == "{a}{b}"
    assert find_answer("\\boxed{", "\\boxed{") is None
    assert find_answer("{}}", "\\boxed{") is None


def test_length_stop() -> None:
    st_ = make("combined", 2, max_tokens=6)
    run(st_, [["a", "b"], ["c", "d"]])
    assert not st_.finished
    run(st_, [[".\n\n", "e"]])  # A reaches 6 tokens; its ended step is not committed
    assert (st_.finished, st_.finish_reason, st_.answer) == (True, "length", None)
    assert st_.history == [] and text_of(st_, 0) == "A1:ac.\n\n"
    assert st_.transcript() == "A1:ac.\n\n~B1:bde~"


def test_abort() -> None:
    st_ = make("combined", 2)
    run(st_, [["a", "b"]])
    st_.abort()
    assert (st_.finished, st_.finish_reason, st_.answer) == (True, "abort", None)
    with pytest.raises(RuntimeError):
        st_.on_sampled([1, 2])


@pytest.mark.parametrize("layout", list(Layout))
def test_longest_view_is_reached_when_every_step_is_open(layout: Layout) -> None:
    cfg = GroupConfig(workers=3, worker_names=("Ann", "Bob", "Cat"), layout=layout)
    state = GroupState(cfg, 5, CHAR)
    for _ in range(4):  # no separator: every worker's first step stays open, its intro included
        state.on_sampled([CHAR.id("a")] * 3)
    own = len(state.workers[0].tokens)
    assert all(len(log.tokens) == own for log in state.workers)
    lengths = [len(expand(state.view(w))) for w in range(3)]
    if layout is Layout.INTERLEAVED:  # peers' open steps are invisible: the bound is reached once all commit
        assert max(lengths) == state.longest_view(own) - 2 * own
    else:
        assert max(lengths) == state.longest_view(own)
    assert state.longest_view(own + 10) == state.longest_view(own) + 30


def test_bad_inputs() -> None:
    with pytest.raises(ValueError):
        make("combined", 2, prompt_len=0)
    st_ = make("combined", 2)
    with pytest.raises(ValueError):
        st_.on_sampled([1])


# ---- Part 2: random scripts against an oracle ----------------------------------------------------------------------

@dataclass
class OWorker:
    name: str
    ids: list[int] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    forced: list[bool] = field(default_factory=list)
    step_start: int = 0
    steps: int = 1
    last_check: int = 0


def oracle_answer(text: str, marker: str) -> str | None:
    """First marker whose brace closes; written independently of layout.find_answer."""
    for i in range(len(text)):
        if not text.startswith(marker, i):
            continue
        depth = 1
        for j in range(i + len(marker), len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i + len(marker): j]
    return None


class Oracle:
    """The spec's rules, written plainly: logs, steps, history, glue layout, expected views and transcript."""

    def __init__(self, cfg: GroupConfig, prompt_len: int, codec: CharCodec) -> None:
        self.cfg, self.tpl, self.P, self.codec = cfg, cfg.templates, prompt_len, codec
        self.workers = [OWorker(n) for n in cfg.worker_names]
        for o in self.workers:
            self.force(o, self.tpl.intro_text(o.name))
        self.history: list[tuple[int, int, int]] = []
        self.generated = 0
        self.reason: str | None = None
        self.answer: tuple[str, int] | None = None
        names = {Layout.COMBINED: ["others_header", "unfinished_marker", "own_header"],
                 Layout.INTERLEAVED: ["own_header"], Layout.CONTIGUOUS: []}[cfg.layout]
        self.glue_tokens: list[int] = []
        self.glue_pos: dict[str, list[int]] = {}
        for name in names:
            ids = codec.encode(getattr(self.tpl, name))
            self.glue_pos[name] = [prompt_len + len(self.glue_tokens) + i for i in range(len(ids))]
            self.glue_tokens += ids

    def force(self, o: OWorker, text: str) -> None:
        ids = self.codec.encode(text)
        o.ids += ids
        o.texts += [self.codec.decode([i]) for i in ids]
        o.forced += [True] * len(ids)

    def ends_step(self, o: OWorker, tok_text: str) -> bool:
        return self.cfg.layout is not Layout.CONTIGUOUS and step_rule(self.tpl, "".join(o.texts[o.step_start:]),
                                                                         tok_text)

    def sample(self, ids: list[int]) -> None:
        assert self.reason is None
        self.generated += len(ids)
        ended = []
        for w, (o, tok) in enumerate(zip(self.workers, ids, strict=True)):
            t = self.codec.decode([tok])
            if self.ends_step(o, t):
                ended.append(w)
            o.ids.append(tok)
            o.texts.append(t)
            o.forced.append(False)
        for w, o in enumerate(self.workers):
            ans = oracle_answer("".join(o.texts), self.tpl.answer_marker)
            if ans is not None:
                self.answer, self.reason = (ans, w), "answer"
                return
        if max(len(o.ids) for o in self.workers) >= self.cfg.max_tokens:
            self.reason = "length"
            return
        for w in ended:
            o = self.workers[w]
            self.history.append((w, o.step_start, len(o.ids)))
            o.step_start = len(o.ids)
            o.steps += 1
            every = self.cfg.collab_check_every
            check = every > 0 and self.generated - o.last_check >= every
            if check:
                o.last_check = self.generated
            self.force(o, self.tpl.step_header.format(name=o.name, step=o.steps)
                       + (self.tpl.check_question if check else ""))

    def view(self, w: int) -> list[tuple[int, int]]:
        P = self.P
        out = [(PROMPT, i) for i in range(P)]

        def own(v: int, a: int, b: int) -> None:
            out.extend((v, P + i) for i in range(a, b))

        def glue(name: str) -> None:
            out.extend((GLUE, n) for n in self.glue_pos[name])

        me = self.workers[w]
        if self.cfg.layout is Layout.CONTIGUOUS:
            for v, o in enumerate(self.workers):
                if v != w:
                    own(v, 0, len(o.ids))
            own(w, 0, len(me.ids))
            return out
        for v, a, b in self.history:
            own(v, a, b)
        if self.cfg.layout is Layout.COMBINED:
            glue("others_header")
            for v, o in enumerate(self.workers):
                if v != w and len(o.ids) > o.step_start:
                    own(v, o.step_start, len(o.ids))
                    glue("unfinished_marker")
        glue("own_header")
        own(w, me.step_start, len(me.ids))
        return out

    def transcript(self) -> str:
        marker = self.tpl.unfinished_marker
        if self.cfg.layout is Layout.CONTIGUOUS:
            return "".join("".join(o.texts) + marker for o in self.workers)
        parts = ["".join(self.workers[v].texts[a:b]) for v, a, b in self.history]
        parts += ["".join(o.texts[o.step_start:]) + marker for o in self.workers if len(o.ids) > o.step_start]
        return "".join(parts)


# Token texts for random scripts; repeats make step endings common.
PIECES = ("a", "b", " ", ".", "?", "!", ",", "\n", "\t", "{", "\n\n", ".\n\n", "?\n\n", "!\n\n", " \n\n", "\t\n\n",
          "x.\n\nY", "\\boxed{", ".\n") + ("a", "a", ".", "\n", "\n\n", "\n\n", ".\n\n")
TEMPLATE_SETS = (
    SHORT,
    Templates(),
    Templates(intro="{name}.", step_header="{name}{step} ", check_question="Q?", others_header="",
              unfinished_marker="", own_header=">"),
)


@st.composite
def scenarios(draw: st.DrawFn) -> dict:
    n = draw(st.integers(1, 6))
    answers = draw(st.booleans())
    alphabet = PIECES + ("}",) if answers else PIECES
    passes = draw(st.one_of(st.integers(20, 40), st.integers(0, 3)))  # mostly long scripts
    script = draw(st.lists(st.lists(st.sampled_from(alphabet), min_size=n, max_size=n),
                           min_size=passes, max_size=passes))
    templates = draw(st.sampled_from(TEMPLATE_SETS))
    # budget: a little above the intro (length stops mid-script), at most 2 below it, or unlimited
    intro = len(MERGE.encode(templates.intro_text(NAMES[0])))
    max_tokens = draw(st.one_of(st.integers(-2, 60).map(lambda k: max(1, intro + k)), st.just(10_000)))
    return {
        "workers": n,
        "names": NAMES[:n],
        "layout": draw(st.sampled_from(list(Layout))),
        "templates": templates,
        "collab_check_every": draw(st.integers(0, 12)),
        "max_tokens": max_tokens,
        "prompt_len": draw(st.integers(1, 6)),
        "script": script,
    }


def step_rule(tpl: Templates, before: str, tok_text: str) -> bool:
    """The spec's rule, character by character: some separator ends inside this token, after punctuation."""
    sep, text = tpl.step_separator, before + tok_text
    for end in range(len(before) + 1, len(text) + 1):
        if text[:end].endswith(sep):
            head = text[: end - len(sep)].rstrip(" \t")
            if head and head[-1] in tpl.sentence_end:
                return True
    return False


def check_views(state: GroupState, oracle: Oracle) -> None:
    """(a) views hold exactly the spec's tokens, (b) no repeats except the marker, (c) positions and deltas."""
    P = state.prompt_len
    marker = set(oracle.glue_pos.get("unfinished_marker", []))
    for w in range(len(state.workers)):
        segs = state.view(w)
        # (c) consecutive view positions from 0, one delta per segment, segments are maximal runs
        pos = 0
        for s in segs:
            assert s.view_start == pos and s.length > 0
            assert s.delta == s.view_start - s.start
            pos += s.length
        for s, t in zip(segs, segs[1:], strict=False):
            assert not (s.source == t.source and s.start + s.length == t.start), f"not coalesced: {s} {t}"
        for s in segs:
            if s.source == PROMPT:
                assert s.start + s.length <= P
            elif s.source == GLUE:
                assert P <= s.start and s.start + s.length <= P + len(state.glue_tokens)
            else:
                assert P <= s.start and s.start + s.length <= P + len(state.workers[s.source].tokens)
        view = expand(segs)
        # (a) exactly the expected tokens in the expected order
        assert view == oracle.view(w)
        # (b) stored tokens at most once; glue repeats only as the unfinished marker
        seen: set[tuple[int, int]] = set()
        for key in view:
            assert key not in seen or (key[0] == GLUE and key[1] in marker), f"{key} repeated in view {w}"
            seen.add(key)
        # every token the spec makes visible is there
        must = {(PROMPT, i) for i in range(P)} | {(w, P + i) for i in range(len(state.workers[w].tokens))}
        for v, log in enumerate(state.workers):
            if state.cfg.layout is Layout.CONTIGUOUS:
                must |= {(v, P + i) for i in range(len(log.tokens))}
            elif state.cfg.layout is Layout.COMBINED:
                must |= {(v, P + i) for i in range(len(log.tokens))}
            else:
                must |= {(v, P + i) for i in range(log.step_start)}
                hidden = {(v, P + i) for i in range(log.step_start, len(log.tokens))} if v != w else set()
                assert not (hidden & seen), "interleaved: a peer's unfinished step is visible"
        assert must <= seen


def check_history(state: GroupState) -> None:
    """(d) commits keep order and tile each worker's tokens; (f) the step rule."""
    tpl = state.cfg.templates
    P = state.prompt_len
    per_worker: dict[int, list[tuple[int, int]]] = {}
    for v, a, b in state.history:
        per_worker.setdefault(v, []).append((a, b))
    for v, log in enumerate(state.workers):
        ranges = per_worker.get(v, [])
        edge = 0
        for k, (a, b) in enumerate(ranges):
            assert a == edge and a < b, f"worker {v}: history ranges {ranges} do not tile"
            edge = b
            texts = [state.token_text(t) for t in log.tokens[a:b]]
            # the step opens with its forced intro/header and ends with a sampled step-ending token
            opening = tpl.intro_text(log.name) if k == 0 else tpl.step_header.format(name=log.name, step=k + 1)
            assert "".join(texts).startswith(opening) and log.forced[a]
            assert not log.forced[b - 1] and step_rule(tpl, "".join(texts[:-1]), texts[-1])
            for i in range(b - a - 1):
                assert log.forced[a + i] or not step_rule(tpl, "".join(texts[:i]), texts[i]), (v, k, i)
        assert edge == log.step_start
        # no sampled token in the open step ends it, except the last one when the group stopped in that pass
        texts = [state.token_text(t) for t in log.tokens[log.step_start:]]
        for i, t in enumerate(texts):
            if log.forced[log.step_start + i] or (state.finished and i == len(texts) - 1):
                continue
            assert not (state.cfg.layout is not Layout.CONTIGUOUS and step_rule(tpl, "".join(texts[:i]), t))
        assert P >= 1


def check_state(state: GroupState, oracle: Oracle) -> None:
    assert state.history == oracle.history
    for log, o in zip(state.workers, oracle.workers, strict=True):
        assert log.tokens == o.ids and log.forced == o.forced and log.step_start == o.step_start
        assert log.text == "".join(o.texts)
    assert state.finished == (oracle.reason is not None) and state.finish_reason == oracle.reason
    if oracle.answer is None:
        assert state.answer is None and state.answer_worker is None
    else:
        assert (state.answer, state.answer_worker) == oracle.answer
    assert state.transcript() == oracle.transcript()


def check_shared_start(state: GroupState) -> None:
    """The kept shared start equals one built from scratch for the same history: the prompt, then the committed
    steps (step layouts), coalesced."""
    fresh = GroupState(state.cfg, state.prompt_len, state.codec)
    fresh.history = list(state.history)
    assert state.shared_start() == fresh.shared_start()
    steps = [(v, state.prompt_len + i) for v, a, b in state.history for i in range(a, b)]
    assert expand([S(*s) for s in state.shared_start()]) == [(PROMPT, i) for i in range(state.prompt_len)] + (
        steps if state.cfg.layout.has_steps else [])


def check_plan(state: GroupState, fed: list[list[int]]) -> None:
    """(e) each fed token's query view position maps back to it; every token is fed exactly once, in order;
    the plans' common parts are parts of one sequence (the same objects), which starts with the shared start."""
    P = state.prompt_len
    bound = state.longest_view(max(len(log.tokens) for log in state.workers))
    plans = state.plan_pass()
    longest = max(plans, key=lambda plan: plan.common)
    shared = state.shared_start()
    for plan in plans:
        assert len(shared) - 1 <= plan.common <= len(plan.view)
        assert all(a is b for a, b in zip(plan.view[: plan.common], longest.view, strict=False))
        assert all(a is b for a, b in zip(plan.view, shared[:-1], strict=False))
    for w, plan in enumerate(plans):
        log = state.workers[w]
        assert plan.segments == state.view(w)
        view = expand(plan.segments)
        assert len(view) <= bound  # the scheduler's fit check relies on it
        assert plan.tokens == log.tokens[len(fed[w]):]
        assert len(plan.queries) == len(plan.tokens)
        for q in plan.queries:
            assert view[q.view] == (w, q.natural)
            fed[w].append(q.natural - P)
        assert fed[w] == list(range(len(log.tokens)))


def test_open_step_continuing_the_history() -> None:
    """No others header: a worker's open step continues its own last committed step, so in its peers' views the
    two merge into one segment, and in its own view (which skips its open step there) they must not."""
    templates = Templates(intro="{name}1:", step_header="{name}{step}:", others_header="", unfinished_marker="~",
                          own_header="<M>")
    st_ = make("combined", 2, templates=templates)
    run(st_, [[".\n\n", "b"]])
    assert st_.history == [(0, 0, 4)]
    assert st_.view(0) == [S(PROMPT, 0, 10, 0), S(0, 10, 4, 10), S(1, 10, 4, 14), S(GLUE, 10, 4, 18),
                           S(0, 14, 3, 22)]
    assert st_.view(1) == [S(PROMPT, 0, 10, 0), S(0, 10, 7, 10), S(GLUE, 10, 4, 17), S(1, 10, 4, 21)]
    plans = st_.plan_pass()
    assert [plan.segments for plan in plans] == [st_.view(0), st_.view(1)]
    assert [plan.common for plan in plans] == [1, 2]  # A's view shares the prompt only; B's the merged step too


def test_shared_start_is_kept_until_a_commit() -> None:
    st_ = make("combined", 2)
    run(st_, [["a", "b"]])
    kept = st_.shared_start()
    run(st_, [["a", "b"], ["b", "a"]])
    assert st_.shared_start() is kept and st_.history == []
    run(st_, [[".\n\n", "a"]])  # A commits: the start grows by A's step, built on from the kept one
    assert st_.history == [(0, 0, 7)] and st_.shared_start() is not kept
    assert st_.shared_start() == ((PROMPT, 0, 10, 0), (0, 10, 7, 10))
    check_shared_start(st_)
    run(st_, [["b", "a"], [".\n\n", "a"]])  # A's next step: adjacent in A's log, merged into one segment
    assert st_.history == [(0, 0, 7), (0, 7, 12)]
    assert st_.shared_start() == ((PROMPT, 0, 10, 0), (0, 10, 12, 10))
    run(st_, [["a", ".\n\n"]])  # then B's
    assert st_.shared_start() == ((PROMPT, 0, 10, 0), (0, 10, 12, 10), (1, 10, 10, 22))
    check_shared_start(st_)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_random_scripts(sc: dict) -> None:
    cfg = GroupConfig(workers=sc["workers"], worker_names=sc["names"], layout=sc["layout"], templates=sc["templates"],
                      collab_check_every=sc["collab_check_every"], max_tokens=sc["max_tokens"])
    state = GroupState(cfg, sc["prompt_len"], MERGE)
    oracle = Oracle(cfg, sc["prompt_len"], MERGE)
    assert state.glue_tokens == oracle.glue_tokens
    for segs, queries in state.glue_views():
        assert segs[0] == S(PROMPT, 0, sc["prompt_len"], 0) and len(segs) == 2
        assert [(GLUE, q.natural) for q in queries] == expand(segs)[sc["prompt_len"]:]
        assert [q.view for q in queries] == list(range(sc["prompt_len"], sc["prompt_len"] + len(queries)))
    fed: list[list[int]] = [[] for _ in range(cfg.workers)]
    check_state(state, oracle)
    check_views(state, oracle)
    for texts in sc["script"]:
        if state.finished:
            break
        check_plan(state, fed)
        state.mark_fed()
        ids = [MERGE.id(t) for t in texts]
        state.on_sampled(ids)
        oracle.sample(ids)
        check_state(state, oracle)
        check_views(state, oracle)
        check_history(state)
        check_shared_start(state)
    check_plan(state, fed)
    event(f"layout={cfg.layout.value} finish={state.finish_reason}")
    if cfg.layout is not Layout.CONTIGUOUS:
        event(f"commits={min(len(state.history), 5)}{'+' if len(state.history) >= 5 else ''}")
    event(f"check question forced={any(cfg.templates.check_question in log.text for log in state.workers)}")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios(), st.integers(1, 200))
def test_a_later_log_start_moves_only_worker_naturals(sc: dict, gap: int) -> None:
    """Worker logs started ``gap`` positions after the prompt (as the engine starts them, on a block boundary):
    every view and query equals the default state's, but for the natural positions of worker tokens, ``gap``
    later. Attention depends on deltas only, so this changes what is computed by nothing but rounding."""
    cfg = GroupConfig(workers=sc["workers"], worker_names=sc["names"], layout=sc["layout"], templates=sc["templates"],
                      collab_check_every=sc["collab_check_every"], max_tokens=sc["max_tokens"])
    base = GroupState(cfg, sc["prompt_len"], MERGE)
    moved = GroupState(cfg, sc["prompt_len"], MERGE, log_start=sc["prompt_len"] + gap)

    def shift(seg: Segment) -> Segment:
        return Segment(seg.source, seg.start + gap, seg.length, seg.view_start) if seg.source >= 0 else seg

    assert moved.glue_views() == base.glue_views()
    for texts in [*sc["script"], None]:
        want, got = base.plan_pass(), moved.plan_pass()
        for w, (a, b) in enumerate(zip(want, got, strict=True)):
            assert b.tokens == a.tokens and b.common == a.common
            assert [Segment(*s) for s in b.view] == [shift(Segment(*s)) for s in a.view]
            assert b.positions == [(n + gap, v) for n, v in a.positions]
            assert moved.view(w) == [shift(s) for s in base.view(w)]
        if texts is None or base.finished:
            break
        ids = [MERGE.id(t) for t in texts]
        for state in (base, moved):
            state.mark_fed()
            state.on_sampled(ids)
        assert moved.transcript() == base.transcript() and moved.history == base.history
