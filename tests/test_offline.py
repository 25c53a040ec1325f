"""Offline early exit: one oracle run replays any exit rule exactly; statistics and calibration."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edge.benchmarks import harness, offline
from edge.benchmarks.tasks import load_task
from edge.control.early_exit import Calibration, EarlyExit
from edge.errors import ConfigError
from edge.params import SamplingParams
from edge.runtime import Runtime, collect

GREEDY = SamplingParams(temperature=0, top_p=1.0, max_tokens=600)


def test_replay_of_the_oracle_run_equals_live_early_exit(tiny_runtime):
    """Under greedy decoding an exit at probe i is the oracle trace up to probe i plus the probe's
    answer: the replay gives the live run's thinking tokens, probe tokens and correctness."""
    items = [i for i in load_task("tiny-r1") if i.level in (2, 5, 8)][::25][:6] + load_task("tiny-r1-stress")[::40][:2]
    oracle = harness.evaluate(tiny_runtime, items, harness.parse_policies("oracle"), GREEDY)
    cal = Calibration((-2.0, 0.8, 1.5, 1.0))
    rules = [(EarlyExit(threshold=t), offline.confidence_rule(t)) for t in (0.5, 0.9, 0.999)]
    rules.append((EarlyExit(mode="consistency", k=2), offline.consistency_rule(2)))
    rules.append((EarlyExit(mode="calibrated", calibration=cal, threshold=0.7), offline.calibrated_rule(cal, 0.7)))
    exits = 0
    for live_ctl, rule in rules:
        for item, rec in zip(items, oracle):
            reply = collect(tiny_runtime.chat([{"role": "user", "content": item.prompt}], GREEDY, controllers=[live_ctl]))
            sim = offline.replay(rec, rule)
            assert sim["thinking_tokens"] == reply.stats.thinking_tokens, (item.id, live_ctl)
            assert sim["probe_tokens"] == reply.stats.probe_tokens
            live_correct = harness.score(reply.answer or reply.reasoning[-200:], item)[1]
            assert sim["correct"] == live_correct, (item.id, sim, reply.answer)
            exits += sim["exited"]
    assert exits > 0


def test_stream_gated_replay_equals_live_on_a_real_model(smollm2):
    """SmolLM2, prompted to reason, on GSM8K: the oracle records the stream confidence before each
    probe; live early exit with a stream gate (and a probe spacing) probes at exactly the points
    the replay keeps, and exits at the same token."""
    items = load_task("gsm8k")[:4]
    params = SamplingParams(temperature=0, top_p=1.0, max_tokens=192)
    with Runtime(str(smollm2), n_ctx=1024, threads=1, reasoning_prompt="step") as rt:
        oracle = harness.evaluate(rt, items, harness.parse_policies("oracle"), params)
        streams = sorted(t[6] for r in oracle for t in r["trials"])
        assert len(streams) >= 5 and all(0.0 < x <= 1.0 for x in streams)
        assert all(offline.has_stream([r]) for r in oracle if r["trials"])
        # a gate between two recorded values (one equal to a recorded value, rounded to 6 places,
        # would be a tie that the live, unrounded confidence may fall either side of)
        mid = len(streams) // 2
        lo, hi = next((streams[i], streams[i + 1]) for i in range(mid, len(streams) - 1) if streams[i + 1] - streams[i] > 1e-5)
        gates = ((lo + hi) / 2,)
        bites = 0
        for gate in gates:
            for threshold, gap in ((0.999, 24),):
                for item, rec in zip(items, oracle):
                    live = EarlyExit(threshold=threshold, gate=gate, min_gap=gap)
                    reply = collect(rt.chat([{"role": "user", "content": item.prompt}], params, controllers=[live]))
                    sim = offline.replay(rec, offline.confidence_rule(threshold), min_gap=gap, gate=gate)
                    assert (sim["thinking_tokens"], sim["probe_tokens"]) == (reply.stats.thinking_tokens, reply.stats.probe_tokens), \
                        (item.id, gate, threshold, gap)
                    assert sim["exited"] == (reply.stats.exit_reason == "early_exit")
                    bites += sim["probe_tokens"] < offline.replay(rec, offline.confidence_rule(threshold), min_gap=gap)["probe_tokens"]
        assert bites > 0  # the gate skipped probes somewhere
    with pytest.raises(ValueError, match="no stream"):
        offline.replay(_rec(0, [[40, "7", 0.9, 6, True]], 100), offline.confidence_rule(0.5), gate=0.5)


