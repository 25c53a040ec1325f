"""The generation loop's text path: its per-token fast path (``Loop.commit``) must stream
exactly what the parser and emitter produce for the same pieces (tags split across tokens,
multi-byte characters split across tokens, stop strings, several think blocks). And the loop's
own events: ``ThinkingDone`` between thinking and answer, ``TokenLogprobs`` when asked."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from edge.control.base import RunState
from edge.control.budget import ThinkingBudget
from edge.events import AnswerDelta, Done, Injected, Stats, ThinkingDelta, ThinkingDone, TokenLogprobs
from edge.generate import _Emitter, generate
from edge.params import SamplingParams
from edge.think import ThinkParser
from edge.backends.base import BackendInfo
from tests.scripted import ScriptedBackend


class Replay:
    """A backend that writes the given pieces in order, whatever they say, then EOS."""

    def __init__(self, pieces):
        self.vocab = sorted({p if isinstance(p, bytes) else p.encode() for p in pieces} | {b"Q", b"?"})
        self.ids = {p: i for i, p in enumerate(self.vocab)}
        self.eos = len(self.vocab)
        self.script = [self.ids[p if isinstance(p, bytes) else p.encode()] for p in pieces] + [self.eos]
        self.info = BackendInfo(name="replay", n_ctx=4096)
        self._tokens: list[int] = []
        self.prompt = 0

    n_ctx = property(lambda self: 4096)
    n_past = property(lambda self: len(self._tokens))
    tokens = property(lambda self: tuple(self._tokens))
    eos_token_ids = property(lambda self: frozenset({self.eos}))

    def tokenize(self, text, *, add_bos=False, special=True):
        return [self.ids[c.encode()] for c in text]

    def token_bytes(self, token):
        return self.vocab[token] if token < self.eos else b""

    def eval(self, tokens):
        self._tokens.extend(tokens)
        if not self.prompt:
            self.prompt = len(self._tokens)
        logits = np.zeros(self.eos + 1, dtype=np.float32)
        logits[self.script[min(len(self._tokens) - self.prompt, len(self.script) - 1)]] = 10.0
        return logits

    def rollback(self, n_past):
        del self._tokens[n_past:]

PIECES = ["a", " b", "EN", "D", "Wait", "\n", "\n\n", " ", "<", "</", "think", ">", "<think>", "</think>", "</th", "ink>",
          "é", "数", "x = 7.", "<b>", "Answer", "\\boxed{7}", "END"]
BYTES = ["é".encode()[:1], "é".encode()[1:], "数".encode()[:2], "数".encode()[2:]]  # characters split across tokens


def reference(backend, pieces, start_in_thinking, stop):
    """What the loop must stream: every piece through an incremental UTF-8 decoder, the think
    parser and the emitter, one piece at a time (the general path, no shortcuts)."""
    import codecs

    parser = ThinkParser(start_in_thinking=start_in_thinking)
    state = RunState(backend, Stats())
    emitter = _Emitter(stop)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = []
    for piece in pieces:
        raw = piece if isinstance(piece, bytes) else piece.encode()
        out += emitter.pieces(state, parser.feed(decoder.decode(raw)))
        if emitter.stopped:
            break
    out += emitter.pieces(state, parser.feed(decoder.decode(b"", final=True)) + parser.finish(), final=True)
    return [(type(e).__name__, e.text) for e in out if isinstance(e, (ThinkingDelta, AnswerDelta))]


def merged(events):
    """Adjacent deltas of one kind joined: how a front end shows them."""
    out = []
    for kind, text in events:
        if out and out[-1][0] == kind:
            out[-1] = (kind, out[-1][1] + text)
        else:
            out.append((kind, text))
    return out


@settings(max_examples=400, deadline=None)
@given(
    pieces=st.lists(st.sampled_from(PIECES + BYTES), min_size=1, max_size=40),
    start_in_thinking=st.booleans(),
    stop=st.sampled_from([(), ("END",), ("Ans", "x =")]),
)
@example(pieces=["a", "</th", "ink>", " b"], start_in_thinking=True, stop=())
@example(pieces=["a", "é".encode()[:1], "é".encode()[1:], "</think>", "数", "END", "c"], start_in_thinking=True, stop=("END",))
@example(pieces=["EN", "a", "EN", "D", "b"], start_in_thinking=False, stop=("END",))  # a stop string across tokens
@example(pieces=["a", "EN", "a", "b"], start_in_thinking=False, stop=("END",))  # text held back for a stop string
def test_streamed_text_equals_parser_and_emitter(pieces, start_in_thinking, stop):
    b = Replay(pieces)
    params = SamplingParams(temperature=0, max_tokens=len(pieces) + 1, stop=stop)
    events = list(generate(b, b.tokenize("Q?"), params, start_in_thinking=start_in_thinking))
    got = [(type(e).__name__, e.text) for e in events if isinstance(e, (ThinkingDelta, AnswerDelta))]
    assert merged(got) == merged(reference(b, pieces, start_in_thinking, stop))


def spec_events(text, start_in_thinking):
    """What the loop must stream for ``text`` by the parser's definition (only a tag that changes
    state is markup; a stray tag is text) and the emitter's (whitespace trimmed at the start of
    each block; a block of only whitespace is not started)."""
    out, thinking, i, block = [], start_in_thinking, 0, None
    while i <= len(text):
        tag = "</think>" if thinking else "<think>"
        j = text.find(tag, i)
        j = len(text) if j == -1 else j
        kind, piece = ("ThinkingDelta" if thinking else "AnswerDelta"), text[i:j]
        if kind != block:
            piece = piece.lstrip()
            block = kind if piece else block
        if piece:
            out.append((kind, piece))
        i, thinking = j + len(tag), not thinking
    return merged(out)


@settings(max_examples=400, deadline=None)
@given(pieces=st.lists(st.sampled_from(PIECES + BYTES), min_size=1, max_size=40), start_in_thinking=st.booleans())
@example(pieces=["a", "</think>", "b", "</think>", "c"], start_in_thinking=True)  # a literal close tag in the answer
@example(pieces=["<think>", "a", "<think>", "b", "</think>", "c"], start_in_thinking=False)  # an open tag inside thinking
@example(pieces=["a", "</th", "ink>", "b", "</th", "ink>", "c"], start_in_thinking=True)
def test_streamed_text_equals_spec(pieces, start_in_thinking):
    b = Replay(pieces)
    params = SamplingParams(temperature=0, max_tokens=len(pieces) + 1)
    events = list(generate(b, b.tokenize("Q?"), params, start_in_thinking=start_in_thinking))
    got = [(type(e).__name__, e.text) for e in events if isinstance(e, (ThinkingDelta, AnswerDelta))]
    text = b"".join(p if isinstance(p, bytes) else p.encode() for p in pieces).decode("utf-8", errors="replace")
    assert merged(got) == spec_events(text, start_in_thinking)


# -- the loop's own events on a scripted model -------------------------------------------------

SCRIPT = ["Step one.", "\n\n", "Step two.", "\n\n", "So x = 7.", "\n", "</think>\n\n**Final"]  # the answer starts in the closing token
ANSWER = "\n\n**Final Answer**\n\\boxed{7}"


def scripted_events(params, controllers=(), **kw):
    b = ScriptedBackend(SCRIPT, ANSWER, probs=[0.9, 0.8, 0.7, 0.6, 0.5, 0.95, 0.9], **kw)
    prompt = b.tokenize("Q?")
    return b, prompt, list(generate(b, prompt, params, start_in_thinking=True, controllers=controllers))


@given(cap=st.sampled_from([None, 0, 1, 3, 6]))
@settings(max_examples=10, deadline=None)
def test_thinking_done_comes_once_between_the_thinking_and_the_answer(cap):
    controllers = [ThinkingBudget(max_thinking=cap)] if cap is not None else []
    _, _, events = scripted_events(SamplingParams(temperature=0, max_tokens=100), controllers)
    (i,) = [i for i, e in enumerate(events) if isinstance(e, ThinkingDone)]
    kinds = [type(e) for e in events]
    last_thinking = max((j for j, k in enumerate(kinds) if k is ThinkingDelta), default=-1)
    assert last_thinking < i < kinds.index(AnswerDelta)
    stats = events[-1].stats
    assert events[i].tokens == stats.thinking_tokens == (len(SCRIPT) if cap is None else cap)
    assert 0 <= events[i].seconds <= stats.total_seconds + 1e-3


def test_token_logprobs_report_every_committed_token_and_the_end():
    params = SamplingParams(temperature=0, max_tokens=100, logprobs=True, top_logprobs=3)
    b, prompt, events = scripted_events(params)
    reported = [e for e in events if isinstance(e, TokenLogprobs)]
    # every token the model wrote, in order, then the end-of-sequence token that ended the reply
    assert [e.token for e in reported] == list(b.tokens[len(prompt):]) + [b.eos_id]
    assert [e.text for e in reported[: len(SCRIPT)]] == SCRIPT and reported[-1].text == ""
    for e, p in zip(reported, [0.9, 0.8, 0.7, 0.6, 0.5, 0.95, 0.9]):
        assert e.logprob == pytest.approx(math.log(p), abs=1e-5)
    for e in reported:  # greedy: the chosen token is the most likely one; alternatives best first
        assert len(e.top) == 3 and e.top[0].token == e.token and e.top[0].logprob == pytest.approx(e.logprob)
        assert [a.logprob for a in e.top] == sorted((a.logprob for a in e.top), reverse=True)
        assert e.top[0].text == e.text
    # each comes before the text of its token
    first = next(i for i, e in enumerate(events) if isinstance(e, TokenLogprobs))
    assert first < next(i for i, e in enumerate(events) if isinstance(e, ThinkingDelta))
    assert isinstance(events[-1], Done)
    # not asked: none (and the stream is otherwise the same)
    _, _, plain = scripted_events(SamplingParams(temperature=0, max_tokens=100))
    assert not any(isinstance(e, TokenLogprobs) for e in plain)
    strip = lambda evs: [e for e in evs if isinstance(e, (ThinkingDelta, AnswerDelta))]  # noqa: E731
    assert strip(plain) == strip(events)


def test_token_logprobs_leave_out_what_a_controller_wrote():
    params = SamplingParams(temperature=0, max_tokens=100, logprobs=True, top_logprobs=1)
    b, prompt, events = scripted_events(params, [ThinkingBudget(max_thinking=2, end_message="\nStop.\n")])
    stats = events[-1].stats
    reported = [e.token for e in events if isinstance(e, TokenLogprobs)]
    injected = [e for e in events if isinstance(e, Injected)]
    assert len(injected) == 1 and stats.injected_tokens > 0
    # the model's tokens only: the two thinking tokens, the answer, the end - not the message
    assert len(reported) == stats.thinking_tokens + stats.answer_tokens + 1
    assert reported[:2] == [b.script_base, b.script_base + 1] and reported[-1] == b.eos_id
