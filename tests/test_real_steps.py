"""The step rule on a real byte-level BPE tokenizer (SmolLM2-135M-Instruct's).

Such tokenizers write a paragraph break as one "\\n\\n" token after some text and as two "\\n" tokens after other
text, and glue punctuation or spaces to newlines. Whatever the tokens, a worker's steps must end exactly where the
text has a separator right after sentence punctuation, at the token that completes the separator. The expected cut
points are computed here on the characters of the text alone; the state machine sees only token ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hogwild_vllm.config import GroupConfig, Templates
from hogwild_vllm.layout import GroupState
from hogwild_vllm.prompt import HFCodec

pytestmark = pytest.mark.real_model

TPL = Templates()
WORDS = ("the", "sum", "is", "12", "We", "add", "x", "Then", "so", "ok", "3.5", "(a)", "Step", "and", "=", "4")
ENDS = ("", "", ".", "?", "!", ",", ":", ". ", ".\t", ")")
BREAKS = ("\n\n", "\n\n", "\n", " ", "\n\n\n", " \n\n", "\n \n", "\n\n\n\n", "\t\n\n")


@pytest.fixture(scope="module")
def codec(smollm2_path: Path) -> HFCodec:
    from transformers import AutoTokenizer

    return HFCodec(AutoTokenizer.from_pretrained(str(smollm2_path)))


def expected_cuts(text: str, token_ends: list[int]) -> list[int]:
    """Character offsets (token ends) where steps must end: after each token holding the last character of a
    separator whose preceding text, spaces and tabs aside, ends in sentence punctuation."""
    sep, cuts = TPL.step_separator, []
    for end in range(len(sep), len(text) + 1):
        head = text[: end - len(sep)].rstrip(" \t")
        if text[:end].endswith(sep) and head and head[-1] in TPL.sentence_end:
            cut = next(e for e in token_ends if e >= end)
            if not cuts or cuts[-1] != cut:
                cuts.append(cut)
    return cuts


def run_worker(codec: HFCodec, text: str) -> tuple[GroupState, list[int]]:
    """One worker samples ``text``'s tokens one by one; returns the state and the token ids."""
    ids = codec.encode(text)
    state = GroupState(GroupConfig(workers=1, max_tokens=10**6, collab_check_every=0), 1, codec)
    for tok in ids:
        state.mark_fed()
        state.on_sampled([tok])
    return state, ids


def sampled_cuts(state: GroupState, intro: int) -> list[int]:
    """Character offsets (into the sampled text, after the intro's ``intro`` characters) where steps ended."""
    log = state.workers[0]
    cuts, at = [], intro
    for _, a, b in state.history:
        at += sum(len(state.token_text(t)) for t, f in zip(log.tokens[a:b], log.forced[a:b], strict=True) if not f)
        cuts.append(at)
    return cuts


sentences = st.tuples(st.lists(st.sampled_from(WORDS), min_size=1, max_size=6).map(" ".join),
                      st.sampled_from(ENDS), st.sampled_from(BREAKS)).map("".join)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(sentences, min_size=1, max_size=12).map("".join))
def test_steps_end_where_the_text_has_a_paragraph_break_after_punctuation(codec: Any, text: str) -> None:
    state, ids = run_worker(codec, text)
    pieces = [state.token_text(t) for t in ids]
    assert "".join(pieces) == text  # one token's text at a time is exact on this alphabet
    intro = TPL.intro_text("Alice")
    ends, at = [], len(intro)
    for piece in pieces:
        at += len(piece)
        ends.append(at)
    # The forced intro ends in "." too: a separator at the very start of the text ends step 1.
    assert sampled_cuts(state, len(intro)) == expected_cuts(intro + text, ends)
    log = state.workers[0]
    for _, _, b in state.history:  # the step-ending token is the step's last, a sampled one
        assert not log.forced[b - 1]


@pytest.mark.parametrize("text,ending,rest", [
    ("We add them.\n\nThen", "\n", "Then"),  # before a word: two "\n" tokens, the second ends the step
    ("x = 4.\n\n\nStep", "\n\n", "\nStep"),  # before more whitespace: one "\n\n" token
    ("Then.\n\n ", "\n\n ", ""),  # a token holding the separator and more: the rest stays in the ending step
])
def test_break_as_one_token_or_two_ends_the_step(codec: HFCodec, text: str, ending: str, rest: str) -> None:
    state, _ = run_worker(codec, text)
    (step,) = state.history
    log = state.workers[0]
    assert state.token_text(log.tokens[step[2] - 1]) == ending
    after = [state.token_text(t) for t, f in zip(log.tokens[step[2]:], log.forced[step[2]:], strict=True) if not f]
    assert "".join(after) == rest


def test_this_tokenizer_writes_the_break_both_ways(codec: HFCodec) -> None:
    """Both forms occur on this tokenizer (what the property test above relies on to cover both)."""
    split = [codec.decode([t]) for t in codec.encode("We add them.\n\nThen")]
    whole = [codec.decode([t]) for t in codec.encode("x = 4.\n\n\nStep")]
    assert split[-3:] == ["\n", "\n", "Then"] and "\n\n" in whole