def test_statistics():
    lo, hi = offline.wilson(8, 10)
    assert (round(lo, 3), round(hi, 3)) == (0.490, 0.943)
    assert offline.wilson(0, 50)[0] == 0.0 and 0.06 < offline.wilson(0, 50)[1] < 0.08
    base = [True] * 10
    assert offline.mcnemar(base, [False] * 5 + [True] * 5) == pytest.approx(2 / 32)  # 5 discordant, all one way
    assert offline.mcnemar(base, base) == 1.0
    assert offline.mcnemar([True, False] * 5, [False, True] * 5) == 1.0  # 5 each way


def synthetic_runs(n: int, seed: int) -> list[dict]:
    """Oracle-like records whose probe correctness follows a known logistic model of confidence."""
    rng = np.random.default_rng(seed)
    recs = []
    for i in range(n):
        trials, at = [], 0
        for _ in range(rng.integers(1, 6)):
            at += int(rng.integers(10, 40))
            z = rng.normal(0, 2)
            conf = 1 / (1 + math.exp(-z))
            right = rng.random() < 1 / (1 + math.exp(-(1.5 * z - 1.0)))  # over-confident: true logit 1.5z - 1
            trials.append([at, "7" if right else str(rng.integers(100)), conf, 5, True])
        recs.append({"id": f"s{i}", "policy": "oracle", "gold": "7", "pred": "7", "correct": True,
                     "thinking_tokens": at + 20, "trials": trials})
    return recs


def test_calibration_recovers_a_known_model_and_lowers_ece():
    recs = synthetic_runs(600, 0)
    cal = offline.fit_calibration(recs)
    assert cal.weights[1] == pytest.approx(1.5, abs=0.25) and cal.weights[0] == pytest.approx(-1.0, abs=0.35)
    rep = offline.calibration_report(synthetic_runs(400, 1), cal)
    assert rep["ece_calibrated"] < 0.05 < rep["ece_raw"]
    assert Calibration.from_dict(cal.to_dict()) == Calibration(cal.weights, cal.source)
    with pytest.raises(ConfigError):
        Calibration.from_dict({"weights": [1, 2]})
    with pytest.raises(ConfigError):
        EarlyExit(mode="calibrated")


def test_one_class_validation_gives_a_constant_rate():
    recs = synthetic_runs(5, 2)
    for r in recs:
        r["trials"] = [[t[0], "7", t[2], t[3], t[4]] for t in r["trials"]]
    cal = offline.fit_calibration(recs)
    assert cal.weights[1:] == (0.0, 0.0, 0.0) and 0.9 < 1 / (1 + math.exp(-cal.weights[0])) < 1


def test_analysis_chooses_on_validation_and_reports_on_test(tmp_path):
    recs = synthetic_runs(120, 3)
    res = offline.analyse(recs, 60, label="synthetic")
    assert res["validation"] == 60 and res["test"] == 60
    names = [r["policy"] for r in res["rows"]]
    assert names[0] == "unlimited" and all(n.endswith("(val)") for n in names[1:])
    md = offline.markdown(res["rows"])
    assert md.count("\n") == len(res["rows"]) + 2


