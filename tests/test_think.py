"""The streaming <think> parser: property tests over arbitrary chunkings, and edge cases."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.think import ANSWER, THINKING, TagPair, ThinkParser

TAGS = TagPair()
ALT = TagPair("<reasoning>", "</reasoning>")

# text built from tags, tag fragments, look-alikes and ordinary characters, so that splits
# land inside tags and partial tags really occur
atoms = st.sampled_from(
    ["<think>", "</think>", "<", "</", "<th", "</thi", "think>", ">", "\n", "\n\n", " ", "a", "b c", "é", "数", "😀", "<thinking>", "</b>", "<reasoning>", "</reasoning>"]
)
texts = st.lists(atoms, max_size=40).map("".join)


def run(chunks, tags=TAGS, start=False):
    p = ThinkParser(tags, start_in_thinking=start)
    out = []
    for c in chunks:
        out += p.feed(c)
    out += p.finish()
    return out, p


def joined(pieces, kind):
    return "".join(t for k, t in pieces if k == kind)


def split_at(text, cuts):
    cuts = sorted(set(c % (len(text) + 1) for c in cuts))
    parts, prev = [], 0
    for c in cuts:
        parts.append(text[prev:c])
        prev = c
    parts.append(text[prev:])
    return parts


@settings(max_examples=3000, deadline=None)
@given(text=texts, cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12), start=st.booleans(), alt=st.booleans())
def test_any_chunking_equals_whole_parse(text, cuts, start, alt):
    tags = ALT if alt else TAGS
    whole, _ = run([text], tags, start)
    chunked, _ = run(split_at(text, cuts), tags, start)
    assert joined(chunked, THINKING) == joined(whole, THINKING)
    assert joined(chunked, ANSWER) == joined(whole, ANSWER)
    # the order of kinds is the same too (pieces may be split differently, never reordered)
    def kinds(pieces):
        ks = [k for k, t in pieces if t]
        return [k for i, k in enumerate(ks) if i == 0 or ks[i - 1] != k]

    assert kinds(chunked) == kinds(whole)


@settings(max_examples=1000, deadline=None)
@given(text=texts, start=st.booleans())
def test_one_character_at_a_time_equals_whole(text, start):
    whole, _ = run([text], TAGS, start)
    chars, _ = run(list(text), TAGS, start)
    assert joined(chars, THINKING) == joined(whole, THINKING)
    assert joined(chars, ANSWER) == joined(whole, ANSWER)


def spec(text, tags=TAGS, start=False):
    """The parse by its definition, on the whole text: left to right, only the tag that changes
    state (the closing tag while thinking, the opening tag while answering) is markup."""
    out, thinking, i = [], start, 0
    while True:
        tag = tags.close if thinking else tags.open
        j = text.find(tag, i)
        out.append((THINKING if thinking else ANSWER, text[i : j if j != -1 else len(text)]))
        if j == -1:
            return out
        i, thinking = j + len(tag), not thinking


@settings(max_examples=1000, deadline=None)
@given(text=texts, cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=12), start=st.booleans(), alt=st.booleans())
def test_parse_equals_spec(text, cuts, start, alt):
    tags = ALT if alt else TAGS
    pieces, _ = run(split_at(text, cuts), tags, start)
    expected = spec(text, tags, start)
    assert joined(pieces, THINKING) == joined(expected, THINKING)
    assert joined(pieces, ANSWER) == joined(expected, ANSWER)
    # nothing is lost but the tags that changed state, and nothing is reordered
    assert "".join(t for _, t in pieces) == "".join(t for _, t in expected)


@pytest.mark.parametrize(
    "chunks,start,thinking,answer",
    [
        (["<think>", "plan", "</think>", "answer"], False, "plan", "answer"),  # tags emitted by the model
        (["plan", "</think>", "answer"], True, "plan", "answer"),  # opening tag implicit in the prompt
        (["<think>plan</think>answer"], False, "plan", "answer"),  # everything in one token
        (["<th", "ink>pl", "an</th", "ink>ans", "wer"], False, "plan", "answer"),  # tags split across tokens
        (["<", "/", "t", "h", "i", "n", "k", ">", "x"], True, "", "x"),  # close tag one char at a time
        (["still thinking when the budget ran out"], True, "still thinking when the budget ran out", ""),  # never closed
        (["hello ", "<think>", "hmm", "</think>", "world"], False, "hmm", "hello world"),  # text before <think>
        (["answer only"], False, "", "answer only"),  # a model that does not think
        (["a", "<think>b</think>", "c", "<think>d</think>", "e"], False, "bd", "ace"),  # several blocks
        (["x</thi"], True, "x</thi", ""),  # an incomplete tag at the end is plain text
        (["<thinking>x"], False, "", "<thinking>x"),  # a look-alike is not a tag
        # a tag that does not change state is text of the stream it appears in
        (["plan</think>", "Write </think> to close."], True, "plan", "Write </think> to close."),  # literal close tag in the answer
        (["a</think>b</think>c"], True, "a", "b</think>c"),  # all after the first close is answer (DeepSeek, vLLM)
        (["answer </think> more"], False, "", "answer </think> more"),  # a close tag with no block open
        (["<think>", "I write <think> here", "</think>", "ok"], False, "I write <think> here", "ok"),  # open tag inside thinking
        (["a<th", "ink>b"], True, "a<think>b", ""),  # split across tokens, still text
        (["x</think>y", "</th", "ink>z"], True, "x", "y</think>z"),  # a split close tag in the answer
        (["a</think>b<think>c</think>d"], True, "ac", "bd"),  # an opening tag in the answer starts a new block
    ],
)
def test_edge_cases(chunks, start, thinking, answer):
    pieces, _ = run(chunks, start=start)
    assert joined(pieces, THINKING) == thinking
    assert joined(pieces, ANSWER) == answer


def test_stray_close_tag_stays_in_the_answer():
    pieces, p = run(["answer ", "</think>", " more"])
    assert pieces == [(ANSWER, "answer "), (ANSWER, "</think>"), (ANSWER, " more")]
    assert not p.thinking and p.blocks_closed == 0


def test_nested_open_tag_stays_in_thinking():
    pieces, p = run(["<think>a<think>b</think>c"])
    assert pieces == [(THINKING, "a<think>b"), (ANSWER, "c")]
    assert p.blocks_closed == 1


def test_only_the_tag_that_changes_state_is_held_back():
    answering = ThinkParser()
    assert answering.feed("x</th") == [(ANSWER, "x</th")]  # cannot be "<think>": shown at once
    assert answering.feed("y<th") == [(ANSWER, "y")] and answering.held == "<th"
    thinking = ThinkParser(start_in_thinking=True)
    assert thinking.feed("x<th") == [(THINKING, "x<th")]  # cannot be "</think>"
    assert thinking.feed("y</th") == [(THINKING, "y")] and thinking.held == "</th"


def test_partial_tag_is_held_back_then_released():
    p = ThinkParser(start_in_thinking=True)
    assert p.feed("abc</th") == [(THINKING, "abc")]
    assert p.feed("ought") == [(THINKING, "</thought")]


def test_configurable_tags():
    def parse(text):
        p = ThinkParser(ALT)
        pieces = p.feed(text) + p.finish()
        return "".join(t for k, t in pieces if k == THINKING), "".join(t for k, t in pieces if k == ANSWER)

    assert parse("<reasoning>r</reasoning>a") == ("r", "a")
    assert parse("<think>r</think>a") == ("", "<think>r</think>a")


def test_bad_tag_pair_rejected():
    with pytest.raises(ValueError):
        TagPair("<t>", "<t>")
