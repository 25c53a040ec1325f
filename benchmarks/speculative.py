"""Speculative decoding from n-gram lookup: what it buys on this machine.

Two measurements on one loaded model:

1. the batch-cost curve: the time of one model step over a batch of 1, 2, 3, 4, 6, 8 tokens
   relative to one token (interleaved, medians): what a verified draft costs;
2. decode speed plain vs speculative on a task's prompts, greedy, in back-to-back pairs whose
   order alternates; per pair the speed-up (speculative tok/s over plain tok/s, decode time
   only), tokens per model step and the draft acceptance rate; both runs must produce the same
   tokens (counted in ``same_tokens``). Speculation uses the curve just measured.

Tasks: ``tiny-r1`` (the bundled model's test problems), ``gsm8k`` (with ``--reasoning-prompt
step`` an instruct model reasons in <think>), ``free`` (free-text prompts: stories, letters).

    python -m edge.benchmarks.speculative [--model M.gguf] [--task tiny-r1|gsm8k|free] [--items 8]
        [--max-tokens 256] [--repeats 1] [--threads 2] [--reasoning-prompt step] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from edge.files import atomic_write

FREE_PROMPTS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Write a letter to a friend describing a trip to the mountains.",
    "Explain how a bicycle works to a ten-year-old.",
    "Describe a busy market in a small town on a Saturday morning.",
    "Write a product description for a handmade wooden chair.",
    "Tell the history of the printing press in a few paragraphs.",
    "Write a dialogue between a cat and a dog about breakfast.",
    "Describe the view from a train crossing the countryside in autumn.",
)


def prompts_for(task: str, items: int) -> list[str]:
    if task == "free":
        return list(FREE_PROMPTS[:items])
    from edge.benchmarks.tasks import load_task

    return [it.prompt for it in load_task(task)[:items]]


def _summary(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def run_speculative(model: str | None = None, *, task: str = "tiny-r1", items: int = 8, max_tokens: int = 256,
                    repeats: int = 1, threads: int = 2, reasoning_prompt: str | None = None, cost_repeats: int = 9) -> dict:
    from edge.params import SamplingParams
    from edge.runtime import Runtime
    from edge.speculative import SpeculativeConfig, measure_batch_cost, relative_cost

    with Runtime(model, threads=threads, device="cpu", reasoning_prompt=reasoning_prompt) as rt:
        b = rt.backend
        times = measure_batch_cost(b, repeats=cost_repeats)
        b.reset()
        curve = relative_cost(times)
        rt.speculation = SpeculativeConfig(cost=curve)
        plain = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=max_tokens)
        pairs = []
        order = 0
        prompts = prompts_for(task, items)
        rt.ask(prompts[0], plain.with_(max_tokens=8))  # warm-up
        for r in range(repeats):
            for i, prompt in enumerate(prompts):
                runs = {}
                for spec in (False, True) if order % 2 == 0 else (True, False):
                    b.reset()  # each run prefills its prompt afresh
                    rt._prompt_cache.tokens = ()
                    reply = rt.ask(prompt, plain.with_(speculate=spec))
                    s = reply.stats
                    runs[spec] = (s, reply.reasoning + "\x00" + reply.answer)
                order += 1
                (p, pt), (s, st) = runs[False], runs[True]
                tp = p.completion_tokens / p.decode_seconds
                ts = s.completion_tokens / s.decode_seconds
                pairs.append({
                    "item": i, "repeat": r, "tokens": s.completion_tokens, "plain_tok_s": tp, "spec_tok_s": ts,
                    "speedup": ts / tp, "tokens_per_step": s.tokens_per_step or 1.0,
                    "acceptance": s.acceptance_rate, "drafted": s.draft_tokens, "accepted": s.draft_accepted,
                    "same_tokens": pt == st,
                })
        name = b.info.extra.get("model_name") or Path(b.info.model_path).name
    drafted = sum(p["drafted"] for p in pairs)
    steps = sum(p["tokens"] / p["tokens_per_step"] for p in pairs)
    return {
        "suite": "speculative", "model": name, "task": task, "items": items, "max_tokens": max_tokens,
        "repeats": repeats, "threads": threads, "reasoning_prompt": reasoning_prompt,
        "batch_cost": {str(n): statistics.median(v) / statistics.median(times[1]) for n, v in times.items()},
        "batch_seconds_median": {str(n): statistics.median(v) for n, v in times.items()},
        "speedup": _summary([p["speedup"] for p in pairs]),
        "tokens_per_step": sum(p["tokens"] for p in pairs) / steps if steps else 1.0,
        "tokens_per_step_per_item": _summary([p["tokens_per_step"] for p in pairs]),
        "acceptance": sum(p["accepted"] for p in pairs) / drafted if drafted else None,
        "plain_tok_s": _summary([p["plain_tok_s"] for p in pairs]),
        "spec_tok_s": _summary([p["spec_tok_s"] for p in pairs]),
        "same_tokens": sum(p["same_tokens"] for p in pairs),
        "pairs": pairs,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: the bundled tiny-r1)")
    ap.add_argument("--task", default="tiny-r1", help="tiny-r1 | gsm8k | free | any task name")
    ap.add_argument("--items", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reasoning-prompt", default=None)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    res = run_speculative(a.model, task=a.task, items=a.items, max_tokens=a.max_tokens, repeats=a.repeats,
                          threads=a.threads, reasoning_prompt=a.reasoning_prompt)
    text = json.dumps(res, indent=2)
    if a.out:
        atomic_write(a.out, text)
    print(text)
    sp = res["speedup"]
    print(f"{res['model']} {res['task']}: speed-up {sp['median']:.2f}x ({sp['min']:.2f}-{sp['max']:.2f}), "
          f"{res['tokens_per_step']:.2f} tokens/step, acceptance {res['acceptance'] or 0:.2f}, "
          f"same tokens {res['same_tokens']}/{len(res['pairs'])}; batch cost "
          + " ".join(f"{k}:{v:.2f}" for k, v in res["batch_cost"].items()), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
