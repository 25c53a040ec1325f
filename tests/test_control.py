"""Controllers on a scripted backend: budgets, "Wait" extension, early exit, composition."""

from __future__ import annotations

import math

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from edge.control.budget import AdaptiveBudget, LengthPredictor, ThinkingBudget, effort_budget
from edge.control.early_exit import EarlyExit, boxed_answer, is_boundary
from edge.errors import ConfigError
from edge.events import (
    AnswerBudgetExhausted,
    AnswerDelta,
    BudgetChosen,
    BudgetExhausted,
    EarlyExited,
    Injected,
    Probe,
    Retracted,
    ThinkingClosedAtBudget,
    ThinkingUnclosed,
    WaitInjected,
)
from edge.generate import generate
from edge.params import SamplingParams
from edge.runtime import collect
from tests.scripted import ScriptedBackend

SCRIPT = ["Step one.", "\n\n", "Step two.", "\n\n", "So x = 7.", "\n\n", "Wait", ", let me check.", " Yes, x = 7.", "\n", "</think>"]
ANSWER = "\n\n**Final Answer**\n\\boxed{7}"


class EndsWhileThinking(ScriptedBackend):
    """The script, except that the model ends (EOS) after its fourth thinking token."""

    def _next(self):
        if "</think>" not in self.text() and sum(self.script_base <= t < self.eos_id for t in self.tokens) == 4:
            return self.eos_id, 0.99
        return super()._next()


GREEDY = SamplingParams(temperature=0, max_tokens=200)
INDUCER = "</think>\n\n**Final Answer**\n\\boxed{"


def confident_after(n0, answer="7", p_hi=0.99, wrong="3", p_lo=0.3):
    return lambda n: (answer, p_hi) if n >= n0 else (wrong, p_lo)


def run(backend, controllers=(), params=GREEDY):
    events = list(generate(backend, backend.tokenize("Q?"), params, start_in_thinking=True, controllers=controllers))
    return collect(iter(events)), events


def controls(events, kind):
    return [e for e in events if isinstance(e, kind)]


def backend(**kw):
    return ScriptedBackend(SCRIPT, ANSWER, **kw)


def test_unlimited_run_follows_the_script():
    r, _ = run(backend())
    assert r.stats.thinking_tokens == len(SCRIPT)
    assert r.answer == ANSWER.strip()
    assert "So x = 7." in r.reasoning and "</think>" not in r.reasoning
    assert r.stats.exit_reason == "eos" and r.stats.probe_tokens == 0


@pytest.mark.parametrize("cap", range(0, len(SCRIPT) + 2))
def test_hard_budget_is_never_exceeded_and_an_answer_follows(cap):
    r, events = run(backend(), [ThinkingBudget(max_thinking=cap)])
    assert r.stats.thinking_tokens <= cap
    assert "\\boxed{" in r.answer  # an answer always follows
    assert r.answer.endswith("\\boxed{7}") == (cap >= len(SCRIPT))
    if cap < len(SCRIPT):
        assert r.stats.thinking_tokens == cap
        assert controls(events, BudgetExhausted) or controls(events, ThinkingClosedAtBudget)
        assert r.stats.injected_tokens > 0


def test_budget_message_is_injected_into_the_thinking():
    r, _ = run(backend(), [ThinkingBudget(max_thinking=3, end_message="\nTime is up.\n")])
    assert r.reasoning.endswith("Time is up.")
    assert r.stats.exit_reason == "budget"


def test_thinking_off_closes_before_the_first_token():
    r, _ = run(backend(), [ThinkingBudget(max_thinking=effort_budget("off"))])
    assert r.stats.thinking_tokens == 0 and r.reasoning == "" and r.answer.endswith("\\boxed{?}")


def test_answer_budget_caps_the_answer():
    r, events = run(backend(), [ThinkingBudget(max_thinking=2, answer_budget=4)])
    assert r.stats.answer_tokens == 4
    assert controls(events, AnswerBudgetExhausted)


