"""Overhead of edge-reason's generation loop against a bare llama-cpp-python loop.

Both decode the same prompt greedily through the same ``llama_cpp.Llama`` (the one edge's
llama.cpp backend wraps: the same weights, KV cache and compute buffers, so the ratio measures
the loops and not two allocations of the model), in the same process, in back-to-back pairs
whose order alternates (bare-edge, edge-bare, ...), EOS ignored so every run has exactly
``tokens`` tokens; the KV cache is emptied before each run. Decode speed is (tokens - 1) / (time
of the last token - time of the first token), the same definition on both sides, so prefill is
excluded. The ratio edge/bare is the median of the per-pair ratios.

    python -m edge.benchmarks.overhead --model M.gguf [--threads 2] [--tokens 128] [--repeats 5] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from edge.files import atomic_write

PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle."
OVERHEAD_CONTROLLERS = ("ThinkingBudget(max_thinking=1000000)", "EarlyExit(threshold=1.0, gate=1.0)")


def quiet_controllers() -> list:
    """A budget and an early-exit controller that are consulted at every token but never act:
    the cap is a million tokens, and the stream-confidence gate of 1.0 is read at every step
    boundary and never passed, so no probe runs."""
    from edge.control.budget import MAX_BUDGET, ThinkingBudget
    from edge.control.early_exit import EarlyExit

    return [ThinkingBudget(max_thinking=MAX_BUDGET), EarlyExit(threshold=1.0, gate=1.0)]


def bare_llama_cpp(llm, prompt_tokens: list[int], tokens: int) -> tuple[float, list[int]]:
    """Decode tok/s of llama-cpp-python's own ``Llama.generate`` loop (greedy), and the
    tokens it chose."""
    llm.reset()  # Llama.eval then drops every KV cell from position 0 on
    t_first = None
    out: list[int] = []
    for tok in llm.generate(prompt_tokens, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(tok)
        now = time.perf_counter()
        if t_first is None:
            t_first = now
        if len(out) >= tokens:
            break
    return (len(out) - 1) / (now - t_first), out


def edge_runtime(rt, prompt: str, tokens: int, controllers_factory=None) -> tuple[float, list[int]]:
    """Decode tok/s of edge-reason's full loop (parser on; controllers if given), and the
    tokens it chose."""
    from edge.params import SamplingParams
    from edge.runtime import collect

    rt.backend.reset()
    params = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=tokens, ignore_eos=True, speculate=False)  # the loop itself
    controllers = controllers_factory() if controllers_factory else ()
    r = collect(rt.complete(prompt, params, controllers=controllers))
    s = r.stats
    n = s.thinking_tokens + s.answer_tokens
    assert n == tokens, (n, tokens)
    return (n - 1) / (s.total_seconds - s.time_to_first_token), list(rt.backend.tokens[s.prompt_tokens :])


def run_overhead(model: str, *, threads: int = 2, tokens: int = 128, repeats: int = 5, n_ctx: int | None = None, controllers_factory=None) -> dict:
    import llama_cpp

    from edge.runtime import Runtime

    rt = Runtime(model, n_ctx=n_ctx, threads=threads, device="cpu")
    prompt = rt.render([{"role": "user", "content": PROMPT}])
    prompt_tokens = rt.tokenize_prompt(prompt)
    llm = rt.backend.llama
    try:
        bare_llama_cpp(llm, prompt_tokens, 8)  # warm-up
        edge_runtime(rt, prompt, 8, controllers_factory)
        bare, edge = [], []
        same = True  # both loops chose the same tokens: they did the same work
        for i in range(repeats):
            # pairs alternate their order (bare-edge, edge-bare, ...) so that a drift in the
            # machine's speed does not favour the loop that always runs second
            for loop in ("bare", "edge") if i % 2 == 0 else ("edge", "bare"):
                if loop == "bare":
                    speed, bare_tokens = bare_llama_cpp(llm, prompt_tokens, tokens)
                    bare.append(speed)
                else:
                    speed, edge_tokens = edge_runtime(rt, prompt, tokens, controllers_factory)
                    edge.append(speed)
            same = same and bare_tokens == edge_tokens
    finally:
        rt.close()
    mb, me = statistics.median(bare), statistics.median(edge)
    # the ratio is the median of the per-pair ratios: each pair ran back to back, so a burst of
    # load elsewhere on the machine moves both of its runs
    ratio = statistics.median(e / b for b, e in zip(bare, edge))
    return {
        "suite": "overhead",
        "model": str(model),
        "threads": threads,
        "tokens": tokens,
        "repeats": repeats,
        "prompt_tokens": len(prompt_tokens),
        "bare_tok_s": bare,
        "edge_tok_s": edge,
        "bare_median": mb,
        "edge_median": me,
        "ratio": ratio,
        "ratio_of_medians": me / mb,
        "same_tokens": same,
        "shared_context": True,
        "llama_cpp_python": llama_cpp.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--controllers", choices=("quiet", "none"), default="quiet",
                    help="quiet: the budget and early-exit controllers consulted at every token, never acting "
                    "(the full loop); none: the parser only")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    factory = quiet_controllers if a.controllers == "quiet" else None
    res = run_overhead(a.model, threads=a.threads, tokens=a.tokens, repeats=a.repeats, controllers_factory=factory)
    res["controllers"] = list(OVERHEAD_CONTROLLERS) if factory else []
    text = json.dumps(res, indent=2)
    if a.out:
        atomic_write(a.out, text)
    print(text)
    print(f"ratio edge/bare = {res['ratio']:.3f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
