"""llama.cpp's own programs (``llama-server``, ``llama-bench``) built by ``.ci/build-peers``, and a
``llama-server`` started on a loopback port for a test.

A binary is found through ``EDGE_LLAMA_SERVER`` / ``EDGE_LLAMA_BENCH`` (``.ci/run`` exports them),
else in the build cache (``~/.cache/edge-reason/bin/llama-*/``, the newest build). Without one the
tests that need it skip locally and fail under CI (``CI=true``), so CI never passes by skipping them.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from edge.benchmarks.bench.peers import ENV, find_peer, free_port, stop_process, wait_ready  # noqa: F401  (the suite finds and starts them the same way)


def require_peer(name: str) -> Path:
    """The program's path; skips the test without it, or fails it under CI."""
    path = find_peer(name)
    if path is None and os.environ.get(ENV[name]):
        pytest.fail(f"{ENV[name]}={os.environ[ENV[name]]} is not an executable file", pytrace=False)
    if path is None:
        why = f"{name} is not built (run: bash .ci/build-peers, or set {ENV[name]})"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{why}; CI must run these tests", pytrace=False)
        pytest.skip(why)
    return path


class LlamaServer:
    """``llama-server`` on 127.0.0.1 serving one GGUF, set up as the in-process backend is by
    default, so that greedy replies match token for token: one slot (its prompt cache follows one
    sequence, as the in-process KV cache does), one thread, flash attention off (llama-server's
    "auto" turns it on, and its different rounding changes SmolLM2's greedy reply after 3 tokens)."""

    def __init__(self, binary: Path, model: Path, *, n_ctx: int = 1024, extra: tuple[str, ...] = (), startup: float = 60.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        cmd = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(self.port), "-c", str(n_ctx),
               "-np", "1", "-t", "1", "-tb", "1", "-fa", "off", "--no-webui", *extra]
        self.log = open(os.devnull, "w") if not os.environ.get("EDGE_PEER_LOG") else open(os.environ["EDGE_PEER_LOG"], "a")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            wait_ready(self.proc, self.port, startup, cmd, on_timeout=self.stop, hint=" (EDGE_PEER_LOG=FILE keeps its log)")
        except Exception:
            self.log.close()
            raise

    def kill(self) -> None:
        """Dies at once, as a crashed server does (SIGKILL)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        stop_process(self.proc)
        self.log.close()

    def __enter__(self) -> "LlamaServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
