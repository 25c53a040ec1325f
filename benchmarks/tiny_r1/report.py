"""Figures of the tiny-r1 model card, measured through llama.cpp on the GGUF.

On the held-out test split, greedy decoding:
- unlimited thinking: accuracy and mean thinking tokens per level;
- thinking cut to 0 tokens (``</think>`` forced before the first token): accuracy per level;
- the oracle bound: share of thinking tokens spent after the earliest step boundary at which a
  probe already produced the final answer (what early exit could save).

    python -m edge.benchmarks.tiny_r1.report [--model edge/models/tiny-r1-q8_0.gguf] [--out benchmarks/tiny_r1/results] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edge.benchmarks import harness
from edge.benchmarks.tasks import load_task
from edge.files import atomic_write
from edge.params import SamplingParams

HERE = Path(__file__).resolve().parent


def level_table(records: list[dict]) -> list[dict]:
    rows = []
    for lv in sorted({r["level"] for r in records}):
        full = [r for r in records if r["level"] == lv and r["policy"] == "oracle"]
        cut = [r for r in records if r["level"] == lv and r["policy"] == "budget:0"]
        think = sum(r["thinking_tokens"] for r in full)
        rows.append({
            "level": lv,
            "n": len(full),
            "accuracy": sum(r["correct"] for r in full) / len(full),
            "thinking_tokens": think / len(full),
            "accuracy_no_thinking": sum(r["correct"] for r in cut) / len(cut) if cut else float("nan"),
            "after_answer_share": sum(r["oracle_savings"] for r in full) / think if think else 0.0,
        })
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF (default: the bundled tiny-r1)")
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    from edge.runtime import Runtime

    items = load_task("tiny-r1", a.limit) + load_task("tiny-r1-stress", a.limit)
    params = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=1024)
    policies = harness.parse_policies("oracle") + harness.parse_policies("budget:0")
    with Runtime(a.model, n_ctx=2048, threads=a.threads, device="cpu") as rt:
        def progress(i, total, rec):
            sys.stderr.write(f"\r{i}/{total}")
        records = harness.evaluate(rt, items, policies, params, progress=progress)
        model = rt.backend.info.model_path
    sys.stderr.write("\n")
    rows = level_table(records)
    overall = harness.summarize(records)
    a.out.mkdir(parents=True, exist_ok=True)
    atomic_write(a.out / "records.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    atomic_write(a.out / "levels.json", json.dumps({"model": model, "levels": rows, "overall": overall}, indent=2))
    md = harness.markdown_table(rows) + "\n" + harness.markdown_table(overall)
    atomic_write(a.out / "levels.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
