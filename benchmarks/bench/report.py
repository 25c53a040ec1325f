"""Merge benchmark records from many devices into markdown tables and PNG plots.

    records = load_records(["benchmarks/records/"])      # files, or folders of *.json
    print(markdown(records))
    write_report(records, Path("report/"))                # report.md + throughput.png, ...

Rows are labelled ``<device> · <quant>`` so one table compares a laptop's Q4_K_M with a
phone's Q4_0. A figure is ``median [min–max]`` over the record's repeats.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Sequence

from edge.benchmarks.bench.schema import load_records
from edge.files import atomic_output, atomic_write

__all__ = ["load_records", "markdown", "write_report", "throughput_rows", "overhead_rows", "reasoning_rows", "device_rows"]

Row = dict[str, Any]


# -- rows -------------------------------------------------------------------------------------------

def entry(rec: dict[str, Any]) -> str:
    return f"{rec['device']['label']} · {rec['model'].get('quant') or '?'}"


def plot_entry(rec: dict[str, Any]) -> str:
    """A plot's row label: device, model (shortened) and quant, since one plot may hold
    several models of one device."""
    name = rec["model"].get("name") or rec["model"]["file"]
    name = name if len(name) <= 22 else name[:21] + "…"
    return f"{rec['device']['label']} · {name} · {rec['model'].get('quant') or '?'}"


def _gib(n: int | None) -> str | None:
    return f"{n / 2**30:.1f}" if n else None


def _fmt_spread(s: dict[str, Any] | None, scale: float = 1.0, digits: int = 1) -> str | None:
    if not s:
        return None
    return f"{s['median'] * scale:.{digits}f} [{s['min'] * scale:.{digits}f}–{s['max'] * scale:.{digits}f}]"


def device_rows(records: Sequence[dict[str, Any]]) -> list[Row]:
    seen, rows = set(), []
    for r in records:
        d = r["device"]
        key = (d["label"], d["cpu"].get("model"), d["backend"].get("llama_cpp_python"))
        if key in seen:
            continue
        seen.add(key)
        gpus = ", ".join(g["name"] + (f" ({_gib(g.get('memory_bytes'))} GiB)" if g.get("memory_bytes") else "") for g in d.get("gpus", []))
        clusters = d["cpu"].get("clusters") or []
        cpu = d["cpu"].get("model")
        if clusters:
            cpu = " + ".join(f"{c['count']}x {c['core']}" + (f" @{c['max_mhz'] / 1000:.2f} GHz" if c.get("max_mhz") else "") for c in clusters)
        soc = (d.get("soc") or {}).get("model")
        if soc and soc != cpu:
            cpu = f"{soc}: {cpu}" if cpu else soc
        b = d["backend"]
        rows.append({
            "device": d["label"],
            "class": d["class"] + (" (VM)" if d.get("virtualized") else ""),
            "CPU": cpu,
            "cores phys/log": f"{d['cpu'].get('physical_cores') or '?'}/{d['cpu'].get('logical_cores') or '?'}",
            "RAM GiB": _gib(d.get("memory_bytes")),
            "GPU": gpus or None,
            "OS": d["os"].get("distro") or f"{d['os']['system']} {d['os'].get('release') or ''}".strip(),
            "llama-cpp-python": b.get("llama_cpp_python"),
            "build": ", ".join(b.get("accelerators") or []) or "CPU" + (f" ({' '.join(b.get('cpu_features') or [])})" if b.get("cpu_features") else ""),
        })
    return rows


def throughput_rows(records: Sequence[dict[str, Any]]) -> list[Row]:
    lengths = sorted({p["tokens"] for r in records for c in _configs(r) for p in c["prefill"]})
    depths = sorted({p["depth"] for r in records for c in _configs(r) for p in c["decode"]})
    rows = []
    for r in records:
        for c in _configs(r):
            row: Row = {"device · quant": entry(r), "model": r["model"].get("name") or r["model"]["file"],
                        "threads": c["threads"], "gpu layers": c["gpu_layers"], "load s": f"{c['load_seconds']:.2f}"}
            pre = {p["tokens"]: p["tok_s"] for p in c["prefill"]}
            dec = {p["depth"]: p["tok_s"] for p in c["decode"]}
            for n in lengths:
                row[f"prefill@{n} tok/s"] = _fmt_spread(pre.get(n))
            for n in depths:
                row[f"decode@{n} tok/s"] = _fmt_spread(dec.get(n))
            row["TTFT ms"] = _fmt_spread(c["ttft"]["seconds"], 1000.0)
            row["peak RSS MiB"] = f"{c['peak_rss_bytes'] / 2**20:.0f}" if c.get("peak_rss_bytes") else None
            row["energy J"] = f"{c['energy_joules']:.1f}" if c.get("energy_joules") is not None else None
            row["load"] = _load(r)
            rows.append(row)
    return rows


def overhead_rows(records: Sequence[dict[str, Any]]) -> list[Row]:
    rows = []
    for r in records:
        for o in (r["results"].get("overhead") or {}).get("runs", []):
            rows.append({"device · quant": entry(r), "model": r["model"].get("name") or r["model"]["file"], "threads": o["threads"],
                         "tokens": o["tokens"], "repeats": o["repeats"], "bare llama-cpp-python tok/s": _fmt_spread(o["bare"]),
                         "edge-reason tok/s": _fmt_spread(o["edge"]), "edge/bare": f"{o['ratio']:.3f}"})
    return rows


def peers_rows(records: Sequence[dict[str, Any]]) -> list[Row]:
    rows = []
    for r in records:
        res = r["results"].get("peers")
        for c in (res or {}).get("contenders", []):
            rows.append({"device · quant": entry(r), "model": r["model"].get("name") or r["model"]["file"], "threads": res["threads"],
                         "tokens": res["tokens"], "rounds": res["rounds"], "contender": c["name"],
                         "decode tok/s": _fmt_spread(c["decode_tok_s"]),
                         "decode / edge-reason": _fmt_spread(c["decode_ratio_to_edge"], digits=3),
                         "prefill tok/s": _fmt_spread(c.get("prefill_tok_s")),
                         "prefill / edge-reason": _fmt_spread(c.get("prefill_ratio_to_edge"), digits=3),
                         "same tokens": {True: "yes", False: "no"}.get(c.get("same_tokens"))})
    return rows


def reasoning_rows(records: Sequence[dict[str, Any]]) -> list[Row]:
    rows = []
    for r in records:
        res = r["results"].get("reasoning")
        if not res:
            continue
        for p in res["policies"]:
            rows.append({"device · quant": entry(r), "model": r["model"].get("name") or r["model"]["file"], "task": res["task"],
                         "policy": p["policy"], "n": p["n"], "accuracy %": f"{100 * p['accuracy']:.1f}",
                         "thinking tokens": f"{p['thinking_tokens']:.1f}",
                         "probe tokens": f"{p['probe_tokens']:.1f}" if p.get("probe_tokens") is not None else None,
                         "first answer s": _num(p.get("ttfa_median"), 3),
                         "to correct answer s": _num(p.get("time_to_correct_median"), 3),
                         "wall s": _num(p.get("seconds"), 3)})
    return rows


def _load(rec: dict[str, Any]) -> str | None:
    """The 1-minute load average at the start of the run, against the CPU count: how busy the
    machine was with other work (``2.1/8``)."""
    cond = rec.get("conditions") or {}
    load = cond.get("load_average_start")
    if not load:
        return None
    return f"{load[0]:.1f}/{cond.get('cpu_count') or rec['device']['cpu'].get('logical_cores') or '?'}"


def _num(v: float | None, digits: int) -> str | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def _configs(rec: dict[str, Any]) -> list[dict[str, Any]]:
    return (rec["results"].get("throughput") or {}).get("configs", [])


# -- markdown ---------------------------------------------------------------------------------------

def table(rows: Sequence[Row]) -> str:
    if not rows:
        return "(none)\n"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    cell = lambda v: "–" if v is None else str(v).replace("|", "\\|")  # noqa: E731
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    out += ["| " + " | ".join(cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(out) + "\n"


def markdown(records: Sequence[dict[str, Any]]) -> str:
    parts = [f"# edge-reason benchmarks ({len(records)} record{'s' if len(records) != 1 else ''})\n\n",
             "Figures are median [min–max] over repeated runs after warm-up; EOS ignored so lengths are exact.\n\n",
             "## Devices\n\n", table(device_rows(records))]
    sections = (
        ("Throughput", throughput_rows, "prefill@N: N prompt tokens evaluated from an empty cache; decode@D: generation "
         "loop tokens/s with D tokens already in context; TTFT: chat prompt to first token; load: 1-minute load "
         "average / CPUs when the run began (other work on the machine)."),
        ("Overhead of edge-reason's loop vs bare llama-cpp-python", overhead_rows,
         "Both loops drive the same llama.cpp context (same weights, cache and threads) in back-to-back pairs; edge's loop "
         "runs the think parser plus a budget and an early-exit controller that never fire; edge/bare is the median "
         "of the per-pair ratios (> 1: edge-reason is faster)."),
        ("Reasoning", reasoning_rows, "Accuracy and thinking cost per policy; times are medians per problem."),
        ("Peers: llama.cpp's programs and bare llama-cpp-python", peers_rows,
         "One GGUF, the same threads and prompt, greedy, interleaved rounds in a rotating order; each ratio is the median "
         "[min–max] of per-round ratios to edge-reason (plain) in the same round (> 1: the contender is faster). llama-bench "
         "decodes from an empty context (its tg test), the others after the prompt; llama-server by its own timings."),
    )
    for title, fn, note in sections:
        rows = fn(records)
        if rows:
            parts += [f"\n## {title}\n\n", f"{note}\n\n", table(rows)]
    return "".join(parts)


# -- plots ------------------------------------------------------------------------------------------

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    _plt().close(fig)
    return path


def plot_throughput(records: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Prefill and decode tokens/s by device, quant and setting (bars: median; whiskers: min–max)."""
    rows = [(f"{plot_entry(r)} · {c['threads']}t" + _gpu_label(c["gpu_layers"]), c) for r in records for c in _configs(r)]
    if not rows:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 1.2 + 0.55 * len(rows) * 2), dpi=110, sharey=True)
    for ax, key, sub, title in ((axes[0], "prefill", "tokens", "prefill tokens/s (prompt length)"),
                                (axes[1], "decode", "depth", "decode tokens/s (context depth)")):
        sizes = sorted({p[sub] for _, c in rows for p in c[key]})
        h = 0.8 / max(1, len(sizes))
        for j, n in enumerate(sizes):
            ys, med, lo, hi = [], [], [], []
            for i, (_, c) in enumerate(rows):
                s = next((p["tok_s"] for p in c[key] if p[sub] == n), None)
                if s:
                    ys.append(i + (j - (len(sizes) - 1) / 2) * h)
                    med.append(s["median"])
                    lo.append(s["median"] - s["min"])
                    hi.append(s["max"] - s["median"])
            ax.barh(ys, med, height=h, xerr=[lo, hi], capsize=2, label=f"{n}")
        ax.set_title(title)
        speeds = [p["tok_s"]["median"] for _, c in rows for p in c[key] if p["tok_s"]["median"] > 0]
        if speeds and max(speeds) > 20 * min(speeds):  # a phone next to a GPU: linear bars hide the slow rows
            ax.set_xscale("log")
        ax.set_xlabel("tokens/s" + (" (log scale)" if ax.get_xscale() == "log" else ""))
        ax.grid(axis="x", alpha=0.3)
        ax.legend(title=sub, fontsize=8)
    axes[0].set_yticks(range(len(rows)), [label for label, _ in rows], fontsize=8)
    axes[0].invert_yaxis()
    fig.tight_layout()
    return _save(fig, path)


