"""The generation loop's text path: its inline per-token fast path must stream exactly what the
parser and emitter produce for the same pieces (tags split across tokens, multi-byte characters
split across tokens, stop strings, several think blocks)."""

from __future__ import annotations

import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st

from edge.events import AnswerDelta, ThinkingDelta
from edge.generate import Generation, _Emitter, generate
from edge.events import Stats
from edge.params import SamplingParams
from edge.think import ThinkParser
from edge.backends.base import BackendInfo


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

    params = SamplingParams(temperature=0, stop=stop)
    parser = ThinkParser(start_in_thinking=start_in_thinking)
    gen = Generation(backend, params, parser, Stats())
    emitter = _Emitter(stop)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out = []
    for piece in pieces:
        raw = piece if isinstance(piece, bytes) else piece.encode()
        out += emitter.pieces(gen, parser.feed(decoder.decode(raw)))
        if emitter.stopped:
            break
    out += emitter.pieces(gen, parser.feed(decoder.decode(b"", final=True)) + parser.finish(), final=True)
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
