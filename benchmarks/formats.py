"""One model, six files: GGUF F16 / Q8_0 / Q4_K_M and ONNX fp32 / int8 / int4 side by side.

Converts a Hugging Face checkpoint (default: tiny-r1's) with the project's own converters, then
for each file, in a fresh subprocess (so peak RSS is that file's alone): test-split accuracy and
mean thinking tokens (greedy, unlimited thinking), decode tokens/s (EOS ignored), peak RSS and
file size. One run, same machine, same threads.

    python -m edge.benchmarks.formats [--src benchmarks/tiny_r1/checkpoint] [--limit 80] [--out benchmarks/results/formats.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from edge.files import atomic_write

HERE = Path(__file__).resolve().parent
FORMATS = [("gguf", "f16"), ("gguf", "q8_0"), ("gguf", "q4_k_m"), ("onnx", "fp32"), ("onnx", "int8"), ("onnx", "int4")]

MEASURE = r"""
import json, resource, sys, time
from edge.benchmarks.tasks import load_task, score
from edge.params import SamplingParams
from edge.runtime import Runtime, collect
path, backend, limit, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
rt = Runtime(path, backend=backend, n_ctx=1024, threads=threads, device="cpu")
items = load_task("tiny-r1", limit)
greedy = SamplingParams(temperature=0, top_p=1.0, max_tokens=600, speculate=False)  # the formats, not speculation
correct = thinking = 0
for it in items:
    r = collect(rt.chat([{"role": "user", "content": it.prompt}], greedy))
    correct += score(r.answer, it)[1]
    thinking += r.stats.thinking_tokens
speeds = []
prompt = rt.render([{"role": "user", "content": items[-1].prompt}])
for _ in range(3):
    s = collect(rt.complete(prompt, SamplingParams(temperature=0, top_p=1.0, max_tokens=256, ignore_eos=True, speculate=False))).stats
    speeds.append((s.thinking_tokens + s.answer_tokens - 1) / (s.total_seconds - s.time_to_first_token))
print(json.dumps({"accuracy": correct / len(items), "thinking_tokens": thinking / len(items), "n": len(items),
                  "decode_tok_s": sorted(speeds)[1], "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def size_of(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and f.suffix in (".onnx", ".data", ".onnx_data"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--src", default=str(HERE / "tiny_r1" / "checkpoint"))
    ap.add_argument("--limit", type=int, default=80)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "formats.json")
    a = ap.parse_args(argv)
    from edge.convert import to_gguf
    from edge.convert.onnx import to_onnx

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, wt in FORMATS:
            dest = Path(tmp) / (f"model-{wt}.gguf" if kind == "gguf" else f"onnx-{wt}")
            if kind == "gguf":
                to_gguf(a.src, dest, quant=wt, progress=False)
            else:
                to_onnx(a.src, dest, weights=wt)
            env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
            out = subprocess.run([sys.executable, "-c", MEASURE, str(dest), "llamacpp" if kind == "gguf" else "onnx", str(a.limit), str(a.threads)],
                                 capture_output=True, text=True, env=env, check=True).stdout
            row = {"format": f"{kind} {wt}", "file_bytes": size_of(dest), **json.loads(out.strip().splitlines()[-1])}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(a.out, json.dumps({"src": a.src, "threads": a.threads, "rows": rows}, indent=2))
    print("| format | file size | accuracy | thinking tokens | decode tok/s | peak RSS |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['format']} | {r['file_bytes'] / 1e6:.2f} MB | {100 * r['accuracy']:.1f}% | {r['thinking_tokens']:.1f} | {r['decode_tok_s']:.0f} | {r['peak_rss_mb']:.0f} MB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
