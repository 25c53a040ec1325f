"""Early exit replayed offline from one oracle run, with calibration and paired statistics.

An ``oracle`` evaluation (``edge-reason eval --policy oracle --out DIR``) decodes each problem
with unlimited thinking and probes the model at every step boundary without acting on the probes
(record-only; each probe is rolled back, so the trace is the unlimited one). Under greedy decoding
an early exit at probe ``i`` would have produced exactly this trace up to that probe and then
the probe's answer, so every exit rule (confidence threshold, Dynasor-style agreement, a
calibrated gate) is evaluated from the records without decoding again: one pass, the whole
threshold curve.

Honest selection: the first ``--validation`` problems choose the rule and its setting and fit the
calibration; the remaining problems (the test slice) only report. Reported per policy: accuracy
with a 95% Wilson interval, the paired change against unlimited on the same problems with an
exact McNemar test, mean thinking and probe tokens, net tokens saved, and the share of the oracle
bound captured (the bound: thinking after the first probe that already gave the final answer).

    python -m edge.benchmarks.offline RUN_DIR [RUN_DIR ...] --validation 50 --out RESULTS_DIR
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from edge.benchmarks.tasks import is_equiv
from edge.control.budget import LengthPredictor
from edge.control.early_exit import Calibration, probe_features

Trial = dict
Rule = Callable[[list[Trial]], bool]


def load_records(run: Path) -> list[dict]:
    """The oracle records of a run folder (``records.jsonl``, else the journal of a run still going)."""
    path = run / "records.jsonl" if (run / "records.jsonl").exists() else run / "progress.jsonl"
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("policy") == "oracle":
            out.append(rec)
    return out


def trials_of(rec: dict) -> list[Trial]:
    """The recorded probes as dicts; ``chars`` and ``stream`` are None in journals older than them."""
    return [{"at": t[0], "answer": t[1], "confidence": t[2], "cost": t[3] if len(t) > 3 else 0, "finished": bool(t[4]) if len(t) > 4 else True,
             "chars": t[5] if len(t) > 5 else None, "stream": t[6] if len(t) > 6 else None}
            for t in rec.get("trials", [])]


def oracle_point(rec: dict) -> int:
    """Thinking tokens after which a probe already gave the run's final answer."""
    for t in trials_of(rec):
        if rec.get("pred") is not None and is_equiv(t["answer"], rec["pred"]):
            return t["at"]
    return rec["thinking_tokens"]


def replay(rec: dict, rule: Rule | None, *, min_gap: int = 0, gate: float = 0.0, min_thinking: int = 0) -> dict:
    """What a live early exit with ``rule`` would have done on this trace; ``min_gap`` skips
    probe points closer than that many thinking tokens to the last probe taken (as
    ``EarlyExit(min_gap=...)`` does), and ``gate`` those where the stream confidence recorded
    before the probe is below it (``EarlyExit(gate=...)``, same window), so cheaper probe
    schedules replay from the same run; ``min_thinking`` skips those before that many thinking
    tokens (``EarlyExit(min_thinking=...)``)."""
    probes: list[Trial] = []
    cost = 0
    last_at = -(10**9)
    for t in trials_of(rec) if rule is not None else []:
        if t["at"] < min_thinking or t["at"] - last_at < min_gap:
            continue
        if gate > 0:
            if t["stream"] is None:
                raise ValueError(f"{rec['id']}: this journal has no stream confidence; a gate cannot be replayed")
            if t["stream"] < gate:
                continue
        last_at = t["at"]
        probes.append(t)
        cost += t["cost"]
        if rule(probes):
            return {"id": rec["id"], "thinking_tokens": t["at"], "probe_tokens": cost, "pred": t["answer"],
                    "correct": is_equiv(t["answer"], rec["gold"]), "exited": True}
    return {"id": rec["id"], "thinking_tokens": rec["thinking_tokens"], "probe_tokens": cost, "pred": rec.get("pred"),
            "correct": bool(rec["correct"]), "exited": False}


# -- rules (the live EarlyExit.decide, on recorded trials) ---------------------------------------
def confidence_rule(threshold: float) -> Rule:
    return lambda ts: ts[-1]["finished"] and ts[-1]["confidence"] >= threshold


