"""Terminal rendering of an event stream: answer on stdout, thinking dimmed on stderr.

Pipes then carry only the answer. ``hide_thinking`` replaces the reasoning with a one-line
summary ("Thought for 3.1 s (412 tokens)")."""

from __future__ import annotations

import sys
from typing import Iterator, TextIO

import click

from edge.events import AnswerDelta, ControlEvent, Done, Event, ThinkingDelta, ThinkingDone
from edge.runtime import Reply, collect


def thought_summary(seconds: float, tokens: int) -> str:
    return f"Thought for {seconds:.1f} s ({tokens} tokens)"


class StreamPrinter:
    def __init__(self, *, hide_thinking: bool = False, out: TextIO | None = None, err: TextIO | None = None) -> None:
        self.hide_thinking = hide_thinking
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.dim = self.err.isatty()
        self.in_thinking = False
        self.answer_started = False
        self.thinking_tokens = 0
        self._err_open = self._out_open = False  # a line begun and not ended

    def _err(self, text: str) -> None:
        self.err.write(click.style(text, dim=True) if self.dim else text)
        self.err.flush()
        if text:
            self._err_open = not text.endswith("\n")

    def handle(self, ev: Event) -> None:
        if isinstance(ev, ThinkingDelta):
            if not self.hide_thinking:
                if not self.in_thinking:
                    self._err("Thinking...\n")
                self._err(ev.text)
            self.in_thinking = True
        elif isinstance(ev, AnswerDelta):
            self.answer_started = True
            self.out.write(ev.text)
            self.out.flush()
            if ev.text:
                self._out_open = not ev.text.endswith("\n")
        elif isinstance(ev, ThinkingDone):
            self._close_thinking(ev.seconds, ev.tokens)
        elif isinstance(ev, ControlEvent):
            if not self.hide_thinking:
                detail = ", ".join(f"{k}={v}" for k, v in ev.detail.items() if v is not None and not isinstance(v, (list, dict)))
                self._err(f"\n[{ev.kind}{': ' + detail if detail else ''}]\n")
        elif isinstance(ev, Done):
            self._close_thinking(ev.stats.thinking_seconds, ev.stats.thinking_tokens)
            if self.answer_started:
                self.out.write("\n")
                self.out.flush()
                self._out_open = False

    def _close_thinking(self, seconds: float | None = None, tokens: int | None = None) -> None:
        if not self.in_thinking or seconds is None:
            return
        self.in_thinking = False
        if self.hide_thinking:
            self._err(thought_summary(seconds, tokens or 0) + "\n")
        else:
            self._err("\n...done thinking.\n\n")

    def consume(self, events: Iterator[Event]) -> Reply:
        def tee() -> Iterator[Event]:
            for ev in events:
                self.handle(ev)
                yield ev

        try:
            return collect(tee())
        except BaseException:
            self.end_lines()  # so that the error printed next has a line of its own
            raise

    def end_lines(self) -> None:
        """End the lines a stream cut short left open."""
        if self._out_open:
            self.out.write("\n")
            self.out.flush()
            self._out_open = False
        if self._err_open:
            self._err("\n")
