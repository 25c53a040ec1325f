"""KV cache types (f16, q8_0, q4_0) on a long real trace: quality, decode speed at depth, memory.

Three measurements (``benchmarks/results/kv-cache.md`` has the method and the results):

- ``trace``: one pass over a long real text, teacher-forced, on four contexts of the same model
  loaded side by side: f16 without flash attention (the default), f16 with it, q8_0 and q4_0
  (both need it). Every chunk of 512 tokens is scored on each context (all logits); per position
  the top-1 agreement with the f16 reference and KL(f16 || other) of the next-token
  distributions. At the depths asked for (default 1024, 4096, 8192) the pass stops and measures
  decode speed: rounds in which every context (in a rotating order) decodes ``--decode`` tokens
  greedily after the same prefix and rolls back; per round the ratio to the f16 reference.
- ``memory``: per (KV type, context) a child process loads the model as edge does
  (``LlamaCppBackend``), drives it to the worst case of generation (a prompt batch of 512
  tokens; without flash attention after filling the context, since the attention scores grow
  with it; ``--no-fill`` skips that) and reports its peak RSS (``VmHWM``) next to the estimate
  the backend made before loading. ``auto`` is ``--ctx auto``.

The text: the AIME 2024 problems of ``benchmarks/data/aime24.jsonl`` with their worked solutions,
as a chat (user: problem, assistant: solution), rendered with the model's chat template, in file
order, until ``--tokens`` tokens.

    python -m edge.benchmarks.kv_cache trace  --model M.gguf [--tokens 8448] [--depths 1024,4096,8192] [--decode 32] [--rounds 5] --out trace.json
    python -m edge.benchmarks.kv_cache memory --model M.gguf [--configs f16:4096,q8_0:4096,q4_0:4096,f16:auto,q8_0:auto,q4_0:auto] --out memory.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from edge.benchmarks.harness import atomic_write

CONTEXTS = (("f16", False), ("f16", True), ("q8_0", True), ("q4_0", True))  # (KV type, flash attention)
CHUNK = 512
SCORE = 64  # rows of logits scored at a time in the trace (memory: 4 x 64 x n_vocab floats)


def label(kv: str, fa: bool) -> str:
    return f"{kv}{'+fa' if fa and kv == 'f16' else ''}"


def trace_tokens(backend, n: int) -> list[int]:
    """``n`` tokens of AIME 2024 problems and worked solutions as a chat, in file order."""
    from edge.templates import ChatTemplate

    data = Path(__file__).resolve().parent / "data" / "aime24.jsonl"
    items = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines() if line.strip()]
    template = ChatTemplate.from_model(backend.chat_template, bos_token=backend.bos_token, eos_token=backend.eos_token)
    messages = []
    for it in items:
        messages += [{"role": "user", "content": it["problem"]}, {"role": "assistant", "content": it["solution"]}]
        text = template.render(messages, add_generation_prompt=False)
        ids = backend.tokenize(text, add_bos=bool(getattr(backend, "add_bos", False)), special=True)
        if len(ids) >= n:
            return ids[:n]
    raise SystemExit(f"the AIME 2024 trace has only {len(ids)} tokens; ask for fewer")


def log_softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of float32 logits (float32: the KL sums stay well above its error)."""
    x = x - x.max(axis=1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=1, keepdims=True))
    return x


def decode_speed(backend, prefix_len: int, first: int, n: int) -> tuple[float, list[int]]:
    """Tok/s of ``n`` greedy single-token steps after the first ``prefix_len`` cached tokens
    (``first`` is the token that follows them), timed from the first step's end to the last's;
    the cache is rolled back afterwards."""
    tok, out = first, []
    t0 = None
    for _ in range(n):
        logits = backend.eval([tok])
        if t0 is None:
            t0 = time.perf_counter()
        tok = int(logits.argmax())
        out.append(tok)
    elapsed = time.perf_counter() - t0
    backend.rollback(prefix_len)
    return (n - 1) / elapsed, out


def spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs), "values": xs}


