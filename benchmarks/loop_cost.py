"""Python cost per token of edge-reason's generation loop, with the model taken out.

A real model decodes ``tokens`` tokens greedily once; its logits are recorded, and a replay
backend hands them back in order, so the generation loop (sampling, think parsing, events,
controllers) runs exactly as it did but each ``eval`` costs only a copy. The figure is the
loop's own time per token, in microseconds: the part of the overhead ratio
(:mod:`benchmarks.overhead`) that edge-reason's code can change, measured without the model's
run-to-run noise. At tiny-r1's ~200 us per token, 1 us per token is 0.5% of decode speed.

    python -m edge.benchmarks.loop_cost [--model M.gguf] [--tokens 256] [--repeats 200] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from edge.files import atomic_write
from edge.benchmarks.overhead import OVERHEAD_CONTROLLERS, PROMPT, quiet_controllers


class ReplayBackend:
    """Hands back recorded logits: row ``i`` after the prompt plus ``i`` tokens."""

    def __init__(self, backend, prompt: Sequence[int], rows: list[np.ndarray]) -> None:
        self.info, self.n_ctx = backend.info, backend.n_ctx
        self.eos_token_ids, self.token_bytes, self.tokenize = backend.eos_token_ids, backend.token_bytes, backend.tokenize
        self._prompt, self._rows = len(prompt), rows
        self._tokens: list[int] = []

    @property
    def n_past(self) -> int:
        return len(self._tokens)

    @property
    def tokens(self) -> tuple[int, ...]:
        return tuple(self._tokens)

    def rollback(self, n_past: int) -> None:
        del self._tokens[n_past:]

    def eval(self, tokens: Sequence[int]) -> np.ndarray:
        self._tokens.extend(tokens)
        return self._rows[len(self._tokens) - self._prompt].copy()


def run_loop_cost(model: str | None = None, *, tokens: int = 256, repeats: int = 200) -> dict:
    from edge.generate import generate
    from edge.params import SamplingParams
    from edge.runtime import Runtime
    from edge.templates import thinking_open

    with Runtime(model, threads=1, device="cpu") as rt:  # the model's default context (tiny-r1: its 1024)
        prompt = rt.render([{"role": "user", "content": PROMPT}])
        ids = rt.tokenize_prompt(prompt)
        b = rt.backend
        b.rollback(0)
        logits = b.eval(ids)
        rows = [logits]
        for _ in range(tokens + 1):
            logits = b.eval([int(logits.argmax())])
            rows.append(logits)
        replay = ReplayBackend(b, ids, rows)  # (token texts still come from the open model)
        start_in_thinking = thinking_open(prompt, rt.tags)
        name = b.info.extra.get("model_name") or Path(b.info.model_path).name
        params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)

        def once(factory) -> float:
            replay.rollback(0)
            t = time.perf_counter()
            for _ in generate(replay, ids, params, start_in_thinking=start_in_thinking, controllers=factory()):
                pass
            return (time.perf_counter() - t) / tokens * 1e6

        result = {"suite": "loop_cost", "model": name, "tokens": tokens, "repeats": repeats, "controllers": list(OVERHEAD_CONTROLLERS)}
        for key, factory in (("parser_only", lambda: ()), ("full_loop", quiet_controllers)):
            for _ in range(max(3, repeats // 20)):  # warm-up
                once(factory)
            runs = [once(factory) for _ in range(repeats)]
            result[key] = {"us_per_token_median": statistics.median(runs), "us_per_token_min": min(runs)}
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: the bundled tiny-r1)")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=200)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    res = run_loop_cost(a.model, tokens=a.tokens, repeats=a.repeats)
    text = json.dumps(res, indent=2)
    if a.out:
        atomic_write(a.out, text)
    print(text)
    print(f"loop cost: parser only {res['parser_only']['us_per_token_median']:.2f} us/token, "
          f"full loop {res['full_loop']['us_per_token_median']:.2f} us/token", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
