"""Typed events: the one streaming unit every front end consumes.

The generator loop yields these; the CLI, the server and the benchmarks translate them to
their own output formats at the edge and never re-implement parsing or control. Front ends
dispatch on the type (``isinstance``), never on a string:

- text: :class:`ThinkingDelta`, :class:`AnswerDelta`;
- what happened to the reply besides its text, all :class:`ControlEvent` subclasses:
  :class:`ThinkingDone` (thinking closed, with its figures), :class:`Retracted` (text already
  streamed is taken back), :class:`Probe` (an early-exit trial answer and its confidence),
  :class:`BudgetChosen` and :class:`BudgetFromProbe` (a per-query budget),
  :class:`AnswerBudgetExhausted` (the reply was stopped), and the :class:`Injected` family - a
  controller put text into the stream:
  :class:`BudgetExhausted`, :class:`ThinkingClosedAtBudget`, :class:`WaitInjected`,
  :class:`ThinkingUnclosed`, :class:`EarlyExited`;
- :class:`TokenLogprobs` for every committed token when ``SamplingParams.logprobs`` asks;
- :class:`Done` (the last event, with the run's :class:`Stats`).

Every :class:`ControlEvent` has a ``kind`` (its name in reports and on the wire, e.g.
``"budget_exhausted"``) and a ``detail`` dict of its figures; ``summary()`` is both in one dict.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, NamedTuple, Union


@dataclass(frozen=True)
class ThinkingDelta:
    """A piece of reasoning text (inside ``<think> ... </think>``)."""

    text: str
    type: str = field(default="thinking", init=False)


@dataclass(frozen=True)
class AnswerDelta:
    """A piece of answer text (after thinking closed, or outside any think block)."""

    text: str
    type: str = field(default="answer", init=False)


@dataclass(frozen=True)
class ControlEvent:
    """Base of the events that report what happened to a reply besides its text."""

    kind: ClassVar[str] = "control"

    @property
    def detail(self) -> dict[str, Any]:
        """The event's figures, by field name."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def summary(self) -> dict[str, Any]:
        """``{"kind": ..., **detail}``: how reports and ``usage.edge.controls`` list it."""
        return {"kind": self.kind, **self.detail}


@dataclass(frozen=True)
class ThinkingDone(ControlEvent):
    """Thinking closed: ``tokens`` thinking tokens in ``seconds`` (emitted before the first
    answer text)."""

    kind: ClassVar[str] = "thinking_done"
    tokens: int
    seconds: float


@dataclass(frozen=True)
class Retracted(ControlEvent):
    """The last ``tokens`` committed tokens were taken back; ``text``, already streamed as
    ``block`` (``"thinking"`` or ``"answer"``), is to be dropped by front ends."""

    kind: ClassVar[str] = "retracted"
    tokens: int
    text: str
    block: str

    @property
    def detail(self) -> dict[str, Any]:
        # the block is reported under "kind", as it always was (in ``summary()`` it therefore
        # replaces the event's own kind)
        return {"tokens": self.tokens, "text": self.text, "kind": self.block}


@dataclass(frozen=True)
class Probe(ControlEvent):
    """An early-exit trial: at ``at`` thinking tokens the model's trial ``answer`` had this
    ``confidence``; ``finished`` if it closed within the probe, which cost ``cost`` tokens.
    ``chars``: the length of the thinking text then; ``stream``: the mean probability of the
    last thinking tokens before it, when the controller keeps them (its gate, or an oracle)."""

    kind: ClassVar[str] = "probe"
    at: int
    answer: str
    confidence: float
    finished: bool
    cost: int
    chars: int | None = None
    stream: float | None = None


@dataclass(frozen=True)
class BudgetChosen(ControlEvent):
    """An adaptive budget chose this run's thinking cap from the prompt length."""

    kind: ClassVar[str] = "adaptive_budget"
    budget: int
    prompt_tokens: int


@dataclass(frozen=True)
class BudgetFromProbe(ControlEvent):
    """A probe-signal budget read its one probe (at ``at`` thinking tokens, the answer with this
    ``confidence``) and set this run's thinking cap from it (``budget``; None: no cap)."""

    kind: ClassVar[str] = "signal_budget"
    budget: int | None
    at: int
    confidence: float
    sure: bool


@dataclass(frozen=True)
class AnswerBudgetExhausted(ControlEvent):
    """The answer budget ran out: the reply stops here (finish ``length``)."""

    kind: ClassVar[str] = "answer_budget_exhausted"
    answer_tokens: int


