"""One sampling/generation parameter object, passed down every layer unchanged."""

from __future__ import annotations

from dataclasses import dataclass, replace

from edge.errors import ConfigError


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are chosen and how long generation may run.

    ``temperature == 0`` means greedy decoding. ``max_tokens`` bounds every generated token
    (thinking and answer); thinking-specific limits live in the budget controllers.
    """

    temperature: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None
    max_tokens: int = 4096
    stop: tuple[str, ...] = ()
    top_logprobs: int = 0
    logprobs: bool = False
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p < 1:
            raise ConfigError(f"min_p must be in [0, 1), got {self.min_p}")
        if self.repeat_penalty <= 0:
            raise ConfigError(f"repeat_penalty must be > 0, got {self.repeat_penalty}")
        if self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.top_logprobs < 0 or self.top_logprobs > 20:
            raise ConfigError(f"top_logprobs must be in [0, 20], got {self.top_logprobs}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def with_(self, **changes) -> "SamplingParams":
        return replace(self, **changes)


GREEDY = SamplingParams(temperature=0.0, top_p=1.0)
