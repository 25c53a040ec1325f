"""Evaluation harness: accuracy and thinking cost of reasoning policies.

A *policy* is a named recipe of controllers:

============================  ==============================================================
``unlimited``                 think as long as the model wants
``oracle``                    unlimited, plus record-only probes at every step boundary; gives
                              the unlimited figures *and* each problem's oracle bound
``budget:N[,N...]``           hard thinking cap of N tokens (one policy per N)
``effort:low|medium|high``    the effort table's budgets
``wait:N``                    minimum thinking N tokens ("Wait" extension)
``adaptive:S[,S...]``         per-query budget from the prompt length, scaled by S
``budget-step:N``, ``adaptive-step:S``  the same, cut at the last finished reasoning step
                              (a paragraph break; closed with no message, the model answers)
``budget-probe:N``,           the same, cut at the last probe point with the probe's answer:
``adaptive-probe:S``          exactly the cut ``offline.cut_at`` replays from an oracle run
``signal:F:T:L:H[,...]``      one probe at the first probe point past F thinking tokens; cap L
                              if its answer's confidence is >= T, else H (``inf``: none);
                              replayed by ``offline.signal_budget(F, T, L, H)``
``early-exit[:T,...]``        DEER-style probes, exit at confidence >= T (default 0.95)
``dynasor[:K,...]``           exit when the last K probe answers agree
============================  ==============================================================

Savings are quoted net of probe tokens. The oracle bound of a problem is the thinking spent
after the earliest step boundary at which a probe already gave the run's final answer; early
exit efficiency = achieved savings / oracle savings.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from edge.benchmarks.tasks import Item, is_equiv, score
from edge.control.budget import LengthPredictor
from edge.control.spec import ControlSpec, parse_signal, signal_text
from edge.errors import ConfigError
from edge.files import atomic_output, atomic_write
from edge.events import Probe
from edge.params import SamplingParams
from edge.runtime import collect

FAMILIES = ("unlimited", "oracle", "budget", "budget-step", "budget-probe", "effort", "wait", "adaptive", "adaptive-step",
            "adaptive-probe", "signal", "early-exit", "dynasor")
CUT_SUFFIXES = {"-step": "step", "-probe": "probe"}
"""``budget-step`` is ``budget`` with ThinkingBudget(cut="step"), ``budget-probe`` with cut="probe"."""


ORACLE_PROBES = {"record_only": True, "gate": 0.0, "min_gap": 0, "max_probes": 100_000}
"""The oracle's early exit: probes at every step boundary that record and never exit."""


@dataclass
class Policy:
    family: str
    value: Any = None

    @property
    def name(self) -> str:
        return self.family if self.value is None else f"{self.family}:{self.value}"

    @property
    def spec(self) -> ControlSpec:
        """The policy as a :class:`~edge.control.spec.ControlSpec` (what the CLI flags and the
        server's fields are parsed into too)."""
        f, v = self.family, self.value
        base, _, suffix = f.partition("-")
        cut = CUT_SUFFIXES.get("-" + suffix, "token") if base in ("budget", "adaptive") else "token"
        if f == "unlimited":
            return ControlSpec()
        if f == "oracle":
            return ControlSpec(early_exit=ORACLE_PROBES)
        if base == "budget":
            return ControlSpec(think_budget=v, cut=cut)
        if f == "effort":
            # a budget runs at every level, "max" (no cap) included: a model that stops inside
            # its thinking is made to answer, as under every other budget policy
            return ControlSpec(effort=v, min_thinking=0)
        if f == "wait":
            return ControlSpec(min_thinking=v)
        if base == "adaptive":
            return ControlSpec(adaptive=v, cut=cut)
        if f == "signal":
            return ControlSpec(signal=parse_signal(v))
        if f == "early-exit":
            return ControlSpec(early_exit={"threshold": v})
        if f == "dynasor":
            return ControlSpec(early_exit={"mode": "consistency", "k": v})
        raise ConfigError(f"unknown policy {f!r}")

    def controllers(self, predictor: LengthPredictor | None = None) -> list:
        spec = self.spec
        if spec.adaptive is not None and predictor is None:
            raise ConfigError("the adaptive policy needs a calibration (--calibration FILE or a task with a validation split)")
        return spec.controllers(predictor)