def _gpu_label(layers: int) -> str:
    return "" if layers == 0 else " · GPU all" if layers < 0 else f" · GPU {layers} layers"


def _reasoning(records: Sequence[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(plot_entry(r), r["results"]["reasoning"]) for r in records if r["results"].get("reasoning")]


def _horizontal() -> dict[str, Any]:
    import matplotlib

    major, minor = (int(x) for x in matplotlib.__version__.split(".")[:2])
    return {"orientation": "horizontal"} if (major, minor) >= (3, 10) else {"vert": False}


def plot_time_to_answer(records: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Distributions of time to the first answer token and of wall time to a correct answer."""
    data = _reasoning(records)
    if not data:
        return None
    groups = []
    for label, res in data:
        for p in res["policies"]:
            recs = [x for x in res["records"] if x["policy"] == p["policy"]]
            groups.append((f"{label} · {p['policy']}",
                           [x["time_to_first_answer_token"] for x in recs if x.get("time_to_first_answer_token") is not None],
                           [x["seconds"] for x in recs if x["correct"]]))
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 1.5 + 0.45 * len(groups)), dpi=110, sharey=True)
    for ax, k, title in ((axes[0], 1, "time to first answer token (s)"), (axes[1], 2, "wall time to a correct answer (s)")):
        for i, g in enumerate(groups):
            if g[k]:
                ax.boxplot([g[k]], positions=[i], widths=0.6, manage_ticks=False, **_horizontal())
            else:
                ax.text(0.02, i, "no data" if k == 1 else "no correct answer", transform=ax.get_yaxis_transform(), va="center", fontsize=8, color="gray")
        ax.set_title(title)
        ax.set_xlabel("seconds")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(groups)), [g[0] for g in groups], fontsize=8)
    axes[0].set_ylim(len(groups) - 0.5, -0.5)
    fig.tight_layout()
    return _save(fig, path)


def plot_accuracy_vs_thinking(records: Sequence[dict[str, Any]], path: Path) -> Path | None:
    """Accuracy against mean thinking tokens (probe tokens included), one line per device · model."""
    data = _reasoning(records)
    if not data:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.6), dpi=110)
    for label, res in data:
        pts = sorted((p.get("net_tokens", p["thinking_tokens"]), 100 * p["accuracy"], p["policy"]) for p in res["policies"])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{label} · {res['task']}")
        for x, y, name in pts:
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("mean thinking tokens per problem (incl. probe tokens)")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-5, 105)
    ax.set_title("accuracy vs thinking tokens")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


PLOTS = (("throughput.png", plot_throughput), ("time_to_answer.png", plot_time_to_answer),
         ("accuracy_vs_thinking.png", plot_accuracy_vs_thinking))


def write_report(records: Sequence[dict[str, Any]], out: Path, *, plots: bool = True) -> list[Path]:
    """``report.md`` plus the plots that the records have data for."""
    from edge.benchmarks.bench.schema import RecordError

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RecordError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    md = out / "report.md"
    text = markdown(records)
    written = []
    if plots:
        for name, fn in PLOTS:
            p = fn(records, out / name)
            if p is not None:
                written.append(p)
                text += f"\n![{p.stem}]({p.name})\n"
    atomic_write(md, text)
    return [md, *written]


def report(paths: Iterable[str | Path], out: Path | None = None) -> tuple[str, list[Path]]:
    """Load records, return the markdown and (with ``out``) the files written."""
    records = load_records(paths)
    return markdown(records), (write_report(records, out) if out is not None else [])
