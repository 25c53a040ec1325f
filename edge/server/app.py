"""The Starlette application: routes, admission queue, auth, streaming and cancellation.

Routes
- ``POST /v1/chat/completions``, ``POST /v1/completions`` (stream and non-stream);
- ``GET /v1/models`` (with llama-server style ``meta``: ``n_vocab``, ``n_ctx``);
- ``GET /health`` (no key needed: liveness and queue depth);
- for :class:`edge.backends.remote.RemoteBackend` (llama-server compatible shapes):
  ``GET /props`` (chat template, special tokens, context size), ``POST /tokenize``,
  ``POST /detokenize`` (``with_pieces`` gives byte-exact pieces).

One model, one generation at a time. A request is admitted while fewer than
``1 + max_queue`` are running or waiting, else refused at once with 503 and ``Retry-After``.
Admission comes before the chat template renders: prompts render one at a time, in a worker
thread, within the template's time and size budget (:class:`edge.templates.TemplateLimits`,
``ServerConfig.template_*``), so slow templates count against the queue, are visible in
``/health`` as queued, and a render past its deadline is stopped and answered with 500
``chat_template_error``. Admitted requests wait their turn on an asyncio lock (no thread is
held while waiting); the generation itself runs in a worker thread (:meth:`Runtime.acomplete`),
so the event loop keeps serving health checks and other clients. A client that disconnects - while waiting or while
its reply streams - sets the generation's cancel event; the generator stops at its next token.

The request's ``model`` is accepted and not checked: a server holds one model (its id is in
``/v1/models``), which serves every request, and every response's ``model`` names it. Greedy one-token completions asking for logprobs (what the remote backend
sends for every token) take a fast path, :meth:`Runtime.next_token_logprobs`, which scores the
prompt without committing a token.

Events become wire format only in :mod:`edge.server.wire`; this module neither parses text nor
applies reasoning control itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections import Counter
from contextlib import aclosing
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from edge.errors import BackendError, ChatTemplateError, ConfigError, ContextLengthError, EdgeError, PromptError
from edge.events import Alternative, Event, TokenLogprobs
from edge.server.config import ServerConfig, key_matches
from edge.server.protocol import ApiError, GenerationRequest, bad, bool_field, parse_chat, parse_completion, text_field, token_list
from edge.server.wire import CONTENT, SSE_DONE, Envelope, Logprobs, ReplyReader, finish_reason, merge, sse

log = logging.getLogger("edge.server")

Handler = Callable[[Request], Awaitable[Response]]


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def domain_error(exc: EdgeError) -> ApiError:
    """Errors a request can cause in the library, as HTTP errors."""
    from edge.runtime import RuntimeClosedError

    if isinstance(exc, RuntimeClosedError):
        return ApiError(503, str(exc), type="server_error", code="model_closed")
    if isinstance(exc, ChatTemplateError):  # the server's template failed on this request
        return ApiError(500, str(exc), type="server_error", code="chat_template_error")
    if isinstance(exc, ContextLengthError):
        return ApiError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, PromptError):
        return ApiError(400, str(exc), param="messages", code="invalid_prompt")
    if isinstance(exc, ConfigError):
        return ApiError(400, str(exc), code="invalid_value")
    if isinstance(exc, BackendError):
        return ApiError(500, f"the inference engine failed: {exc}", type="server_error", code="backend_error")
    return ApiError(400, str(exc))


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


class _EventStream(StreamingResponse):
    """A streaming response that runs ``on_close`` however it ends (even if never iterated)."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class EdgeServer:
    """An OpenAI-compatible server over one :class:`~edge.runtime.Runtime`."""

    def __init__(self, runtime, config: ServerConfig | None = None) -> None:
        self.runtime = runtime
        self.config = config or ServerConfig()
        path = getattr(runtime.backend.info, "model_path", "") or "model"
        self.model_id = self.config.model_id or Path(path).name.removesuffix(".gguf") or "model"
        self.created = int(time.time())
        self.admitted = 0  # running + waiting
        self.running = 0
        self.counters: Counter[str] = Counter()
        self._turn = asyncio.Lock()
        self._prep = asyncio.Lock()  # one prompt renders at a time (its thread is then free)
        self.template_limits = self.config.template_limits(runtime.template_limits)
        self.app = Starlette(
            routes=[
                Route("/health", self._endpoint(self.health, auth=False), methods=["GET"]),
                Route("/v1/models", self._endpoint(self.models), methods=["GET"]),
                Route("/props", self._endpoint(self.props), methods=["GET"]),
                Route("/tokenize", self._endpoint(self.tokenize), methods=["POST"]),
                Route("/detokenize", self._endpoint(self.detokenize), methods=["POST"]),
                Route("/v1/chat/completions", self._endpoint(self.chat_completions), methods=["POST"]),
                Route("/v1/completions", self._endpoint(self.completions), methods=["POST"]),
            ],
            exception_handlers={404: self._not_found, 405: self._not_allowed, Exception: self._internal_error},
        )

    # -- plumbing ----------------------------------------------------------------------------------
    def _endpoint(self, fn: Handler, *, auth: bool = True) -> Handler:
        async def handle(request: Request) -> Response:
            try:
                if auth and self.config.api_key is not None and not key_matches(request.headers.get("authorization"), self.config.api_key):
                    self.counters["unauthorized"] += 1
                    raise ApiError(401, "invalid or missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key")
                return await fn(request)
            except EdgeError as exc:
                return error_response(domain_error(exc))
            except ApiError as exc:
                if exc.status in (429, 503):
                    self.counters["refused"] += 1
                else:
                    self.counters["bad_request"] += 1
                return error_response(exc)

        return handle

    async def _read_json(self, request: Request) -> Any:
        return await read_json(request, self.config.max_body_bytes, self.config.body_timeout_s)

    async def _not_found(self, request: Request, exc: Exception) -> Response:
        return error_response(ApiError(404, f"no route {request.url.path}", code="not_found"))

    async def _not_allowed(self, request: Request, exc: Exception) -> Response:
        return error_response(ApiError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed"))

    async def _internal_error(self, request: Request, exc: Exception) -> Response:
        log.error("internal error on %s", request.url.path, exc_info=exc)
        return error_response(ApiError(500, "internal server error (see the server log)", type="server_error", code="internal_error"))

    def _admit(self) -> Callable[[], None]:
        """Take a place in the queue or refuse (503 + Retry-After); returns the release."""
        if self.admitted >= 1 + self.config.max_queue:
            raise ApiError(
                503,
                f"the server is busy ({self.admitted} requests running or queued); retry after {self.config.retry_after_s}s",
                type="server_error",
                code="queue_full",
                headers={"Retry-After": str(self.config.retry_after_s)},
            )
        self.admitted += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.admitted -= 1

        return release

    @staticmethod
    async def _watch_disconnect(request: Request, cancel: threading.Event) -> None:
        """Set ``cancel`` when the client goes away (the body was already read)."""
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                cancel.set()
                return

    # -- info routes -------------------------------------------------------------------------------
    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.model_id, "running": self.running, "queued": max(0, self.admitted - self.running)})

    def _meta(self) -> dict[str, Any]:
        b = self.runtime.backend
        return {"n_vocab": int(b.n_vocab), "n_ctx": int(b.n_ctx), "backend": b.info.name, "device": b.info.device}

    async def models(self, request: Request) -> Response:
        card = {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "edge-reason", "meta": self._meta()}
        return JSONResponse({"object": "list", "data": [card]})

    async def props(self, request: Request) -> Response:
        rt, b = self.runtime, self.runtime.backend
        return JSONResponse(
            {
                "model_alias": self.model_id,
                "model_path": b.info.model_path,
                "chat_template": rt.template.source,
                "bos_token": b.bos_token,
                "eos_token": b.eos_token,
                "total_slots": 1,
                "default_generation_settings": {"n_ctx": int(b.n_ctx)},
                "edge": {
                    **self._meta(),
                    "eos_token_ids": sorted(int(t) for t in b.eos_token_ids),
                    "add_bos": bool(getattr(b, "add_bos", False)),
                    "think_tags": [rt.tags.open, rt.tags.close],
                    "max_tokens_limit": self.config.max_tokens_limit,
                },
            }
        )

    @staticmethod
    def _piece(raw: bytes) -> str | list[int]:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return list(raw)

    async def tokenize(self, request: Request) -> Response:
        body = await self._read_json(request)
        if not isinstance(body, dict):
            raise bad(None, "the request body must be a JSON object", "invalid_type")
        text = text_field(body, "content")
        add_special = bool_field(body, "add_special", False)
        parse_special = bool_field(body, "parse_special", True)
        with_pieces = bool_field(body, "with_pieces", False)
        b = self.runtime.backend
        self.runtime._check_open()
        ids = await run_in_threadpool(b.tokenize, text, add_bos=add_special and bool(getattr(b, "add_bos", False)), special=parse_special)
        if with_pieces:
            return JSONResponse({"tokens": [{"id": t, "piece": self._piece(b.token_bytes(t))} for t in ids]})
        return JSONResponse({"tokens": ids})

    async def detokenize(self, request: Request) -> Response:
        body = await self._read_json(request)
        if not isinstance(body, dict):
            raise bad(None, "the request body must be a JSON object", "invalid_type")
        ids = token_list(body)
        self._check_ids(ids, "tokens")
        b = self.runtime.backend
        self.runtime._check_open()
        raws = [b.token_bytes(t) for t in ids]
        out: dict[str, Any] = {"content": b"".join(raws).decode("utf-8", errors="replace")}
        if bool_field(body, "with_pieces", False):
            out["pieces"] = [{"id": t, "piece": self._piece(r)} for t, r in zip(ids, raws)]
        return JSONResponse(out)

    def _check_ids(self, ids: list[int], param: str) -> None:
        n = self.runtime.backend.n_vocab
        badid = next((t for t in ids if t >= n), None)
        if badid is not None:
            raise bad(param, f"token id {badid} is outside the vocabulary of {n} tokens")

    # -- generation --------------------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, parse_chat(await self._read_json(request), self.config.limits))

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, parse_completion(await self._read_json(request), self.config.limits))

    def _prompt_ids(self, req: GenerationRequest) -> list[int]:
        """Render (within the template budget) and tokenize the prompt now, so a bad one is an
        HTTP error before any streaming."""
        rt = self.runtime
        if req.kind == "chat":
            per_request = {} if req.reasoning_prompt is None else {"reasoning_prompt": req.reasoning_prompt}
            ids = rt.tokenize_prompt(rt.render(req.messages, think=req.think, limits=self.template_limits, **per_request))
        elif isinstance(req.prompt, str):
            ids = rt.tokenize_prompt(req.prompt)
        else:
            ids = list(req.prompt)
            self._check_ids(ids, "prompt")
        n_ctx = rt.backend.n_ctx
        if len(ids) >= n_ctx:
            raise ApiError(
                400,
                f"the prompt is {len(ids)} tokens but the context holds {n_ctx}; shorten it",
                param="messages" if req.kind == "chat" else "prompt",
                code="context_length_exceeded",
            )
        return ids

    async def _generate(self, request: Request, req: GenerationRequest) -> Response:
        self.counters["requests"] += 1
        release = self._admit()  # rendering counts: a flood of slow templates meets the queue limit
        try:
            async with self._prep:
                ids = await run_in_threadpool(self._prompt_ids, req)
        except BaseException:
            release()
            raise
        cancel = threading.Event()
        scoring = self._is_scoring(req)
        if req.stream:
            return _EventStream(self._stream(request, req, ids, cancel, release), on_close=release)
        try:
            if scoring:
                return await self._score(req, ids)
            return await self._respond(request, req, ids, cancel)
        finally:
            release()

    @staticmethod
    def _is_scoring(req: GenerationRequest) -> bool:
        """A greedy one-token completion asking for logprobs: what RemoteBackend sends per token."""
        return req.kind == "completion" and req.params.max_tokens == 1 and req.params.greedy and req.logprobs > 0 and not req.controllers and not req.stream

    async def _score(self, req: GenerationRequest, ids: list[int]) -> Response:
        """The fast path of a scoring request: the next-token distribution without committing
        the token (one evaluation instead of two per remote step); same response as the loop's."""
        from edge.events import Stats

        rt = self.runtime
        async with self._turn:
            self.running += 1
            try:
                t0 = time.perf_counter()
                top = await run_in_threadpool(rt.next_token_logprobs, ids, req.logprobs)
                seconds = time.perf_counter() - t0
            finally:
                self.running -= 1
        token, logprob = top[0]
        eos = token in rt.backend.eos_token_ids

        def text(t: int) -> str:
            return rt.backend.token_bytes(t).decode("utf-8", errors="replace")

        entry = TokenLogprobs(token, text(token), logprob, tuple(Alternative(t, text(t), lp) for t, lp in top))
        stats = Stats(prompt_tokens=len(ids), answer_tokens=0 if eos else 1, prefill_seconds=seconds, total_seconds=seconds)
        stats.finish_reason, stats.exit_reason = ("stop", "eos") if eos else ("length", "length")
        self._finished(stats)
        fields = {} if eos else {CONTENT: entry.text}
        lp = Logprobs(req.tokens_as_ids).render([entry])
        return JSONResponse(Envelope(req.kind, self.model_id).completion_response(fields, req.reasoning_format, stats, [], lp))

    async def _events(self, req: GenerationRequest, ids: list[int], cancel: threading.Event) -> AsyncIterator[Event]:
        """The request's events, after waiting for its turn on the model."""
        async with self._turn:
            self.running += 1
            try:
                events = self.runtime.acomplete(ids, req.params, controllers=req.controllers, cancel=cancel)
                try:
                    async for ev in events:
                        yield ev
                finally:
                    await events.aclose()
            finally:
                self.running -= 1

    def _finished(self, stats) -> None:
        self.counters["cancelled" if stats.finish_reason == "cancelled" else "completed"] += 1

    async def _respond(self, request: Request, req: GenerationRequest, ids: list[int], cancel: threading.Event) -> Response:
        watcher = asyncio.create_task(self._watch_disconnect(request, cancel))
        reader = ReplyReader(req.reasoning_format)
        fields: dict[str, str] = {}
        try:
            async with aclosing(self._events(req, ids, cancel)) as events:
                async for ev in events:
                    merge(reader.feed(ev), fields)
        finally:
            watcher.cancel()
        merge(reader.close(), fields)
        stats = reader.stats()
        self._finished(stats)
        env = Envelope(req.kind, self.model_id)
        if req.kind == "chat":
            return JSONResponse(env.chat_response(fields, req.reasoning_format, stats, reader.controls))
        lp = Logprobs(req.tokens_as_ids).render(reader.take_logprobs()) if req.logprobs else None
        return JSONResponse(env.completion_response(fields, req.reasoning_format, stats, reader.controls, lp))

    async def _stream(self, request: Request, req: GenerationRequest, ids: list[int], cancel: threading.Event, release: Callable[[], None]) -> AsyncIterator[bytes]:
        watcher = asyncio.create_task(self._watch_disconnect(request, cancel))
        env = Envelope(req.kind, self.model_id)
        reader = ReplyReader(req.reasoning_format)
        logprobs = Logprobs(req.tokens_as_ids)
        chat = req.kind == "chat"
        stats = None

        def chunk(fields: dict[str, str], finish: str | None = None) -> bytes:
            if chat:
                return sse(env.chat_chunk(fields, finish))
            # the logprobs of the tokens read so far travel with the next chunk
            lp = logprobs.render(reader.take_logprobs()) if req.logprobs else None
            return sse(env.completion_chunk(fields, lp, finish))

        try:
            if chat:
                yield sse(env.chat_chunk({"role": "assistant", "content": ""}))
            async with aclosing(self._events(req, ids, cancel)) as events:
                async for ev in events:
                    for name, text in reader.feed(ev):
                        yield chunk({name: text})
            for name, text in reader.close():
                yield chunk({name: text})
            stats = reader.stats()
            self._finished(stats)
            yield chunk({} if chat else {CONTENT: ""}, finish_reason(stats))
            if req.include_usage:
                yield sse(env.usage_chunk(stats, reader.controls))
            yield SSE_DONE
        except EdgeError as exc:
            err = domain_error(exc)
            log.warning("generation failed mid-stream: %s", exc)
            yield sse(err.body())
            yield SSE_DONE
        except (asyncio.CancelledError, GeneratorExit):
            if stats is None:
                self.counters["cancelled"] += 1  # the client went away before the end
            raise
        finally:
            cancel.set()
            watcher.cancel()
            release()