def _number(text: str, kind: type, what: str):
    try:
        return kind(text)
    except ValueError:
        raise ConfigError(f"bad value {text!r} in policy {what!r}") from None


def parse_policies(spec: str) -> list[Policy]:
    """``budget:16,32`` -> two policies; ``early-exit`` -> threshold 0.95."""
    family, _, rest = spec.strip().partition(":")
    if family not in FAMILIES:
        raise ConfigError(f"unknown policy {family!r}; choose from: {', '.join(FAMILIES)}")
    if family.startswith(("budget-", "adaptive-")):
        # the same budgets, cut otherwise (ThinkingBudget cut="step" or "probe")
        base = family.partition("-")[0]
        return [Policy(family, p.value) for p in parse_policies(base + (":" + rest if rest else ""))]
    values = [v for v in rest.split(",") if v.strip()] if rest else []
    if family == "signal":
        if not values:
            raise ConfigError("policy 'signal' needs FIRST:THRESHOLD:LOW:HIGH, e.g. signal:40:0.9:60:200")
        out = [Policy("signal", signal_text(parse_signal(v))) for v in values]
        for p in out:
            p.controllers()
        return out
    if family in ("unlimited", "oracle"):
        if values:
            raise ConfigError(f"policy {family!r} takes no value")
        return [Policy(family)]
    if family == "effort":
        out = [Policy("effort", v) for v in (values or ["medium"])]
        for p in out:
            p.controllers()
        return out
    kind = {"budget": int, "wait": int, "dynasor": int, "adaptive": float, "early-exit": float}[family]
    default = {"budget": None, "wait": None, "dynasor": 2, "adaptive": 1.0, "early-exit": 0.95}[family]
    if not values:
        if default is None:
            raise ConfigError(f"policy {family!r} needs a value, e.g. {family}:256")
        values = [str(default)]
    out = [Policy(family, _number(v, kind, spec)) for v in values]
    for p in out:  # validate now, not after an hour of evaluation
        p.controllers(LengthPredictor(0, 1)) if family == "adaptive" else p.controllers()
    return out


def run_item(rt, item: Item, policy: Policy, params: SamplingParams, predictor=None) -> dict:
    messages = [{"role": "user", "content": item.prompt}]
    t0 = time.perf_counter()
    reply = collect(rt.chat(messages, params, controllers=policy.controllers(predictor)))
    wall = time.perf_counter() - t0
    s = reply.stats
    pred, correct = score(reply.answer or reply.reasoning[-200:], item)
    rec = {
        "id": item.id,
        "level": item.level,
        "policy": policy.name,
        "family": policy.family,
        "gold": item.gold,
        "pred": pred,
        "correct": correct,
        "prompt_tokens": s.prompt_tokens,
        "thinking_tokens": s.thinking_tokens,
        "answer_tokens": s.answer_tokens,
        "probe_tokens": s.probe_tokens,
        "injected_tokens": s.injected_tokens,
        "retracted_tokens": s.retracted_tokens,
        "probes": s.probes,
        "exit_reason": s.exit_reason,
        "finish_reason": s.finish_reason,
        "seconds": round(wall, 4),
        "time_to_first_answer_token": s.time_to_first_answer_token,
        "decode_tokens_per_second": s.decode_tokens_per_second,
    }
    if policy.family == "oracle":
        trials = [c.detail for c in reply.controls if isinstance(c, Probe)]
        first = next((t["at"] for t in trials if is_equiv(t["answer"], pred or "")), None)
        rec["oracle_point"] = first if first is not None else s.thinking_tokens
        rec["oracle_savings"] = s.thinking_tokens - rec["oracle_point"]
        # every probe, so early exit at any threshold or gate can be replayed offline (under
        # greedy decoding the trace up to an exit is this trace): [at, answer, confidence, cost,
        # finished, chars, stream] (chars: thinking text before the probe, a prefix of
        # "reasoning"; stream: mean probability of the last thinking tokens), so rules that read
        # the text or the stream replay too
        rec["trials"] = [[t["at"], t["answer"], round(t["confidence"], 6), t.get("cost", 0), bool(t.get("finished", True)),
                          t.get("chars"), t.get("stream")] for t in trials]
        rec["reasoning"] = reply.reasoning
    return rec


