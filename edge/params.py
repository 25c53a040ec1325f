"""One sampling/generation parameter object, passed down every layer unchanged.

Every value is checked here and nowhere else: the CLI options, the server's request fields and
the Python API all build a :class:`SamplingParams`, so a bad value (NaN, infinity, out of range,
wrong type) is the same :class:`~edge.errors.ConfigError` wherever it came from, with the field
named in ``.param``.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable

from edge.errors import ConfigError

RANDOM_SEED = -1
"""``seed=-1`` asks for a random seed, as in llama.cpp (the same as ``seed=None``)."""

MAX_SEED = 2**64 - 1
MAX_TOP_LOGPROBS = 20
"""The most alternatives a token's logprobs may list (OpenAI's limit)."""


def _interval(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    if hi is None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if lo is None:
        return f"{'<' if hi_open else '<='} {hi:g}"
    return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"


def check_real(name: str, value: object, lo: float | None = None, hi: float | None = None, *,
               lo_open: bool = False, hi_open: bool = False) -> float:
    """``value`` as a finite float within the bounds, else a ConfigError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a number, got {value!r}", param=name)
    v = float(value)
    if not math.isfinite(v):
        raise ConfigError(f"{name} must be a finite number, got {v}", param=name)
    if (lo is not None and (v < lo or (lo_open and v == lo))) or (hi is not None and (v > hi or (hi_open and v == hi))):
        raise ConfigError(f"{name} must be {_interval(lo, hi, lo_open, hi_open)}, got {value}", param=name)
    return v


def check_int(name: str, value: object, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an int within [lo, hi] (a float with no fraction counts), else a ConfigError."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be an integer, got {value!r}", param=name)
    v = int(value)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ConfigError(f"{name} must be {_interval(lo, hi, False, False)}, got {v}", param=name)
    return v


def check_seed(value: object) -> int | None:
    """A sampling seed: an integer >= 0, or None / -1 for a random one (as llama.cpp)."""
    if value is None:
        return None
    seed = check_int("seed", value)
    if seed == RANDOM_SEED:
        return None
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed must be an integer in [0, 2**64 - 1], or -1 for a random seed; got {seed}", param="seed")
    return seed


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{name} must be true or false, got {value!r}", param=name)
    return value


def _check_auto_bool(name: str, value: object) -> bool | None:
    if value is not None and not isinstance(value, bool):
        raise ConfigError(f"{name} must be true, false or null (auto), got {value!r}", param=name)
    return value


def _check_stop(value: object) -> tuple[str, ...]:
    stop = (value,) if isinstance(value, str) else value
    try:
        stop = tuple(stop)  # type: ignore[arg-type]
    except TypeError:
        stop = None
    if stop is None or not all(isinstance(s, str) for s in stop):
        raise ConfigError(f"stop must be a string or a list of strings, got {value!r}", param="stop")
    return stop


def offered(*flags: str, help: str | Callable[[], str] | None = None, request: bool = False, **cli: Any) -> dict:
    """Field metadata: how a field is offered to users, declared once with the field.

    ``flags``: its command-line option in click's spelling (``"--speculate/--no-speculate"``
    for a switch), with ``help`` (a text, or a function that makes it when the option is made)
    and any other click keywords in ``cli`` (``metavar``, ``show_default``);
    :func:`edge.cli.options.options_from` makes the click option from this, with the field's
    name, type and default. ``request``: the server takes a request field of the same name,
    passed as sent (:func:`request_fields`)."""
    return {"flags": flags, "help": help, "request": request, "cli": cli}


