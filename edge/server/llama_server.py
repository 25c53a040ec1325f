"""The routes in llama-server's shapes, so that llama.cpp clients and
:class:`edge.backends.remote.RemoteBackend` can talk to ``edge-reason serve``:

- ``GET /health`` (no key needed): liveness and queue depth;
- ``GET /props``: chat template, special tokens, context size, and under ``edge`` what the
  remote backend needs to mirror the model (EOS ids, ``add_bos``, think tags);
- ``POST /tokenize`` ``{content, add_special, parse_special, with_pieces}``;
- ``POST /detokenize`` ``{tokens, with_pieces}`` (``with_pieces`` is an edge-reason extension
  giving byte-exact pieces: a piece that is not UTF-8 text is a list of byte values).

Tokens are read through the :class:`~edge.runtime.Runtime`, under its lock (in a worker thread:
a running generation holds the lock, and the event loop must not wait for it).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Awaitable, Callable

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from edge.backends.base import token_text
from edge.server.protocol import bad, bool_field, text_field, token_list

if TYPE_CHECKING:
    from edge.server.app import EdgeServer

Handler = Callable[[Request], Awaitable[Response]]


def meta(runtime) -> dict[str, Any]:
    """llama-server's ``meta`` of a model card: vocabulary and context sizes, plus where it runs."""
    b = runtime.backend
    return {"n_vocab": int(b.n_vocab), "n_ctx": int(b.n_ctx), "backend": b.info.name, "device": b.info.device}


def check_ids(ids: list[int], n_vocab: int, param: str) -> None:
    """Refuse (400, naming ``param``) a token id outside the vocabulary."""
    badid = next((t for t in ids if t >= n_vocab), None)
    if badid is not None:
        raise bad(param, f"token id {badid} is outside the vocabulary of {n_vocab} tokens")


def piece(raw: bytes) -> str | list[int]:
    """A token's bytes as llama-server writes a piece: text, or the byte values when not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return list(raw)


class LlamaServerRoutes:
    """The llama-server-compatible routes of one :class:`~edge.server.app.EdgeServer`."""

    def __init__(self, server: EdgeServer) -> None:
        self.server = server
        self.runtime = server.runtime

    def routes(self, endpoint: Callable[..., Handler]) -> list[Route]:
        """The routes, each wrapped by ``endpoint`` (the server's key check and error answers)."""
        return [
            Route("/health", endpoint(self.health, auth=False), methods=["GET"]),
            Route("/props", endpoint(self.props), methods=["GET"]),
            Route("/tokenize", endpoint(self.tokenize), methods=["POST"]),
            Route("/detokenize", endpoint(self.detokenize), methods=["POST"]),
        ]

    async def health(self, request: Request) -> Response:
        s = self.server
        return JSONResponse({"status": "ok", "model": s.model_id, "running": s.running, "queued": max(0, s.admitted - s.running)})

    async def props(self, request: Request) -> Response:
        rt, b = self.runtime, self.runtime.backend
        return JSONResponse(
            {
                "model_alias": self.server.model_id,
                "model_path": b.info.model_path,
                "chat_template": rt.template.source,
                "bos_token": b.bos_token,
                "eos_token": b.eos_token,
                "total_slots": 1,
                "default_generation_settings": {"n_ctx": int(b.n_ctx)},
                "edge": {
                    **meta(rt),
                    "eos_token_ids": sorted(int(t) for t in b.eos_token_ids),
                    "add_bos": bool(b.add_bos),
                    "think_tags": [rt.tags.open, rt.tags.close],
                    "max_tokens_limit": self.server.config.max_tokens_limit,
                },
            }
        )

    async def _body(self, request: Request) -> dict[str, Any]:
        body = await self.server.read_json(request)
        if not isinstance(body, dict):
            raise bad(None, "the request body must be a JSON object", "invalid_type")
        return body

    async def tokenize(self, request: Request) -> Response:
        body = await self._body(request)
        text = text_field(body, "content")
        add_special = bool_field(body, "add_special", False)
        parse_special = bool_field(body, "parse_special", True)
        with_pieces = bool_field(body, "with_pieces", False)
        rt = self.runtime

        def work() -> tuple[list[int], list[bytes]]:
            ids = rt.tokenize(text, add_special=add_special, special=parse_special)
            return ids, rt.token_pieces(ids) if with_pieces else []

        ids, raws = await run_in_threadpool(work)
        if with_pieces:
            return JSONResponse({"tokens": [{"id": t, "piece": piece(r)} for t, r in zip(ids, raws)]})
        return JSONResponse({"tokens": ids})

    async def detokenize(self, request: Request) -> Response:
        body = await self._body(request)
        ids = token_list(body)
        check_ids(ids, self.runtime.backend.n_vocab, "tokens")
        raws = await run_in_threadpool(self.runtime.token_pieces, ids)
        out: dict[str, Any] = {"content": token_text(b"".join(raws))}
        if bool_field(body, "with_pieces", False):
            out["pieces"] = [{"id": t, "piece": piece(r)} for t, r in zip(ids, raws)]
        return JSONResponse(out)
