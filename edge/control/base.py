"""The controller contract, and the run state the loop and the controllers share.

A controller is a small object the generator consults while a reply is produced. It reads the
run through :class:`Generation` and answers with an :class:`Action` or ``None``:

- ``start(gen)``: once, after the prompt was prefilled.
- ``on_token(gen, sampled)``: a token was sampled but not yet committed. Returning an action
  *replaces* that token with the action's text (budget cap: the end-of-thinking message;
  minimum thinking: "Wait" instead of ``</think>``).
- ``on_commit(gen, piece)``: a token was committed (``piece`` is its text). Returning an
  action *appends* its text (early exit: close thinking). Probing the model from here with
  ``gen.probe(...)`` is allowed: the probe is rolled back before the generator goes on.
- ``wants(hook, thinking)``: whether a hook is worth calling per token of this run while the
  model is thinking (``thinking=True``) or answering. The hooks run at every token, so one
  that cannot act in a phase, or under the current settings, is skipped there.

A controller changes a run only three ways: the :class:`Action` it returns, ``gen.emit(event)``
(report something without acting) and ``gen.probe(...)`` (a trial continuation, rolled back).
Everything else in :class:`Generation` is read-only to it; the loop (:mod:`edge.generate`)
advances the run through the methods in its "loop side" section. Controllers never touch the
backend directly except through ``gen.probe``, so they work on every backend. They must be
deterministic given the run (and the sampler's seed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np

from edge.events import ControlEvent, Event, Stats
from edge.sampling import token_logprob
from edge.think import ANSWER, THINKING

if TYPE_CHECKING:  # pragma: no cover
    from edge.backends.base import Backend
    from edge.params import SamplingParams
    from edge.sampling import Sampled
    from edge.think import ThinkParser


@dataclass(frozen=True)
class Action:
    """What a controller wants: inject ``text`` into the stream (tokenized and evaluated as if
    the model had written it) and/or stop. ``retract`` first takes back that many committed
    tokens (used to drop the bytes of an unfinished UTF-8 character before an injection).
    ``event`` is what front ends are told (yielded before any of the action's text)."""

    event: ControlEvent
    text: str = ""
    stop: bool = False
    retract: int = 0
    exit_reason: str | None = None


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


_NONE: tuple = ()


class Generation:
    """One run as controllers see it.

    Read (never assign, never mutate the lists): ``backend``, ``params``, ``parser``, ``stats``,
    ``eos``, ``thinking``, ``thinking_tokens``, ``answer_tokens``, ``thinking_text``,
    ``answer_text``, ``generated`` (committed token ids), ``logprobs`` / ``thinking_logprobs``
    (theirs; NaN unless a controller ``needs_logprobs`` or the params ask for logprobs),
    ``logits`` (what the next token is sampled from), ``pending_bytes`` / ``pending_tokens``
    (the last tokens end inside a UTF-8 character). Act: :meth:`emit`, :meth:`probe`."""

    def __init__(self, backend: "Backend", params: "SamplingParams", parser: "ThinkParser", stats: Stats) -> None:
        self._backend = backend
        self._params = params
        self._parser = parser
        self._stats = stats
        self._eos = backend.eos_token_ids
        self._text = {THINKING: "", ANSWER: ""}
        self._generated: list[int] = []
        self._logprobs: list[float] = []
        self._thinking_logprobs: list[float] = []
        self._logits: np.ndarray | None = None
        self._pending = (False, 0)
        self._events: list[Event] = []
        self._pieces: dict[int, str] = {}

    # -- what controllers read ------------------------------------------------------------------
    backend = property(lambda self: self._backend)
    params = property(lambda self: self._params)
    parser = property(lambda self: self._parser)
    stats = property(lambda self: self._stats)
    eos = property(lambda self: self._eos)
    generated = property(lambda self: self._generated)
    logprobs = property(lambda self: self._logprobs)
    thinking_logprobs = property(lambda self: self._thinking_logprobs)
    logits = property(lambda self: self._logits)
    thinking_text = property(lambda self: self._text[THINKING])
    answer_text = property(lambda self: self._text[ANSWER])
    pending_bytes = property(lambda self: self._pending[0])
    pending_tokens = property(lambda self: self._pending[1])

    @property
    def thinking(self) -> bool:
        return self._parser.thinking

    @property
    def thinking_tokens(self) -> int:
        return self._stats.thinking_tokens

    @property
    def answer_tokens(self) -> int:
        return self._stats.answer_tokens

    def piece(self, token: int) -> str:
        """The text of ``token`` alone (bytes of an unfinished character are left out)."""
        text = self._pieces.get(token)
        if text is None:
            text = self._pieces[token] = self._backend.token_bytes(token).decode("utf-8", errors="ignore")
        return text

    def would_close_thinking(self, token: int) -> bool:
        """True if committing ``token`` would close the current think block."""
        if not self._parser.thinking:
            return False
        text = self._pieces.get(token)
        return self._parser.would_close(text if text is not None else self.piece(token))

    # -- what controllers do --------------------------------------------------------------------
    def emit(self, event: ControlEvent) -> None:
        """Report something to the front ends without acting (e.g. a probe's reading)."""
        self._events.append(event)

    def probe(self, text: str, *, max_tokens: int = 8, stop: Sequence[str] = ("}",)) -> ProbeResult:
        """Append ``text``, decode up to ``max_tokens`` greedily, then roll everything back.

        The cache is truncated to where it was (no re-prefill) and the current logits are
        kept, so the main stream continues exactly as if no probe had happened."""
        backend = self._backend
        start = backend.n_past
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
            backend.rollback(start)  # the logits the run goes on from are untouched
        cost = len(toks) + len(out)
        self._stats.probe_tokens += cost
        self._stats.probes += 1
        return ProbeResult(raw.decode("utf-8", errors="replace"), out, lps, cost, finished)

    # -- the loop's side: how the run advances (controllers do not call these) ------------------
    def set_logits(self, logits: np.ndarray) -> None:
        self._logits = logits

    def set_backend(self, backend: "Backend") -> None:
        """What the run evaluates through from now on (a speculative wrapper of the backend)."""
        self._backend = backend

    def set_pending(self, pending_bytes: bool, pending_tokens: int) -> None:
        self._pending = (pending_bytes, pending_tokens)

    def add_token(self, token: int, logprob: float, thinking: bool) -> None:
        """Count ``token`` as committed, in thinking or in the answer."""
        if thinking:
            self._stats.thinking_tokens += 1
            self._thinking_logprobs.append(logprob)
        else:
            self._stats.answer_tokens += 1
        self._generated.append(token)
        self._logprobs.append(logprob)

    def drop_tokens(self, n: int) -> list[int]:
        """Uncount the last ``n`` committed tokens (of the current phase); they stay counted as
        ``retracted_tokens``: they were computed. Returns them."""
        generated = self._generated
        gone = generated[len(generated) - n :]
        del generated[len(generated) - n :]
        del self._logprobs[len(self._logprobs) - n :]
        del self._thinking_logprobs[max(0, len(self._thinking_logprobs) - n) :]
        if self._parser.thinking:
            self._stats.thinking_tokens -= n
        else:
            self._stats.answer_tokens -= n
        self._stats.retracted_tokens += n
        return gone

    def add_text(self, block: str, text: str) -> None:
        """Shown text of ``block`` (``THINKING`` or ``ANSWER``)."""
        self._text[block] += text

    def drop_text(self, block: str, text: str) -> None:
        """Take back ``text`` from the end of ``block``'s shown text (if it ends with it)."""
        shown = self._text[block]
        if shown.endswith(text):
            self._text[block] = shown[: len(shown) - len(text)]

    def take_events(self) -> Sequence[Event]:
        """The events controllers emitted since the last call."""
        if not self._events:
            return _NONE
        out, self._events = self._events, []
        return out


class Controller:
    """Base class with no-op hooks; subclasses override what they need."""

    name = "controller"
    #: set True when the controller reads ``gen.logprobs`` / ``gen.thinking_logprobs``
    needs_logprobs = False

    def start(self, gen: Generation) -> None:
        return None

    def on_token(self, gen: Generation, sampled: "Sampled") -> Action | None:
        return None

    def on_commit(self, gen: Generation, piece: str) -> Action | None:
        return None

    def wants(self, hook: str, thinking: bool) -> bool:
        """Whether the generator should call ``hook`` ("on_token" / "on_commit") at every
        token of this run while thinking (``thinking=True``) or answering; asked after
        :meth:`start`. By default: whether the subclass overrides the hook. A controller
        whose settings make a hook a no-op in a phase says False, and the generator saves
        the call per token. (``on_commit`` is asked with the phase the token ended in.)"""
        return getattr(type(self), hook) is not getattr(Controller, hook)
