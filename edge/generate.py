"""The generation loop: one place, shared by every front end.

``generate(backend, prompt_tokens, params, ...)`` prefills the prompt (reusing whatever prefix
the backend's cache already holds), then decodes one token at a time:

1. sample a token from the current logits (:mod:`edge.sampling`);
2. let controllers veto it (``on_token``: budget cap, minimum thinking);
3. commit it: evaluate it, decode its bytes (never splitting a UTF-8 character), and feed the
   text to the :class:`~edge.think.ThinkParser`, which says whether it is thinking or answer;
4. let controllers react (``on_commit``: early-exit probes at step boundaries);
5. yield typed events; finish on EOS, a stop string, ``max_tokens``, a full context, a
   controller's stop or cancellation, with a :class:`~edge.events.Done` carrying the figures.
"""

from __future__ import annotations

import codecs
import math
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from edge.backends.base import Backend, common_prefix
from edge.control.base import Action, Controller
from edge.errors import ContextLengthError, PromptError
from edge.events import AnswerDelta, ControlEvent, Done, Event, Stats, ThinkingDelta
from edge.params import SamplingParams
from edge.sampling import Sampled, make_sampler, token_logprob
from edge.speculative import SpeculativeConfig, Speculator
from edge.think import ANSWER, DEFAULT_TAGS, THINKING, TagPair, ThinkParser


@dataclass
class ProbeResult:
    """A trial continuation decoded greedily and rolled back."""

    text: str
    tokens: list[int]
    logprobs: list[float]
    cost: int
    finished: bool

    @property
    def mean_prob(self) -> float:
        return float(np.mean(np.exp(self.logprobs))) if self.logprobs else 0.0

    @property
    def min_prob(self) -> float:
        return float(np.exp(min(self.logprobs))) if self.logprobs else 0.0

    @property
    def geo_mean_prob(self) -> float:
        return float(math.exp(sum(self.logprobs) / len(self.logprobs))) if self.logprobs else 0.0

    def confidence(self, kind: str = "mean") -> float:
        return {"mean": self.mean_prob, "min": self.min_prob, "geo": self.geo_mean_prob}[kind]


class Generation:
    """The state of one run as controllers see it."""

    def __init__(self, backend: Backend, params: SamplingParams, parser: ThinkParser, stats: Stats) -> None:
        self.backend = backend
        self.params = params
        self.parser = parser
        self.stats = stats
        self.thinking_text = ""
        self.answer_text = ""
        self.generated: list[int] = []
        self.logprobs: list[float] = []
        self.thinking_logprobs: list[float] = []
        self.logits: np.ndarray | None = None
        self.pending_bytes = False
        self.pending_tokens = 0
        self._events: list[Event] = []
        self._pieces: dict[int, str] = {}
        self.eos = backend.eos_token_ids

    @property
    def thinking(self) -> bool:
        return self.parser.thinking

    @property
    def thinking_tokens(self) -> int:
        return self.stats.thinking_tokens

    @property
    def answer_tokens(self) -> int:
        return self.stats.answer_tokens

    def piece(self, token: int) -> str:
        """The text of ``token`` alone (bytes of an unfinished character are left out)."""
        text = self._pieces.get(token)
        if text is None:
            text = self._pieces[token] = self.backend.token_bytes(token).decode("utf-8", errors="ignore")
        return text

    def would_close_thinking(self, token: int) -> bool:
        """True if committing ``token`` would close the current think block."""
        parser = self.parser
        if not parser.thinking:
            return False
        text = self._pieces.get(token)
        return parser.tags.close in parser._held + (text if text is not None else self.piece(token))

    def emit(self, kind: str, **detail) -> None:
        """Report something to the front ends without acting (e.g. a probe's reading)."""
        self._events.append(ControlEvent(kind, detail))

    def probe(self, text: str, *, max_tokens: int = 8, stop: Sequence[str] = ("}",)) -> ProbeResult:
        """Append ``text``, decode up to ``max_tokens`` greedily, then roll everything back.

        The cache is truncated to where it was (no re-prefill) and the current logits are
        kept, so the main stream continues exactly as if no probe had happened."""
        backend = self.backend
        start, saved = backend.n_past, self.logits
        toks = backend.tokenize(text, special=True)
        room = backend.n_ctx - start - len(toks) - 1
        max_tokens = max(0, min(max_tokens, room))
        out: list[int] = []
        lps: list[float] = []
        raw = b""
        finished = False
        try:
            if room < 0:
                return ProbeResult("", [], [], 0, False)
            logits = backend.eval(toks)
            for _ in range(max_tokens):
                tok = int(np.argmax(logits))
                lps.append(token_logprob(logits, tok))
                out.append(tok)
                if tok in backend.eos_token_ids:
                    finished = True
                    break
                raw += backend.token_bytes(tok)
                if any(s in raw.decode("utf-8", errors="ignore") for s in stop):
                    finished = True
                    break
                logits = backend.eval([tok])
        finally:
            backend.rollback(start)
            self.logits = saved
        cost = len(toks) + len(out)
        self.stats.probe_tokens += cost
        self.stats.probes += 1
        return ProbeResult(raw.decode("utf-8", errors="replace"), out, lps, cost, finished)


