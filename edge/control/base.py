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
Everything else in :class:`Generation` is a read-only view of the run's :class:`RunState`,
which only the loop (:mod:`edge.generate`) writes. Controllers never touch the
backend directly except through ``gen.probe``, so they work on every backend. They must be
deterministic given the run (and the sampler's seed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from operator import attrgetter
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from edge.events import ControlEvent, Event, Stats
from edge.sampling import token_logprob

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
    ``event`` is what front ends are told (yielded before any of the action's text).
    ``then``, if given, is called with the run once the retraction is done and its result is
    injected after ``text``: a text that can only be known from the retracted state (a budget
    cut back to an earlier step probes there for the answer it ends thinking with)."""

    event: ControlEvent
    text: str = ""
    stop: bool = False
    retract: int = 0
    exit_reason: str | None = None
    then: "Callable[[Generation], str] | None" = None


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


@dataclass(eq=False)
class RunState:
    """What changes as a run advances, written by the loop alone (:mod:`edge.generate`);
    controllers read it through :class:`Generation`."""

    backend: "Backend"  # a speculative wrapper of the model's backend when speculation is on
    stats: Stats
    logits: np.ndarray | None = None  # what the next token is sampled from
    thinking_text: str = ""  # the text shown so far, per block
    answer_text: str = ""
    generated: list[int] = field(default_factory=list)  # committed token ids
    logprobs: list[float] = field(default_factory=list)  # theirs
    thinking_logprobs: list[float] = field(default_factory=list)  # those of the thinking tokens
    pending_bytes: bool = False  # the last tokens end inside a UTF-8 character
    pending_tokens: int = 0  # how many tokens that character spans so far
    events: list[Event] = field(default_factory=list)  # emitted by controllers, not yet yielded


def _view(name: str, doc: str) -> property:
    return property(attrgetter(name), doc=doc)  # read-only, and read at C speed


class Generation:
    """One run as controllers see it: a read-only view of its :class:`RunState` plus the two
    things a controller may do besides returning an :class:`Action` - :meth:`emit` and
    :meth:`probe`. Nothing here may be assigned or mutated (the lists included)."""

    def __init__(self, backend: "Backend", params: "SamplingParams", parser: "ThinkParser", stats: Stats,
                 state: RunState | None = None) -> None:
        self._state = state if state is not None else RunState(backend, stats)
        self._params = params
        self._parser = parser
        self._eos = backend.eos_token_ids
        self._pieces: dict[int, str] = {}

    backend = _view("_state.backend", "The backend the run evaluates through.")
    stats = _view("_state.stats", "The run's figures so far.")
    params = _view("_params", "The run's sampling parameters.")
    parser = _view("_parser", "The think parser (``thinking``, ``tags``, ``held``, ``would_close``).")
    eos = _view("_eos", "The end-of-sequence token ids.")
    logits = _view("_state.logits", "The logits the next token is sampled from.")
    thinking_text = _view("_state.thinking_text", "The thinking text shown so far.")
    answer_text = _view("_state.answer_text", "The answer text shown so far.")
    generated = _view("_state.generated", "The committed token ids.")
    logprobs = _view("_state.logprobs", "Their logprobs (NaN unless someone ``needs_logprobs`` or the params ask).")
    thinking_logprobs = _view("_state.thinking_logprobs", "The logprobs of the thinking tokens.")
    pending_bytes = _view("_state.pending_bytes", "Whether the last tokens end inside a UTF-8 character.")
    pending_tokens = _view("_state.pending_tokens", "How many tokens that unfinished character spans.")
    thinking = _view("_parser.thinking", "Whether the model is thinking now.")
    thinking_tokens = _view("_state.stats.thinking_tokens", "Thinking tokens so far.")
    answer_tokens = _view("_state.stats.answer_tokens", "Answer tokens so far.")

    def piece(self, token: int) -> str:
        """The text of ``token`` alone (bytes of an unfinished character are left out)."""
        text = self._pieces.get(token)
        if text is None:
            text = self._pieces[token] = self._state.backend.token_bytes(token).decode("utf-8", errors="ignore")
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
        self._state.events.append(event)

    def probe(self, text: str, *, max_tokens: int = 8, stop: Sequence[str] = ("}",)) -> ProbeResult:
        """Append ``text``, decode up to ``max_tokens`` greedily, then roll everything back.

        The cache is truncated to where it was (no re-prefill) and the current logits are
        kept, so the main stream continues exactly as if no probe had happened."""
        backend = self._state.backend
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
        stats = self._state.stats
        stats.probe_tokens += cost
        stats.probes += 1
        return ProbeResult(raw.decode("utf-8", errors="replace"), out, lps, cost, finished)


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
