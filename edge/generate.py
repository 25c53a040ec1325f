"""The generation loop: one place, shared by every front end.

``generate(backend, prompt_tokens, params, ...)`` runs a :class:`Loop`: it prefills the prompt
(reusing whatever prefix the backend's cache already holds), then decodes one token at a time:

1. sample a token from the current logits (:mod:`edge.sampling`);
2. let controllers replace it (``on_token``: budget cap, minimum thinking) - :meth:`Loop.apply`
   injects an action's text, after :meth:`Loop.retract` took back what it asked;
3. commit it (:meth:`Loop.commit`): evaluate it, decode its bytes (never splitting a UTF-8
   character), and feed the text to the :class:`~edge.think.ThinkParser`, which says whether it
   is thinking or answer;
4. let controllers react (``on_commit``; early-exit probes run through ``gen.probe``);
5. yield typed events (:mod:`edge.events`); finish (:meth:`Loop.finish`) on EOS, a stop string,
   ``max_tokens``, a full context, a controller's stop or cancellation, with a
   :class:`~edge.events.Done` carrying the figures.

Controllers see the run through :class:`~edge.control.base.Generation`; with
``SamplingParams.logprobs`` every committed token is reported as a
:class:`~edge.events.TokenLogprobs`.
"""

from __future__ import annotations

import codecs
import threading
import time
from typing import Iterator, Sequence

import numpy as np

from edge.backends.base import Backend, common_prefix
from edge.control.base import Action, Controller, Generation, RunState
from edge.errors import ContextLengthError, PromptError
from edge.events import (
    Alternative,
    AnswerDelta,
    Done,
    Event,
    Retracted,
    Stats,
    ThinkingDelta,
    ThinkingDone,
    TokenLogprobs,
)
from edge.params import SamplingParams
from edge.sampling import Sampled, make_sampler
from edge.speculative import SpeculativeConfig, Speculation, Speculator, decide
from edge.think import ANSWER, DEFAULT_TAGS, THINKING, TagPair, ThinkParser


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

    def pieces(self, state: RunState, pieces: Sequence[tuple[str, str]], final: bool = False) -> list[Event]:
        if len(pieces) == 1 and pieces[0][0] == self.block and not final and not self.stopped:
            # one piece continuing the current block (nearly every token): nothing to trim
            kind, text = pieces[0]
            if kind == THINKING:
                state.thinking_text += text
                return [ThinkingDelta(text)]
            if not self.stop:
                state.answer_text += text
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
                state.thinking_text += text
                out.append(ThinkingDelta(text))
            else:
                out.extend(self._answer(state, text))
        if final and self.held and not self.stopped:
            out.append(AnswerDelta(self.held))
            self.held = ""
        return out

    def _answer(self, state: RunState, text: str) -> list[Event]:
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
        state.answer_text += buf
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