def consistency_rule(k: int) -> Rule:
    def rule(ts: list[Trial]) -> bool:
        last = ts[-k:]
        return len(last) == k and all(t["finished"] and t["answer"] and t["answer"] == last[0]["answer"] for t in last)

    return rule


def calibrated_rule(cal: Calibration, threshold: float) -> Rule:
    return lambda ts: ts[-1]["finished"] and cal.probability(ts) >= threshold


# -- statistics --------------------------------------------------------------------------------
def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def mcnemar(base: Sequence[bool], other: Sequence[bool]) -> float:
    """Exact two-sided McNemar p-value for paired correctness (1.0 when nothing changed)."""
    b = sum(1 for x, y in zip(base, other) if x and not y)
    c = sum(1 for x, y in zip(base, other) if y and not x)
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


def summarize(recs: Sequence[dict], rule: Rule | None, name: str, *, min_gap: int = 0, gate: float = 0.0) -> dict:
    return _summary(recs, [replay(r, rule, min_gap=min_gap, gate=gate) for r in recs], name)


def _summary(recs: Sequence[dict], runs: Sequence[dict], name: str) -> dict:
    """The row of a policy from what it did on each record (``runs``, one per record, as
    :func:`replay` gives)."""
    base = [bool(r["correct"]) for r in recs]
    corr = [r["correct"] for r in runs]
    n, k = len(runs), sum(corr)
    base_t = sum(r["thinking_tokens"] for r in recs)
    net = sum(r["thinking_tokens"] + r["probe_tokens"] for r in runs)
    bound = sum(r["thinking_tokens"] - oracle_point(r) for r in recs)
    lo, hi = wilson(k, n)
    return {
        "policy": name,
        "n": n,
        "accuracy": k / n if n else float("nan"),
        "ci_low": lo,
        "ci_high": hi,
        "delta_vs_unlimited": (k - sum(base)) / n if n else 0.0,
        "mcnemar_p": mcnemar(base, corr),
        "thinking_tokens": sum(r["thinking_tokens"] for r in runs) / n if n else 0.0,
        "probe_tokens": sum(r["probe_tokens"] for r in runs) / n if n else 0.0,
        "saved_net": (base_t - net) / base_t if base_t else 0.0,
        "oracle_bound": bound / base_t if base_t else 0.0,
        "share_of_bound": (base_t - net) / bound if bound else float("nan"),
        "exits": sum(r["exited"] for r in runs),
    }


# -- ceilings: what no exit rule on these probes can beat ---------------------------------------
def hindsight_rule(rec: dict) -> Rule:
    """Exit at the first probe that gives the run's own final answer: a gate that knew the
    answer in advance. Its accuracy is the unlimited one and it pays every probe before that
    point, so its net saving bounds any rule that decides from these probes."""
    pred = rec.get("pred")
    return lambda ts: pred is not None and ts[-1]["finished"] and is_equiv(ts[-1]["answer"], pred)


START_GRID = (0, 100, 200, 300)
"""First-probe points (``min_thinking``) the ceilings try."""


def ceilings(recs: Sequence[dict], gaps: Sequence[int] | None = None, gates: Sequence[float] = (0.0,),
             starts: Sequence[int] = (0,)) -> list[dict]:
    """Two upper bounds on early exit over ``recs``, as policy rows:

    - ``ceiling: hindsight gate, gap G``: :func:`hindsight_rule` on the probe schedule with
      spacing G (each spacing of ``gaps``, by default those the rules are chosen from; these rows
      are read on the slice they bound, never chosen on it); each spacing's row is the best
      over the stream ``gates`` and first-probe ``starts`` given (it names the one);
    - ``ceiling: one probe, at the oracle point``: a schedule that probed exactly once, where
      the final answer first appears, paying that single probe: what a free signal that knew
      when to probe, plus one probe, could capture."""
    rows = []
    for g in GAP_GRID if gaps is None else gaps:
        best = None
        for s in gates:
            for m in starts:
                name = f"ceiling: hindsight gate, gap {g}" + (f", stream gate {s:g}" if s else "") + (f", first probe >= {m}" if m else "")
                row = _summary(recs, [replay(r, hindsight_rule(r), min_gap=g, gate=s, min_thinking=m) for r in recs], name)
                if best is None or row["saved_net"] > best["saved_net"] + 1e-12:
                    best = row
        rows.append(best)
    once = []
    for r in recs:  # the probes left: the one at the oracle point (none when no probe gave the final answer)
        at = oracle_point(r)
        only = [t for t in r.get("trials", []) if t[0] == at and at < r["thinking_tokens"]][:1]
        once.append(replay(dict(r, trials=only), lambda ts: True))
    rows.append(_summary(recs, once, "ceiling: one probe, at the oracle point"))
    return rows


