"""Command-line options of the reasoning controllers, shared by ``run`` and ``chat`` (click code
lives in ``edge.cli``; the controllers themselves in ``edge.control``)."""

from __future__ import annotations

from typing import Any, Callable

import click

from edge.control.base import Controller
from edge.control.budget import CUTS
from edge.control.spec import ControlSpec, parse_signal

CONTROL_KEYS = ("think_budget", "min_thinking", "effort", "answer_budget", "budget_message", "budget_cut", "signal_budget", "early_exit",
                "exit_threshold", "exit_mode")


def control_options(f: Callable) -> Callable:
    opts = [
        click.option("--think-budget", type=int, default=None, help="Hard cap on thinking tokens; then the model must answer."),
        click.option("--effort", default=None, help="off | low | medium | high | max (a thinking budget)."),
        click.option("--min-thinking", type=int, default=0, help="Minimum thinking tokens: an early close becomes 'Wait'."),
        click.option("--answer-budget", type=int, default=None, help="Cap on answer tokens after thinking."),
        click.option("--budget-message", default=None, help="Text injected when the thinking budget runs out."),
        click.option("--budget-cut", type=click.Choice(CUTS), default=None,
                     help="Where the budget cuts: token (default: at the cap, with the message), step (back to the last "
                          "paragraph break), probe (back to the last probe point, answered as early exit would: what "
                          "'python -m edge.benchmarks.offline' replays). Needs --think-budget or --effort."),
        click.option("--signal-budget", default=None, metavar="FIRST:THRESHOLD:LOW:HIGH",
                     help="A budget set by one probe at the first step past FIRST thinking tokens: LOW if its answer's "
                          "confidence is >= THRESHOLD, else HIGH ('inf': none); cuts at probe points. E.g. 40:0.9:60:200."),
        click.option("--early-exit", is_flag=True, help="Stop thinking once a probe answer is confident."),
        click.option("--exit-threshold", type=float, default=None, help="Probe confidence needed to exit (default 0.95; needs --early-exit)."),
        click.option("--exit-mode", default=None, help="confidence | consistency | both (default confidence; needs --early-exit)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def pop_control(kw: dict[str, Any]) -> dict[str, Any]:
    return {k: kw.pop(k) for k in CONTROL_KEYS if k in kw}


def control_spec(o: dict[str, Any]) -> ControlSpec:
    """The controller flags as a :class:`~edge.control.spec.ControlSpec`; flags that exclude
    each other, or need another, are refused here (ConfigError), in the words of the flags."""
    from edge.errors import ConfigError

    if o.get("effort") and o.get("think_budget") is not None:
        raise ConfigError("give either --think-budget or --effort, not both")
    signal = parse_signal(o["signal_budget"]) if o.get("signal_budget") else None
    if signal is not None and (o.get("effort") or o.get("think_budget") is not None):
        raise ConfigError("--signal-budget sets its own caps; give no --think-budget or --effort with it")
    cut = o.get("budget_cut")
    if cut is not None and signal is None and not o.get("effort") and o.get("think_budget") is None:
        raise ConfigError("--budget-cut needs --think-budget or --effort")
    if signal is not None and cut not in (None, "probe"):
        raise ConfigError(f"--signal-budget cuts at probe points; --budget-cut {cut} does not apply")
    if not o.get("early_exit"):
        for flag, key in (("--exit-threshold", "exit_threshold"), ("--exit-mode", "exit_mode")):
            if o.get(key) is not None:
                raise ConfigError(f"{flag} needs --early-exit")
    return ControlSpec(
        think_budget=o.get("think_budget"),
        effort=o.get("effort") or None,
        min_thinking=o.get("min_thinking") or None,  # the default 0 asks for nothing
        answer_budget=o.get("answer_budget"),
        budget_message=o.get("budget_message"),
        cut=cut or "token",
        signal=signal,
        # EarlyExit's own defaults for what is not given, written once
        early_exit={k: v for k, v in (("threshold", o.get("exit_threshold")), ("mode", o.get("exit_mode"))) if v is not None}
        if o.get("early_exit") else None,
    )


def build_controllers(o: dict[str, Any]) -> list[Controller]:
    """Controllers for the flags, validated (bad values raise ConfigError)."""
    return control_spec(o).controllers()
