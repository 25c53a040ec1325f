"""A loopback HTTP/1.1 proxy that forwards requests to a real server and misbehaves on command.

    with FaultProxy(upstream_port) as proxy:
        proxy.inject("stall", after=3)          # the 4th completion request never gets an answer
        proxy.inject("502", times=2)            # the next two get a 502 (the third goes through)
        proxy.inject("cut")                     # the connection closes after the request is read
        proxy.inject("cut-mid")                 # half of the real answer, then the connection closes
        proxy.inject("trickle")                 # the real head, then its body one byte every 0.2 s
        proxy.inject("404", path="/props")      # any canned status, for any path prefix
        proxy.inject(edit, path="/props")       # the real JSON answer passed through edit(dict) -> dict

Faults apply to requests whose path starts with ``path`` (default ``/v1/completions``), in the
order injected; all other requests are forwarded untouched, over one kept-alive upstream
connection per client connection. ``proxy.log`` lists ``(method, path, action)`` of every request.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

STATUS_TEXT = {400: "Bad Request", 404: "Not Found", 429: "Too Many Requests", 500: "Internal Server Error",
               502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout"}


@dataclass
class Fault:
    action: str | Callable[[Any], Any]
    path: str
    after: int  # matching requests to let through first
    times: int


class FaultProxy:
    def __init__(self, upstream_port: int, *, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.faults: list[Fault] = []
        self.log: list[tuple[str, str, str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    # -- commands --------------------------------------------------------------------------
    def inject(self, action: str | Callable[[Any], Any], *, path: str = "/v1/completions", after: int = 0, times: int = 1) -> None:
        with self._lock:
            self.faults.append(Fault(action, path, after, times))

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def actions(self, action: str) -> int:
        return sum(1 for *_, a in self.log if a == action)

    def _take(self, method: str, path: str) -> str | Callable[[Any], Any]:
        with self._lock:
            action: str | Callable[[Any], Any] = "pass"
            for f in self.faults:
                if path.startswith(f.path):
                    if f.after > 0:
                        f.after -= 1
                    else:
                        action = f.action
                        f.times -= 1
                        if f.times <= 0:
                            self.faults.remove(f)
                    break
            self.log.append((method, path, action if isinstance(action, str) else "edit"))
            return action

    # -- serving ---------------------------------------------------------------------------
    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            self._conns.append(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream: http.client.HTTPConnection | None = None
        reader = client.makefile("rb")
        try:
            while not self._stop.is_set():
                request = _read_request(reader)
                if request is None:
                    return
                method, path, headers, body = request
                action = self._take(method, path)
                if action == "stall":
                    self._stop.wait()  # never answers; the client must give up on its own
                    return
                if action == "cut":
                    return
                if isinstance(action, str) and action.isdigit():
                    status = int(action)
                    payload = json.dumps({"error": {"code": status, "message": f"injected {status}", "type": "server_error"}}).encode()
                    client.sendall(_response(status, STATUS_TEXT.get(status, "Error"), {"Content-Type": "application/json"}, payload))
                    continue
                if upstream is None:
                    upstream = http.client.HTTPConnection(*self.upstream, timeout=60)
                upstream.request(method, path, body=body, headers=headers)
                resp = upstream.getresponse()
                payload = resp.read()
                if callable(action):
                    payload = json.dumps(action(json.loads(payload))).encode()
                keep = {k: v for k, v in resp.getheaders() if k.lower() in ("content-type", "retry-after")}
                raw = _response(resp.status, resp.reason, keep, payload)
                if action == "cut-mid":
                    client.sendall(raw[: len(raw) - len(payload) // 2])
                    return
                if action == "trickle":  # the head at once, then the body byte by byte
                    head = len(raw) - len(payload)
                    client.sendall(raw[:head])
                    for i in range(head, len(raw)):
                        if self._stop.wait(0.2):
                            return
                        client.sendall(raw[i : i + 1])
                    continue
                client.sendall(raw)
        except OSError:
            return
        finally:
            reader.close()
            client.close()
            if upstream is not None:
                upstream.close()

    def close(self) -> None:
        self._stop.set()
        self._server.close()
        for c in self._conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read_request(reader) -> tuple[str, str, dict[str, str], bytes] | None:
    line = reader.readline()
    if not line:
        return None
    method, path, _ = line.decode("latin-1").split(" ", 2)
    headers: dict[str, str] = {}
    while True:
        h = reader.readline()
        if h in (b"\r\n", b"\n", b""):
            break
        k, _, v = h.decode("latin-1").partition(":")
        headers[k.strip()] = v.strip()
    n = int(next((v for k, v in headers.items() if k.lower() == "content-length"), "0"))
    body = reader.read(n) if n else b""
    return method, path, {k: v for k, v in headers.items() if k.lower() not in ("host", "connection")}, body


def _response(status: int, reason: str, headers: dict[str, str], body: bytes) -> bytes:
    head = [f"HTTP/1.1 {status} {reason}", *(f"{k}: {v}" for k, v in headers.items()), f"Content-Length: {len(body)}", "Connection: keep-alive"]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def wait_for(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()