def evaluate(rt, items: Sequence[Item], policies: Sequence[Policy], params: SamplingParams, *, predictor=None,
             progress: Callable[[int, int, dict], None] | None = None, journal: Path | None = None,
             settings: dict | None = None) -> list[dict]:
    """Run every policy on every item. With a ``journal`` file, each record is appended (and
    flushed) as soon as it exists, and a run started again with the same ``settings`` skips the
    (item, policy) pairs already there: an interrupted evaluation resumes where it stopped."""
    done: dict[tuple[str, str], dict] = {}
    sink = None
    if journal is not None:
        done = _read_journal(journal, settings or {})
        journal.parent.mkdir(parents=True, exist_ok=True)
        sink = open(journal, "a", encoding="utf-8")
        if not done and journal.stat().st_size == 0:
            sink.write(json.dumps({"settings": settings or {}}, default=str) + "\n")
            sink.flush()
    records = []
    total = len(items) * len(policies)
    try:
        for policy in policies:
            for item in items:
                rec = done.get((item.id, policy.name))
                if rec is None:
                    rec = run_item(rt, item, policy, params, predictor)
                    if sink is not None:
                        sink.write(json.dumps(rec, ensure_ascii=False) + "\n")
                        sink.flush()
                records.append(rec)
                if progress:
                    progress(len(records), total, rec)
    finally:
        if sink is not None:
            sink.close()
    return records


def _comparable(settings: dict, head: dict) -> dict:
    """``settings`` less the sampling fields a journal written before they existed lacks, where
    they hold the value such a run had (the field's metadata ``absent``, else its default: a
    field added since, left so, changes nothing the journal's run did, e.g. ``speculate``
    off)."""
    sampling, old = settings.get("sampling"), head.get("sampling")
    if not isinstance(sampling, dict) or not isinstance(old, dict):
        return settings
    defaults = {f.name: f.metadata.get("absent", f.default) for f in dataclasses.fields(SamplingParams)}
    kept = {k: v for k, v in sampling.items() if k in old or k not in defaults or v != defaults[k]}
    return {**settings, "sampling": kept}


def _read_journal(path: Path, settings: dict) -> dict[tuple[str, str], dict]:
    if not path.exists() or path.stat().st_size == 0:
        return {}
    lines = path.read_text(encoding="utf-8").splitlines()
    try:
        head = json.loads(lines[0])["settings"]
    except (ValueError, KeyError, TypeError, IndexError):
        raise ConfigError(f"{path} is not an evaluation journal; use another --out folder") from None
    if _comparable(json.loads(json.dumps(settings, default=str)), head) != head:
        raise ConfigError(f"{path} holds a run with other settings (model, task, prompt or sampling); use another --out folder")
    done = {}
    for line in lines[1:]:
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # the last line of a run killed while writing it
        done[(rec["id"], rec["policy"])] = rec
    return done


def calibrate(rt, items: Sequence[Item], params: SamplingParams, quantile: float = 0.9) -> tuple[LengthPredictor, list[dict]]:
    """Fit the adaptive budget on a calibration split: an oracle run (unlimited thinking with
    record-only probes) gives, per problem, the thinking tokens after which the model's answer
    was already determined; the predictor maps prompt length to that point (the ``quantile``
    of the residuals on top), so the budget covers the work a problem needs, not the
    re-checking the model would add after it."""
    recs = evaluate(rt, items, [Policy("oracle")], params)
    pred = LengthPredictor.fit([r["prompt_tokens"] for r in recs], [r["oracle_point"] for r in recs], quantile=quantile)
    return pred, recs