# -- calibration -------------------------------------------------------------------------------
def probe_table(recs: Sequence[dict]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per probe: features, raw confidence, and whether its answer was right."""
    xs, conf, ys = [], [], []
    for r in recs:
        ts = trials_of(r)
        for i, t in enumerate(ts):
            xs.append(probe_features(ts[: i + 1]))
            conf.append(t["confidence"])
            ys.append(1.0 if is_equiv(t["answer"], r["gold"]) else 0.0)
    return np.array(xs, dtype=float).reshape(-1, 4), np.array(conf, dtype=float), np.array(ys, dtype=float)


def fit_calibration(recs: Sequence[dict], *, l2: float = 1e-2, source: str = "") -> Calibration:
    """Logistic regression of probe correctness on :func:`probe_features` (Newton steps with a
    small ridge, so a separable or tiny validation set still gives finite weights)."""
    x, _, y = probe_table(recs)
    if len(y) < 8 or y.min() == y.max():
        # too few probes, or all right / all wrong: the features cannot be weighed; the
        # smoothed rate of right probes is the best estimate (Laplace: never 0 or 1)
        rate = (y.sum() + 0.5) / (len(y) + 1.0)
        return Calibration((math.log(rate / (1 - rate)), 0.0, 0.0, 0.0), source=source + f" (constant: {len(y)} probes, {int(y.sum())} right)")
    w = np.zeros(4)
    reg = l2 * np.eye(4)
    reg[0, 0] = 0.0
    for _ in range(50):
        p = 1 / (1 + np.exp(-np.clip(x @ w, -60, 60)))
        g = x.T @ (p - y) + reg @ w
        h = (x * (p * (1 - p))[:, None]).T @ x + reg + 1e-9 * np.eye(4)
        step = np.linalg.solve(h, g)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return Calibration(tuple(float(v) for v in w), source=source)


def ece(prob: np.ndarray, y: np.ndarray, bins: int = 10) -> tuple[float, list[dict]]:
    """Expected calibration error over equal-width bins, and the bins (reliability diagram)."""
    rows, total = [], 0.0
    edges = np.linspace(0, 1, bins + 1)
    for i in range(bins):
        m = (prob >= edges[i]) & ((prob < edges[i + 1]) if i < bins - 1 else (prob <= 1.0))
        if not m.any():
            continue
        conf, acc = float(prob[m].mean()), float(y[m].mean())
        rows.append({"low": float(edges[i]), "high": float(edges[i + 1]), "n": int(m.sum()), "confidence": conf, "accuracy": acc})
        total += m.sum() / len(y) * abs(conf - acc)
    return float(total), rows


def calibration_report(recs: Sequence[dict], cal: Calibration) -> dict:
    x, conf, y = probe_table(recs)
    if not len(y):
        return {"probes": 0}
    calibrated = np.array([cal.probability_of(v) for v in x])
    raw_ece, raw_bins = ece(conf, y)
    cal_ece, cal_bins = ece(calibrated, y)
    return {"probes": int(len(y)), "right": float(y.mean()), "ece_raw": raw_ece, "ece_calibrated": cal_ece,
            "bins_raw": raw_bins, "bins_calibrated": cal_bins}


def plot_reliability(reports: dict[str, dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(reports), figsize=(4.2 * len(reports), 4.0), dpi=120, squeeze=False)
    for ax, (title, rep) in zip(axes[0], reports.items()):
        ax.plot([0, 1], [0, 1], ls=":", c="grey")
        for key, label, style in (("bins_raw", f"raw (ECE {rep.get('ece_raw', float('nan')):.3f})", "o-"),
                                  ("bins_calibrated", f"calibrated (ECE {rep.get('ece_calibrated', float('nan')):.3f})", "s-")):
            bins = rep.get(key, [])
            ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], style, label=label, ms=4)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("predicted probability the probe answer is right")
        ax.set_ylabel("observed accuracy")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# -- budgets: fixed, prompt-length and probe-signal adaptive, replayed ------------------------------
# A budget policy here stops thinking at a probe point and reads the answer the probe read there
# (the answer inducer, greedy): the same act as an early exit, forced by a token count instead of
# a confidence. The live policies are ThinkingBudget(cut="probe") (eval ``budget-probe:N``,
# ``adaptive-probe:S``) and SignalBudget (``signal:FIRST:THRESHOLD:LOW:HIGH``); under greedy
# decoding a live run of each gives exactly the thinking, probe and retracted tokens, answer and
# correctness replayed here (tests/test_budget_replay.py runs both on real models). The live
# ``budget-step`` policy is another cut (back to a paragraph break, closed with no inducer, the
# model answers freely) and is not what is replayed here.

def _outcome(rec: dict, t: dict, *, paid: int, retracted: int) -> dict:
    """Thinking stopped at probe ``t`` (its cost already in ``paid`` where that is due); the
    answer is the one the probe read."""
    return {"id": rec["id"], "thinking_tokens": t["at"], "probe_tokens": paid, "retracted_tokens": retracted,
            "pred": t["answer"], "correct": t["finished"] and is_equiv(t["answer"], rec["gold"]), "cut": True}


def cut_at(rec: dict, budget: float, *, paid: int = 0, after: int = -1) -> dict:
    """ThinkingBudget(cut="probe") with cap ``budget``, replayed. A trace whose thinking ends
    within the cap is the unlimited run. Otherwise thinking stops at the last probe point at or
    before the cap: the live run reaches the cap and takes back the tokens since that point
    (``retracted_tokens``), then pays its probe, unless the policy's own probe ``after`` already
    stands there. With no probe point within the cap thinking goes on to the first one (the cut
    is never inside the first step), and a trace with none at all is the unlimited run.
    ``paid``: probe tokens the policy already spent."""
    if rec["thinking_tokens"] <= budget:
        return {"id": rec["id"], "thinking_tokens": rec["thinking_tokens"], "probe_tokens": paid, "retracted_tokens": 0,
                "pred": rec.get("pred"), "correct": bool(rec["correct"]), "cut": False}
    trials = trials_of(rec)
    reach = [t for t in trials if t["at"] <= budget]
    if not reach:
        if not trials:
            return cut_at(rec, math.inf, paid=paid)
        t = trials[0]
        return _outcome(rec, t, paid=paid + (t["cost"] if t["at"] > after else 0), retracted=0)
    t = reach[-1]
    return _outcome(rec, t, paid=paid + (t["cost"] if t["at"] > after else 0), retracted=int(budget) - t["at"])


def fixed_budget(budget: float) -> Callable[[dict], dict]:
    return lambda rec: cut_at(rec, budget)


def signal_budget(first: int, threshold: float, low: float, high: float) -> Callable[[dict], dict]:
    """SignalBudget, replayed: probe once, at the first probe point at or past ``first``
    thinking tokens; if that probe's answer came out with confidence >= ``threshold`` the budget
    is ``low`` (``low <=`` that point stops right there), else ``high`` (inf: unlimited). Until
    that probe the budget is ``high``: a run with no probe point past ``first`` within ``high``
    is cut at ``high`` with no signal. What the model shows while thinking sets its own budget."""
    def run(rec: dict) -> dict:
        ts = [t for t in trials_of(rec) if t["at"] >= first]
        if not ts or ts[0]["at"] > high:
            return cut_at(rec, high)
        probe = ts[0]
        sure = probe["finished"] and probe["confidence"] >= threshold
        return cut_at(rec, max(low, probe["at"]) if sure else high, paid=probe["cost"], after=probe["at"])
    return run


def length_budget(pred: LengthPredictor, scale: float) -> Callable[[dict], dict]:
    """The prompt-length predictor's budget (scaled and rounded as AdaptiveBudget does), cut at a
    probe point."""
    return lambda rec: cut_at(rec, max(0, int(round(pred(int(rec.get("prompt_tokens", 0))) * scale))))


def budget_row(recs: Sequence[dict], policy: Callable[[dict], dict], name: str) -> dict:
    runs = [policy(r) for r in recs]
    n = len(runs)
    k = sum(r["correct"] for r in runs)
    base = [bool(r["correct"]) for r in recs]
    base_t = sum(r["thinking_tokens"] for r in recs)
    # what a live run decodes: the thinking kept, the probes, and the thinking taken back at a cut
    net = sum(r["thinking_tokens"] + r["probe_tokens"] + r["retracted_tokens"] for r in runs)
    lo, hi = wilson(k, n)
    return {"policy": name, "n": n, "accuracy": k / n if n else float("nan"), "ci_low": lo, "ci_high": hi,
            "delta_vs_unlimited": (k - sum(base)) / n if n else 0.0, "mcnemar_p": mcnemar(base, [r["correct"] for r in runs]),
            "net_tokens": net / n if n else 0.0, "saved_net": (base_t - net) / base_t if base_t else 0.0,
            "retracted_tokens": sum(r["retracted_tokens"] for r in runs) / n if n else 0.0,
            "cuts": sum(r["cut"] for r in runs), "correct_list": [bool(r["correct"]) for r in runs]}


def budget_grid(val: Sequence[dict]) -> list[int]:
    """Fixed budgets at quantiles of the validation problems' thinking lengths, and at fractions
    of their median (problems of one length still get budgets below it)."""
    lengths = np.array([r["thinking_tokens"] for r in val], dtype=float)
    if not len(lengths):
        return []
    med = float(np.median(lengths))
    values = {int(np.quantile(lengths, q)) for q in (0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9)}
    values |= {int(f * med) for f in (0.25, 0.5, 0.75)}
    return sorted(values - {0})


def first_probe_grid(val: Sequence[dict]) -> list[int]:
    """Where the adaptive policy takes its one reading: early fractions of the median length."""
    if not val:
        return []
    med = float(np.median([r["thinking_tokens"] for r in val]))
    return sorted({int(f * med) for f in (0.1, 0.2, 0.35)} - {0})


def compare_budgets(val: Sequence[dict], test: Sequence[dict]) -> dict:
    """Fixed budgets against adaptive ones at equal mean tokens. For each fixed budget, the
    adaptive setting (probe-signal family, and the prompt-length predictor) with the best
    validation accuracy whose validation mean net tokens are no more than the fixed budget's is
    chosen; both are then reported on test, with a paired test between them."""
    grid = budget_grid(val)
    if not grid or not test:
        return {"fixed": [], "pairs": []}
    firsts = first_probe_grid(val)
    adaptive: list[tuple[str, Callable[[dict], dict]]] = []
    for first in firsts:
        for thr in (0.5, 0.7, 0.9, 0.97):
            for low in [first] + [b for b in grid if b > first]:
                for high in [b for b in grid if b > low] + [math.inf]:
                    name = f"signal: probe at {first}, conf>={thr} -> {low}, else {'inf' if high == math.inf else int(high)}"
                    adaptive.append((name, signal_budget(first, thr, low, high)))
    pred = LengthPredictor.fit([int(r.get("prompt_tokens", 0)) for r in val], [r["thinking_tokens"] for r in val], quantile=0.5)
    for scale in (0.5, 0.75, 1.0, 1.25, 1.5, 2.0):
        adaptive.append((f"prompt-length x{scale}", length_budget(pred, scale)))
    val_rows = [(name, pol, budget_row(val, pol, name)) for name, pol in adaptive]
    fixed, pairs = [], []
    for b in grid:
        fv = budget_row(val, fixed_budget(b), f"fixed {b}")
        ft = budget_row(test, fixed_budget(b), f"fixed {b}")
        fixed.append({k: v for k, v in ft.items() if k != "correct_list"})
        ok = [(name, pol, row) for name, pol, row in val_rows if row["net_tokens"] <= fv["net_tokens"] + 1e-9]
        if not ok:
            continue
        name, pol, vrow = max(ok, key=lambda x: (x[2]["accuracy"], -x[2]["net_tokens"]))
        at = budget_row(test, pol, name)
        pairs.append({"fixed": b, "fixed_test": {k: v for k, v in ft.items() if k != "correct_list"},
                      "adaptive": name, "adaptive_val_accuracy": vrow["accuracy"], "fixed_val_accuracy": fv["accuracy"],
                      "adaptive_test": {k: v for k, v in at.items() if k != "correct_list"},
                      "delta": at["accuracy"] - ft["accuracy"],
                      "mcnemar_p": mcnemar(ft["correct_list"], at["correct_list"])})
    return {"fixed": fixed, "pairs": pairs}


def budget_markdown(b: dict) -> str:
    out = ["| fixed budget | acc (test) | mean net tokens | adaptive chosen on val at ≤ those tokens | acc (test) | mean net tokens | Δ acc | McNemar p |",
           "|---|---|---|---|---|---|---|---|"]
    for p in b.get("pairs", []):
        f, a = p["fixed_test"], p["adaptive_test"]
        out.append(f"| {p['fixed']} | {f['accuracy']:.3f} | {f['net_tokens']:.1f} | {p['adaptive']} | {a['accuracy']:.3f} | "
                   f"{a['net_tokens']:.1f} | {p['delta']:+.3f} | {p['mcnemar_p']:.3f} |")
    return "\n".join(out) + "\n"


# -- selection on validation, report on test -----------------------------------------------------
CONFIDENCE_GRID = (0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.99, 0.995, 0.999)
CONSISTENCY_GRID = (2, 3, 4)
CALIBRATED_GRID = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


GAP_GRID = (0, 48, 96, 192)
GATE_GRID = (0.0, 0.9, 0.95, 0.98, 0.99)
"""Stream-confidence gates tried where the journal records the stream (``EarlyExit(gate=...)``)."""


def has_stream(recs: Sequence[dict]) -> bool:
    """True when every probe of ``recs`` recorded the stream confidence before it."""
    ts = [t for r in recs for t in trials_of(r)]
    return bool(ts) and all(t["stream"] is not None for t in ts)


@dataclass
class Choice:
    family: str
    setting: float
    min_gap: int
    rule: Rule
    validation: dict
    gate: float = 0.0


def choose(val: Sequence[dict], family: str, grid: Sequence[float], make: Callable[[float], Rule], *, max_drop: float = 0.01,
           gaps: Sequence[int] = GAP_GRID, gates: Sequence[float] = (0.0,)) -> Choice | None:
    """The setting (and probe spacing and stream gate) that saves the most net tokens on validation while losing
    at most ``max_drop`` accuracy there (observed). Not probing at all is a candidate too: a
    setting whose probes cost more than its exits save (net saved <= 0) never beats it, and None
    then means "leave early exit off"."""
    best = None
    for v in grid:
        for gap in gaps:
            for gate in gates:
                row = summarize(val, make(v), f"{family}:{v}", min_gap=gap, gate=gate)
                if row["saved_net"] <= 1e-12 or row["delta_vs_unlimited"] < -max_drop - 1e-12:
                    continue
                if best is None or row["saved_net"] > best.validation["saved_net"] + 1e-12:
                    best = Choice(family, v, gap, make(v), row, gate)
    return best


def analyse(recs: Sequence[dict], n_val: int, *, label: str = "", validation: Sequence[dict] | None = None) -> dict:
    """Choose on ``validation`` (else the first ``n_val`` records), report on the rest."""
    if validation is not None:
        val, test = list(validation), list(recs)
    else:
        val, test = list(recs[:n_val]), list(recs[n_val:])
    cal = fit_calibration(val, source=f"{label}: {len(val)} validation problems")
    gates = GATE_GRID if has_stream(val) and has_stream(test) else (0.0,)
    choices = [
        ("early-exit", choose(val, "early-exit", CONFIDENCE_GRID, confidence_rule, gates=gates)),
        ("dynasor", choose(val, "dynasor", CONSISTENCY_GRID, lambda k: consistency_rule(int(k)), gates=gates)),
        ("calibrated", choose(val, "calibrated", CALIBRATED_GRID, lambda t: calibrated_rule(cal, t), gates=gates)),
    ]
    unlimited = summarize(test, None, "unlimited")
    rows = [unlimited]
    for family, c in choices:
        if c is None:
            # no setting saved tokens within the accuracy allowance on validation: the policy
            # chosen is "no probes", which is the unlimited run
            rows.append(dict(unlimited, policy=f"{family}: off, no setting saved tokens (val)"))
            continue
        gap = (f", gap {c.min_gap}" if c.min_gap else "") + (f", stream gate {c.gate:g}" if c.gate else "")
        row = summarize(test, c.rule, f"{c.family}:{c.setting:g}{gap} (val)", min_gap=c.min_gap, gate=c.gate)
        row["validation_saved_net"] = c.validation["saved_net"]
        row["validation_delta"] = c.validation["delta_vs_unlimited"]
        rows.append(row)
    curve = [summarize(test, confidence_rule(t), f"early-exit:{t}") for t in CONFIDENCE_GRID]
    budgets = compare_budgets(val, test)
    return {
        "label": label,
        "validation": len(val),
        "test": len(test),
        "calibration": cal.to_dict(),
        "calibration_test": calibration_report(test, cal),
        "rows": rows,
        "ceilings": ceilings(test, gates=gates, starts=START_GRID),
        "stream_gates": list(gates),
        "curve": curve,
        "budgets": budgets,
    }


def markdown(rows: Sequence[dict]) -> str:
    cols = ["policy", "n", "accuracy", "95% CI", "Δ acc", "McNemar p", "thinking", "probe", "net saved", "oracle bound", "share of bound"]
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        out.append("| " + " | ".join([
            r["policy"], str(r["n"]), f"{r['accuracy']:.3f}", f"{r['ci_low']:.3f}–{r['ci_high']:.3f}",
            f"{r['delta_vs_unlimited']:+.3f}", f"{r['mcnemar_p']:.3f}", f"{r['thinking_tokens']:.1f}", f"{r['probe_tokens']:.1f}",
            f"{r['saved_net']:+.1%}", f"{r['oracle_bound']:.1%}",
            "—" if math.isnan(r["share_of_bound"]) else f"{r['share_of_bound']:.1%}",
        ]) + " |")
    return "\n".join(out) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="eval --out folders of oracle runs")
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--validation", type=int, help="the first N problems of each run choose settings and fit the calibration")
    group.add_argument("--validation-run", type=Path, help="an oracle run on a validation split of the same task (all of each RUN is then test)")
    group.add_argument("--alternate", action="store_true", help="even-numbered problems of each run validate, odd ones test (runs ordered by level)")
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    results, md, reports = [], [], {}
    val = load_records(a.validation_run) if a.validation_run else None
    for run in a.runs:
        recs = load_records(run)
        if a.alternate:
            res = analyse(recs[1::2], 0, label=run.name + " (odd problems; even ones validate)", validation=recs[0::2])
        else:
            if val is None and len(recs) <= a.validation:
                raise SystemExit(f"error: {run} has {len(recs)} oracle records; need more than --validation {a.validation}")
            res = analyse(recs, a.validation or 0, label=run.name, validation=val)
        results.append(res)
        reports[res["label"]] = res["calibration_test"]
        md.append(f"## {res['label']} (validation {res['validation']}, test {res['test']})\n\n" + markdown(res["rows"]))
        md.append("Ceilings on the test slice (upper bounds, not policies: no exit rule deciding from these probes "
                  "nets more than the hindsight gate on its schedule; the one-probe row needs a free signal that knows "
                  "when to probe):\n\n" + markdown(res["ceilings"]))
        if res["budgets"]["pairs"]:
            md.append("Budgets at equal mean tokens (cut at a probe point, answer read by the probe: the live "
                      "budget-probe and signal policies; net tokens include those taken back at a cut; test slice):\n\n"
                      + budget_markdown(res["budgets"]))
        ct = res["calibration_test"]
        if ct.get("probes"):
            md.append(f"Probe calibration on the test slice: {ct['probes']} probes, {ct['right']:.1%} right; "
                      f"ECE raw confidence {ct['ece_raw']:.3f}, calibrated {ct['ece_calibrated']:.3f}.\n")
    (a.out / "offline.json").write_text(json.dumps(results, indent=2))
    (a.out / "offline.md").write_text("\n".join(md))
    plot_reliability(reports, a.out / "reliability.png")
    print("\n".join(md))


if __name__ == "__main__":
    main()
