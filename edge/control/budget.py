"""Thinking budgets: a hard cap, a minimum with "Wait" extension, effort levels, thinking off,
an adaptive per-query budget, and one set by an early probe's confidence (:class:`SignalBudget`).

:class:`ThinkingBudget` contract
- Thinking tokens never exceed ``max_thinking``: when the cap is reached the next sampled token
  is replaced by ``end_message`` + the closing tag (a token that would leave a UTF-8 character
  unfinished is taken back first, so no character is split), and the model answers. (With
  ``cut="probe"``, below, a first step longer than the cap is the one exception.)
- If the model ends (EOS) while still thinking, the same message is injected, so an answer is
  always produced (not with ``cut="probe"``, below).
- ``answer_budget`` caps the answer tokens that follow (the reply then stops, finish "length").
- ``min_thinking``: if the model closes thinking (or ends) earlier, the close is replaced by
  ``wait_text`` (s1's budget forcing), at most ``max_waits`` times.
- ``max_thinking == 0`` is "thinking off": the block is closed before the first token.
- ``cut="step"``: at the cap, the unfinished reasoning step (the tokens since the last
  paragraph break) is rolled back and thinking closes at that clean step boundary, with no
  message. A model that never saw truncated reasoning answers from a finished step far
  better than from half a sentence. The rolled-back tokens are reported (a
  :class:`~edge.events.Retracted` event, ``stats.retracted_tokens``) and count as spent.
- ``cut="probe"``: the cut that ``benchmarks/offline.py`` replays from an oracle run, so that
  under greedy decoding the replayed figures *are* this controller's. When the cap is reached,
  thinking goes back to the last probe point at or before it (a step boundary where early exit
  would probe, :class:`~edge.control.early_exit.StepPoints`; a budget landing exactly on one
  keeps it, nothing retracted) and ends the way an early exit does: the probe
  (:class:`~edge.control.early_exit.AnswerProbe`: closing tag and answer inducer, a short greedy
  answer, counted in ``stats.probe_tokens``) is read there and its text injected, so the answer
  is the one the oracle's probe read at that point. With no probe point yet, thinking goes on
  to the first one and is cut there (never inside the first step; a model that writes no step
  boundary thinks unlimited). A run whose thinking ends within the cap, by a close or by the
  end of the reply (nothing is injected then), is the unlimited run. The cap counts the tokens
  the oracle counts: at the cap a sampled close is cut like any token, an end of reply is not.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

from edge.control.base import Action, Controller
from edge.control.early_exit import AnswerProbe, StepPoints, check_unit
from edge.errors import ConfigError
from edge.events import (
    AnswerBudgetExhausted,
    BudgetChosen,
    BudgetExhausted,
    BudgetFromProbe,
    ThinkingClosedAtBudget,
    ThinkingUnclosed,
    WaitInjected,
)

# In the style of Qwen3's and llama.cpp's --reasoning-budget-message.
DEFAULT_END_MESSAGE = "\n\nConsidering the limited time by the user, I have to give the solution based on the thinking directly now.\n"
DEFAULT_WAIT = "\nWait"
MAX_BUDGET = 1_000_000

CUTS = ("token", "step", "probe")
EFFORT_BUDGETS: dict[str, int | None] = {"off": 0, "low": 512, "medium": 2048, "high": 8192, "max": None}


def check_budget(name: str, value: int | None, *, allow_none: bool = True) -> None:
    if value is None:
        if not allow_none:
            raise ConfigError(f"{name} is required")
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer number of tokens, got {value!r}")
    if value < 0:
        raise ConfigError(f"{name} must be >= 0 tokens, got {value}")
    if value > MAX_BUDGET:
        raise ConfigError(f"{name} of {value} tokens is absurd (the limit is {MAX_BUDGET})")


def effort_budget(level: str, table: dict[str, int | None] | None = None) -> int | None:
    table = table or EFFORT_BUDGETS
    if level not in table:
        raise ConfigError(f"unknown effort {level!r}; choose one of: {', '.join(table)}")
    return table[level]


_UNSET = object()


@dataclass
class ThinkingBudget(Controller):
    max_thinking: int | None = None
    min_thinking: int = 0
    max_waits: int = 3
    answer_budget: int | None = None
    end_message: str = DEFAULT_END_MESSAGE
    wait_text: str = DEFAULT_WAIT
    close_tag: str = "</think>"
    cut: str = "token"
    name: str = field(default="budget", init=False)

    def __post_init__(self) -> None:
        if self.cut not in CUTS:
            raise ConfigError(f"cut must be one of {', '.join(CUTS)}; got {self.cut!r}")
        check_budget("max_thinking", self.max_thinking)
        check_budget("min_thinking", self.min_thinking, allow_none=False)
        check_budget("answer_budget", self.answer_budget)
        if self.max_waits < 0 or self.max_waits > 100:
            raise ConfigError(f"max_waits must be in [0, 100], got {self.max_waits}")
        if self.max_thinking is not None and self.min_thinking > self.max_thinking:
            raise ConfigError(f"min_thinking ({self.min_thinking}) is above max_thinking ({self.max_thinking})")
        self.waits = 0

    def start(self, gen) -> None:
        self.waits = 0
        self._answer_start = None
        self._step_end = 0  # thinking tokens at the last paragraph break
        self._budget: int | None | object = _UNSET  # budget_for(gen), asked once per run
        if self.cut == "probe":
            # the oracle's probe points and probe (EarlyExit's defaults, as harness.ORACLE_PROBES)
            self._steps, self._prober = StepPoints(), AnswerProbe()
            self._point: int | None = None  # thinking tokens at the last probe point
            self._reading: tuple[dict, str] | None = None  # a probe already read there

    def on_commit(self, gen, piece: str) -> Action | None:
        if gen.thinking and gen.thinking_text.endswith("\n\n"):
            self._step_end = gen.thinking_tokens
        return None

    def wants(self, hook: str, thinking: bool) -> bool:
        if hook == "on_commit":  # paragraph ends are tracked only for the step cut
            return thinking and self.cut == "step"
        # in the answer only an answer budget can act
        return thinking or self.answer_budget is not None

    def budget_for(self, gen) -> int | None:
        """The cap on thinking tokens for this run (None: no cap). Asked once per run, at the
        first thinking token, after :meth:`start`."""
        return self.max_thinking

    def _end_text(self, gen) -> str:
        if gen.thinking_tokens == 0:
            return self.close_tag + "\n\n"
        return self.end_message + self.close_tag + "\n\n"

    def on_token(self, gen, sampled) -> Action | None:
        eos = sampled.token in gen.eos and not gen.params.ignore_eos
        if not gen.parser.thinking:
            if self._answer_start is None:
                self._answer_start = gen.answer_tokens
            if self.answer_budget is not None and gen.answer_tokens - self._answer_start >= self.answer_budget and not eos:
                return Action(AnswerBudgetExhausted(gen.answer_tokens), stop=True, exit_reason="length")
            return None
        if self.cut == "probe":
            return self._probe_cut(gen, sampled, eos)
        n, budget = gen.stats.thinking_tokens, self._budget
        if budget is _UNSET:
            budget = self._budget = self.budget_for(gen)
        if not eos and n >= self.min_thinking and (budget is None or n < budget):
            return None  # the common case, decided without looking at the token's text
        closing = eos or gen.would_close_thinking(sampled.token)
        if closing and gen.thinking_tokens < self.min_thinking and self.waits < self.max_waits:
            self.waits += 1
            return Action(WaitInjected(gen.thinking_tokens, self.waits), text=self.wait_text)
        budget = self.budget_for(gen)
        if budget is not None and gen.thinking_tokens >= budget:
            # at the cap even a natural close is injected (an injected tag is not a thinking token)
            natural = closing and not eos
            if not natural and self.cut == "step" and 0 < self._step_end <= gen.thinking_tokens:
                # the unfinished step since the last paragraph break (none when the cap lands
                # exactly on the break) is rolled back; thinking closes at a finished step
                return Action(
                    BudgetExhausted(self._step_end, budget, cut="step"),
                    text=self.close_tag + "\n\n",
                    retract=gen.thinking_tokens - self._step_end,
                    exit_reason="budget",
                )
            kept = gen.thinking_tokens - gen.pending_tokens
            if natural:
                return Action(ThinkingClosedAtBudget(kept, budget), text=self.close_tag + "\n\n", retract=gen.pending_tokens)
            return Action(BudgetExhausted(kept, budget), text=self._end_text(gen), retract=gen.pending_tokens, exit_reason="budget")
        if eos:
            # the model stopped without closing its thinking: make it answer
            return Action(ThinkingUnclosed(gen.thinking_tokens), text=self._end_text(gen), retract=gen.pending_tokens)
        return None

    # -- cut="probe" --------------------------------------------------------------------------
    def _probe_cut(self, gen, sampled, eos: bool) -> Action | None:
        n = gen.thinking_tokens
        if n < self.min_thinking and self.waits < self.max_waits and (eos or gen.would_close_thinking(sampled.token)):
            self.waits += 1
            return Action(WaitInjected(n, self.waits), text=self.wait_text)
        if eos:
            return None  # thinking ended within the cap (or past it, in the first step): as the model chose
        if self._steps.starts_step(gen, sampled.token):
            self._point, self._reading = n, None
            action = self.on_step(gen)
            if action is not None:
                return action
        budget = self.budget_for(gen)
        if budget is None or n < budget or self._point is None:
            return None  # within the cap, or no step finished yet: the cut waits for the first
        # back to the last probe point (none to retract when it is here), then the probe's answer
        # ends thinking: read there now, or the one already read there
        reading = self._reading
        return Action(
            BudgetExhausted(self._point, budget, cut="probe"),
            retract=n - self._point,
            then=lambda g: (reading or self._prober.read(g))[1],
            exit_reason="budget",
        )

    def on_step(self, gen) -> Action | None:
        """``cut="probe"``: called at each probe point (``gen.thinking_tokens`` of them, the
        sampled token not yet committed) before the cap is checked. A subclass may probe here
        (``self._reading = self._prober.read(gen)``: a cut at this point then reuses it), change
        what :meth:`budget_for` says, or act."""
        return None


@dataclass
class LengthPredictor:
    """Budget from a prompt feature: ``budget = intercept + slope * prompt_tokens`` (a quantile
    line fitted on a calibration run), clipped to [low, high]."""

    intercept: float
    slope: float
    low: int = 0
    high: int = MAX_BUDGET

    def __call__(self, prompt_tokens: int) -> int:
        v = self.intercept + self.slope * prompt_tokens
        # A budget is a whole number of tokens: round up, but a value within float rounding of an
        # integer is that integer (a fitted 2.0000000000000004 * 25 means 50, not 51).
        return int(min(self.high, max(self.low, math.ceil(v - 1e-9 * max(1.0, abs(v))))))

    @classmethod
    def fit(cls, prompt_tokens: Sequence[int], thinking_tokens: Sequence[int], *, quantile: float = 0.9, margin: float = 0.0) -> "LengthPredictor":
        """Fit the line so that ``quantile`` of the calibration problems fit their budget:
        slope by least squares, intercept shifted to the quantile of the residuals (linear
        interpolation, as ``numpy.quantile``). Token counts are integers, so the fit is computed
        in exact rational arithmetic: an exact line gives exact budgets on every machine."""
        from fractions import Fraction

        if len(prompt_tokens) != len(thinking_tokens) or not thinking_tokens:
            raise ConfigError("the length predictor needs one thinking-token count per prompt, and at least one")
        if not 0 <= quantile <= 1:
            raise ConfigError(f"quantile must be in [0, 1], got {quantile}")
        x = [Fraction(v) for v in prompt_tokens]
        y = [Fraction(v) for v in thinking_tokens]
        n = len(x)
        sx, sy = sum(x), sum(y)
        sxx = sum(v * v for v in x)
        den = n * sxx - sx * sx
        slope = (n * sum(a * b for a, b in zip(x, y)) - sx * sy) / den if den else Fraction(0)
        icpt = (sy - slope * sx) / n
        resid = sorted(b - (icpt + slope * a) for a, b in zip(x, y))
        h = (n - 1) * Fraction(str(quantile))
        lo = int(h)
        q = resid[lo] + (h - lo) * (resid[min(lo + 1, n - 1)] - resid[lo])
        return cls(float(icpt + q) + margin, float(slope))

    def to_dict(self) -> dict:
        return {"intercept": self.intercept, "slope": self.slope, "low": self.low, "high": self.high}


@dataclass
class AdaptiveBudget(ThinkingBudget):
    """A :class:`ThinkingBudget` whose cap is chosen per query from the prompt length, the
    signal available before the first thinking token, by a fitted :class:`LengthPredictor`;
    ``scale`` trades accuracy for tokens along the curve."""

    predictor: LengthPredictor | None = None
    scale: float = 1.0
    name: str = field(default="adaptive_budget", init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.predictor is None:
            raise ConfigError("the adaptive budget needs a fitted predictor (edge-reason eval --calibrate)")
        if not 0 < self.scale <= 100:
            raise ConfigError(f"scale must be in (0, 100], got {self.scale}")

    def start(self, gen) -> None:
        super().start(gen)
        self.current = max(0, int(round(self.predictor(gen.stats.prompt_tokens) * self.scale)))
        if self.max_thinking is not None:
            self.current = min(self.current, self.max_thinking)
        gen.emit(BudgetChosen(self.current, gen.stats.prompt_tokens))

    def budget_for(self, gen) -> int | None:
        return self.current


@dataclass
class SignalBudget(ThinkingBudget):
    """A budget set by what the model shows while thinking: one probe, at the first probe point
    at or past ``first`` thinking tokens; if its answer finished with confidence >= ``threshold``
    the cap is ``low`` (a point at or past ``low`` stops right there), else ``high`` (None: no
    cap). Until that probe the cap is ``high``. Cuts are ``cut="probe"`` cuts, and the signal
    probe is one of them: a cut at its point reuses its answer. This is
    ``benchmarks/offline.py``'s ``signal_budget(first, threshold, low, high)``, live."""

    first: int = 0
    threshold: float = 0.9
    low: int = 0
    high: int | None = None
    cut: str = "probe"
    name: str = field(default="signal_budget", init=False)

    def __post_init__(self) -> None:
        if self.cut != "probe":
            raise ConfigError(f"the signal budget cuts at probe points (cut='probe'), got cut={self.cut!r}")
        if self.max_thinking is not None:
            raise ConfigError("the signal budget's caps are its low and high budgets; give no other thinking budget")
        super().__post_init__()
        check_budget("first", self.first, allow_none=False)
        check_budget("low", self.low, allow_none=False)
        check_budget("high", self.high)
        check_unit("threshold", self.threshold)
        if self.high is not None and self.low > self.high:
            raise ConfigError(f"the signal budget's low ({self.low}) is above its high ({self.high})")

    def start(self, gen) -> None:
        super().start(gen)
        self._current: int | None = self.high
        self._signal: dict | None = None

    def budget_for(self, gen) -> int | None:
        return self._current

    def on_step(self, gen) -> Action | None:
        n = gen.thinking_tokens
        if self._signal is not None or n < self.first:
            return None
        self._reading = self._prober.read(gen)
        trial = self._signal = self._reading[0]
        sure = bool(trial["finished"]) and trial["confidence"] >= self.threshold
        self._current = max(self.low, n) if sure else self.high
        gen.emit(BudgetFromProbe(self._current, n, round(trial["confidence"], 4), sure))
        return None