def _hooks(controllers: Sequence[Controller], hook: str) -> dict[bool, list[Controller]]:
    """The controllers whose ``hook`` to call per token, while thinking (key True) and while
    answering (key False); one that is not a :class:`Controller` gets every hook it has."""
    def wants(c, thinking: bool) -> bool:
        return c.wants(hook, thinking) if hasattr(c, "wants") else hasattr(c, hook)

    return {phase: [c for c in controllers if wants(c, phase)] for phase in (True, False)}


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _decoder():
    return codecs.getincrementaldecoder("utf-8")(errors="replace")


class _Emitter:
    """Turns parser pieces into events: trims whitespace at the start of each block and holds
    back answer text that may be the start of a stop string."""

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = tuple(s for s in stop if s)
        self.block = None
        self.held = ""
        self.stopped = False

    def pieces(self, gen: Generation, pieces: Sequence[tuple[str, str]], final: bool = False) -> list[Event]:
        if len(pieces) == 1 and pieces[0][0] == self.block and not final and not self.stopped:
            # one piece continuing the current block (nearly every token): nothing to trim
            kind, text = pieces[0]
            if kind == THINKING:
                gen.thinking_text += text
                return [ThinkingDelta(text)]
            if not self.stop:
                gen.answer_text += text
                return [AnswerDelta(text)]
        out: list[Event] = []
        for kind, text in pieces:
            if self.stopped:
                break
            if kind != self.block:
                if self.block == ANSWER and self.held:
                    out.append(AnswerDelta(self.held))
                    self.held = ""
                text = text.lstrip()
                if not text:
                    continue
                self.block = kind
            if kind == THINKING:
                gen.thinking_text += text
                out.append(ThinkingDelta(text))
            else:
                out.extend(self._answer(gen, text))
        if final and self.held and not self.stopped:
            out.append(AnswerDelta(self.held))
            self.held = ""
        return out

    def _answer(self, gen: Generation, text: str) -> list[Event]:
        buf = self.held + text
        self.held = ""
        for s in self.stop:
            i = buf.find(s)
            if i != -1:
                self.stopped = True
                buf = buf[:i]
        if not self.stopped and self.stop:
            keep = 0
            for s in self.stop:
                for n in range(min(len(s) - 1, len(buf)), keep, -1):
                    if buf.endswith(s[:n]):
                        keep = n
                        break
            self.held, buf = buf[len(buf) - keep :], buf[: len(buf) - keep]
        gen.answer_text += buf
        return [AnswerDelta(buf)] if buf else []


class PromptCache:
    """Remembers the logits at the end of the last prefilled prompt.

    When the same prompt comes again and the KV cache still holds it, generation restarts from
    those logits: nothing is evaluated, and the first token is chosen from exactly the logits a
    fresh run had (re-evaluating the last prompt token alone would give slightly different
    floating-point results than the batched prefill did)."""

    def __init__(self) -> None:
        self.tokens: tuple[int, ...] = ()
        self.logits: np.ndarray | None = None

    def store(self, tokens: Sequence[int], logits: np.ndarray) -> None:
        self.tokens, self.logits = tuple(tokens), logits.copy()


def prefill(backend: Backend, prompt_tokens: Sequence[int], cache: PromptCache | None = None) -> tuple[np.ndarray, int]:
    """Bring the KV cache to ``prompt_tokens``, reusing the longest cached prefix.

    Returns the logits after the last prompt token and the number of tokens reused."""
    if not prompt_tokens:
        raise PromptError("the prompt is empty")
    if len(prompt_tokens) >= backend.n_ctx:
        raise ContextLengthError(
            f"the prompt is {len(prompt_tokens)} tokens but the context holds {backend.n_ctx}; "
            "use a larger --ctx or a shorter prompt"
        )
    n = len(prompt_tokens)
    common = common_prefix(backend.tokens, prompt_tokens)
    if cache is not None and common == n and cache.logits is not None and cache.tokens == tuple(prompt_tokens):
        backend.rollback(n)
        return cache.logits.copy(), n
    keep = min(common, n - 1)
    backend.rollback(keep)
    logits = backend.eval(prompt_tokens[keep:])
    if cache is not None:
        cache.store(prompt_tokens, logits)
    return logits, keep


