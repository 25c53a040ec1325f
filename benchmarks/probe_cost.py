"""What a probe costs: its own tokens, never a re-prefill of the prompt.

A counting wrapper records every token the backend evaluates. For prompts of growing length,
one early-exit probe (inducer + a short greedy trial answer, then rollback) is timed and its
evaluated tokens counted, next to the time a re-prefill of the same prompt would take. The
probe's token count stays constant and its time stays flat as the prompt grows; a probe that
re-prefilled would grow with the prompt.

    python -m edge.benchmarks.probe_cost --model M.gguf [--lengths 64,256,1024] [--out probe.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from edge.files import atomic_write

from edge.control.base import Generation
from edge.control.early_exit import DEFAULT_INDUCER
from edge.events import Stats
from edge.params import SamplingParams
from edge.think import ThinkParser


class CountingBackend:
    """Delegates to a backend and counts the tokens passed to ``eval``."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.evaluated = 0

    def eval(self, tokens):
        self.evaluated += len(tokens)
        return self.inner.eval(tokens)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def measure(backend, prompt_len: int, *, repeats: int = 5, probe_tokens: int = 8) -> dict:
    filler = backend.tokenize(" The sea is calm and the sky is wide." * (prompt_len // 8 + 2))[:prompt_len]
    cb = CountingBackend(backend)
    backend.rollback(0)
    t0 = time.perf_counter()
    backend.eval(filler)
    prefill_s = time.perf_counter() - t0
    gen = Generation(cb, SamplingParams(temperature=0), ThinkParser(start_in_thinking=True), Stats())
    times, counts = [], []
    for _ in range(repeats):
        cb.evaluated = 0
        t0 = time.perf_counter()
        res = gen.probe(DEFAULT_INDUCER, max_tokens=probe_tokens, stop=("}",))
        times.append(time.perf_counter() - t0)
        counts.append(cb.evaluated)
        assert backend.n_past == len(filler)
    return {
        "prompt_tokens": prompt_len,
        "prefill_seconds": prefill_s,
        "probe_seconds_median": statistics.median(times),
        "probe_evaluated_tokens": counts,
        "probe_cost_reported": res.cost,
        "probe_over_prefill": statistics.median(times) / prefill_s,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--lengths", default="64,256,1024")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    from edge.backends.llamacpp import LlamaCppBackend

    lengths = [int(x) for x in a.lengths.split(",")]
    with LlamaCppBackend(a.model, n_ctx=max(lengths) + 64, threads=a.threads, device="cpu") as b:
        rows = [measure(b, n) for n in lengths]
    text = json.dumps({"model": a.model, "rows": rows}, indent=2)
    if a.out:
        atomic_write(a.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
