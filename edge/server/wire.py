"""Events -> OpenAI wire format. The only place the server turns events into JSON.

:class:`ReplyReader` reads one request's event stream, for the streaming and the
non-streaming responses alike: text pieces as they come, and the controller events,
:class:`~edge.events.TokenLogprobs` and final :class:`~edge.events.Stats` kept for the
response's ``usage`` and ``logprobs``.

:class:`Translator` maps :class:`~edge.events.ThinkingDelta` / :class:`~edge.events.AnswerDelta`
to ``(field, text)`` pieces according to the reasoning format:

- ``deepseek``: thinking goes to ``reasoning_content``, the answer to ``content``;
- ``inline``: both go to ``content``, the thinking wrapped in ``<think>\\n ... \\n</think>\\n\\n``;
- ``none``: the thinking is dropped.

:func:`usage` builds the ``usage`` object from the :class:`~edge.events.Stats` of ``Done``:
OpenAI's counts (with ``completion_tokens_details.reasoning_tokens``) plus ``usage.edge`` with
the timings and controller figures of this runtime.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Iterable

from edge.errors import BackendError
from edge.events import AnswerDelta, ControlEvent, Done, Event, Stats, ThinkingDelta, TokenLogprobs

REASONING = "reasoning_content"
CONTENT = "content"
OPEN, CLOSE = "<think>\n", "\n</think>\n\n"


def finish_reason(stats: Stats) -> str:
    """OpenAI's finish reasons: ``length`` when a token cap ended the reply, else ``stop``
    (budget and early exit end thinking, not the reply; see ``usage.edge.exit_reason``)."""
    return "length" if stats.finish_reason == "length" else "stop"


class Translator:
    def __init__(self, reasoning_format: str) -> None:
        self.format = reasoning_format
        self.in_thinking = False  # inline only: an opened <think> awaits its close

    def feed(self, ev: Event) -> list[tuple[str, str]]:
        if isinstance(ev, ThinkingDelta):
            if self.format == "deepseek":
                return [(REASONING, ev.text)]
            if self.format == "inline":
                text = ev.text if self.in_thinking else OPEN + ev.text
                self.in_thinking = True
                return [(CONTENT, text)]
            return []
        if isinstance(ev, AnswerDelta):
            if self.in_thinking:
                self.in_thinking = False
                return [(CONTENT, CLOSE + ev.text)]
            return [(CONTENT, ev.text)]
        return []

    def close(self) -> list[tuple[str, str]]:
        """Close an inline think block that never ended (a token cap hit while thinking)."""
        if self.in_thinking:
            self.in_thinking = False
            return [(CONTENT, CLOSE.rstrip("\n"))]
        return []


class ReplyReader:
    """One request's events: :meth:`feed` returns the ``(field, text)`` pieces of each (see
    :class:`Translator`) and keeps the rest - ``controls`` (every
    :class:`~edge.events.ControlEvent`), the token logprobs not yet rendered
    (:meth:`take_logprobs`) and the stats of ``Done`` (:meth:`stats`)."""

    def __init__(self, reasoning_format: str) -> None:
        self.translator = Translator(reasoning_format)
        self.controls: list[ControlEvent] = []
        self._logprobs: list[TokenLogprobs] = []
        self._stats: Stats | None = None

    def feed(self, ev: Event) -> list[tuple[str, str]]:
        if isinstance(ev, TokenLogprobs):
            self._logprobs.append(ev)
        elif isinstance(ev, ControlEvent):
            self.controls.append(ev)
        elif isinstance(ev, Done):
            self._stats = ev.stats
        else:
            return self.translator.feed(ev)
        return []

    def close(self) -> list[tuple[str, str]]:
        """The pieces that end the reply's text (after the last event)."""
        return self.translator.close()

    def take_logprobs(self) -> list[TokenLogprobs]:
        """The token logprobs read since the last call."""
        out, self._logprobs = self._logprobs, []
        return out

    def stats(self) -> Stats:
        """The figures of the finished reply."""
        if self._stats is None:
            raise BackendError("the generation ended without its Done event")
        return self._stats


def control_summary(controls: Iterable[ControlEvent]) -> list[dict[str, Any]]:
    return [c.summary() for c in controls]


def speculation_usage(stats: Stats) -> dict[str, Any]:
    """``usage.edge.speculation``: whether the reply speculated and why (``"on: ..."`` /
    ``"off: ..."``), drafted and accepted tokens, acceptance rate and tokens per model step."""
    rate, per_step = stats.acceptance_rate, stats.tokens_per_step
    return {
        "status": stats.speculation,
        "draft_tokens": stats.draft_tokens,
        "draft_accepted": stats.draft_accepted,
        "acceptance_rate": None if rate is None else round(rate, 4),
        "model_steps": stats.model_steps,
        "tokens_per_step": None if per_step is None else round(per_step, 4),
    }


