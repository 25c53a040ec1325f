"""What a user asked of the reasoning controllers, whichever front end the words came from.

The command line (``--think-budget``, ``--effort``, ``--budget-cut``, ``--signal-budget``,
``--early-exit`` ...), the server's request fields (``thinking_budget``, ``reasoning_effort``,
``thinking_budget_cut``, ``signal_budget``, ``early_exit`` ...) and the eval policies
(``budget:256``, ``budget-probe:256``, ``adaptive-step:1``, ``signal:40:0.9:60:200``,
``early-exit:0.9`` ...) are each parsed into one :class:`ControlSpec`;
:meth:`ControlSpec.controllers` alone turns a spec into controllers. The parsers check what is
about the words (two flags that exclude each other, a setting without the switch it needs); the
controllers check their values. An error from the values is a :class:`~edge.errors.ConfigError`
whose ``param`` names the part of the spec it came from (:data:`EFFORT`, :data:`BUDGET`,
:data:`SIGNAL` or :data:`EARLY_EXIT`), so a front end can name its own field.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from edge.control.base import Controller
from edge.errors import ConfigError

EFFORT, BUDGET, SIGNAL, EARLY_EXIT = "effort", "budget", "signal_budget", "early_exit"
"""The parts of a spec an error can come from (:attr:`ConfigError.param`)."""

SIGNAL_KEYS = ("first", "threshold", "low", "high")
"""The settings of a probe-signal budget (:class:`~edge.control.budget.SignalBudget`), in the
order of their one-line form ``FIRST:THRESHOLD:LOW:HIGH``."""


def parse_signal(text: str) -> dict[str, Any]:
    """``"40:0.9:60:200"`` -> ``{"first": 40, "threshold": 0.9, "low": 60, "high": 200}``; a HIGH
    of ``inf`` or ``none`` is no cap. The one-line form of the CLI, the eval policy and the
    server's string field; the values are checked by the controller."""
    parts = str(text).strip().split(":")
    if len(parts) != len(SIGNAL_KEYS):
        raise ConfigError(f"a signal budget is FIRST:THRESHOLD:LOW:HIGH (e.g. 40:0.9:60:200), got {text!r}", param=SIGNAL)
    try:
        first, threshold, low = int(parts[0]), float(parts[1]), int(parts[2])
        high = None if parts[3].strip().lower() in ("inf", "none") else int(parts[3])
    except ValueError:
        raise ConfigError(f"a signal budget is FIRST:THRESHOLD:LOW:HIGH of whole token counts and a confidence, got {text!r}",
                          param=SIGNAL) from None
    return {"first": first, "threshold": threshold, "low": low, "high": high}


def signal_text(signal: Mapping[str, Any]) -> str:
    """The one-line form of a signal budget's settings (the inverse of :func:`parse_signal`)."""
    high = signal.get("high")
    return f"{signal['first']}:{signal['threshold']:g}:{signal['low']}:{'inf' if high is None else high}"


@dataclass(frozen=True)
class ControlSpec:
    """Thinking budget and early exit, as asked.

    ``None`` is "not given". A thinking budget (:class:`~edge.control.budget.ThinkingBudget`)
    runs when a cap (``think_budget``, or ``effort`` at a capped level: ``"max"`` has none),
    ``min_thinking``, ``answer_budget`` or ``adaptive`` is given; one given as
    ``min_thinking=0`` runs too, and makes a model that stops inside its thinking answer.

    - ``think_budget``: hard cap on thinking tokens; ``effort``: a level of
      :data:`~edge.control.budget.EFFORT_BUDGETS` instead (not both);
    - ``min_thinking``: an earlier close of thinking becomes "Wait";
    - ``answer_budget``: cap on answer tokens after thinking; ``budget_message``: the text
      injected when the thinking budget runs out (empty or None: the default);
    - ``cut``: ``"token"``, ``"step"`` (close at the last finished reasoning step) or
      ``"probe"`` (close at the last probe point with the probe's answer: the cut the offline
      replay models);
    - ``adaptive``: a per-query budget from a fitted length predictor, scaled by this;
    - ``signal``: a budget set by one early probe's confidence, the settings of
      :class:`~edge.control.budget.SignalBudget` (:data:`SIGNAL_KEYS`; it cuts at probe
      points, and excludes the other caps);
    - ``early_exit``: None for none, else the settings of
      :class:`~edge.control.early_exit.EarlyExit` (``{}``: its defaults).
    """

    think_budget: int | None = None
    effort: str | None = None
    min_thinking: int | None = None
    answer_budget: int | None = None
    budget_message: str | None = None
    cut: str = "token"
    adaptive: float | None = None
    signal: Mapping[str, Any] | None = None
    early_exit: Mapping[str, Any] | None = None

    def controllers(self, predictor: Any = None) -> list[Controller]:
        """Fresh controllers for this spec (a controller holds the state of one run).
        ``predictor``: the fitted :class:`~edge.control.budget.LengthPredictor` of an adaptive
        budget."""
        from edge.control.budget import DEFAULT_END_MESSAGE, AdaptiveBudget, SignalBudget, ThinkingBudget, effort_budget
        from edge.control.early_exit import EarlyExit

        out: list[Controller] = []
        budget = self.think_budget
        if self.effort is not None:
            if budget is not None:
                raise ConfigError("give either a thinking budget or an effort, not both", param=EFFORT)
            budget = _tagged(EFFORT, effort_budget, self.effort)
        if self.signal is not None:
            if budget is not None or self.adaptive is not None:
                raise ConfigError("a signal budget sets its own caps (low and high); give no other thinking budget", param=SIGNAL)
            if self.cut not in ("token", "probe"):  # "token" is the spec's default: not asked
                raise ConfigError(f"a signal budget cuts at probe points; cut {self.cut!r} does not apply", param=SIGNAL)
            unknown = sorted(set(self.signal) - set(SIGNAL_KEYS))
            if unknown:
                raise ConfigError(f"unknown signal budget setting(s) {', '.join(unknown)}; known: {', '.join(SIGNAL_KEYS)}", param=SIGNAL)
        if any(v is not None for v in (budget, self.min_thinking, self.answer_budget, self.adaptive, self.signal)):
            kw: dict[str, Any] = dict(max_thinking=budget, min_thinking=self.min_thinking or 0, answer_budget=self.answer_budget,
                                      end_message=self.budget_message or DEFAULT_END_MESSAGE, cut=self.cut)
            if self.signal is not None:
                out.append(_tagged(SIGNAL, SignalBudget, **{**kw, "cut": "probe"}, **self.signal))
            elif self.adaptive is not None:
                out.append(_tagged(BUDGET, AdaptiveBudget, predictor=predictor, scale=self.adaptive, **kw))
            else:
                out.append(_tagged(BUDGET, ThinkingBudget, **kw))
        if self.early_exit is not None:
            out.append(_tagged(EARLY_EXIT, EarlyExit, **self.early_exit))
        return out


def _tagged(part: str, make: Any, *args: Any, **kw: Any) -> Any:
    """``make(*args, **kw)``; a bad value (a TypeError of a wrong keyword or type included)
    becomes a ConfigError with the same message and ``param=part``."""
    try:
        return make(*args, **kw)
    except (ConfigError, TypeError) as exc:
        raise ConfigError(str(exc), param=part) from None
