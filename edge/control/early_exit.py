"""Early exit: stop thinking once the model is already confident of its answer.

At reasoning-step boundaries (the first token of a new paragraph, or a token that starts
"Wait", "Alternatively", ...), :class:`EarlyExit` *probes* the model (DEER, arXiv 2504.15895):
it appends an answer inducer such as ``</think>\\n\\n**Final Answer**\\n\\boxed{`` to the current
state, decodes a short trial answer greedily, reads its confidence, and rolls the probe back
(the KV cache is truncated, nothing is re-prefilled). It exits when

- ``mode="confidence"``: the trial's confidence (mean / min / geometric mean of its token
  probabilities) is >= ``threshold``;
- ``mode="consistency"``: the last ``k`` trial answers agree (Dynasor-CoT, arXiv 2412.20993);
- ``mode="both"``: either;
- ``mode="calibrated"``: a :class:`Calibration` fitted on a validation run turns the trial's
  confidence, the agreement of consecutive trials and whether the answer finished into a
  probability that the answer is right, which must be >= ``threshold``.

Probes cost tokens, so a cheap always-on signal decides when one is worth it (DeepConf-style,
arXiv 2508.15260): the mean probability of the main stream's last ``window`` thinking tokens
must be >= ``gate`` (0 disables the gate), at least ``min_gap`` thinking tokens must separate two
probes, and none runs before ``min_thinking`` tokens. The gate keeps references to the logits of
those ``window`` tokens and reads them only at a step boundary: first an upper bound on each
token's probability from the largest other logit (a max per row), and the exact softmax only when
that bound does not already close the gate; there is no per-token log-softmax over the vocabulary.

On exit, the sampled token is replaced by the inducer followed by the probe's answer, so the
answer is reused rather than decoded again; the model then finishes the reply itself.
Probe tokens are counted apart (``stats.probe_tokens``) so savings are quoted net of them.
"""

from __future__ import annotations

import functools
import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from edge.control.base import Action, Controller
from edge.errors import ConfigError
from edge.events import EarlyExited, Probe

_NEVER, _PLAIN, _WORD, _WORD_INNER = range(4)
DEFAULT_INDUCER = "</think>\n\n**Final Answer**\n\\boxed{"
DEFAULT_WORDS = ("Wait", "Alternatively", "Hmm", "But wait", "Let me double-check", "Double-check")
CONFIDENCE_KINDS = ("mean", "min", "geo")
MODES = ("confidence", "consistency", "both", "calibrated")
MAX_STREAK = 3


def probe_features(trials) -> list[float]:
    """What a calibrated gate reads from the probes so far (the last one is being judged):
    a bias, the logit of its confidence, how many probes in a row before it gave the same
    answer (capped at ``MAX_STREAK``), and whether its answer finished within the probe."""
    last = trials[-1]
    c = min(max(float(last["confidence"]), 1e-6), 1 - 1e-6)
    streak = 0
    for t in reversed(trials[:-1]):
        if not last["answer"] or t["answer"] != last["answer"] or streak >= MAX_STREAK:
            break
        streak += 1
    return [1.0, math.log(c / (1 - c)), float(streak), 1.0 if last["finished"] else 0.0]


@dataclass(frozen=True)
class Calibration:
    """A logistic model of "this probe's answer is right" over :func:`probe_features`, fitted on
    the probes of a validation run (``python -m edge.benchmarks.offline``). Raw probe confidence
    is not a probability of being right: a small model is sure of wrong answers."""

    weights: tuple[float, ...]
    source: str = ""

    def __post_init__(self) -> None:
        if len(self.weights) != 4 or not all(isinstance(w, (int, float)) and math.isfinite(w) for w in self.weights):
            raise ConfigError(f"a calibration has 4 finite weights, got {self.weights!r}")

    def probability(self, trials) -> float:
        return self.probability_of(probe_features(trials))

    def probability_of(self, features) -> float:
        """The probability for one row of :func:`probe_features`."""
        z = sum(w * float(x) for w, x in zip(self.weights, features))
        return 1.0 / (1.0 + math.exp(-max(min(z, 60.0), -60.0)))

    def to_dict(self) -> dict:
        return {"weights": list(self.weights), "features": ["bias", "logit_confidence", "agreement_streak", "finished"], "source": self.source}

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        try:
            return cls(tuple(float(w) for w in d["weights"]), str(d.get("source", "")))
        except (KeyError, TypeError, ValueError):
            raise ConfigError("a calibration needs a 'weights' list of 4 numbers") from None

    @classmethod
    def load(cls, path) -> "Calibration":
        import json
        from pathlib import Path

        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read the calibration {path}: {exc}") from None


