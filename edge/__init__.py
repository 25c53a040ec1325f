"""edge-reason: an on-device runtime for distilled reasoning models.

The public entry point is :class:`edge.runtime.Runtime` (imported lazily here so that
``import edge`` stays cheap); the events it streams are those of :mod:`edge.events`."""

from __future__ import annotations

__version__ = "0.1.0"

_EVENTS = (
    "ThinkingDelta",
    "AnswerDelta",
    "ControlEvent",
    "ThinkingDone",
    "Retracted",
    "Probe",
    "BudgetChosen",
    "BudgetFromProbe",
    "AnswerBudgetExhausted",
    "Injected",
    "BudgetExhausted",
    "ThinkingClosedAtBudget",
    "WaitInjected",
    "ThinkingUnclosed",
    "EarlyExited",
    "TokenLogprobs",
    "Done",
)

__all__ = ["Runtime", "SamplingParams", *_EVENTS, "__version__"]


def __getattr__(name: str):
    if name == "Runtime":
        from edge.runtime import Runtime

        return Runtime
    if name == "SamplingParams":
        from edge.params import SamplingParams

        return SamplingParams
    if name in _EVENTS:
        from edge import events

        return getattr(events, name)
    raise AttributeError(name)
