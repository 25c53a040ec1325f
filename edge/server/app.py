"""The Starlette application: routes, admission queue, auth, streaming and cancellation.

Routes
- ``POST /v1/chat/completions``, ``POST /v1/completions`` (stream and non-stream);
- ``GET /v1/models`` (with llama-server style ``meta``: ``n_vocab``, ``n_ctx``);
- ``GET /health``, ``GET /props``, ``POST /tokenize``, ``POST /detokenize`` in llama-server's
  shapes: :mod:`edge.server.llama_server`.

Every route answers an error through one table, :mod:`edge.server.errors` (exception type ->
status, OpenAI error type, code, param); request bodies are read by :mod:`edge.server.body`.

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

from edge.backends.base import token_text
from edge.errors import ContextLengthError, EdgeError
from edge.events import Alternative, Event, TokenLogprobs
from edge.server.body import read_json
from edge.server.config import ServerConfig, key_matches
from edge.server.errors import domain_error, error_response
from edge.server.llama_server import LlamaServerRoutes, check_ids, meta
from edge.server.protocol import ApiError, GenerationRequest, parse_chat, parse_completion
from edge.server.wire import CONTENT, SSE_DONE, Envelope, Logprobs, ReplyReader, finish_reason, merge, sse

log = logging.getLogger("edge.server")

Handler = Callable[[Request], Awaitable[Response]]


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
        path = runtime.backend.info.model_path or "model"
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
                *LlamaServerRoutes(self).routes(self._endpoint),
                Route("/v1/models", self._endpoint(self.models), methods=["GET"]),
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

    async def read_json(self, request: Request) -> Any:
        """The request's JSON body, within this server's size and time limits."""
        return await read_json(request, self.config.max_body_bytes, self.config.body_timeout_s)

    async def _not_found(self, request: Request, exc: Exception) -> Response:
        return error_response(ApiError(404, f"no route {request.url.path}", code="not_found"))

    async def _not_allowed(self, request: Request, exc: Exception) -> Response:
        return error_response(ApiError(405, f"{request.method} is not allowed on {request.url.path}", code="method_not_allowed"))

    async def _internal_error(self, request: Request, exc: Exception) -> Response:
        log.error("internal error on %s", request.url.path, exc_info=exc)
        return error_response(domain_error(exc))

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
    async def models(self, request: Request) -> Response:
        card = {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "edge-reason", "meta": meta(self.runtime)}
        return JSONResponse({"object": "list", "data": [card]})

    # -- generation --------------------------------------------------------------------------------
    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, parse_chat(await self.read_json(request), self.config.limits))

    async def completions(self, request: Request) -> Response:
        return await self._generate(request, parse_completion(await self.read_json(request), self.config.limits))

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
            check_ids(ids, rt.backend.n_vocab, "prompt")
        n_ctx = rt.backend.n_ctx
        if len(ids) >= n_ctx:
            overflow = ContextLengthError(f"the prompt is {len(ids)} tokens but the context holds {n_ctx}; shorten it")
            raise domain_error(overflow, param="messages" if req.kind == "chat" else "prompt")
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

        def score() -> tuple[list[tuple[int, float]], list[bytes]]:
            top = rt.next_token_logprobs(ids, req.logprobs)
            return top, rt.token_pieces([t for t, _ in top])

        async with self._turn:
            self.running += 1
            try:
                t0 = time.perf_counter()
                top, pieces = await run_in_threadpool(score)
                seconds = time.perf_counter() - t0
            finally:
                self.running -= 1
        token, logprob = top[0]
        eos = token in rt.backend.eos_token_ids
        texts = [token_text(p) for p in pieces]
        entry = TokenLogprobs(token, texts[0], logprob, tuple(Alternative(t, x, lp) for (t, lp), x in zip(top, texts)))
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
