"""Speculative decoding from n-gram lookup: what it buys on this machine.

On one loaded model:

1. the batch-cost curve auto speculation decides from (time of one model step over a batch of
   k tokens relative to one token): this machine's cached quick curve, measured first if there
   is none (``--remeasure``: measured again); ``--careful-curve N`` also measures the longer
   curve (sizes 1, 2, 3, 4, 6, 8, N interleaved rounds, medians) for comparison;
2. decode speed of speculation (``--mode auto``: the default, decided per machine and step;
   ``on``: ``--speculate``) against ``--no-speculate`` on a task's prompts, greedy, in
   back-to-back pairs whose order alternates; per pair the speed-up (tok/s over tok/s, decode
   time only), what the run decided (``stats.speculation``), tokens per model step, drafted and
   accepted tokens; and whether both runs produced the same text (``same_tokens``).

Tasks: ``tiny-r1`` (the bundled model's test problems), ``gsm8k`` (with ``--reasoning-prompt
r1`` an instruct model reasons in <think>), ``free`` (free-text prompts: stories, letters).

    python -m edge.benchmarks.speculative [--model M.gguf] [--task tiny-r1|gsm8k|free] [--items 8]
        [--max-tokens 256] [--repeats 1] [--threads 2] [--reasoning-prompt r1] [--mode auto|on]
        [--remeasure] [--careful-curve 9] [--assume-cost flat] [--flash-attn] [--out result.json]

``--assume-cost flat`` drafts as if a batch cost what one token does (GPUs, Apple Silicon: decode
bound by memory bandwidth): its tokens per model step are what speculation buys there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from edge.errors import ConfigError
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
                    repeats: int = 1, threads: int = 2, reasoning_prompt: str | None = None, mode: str = "auto",
                    remeasure: bool = False, careful_curve: int = 0, assume_cost: tuple[float, ...] | None = None,
                    flash_attn: bool | None = None) -> dict:
    from edge.params import SamplingParams
    from edge.runtime import Runtime
    from edge.speculative import measure_batch_cost, relative_cost

    if mode not in ("auto", "on"):
        raise ValueError(f"mode must be auto or on, got {mode!r}")
    spec_mode = None if mode == "auto" else True
    with Runtime(model, threads=threads, device="cpu", reasoning_prompt=reasoning_prompt, flash_attn=flash_attn) as rt:
        b = rt.backend
        curve = rt.batch_cost(refresh=remeasure)
        careful = measure_batch_cost(b, repeats=careful_curve) if careful_curve else None
        b.reset()
        if assume_cost is not None:
            # draft as a machine with this batch-cost curve would (flat: where a small batch costs
            # what one token does); tokens per model step then say what drafting buys there,
            # while the speed-up is still this machine's
            from edge.speculative import SpeculativeConfig

            rt.speculation = SpeculativeConfig(cost=assume_cost)
        decision = str(rt.plan_speculation(spec_mode))
        plain = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=max_tokens)
        pairs = []
        order = 0
        prompts = prompts_for(task, items)
        rt.ask(prompts[0], plain.with_(max_tokens=8, speculate=False))  # warm-up
        for r in range(repeats):
            for i, prompt in enumerate(prompts):
                runs = {}
                for spec in (False, spec_mode) if order % 2 == 0 else (spec_mode, False):
                    b.reset()  # each run prefills its prompt afresh
                    rt._prompt_cache.tokens = ()
                    reply = rt.ask(prompt, plain.with_(speculate=spec))
                    runs[spec is not False] = (reply.stats, reply.reasoning + "\x00" + reply.answer)
                order += 1
                (p, pt), (s, st) = runs[False], runs[True]
                tp = p.completion_tokens / p.decode_seconds
                ts = s.completion_tokens / s.decode_seconds
                pairs.append({
                    "item": i, "repeat": r, "tokens": s.completion_tokens, "plain_tokens": p.completion_tokens,
                    "plain_tok_s": tp, "spec_tok_s": ts, "speedup": ts / tp, "speculation": s.speculation,
                    "tokens_per_step": s.tokens_per_step or 1.0, "acceptance": s.acceptance_rate,
                    "drafted": s.draft_tokens, "accepted": s.draft_accepted, "same_tokens": pt == st,
                })
        name = b.info.extra.get("model_name") or Path(b.info.model_path).name
    drafted = sum(p["drafted"] for p in pairs)
    steps = sum(p["tokens"] / p["tokens_per_step"] for p in pairs)
    out = {
        "suite": "speculative", "model": name, "task": task, "items": items, "max_tokens": max_tokens,
        "repeats": repeats, "threads": threads, "reasoning_prompt": reasoning_prompt, "mode": mode,
        "decision": decision,
        "assumed_cost": list(assume_cost) if assume_cost is not None else None,
        "flash_attn": flash_attn,
        "batch_cost": {"cost": list(curve.cost), "settled": curve.settled, "measured_now": curve.measured, "took_s": curve.took,
                       "when": curve.when,
                       "cache": str(curve.path) if curve.path else None,
                       "fastest_seconds": {str(n): v for n, v in curve.seconds.items()}},
        "speedup": _summary([p["speedup"] for p in pairs]),
        "speedup_geomean": statistics.geometric_mean([p["speedup"] for p in pairs]) if pairs else None,
        "tokens_per_step": sum(p["tokens"] for p in pairs) / steps if steps else 1.0,
        "tokens_per_step_per_item": _summary([p["tokens_per_step"] for p in pairs]),
        "acceptance": sum(p["accepted"] for p in pairs) / drafted if drafted else None,
        "drafted": drafted,
        "plain_tok_s": _summary([p["plain_tok_s"] for p in pairs]),
        "spec_tok_s": _summary([p["spec_tok_s"] for p in pairs]),
        "same_tokens": sum(p["same_tokens"] for p in pairs),
        "pairs": pairs,
    }
    if careful is not None:
        out["careful_batch_cost"] = {"repeats": careful_curve, "cost": list(relative_cost(careful)),
                                     "median_seconds": {str(n): statistics.median(v) for n, v in careful.items()}}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: the bundled tiny-r1)")
    ap.add_argument("--task", default="tiny-r1", help="tiny-r1 | gsm8k | free | any task name")
    ap.add_argument("--items", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reasoning-prompt", default=None)
    ap.add_argument("--mode", default="auto", choices=("auto", "on"), help="speculation compared with --no-speculate")
    ap.add_argument("--remeasure", action="store_true", help="measure the cached batch-cost curve again first")
    ap.add_argument("--careful-curve", type=int, default=0, metavar="N", help="also measure the long curve, N rounds")
    ap.add_argument("--assume-cost", default=None, metavar="flat|C2,C3,...",
                    help="draft for this batch-cost curve instead of the measured one (flat: a batch of k costs one "
                         "token; else the cost of 2, 3, ... tokens relative to one); implies --mode on")
    ap.add_argument("--flash-attn", action="store_true", default=None,
                    help="flash attention on (llama.cpp then computes small batches exactly as one-token steps)")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    assume = None
    if a.assume_cost is not None:
        try:
            assume = (1.0,) * 9 if a.assume_cost == "flat" else (1.0, *(float(x) for x in a.assume_cost.split(",")))
            from edge.speculative import SpeculativeConfig

            SpeculativeConfig(cost=assume)
        except (ValueError, ConfigError) as exc:
            ap.error(f"--assume-cost: {exc}")
        a.mode = "on"
    res = run_speculative(a.model, task=a.task, items=a.items, max_tokens=a.max_tokens, repeats=a.repeats,
                          threads=a.threads, reasoning_prompt=a.reasoning_prompt, mode=a.mode, remeasure=a.remeasure,
                          careful_curve=a.careful_curve, assume_cost=assume, flash_attn=a.flash_attn)
    text = json.dumps(res, indent=2)
    if a.out:
        atomic_write(a.out, text)
    print(text)
    sp = res["speedup"]
    print(f"{res['model']} {res['task']} ({res['mode']}: {res['decision']}): speed-up {sp['median']:.2f}x "
          f"[{sp['min']:.2f}-{sp['max']:.2f}], {res['tokens_per_step']:.2f} tokens/step, acceptance {res['acceptance'] or 0:.2f} "
          f"of {res['drafted']} drafted, same tokens {res['same_tokens']}/{len(res['pairs'])}; batch cost "
          + " ".join(f"{k}:{v:.2f}" for k, v in enumerate(res["batch_cost"]["cost"], 1))
          + (" (drafted for the assumed curve " + " ".join(f"{v:g}" for v in res["assumed_cost"]) + ")" if res["assumed_cost"] else ""),
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