def test_budget_does_not_split_a_utf8_character():
    script = ["Step", " ", "\xe6\x95".encode("latin-1"), b"\xb0", " ok", "</think>"]
    b = ScriptedBackend(script, ANSWER)
    r, events = run(b, [ThinkingBudget(max_thinking=3, end_message="\nStop.\n")])
    assert "\ufffd" not in r.reasoning
    assert r.stats.thinking_tokens == 2  # the half character was taken back
    assert controls(events, BudgetExhausted)[0].thinking_tokens == 2
    r2, _ = run(ScriptedBackend(script, ANSWER), [ThinkingBudget(max_thinking=4)])
    assert "数" in r2.reasoning and r2.stats.thinking_tokens == 4


def test_min_thinking_replaces_the_close_with_wait():
    r, events = run(backend(), [ThinkingBudget(min_thinking=100, max_waits=2, wait_text="\nWait")])
    waits = controls(events, WaitInjected)
    assert len(waits) == 2
    assert r.reasoning.count("Wait") == 1 + 2 and r.answer.endswith("\\boxed{7}")


def test_early_exit_on_confidence_saves_tokens_and_reuses_the_probe_answer():
    b = backend(trial=confident_after(5))
    r, events = run(b, [EarlyExit(threshold=0.9, inducer=INDUCER)])
    probes = controls(events, Probe)
    assert [p.at for p in probes] == [2, 4, 6]
    assert [p.answer for p in probes] == ["3", "3", "7"]
    assert r.stats.thinking_tokens == 6 < len(SCRIPT)
    assert r.stats.exit_reason == "early_exit"
    assert r.answer.endswith("\\boxed{7}") and "Wait" not in r.reasoning
    assert r.stats.probes == 3 and r.stats.probe_tokens == sum(p.cost for p in probes)


def test_probes_do_not_change_the_main_stream():
    plain, _ = run(backend())
    b = backend(trial=confident_after(100))
    probed, events = run(b, [EarlyExit(threshold=0.5, inducer=INDUCER, record_only=True)])
    assert [p.at for p in controls(events, Probe)] == [2, 4, 6]
    assert probed.reasoning == plain.reasoning and probed.answer == plain.answer
    assert probed.stats.thinking_tokens == plain.stats.thinking_tokens


def test_consistency_mode_exits_when_k_trials_agree():
    b = backend(trial=lambda n: ("7", 0.4) if n >= 4 else ("5", 0.4))
    r, events = run(b, [EarlyExit(mode="consistency", k=2, inducer=INDUCER)])
    assert [p.answer for p in controls(events, Probe)] == ["5", "7", "7"]
    assert r.stats.thinking_tokens == 6 and r.stats.exit_reason == "early_exit"
    r2, _ = run(backend(trial=lambda n: ("7", 0.4) if n >= 4 else ("5", 0.4)), [EarlyExit(mode="confidence", threshold=0.9, inducer=INDUCER)])
    assert r2.stats.exit_reason == "eos"  # never confident enough


def test_stream_confidence_gate_skips_probes():
    b = backend(trial=confident_after(0), probs=[0.6] * len(SCRIPT))
    r, events = run(b, [EarlyExit(threshold=0.9, gate=0.8, inducer=INDUCER)])
    assert not controls(events, Probe) and r.stats.probe_tokens == 0
    b = backend(trial=confident_after(0), probs=[0.95] * len(SCRIPT))
    r, events = run(b, [EarlyExit(threshold=0.9, gate=0.8, inducer=INDUCER)])
    assert len(controls(events, Probe)) == 1 and r.stats.thinking_tokens == 2


def test_min_gap_spaces_probes():
    b = backend(trial=confident_after(100))
    _, events = run(b, [EarlyExit(threshold=0.9, min_gap=3, inducer=INDUCER)])
    at = [p.at for p in controls(events, Probe)]
    assert all(b - a >= 3 for a, b in zip(at, at[1:])) and len(at) < 4


def test_budget_and_early_exit_compose():
    b = backend(trial=confident_after(100))
    r, events = run(b, [ThinkingBudget(max_thinking=5), EarlyExit(threshold=0.9, inducer=INDUCER)])
    assert r.stats.thinking_tokens == 5 and controls(events, BudgetExhausted) and controls(events, Probe)
    b = backend(trial=confident_after(3))
    r, _ = run(b, [ThinkingBudget(max_thinking=9), EarlyExit(threshold=0.9, inducer=INDUCER)])
    assert r.stats.thinking_tokens == 4 and r.stats.exit_reason == "early_exit"


