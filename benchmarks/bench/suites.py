"""The benchmark suites, measured through edge's own Runtime and generation loop.

- ``throughput``: per (threads, GPU layers) setting, load time, prefill tokens/s at several
  prompt lengths (``backend.eval`` of N tokens after ``rollback(0)``), decode tokens/s at several
  context depths (the generation loop, EOS ignored so every run has exactly N tokens), time to
  first token of a chat prompt, peak RSS and energy. Each figure: warm-up runs, then repeats,
  reported as median, min/max and quartiles.
- ``overhead``: :func:`benchmarks.overhead.run_overhead`, edge's full loop (parser on, a budget
  and an early-exit controller consulted at every token but never firing) against a bare
  llama-cpp-python loop, interleaved.
- ``reasoning``: the evaluation harness's policies on a slice of a task: accuracy, thinking
  tokens, time to the first answer token and wall time to a correct answer.

:func:`run` ties them together into one record (see :mod:`.schema`).
"""

from __future__ import annotations

import logging
import os
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

from edge.benchmarks.bench import fingerprint
from edge.benchmarks.bench.stats import spread
from edge.benchmarks.bench.schema import DEFAULT_SUITES, KIND, SCHEMA_VERSION, SUITES
from edge.benchmarks.overhead import OVERHEAD_CONTROLLERS, quiet_controllers
from edge.errors import BackendError, ConfigError

# Neutral prose, tokenized once and tiled to any prompt length.
FILLER = (
    "The harbour town woke slowly. Fishing boats came in with the tide, gulls circled the market, "
    "and the baker on the corner opened his shutters to the smell of warm bread. Children ran along "
    "the sea wall counting ships, an old clock in the square struck seven, and the ferry to the "
    "islands sounded its horn twice before leaving. By noon the streets were full of travellers, "
    "merchants weighing spices, and musicians tuning their instruments under the plane trees. "
)
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BenchConfig:
    """Everything a run measures; :meth:`quick` is the under-a-minute variant."""

    suites: tuple[str, ...] = DEFAULT_SUITES
    threads: tuple[int, ...] = ()  # () -> the physical core count
    gpu_layers: tuple[int, ...] = ()  # () -> 0 on CPU builds; (0, -1) where a GPU is offloadable
    n_ctx: int = 4096
    prompt_lengths: tuple[int, ...] = (128, 512, 2048)
    depths: tuple[int, ...] = (64, 512, 2048)
    decode_tokens: int = 128
    warmup: int = 1
    repeats: int = 5
    overhead_tokens: int = 128
    overhead_repeats: int = 5
    task: str = "tiny-r1"
    per_level: int = 2
    limit: int | None = None
    policies: tuple[str, ...] = ("unlimited", "budget:128", "early-exit")
    max_tokens: int = 2048
    quick: bool = False

    @classmethod
    def quick_config(cls, **changes: Any) -> "BenchConfig":
        base = cls(n_ctx=1024, prompt_lengths=(128, 512), depths=(64, 512), decode_tokens=32, warmup=1, repeats=3,
                   overhead_tokens=32, overhead_repeats=3, per_level=1, max_tokens=512, quick=True)
        return replace(base, **changes)

    def __post_init__(self) -> None:
        bad = [s for s in self.suites if s not in SUITES]
        if bad or not self.suites:
            raise ConfigError(f"unknown suite {', '.join(bad) or '(none)'}; choose from: {', '.join(SUITES)}, all")
        for name in ("prompt_lengths", "depths", "threads"):
            vals = getattr(self, name)
            if any(v < 1 for v in vals):
                raise ConfigError(f"--{name.replace('_', '-')} values must be >= 1, got {', '.join(map(str, vals))}")
        if any(g < -1 for g in self.gpu_layers):
            raise ConfigError("--gpu-layers values must be -1 (all) or >= 0")
        for name, low in (("n_ctx", 64), ("decode_tokens", 2), ("repeats", 1), ("warmup", 0), ("overhead_tokens", 2),
                          ("overhead_repeats", 1), ("per_level", 1), ("max_tokens", 1)):
            if getattr(self, name) < low:
                raise ConfigError(f"{name.replace('_', '-')} must be >= {low}, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be >= 1, got {self.limit}")


# -- small helpers -------------------------------------------------------------------------------

