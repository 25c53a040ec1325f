"""edge-reason: an on-device runtime for distilled reasoning models.

The public entry point is :class:`edge.runtime.Runtime` (imported lazily here so that
``import edge`` stays cheap)."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["Runtime", "SamplingParams", "ThinkingDelta", "AnswerDelta", "ControlEvent", "Done", "__version__"]


def __getattr__(name: str):
    if name == "Runtime":
        from edge.runtime import Runtime

        return Runtime
    if name == "SamplingParams":
        from edge.params import SamplingParams

        return SamplingParams
    if name in ("ThinkingDelta", "AnswerDelta", "ControlEvent", "Done"):
        from edge import events

        return getattr(events, name)
    raise AttributeError(name)