class Loop:
    """One reply being generated: the state its steps share, and the steps.

    ``Loop(backend, params, parser, controllers, cancel).run(prompt_tokens)`` yields the events
    (:func:`generate` is the public entry)."""

    def __init__(
        self,
        backend: Backend,
        params: SamplingParams,
        parser: ThinkParser,
        controllers: Sequence[Controller] = (),
        cancel: threading.Event | None = None,
    ) -> None:
        self.t0 = time.perf_counter()
        self.params, self.parser, self.controllers, self.cancel = params, parser, tuple(controllers), cancel
        self.stats = Stats(backend=backend.info.to_dict())
        self.state = RunState(backend, self.stats)  # what the loop changes; controllers read it via gen
        self.gen = Generation(backend, params, parser, self.stats, self.state)
        self.backend = backend  # a speculative wrapper of it once prefilled, with speculation on
        self.sample = make_sampler(params).sample  # a bound method calls faster than __call__
        self.emitter = _Emitter(params.stop)
        self.decoder = _decoder()
        self.token_bytes = backend.token_bytes
        self.whole: dict[int, str] = {}  # tokens whose bytes are complete UTF-8 on their own -> text
        tags = parser.tags
        self.tag_start = tags.open[0] if tags.open[0] == tags.close[0] else None  # "<": text without it holds no tag
        # the log-softmax over the vocabulary is paid only when someone reads token logprobs
        self.want_logprob = params.logprobs or any(getattr(c, "needs_logprobs", False) for c in self.controllers)
        self.t_first: float | None = None
        self.t_think_end: float | None = None
        self.token_hooks: dict[bool, list[Controller]] = {True: [], False: []}
        self.commit_hooks: dict[bool, list[Controller]] = {True: [], False: []}

    def prefill(self, prompt_tokens: Sequence[int], cache: PromptCache | None,
                speculation: SpeculativeConfig | Speculation | None) -> None:
        """Bring the cache to the prompt (see :func:`prefill`) and set up speculation."""
        backend, stats = self.backend, self.stats
        self.history = list(prompt_tokens)  # mirrors the backend's cache between steps
        self.state.logits, reused = prefill(backend, prompt_tokens, cache)
        # tokens are committed through `self.eval`; with speculation, a wrapper that serves them
        # from verified draft rows and shows everyone else the cache of committed tokens only
        plan = speculation if isinstance(speculation, Speculation) else decide(self.params.speculate, backend, speculation)
        stats.speculation = str(plan)
        self.spec = Speculator(backend, plan.config, limit=self.params.max_tokens) if plan.on else None
        if self.spec is not None:
            self.backend = self.state.backend = self.spec
        self.eval = self.spec.step if self.spec is not None else backend.eval
        self.t_prefill = time.perf_counter()
        stats.prompt_tokens = len(prompt_tokens)
        stats.backend["cached_prompt_tokens"] = reused
        stats.prefill_seconds = self.t_prefill - self.t0

    def run(self, prompt_tokens: Sequence[int], *, cache: PromptCache | None = None,
            speculation: SpeculativeConfig | Speculation | None = None) -> Iterator[Event]:
        """The reply's events; the last is always :class:`~edge.events.Done`."""
        self.prefill(prompt_tokens, cache, speculation)
        yield from self.start()
        gen, state, parser, emitter, stats, history = self.gen, self.state, self.parser, self.emitter, self.stats, self.history
        max_tokens, n_ctx, cancel = self.params.max_tokens, self.backend.n_ctx, self.cancel
        eos, ignore_eos, report_logprobs = self.backend.eos_token_ids, self.params.ignore_eos, self.params.logprobs
        while True:
            if cancel is not None and cancel.is_set():
                finish = "cancelled"
                break
            if stats.thinking_tokens + stats.answer_tokens >= max_tokens or len(history) >= n_ctx:
                finish = "length"
                break
            sampled: Sampled = self.sample(state.logits, history, self.want_logprob)
            # controllers may replace the sampled token with their text (or stop): the first
            # one that acts decides
            action = None
            for c in self.token_hooks[parser.thinking]:
                action = c.on_token(gen, sampled)
                if action is not None:
                    break
            if state.events:
                yield from self.take_events()
            if action is not None:
                yield from self.apply(action)
                if action.stop or emitter.stopped:
                    finish = (action.exit_reason or "stop") if action.stop else "stop"
                    break
                continue
            if report_logprobs:
                yield self.token_logprobs(sampled)
            if sampled.token in eos and not ignore_eos:
                finish = "stop"
                break
            yield from self.commit(sampled)
            if emitter.stopped:
                finish = "stop"
                break
            # controllers may react to the committed token (append text, or stop)
            hooks = self.commit_hooks[parser.thinking]
            if hooks:
                action, events = self.react(hooks, sampled.token)
                yield from events
                if action is not None and action.stop:
                    finish = action.exit_reason or "stop"
                    break
                if emitter.stopped:
                    finish = "stop"
                    break
        yield from self.finish(finish)

    def start(self) -> Sequence[Event]:
        """Start the controllers; the events they emitted."""
        for c in self.controllers:
            c.start(self.gen)
        # hooks that cannot act under a controller's settings are not called per token
        self.token_hooks, self.commit_hooks = _hooks(self.controllers, "on_token"), _hooks(self.controllers, "on_commit")
        return self.take_events()

    def take_events(self) -> list[Event]:
        """The events controllers emitted since the last call."""
        events, self.state.events = self.state.events, []
        return events

    def react(self, hooks: Sequence[Controller], token: int) -> tuple[Action | None, list[Event]]:
        """Controllers see the committed ``token``; the first action taken (applied), and the
        events."""
        gen = self.gen
        piece = gen.piece(token)
        events: list[Event] = []
        for c in hooks:
            action = c.on_commit(gen, piece)
            events.extend(self.take_events())
            if action is not None:
                return action, events + self.apply(action)
        return None, events

    def commit(self, sampled: Sampled) -> Sequence[Event]:
        """Count the sampled token and commit it; the events its text makes.

        This is the fast path: nearly every token is a whole character with no "<" that
        continues the block being shown, with nothing held back, and is committed here in the
        fewest steps (what :meth:`feed` would do for it); any other token goes through
        :meth:`feed`. (Answer text is held back only for stop strings, so with stop strings
        the answer always takes the general path.)"""
        tok, logprob, thinking, stats, state = sampled.token, sampled.logprob, self.parser.thinking, self.stats, self.state
        if thinking:
            stats.thinking_tokens += 1
            state.thinking_logprobs.append(logprob)
        else:
            stats.answer_tokens += 1
            if stats.time_to_first_answer_token is None:
                stats.time_to_first_answer_token = time.perf_counter() - self.t0
        state.generated.append(tok)
        state.logprobs.append(logprob)
        if self.t_first is None:
            self.t_first = time.perf_counter()
            stats.time_to_first_token = self.t_first - self.t0
        text = self.whole.get(tok) if not state.pending_bytes and not self.parser.held else None
        if (text is None or self.emitter.block != (THINKING if thinking else ANSWER) or (not thinking and self.emitter.stop)
                or self.tag_start is None or self.tag_start in text):
            return self.feed([tok])
        state.logits = self.eval([tok])
        self.history.append(tok)
        if not text:
            return ()
        if thinking:
            state.thinking_text += text
            return (ThinkingDelta(text),)
        state.answer_text += text
        return (AnswerDelta(text),)

    def feed(self, tokens: Sequence[int]) -> list[Event]:
        """Evaluate committed tokens and turn their text into events (with
        :class:`~edge.events.ThinkingDone` before the first answer text when thinking closes)."""
        was_thinking = self.parser.thinking
        self.state.logits = self.eval(tokens)
        self.history.extend(tokens)
        events = self.emitter.pieces(self.state, self.parser.feed(self.decode(tokens)))
        if was_thinking and not self.parser.thinking and self.t_think_end is None:
            self.t_think_end = time.perf_counter()
            seconds = self.t_think_end - (self.t_first or self.t_prefill)
            first_answer = next((i for i, e in enumerate(events) if isinstance(e, AnswerDelta)), len(events))
            events.insert(first_answer, ThinkingDone(self.stats.thinking_tokens, round(seconds, 3)))
        return events

    def decode(self, tokens: Sequence[int]) -> str:
        """The text of committed tokens; the bytes of an unfinished character wait for the next."""
        state = self.state
        if len(tokens) == 1 and not state.pending_bytes:
            text = self.whole.get(tokens[0])
            if text is not None:
                return text
            raw = self.token_bytes(tokens[0])
            if _is_utf8(raw):  # nothing buffered: no decoder needed
                text = self.whole[tokens[0]] = raw.decode("utf-8")
                return text
        else:
            raw = b"".join(self.token_bytes(t) for t in tokens)
        text = self.decoder.decode(raw)
        state.pending_bytes = bool(self.decoder.getstate()[0])
        state.pending_tokens = state.pending_tokens + len(tokens) if state.pending_bytes else 0
        return text

    def retract(self, n: int) -> list[Event]:
        """Take back the last ``n`` committed tokens: rolled back in the cache, uncounted as
        thinking/answer (counted as ``retracted_tokens``: they were computed), their text
        removed from the run's text, and a :class:`~edge.events.Retracted` tells front ends to
        drop it."""
        state, stats, thinking = self.state, self.stats, self.parser.thinking
        n = min(n, len(state.generated))
        if n <= 0:
            return []
        gone = state.generated[len(state.generated) - n :]
        self.backend.rollback(self.backend.n_past - n)
        for seq in (self.history, state.generated, state.logprobs):
            del seq[len(seq) - n :]
        del state.thinking_logprobs[max(0, len(state.thinking_logprobs) - n) :]
        if thinking:
            stats.thinking_tokens -= n
        else:
            stats.answer_tokens -= n
        stats.retracted_tokens += n
        pending = state.pending_bytes
        self.decoder, state.pending_bytes, state.pending_tokens = _decoder(), False, 0
        text = b"".join(self.backend.token_bytes(t) for t in gone).decode("utf-8", errors="ignore")
        if pending or not text:
            return []  # only bytes of an unfinished character: nothing was shown
        field = "thinking_text" if thinking else "answer_text"
        shown = getattr(state, field)
        if shown.endswith(text):
            setattr(state, field, shown[: len(shown) - len(text)])
        return [Retracted(n, text, THINKING if thinking else ANSWER)]

    def apply(self, action: Action) -> list[Event]:
        """Carry out a controller's action: report it, retract, inject its text."""
        events: list[Event] = [action.event]
        if action.exit_reason:
            self.stats.exit_reason = action.exit_reason
        if action.retract:
            events += self.retract(action.retract)
        text = action.text
        if action.then is not None:
            text += action.then(self.gen)  # it may probe from the retracted state
            events += self.take_events()
        if text:
            toks = self.backend.tokenize(text, special=True)
            if self.backend.n_past + len(toks) >= self.backend.n_ctx:
                return events
            self.stats.injected_tokens += len(toks)
            events += self.feed(toks)
        return events

    def token_logprobs(self, sampled: Sampled) -> TokenLogprobs:
        """The sampled token (about to be committed, or ending the reply) with its logprobs."""
        token_bytes = self.backend.token_bytes

        def text(t: int) -> str:
            return token_bytes(t).decode("utf-8", errors="replace")

        top = tuple(Alternative(t, text(t), lp) for t, lp in sampled.top)
        return TokenLogprobs(sampled.token, text(sampled.token), sampled.logprob, top)

    def finish(self, reason: str) -> list[Event]:
        """Flush the text held back, settle the figures; the last events and Done."""
        stats = self.stats
        if self.spec is not None:
            self.spec.sync()  # the cache holds the committed tokens only
            s = self.spec.stats
            stats.draft_tokens, stats.draft_accepted = s.drafted, s.accepted
            stats.model_steps, stats.model_step_tokens = s.steps, s.tokens
        tail = self.decoder.decode(b"", final=True)
        events = self.emitter.pieces(self.state, self.parser.feed(tail) + self.parser.finish(), final=True)
        t_end = time.perf_counter()
        if self.t_first is not None and stats.thinking_tokens:
            stats.thinking_seconds = (self.t_think_end or t_end) - self.t_first
        stats.decode_seconds = t_end - self.t_prefill
        stats.total_seconds = t_end - self.t0
        stats.finish_reason = reason
        if stats.exit_reason is None:
            stats.exit_reason = {"stop": "eos" if not self.emitter.stopped else "stop_string"}.get(reason, reason)
        events.append(Done(stats))
        return events


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
    speculation: SpeculativeConfig | Speculation | None = None,
) -> Iterator[Event]:
    """Yield events for one reply to ``prompt_tokens``; the last event is always ``Done``.
    ``speculation``: whether to speculate, decided (a :class:`~edge.speculative.Speculation`,
    as :class:`~edge.runtime.Runtime` passes), or the settings to speculate with, decided here
    from ``params.speculate`` by :func:`~edge.speculative.decide` (auto needs settings whose
    cost curve pays; :class:`~edge.runtime.Runtime` measures the machine's).
    Nothing runs (not even the prefill) before the first event is asked for."""
    loop = Loop(backend, params, ThinkParser(tags, start_in_thinking=start_in_thinking), controllers, cancel)
    yield from loop.run(prompt_tokens, cache=cache, speculation=speculation)
