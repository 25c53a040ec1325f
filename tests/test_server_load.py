"""A bounded load test on loopback: ``edge-reason serve`` (a subprocess, SmolLM2) and 16
concurrent streaming clients making a few short requests each.

Every request must either complete or be refused with 429/503 (the bounded queue); no client
may hang (every call has a timeout and every thread is joined with one); the server must stay
alive and its resident memory must not grow by more than a bound. The figures are printed
(run with ``-s`` to see them)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import openai
import psutil

REPO = Path(__file__).resolve().parent.parent
CLIENTS = 16
REQUESTS_EACH = 3
MAX_TOKENS = 4
MAX_QUEUE = 4
CALL_TIMEOUT = 60.0
RSS_GROWTH_LIMIT = 64 << 20


def start_server(model: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "edge.cli.main", "serve", "--model", str(model), "--port", "0", "--threads", "1", "--ctx", "512",
           "--max-queue", str(MAX_QUEUE), "--max-tokens-limit", "64", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=REPO, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    found: dict[str, str] = {}
    lines: list[str] = []

    def read() -> None:
        for line in proc.stderr:  # keep draining so the server never blocks on a full pipe
            lines.append(line)
            if "serving" in line and "http://" in line:
                found["url"] = line.rsplit(" at ", 1)[1].strip()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 120
    while "url" not in found:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the server did not start:\n" + "".join(lines))
        time.sleep(0.05)
    return proc, found["url"]


def test_sixteen_streaming_clients_complete_or_are_refused(smollm2):
    proc, url = start_server(smollm2)
    try:
        server = psutil.Process(proc.pid)
        http = httpx.Client(timeout=CALL_TIMEOUT, limits=httpx.Limits(max_connections=2 * CLIENTS))
        api = openai.OpenAI(base_url=url, api_key="unused", timeout=CALL_TIMEOUT, max_retries=0, http_client=http)
        msgs = [{"role": "user", "content": "Say hi."}]
        api.chat.completions.create(model="m", messages=msgs, max_tokens=MAX_TOKENS, temperature=0)  # warm-up
        rss_before = server.memory_info().rss

        outcomes: Counter[str] = Counter()
        latencies: list[float] = []
        lock = threading.Lock()

        def client() -> None:
            for _ in range(REQUESTS_EACH):
                t0 = time.monotonic()
                try:
                    stream = api.chat.completions.create(
                        model="m", messages=msgs, max_tokens=MAX_TOKENS, temperature=0, stream=True, stream_options={"include_usage": True}
                    )
                    usage = None
                    for chunk in stream:
                        usage = chunk.usage or usage
                    ok = usage is not None and usage.completion_tokens <= MAX_TOKENS
                    outcome = "ok" if ok else "bad_stream"
                except openai.APIStatusError as exc:
                    outcome = str(exc.status_code)
                except openai.APITimeoutError:
                    outcome = "timeout"
                except openai.APIConnectionError:
                    outcome = "connection_error"
                with lock:
                    outcomes[outcome] += 1
                    if outcome == "ok":
                        latencies.append(time.monotonic() - t0)

        t0 = time.monotonic()
        threads = [threading.Thread(target=client, daemon=True) for _ in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(CLIENTS * REQUESTS_EACH * CALL_TIMEOUT / 4)
        wall = time.monotonic() - t0
        stuck = sum(t.is_alive() for t in threads)
        rss_after = server.memory_info().rss
        health = http.get(url.removesuffix("/v1") + "/health").json()
        figures = {
            "clients": CLIENTS,
            "requests": CLIENTS * REQUESTS_EACH,
            "outcomes": dict(outcomes),
            "wall_s": round(wall, 2),
            "ok_latency_s": {"min": round(min(latencies), 2), "max": round(max(latencies), 2)} if latencies else None,
            "rss_before_mb": round(rss_before / 2**20, 1),
            "rss_after_mb": round(rss_after / 2**20, 1),
            "health_after": health,
        }
        print("\nload test:", json.dumps(figures))
        assert stuck == 0
        assert proc.poll() is None, "the server died"
        assert sum(outcomes.values()) == CLIENTS * REQUESTS_EACH
        assert set(outcomes) <= {"ok", "429", "503"}, outcomes
        assert outcomes["ok"] >= MAX_QUEUE + 1  # the first wave fits the queue
        assert health["status"] == "ok" and health["running"] == 0 and health["queued"] == 0
        assert rss_after - rss_before < RSS_GROWTH_LIMIT
        http.close()
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
