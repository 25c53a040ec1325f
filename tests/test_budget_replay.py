"""The budgets the offline replay evaluates are live policies: run the oracle on a few problems with
a real model, replay fixed and probe-signal budgets from its records (benchmarks/offline.py), run
the same policies live through the eval harness, and every figure must agree, problem by problem.

Under greedy decoding a live ``budget-probe:B`` run is the oracle's trace up to the last probe
point at or before B, then the probe's answer; ``signal:F:T:L:H`` adds one probe whose confidence
sets the cap. Two real models: SmolLM2-135M prompted to reason (``reasoning_prompt="r1"``), whose
probe answers are noisy and whose confidences spread, and the bundled tiny-r1 (a native reasoning
template, right answers, one probe point per problem)."""

from __future__ import annotations

import math

import pytest

from edge.benchmarks import harness, offline
from edge.benchmarks.tasks import MATH_SUFFIX, Item, load_task
from edge.params import SamplingParams
from edge.runtime import Runtime

FIGURES = ("thinking_tokens", "probe_tokens", "retracted_tokens", "correct")


def replayed(policy: harness.Policy):
    """The offline replay of an eval policy."""
    if policy.family == "budget-probe":
        return offline.fixed_budget(policy.value)
    if policy.family == "signal":
        s = policy.spec.signal
        return offline.signal_budget(s["first"], s["threshold"], s["low"], math.inf if s["high"] is None else s["high"])
    raise AssertionError(policy.name)


def live_equals_replay(rt, items, oracle, policies, params) -> list[tuple[harness.Policy, dict]]:
    """Run ``policies`` live (the eval harness) and check each record against the replay of the
    oracle record of the same problem; the replayed outcomes."""
    by_id = {r["id"]: r for r in oracle}
    live = harness.evaluate(rt, items, policies, params)
    out = []
    for policy in policies:
        replay = replayed(policy)
        for rec in (r for r in live if r["policy"] == policy.name):
            orec = by_id[rec["id"]]
            want = replay(orec)
            assert {k: rec[k] for k in FIGURES} == {k: want[k] for k in FIGURES}, (policy.name, rec["id"], orec["trials"], rec)
            stop = next((t for t in offline.trials_of(orec) if t["at"] == want["thinking_tokens"]), None)
            if not want["cut"] or stop["finished"]:
                # the answer: the oracle's own, or the one its probe read where thinking stopped
                assert rec["pred"] == want["pred"], (policy.name, rec["id"], rec["pred"], want["pred"])
            assert rec["exit_reason"] == ("budget" if want["cut"] else orec["exit_reason"]), (policy.name, rec)
            if not want["cut"]:  # the unlimited run itself, to its last answer token
                assert (rec["answer_tokens"], rec["injected_tokens"]) == (orec["answer_tokens"], 0), (policy.name, rec)
            out.append((policy, want))
    return out


def fixed_cases(outcomes) -> set[str]:
    """The edge cases of ``budget-probe`` the outcomes went through."""
    seen = set()
    for policy, w in outcomes:
        if policy.family != "budget-probe":
            continue
        if not w["cut"]:
            seen.add("ends within")
        elif w["retracted_tokens"]:
            seen.add("taken back")
        elif w["thinking_tokens"] > policy.value:
            seen.add("on to the first point")
        else:
            seen.add("exactly on a point")
    return seen


ALL_CASES = {"ends within", "taken back", "on to the first point", "exactly on a point"}


def run_case(rt, items, params, make_policies) -> tuple[list[dict], list[tuple[harness.Policy, dict]]]:
    oracle = harness.evaluate(rt, items, harness.parse_policies("oracle"), params)
    assert all(r["trials"] for r in oracle)  # every problem has probe points to cut at
    policies = [p for text in make_policies(oracle) for p in harness.parse_policies(text)]
    return oracle, live_equals_replay(rt, items, oracle, policies, params)


@pytest.fixture(scope="module")
def smollm2_r1(smollm2):
    rt = Runtime(str(smollm2), n_ctx=1024, threads=1, reasoning_prompt="r1")
    yield rt
    rt.close()


SMOL_ITEMS = [Item("add", "What is 7 + 5?" + MATH_SUFFIX, "12"),
              Item("apples", "Tom has 3 apples and buys 4 more. How many apples does he have now?" + MATH_SUFFIX, "7"),
              Item("times", "What is 6 times 7?" + MATH_SUFFIX, "42")]


def test_smollm2_prompted_budgets_live_equal_their_replay(smollm2_r1):
    """Budgets chosen from the oracle's own probe points so that every edge case is met: a cap
    before any probe point (thinking goes on to the first), on a probe point (nothing taken
    back), past one (the step since is taken back), a run that ends inside the cap; and signal
    budgets whose one probe is sure on some problems and not on others."""
    params = SamplingParams(temperature=0, top_p=1.0, max_tokens=96)

    def policies(oracle):
        firsts = [r["trials"][0] for r in oracle]
        second = next(r["trials"][1][0] for r in oracle if len(r["trials"]) > 1)
        ended = [r["thinking_tokens"] for r in oracle if r["thinking_tokens"] < params.max_tokens]
        budgets = sorted({min(t[0] for t in firsts) - 1, second, second + 3, *ended[:1]})
        confs = sorted(t[2] for t in firsts)
        mid = (confs[0] + confs[-1]) / 2  # sure on some problems, not on the others
        return ["budget-probe:" + ",".join(map(str, budgets)),
                f"signal:1:{mid:.6f}:0:{second + 3}", f"signal:{second}:{mid:.6f}:{second + 10}:inf",
                # the first point past `first` lies beyond `high`: cut at `high` before any signal
                f"signal:{second}:{mid:.6f}:{second - 10}:{second - 1}"]

    oracle, outcomes = run_case(smollm2_r1, SMOL_ITEMS, params, policies)
    assert ALL_CASES <= fixed_cases(outcomes)
    first_at = {r["id"]: r["trials"][0][0] for r in oracle}
    signal = [(p, w) for p, w in outcomes if p.family == "signal" and p.spec.signal["first"] == 1]
    stops = [w["thinking_tokens"] == first_at[w["id"]] for _, w in signal]
    assert any(stops) and not all(stops)  # sure: stopped at its probe; not sure: went on to high


def test_tiny_r1_budgets_live_equal_their_replay(tiny_runtime):
    """tiny-r1 answers right, so correctness carries information here: a cap short of its probe
    point goes on to it, on it keeps it, one past takes the token back, one short of the end (the
    close sampled at the cap) cuts too, and the full length is the unlimited run."""
    params = SamplingParams(temperature=0, top_p=1.0, max_tokens=600)
    tasks = load_task("tiny-r1")
    items = [i for i in tasks if i.level == 8][:2] + [i for i in tasks if i.level == 4][:1] + load_task("tiny-r1-stress")[:1]

    def policies(oracle):
        at, end = oracle[0]["trials"][0][0], oracle[0]["thinking_tokens"]
        return ["budget-probe:" + ",".join(map(str, sorted({at - 3, at, at + 1, end - 1, end}))),
                "signal:1:0.5:1:inf", f"signal:1:1.0:1:{at + 1}"]

    oracle, outcomes = run_case(tiny_runtime, items, params, policies)
    assert [r["correct"] for r in oracle] == [True, True, True, False]  # the stress problem is beyond it
    assert ALL_CASES <= fixed_cases(outcomes)
    assert {w["correct"] for p, w in outcomes} == {True, False}
