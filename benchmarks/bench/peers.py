"""The ``peers`` suite: edge-reason against llama.cpp's own programs and bare llama-cpp-python.

One GGUF, the same threads, the same prompt (the overhead suite's, rendered with the model's
chat template), greedy, EOS ignored so every run generates exactly ``tokens`` tokens. In each
round every contender runs once, in an order that rotates from round to round; per round the
ratio of each contender's speed to edge-reason's (plain) in that round; reported as median
[min-max] over rounds:

- ``llama-bench``: ``-p P -n N -r 1 -o json`` (P = the prompt's token count), its own pp and tg
  tokens/s (tg generates from an empty context, the others after the prompt);
- ``llama-server``: started once on a free loopback port (one slot, flash attention off as in
  process); its own ``/completion`` endpoint, its own ``timings`` (prompt and predicted
  tokens/s); ``llama-server ngram``: the same with its n-gram lookup speculation
  (``--spec-type ngram-simple``, llama.cpp's defaults), the counterpart of ``--speculate``;
- ``llama-cpp-python``: bare ``Llama.generate`` on the context edge's backend owns;
- ``edge-reason`` and ``edge-reason --speculate``: the generation loop (decode tokens/s:
  tokens after the first over the time after the first; prefill from the loop's stats).

The programs are found as the tests find them: ``EDGE_LLAMA_SERVER`` / ``EDGE_LLAMA_BENCH``, else
the newest build of ``.ci/build-peers`` in ``~/.cache/edge-reason/bin``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

from edge.errors import ConfigError

CACHE = Path.home() / ".cache" / "edge-reason" / "bin"
ENV = {"llama-server": "EDGE_LLAMA_SERVER", "llama-bench": "EDGE_LLAMA_BENCH"}
EDGE = "edge-reason"
CONTENDERS = ("llama-bench", "llama-server", "llama-server ngram", "llama-cpp-python", EDGE, "edge-reason --speculate")


def find_peer(name: str) -> Path | None:
    """The path of llama.cpp's ``name`` program (``llama-server`` / ``llama-bench``), or None."""
    explicit = os.environ.get(ENV[name])
    if explicit:
        return Path(explicit) if os.access(explicit, os.X_OK) else None
    built = [p for p in CACHE.glob(f"llama-*/{name}") if os.access(p, os.X_OK)]
    return max(built, key=lambda p: p.stat().st_mtime) if built else None


def require_peers() -> dict[str, Path]:
    found = {name: find_peer(name) for name in ENV}
    missing = [n for n, p in found.items() if p is None]
    if missing:
        raise ConfigError(f"the peers suite needs llama.cpp's {' and '.join(missing)}: build them with `bash .ci/build-peers` "
                          f"(from a checkout of edge-reason) or set {' / '.join(ENV[n] for n in missing)}")
    return found  # type: ignore[return-value]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not ended within ``grace`` seconds."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(grace)