@dataclass(frozen=True)
class SamplingParams:
    """How tokens are chosen and how long generation may run.

    ``temperature == 0`` means greedy decoding. ``max_tokens`` bounds every generated token
    (thinking and answer); thinking-specific limits live in the budget controllers. ``seed``
    None or -1 draws a random seed; ``repeat_last_n`` -1 looks at the whole history.
    ``speculate``: speculative decoding from n-gram lookup over the prompt and the trace
    (:mod:`edge.speculative`): the same distribution, fewer model steps when the trace repeats
    itself. None (the default) is *auto*: on where this machine's measured batch-cost curve lets
    drafts pay (llama.cpp; see :func:`edge.speculative.decide`), each step's draft then chosen
    from the live acceptance rate; True: on even where the curve says drafts cannot pay;
    False: off. Greedy output is the same tokens as without it: a :class:`~edge.runtime.Runtime`
    drafts no further than the largest batch llama.cpp computes bit for bit as one-token steps
    (measured per model and settings), and where not even 2 rows are (flash attention off on a
    quantized model) auto does not speculate and True says it is not token-exact.
    ``logprobs`` asks the loop for a :class:`~edge.events.TokenLogprobs` event per model token
    (with the ``top_logprobs`` most likely alternatives); injected text gets none.
    """

    temperature: float = field(default=0.6, metadata=offered("--temperature", "--temp", help="0 = greedy.", request=True))
    top_p: float = field(default=0.95, metadata=offered("--top-p", request=True))
    top_k: int = field(default=0, metadata=offered("--top-k", help="0 = off.", request=True))
    min_p: float = field(default=0.0, metadata=offered("--min-p", request=True))
    repeat_penalty: float = field(default=1.0, metadata=offered("--repeat-penalty", request=True))
    repeat_last_n: int = 64
    seed: int | None = field(default=None, metadata=offered(
        "--seed", help="Sampling seed (runs are reproducible with one); -1 or none = random, as in llama.cpp.", request=True))
    # the server reads max_tokens against its own limits (edge.server.protocol)
    max_tokens: int = field(default=4096, metadata=offered("--max-tokens", help="Cap on generated tokens (thinking + answer)."))
    stop: tuple[str, ...] = ()
    top_logprobs: int = 0
    logprobs: bool = False
    ignore_eos: bool = False
    # records written before the field existed ran without speculation ("absent": what such a
    # record's run had; the eval harness resumes their journals with it)
    speculate: bool | None = field(default=None, metadata=dict(absent=False, **offered(
        "--speculate/--no-speculate",
        help="Speculative decoding from n-gram lookup over the prompt and the reasoning so far: fewer model steps "
             "when the trace repeats itself, the same output (drafts no longer than the batches llama.cpp computes "
             "exactly as one-token steps; a quantized model needs --flash-attn for that, else auto stays off). Default: "
             "auto, on where this machine's batch cost lets drafts pay (measured once per model and threads, "
             "cached), drafting only while drafts are accepted; --speculate: on even where the cost says no; "
             "--no-speculate: off (plain decoding exactly).", request=True)))

    def __post_init__(self) -> None:
        checked = {
            "temperature": check_real("temperature", self.temperature, 0.0),
            "top_p": check_real("top_p", self.top_p, 0.0, 1.0, lo_open=True),
            "top_k": check_int("top_k", self.top_k, 0),
            "min_p": check_real("min_p", self.min_p, 0.0, 1.0, hi_open=True),
            "repeat_penalty": check_real("repeat_penalty", self.repeat_penalty, 0.0, lo_open=True),
            "repeat_last_n": check_int("repeat_last_n", self.repeat_last_n, -1),
            "seed": check_seed(self.seed),
            "max_tokens": check_int("max_tokens", self.max_tokens, 1),
            "stop": _check_stop(self.stop),
            "top_logprobs": check_int("top_logprobs", self.top_logprobs, 0, MAX_TOP_LOGPROBS),
            "logprobs": _check_bool("logprobs", self.logprobs),
            "ignore_eos": _check_bool("ignore_eos", self.ignore_eos),
            "speculate": _check_auto_bool("speculate", self.speculate),
        }
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def with_(self, **changes) -> "SamplingParams":
        return replace(self, **changes)


def request_fields(cls: type = SamplingParams) -> tuple[str, ...]:
    """The fields of ``cls`` a server request may set by name, as sent (see :func:`offered`)."""
    return tuple(f.name for f in fields(cls) if f.metadata.get("request"))


GREEDY = SamplingParams(temperature=0.0, top_p=1.0)
