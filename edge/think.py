"""Streaming ``<think>`` parser: splits generated text into thinking and answer pieces.

The parser is incremental: feed it text in chunks of any size (one token, half a tag, three
tags at once) and it returns ``(kind, text)`` pieces as soon as they are certain, holding back
only a suffix that could still turn into a tag. For every split of an input into chunks, the
concatenation of the pieces equals the parse of the whole input (tested with hypothesis).

Rules:
- ``start_in_thinking=True`` when the prompt already opened thinking (R1 templates end the
  generation prompt with ``<think>\\n``); otherwise text before an opening tag is answer text.
- An opening tag switches to thinking, a closing tag back to answer; tags themselves are not
  emitted. Several think blocks are allowed.
- An opening tag while already thinking, or a closing tag while not thinking (a stray tag), is
  dropped and counted in :attr:`ThinkParser.stray_tags`.
- Thinking that never closes (budget hit, EOS) stays thinking; :meth:`finish` flushes any
  held-back text in the current mode.
- Leading newlines right after a tag are kept; presentation trimming is the front end's job.
"""

from __future__ import annotations

from dataclasses import dataclass

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
        self.stray_tags = 0
        self._held = ""
        self._firsts = {tags.open[0], tags.close[0]}
        self._first = tags.open[0] if len(self._firsts) == 1 else None  # "<" for <think>/</think>
        self._maxlen = max(len(tags.open), len(tags.close))

    @property
    def mode(self) -> str:
        return THINKING if self.thinking else ANSWER

    def feed(self, text: str) -> list[tuple[str, str]]:
        """Consume ``text``; return the pieces that are now certain, in order."""
        if not self._held and text:
            # fast path: no tag starts in this text
            if self._first is not None:
                if self._first not in text:
                    return [(THINKING if self.thinking else ANSWER, text)]
            elif not any(c in text for c in self._firsts):
                return [(THINKING if self.thinking else ANSWER, text)]
        buf = self._held + text
        self._held = ""
        out: list[tuple[str, str]] = []
        while buf:
            pos, tag = self._find_tag(buf)
            if tag is None:
                keep = self._partial_suffix(buf)
                emit = buf[: len(buf) - keep]
                self._held = buf[len(buf) - keep :]
                self._emit(out, emit)
                break
            self._emit(out, buf[:pos])
            self._switch(tag)
            buf = buf[pos + len(tag) :]
        return out

    def finish(self) -> list[tuple[str, str]]:
        """End of stream: flush held-back text (an incomplete tag is plain text)."""
        out: list[tuple[str, str]] = []
        self._emit(out, self._held)
        self._held = ""
        return out

    # -- internals --------------------------------------------------------------------------
    def _find_tag(self, buf: str) -> tuple[int, str | None]:
        best, best_tag = -1, None
        for tag in (self.tags.open, self.tags.close):
            i = buf.find(tag)
            if i != -1 and (best == -1 or i < best or (i == best and len(tag) > len(best_tag))):
                best, best_tag = i, tag
        return best, best_tag

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a tag."""
        tail = buf[-(self._maxlen - 1) :]
        if not any(c in tail for c in self._firsts):
            return 0  # fast path: no tag can start in the tail
        longest = 0
        for tag in (self.tags.open, self.tags.close):
            for n in range(min(len(tag) - 1, len(buf)), longest, -1):
                if buf.endswith(tag[:n]):
                    longest = n
                    break
        return longest

    def _switch(self, tag: str) -> None:
        if tag == self.tags.open:
            if self.thinking:
                self.stray_tags += 1
            self.thinking = True
        else:
            if not self.thinking:
                self.stray_tags += 1
            else:
                self.blocks_closed += 1
            self.thinking = False

    def _emit(self, out: list[tuple[str, str]], text: str) -> None:
        if not text:
            return
        kind = self.mode
        if out and out[-1][0] == kind:
            out[-1] = (kind, out[-1][1] + text)
        else:
            out.append((kind, text))


def parse_all(text: str, tags: TagPair = DEFAULT_TAGS, *, start_in_thinking: bool = False) -> tuple[str, str]:
    """Parse a complete text; return ``(thinking, answer)``."""
    p = ThinkParser(tags, start_in_thinking=start_in_thinking)
    pieces = p.feed(text) + p.finish()
    thinking = "".join(t for k, t in pieces if k == THINKING)
    answer = "".join(t for k, t in pieces if k == ANSWER)
    return thinking, answer