def run_trace(model: str, *, tokens: int, depths: list[int], decode: int, rounds: int, threads: int, progress=print,
              checkpoint=None) -> dict:
    """The trace pass; ``checkpoint(result)`` is called with the results so far after every
    chunk (a long pass on a busy machine keeps what it measured)."""
    from edge.backends.llamacpp import LlamaCppBackend

    n_ctx = max(tokens, max(depths)) + decode + 16
    backends = {}
    try:
        for kv, fa in CONTEXTS:
            backends[label(kv, fa)] = LlamaCppBackend(model, n_ctx=n_ctx, threads=threads, device="cpu", kv_cache=kv, flash_attn=fa)
        names = list(backends)
        ref = names[0]
        ids = trace_tokens(backends[ref], tokens)
        progress(f"trace: {len(ids)} tokens, contexts {', '.join(names)}, n_ctx {n_ctx}")
        kl = {n: [] for n in names[1:]}
        top1 = {n: [] for n in names[1:]}
        kl_fa = {n: [] for n in names[2:]}  # against f16 with flash attention: the quantization alone
        top1_fa = {n: [] for n in names[2:]}
        speed: list[dict] = []
        done = 0
        todo = sorted(d for d in depths if d <= len(ids) - 1)
        while done < len(ids) - 1:
            stop = min(done + CHUNK, len(ids) - 1, *(d for d in todo if d > done)) if todo else min(done + CHUNK, len(ids) - 1)
            chunk = ids[done:stop]
            # chunk by chunk of SCORE rows: the logits of 150k-token vocabularies take 0.6 MB a row
            for i in range(0, len(chunk), SCORE):
                part = chunk[i : i + SCORE]
                lp_ref = log_softmax(backends[ref].score(part))
                lp_fa = log_softmax(backends[names[1]].score(part))
                p_ref, p_fa = np.exp(lp_ref), np.exp(lp_fa)
                for n in names[1:]:
                    lp = lp_fa if n == names[1] else log_softmax(backends[n].score(part))
                    kl[n] += ((p_ref * (lp_ref - lp)).sum(axis=1)).tolist()
                    top1[n] += (lp_ref.argmax(axis=1) == lp.argmax(axis=1)).tolist()
                    if n != names[1]:
                        kl_fa[n] += ((p_fa * (lp_fa - lp)).sum(axis=1)).tolist()
                        top1_fa[n] += (lp_fa.argmax(axis=1) == lp.argmax(axis=1)).tolist()
                    del lp
                del lp_ref, lp_fa, p_ref, p_fa
            done = stop
            if todo and done == todo[0]:
                todo.pop(0)
                per = {n: [] for n in names}
                ratio = {n: [] for n in names[1:]}
                for r in range(rounds + 1):  # round 0 warms up
                    order = names[r % len(names):] + names[: r % len(names)]
                    got = {n: decode_speed(backends[n], done, ids[done], decode)[0] for n in order}
                    if r == 0:
                        continue
                    for n in names:
                        per[n].append(got[n])
                    for n in names[1:]:
                        ratio[n].append(got[n] / got[ref])
                row = {"depth": done, "tok_s": {n: spread(v) for n, v in per.items()}, "ratio_to_f16": {n: spread(v) for n, v in ratio.items()}}
                speed.append(row)
                progress(f"depth {done}: " + ", ".join(f"{n} {row['tok_s'][n]['median']:.2f} tok/s" for n in names))
            if done % 1024 == 0 or done == len(ids) - 1:
                progress(f"scored {done} tokens: " + ", ".join(f"{n} top-1 {np.mean(top1[n]):.4f} KL {np.mean(kl[n]):.5f}" for n in names[1:]))
            result = {"model": Path(model).name, "tokens": len(ids), "scored": done, "complete": done == len(ids) - 1,
                      "threads": threads, "decode_tokens": decode, "rounds": rounds,
                      "text": "benchmarks/data/aime24.jsonl problems and solutions as a chat, file order",
                      "quality_vs_f16": _quality(kl, top1), "quality_vs_f16_fa": _quality(kl_fa, top1_fa), "decode": speed}
            if checkpoint is not None:
                checkpoint(result)
    finally:
        for b in backends.values():
            b.close()
    return result