def check_unit(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= float(value) <= 1.0 or math.isnan(value):
        raise ConfigError(f"{name} must be in [0, 1], got {value!r}")


def boxed_answer(text: str) -> str:
    """The trial answer inside the probe's ``\\boxed{...}``: text up to the closing brace."""
    depth = 0
    for i, ch in enumerate(text):
        if ch == "{":
            depth += 1
        elif ch == "}":
            if depth == 0:
                return text[:i].strip()
            depth -= 1
    return text.strip()


def is_boundary(thinking_text: str, piece: str, words=DEFAULT_WORDS) -> bool:
    """True when ``piece`` (the token about to be committed) starts a new reasoning step: the
    first non-blank token of a paragraph, or a token that begins a reflection word."""
    if not thinking_text or not piece or thinking_text.isspace() or piece.isspace():
        return False
    if thinking_text.endswith("\n\n"):
        return True
    if not (piece[0].isspace() or thinking_text[-1].isspace()):
        return False  # inside a word
    word = piece.strip()
    first_words, words = _first_words(tuple(words))
    return word in first_words or (len(word) >= 4 and any(w.startswith(word) for w in words))


@functools.lru_cache(maxsize=16)
def _first_words(words: tuple[str, ...]) -> tuple[frozenset[str], tuple[str, ...]]:
    """The first word of each reflection phrase ("But wait" -> "But")."""
    return frozenset(w.split()[0] for w in words if w.split()), words


class StepPoints:
    """Where :class:`EarlyExit` may probe: the step boundaries of the thinking, decided on the
    token about to be committed (``n`` thinking tokens are committed; the point is ``n``).

    :meth:`starts_step` is ``is_boundary(thinking text, token text)`` for a token that neither
    ends the reply nor closes thinking, at a whole character, after at least one thinking token.
    Every policy that cuts "at a probe point" (the oracle's probes, early exit, budgets with
    ``cut="probe"``) asks this one rule, so their points are the same. It runs at every thinking
    token: each token id's text is classified once (see :meth:`_kind`)."""

    def __init__(self, words=DEFAULT_WORDS) -> None:
        self.words = tuple(words)
        self._kinds: dict[int, int] = {}  # token id -> what its text alone says about starting a step

    def starts_step(self, gen, token: int) -> bool:
        """True when ``token``, sampled while thinking, starts a new step (see the class)."""
        if gen.pending_bytes or gen.thinking_tokens < 1:
            return False
        kind = self._kinds.get(token)
        if kind is None:
            kind = self._kinds[token] = self._kind(gen, token)
        if kind == _NEVER or (gen.parser.held and gen.would_close_thinking(token)):
            return False
        text = gen.thinking_text
        if not text or text.isspace():
            return False
        return text.endswith("\n\n") or not (kind == _PLAIN or (kind == _WORD_INNER and not text[-1].isspace()))

    def _kind(self, gen, token: int) -> int:
        """Classify a token by its text alone: _NEVER (end of sequence, contains the closing
        tag, or blank), _PLAIN (starts a step only after a blank line), _WORD (a reflection word
        with its leading space: starts a step after any non-blank text) or _WORD_INNER (a
        reflection word without the space: only after whitespace)."""
        piece = gen.piece(token)
        if token in gen.eos or gen.parser.tags.close in piece or not piece or piece.isspace():
            return _NEVER
        if not is_boundary("x ", piece, self.words):
            return _PLAIN
        return _WORD if is_boundary("x", piece, self.words) else _WORD_INNER


@dataclass(frozen=True)
class AnswerProbe:
    """The probe: append the answer ``inducer`` (closing thinking), decode a short trial answer
    greedily up to ``answer_stop`` or ``max_tokens``, read its ``confidence``, roll it back.
    :meth:`read` gives the trial (as :class:`~edge.events.Probe` reports it, and as the oracle
    records it) and the text that ends thinking with that answer: the inducer and the trial's
    tokens, which under greedy decoding is what the model would write after the inducer."""

    inducer: str = DEFAULT_INDUCER
    answer_stop: tuple[str, ...] = ("}",)
    max_tokens: int = 16
    confidence: str = "mean"

    def read(self, gen, *, stream: float | None = None) -> tuple[dict, str]:
        chars = len(gen.thinking_text)
        res = gen.probe(self.inducer, max_tokens=self.max_tokens, stop=self.answer_stop)
        trial = {
            "at": gen.thinking_tokens,
            "answer": boxed_answer(res.text),
            "confidence": res.confidence(self.confidence),
            "finished": res.finished,
            "cost": res.cost,
            "chars": chars,
            "stream": stream,
        }
        gen.emit(Probe(**trial))
        return trial, self.inducer + res.text


@dataclass
class EarlyExit(Controller):
    threshold: float = 0.95
    confidence: str = "mean"
    mode: str = "confidence"
    k: int = 2
    inducer: str = DEFAULT_INDUCER
    answer_stop: tuple[str, ...] = ("}",)
    probe_max_tokens: int = 16
    words: tuple[str, ...] = DEFAULT_WORDS
    gate: float = 0.0
    window: int = 16
    min_gap: int = 0
    min_thinking: int = 0
    max_probes: int = 64
    record_only: bool = False
    calibration: Calibration | None = None
    name: str = field(default="early_exit", init=False)

    def __post_init__(self) -> None:
        check_unit("threshold", self.threshold)
        check_unit("gate", self.gate)
        if self.confidence not in CONFIDENCE_KINDS:
            raise ConfigError(f"unknown confidence {self.confidence!r}; choose one of: {', '.join(CONFIDENCE_KINDS)}")
        if self.mode not in MODES:
            raise ConfigError(f"unknown early-exit mode {self.mode!r}; choose one of: {', '.join(MODES)}")
        if self.mode == "calibrated" and self.calibration is None:
            raise ConfigError("the calibrated early-exit gate needs a calibration (fitted on a validation run)")
        self.words = tuple(self.words)
        if not 1 <= self.k <= 16:
            raise ConfigError(f"k must be in [1, 16], got {self.k}")
        for name in ("probe_max_tokens", "window", "min_gap", "min_thinking", "max_probes"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0 or v > 1_000_000:
                raise ConfigError(f"{name} must be a non-negative integer, got {v!r}")
        if self.probe_max_tokens < 1:
            raise ConfigError("probe_max_tokens must be >= 1")
        if self.window < 1:
            raise ConfigError("window must be >= 1")
        self.prober = AnswerProbe(self.inducer, tuple(self.answer_stop), self.probe_max_tokens, self.confidence)
        self.start(None)

    def start(self, gen) -> None:
        self.trials: list[dict] = []
        self._last_probe_at = -(10**9)
        # (logits sampled from, token, index in gen.generated) of the last thinking tokens
        # sampled; whether each was committed is checked only when the gate is read
        self._recent: deque[tuple[np.ndarray, int, int]] = deque(maxlen=2 * self.window)
        self._steps = StepPoints(self.words)

    def _window_logits(self, gen) -> tuple[np.ndarray, np.ndarray]:
        """The logits (one row per token, a fresh array) and tokens of the last ``window``
        committed thinking tokens."""
        generated = gen.generated
        committed = {at: (lg, tok) for lg, tok, at in self._recent if at < len(generated) and generated[at] == tok}
        recent = [committed[at] for at in sorted(committed)][-self.window :]
        if not recent:
            return np.empty((0, 0)), np.empty(0, dtype=np.int64)
        return np.stack([lg for lg, _ in recent]), np.array([t for _, t in recent], dtype=np.int64)

    @staticmethod
    def _mean_prob(x: np.ndarray, toks: np.ndarray) -> float:
        x = x.astype(np.float64)
        m = x.max(axis=1)
        lse = m + np.log(np.exp(x - m[:, None]).sum(axis=1))
        return float(np.exp(x[np.arange(len(toks)), toks] - lse).mean())

    def stream_confidence(self, gen) -> float:
        """Mean probability of the last ``window`` committed thinking tokens."""
        x, toks = self._window_logits(gen)
        return self._mean_prob(x, toks) if len(toks) else 0.0

    def gate_open(self, gen) -> bool:
        """``stream_confidence(gen) >= gate``, decided without exponentials over the
        vocabulary when it is closed: a token's probability is at most
        1 / (1 + exp(l_other - l_token)) for the largest other logit, so when the mean of
        these bounds is below the gate, so is the confidence (only a max per row)."""
        x, toks = self._window_logits(gen)
        if not len(toks):
            return False
        rows = np.arange(len(toks))
        chosen = x[rows, toks].copy()
        x[rows, toks] = -np.inf
        other = x.max(axis=1)
        bound = sum(1.0 / (1.0 + math.exp(min(o - c, 700.0))) for o, c in zip(other.tolist(), chosen.tolist())) / len(toks)
        if bound < self.gate - 1e-9:
            return False
        x[rows, toks] = chosen
        return self._mean_prob(x, toks) >= self.gate

    def decide(self) -> bool:
        last = self.trials[-1]
        if self.mode == "calibrated":
            return last["finished"] and self.calibration.probability(self.trials) >= self.threshold
        by_conf = last["confidence"] >= self.threshold and last["finished"]
        answers = [t["answer"] for t in self.trials[-self.k :]]
        by_cons = len(answers) == self.k and all(a == answers[0] and a for a in answers) and all(t["finished"] for t in self.trials[-self.k :])
        if self.mode == "confidence":
            return by_conf
        if self.mode == "consistency":
            return by_cons
        return by_conf or by_cons

    def wants(self, hook: str, thinking: bool) -> bool:
        return hook == "on_token" and thinking  # nothing to do once thinking is over

    def on_token(self, gen, sampled) -> Action | None:
        # This runs at every thinking token, so it is written for speed: the cheap tests (the
        # probe schedule) come first; the outcome is that of StepPoints.starts_step plus the gate.
        token, thinking = sampled.token, gen.parser.thinking
        if thinking and (self.gate > 0 or self.record_only):
            # the gate (and the oracle's record) keeps the logits and normalizes them only when read
            self._recent.append((gen.logits, token, len(gen.generated)))
        if not thinking or gen.pending_bytes or len(self.trials) >= self.max_probes:
            return None
        n = gen.stats.thinking_tokens
        if n < self.min_thinking or n < 1 or n - self._last_probe_at < self.min_gap:
            return None
        if not self._steps.starts_step(gen, token):
            return None
        if self.gate > 0 and not self.gate_open(gen):
            return None
        return self.probe_step(gen)

    def probe_step(self, gen) -> Action | None:
        """Probe now: record the trial, and return the exit action when :meth:`decide` says
        the answer is settled (subclasses that choose their own probe points call this)."""
        stream = round(self.stream_confidence(gen), 6) if self.gate > 0 or self.record_only else None
        trial, text = self.prober.read(gen, stream=stream)
        self._last_probe_at = gen.thinking_tokens
        self.trials.append(trial)
        if self.record_only or not self.decide():
            return None
        return Action(
            EarlyExited(gen.thinking_tokens, trial["answer"], round(trial["confidence"], 4), len(self.trials)),
            text=text,
            exit_reason="early_exit",
        )