def generate(
    backend: Backend,
    prompt_tokens: Sequence[int],
    params: SamplingParams,
    *,
    start_in_thinking: bool = False,
    tags: TagPair = DEFAULT_TAGS,
    controllers: Sequence[Controller] = (),
    cancel: threading.Event | None = None,
    cache: PromptCache | None = None,
    speculation: SpeculativeConfig | None = None,
) -> Iterator[Event]:
    """Yield events for one reply to ``prompt_tokens``; the last event is always ``Done``.
    ``speculation`` sets up speculative decoding when ``params.speculate`` turns it on."""
    t0 = time.perf_counter()
    stats = Stats(backend=backend.info.to_dict())
    parser = ThinkParser(tags, start_in_thinking=start_in_thinking)
    gen = Generation(backend, params, parser, stats)
    sample = make_sampler(params).sample  # a bound method calls faster than __call__
    emitter = _Emitter(params.stop)
    decoder = _decoder()
    eos = backend.eos_token_ids
    history = list(prompt_tokens)
    token_bytes = backend.token_bytes
    whole: dict[int, str] = {}  # tokens whose bytes are complete UTF-8 on their own -> text
    tag_start = tags.open[0] if tags.open[0] == tags.close[0] else None  # "<": text without it holds no tag
    n_ctx, max_tokens, ignore_eos = backend.n_ctx, params.max_tokens, params.ignore_eos
    # the log-softmax over the vocabulary is paid only when someone reads token logprobs
    want_logprob = params.logprobs or any(getattr(c, "needs_logprobs", False) for c in controllers)

    gen.logits, reused = prefill(backend, prompt_tokens, cache)
    # the loop commits its tokens through `commit`; with speculation, a wrapper that serves them
    # from verified draft rows and shows everyone else the cache of committed tokens only
    spec = Speculator(backend, speculation, limit=max_tokens) if params.speculate else None
    if spec is not None:
        backend = gen.backend = spec
    commit = spec.step if spec is not None else backend.eval
    t_prefill = time.perf_counter()
    stats.prompt_tokens = len(prompt_tokens)
    stats.backend["cached_prompt_tokens"] = reused
    stats.prefill_seconds = t_prefill - t0
    t_think_end: float | None = None
    t_first: float | None = None

    def drain() -> list[Event]:
        ev, gen._events = gen._events, []
        return ev

    def feed(tokens: Sequence[int]) -> list[Event]:
        """Evaluate committed tokens and turn their text into events."""
        nonlocal t_think_end
        was_thinking = parser.thinking
        gen.logits = commit(tokens)
        history.extend(tokens)
        text = whole.get(tokens[0]) if len(tokens) == 1 and not gen.pending_bytes else None
        if text is None:
            raw = b"".join(token_bytes(t) for t in tokens)
            if len(tokens) == 1 and not gen.pending_bytes and _is_utf8(raw):
                text = whole[tokens[0]] = raw.decode("utf-8")  # nothing buffered: no decoder needed
            else:
                text = decoder.decode(raw)
                gen.pending_bytes = bool(decoder.getstate()[0])
                gen.pending_tokens = gen.pending_tokens + len(tokens) if gen.pending_bytes else 0
        events = emitter.pieces(gen, parser.feed(text))
        if was_thinking and not parser.thinking and t_think_end is None:
            t_think_end = time.perf_counter()
            seconds = t_think_end - (t_first or t_prefill)
            done = ControlEvent("thinking_done", {"tokens": stats.thinking_tokens, "seconds": round(seconds, 3)})
            first_answer = next((i for i, e in enumerate(events) if isinstance(e, AnswerDelta)), len(events))
            events.insert(first_answer, done)
        return events

    def retract(n: int) -> list[Event]:
        """Take back the last ``n`` committed tokens: rolled back in the cache, uncounted as
        thinking/answer (counted as ``retracted_tokens``: they were computed), their text
        removed from the run's text, and a ``retracted`` event tells front ends to drop it."""
        nonlocal decoder
        n = min(n, len(gen.generated))
        if n <= 0:
            return []
        gone = gen.generated[len(gen.generated) - n :]
        backend.rollback(backend.n_past - n)
        del history[len(history) - n :]
        del gen.generated[len(gen.generated) - n :]
        del gen.logprobs[len(gen.logprobs) - n :]
        del gen.thinking_logprobs[max(0, len(gen.thinking_logprobs) - n) :]
        if parser.thinking:
            stats.thinking_tokens -= n
        else:
            stats.answer_tokens -= n
        stats.retracted_tokens += n
        pending = gen.pending_bytes
        decoder = _decoder()
        gen.pending_bytes, gen.pending_tokens = False, 0
        text = b"".join(backend.token_bytes(t) for t in gone).decode("utf-8", errors="ignore")
        if pending or not text:
            return []  # only bytes of an unfinished character: nothing was shown
        field = "thinking_text" if parser.thinking else "answer_text"
        shown = getattr(gen, field)
        if shown.endswith(text):
            setattr(gen, field, shown[: len(shown) - len(text)])
        return [ControlEvent("retracted", {"tokens": n, "text": text, "kind": THINKING if parser.thinking else ANSWER})]

    def apply(action: Action) -> list[Event]:
        events: list[Event] = [ControlEvent(action.kind, dict(action.detail))]
        if action.exit_reason:
            stats.exit_reason = action.exit_reason
        if action.retract:
            events += retract(action.retract)
        if action.text:
            toks = backend.tokenize(action.text, special=True)
            if backend.n_past + len(toks) >= backend.n_ctx:
                return events
            stats.injected_tokens += len(toks)
            events += feed(toks)
        return events

    for c in controllers:
        c.start(gen)
    yield from drain()
    # hooks that cannot act under a controller's settings are not called per token
    token_hooks, commit_hooks = _hooks(controllers, "on_token"), _hooks(controllers, "on_commit")

    finish = "stop"
    while True:
        if cancel is not None and cancel.is_set():
            finish = "cancelled"
            break
        # (history mirrors the backend's cache between steps: len(history) is its n_past)
        if stats.thinking_tokens + stats.answer_tokens >= max_tokens or len(history) >= n_ctx:
            finish = "length"
            break
        sampled: Sampled = sample(gen.logits, history, want_logprob)
        action = None
        for c in token_hooks[parser.thinking]:
            action = c.on_token(gen, sampled)
            if action is not None:
                break
        if gen._events:
            yield from drain()
        if action is not None:
            yield from apply(action)
            if action.stop or emitter.stopped:
                finish = "stop" if not action.stop else (action.exit_reason or "stop")
                break
            continue
        if sampled.token in eos and not ignore_eos:
            finish = "stop"
            break
        thinking = parser.thinking
        if thinking:
            stats.thinking_tokens += 1
            gen.thinking_logprobs.append(sampled.logprob)
        else:
            stats.answer_tokens += 1
            if stats.time_to_first_answer_token is None:
                stats.time_to_first_answer_token = time.perf_counter() - t0
        tok = sampled.token
        gen.generated.append(tok)
        gen.logprobs.append(sampled.logprob)
        if t_first is None:
            t_first = time.perf_counter()
            stats.time_to_first_token = t_first - t0
        # Commit the token. Nearly every token is a whole character with no "<" that continues
        # the block being shown: that case is done here, in the fewest steps (what feed() would
        # do for it, minus the calls); anything else goes through feed().
        text = whole.get(tok) if not gen.pending_bytes and not parser._held else None
        # (answer text is held back only for stop strings, and with stop strings the answer
        # always takes the general path)
        if text is not None and emitter.block == (THINKING if thinking else ANSWER) and (
            thinking or not emitter.stop
        ) and (tag_start not in text if tag_start is not None else False):
            gen.logits = commit([tok])
            history.append(tok)
            if text:
                if thinking:
                    gen.thinking_text += text
                    yield ThinkingDelta(text)
                else:
                    gen.answer_text += text
                    yield AnswerDelta(text)
        else:
            yield from feed([tok])
        if emitter.stopped:
            finish = "stop"
            break
        hooks = commit_hooks[parser.thinking]
        if not hooks:
            continue
        piece = gen.piece(sampled.token)
        for c in hooks:
            action = c.on_commit(gen, piece)
            if gen._events:
                yield from drain()
            if action is not None:
                yield from apply(action)
                if action.stop:
                    finish = action.exit_reason or "stop"
                break
        if action is not None and action.stop:
            break
        if emitter.stopped:
            break
    if spec is not None:
        spec.sync()  # the cache holds the committed tokens only
        s = spec.stats
        stats.draft_tokens, stats.draft_accepted = s.drafted, s.accepted
        stats.model_steps, stats.model_step_tokens = s.steps, s.tokens
    tail = decoder.decode(b"", final=True)
    yield from emitter.pieces(gen, parser.feed(tail) + parser.finish(), final=True)
    t_end = time.perf_counter()
    if t_first is not None and stats.thinking_tokens:
        stats.thinking_seconds = (t_think_end or t_end) - t_first
    stats.decode_seconds = t_end - t_prefill
    stats.total_seconds = t_end - t0
    stats.finish_reason = finish
    if stats.exit_reason is None:
        stats.exit_reason = {"stop": "eos" if not emitter.stopped else "stop_string"}.get(finish, finish)
    yield Done(stats)
