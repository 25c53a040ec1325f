"""Streaming ``<think>`` parser: splits generated text into thinking and answer pieces.

The parser is incremental: feed it text in chunks of any size (one token, half a tag, three
tags at once) and it returns ``(kind, text)`` pieces as soon as they are certain, holding back
only a suffix that could still turn into a tag. For every split of an input into chunks, the
concatenation of the pieces equals the parse of the whole input (tested with hypothesis).

Rules:
- ``start_in_thinking=True`` when the prompt already opened thinking (R1 templates end the
  generation prompt with ``<think>\\n``); otherwise text before an opening tag is answer text.
- Only a tag that changes state is markup: an opening tag while answering switches to
  thinking, a closing tag while thinking back to answer, and these tags are not emitted.
  Several think blocks are allowed.
- A tag that would not change state - ``</think>`` written in the answer, ``<think>`` written
  while thinking - is ordinary text of the stream it appears in (as DeepSeek's API and vLLM's
  R1 parser keep everything after the first ``</think>`` verbatim as content).
- Thinking that never closes (budget hit, EOS) stays thinking; :meth:`finish` flushes any
  held-back text in the current mode.
- Leading newlines right after a tag are kept; presentation trimming is the front end's job.
"""

from __future__ import annotations

from dataclasses import dataclass
from operator import attrgetter

THINKING = "thinking"
ANSWER = "answer"


@dataclass(frozen=True)
class TagPair:
    open: str = "<think>"
    close: str = "</think>"

    def __post_init__(self) -> None:
        if not self.open or not self.close or self.open == self.close:
            raise ValueError("think tags must be two different non-empty strings")


DEFAULT_TAGS = TagPair()


class ThinkParser:
    def __init__(self, tags: TagPair = DEFAULT_TAGS, *, start_in_thinking: bool = False) -> None:
        self.tags = tags
        self.thinking = start_in_thinking
        self.blocks_closed = 0
        self._held = ""  # a suffix that may be the start of the tag that changes state
        self._first = tags.open[0] if tags.open[0] == tags.close[0] else ""  # "<" for <think>/</think>

    @property
    def mode(self) -> str:
        return THINKING if self.thinking else ANSWER

    # text fed but not yet returned: a suffix that may be the start of the tag that changes
    # state ("" when nothing is held back); read-only (read at every token: at C speed)
    held = property(attrgetter("_held"), doc="Text fed but not yet returned (a possible tag start).")

    def would_close(self, text: str) -> bool:
        """True if feeding ``text`` now would close the current think block."""
        return self.thinking and self.tags.close in self._held + text

    def feed(self, text: str) -> list[tuple[str, str]]:
        """Consume ``text``; return the pieces that are now certain, in order."""
        if not self._held and text and (self._first or self._tag()[0]) not in text:
            return [(THINKING if self.thinking else ANSWER, text)]  # fast path: no tag starts here
        tag = self._tag()  # the one tag that can change state now: the other one is plain text
        buf = self._held + text
        self._held = ""
        out: list[tuple[str, str]] = []
        while buf:
            pos = buf.find(tag)
            if pos == -1:
                keep = self._partial_suffix(buf, tag)
                self._emit(out, buf[: len(buf) - keep])
                self._held = buf[len(buf) - keep :]
                break
            self._emit(out, buf[:pos])
            buf = buf[pos + len(tag) :]
            if self.thinking:
                self.blocks_closed += 1
            self.thinking = not self.thinking
            tag = self._tag()
        return out

    def finish(self) -> list[tuple[str, str]]:
        """End of stream: flush held-back text (an incomplete tag is plain text)."""
        out: list[tuple[str, str]] = []
        self._emit(out, self._held)
        self._held = ""
        return out

    # -- internals --------------------------------------------------------------------------
    def _tag(self) -> str:
        return self.tags.close if self.thinking else self.tags.open

    @staticmethod
    def _partial_suffix(buf: str, tag: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of ``tag``."""
        if tag[0] not in buf[-(len(tag) - 1) :]:
            return 0  # fast path: the tag cannot start in the tail
        for n in range(min(len(tag) - 1, len(buf)), 0, -1):
            if buf.endswith(tag[:n]):
                return n
        return 0

    def _emit(self, out: list[tuple[str, str]], text: str) -> None:
        if not text:
            return
        kind = self.mode
        if out and out[-1][0] == kind:
            out[-1] = (kind, out[-1][1] + text)
        else:
            out.append((kind, text))
