"""One ControlSpec behind the CLI flags, the server's request fields and the eval policies."""

from __future__ import annotations

import pytest

from edge.benchmarks.harness import parse_policies
from edge.cli.controls import control_spec as cli_spec
from edge.control.budget import DEFAULT_END_MESSAGE, AdaptiveBudget, LengthPredictor, SignalBudget, ThinkingBudget
from edge.control.early_exit import EarlyExit
from edge.control.spec import BUDGET, EARLY_EXIT, EFFORT, SIGNAL, ControlSpec
from edge.errors import ConfigError
from edge.server.protocol import control_spec as request_spec

CLI_DEFAULTS = {"think_budget": None, "effort": None, "min_thinking": 0, "answer_budget": None, "budget_message": None,
                "budget_cut": None, "signal_budget": None, "early_exit": False, "exit_threshold": None, "exit_mode": None}


def cli(**o):
    return cli_spec({**CLI_DEFAULTS, **o})


def policy(text):
    (p,) = parse_policies(text)
    return p.spec


@pytest.mark.parametrize(
    "flags, fields, text",
    [
        ({}, {}, "unlimited"),
        ({"think_budget": 256}, {"thinking_budget": 256}, "budget:256"),
        ({"think_budget": 256}, {"max_thinking_tokens": 256}, "budget:256"),
        ({"effort": "low"}, {"reasoning_effort": "low"}, None),
        ({"min_thinking": 64}, {"min_thinking_tokens": 64}, "wait:64"),
        ({"early_exit": True, "exit_threshold": 0.9}, {"early_exit": {"threshold": 0.9}}, "early-exit:0.9"),
        ({"early_exit": True, "exit_mode": "consistency"}, {"early_exit": {"mode": "consistency"}}, None),
        ({"think_budget": 256, "budget_cut": "step"}, {"thinking_budget": 256, "thinking_budget_cut": "step"}, "budget-step:256"),
        ({"think_budget": 256, "budget_cut": "probe"}, {"thinking_budget": 256, "thinking_budget_cut": "probe"}, "budget-probe:256"),
        ({"signal_budget": "40:0.9:60:200"}, {"signal_budget": {"first": 40, "threshold": 0.9, "low": 60, "high": 200}},
         "signal:40:0.9:60:200"),
        ({"signal_budget": "40:0.9:60:inf"}, {"signal_budget": {"first": 40, "threshold": 0.9, "low": 60}}, "signal:40:0.9:60:inf"),
        ({"signal_budget": "40:0.9:60:none"}, {"signal_budget": "40:0.9:60:inf"}, "signal:40:0.9:60:inf"),
    ],
)
def test_the_same_words_make_the_same_spec_everywhere(flags, fields, text):
    spec = cli(**flags)
    assert request_spec(fields)[0] == spec
    if text is not None:
        assert policy(text) == spec


def test_the_spec_builds_the_controllers():
    assert ControlSpec().controllers() == []
    (tb,) = ControlSpec(think_budget=8, min_thinking=2, answer_budget=5, budget_message="stop!", cut="step").controllers()
    assert type(tb) is ThinkingBudget and (tb.max_thinking, tb.min_thinking, tb.answer_budget, tb.end_message, tb.cut) == (8, 2, 5, "stop!", "step")
    (tb,) = ControlSpec(effort="low", budget_message="").controllers()
    assert tb.max_thinking == 512 and tb.end_message == DEFAULT_END_MESSAGE
    assert ControlSpec(effort="max").controllers() == []  # no cap asked, nothing to run
    (tb,) = ControlSpec(effort="max", min_thinking=0).controllers()  # a budget given with nothing in it still runs
    assert tb.max_thinking is None and tb.min_thinking == 0
    (ab,) = ControlSpec(adaptive=0.5, cut="step").controllers(LengthPredictor(10.0, 1.0))
    assert type(ab) is AdaptiveBudget and (ab.scale, ab.cut) == (0.5, "step")
    tb, ee = ControlSpec(think_budget=8, early_exit={"threshold": 0.8, "k": 3}).controllers()
    assert isinstance(ee, EarlyExit) and (ee.threshold, ee.k, ee.mode) == (0.8, 3, EarlyExit().mode)
    (sb,) = ControlSpec(signal={"first": 4, "threshold": 0.5, "low": 6, "high": None}, answer_budget=9).controllers()
    assert type(sb) is SignalBudget and (sb.first, sb.threshold, sb.low, sb.high, sb.cut, sb.answer_budget) == (4, 0.5, 6, None, "probe", 9)
    first, second = ControlSpec(early_exit={}).controllers(), ControlSpec(early_exit={}).controllers()
    assert first[0] is not second[0]  # fresh controllers every time


@pytest.mark.parametrize(
    "spec, part",
    [
        (ControlSpec(effort="extreme"), EFFORT),
        (ControlSpec(think_budget=3, effort="low"), EFFORT),
        (ControlSpec(think_budget=-1), BUDGET),
        (ControlSpec(think_budget=3, min_thinking=9), BUDGET),
        (ControlSpec(adaptive=1.0), BUDGET),  # no predictor
        (ControlSpec(early_exit={"threshold": 2}), EARLY_EXIT),
        (ControlSpec(early_exit={"treshold": 0.5}), EARLY_EXIT),  # a TypeError of EarlyExit
        (ControlSpec(think_budget=8, cut="sideways"), BUDGET),
        (ControlSpec(signal={"first": 4, "threshold": 2.0, "low": 4, "high": None}), SIGNAL),
        (ControlSpec(signal={"first": 4, "threshold": 0.5, "low": 4, "high": None}, think_budget=9), SIGNAL),
        (ControlSpec(signal={"first": 4, "threshold": 0.5, "low": 4, "high": None}, cut="step"), SIGNAL),
        (ControlSpec(signal={"first": 4, "threshold": 0.5, "low": 4, "hihg": 9}), SIGNAL),
    ],
)
def test_a_bad_value_names_the_part_of_the_spec(spec, part):
    with pytest.raises(ConfigError) as exc:
        spec.controllers()
    assert exc.value.param == part