def usage(stats: Stats, controls: Iterable[ControlEvent] = ()) -> dict[str, Any]:
    def r(x: float | None) -> float | None:
        return None if x is None else round(x, 4)

    return {
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        "total_tokens": stats.prompt_tokens + stats.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": int(stats.backend.get("cached_prompt_tokens", 0) or 0)},
        "completion_tokens_details": {"reasoning_tokens": stats.thinking_tokens},
        "edge": {
            "thinking_tokens": stats.thinking_tokens,
            "answer_tokens": stats.answer_tokens,
            "injected_tokens": stats.injected_tokens,
            "probe_tokens": stats.probe_tokens,
            "probes": stats.probes,
            "time_to_first_token": r(stats.time_to_first_token),
            "time_to_first_answer_token": r(stats.time_to_first_answer_token),
            "thinking_seconds": r(stats.thinking_seconds),
            "prefill_seconds": r(stats.prefill_seconds),
            "decode_seconds": r(stats.decode_seconds),
            "total_seconds": r(stats.total_seconds),
            "prefill_tokens_per_second": r(stats.prefill_tokens_per_second),
            "decode_tokens_per_second": r(stats.decode_tokens_per_second),
            "finish_reason": stats.finish_reason,
            "exit_reason": stats.exit_reason,
            "speculation": speculation_usage(stats),
            "controls": control_summary(controls),
        },
    }


# -- logprobs (legacy completions format) -----------------------------------------------------
def _token_text(entry_text: str, token: int, as_ids: bool) -> str:
    return f"token_id:{token}" if as_ids else entry_text


class Logprobs:
    """Renders :class:`~edge.events.TokenLogprobs` as OpenAI's completions ``logprobs``:
    ``tokens``, ``token_logprobs``, ``top_logprobs`` (one ``{token: logprob}`` per position)
    and ``text_offset``. With ``as_ids`` tokens read ``token_id:N`` (unambiguous)."""

    def __init__(self, as_ids: bool) -> None:
        self.as_ids = as_ids
        self.offset = 0

    def render(self, entries: list[TokenLogprobs]) -> dict[str, Any] | None:
        if not entries:
            return None
        out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for e in entries:
            out["tokens"].append(_token_text(e.text, e.token, self.as_ids))
            out["token_logprobs"].append(e.logprob)
            out["top_logprobs"].append({_token_text(t.text, t.token, self.as_ids): t.logprob for t in e.top})
            out["text_offset"].append(self.offset)
            self.offset += len(e.text)
        return out


# -- response bodies ---------------------------------------------------------------------------
class Envelope:
    """The id / created / model fields every response and chunk of one request shares."""

    def __init__(self, kind: str, model: str) -> None:
        self.kind = kind
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.model = model

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    # chat
    def chat_response(self, fields: dict[str, str], fmt: str, stats: Stats, controls: list[ControlEvent]) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": fields.get(CONTENT, "")}
        if fmt == "deepseek":
            message[REASONING] = fields.get(REASONING) or None
        return {
            **self._head("chat.completion"),
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason(stats)}],
            "usage": usage(stats, controls),
        }

    def chat_chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**self._head("chat.completion.chunk"), "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    # completions
    def completion_response(self, fields: dict[str, str], fmt: str, stats: Stats, controls: list[ControlEvent], logprobs: dict | None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "text": fields.get(CONTENT, ""), "logprobs": logprobs, "finish_reason": finish_reason(stats)}
        if fmt == "deepseek":
            choice[REASONING] = fields.get(REASONING) or None
        return {**self._head("text_completion"), "choices": [choice], "usage": usage(stats, controls)}

    def completion_chunk(self, fields: dict[str, str], logprobs: dict | None = None, finish: str | None = None) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "text": fields.get(CONTENT, ""), "logprobs": logprobs, "finish_reason": finish}
        if REASONING in fields:
            choice[REASONING] = fields[REASONING]
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, stats: Stats, controls: list[ControlEvent]) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage(stats, controls)}


def merge(pieces: Iterable[tuple[str, str]], into: dict[str, str] | None = None) -> dict[str, str]:
    out = into if into is not None else {}
    for name, text in pieces:
        out[name] = out.get(name, "") + text
    return out


def sse(obj: Any) -> bytes:
    """One server-sent event carrying ``obj`` as JSON."""
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"

__all__ = ["Translator", "ReplyReader", "Envelope", "Logprobs", "usage", "finish_reason", "merge", "sse", "SSE_DONE"]
