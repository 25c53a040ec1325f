"""Running the server: blocking (``edge-reason serve``) or in a background thread (apps, tests).

    from edge.server import ServerThread, ServerConfig

    with Runtime("model.gguf") as rt, ServerThread(rt, ServerConfig(port=0)) as srv:
        print(srv.url)            # http://127.0.0.1:<free port>/v1
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

import uvicorn

from edge.errors import ConfigError
from edge.server.app import EdgeServer
from edge.server.config import ServerConfig, warn_if_exposed

log = logging.getLogger("edge.server")


class _Server(uvicorn.Server):
    """uvicorn's server, reporting the port it really bound (``port=0`` picks a free one)."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[int], None] | None = None) -> None:
        super().__init__(config)
        self.on_started = on_started
        self.bound_port: int | None = None

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started and self.servers:
            self.bound_port = int(self.servers[0].sockets[0].getsockname()[1])
            if self.on_started is not None:
                self.on_started(self.bound_port)


def build(runtime, config: ServerConfig, on_started: Callable[[int], None] | None = None) -> tuple[EdgeServer, _Server]:
    warn_if_exposed(config.host, config.api_key)
    edge = EdgeServer(runtime, config)
    ucfg = uvicorn.Config(
        edge.app,
        host=config.host,
        port=config.port,
        log_level=config.log_level,
        lifespan="off",
        timeout_graceful_shutdown=5,
    )
    return edge, _Server(ucfg, on_started)


def serve(runtime, config: ServerConfig, on_started: Callable[[int], None] | None = None) -> None:
    """Serve until interrupted (Ctrl-C / SIGTERM)."""
    _, server = build(runtime, config, on_started)
    server.run()
    if not server.started:
        raise ConfigError(f"could not listen on {config.host}:{config.port} (address in use or not allowed?)")


class ServerThread:
    """The server on a background thread; ``url`` is set once it listens."""

    def __init__(self, runtime, config: ServerConfig | None = None) -> None:
        self.config = config or ServerConfig(port=0)
        self.edge, self._server = build(runtime, self.config)
        self._thread: threading.Thread | None = None
        self.url = ""

    @property
    def port(self) -> int | None:
        return self._server.bound_port

    def start(self, timeout: float = 30.0) -> "ServerThread":
        self._thread = threading.Thread(target=self._server.run, name="edge-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started and self._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self._server.started:
            self.stop()
            raise ConfigError(f"the server did not start on {self.config.host}:{self.config.port}")
        host = self.config.host if ":" not in self.config.host else f"[{self.config.host}]"
        self.url = f"http://{host}:{self.port}/v1"
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> "ServerThread":
        return self.start() if self._thread is None else self

    def __exit__(self, *exc) -> None:
        self.stop()
