"""Text from the user that is not valid UTF-8: arguments and stdin.

Python hands undecodable bytes over as lone surrogates (``surrogateescape``: arguments always,
stdin once :class:`StdinText` asks for it), which no tokenizer can encode. Here they become
U+FFFD, the replacement character; the user is told once per source, on one stderr line, and
the run goes on (one stray byte in a pasted prompt should not end a chat)."""

from __future__ import annotations

import sys
from typing import Any, TextIO

import click


def replace_invalid(text: str) -> tuple[str, bool]:
    """``text`` with each undecodable byte (a lone surrogate) as U+FFFD; True if it had any."""
    try:
        text.encode("utf-8")
        return text, False
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")  # the bytes as they came
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogatepass")  # a surrogate no byte made (e.g. Windows argv)
    return raw.decode("utf-8", "replace"), True


def warn_replaced(source: str) -> None:
    click.echo(f"warning: {source} is not valid UTF-8; its invalid bytes were replaced with U+FFFD", err=True)


class Utf8Text(click.ParamType):
    """A text argument or option whose invalid UTF-8 becomes U+FFFD, with a warning."""

    name = "text"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        if isinstance(value, bytes):
            value = value.decode("utf-8", "surrogateescape")
        text, replaced = replace_invalid(value)
        if replaced:
            warn_replaced(_source(param))
        return text


def _source(param: click.Parameter | None) -> str:
    if isinstance(param, click.Option):
        return param.opts[-1]  # the long name: --system
    if param is not None and param.name:
        return f"the {param.human_readable_name} argument"
    return "an argument"


TEXT = Utf8Text()


class StdinText:
    """Reads stdin as text: invalid UTF-8 becomes U+FFFD, with one warning for the whole stream."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdin
        reconfigure = getattr(self.stream, "reconfigure", None)
        if reconfigure is not None:
            reconfigure(errors="surrogateescape")  # keep undecodable bytes instead of raising
        self.warned = False

    def read(self) -> str:
        return self._clean(self.stream.read())

    def readline(self) -> str:
        return self._clean(self.stream.readline())

    def _clean(self, text: str) -> str:
        text, replaced = replace_invalid(text)
        if replaced and not self.warned:
            self.warned = True
            warn_replaced("stdin")
        return text
