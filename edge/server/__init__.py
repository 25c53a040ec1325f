"""The OpenAI-compatible HTTP server (``edge-reason serve``).

It consumes :class:`~edge.runtime.Runtime` event streams and translates them to wire format
at the edge (:mod:`edge.server.wire`); it holds no parsing or reasoning-control logic. Reasoning
follows the DeepSeek API convention (``reasoning_content`` beside ``content``). Modules:

- :mod:`~edge.server.protocol` - request bodies -> one validated request object;
- :mod:`~edge.server.wire` - events -> OpenAI JSON / server-sent events;
- :mod:`~edge.server.app` - the generation routes, API key, admission queue, cancellation;
- :mod:`~edge.server.llama_server` - ``/health``, ``/props``, ``/tokenize``, ``/detokenize``
  in llama-server's shapes;
- :mod:`~edge.server.errors` - the one table from exceptions to HTTP errors;
- :mod:`~edge.server.body` - request bodies read within size and time limits;
- :mod:`~edge.server.config` - settings, loopback check, exposure warning;
- :mod:`~edge.server.run` - uvicorn, blocking or on a background thread.

Starlette and uvicorn are imported only here (``pip install edge-reason[server]``).
"""

from __future__ import annotations

from edge.server.config import ServerConfig, exposure_warning, is_loopback, warn_if_exposed

__all__ = ["ServerConfig", "ServerThread", "EdgeServer", "serve", "exposure_warning", "is_loopback", "warn_if_exposed"]


def __getattr__(name: str):
    if name in ("ServerThread", "serve"):
        from edge.server import run

        return getattr(run, name)
    if name == "EdgeServer":
        from edge.server.app import EdgeServer

        return EdgeServer
    raise AttributeError(name)
