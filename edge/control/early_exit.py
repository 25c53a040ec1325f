"""Early exit: stop thinking once the model is already confident of its answer.

At reasoning-step boundaries (the first token of a new paragraph, or a token that starts
"Wait", "Alternatively", ...), :class:`EarlyExit` *probes* the model (DEER, arXiv 2504.15895):
it appends an answer inducer such as ``</think>\\n\\n**Final Answer**\\n\\boxed{`` to the current
state, decodes a short trial answer greedily, reads its confidence, and rolls the probe back
(the KV cache is truncated, nothing is re-prefilled). It exits when

- ``mode="confidence"``: the trial's confidence (mean / min / geometric mean of its token
  probabilities) is >= ``threshold``;
- ``mode="consistency"``: the last ``k`` trial answers agree (Dynasor-CoT, arXiv 2412.20993);
- ``mode="both"``: either.

Probes cost tokens, so a cheap always-on signal decides when one is worth it (DeepConf-style,
arXiv 2508.15260): the mean probability of the main stream's last ``window`` thinking tokens
must be >= ``gate`` (0 disables the gate), at least ``min_gap`` thinking tokens must separate two
probes, and none runs before ``min_thinking`` tokens.

On exit, the sampled token is replaced by the inducer followed by the probe's answer, so the
answer is reused rather than decoded again; the model then finishes the reply itself.
Probe tokens are counted apart (``stats.probe_tokens``) so savings are quoted net of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from edge.control.base import Action, Controller
from edge.errors import ConfigError

DEFAULT_INDUCER = "</think>\n\n**Final Answer**\n\\boxed{"
DEFAULT_WORDS = ("Wait", "Alternatively", "Hmm", "But wait", "Let me double-check", "Double-check")
CONFIDENCE_KINDS = ("mean", "min", "geo")
MODES = ("confidence", "consistency", "both")


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
    if not thinking_text.strip() or not piece.strip():
        return False
    if thinking_text.endswith("\n\n"):
        return True
    if not (piece[0].isspace() or thinking_text[-1].isspace()):
        return False  # inside a word
    word = piece.strip()
    return any(w.split()[0] == word or (len(word) >= 4 and w.startswith(word)) for w in words)


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
    name: str = field(default="early_exit", init=False)

    def __post_init__(self) -> None:
        check_unit("threshold", self.threshold)
        check_unit("gate", self.gate)
        if self.confidence not in CONFIDENCE_KINDS:
            raise ConfigError(f"unknown confidence {self.confidence!r}; choose one of: {', '.join(CONFIDENCE_KINDS)}")
        if self.mode not in MODES:
            raise ConfigError(f"unknown early-exit mode {self.mode!r}; choose one of: {', '.join(MODES)}")
        if not 1 <= self.k <= 16:
            raise ConfigError(f"k must be in [1, 16], got {self.k}")
        for name in ("probe_max_tokens", "window", "min_gap", "min_thinking", "max_probes"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0 or v > 1_000_000:
                raise ConfigError(f"{name} must be a non-negative integer, got {v!r}")
        if self.probe_max_tokens < 1:
            raise ConfigError("probe_max_tokens must be >= 1")
        self.start(None)

    @property
    def needs_logprobs(self) -> bool:
        return self.gate > 0

    def start(self, gen) -> None:
        self.trials: list[dict] = []
        self._last_probe_at = -(10**9)

    def stream_confidence(self, gen) -> float:
        lps = gen.thinking_logprobs[-self.window :]
        return sum(math.exp(x) for x in lps) / len(lps) if lps else 0.0

    def should_probe(self, gen, piece: str) -> bool:
        if not gen.thinking or gen.pending_bytes:
            return False
        if len(self.trials) >= self.max_probes:
            return False
        n = gen.thinking_tokens
        if n < max(1, self.min_thinking) or n - self._last_probe_at < self.min_gap:
            return False
        if not is_boundary(gen.thinking_text, piece, self.words):
            return False
        return self.gate <= 0 or self.stream_confidence(gen) >= self.gate

    def decide(self) -> bool:
        last = self.trials[-1]
        by_conf = last["confidence"] >= self.threshold and last["finished"]
        answers = [t["answer"] for t in self.trials[-self.k :]]
        by_cons = len(answers) == self.k and all(a == answers[0] and a for a in answers) and all(t["finished"] for t in self.trials[-self.k :])
        if self.mode == "confidence":
            return by_conf
        if self.mode == "consistency":
            return by_cons
        return by_conf or by_cons

    def on_token(self, gen, sampled) -> Action | None:
        if sampled.token in gen.backend.eos_token_ids or gen.would_close_thinking(sampled.token):
            return None
        piece = gen.piece(sampled.token)
        if not self.should_probe(gen, piece):
            return None
        res = gen.probe(self.inducer, max_tokens=self.probe_max_tokens, stop=self.answer_stop)
        self._last_probe_at = gen.thinking_tokens
        trial = {
            "at": gen.thinking_tokens,
            "answer": boxed_answer(res.text),
            "confidence": res.confidence(self.confidence),
            "finished": res.finished,
            "cost": res.cost,
        }
        self.trials.append(trial)
        gen.emit("probe", **trial)
        if self.record_only or not self.decide():
            return None
        return Action(
            "early_exit",
            text=self.inducer + res.text,
            exit_reason="early_exit",
            detail={"thinking_tokens": gen.thinking_tokens, "answer": trial["answer"], "confidence": round(trial["confidence"], 4), "probes": len(self.trials)},
        )