def _mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return float(statistics.fmean(xs)) if xs else float("nan")


def summarize(records: Sequence[dict]) -> list[dict]:
    """One row per policy: accuracy, mean thinking / probe / net tokens, savings against the
    unlimited (or oracle) run on the same problems, and early-exit efficiency."""
    by: dict[str, list[dict]] = {}
    for r in records:
        by.setdefault(r["policy"], []).append(r)
    base = by.get("oracle") or by.get("unlimited")
    base_t = {r["id"]: r["thinking_tokens"] for r in base} if base else {}
    oracle_s = {r["id"]: r["oracle_savings"] for r in by.get("oracle", [])}
    rows = []
    for name, rs in by.items():
        row = {
            "policy": name,
            "n": len(rs),
            "accuracy": _mean(r["correct"] for r in rs),
            "thinking_tokens": _mean(r["thinking_tokens"] for r in rs),
            "probe_tokens": _mean(r["probe_tokens"] for r in rs),
            "net_tokens": _mean(r["thinking_tokens"] + r["probe_tokens"] + r.get("retracted_tokens", 0) for r in rs),
            "seconds": _mean(r["seconds"] for r in rs),
        }
        ids = [r["id"] for r in rs if r["id"] in base_t]
        if ids:
            base_sum = sum(base_t[i] for i in ids)
            net = sum(r["thinking_tokens"] + r["probe_tokens"] + r.get("retracted_tokens", 0) for r in rs if r["id"] in base_t)
            row["saved_net"] = (base_sum - net) / base_sum if base_sum else 0.0
            if oracle_s:
                o = sum(oracle_s.get(i, 0) for i in ids)
                row["oracle_share"] = o / base_sum if base_sum else 0.0
                row["efficiency"] = (base_sum - net) / o if o else float("nan")
        rows.append(row)
    return rows


def per_level(records: Sequence[dict], policy: str) -> list[dict]:
    rows = []
    levels = sorted({r["level"] for r in records if r["policy"] == policy}, key=str)
    for lv in levels:
        rs = [r for r in records if r["policy"] == policy and r["level"] == lv]
        rows.append({"level": lv, "n": len(rs), "accuracy": _mean(r["correct"] for r in rs), "thinking_tokens": _mean(r["thinking_tokens"] for r in rs),
                     **({"oracle_savings": _mean(r["oracle_savings"] for r in rs)} if policy == "oracle" else {})})
    return rows


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "(no rows)\n"
    cols = list(columns or rows[0].keys())

    def fmt(v):
        if isinstance(v, float):
            if math.isnan(v):
                return "-"
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    out = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    out += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out) + "\n"


def write_outputs(out: Path, records: Sequence[dict], rows: Sequence[dict], *, plot: bool = True) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    atomic_write(out / "records.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    atomic_write(out / "summary.json", json.dumps(rows, indent=2))
    atomic_write(out / "summary.md", markdown_table(rows))
    cols = ["policy", "n", "accuracy", "thinking_tokens", "probe_tokens", "net_tokens", "seconds"]
    with atomic_output(out / "curve.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    written += [out / "records.jsonl", out / "summary.json", out / "summary.md", out / "curve.csv"]
    if plot:
        written.append(plot_curve(rows, out / "curve.png"))
    return written


def plot_curve(rows: Sequence[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fams: dict[str, list[tuple[float, float, str]]] = {}
    for r in rows:
        fams.setdefault(r["policy"].split(":")[0], []).append((r["net_tokens"], r["accuracy"], r["policy"]))
    fig, ax = plt.subplots(figsize=(6.4, 4.4), dpi=120)
    for fam, pts in sorted(fams.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=fam)
    ax.set_xlabel("mean thinking tokens per problem (incl. probe tokens)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("accuracy vs thinking cost")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return path