def test_adaptive_budget_scales_with_prompt_length():
    pred = LengthPredictor.fit([10, 20, 30, 40], [20, 40, 60, 80], quantile=0.5)
    assert pred(25) == 50
    ctl = AdaptiveBudget(predictor=LengthPredictor(intercept=0, slope=1.0))
    r, events = run(backend(), [ctl])  # prompt "Q?" is 2 tokens -> budget 2
    assert r.stats.thinking_tokens == 2 and controls(events, BudgetChosen)[0].budget == 2


def test_length_predictor_fits_exactly_and_matches_numpy_on_noisy_data():
    import numpy as np

    # exact lines give exact budgets, whatever the float library does with them
    assert LengthPredictor.fit([3, 6, 9, 12], [1, 2, 3, 4], quantile=0.5)(30) == 10
    assert LengthPredictor.fit([10, 20, 30, 40], [20, 40, 60, 80], quantile=0.9)(7) == 14
    assert LengthPredictor(intercept=0.0, slope=2.0000000000000004)(25) == 50
    assert LengthPredictor(intercept=0.0, slope=2.01)(25) == 51  # a real excess still rounds up
    rng = np.random.default_rng(3)
    x = rng.integers(5, 400, 60)
    y = (3 * x + rng.integers(-40, 40, 60)).clip(0)
    for q in (0.5, 0.9):
        p = LengthPredictor.fit(x.tolist(), y.tolist(), quantile=q)
        slope, icpt = np.polyfit(x.astype(float), y.astype(float), 1)
        resid = y - (icpt + slope * x)
        assert p.slope == pytest.approx(slope, rel=1e-9)
        assert p.intercept == pytest.approx(icpt + np.quantile(resid, q), rel=1e-9, abs=1e-9)
    same = LengthPredictor.fit([7, 7, 7], [10, 20, 30], quantile=0.5)  # one prompt length: the quantile
    assert (same.slope, same.intercept) == (0.0, 20.0)
    with pytest.raises(ConfigError):
        LengthPredictor.fit([], [])


def test_controllers_are_deterministic_under_a_seed():
    p = SamplingParams(temperature=1.0, seed=7, max_tokens=200)
    a, _ = run(backend(trial=confident_after(5)), [ThinkingBudget(max_thinking=8), EarlyExit(inducer=INDUCER)], p)
    b, _ = run(backend(trial=confident_after(5)), [ThinkingBudget(max_thinking=8), EarlyExit(inducer=INDUCER)], p)
    assert a.reasoning == b.reasoning and a.answer == b.answer


@pytest.mark.parametrize(
    "make",
    [
        lambda: ThinkingBudget(max_thinking=-1),
        lambda: ThinkingBudget(max_thinking=10**9),
        lambda: ThinkingBudget(min_thinking=10, max_thinking=5),
        lambda: ThinkingBudget(max_thinking=2.5),
        lambda: EarlyExit(threshold=1.5),
        lambda: EarlyExit(threshold=-0.1),
        lambda: EarlyExit(gate=2),
        lambda: EarlyExit(mode="vibes"),
        lambda: EarlyExit(confidence="median"),
        lambda: effort_budget("extreme"),
    ],
)
def test_bad_settings_are_config_errors(make):
    with pytest.raises(ConfigError):
        make()


def test_helpers():
    assert boxed_answer("17}") == "17" and boxed_answer("\\frac{1}{2}} tail") == "\\frac{1}{2}"
    assert is_boundary("So x = 7.\n\n", "Wait")
    assert is_boundary("x = 7. ", "Wait") and is_boundary("x = 7.", " Wait")
    assert not is_boundary("x = 7.", "Wait") and not is_boundary("", "Wait") and not is_boundary("a\n\n", "\n")