def test_replay_equals_live_on_a_multi_step_scripted_trace():
    """tiny-r1 has one probe point per problem; a scripted model with many steps and drifting
    trial answers exercises agreement streaks and the calibrated gate."""
    from tests.scripted import ScriptedBackend

    from edge.benchmarks.tasks import Item

    tpl = "{% for m in messages %}{{ m['content'] }}{% endfor %}<think>\n"
    script = [p for i in range(8) for p in (f"Step {i}.", "\n\n")] + ["</think>"]
    answers = {0: ("3", 0.5), 1: ("5", 0.8), 2: ("7", 0.7), 3: ("7", 0.9), 4: ("7", 0.6), 5: ("8", 0.97), 6: ("7", 0.99)}

    def trial(n):  # the answer a probe gives after n script tokens
        return answers.get(n // 2 - 1, ("7", 0.995))

    rt = Runtime(backend=ScriptedBackend(script, "\n\n**Final Answer**\n\\boxed{7}", trial=trial, chat_template=tpl))
    item = Item("s", "What is x?", "7")
    (rec,) = harness.evaluate(rt, [item], harness.parse_policies("oracle"), GREEDY)
    assert len(rec["trials"]) >= 6
    cal = Calibration((-3.0, 0.5, 1.2, 0.5))
    cases = [(EarlyExit(mode="consistency", k=k), offline.consistency_rule(k)) for k in (2, 3, 4)]
    cases += [(EarlyExit(threshold=t), offline.confidence_rule(t)) for t in (0.75, 0.95)]
    cases += [(EarlyExit(mode="calibrated", calibration=cal, threshold=t), offline.calibrated_rule(cal, t)) for t in (0.3, 0.6)]
    cases += [(EarlyExit(mode="consistency", k=2, min_gap=gap), offline.consistency_rule(2)) for gap in (4, 6)]
    seen = set()
    for ctl, rule in cases:
        reply = collect(rt.chat([{"role": "user", "content": item.prompt}], GREEDY, controllers=[ctl]))
        sim = offline.replay(rec, rule, min_gap=ctl.min_gap)
        assert (sim["thinking_tokens"], sim["probe_tokens"]) == (reply.stats.thinking_tokens, reply.stats.probe_tokens), ctl
        assert sim["pred"] == (reply.answer.split("{")[-1].rstrip("}") if sim["exited"] else sim["pred"])
        seen.add(sim["thinking_tokens"])
    assert len(seen) >= 4  # the rules exit at different points


def test_probe_features():
    from edge.control.early_exit import probe_features

    t = lambda a, c=0.5, f=True: {"answer": a, "confidence": c, "finished": f}  # noqa: E731
    assert probe_features([t("7", 0.5)]) == [1.0, 0.0, 0.0, 1.0]
    assert probe_features([t("3"), t("7"), t("7"), t("7", f=False)])[2:] == [2.0, 0.0]
    assert probe_features([t("7")] * 9)[2] == 3.0  # capped
    assert probe_features([t(""), t("")])[2] == 0.0  # an empty answer agrees with nothing
    assert probe_features([t("7", 1.0)])[1] == pytest.approx(math.log(1e6), rel=1e-3)


def _rec(i, trials, thinking, correct=True, prompt=50):
    return {"id": f"b{i}", "policy": "oracle", "gold": "7", "pred": "7" if correct else "1", "correct": correct,
            "thinking_tokens": thinking, "prompt_tokens": prompt, "trials": trials}


def test_fixed_budget_cuts_at_the_last_probe_point_in_reach():
    rec = _rec(0, [[40, "3", 0.4, 6, True], [90, "7", 0.9, 6, True], [150, "7", 0.95, 6, True]], 200)
    assert offline.cut_at(rec, 250) == {"id": "b0", "thinking_tokens": 200, "probe_tokens": 0, "retracted_tokens": 0, "pred": "7",
                                        "correct": True, "cut": False}
    r = offline.cut_at(rec, 120)  # the last point in reach is 90 (answer 7): one probe paid, 30 tokens taken back
    assert (r["thinking_tokens"], r["probe_tokens"], r["retracted_tokens"], r["pred"], r["correct"], r["cut"]) == (90, 6, 30, "7", True, True)
    r = offline.cut_at(rec, 60)
    assert (r["thinking_tokens"], r["retracted_tokens"], r["pred"], r["correct"]) == (40, 20, "3", False)
    r = offline.cut_at(rec, 90)  # the cap lands on a probe point: nothing taken back
    assert (r["thinking_tokens"], r["retracted_tokens"], r["correct"]) == (90, 0, True)
    r = offline.cut_at(rec, 30)  # no probe point in reach: thinking goes on to the first one
    assert (r["thinking_tokens"], r["probe_tokens"], r["retracted_tokens"], r["correct"]) == (40, 6, 0, False)
    no_points = _rec(2, [], 200)  # no probe point at all: the unlimited run
    assert offline.cut_at(no_points, 30) == offline.cut_at(no_points, math.inf)
    assert offline.cut_at(no_points, 30)["thinking_tokens"] == 200
    unfinished = _rec(1, [[90, "7", 0.9, 6, False]], 200)
    assert offline.cut_at(unfinished, 100)["correct"] is False


def test_signal_budget_stops_when_the_first_probe_is_sure():
    rec = _rec(0, [[40, "7", 0.98, 6, True], [90, "7", 0.9, 6, True], [150, "7", 0.95, 6, True]], 200)
    sure = offline.signal_budget(30, 0.9, 30, 1000)(rec)
    assert (sure["thinking_tokens"], sure["probe_tokens"], sure["correct"]) == (40, 6, True)
    unsure = offline.signal_budget(30, 0.99, 30, 120)(rec)  # not sure: budget 120 -> cut at 90, two probes paid
    assert (unsure["thinking_tokens"], unsure["probe_tokens"]) == (90, 12)
    unlimited = offline.signal_budget(30, 0.99, 30, math.inf)(rec)
    assert (unlimited["thinking_tokens"], unlimited["probe_tokens"], unlimited["cut"]) == (200, 6, False)
    short = _rec(1, [[20, "7", 0.99, 6, True]], 25)
    assert offline.signal_budget(30, 0.5, 30, 100)(short)["probe_tokens"] == 0  # finished before the first probe
    # the first probe point past `first` lies beyond `high`: the run is cut at `high` before any
    # signal (a live run cannot know what that probe will say), at the last point in reach
    late = _rec(3, [[20, "3", 0.2, 6, True], [150, "7", 0.99, 6, True]], 200)
    r = offline.signal_budget(100, 0.9, 100, 120)(late)
    assert (r["thinking_tokens"], r["probe_tokens"], r["retracted_tokens"], r["correct"]) == (20, 6, 100, False)
    # no probe point past `first`: no signal, the budget is `high`
    early = _rec(4, [[20, "3", 0.2, 6, True], [60, "7", 0.99, 6, True]], 200)
    r = offline.signal_budget(100, 0.9, 100, 120)(early)
    assert (r["thinking_tokens"], r["probe_tokens"], r["correct"]) == (60, 6, True)


def test_budget_comparison_finds_a_signal_that_pays_and_matches_tokens():
    """Half the problems are easy (the first probe is right and sure) and half hard (the first probe
    is wrong and unsure, the answer comes late): a budget set by the first probe beats every fixed
    budget at the same mean tokens, and the comparison never pairs a dearer adaptive setting."""
    rng = np.random.default_rng(0)
    recs = []
    for i in range(200):
        easy = i % 2 == 0
        first = [60, "7" if easy else str(rng.integers(10, 99)), 0.99 if easy else 0.3, 6, True]
        late = [[int(a), "7" if a > 400 else str(rng.integers(10, 99)), 0.6, 6, True] for a in (150, 250, 350, 450)]
        recs.append(_rec(i, [first] + late, 500))
    res = offline.compare_budgets(recs[:100], recs[100:])
    assert res["fixed"] and res["pairs"]
    for p in res["pairs"]:
        assert p["adaptive_test"]["net_tokens"] <= p["fixed_test"]["net_tokens"] * 1.05 + 1
    best = max(res["pairs"], key=lambda p: p["delta"])
    assert best["delta"] >= 0.4 and best["mcnemar_p"] < 0.01 and best["adaptive"].startswith("signal")
    assert "fixed budget" in offline.budget_markdown(res)


def test_no_probes_is_chosen_when_probing_never_pays():
    """Every probe is wrong until the trace ends: any exit rule costs accuracy or saves nothing, so
    the chooser leaves early exit off instead of picking the least bad setting."""
    recs = [_rec(i, [[a, "1", 0.2, 30, True] for a in (50, 100, 150)], 160) for i in range(40)]
    res = offline.analyse(recs, 20, label="no-pay")
    off = [r for r in res["rows"] if ": off" in r["policy"]]
    assert len(off) == 3 and all(r["saved_net"] == 0 and r["probe_tokens"] == 0 for r in off)


def test_ceilings_bound_every_rule_on_the_same_probes():
    """The hindsight gate exits at the first probe with the run's own final answer and pays every
    probe before it; the one-probe ceiling pays only that probe. Worked by hand on two records."""
    recs = [
        # final answer 7 first given at 150: probes at 40 and 90 are paid before it
        _rec(0, [[40, "3", 0.99, 6, True], [90, "5", 0.9, 6, True], [150, "7", 0.95, 6, True]], 200),
        # wrong run (final answer 1), first given at 60 of 100
        _rec(1, [[60, "1", 0.5, 4, True]], 100, correct=False),
    ]
    rows = {r["policy"]: r for r in offline.ceilings(recs, gaps=(0, 100))}
    every = rows["ceiling: hindsight gate, gap 0"]
    assert every["accuracy"] == 0.5 and every["delta_vs_unlimited"] == 0
    assert every["thinking_tokens"] == (150 + 60) / 2 and every["probe_tokens"] == (18 + 4) / 2
    # base 300 thinking tokens; bound (200-150)+(100-60) = 90; net (300 - 210 - 22) / 300
    assert every["saved_net"] == pytest.approx(68 / 300) and every["share_of_bound"] == pytest.approx(68 / 90)
    spaced = rows["ceiling: hindsight gate, gap 100"]  # probes at 40 and 150 for the first record
    assert spaced["probe_tokens"] == (12 + 4) / 2 and spaced["thinking_tokens"] == (150 + 60) / 2
    late = {r["policy"]: r for r in offline.ceilings(recs, gaps=(0,), starts=(100,))}
    first = late["ceiling: hindsight gate, gap 0, first probe >= 100"]  # record 0 pays only the probe at 150;
    assert first["probe_tokens"] == (6 + 0) / 2  # record 1's only probe (60) is skipped: it thinks to the end
    assert first["thinking_tokens"] == (150 + 100) / 2 and first["saved_net"] == pytest.approx((50 - 6) / 300)
    both = offline.ceilings(recs, gaps=(0,), starts=(0, 100))  # the best of the two starts: 0 here
    assert both[0]["policy"] == "ceiling: hindsight gate, gap 0" and both[0]["saved_net"] == every["saved_net"]
    once = rows["ceiling: one probe, at the oracle point"]
    assert once["probe_tokens"] == (6 + 4) / 2 and once["saved_net"] == pytest.approx((90 - 10) / 300)
    # no rule replayed on these probes saves more, net, than the hindsight gate on the same schedule
    for t in (0.0, 0.5, 0.9, 0.95):
        assert offline.summarize(recs, offline.confidence_rule(t), "c")["saved_net"] <= every["saved_net"] + 1e-12 or \
            offline.summarize(recs, offline.confidence_rule(t), "c")["accuracy"] < every["accuracy"]
    # a probe that never gives the final answer: the run is unlimited in every ceiling
    never = _rec(2, [[50, "3", 0.9, 6, True]], 80)
    for row in offline.ceilings([never], gaps=(0,)):
        assert row["thinking_tokens"] == 80 and row["saved_net"] <= 0
    assert "ceiling: one probe" in offline.markdown(offline.ceilings(recs, gaps=(0,)))
