"""Typed events: the one streaming unit every front end consumes.

The generator loop yields these; the CLI, the server and the benchmarks translate them to
their own output formats at the edge and never re-implement parsing or control."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Union


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
    """A controller acted: ``kind`` is e.g. ``budget_exhausted``, ``wait_injected``,
    ``probe``, ``early_exit``; ``detail`` carries the controller's figures."""

    kind: str
    detail: dict[str, Any] = field(default_factory=dict)
    type: str = field(default="control", init=False)


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
    # speculative decoding (all 0 when it is off): drafted tokens verified, drafted tokens
    # committed, model evaluations made for the generated tokens, and those tokens
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


Event = Union[ThinkingDelta, AnswerDelta, ControlEvent, Done]