def test_step_cut_rolls_back_the_unfinished_step():
    # cap inside "Wait, let me check." (tokens 6..): thinking closes at the paragraph break
    r, events = run(backend(), [ThinkingBudget(max_thinking=8, cut="step")])
    (ev,) = controls(events, Retracted)
    assert ev.tokens == 2 and ev.text == "Wait, let me check."
    assert r.stats.thinking_tokens == 6 and r.stats.retracted_tokens == 2
    assert r.reasoning.endswith("So x = 7.") and "Wait" not in r.reasoning.split("So x = 7.")[-1]
    assert r.answer.endswith("\\boxed{?}")  # the scripted model answers from how far it got
    # no paragraph break yet: falls back to the token cut with the message
    r2, events2 = run(backend(), [ThinkingBudget(max_thinking=1, cut="step", end_message="\nStop.\n")])
    assert r2.stats.thinking_tokens == 1 and not controls(events2, Retracted) and r2.reasoning.endswith("Stop.")
    with pytest.raises(ConfigError):
        ThinkingBudget(max_thinking=3, cut="sentence")


def test_probe_cut_ends_at_the_last_probe_point_with_the_probes_answer():
    """SCRIPT's probe points are at 2, 4 and 6 thinking tokens (before "Step two.", "So x" and
    "Wait"); its thinking is 11 tokens with the close. A probe cut at cap B keeps the last point
    <= B, takes back the tokens since, and ends thinking with the probe read there."""
    b = lambda: backend(trial=confident_after(4))  # noqa: E731
    for cap, kept, answer in ((3, 2, "3"), (4, 4, "7"), (9, 6, "7"), (10, 6, "7")):
        r, events = run(b(), [ThinkingBudget(max_thinking=cap, cut="probe")])
        (cut,) = controls(events, BudgetExhausted)
        (probe,) = controls(events, Probe)
        assert cut.summary() == {"kind": "budget_exhausted", "thinking_tokens": kept, "budget": cap, "cut": "probe"}
        assert (r.stats.thinking_tokens, r.stats.retracted_tokens, r.stats.exit_reason) == (kept, cap - kept, "budget")
        assert probe.at == kept and r.stats.probe_tokens == probe.cost and r.answer == "**Final Answer**\n\\boxed{" + answer + "}"
        assert [e.tokens for e in controls(events, Retracted)] == ([cap - kept] if cap > kept else [])
        assert events.index(cut) < events.index(probe)  # reported, taken back, then read
    # no probe point within the cap: thinking goes on to the first one, nothing taken back
    r, events = run(b(), [ThinkingBudget(max_thinking=1, cut="probe")])
    assert (r.stats.thinking_tokens, r.stats.retracted_tokens, controls(events, BudgetExhausted)[0].thinking_tokens) == (2, 0, 2)
    # thinking ends within the cap (the close is the 11th thinking token): the unlimited run
    full, _ = run(b())
    r, events = run(b(), [ThinkingBudget(max_thinking=11, cut="probe")])
    assert (r.reasoning, r.answer, r.stats.probe_tokens, r.stats.injected_tokens) == (full.reasoning, full.answer, 0, 0)
    assert not controls(events, BudgetExhausted)


def test_probe_cut_leaves_an_end_inside_thinking_alone():
    """The oracle's run ends where the model ends it; a probe cut within its cap does too (a
    token or step cut injects the message and makes the model answer)."""

    r, events = run(EndsWhileThinking(SCRIPT, ANSWER), [ThinkingBudget(max_thinking=4, cut="probe")])
    assert r.stats.thinking_tokens == 4 and r.stats.exit_reason == "eos" and not r.answer and not controls(events, Injected)