class Progress:
    """One line per step on stderr, stamped with the time since the run began."""

    def __init__(self, stream: TextIO | None = None, *, enabled: bool = True) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.t0 = time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.enabled:
            self.stream.write(f"[{time.perf_counter() - self.t0:6.1f}s] {message}\n")
            self.stream.flush()


class RssSampler:
    """Peak resident memory of this process while the block runs (psutil, sampled every 20 ms)."""

    def __init__(self, interval: float = 0.02) -> None:
        self.interval = interval
        self.peak: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        rss = self._proc.memory_info().rss
        self.peak = rss if self.peak is None else max(self.peak, rss)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> "RssSampler":
        try:
            import psutil

            self._proc = psutil.Process()
        except ImportError:
            return self
        self._sample()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._sample()


def load_average() -> list[float] | None:
    """1, 5 and 15-minute load averages (None where the OS has none, e.g. Windows)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def ru_maxrss_bytes() -> int | None:
    """The process's resident-memory high-water mark (kB on Linux, bytes on macOS)."""
    try:
        import resource
    except ImportError:
        return None
    v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(v if sys.platform == "darwin" else v * 1024)


def model_info(path: str | os.PathLike) -> dict[str, Any]:
    """File name, size and GGUF metadata of a model: what a record needs to name it portably."""
    p = Path(path)
    info: dict[str, Any] = {"file": p.name, "size_bytes": p.stat().st_size, "quant": None, "file_type": None,
                            "name": None, "architecture": None, "parameters": None, "context_length": None}
    try:
        import gguf

        reader = gguf.GGUFReader(str(p))
    except (ImportError, OSError, ValueError, KeyError, IndexError) as exc:
        # metadata is nice to have; the backend reports a file it cannot load
        log.debug("no GGUF metadata from %s: %s", p, exc)
        return info

    def field_value(key: str) -> Any:
        f = reader.fields.get(key)
        return f.contents() if f is not None else None

    arch = field_value("general.architecture")
    ft = field_value("general.file_type")
    info.update(name=field_value("general.name"), architecture=arch, file_type=ft,
                context_length=field_value(f"{arch}.context_length") if arch else None,
                parameters=int(sum(int(t.n_elements) for t in reader.tensors)))
    if ft is not None:
        try:
            info["quant"] = gguf.LlamaFileType(ft).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            info["quant"] = f"ftype-{ft}"
    return info