def _quality(d_kl: dict, d_top: dict) -> dict:
    return {n: {"positions": len(d_kl[n]), "top1_agreement": float(np.mean(d_top[n])), "kl_mean": float(np.mean(d_kl[n])),
                "kl_p99": float(np.quantile(d_kl[n], 0.99)), "kl_max": float(np.max(d_kl[n]))} for n in d_kl}


# -- memory ------------------------------------------------------------------------------------

def child(model: str, kv: str, ctx: str, threads: int, fill: str) -> dict:
    """In a fresh process: load, drive to the worst case, report the estimate and VmHWM."""
    from edge.backends.llamacpp import LlamaCppBackend

    n_ctx = ctx if ctx == "auto" else int(ctx)
    t0 = time.perf_counter()
    b = LlamaCppBackend(model, n_ctx=n_ctx, threads=threads, device="cpu", kv_cache=kv)
    loaded_hwm = vm_hwm()
    filled = 0
    if not b.info.extra["flash_attn"] and fill == "yes":  # the attention scores grow with the context: fill it
        ids = trace_tokens(b, b.n_ctx)
        b.eval(ids[: b.n_ctx - CHUNK])
        filled = b.n_past
    else:
        ids = trace_tokens(b, CHUNK)
    b.eval(ids[filled : filled + CHUNK])  # a whole batch, one row of logits, as generation asks
    out = {"kv_cache": kv, "ctx": ctx, "n_ctx": b.n_ctx, "flash_attn": b.info.extra["flash_attn"], "filled_to": filled + CHUNK,
           "estimate_bytes": b.info.extra["memory_estimate_bytes"], "vm_hwm_after_load": loaded_hwm, "vm_hwm": vm_hwm(),
           "seconds": round(time.perf_counter() - t0, 1)}
    b.close()
    return out


def vm_hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_memory(model: str, configs: list[str], threads: int, fill: bool, progress=print) -> list[dict]:
    rows = []
    for cfg in configs:
        kv, _, ctx = cfg.partition(":")
        cmd = [sys.executable, "-m", "edge.benchmarks.kv_cache", "_child", "--model", model, "--kv", kv, "--ctx", ctx or "4096",
               "--threads", str(threads), "--fill", "yes" if fill else "no"]
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise SystemExit(f"{cfg}: child failed: {r.stderr.strip()[-500:]}")
        row = json.loads(r.stdout.strip().splitlines()[-1])
        row["error"] = row["estimate_bytes"] / row["vm_hwm"] - 1
        rows.append(row)
        progress(f"{cfg}: n_ctx {row['n_ctx']}, estimate {row['estimate_bytes'] / 2**20:.0f} MiB, peak RSS {row['vm_hwm'] / 2**20:.0f} MiB "
                 f"({100 * row['error']:+.1f}%)")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=("trace", "memory", "_child"))
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=8448)
    ap.add_argument("--depths", default="1024,4096,8192")
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--configs", default="f16:4096,q8_0:4096,q4_0:4096,f16:auto,q8_0:auto,q4_0:auto")
    ap.add_argument("--no-fill", action="store_true", help="memory: do not fill the context without flash attention")
    ap.add_argument("--kv"), ap.add_argument("--ctx"), ap.add_argument("--fill", default="yes")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if a.mode == "_child":
        print(json.dumps(child(a.model, a.kv, a.ctx, a.threads, a.fill)))
        return 0
    if a.mode == "trace":
        save = (lambda r: atomic_write(a.out, json.dumps(r, indent=1))) if a.out else None
        res = run_trace(a.model, tokens=a.tokens, depths=[int(d) for d in a.depths.split(",")], decode=a.decode, rounds=a.rounds,
                        threads=a.threads, progress=log, checkpoint=save)
    else:
        res = {"model": Path(a.model).name, "threads": a.threads, "rows": run_memory(a.model, a.configs.split(","), a.threads, not a.no_fill, log)}
    text = json.dumps(res, indent=1)
    if a.out:
        atomic_write(a.out, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