def test_signal_budget_sets_the_cap_from_its_one_probe():
    from edge.control.budget import SignalBudget
    from edge.events import BudgetFromProbe

    b = lambda: backend(trial=confident_after(4))  # noqa: E731
    # the first point past 3 is 4, where the answer is sure: low <= 4 stops right there
    r, events = run(b(), [SignalBudget(first=3, threshold=0.9, low=3, high=9)])
    (sig,) = controls(events, BudgetFromProbe)
    assert sig.summary() == {"kind": "signal_budget", "budget": 4, "at": 4, "confidence": 0.99, "sure": True}
    assert (r.stats.thinking_tokens, r.stats.probes, r.stats.retracted_tokens) == (4, 1, 0) and r.answer.endswith("{7}")
    # at 2 it is not sure: the cap is high (9), cut back to 6, one more probe there
    r, events = run(b(), [SignalBudget(first=1, threshold=0.9, low=3, high=9)])
    assert controls(events, BudgetFromProbe)[0].budget == 9
    assert (r.stats.thinking_tokens, r.stats.probes, r.stats.retracted_tokens) == (6, 2, 3)
    # sure at 2 with low 5: cut at 4, a second probe; a cut on the signal's own point reuses it
    r, _ = run(b(), [SignalBudget(first=1, threshold=0.2, low=5, high=9)])
    assert (r.stats.thinking_tokens, r.stats.probes, r.stats.retracted_tokens) == (4, 2, 1)
    r, _ = run(b(), [SignalBudget(first=1, threshold=0.9, low=1, high=2)])
    assert (r.stats.thinking_tokens, r.stats.probes) == (2, 1)
    # until its probe the cap is high: a first point past high is never reached as a signal
    r, events = run(b(), [SignalBudget(first=5, threshold=0.9, low=5, high=5)])
    assert not controls(events, BudgetFromProbe) and (r.stats.thinking_tokens, r.stats.retracted_tokens) == (4, 1)
    for bad in (dict(low=9, high=3), dict(threshold=1.5), dict(first=-1), dict(cut="step"), dict(max_thinking=5)):
        with pytest.raises(ConfigError):
            SignalBudget(**bad)


PIECES = ["Wait", " Wait", "Hmm", " Hmm", "Alter", " Alternatively", " But", "But", " wait", "Double", "-check", "x", " x",
          " = 7.", ".", " ", "\n", "\n\n", " \n\n", "<", "</", "think", ">", "</think>", "Wai", " Dou"]


@settings(max_examples=300, deadline=None)
@given(script=st.lists(st.sampled_from(PIECES), min_size=1, max_size=30), gate=st.sampled_from([0.0, 0.5]))
@example(script=["x", "\n\n", "</", "think>", " Wait"], gate=0.0)  # a tag split across tokens
@example(script=["x", "Wait", " ", "Wait", " Wait", "\n\n", " Hmm"], gate=0.5)
def test_early_exit_probes_exactly_where_is_boundary_says(script, gate):
    """The per-token path classifies each token id once; its probe points must be those of
    the plain rule: thinking, a token that neither ends nor closes thinking, and
    is_boundary(thinking so far, token text), gated by the stream confidence."""

    class Recorded(EarlyExit):
        def probe_step(self, gen):
            self.points.append(gen.thinking_tokens)
            return None

    class Reference(EarlyExit):
        def on_token(self, gen, sampled):
            tok = sampled.token
            if (gen.thinking and gen.thinking_tokens >= 1 and tok not in gen.eos and not gen.would_close_thinking(tok)
                    and is_boundary(gen.thinking_text, gen.piece(tok), self.words)):
                self.points.append(gen.thinking_tokens)
            return None

    fast, ref = Recorded(gate=gate), Reference()
    fast.points, ref.points = [], []
    b = ScriptedBackend(script, ANSWER, probs=[0.9] * len(script))
    run(b, [fast, ref])
    assert fast.points == ref.points  # a 0.9-confident stream passes a 0.5 gate everywhere


def test_gate_reads_the_mean_probability_of_the_last_window_tokens():
    """The gate keeps logits and normalizes them when read; what it reads must equal the
    mean of exp(logprob) over the last `window` committed thinking tokens."""
    seen = []

    class Recorded(EarlyExit):
        def probe_step(self, gen):
            seen.append((self.stream_confidence(gen), [math.exp(x) for x in gen.thinking_logprobs[-self.window :]]))
            return None

    probs = [0.5, 0.9, 0.6, 0.99, 0.7, 0.95, 0.8, 0.55, 0.97, 0.65, 0.85]
    b = backend(probs=probs)
    run(b, [Recorded(gate=0.01, window=3)], params=SamplingParams(temperature=0, max_tokens=200, logprobs=True))
    assert len(seen) == 3  # the three paragraph starts and "Wait" of SCRIPT
    for got, want in seen:
        assert got == pytest.approx(sum(want) / len(want), abs=1e-6)
    assert [len(want) for _, want in seen] == [2, 3, 3]  # the window fills, then slides


