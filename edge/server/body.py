"""Reading a request body: bounded in size and time, JSON, and valid Unicode throughout."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.requests import Request

from edge.server.protocol import ApiError, bad


async def read_json(request: Request, limit: int, timeout: float | None = None) -> Any:
    """The request body as JSON, refusing bodies above ``limit`` bytes (413), bodies that have
    not all arrived ``timeout`` seconds after the headers (408, and the connection is closed:
    the rest may still come) and bad JSON (400)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise bad(None, "the Content-Length header is not a number", "invalid_request") from None
        if size > limit:
            raise ApiError(413, f"the request body is {size} bytes; this server accepts at most {limit}", code="request_too_large")

    async def receive() -> bytearray:
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > limit:
                raise ApiError(413, f"the request body is over {limit} bytes, the most this server accepts", code="request_too_large")
        return data

    try:
        data = await asyncio.wait_for(receive(), timeout)
    except asyncio.TimeoutError:
        expected = f" of the {declared} announced" if declared is not None else ""
        raise ApiError(
            408,
            f"the request body did not arrive within {timeout:g} s{expected}; send the whole body at once",
            code="request_timeout",
            headers={"Connection": "close"},
        ) from None
    if not data.strip():
        raise bad(None, "the request body is empty; send a JSON object", "invalid_json")
    try:
        body = json.loads(bytes(data))
    except (ValueError, RecursionError) as exc:
        raise bad(None, f"the request body is not valid JSON: {exc}", "invalid_json") from None
    if b"\\u" in data or b"\xed" in data:  # how a lone surrogate gets in: an escape or CESU-8 bytes
        where = lone_surrogate(body)
        if where is not None:
            raise bad(where or None, f"{repr(where) if where else 'the body'} holds a lone UTF-16 surrogate, which is not text; "
                      "send valid Unicode (a character beyond U+FFFF is one escape pair, e.g. \\ud83d\\ude00)", "invalid_unicode")
    return body


def lone_surrogate(value: Any) -> str | None:
    """The path of the first string (or key) in a JSON value that holds a lone surrogate
    (``messages[0].content``; ``""`` for the value itself), else None."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        v, path = stack.pop()
        if isinstance(v, str):
            if not _is_text(v):
                return path
        elif isinstance(v, dict):
            for k, item in reversed(v.items()):
                name = k if _is_text(k) else k.encode("utf-8", "backslashreplace").decode("ascii")
                if name is not k:
                    return f"{path}.{name}" if path else name
                stack.append((item, f"{path}.{k}" if path else k))
        elif isinstance(v, list):
            stack.extend((item, f"{path}[{i}]") for i, item in reversed(list(enumerate(v))))
    return None


def _is_text(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