def wait_ready(proc: subprocess.Popen, port: int, startup: float, cmd: list[str], *, on_timeout: Callable[[], None],
               hint: str = "") -> None:
    """Wait until the llama-server ``proc`` on ``port`` answers ``/health`` with "ok"; one
    ConfigError line if it exits first (``hint`` appended) or is not ready within ``startup`` s
    (``on_timeout`` is called first, to stop it)."""
    deadline = time.monotonic() + startup
    while True:
        if proc.poll() is not None:
            raise ConfigError(f"llama-server exited with {proc.returncode} at start: {' '.join(cmd)}{hint}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if json.loads(r.read()).get("status") == "ok":
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            on_timeout()
            raise ConfigError(f"llama-server did not become ready within {startup:g} s")
        time.sleep(0.05)


class Server:
    """``llama-server`` on a free loopback port, one slot, until :meth:`stop`."""

    def __init__(self, binary: Path, model: str, *, threads: int, n_ctx: int, extra: tuple[str, ...] = (), startup: float = 120.0) -> None:
        self.port = free_port()
        cmd = [str(binary), "-m", model, "--host", "127.0.0.1", "--port", str(self.port), "-c", str(n_ctx), "-np", "1",
               "-t", str(threads), "-tb", str(threads), "-fa", "off", "--no-webui", *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        wait_ready(self.proc, self.port, startup, cmd, on_timeout=self.stop)

    def complete(self, prompt: list[int], tokens: int) -> tuple[float, float, list[int]]:
        """(prompt tok/s, decode tok/s, tokens) of one greedy ``/completion``, by the server's own timings."""
        body = {"prompt": prompt, "n_predict": tokens, "temperature": 0.0, "top_k": 1, "ignore_eos": True,
                "cache_prompt": False, "return_tokens": True, "samplers": ["top_k"]}
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/completion", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as r:
            reply = json.loads(r.read())
        t = reply["timings"]
        return float(t["prompt_per_second"]), float(t["predicted_per_second"]), list(reply.get("tokens") or [])

    def stop(self) -> None:
        stop_process(self.proc)


def llama_bench(binary: Path, model: str, *, threads: int, prompt_tokens: int, tokens: int) -> tuple[float, float]:
    """(pp tok/s, tg tok/s) of one ``llama-bench`` repetition, from its JSON output."""
    cmd = [str(binary), "-m", model, "-t", str(threads), "-p", str(prompt_tokens), "-n", str(tokens), "-r", "1",
           "-fa", "0", "-ngl", "0", "-o", "json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    if r.returncode != 0:
        raise ConfigError(f"llama-bench failed ({r.returncode}): {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ''}")
    tests = json.loads(r.stdout)
    pp = next(t["avg_ts"] for t in tests if t["n_prompt"] > 0 and t["n_gen"] == 0)
    tg = next(t["avg_ts"] for t in tests if t["n_gen"] > 0 and t["n_prompt"] == 0)
    return float(pp), float(tg)


def _spread(xs: list[float]) -> dict[str, Any]:
    from edge.benchmarks.bench.stats import spread

    return spread(xs)


def run_peers(model: str, *, threads: int, tokens: int, rounds: int, n_ctx: int, progress: Callable[[str], None]) -> dict[str, Any]:
    """Every contender once per round, rotating; speeds and per-round ratios to edge-reason."""
    from edge.benchmarks.overhead import PROMPT, bare_llama_cpp
    from edge.params import SamplingParams
    from edge.runtime import Runtime, collect

    peers = require_peers()
    rt = Runtime(model, n_ctx=n_ctx, threads=threads, device="cpu")
    servers: dict[str, Server] = {}
    try:
        prompt = rt.render([{"role": "user", "content": PROMPT}])
        ids = rt.tokenize_prompt(prompt)
        if len(ids) + tokens > rt.backend.n_ctx:
            raise ConfigError(f"the prompt ({len(ids)} tokens) and {tokens} tokens do not fit the context of {rt.backend.n_ctx}")
        servers["llama-server"] = Server(peers["llama-server"], model, threads=threads, n_ctx=rt.backend.n_ctx)
        servers["llama-server ngram"] = Server(peers["llama-server"], model, threads=threads, n_ctx=rt.backend.n_ctx,
                                               extra=("--spec-type", "ngram-simple"))
        llm = rt.backend.llama

        def edge(speculate: bool) -> tuple[float | None, float, list[int]]:
            rt.backend.reset()
            rt._prompt_cache.tokens = ()  # every run prefills its prompt afresh, as the others do
            params = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=tokens, ignore_eos=True, speculate=speculate)
            s = collect(rt.complete(ids, params)).stats
            return s.prefill_tokens_per_second, (s.completion_tokens - 1) / (s.total_seconds - s.time_to_first_token), \
                list(rt.backend.tokens[len(ids):])

        def bare() -> tuple[float | None, float, list[int]]:
            speed, out = bare_llama_cpp(llm, ids, tokens)
            return None, speed, out

        run: dict[str, Callable[[], tuple[float | None, float, list[int] | None]]] = {
            "llama-bench": lambda: (*llama_bench(peers["llama-bench"], model, threads=threads, prompt_tokens=len(ids), tokens=tokens), None),
            "llama-server": lambda: servers["llama-server"].complete(ids, tokens),
            "llama-server ngram": lambda: servers["llama-server ngram"].complete(ids, tokens),
            "llama-cpp-python": bare,
            EDGE: lambda: edge(False),
            "edge-reason --speculate": lambda: edge(True),
        }
        for name in CONTENDERS:  # warm-up: loads pages, caches, the servers' first request
            if name != "llama-bench":
                run[name]()
        decode = {n: [] for n in CONTENDERS}
        prefill = {n: [] for n in CONTENDERS}
        same = {n: True for n in CONTENDERS}
        for r in range(rounds):
            order = CONTENDERS[r % len(CONTENDERS):] + CONTENDERS[: r % len(CONTENDERS)]
            got: dict[str, tuple] = {}
            for name in order:
                got[name] = run[name]()
            reference = got[EDGE][2]
            for name, (pp, tg, out) in got.items():
                decode[name].append(tg)
                if pp is not None:
                    prefill[name].append(pp)
                if out is not None and out[: len(reference)] != reference:
                    same[name] = False
            progress(f"peers round {r + 1}/{rounds}: " + ", ".join(f"{n} {got[n][1]:.1f}" for n in CONTENDERS) + " tok/s")
    finally:
        for s in servers.values():
            s.stop()
        rt.close()
    rows = []
    for name in CONTENDERS:
        row = {"name": name, "decode_tok_s": _spread(decode[name]),
               "decode_ratio_to_edge": _spread([a / b for a, b in zip(decode[name], decode[EDGE])])}
        if prefill[name] and len(prefill[name]) == len(prefill[EDGE]):
            row["prefill_tok_s"] = _spread(prefill[name])
            row["prefill_ratio_to_edge"] = _spread([a / b for a, b in zip(prefill[name], prefill[EDGE])])
        if name != "llama-bench":
            row["same_tokens"] = same[name]
        rows.append(row)
    return {"threads": threads, "tokens": tokens, "prompt_tokens": len(ids), "rounds": rounds, "contenders": rows,
            "peer_binaries": {n: p.parent.name for n, p in peers.items()}}