def filler_tokens(rt, n: int) -> list[int]:
    """``n`` prompt tokens of neutral prose (BOS first when the model wants one)."""
    unit = rt.backend.tokenize(FILLER, special=False)
    with_bos = rt.backend.tokenize(FILLER, add_bos=bool(getattr(rt.backend, "add_bos", False)), special=False)
    head = with_bos[: len(with_bos) - len(unit)]
    body = (unit * (n // len(unit) + 1))[: max(0, n - len(head))]
    return head + body


def _clip(values: Sequence[int], cap: int) -> list[int]:
    """Values that fit under ``cap``; a value over it becomes ``cap`` (once)."""
    return sorted({min(v, cap) for v in values if cap >= 1})


# -- throughput --------------------------------------------------------------------------------

def repeated(cfg: BenchConfig, sample: Callable[[], float]) -> dict[str, Any]:
    """``cfg.warmup`` unmeasured calls, then the spread of ``cfg.repeats`` measured ones."""
    for _ in range(cfg.warmup):
        sample()
    return spread([sample() for _ in range(cfg.repeats)])


def prefill_rate(backend, tokens: Sequence[int]) -> float:
    """Tokens/s of evaluating ``tokens`` from an empty cache (one backend call, as the loop does)."""
    backend.rollback(0)
    t = time.perf_counter()
    backend.eval(tokens)
    return len(tokens) / (time.perf_counter() - t)


def decode_rate(backend, context: Sequence[int], tokens: int) -> float:
    """Tokens/s of the generation loop after ``context``: ``(n - 1) / (t_last - t_first)``,
    prefill excluded, EOS ignored so exactly ``tokens`` are generated."""
    from edge.generate import generate
    from edge.params import SamplingParams
    from edge.runtime import collect

    backend.rollback(0)
    params = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=tokens, ignore_eos=True)
    st = collect(generate(backend, list(context), params)).stats
    if st.completion_tokens != tokens or st.time_to_first_token is None:
        raise BackendError(f"decode produced {st.completion_tokens} tokens instead of {tokens} ({st.finish_reason})")
    return (tokens - 1) / (st.total_seconds - st.time_to_first_token)


def first_token_seconds(rt, prompt: str) -> float:
    """Seconds from a templated prompt (empty cache) to the first sampled token."""
    from edge.params import SamplingParams
    from edge.runtime import collect

    rt.backend.rollback(0)
    params = SamplingParams(temperature=0.0, top_p=1.0, max_tokens=1, ignore_eos=True, speculate=False)
    return float(collect(rt.complete(prompt, params)).stats.time_to_first_token)


def throughput_config(model: str, threads: int, gpu_layers: int, cfg: BenchConfig, n_ctx: int, progress: Progress) -> dict[str, Any]:
    """Every throughput figure for one (threads, GPU layers) setting."""
    from edge.benchmarks.overhead import PROMPT
    from edge.runtime import Runtime

    tag = f"throughput threads={threads} gpu_layers={gpu_layers}"
    with fingerprint.EnergyMeter() as energy, RssSampler() as rss:
        t0 = time.perf_counter()
        rt = Runtime(model, n_ctx=n_ctx, threads=threads, device="auto", gpu_layers=gpu_layers)
        load = time.perf_counter() - t0
        try:
            backend = rt.backend
            progress(f"{tag}: loaded in {load:.2f} s ({backend.info.device}, context {backend.n_ctx})")
            lengths = _clip(cfg.prompt_lengths, backend.n_ctx - 1)
            depths = _clip(cfg.depths, backend.n_ctx - cfg.decode_tokens - 2)
            if not lengths or not depths:
                raise ConfigError(f"a context of {backend.n_ctx} tokens is too small for {cfg.decode_tokens} decode tokens; use a larger --ctx")
            filler = filler_tokens(rt, max(lengths + depths))

            prefill = []
            for n in lengths:
                s = repeated(cfg, lambda: prefill_rate(backend, filler[:n]))
                prefill.append({"tokens": n, "tok_s": s})
                progress(f"{tag}: prefill {n:>5} tokens  {s['median']:8.1f} tok/s (min {s['min']:.1f}, max {s['max']:.1f})")
            decode = []
            for d in depths:
                s = repeated(cfg, lambda: decode_rate(backend, filler[:d], cfg.decode_tokens))
                decode.append({"depth": d, "tokens": cfg.decode_tokens, "tok_s": s})
                progress(f"{tag}: decode at depth {d:>5}  {s['median']:8.1f} tok/s (min {s['min']:.1f}, max {s['max']:.1f})")
            prompt = rt.render([{"role": "user", "content": PROMPT}])
            prompt_tokens = len(rt.tokenize_prompt(prompt))
            ttft = repeated(cfg, lambda: first_token_seconds(rt, prompt))
            progress(f"{tag}: time to first token ({prompt_tokens}-token chat prompt) {1000 * ttft['median']:.1f} ms")
            info = backend.info
        finally:
            rt.close()
    return {
        "threads": threads,
        "threads_batch": info.extra.get("threads_batch"),
        "gpu_layers": gpu_layers,
        "offloaded_layers": info.gpu_layers,
        "device": info.device,
        "n_ctx": info.n_ctx,
        "load_seconds": round(load, 4),
        "prefill": prefill,
        "decode": decode,
        "ttft": {"prompt_tokens": prompt_tokens, "seconds": ttft},
        "peak_rss_bytes": rss.peak,
        "ru_maxrss_bytes": ru_maxrss_bytes(),
        "energy_joules": energy.joules,
    }


def throughput(model: str, cfg: BenchConfig, settings: Sequence[tuple[int, int]], n_ctx: int, progress: Progress) -> dict[str, Any]:
    configs = [throughput_config(model, t, g, cfg, n_ctx, progress) for t, g in settings]
    return {"configs": configs, "warmup": cfg.warmup, "repeats": cfg.repeats, "decode_tokens": cfg.decode_tokens}


# -- overhead -------------------------------------------------------------------------------------

def overhead(model: str, cfg: BenchConfig, threads: Sequence[int], n_ctx: int, progress: Progress) -> dict[str, Any]:
    from edge.benchmarks.overhead import run_overhead

    runs = []
    for t in threads:
        progress(f"overhead threads={t}: edge loop vs bare llama-cpp-python, {cfg.overhead_repeats} x {cfg.overhead_tokens} tokens each, interleaved")
        with fingerprint.EnergyMeter() as energy:
            res = run_overhead(model, threads=t, tokens=cfg.overhead_tokens, repeats=cfg.overhead_repeats,
                               n_ctx=min(2048, n_ctx), controllers_factory=quiet_controllers)
        run = {
            "threads": t,
            "tokens": res["tokens"],
            "repeats": res["repeats"],
            "prompt_tokens": res["prompt_tokens"],
            "bare": spread(res["bare_tok_s"]),
            "edge": spread(res["edge_tok_s"]),
            "ratio": round(res["ratio"], 4),
            "same_tokens": res["same_tokens"],
            "energy_joules": energy.joules,
        }
        runs.append(run)
        progress(f"overhead threads={t}: bare {run['bare']['median']:.1f} tok/s, edge {run['edge']['median']:.1f} tok/s, ratio {run['ratio']:.3f}")
    return {"runs": runs, "controllers": list(OVERHEAD_CONTROLLERS)}


# -- reasoning ------------------------------------------------------------------------------------

def _median(xs: Sequence[float | None]) -> float | None:
    vs = [x for x in xs if x is not None]
    return round(statistics.median(vs), 4) if vs else None


def reasoning_items(cfg: BenchConfig):
    from edge.benchmarks.tasks import load_task

    items = load_task(cfg.task)
    levels = {i.level for i in items}
    limit = cfg.limit or (cfg.per_level * len(levels) if len(levels) > 1 else cfg.per_level)
    return load_task(cfg.task, limit)


class AnswerClock:
    """Stands in for a Runtime in the harness and times, per chat, the first answer text the
    user sees, whether the model sampled it or a controller injected it (an early exit
    answers with the probe's text, so no answer token is ever sampled)."""

    def __init__(self, rt) -> None:
        self.rt = rt
        self.first_answer: float | None = None

    def chat(self, *args: Any, **kw: Any):
        from edge.events import AnswerDelta

        self.first_answer = None
        t0 = time.perf_counter()
        for ev in self.rt.chat(*args, **kw):
            if self.first_answer is None and isinstance(ev, AnswerDelta) and ev.text.strip():
                self.first_answer = time.perf_counter() - t0
            yield ev


def reasoning(model: str, cfg: BenchConfig, threads: int, gpu_layers: int, n_ctx: int, progress: Progress) -> dict[str, Any]:
    """Accuracy, thinking tokens and time to answer of each policy on the task slice."""
    from edge.benchmarks import harness
    from edge.params import SamplingParams
    from edge.runtime import Runtime

    policies = [p for spec in cfg.policies for p in harness.parse_policies(spec)]
    items = reasoning_items(cfg)
    # plain decoding: the record must not depend on this machine's batch cost (see eval)
    params = SamplingParams(temperature=0.0, top_p=1.0, seed=0, max_tokens=cfg.max_tokens, speculate=False)
    records = []
    with fingerprint.EnergyMeter() as energy:
        with Runtime(model, n_ctx=min(4096, n_ctx), threads=threads, device="auto", gpu_layers=gpu_layers) as rt:
            clock = AnswerClock(rt)
            total = len(items) * len(policies)
            for policy in policies:
                for item in items:
                    rec = harness.run_item(clock, item, policy, params)
                    rec.pop("trials", None)
                    rec["id"] = str(rec["id"])
                    rec["time_to_first_answer_token"] = None if clock.first_answer is None else round(clock.first_answer, 4)
                    records.append(rec)
                    progress(f"reasoning {len(records)}/{total} {policy.name:<14} {item.id}: "
                             f"{'correct' if rec['correct'] else 'wrong  '} thinking={rec['thinking_tokens']} {rec['seconds']:.2f} s")
    rows = harness.summarize(records)
    for row in rows:
        rs = [r for r in records if r["policy"] == row["policy"]]
        row["correct"] = sum(r["correct"] for r in rs)
        row["ttfa_median"] = _median([r["time_to_first_answer_token"] for r in rs])
        row["time_to_correct_median"] = _median([r["seconds"] for r in rs if r["correct"]])
        for k, v in list(row.items()):
            if isinstance(v, float):
                row[k] = None if v != v else round(v, 4)  # NaN is not JSON
    return {"task": cfg.task, "threads": threads, "gpu_layers": gpu_layers, "max_tokens": cfg.max_tokens,
            "n_problems": len(items), "policies": rows, "records": records, "energy_joules": energy.joules}


# -- the whole run --------------------------------------------------------------------------------

def resolve_settings(cfg: BenchConfig, device: dict[str, Any]) -> tuple[list[int], list[int]]:
    """Thread counts and GPU-layer settings to measure on this device."""
    threads = list(cfg.threads) or [device["cpu"]["physical_cores"] or device["cpu"]["logical_cores"] or 1]
    offload = bool(device["backend"].get("offload_supported"))
    if cfg.gpu_layers:
        if any(g != 0 for g in cfg.gpu_layers) and not offload:
            raise ConfigError("--gpu-layers other than 0 needs a llama-cpp-python build with GPU offload "
                              "(CUDA, Metal, Vulkan); this one is CPU-only")
        layers = list(cfg.gpu_layers)
    else:
        layers = ([-1] if cfg.quick else [0, -1]) if offload else [0]
    return threads, layers


def run(model: str | os.PathLike | None, cfg: BenchConfig, *, progress: Progress | None = None,
        device_name: str | None = None, argv: Sequence[str] | None = None, notes: str | None = None) -> dict[str, Any]:
    """Run the suites of ``cfg`` on ``model`` and return one record (see :mod:`.schema`)."""
    from edge.backends.llamacpp import check_gguf_file
    from edge.model_ref import resolve_model

    progress = progress or Progress(enabled=False)
    path = str(check_gguf_file(resolve_model(model)))
    t0 = time.perf_counter()
    device = fingerprint.collect(name=device_name)
    threads, layers = resolve_settings(cfg, device)
    minfo = model_info(path)
    n_ctx = min(cfg.n_ctx, minfo["context_length"] or cfg.n_ctx)
    progress(f"device {device['label']} ({device['class']}): {device['cpu']['model']}, "
             f"{device['cpu']['physical_cores']} cores / {device['cpu']['logical_cores']} threads; "
             f"model {minfo['file']} ({minfo['quant']}); suites {', '.join(cfg.suites)}")
    battery_start, load_start = fingerprint.battery(), load_average()
    results: dict[str, Any] = {}
    settings = [(t, g) for g in layers for t in threads]
    if "throughput" in cfg.suites:
        results["throughput"] = throughput(path, cfg, settings, n_ctx, progress)
    if "overhead" in cfg.suites:
        results["overhead"] = overhead(path, cfg, threads if not cfg.quick else threads[:1], n_ctx, progress)
    if "reasoning" in cfg.suites:
        results["reasoning"] = reasoning(path, cfg, threads[-1], layers[-1], n_ctx, progress)
    if "peers" in cfg.suites:
        from edge.benchmarks.bench.peers import run_peers

        progress(f"peers threads={threads[0]}: llama-bench, llama-server, llama-cpp-python and edge-reason, "
                 f"{cfg.repeats} rounds x {cfg.overhead_tokens} tokens, interleaved")
        results["peers"] = run_peers(path, threads=threads[0], tokens=cfg.overhead_tokens, rounds=cfg.repeats,
                                     n_ctx=min(2048, n_ctx), progress=progress)
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": KIND,
        "created_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "duration_seconds": round(time.perf_counter() - t0, 2),
        "argv": list(argv or []),
        "notes": notes,
        "device": device,
        "model": minfo,
        "config": {**asdict(cfg), "threads": threads, "gpu_layers": layers, "n_ctx": n_ctx},
        "power": {"battery_start": battery_start, "battery_end": fingerprint.battery(), "energy_source": device["energy_source"]},
        # other work on the machine skews every figure; the load average says how busy it was
        "conditions": {"load_average_start": load_start, "load_average_end": load_average(), "cpu_count": os.cpu_count()},
        "results": results,
    }


def default_record_name(record: dict[str, Any]) -> str:
    """``<device>-<date>.json``, the file name records are contributed under."""
    day = record["created_utc"][:10]
    stamp = record["created_utc"][11:19].replace(":", "")
    return f"{record['device']['label']}-{day}-{stamp}.json"


__all__ = ["BenchConfig", "Progress", "run", "spread", "model_info", "default_record_name", "quiet_controllers"]