@dataclass(frozen=True)
class Injected(ControlEvent):
    """Base of the controller actions that put text into the stream (the text itself arrives
    as deltas, as if the model had written it)."""


@dataclass(frozen=True)
class BudgetExhausted(Injected):
    """The thinking cap was reached: thinking was closed (with the end message, at the last
    finished step when ``cut == "step"``, or at a probe point with the probe's answer when
    ``cut == "probe"``); ``thinking_tokens`` are those kept."""

    kind: ClassVar[str] = "budget_exhausted"
    thinking_tokens: int
    budget: int
    cut: str | None = None

    @property
    def detail(self) -> dict[str, Any]:
        d: dict[str, Any] = {"thinking_tokens": self.thinking_tokens, "budget": self.budget}
        if self.cut is not None:
            d["cut"] = self.cut
        return d


@dataclass(frozen=True)
class ThinkingClosedAtBudget(Injected):
    """The model closed thinking by itself just as the cap was reached; the close was kept."""

    kind: ClassVar[str] = "thinking_closed_at_budget"
    thinking_tokens: int
    budget: int


@dataclass(frozen=True)
class WaitInjected(Injected):
    """Thinking was about to end below the minimum: "Wait" was written instead."""

    kind: ClassVar[str] = "wait_injected"
    thinking_tokens: int
    waits: int


@dataclass(frozen=True)
class ThinkingUnclosed(Injected):
    """The model ended while thinking: the end message and the close were written."""

    kind: ClassVar[str] = "thinking_unclosed"
    thinking_tokens: int


@dataclass(frozen=True)
class EarlyExited(Injected):
    """A probe's answer was settled: thinking closed with it (``probes`` trials so far)."""

    kind: ClassVar[str] = "early_exit"
    thinking_tokens: int
    answer: str
    confidence: float
    probes: int


class Alternative(NamedTuple):
    """One of the most likely tokens at a position."""

    token: int
    text: str
    logprob: float


@dataclass(frozen=True)
class TokenLogprobs:
    """A committed token (or the end-of-sequence token that ended the reply), its text, its
    log-probability and the ``SamplingParams.top_logprobs`` most likely tokens there."""

    token: int
    text: str
    logprob: float
    top: tuple[Alternative, ...] = ()


@dataclass
class Stats:
    """Figures of one generation, carried by :class:`Done`."""

    prompt_tokens: int = 0
    thinking_tokens: int = 0
    answer_tokens: int = 0
    injected_tokens: int = 0
    retracted_tokens: int = 0
    probe_tokens: int = 0
    probes: int = 0
    time_to_first_token: float | None = None
    time_to_first_answer_token: float | None = None
    thinking_seconds: float = 0.0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    total_seconds: float = 0.0
    finish_reason: str = "stop"
    exit_reason: str | None = None
    backend: dict[str, Any] = field(default_factory=dict)
    # speculative decoding: "on: why" or "off: why" (None: the generation never started), and
    # (all 0 when it is off) drafted tokens verified, drafted tokens committed, model
    # evaluations made for the generated tokens, and those tokens
    speculation: str | None = None
    draft_tokens: int = 0
    draft_accepted: int = 0
    model_steps: int = 0
    model_step_tokens: int = 0

    @property
    def completion_tokens(self) -> int:
        return self.thinking_tokens + self.answer_tokens

    @property
    def prefill_tokens_per_second(self) -> float | None:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else None

    @property
    def decode_tokens_per_second(self) -> float | None:
        n = self.completion_tokens + self.probe_tokens + self.injected_tokens + self.retracted_tokens
        return n / self.decode_seconds if self.decode_seconds > 0 and n else None

    @property
    def acceptance_rate(self) -> float | None:
        """Share of drafted tokens accepted (None without speculation)."""
        return self.draft_accepted / self.draft_tokens if self.draft_tokens else None

    @property
    def tokens_per_step(self) -> float | None:
        """Generated tokens per model evaluation (None without speculation, where it is 1)."""
        return self.model_step_tokens / self.model_steps if self.model_steps else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["acceptance_rate"] = self.acceptance_rate
        d["tokens_per_step"] = self.tokens_per_step
        d["completion_tokens"] = self.completion_tokens
        d["prefill_tokens_per_second"] = self.prefill_tokens_per_second
        d["decode_tokens_per_second"] = self.decode_tokens_per_second
        return d


@dataclass(frozen=True)
class Done:
    """The last event of every generation."""

    stats: Stats
    type: str = field(default="done", init=False)


Event = Union[ThinkingDelta, AnswerDelta, ControlEvent, TokenLogprobs, Done]