def test_gate_bound_decides_exactly_like_the_full_computation(monkeypatch):
    """gate_open first rules a closed gate out with an upper bound needing no exponentials
    over the vocabulary; its decisions must equal stream_confidence >= gate."""
    import numpy as np

    full_computations = []
    mean_prob = EarlyExit._mean_prob
    monkeypatch.setattr(EarlyExit, "_mean_prob", staticmethod(lambda x, t: full_computations.append(1) or mean_prob(x, t)))
    rng = np.random.default_rng(0)
    closed = skipped = 0
    for trial in range(300):
        vocab, n = int(rng.integers(1, 50)), int(rng.integers(1, 20))
        scale = float(rng.choice([0.1, 1.0, 5.0, 30.0]))
        rows = [(rng.standard_normal(vocab) * scale).astype(np.float32) for _ in range(n)]
        toks = [int(np.argmax(r)) if rng.random() < 0.7 else int(rng.integers(vocab)) for r in rows]
        ee = EarlyExit(gate=float(rng.choice([0.05, 0.3, 0.5, 0.8, 0.95, 1.0])), window=int(rng.integers(1, 20)))
        gen = type("G", (), {"generated": toks})()
        for i, (r, t) in enumerate(zip(rows, toks)):
            ee._recent.append((r, t, i))
        full = ee.stream_confidence(gen) >= ee.gate
        full_computations.clear()
        assert ee.gate_open(gen) == full, trial
        closed += not full
        skipped += not full_computations
    assert closed > 50 and skipped > closed // 2  # most closed gates needed no exponentials


def test_controller_actions_are_typed_events_reported_before_their_text():
    # early exit: the probe's answer, reused
    r, events = run(backend(trial=confident_after(5)), [EarlyExit(threshold=0.9, inducer=INDUCER)])
    (ex,) = controls(events, EarlyExited)
    assert isinstance(ex, Injected) and (ex.thinking_tokens, ex.answer, ex.confidence, ex.probes) == (6, "7", 0.99, 3)
    assert ex.summary() == {"kind": "early_exit", "thinking_tokens": 6, "answer": "7", "confidence": 0.99, "probes": 3}
    assert events.index(ex) < next(i for i, e in enumerate(events) if isinstance(e, AnswerDelta))
    assert ex.summary() in r.to_dict()["controls"]
    # the model closes thinking by itself exactly at the cap: the close is kept, not forced
    r, events = run(backend(), [ThinkingBudget(max_thinking=len(SCRIPT) - 1)])
    (closed,) = controls(events, ThinkingClosedAtBudget)
    assert (closed.thinking_tokens, closed.budget) == (len(SCRIPT) - 1, len(SCRIPT) - 1) and not controls(events, BudgetExhausted)
    assert r.stats.exit_reason == "eos" and "\\boxed{" in r.answer
    # the model ends while thinking: the end message and the close are written for it
    r, events = run(EndsWhileThinking(SCRIPT, ANSWER), [ThinkingBudget(max_thinking=100, end_message="\nStop.\n")])
    (unclosed,) = controls(events, ThinkingUnclosed)
    assert isinstance(unclosed, Injected) and unclosed.thinking_tokens == 4
    assert r.reasoning.endswith("Stop.") and "\\boxed{" in r.answer
    # a step cut names its cut; a token cut does not
    _, events = run(backend(), [ThinkingBudget(max_thinking=8, cut="step")])
    assert controls(events, BudgetExhausted)[0].summary() == {"kind": "budget_exhausted", "thinking_tokens": 6, "budget": 8, "cut": "step"}
    _, events = run(backend(), [ThinkingBudget(max_thinking=3)])
    assert controls(events, BudgetExhausted)[0].summary() == {"kind": "budget_exhausted", "thinking_tokens": 3, "budget": 3}
