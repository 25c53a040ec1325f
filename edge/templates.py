"""Chat templates: the model's own Jinja template, rendered in a sandbox, on a budget.

The template comes from the GGUF (``tokenizer.chat_template``) or a tokenizer_config.json.
Rendering uses jinja2's ImmutableSandboxedEnvironment with the conventions Hugging Face
templates rely on (``trim_blocks``, ``lstrip_blocks``, ``raise_exception``, ``strftime_now``).
A model without a template falls back to ChatML, and the fallback is reported, not hidden.

A template is untrusted input (anyone can publish a GGUF), so every render has a budget,
:class:`TemplateLimits`: a wall-clock limit (compiling included) enforced by
:func:`edge.deadline.call_with_deadline` - the render runs in the calling thread and is stopped
at its next bytecode, which frees the core - and a limit on the characters of output, counted
while the template generates. Operations that would spend long in one C call (a huge ``**``,
``"x" * n``, a format width of a billion) are refused before they run, since no deadline can
stop them midway. Every failure is a :class:`~edge.errors.ChatTemplateError` whose message
starts with ``chat template:``; a template's own ``raise_exception`` is a
:class:`~edge.errors.PromptError` (it refuses these messages).

llama-cpp-python never sees the template: :mod:`edge.backends.llamacpp` hides it from
``Llama``'s own chat formatter, so this module is the only renderer.

``thinking_open(prompt)`` tells whether the generation prompt already opened a think block
(DeepSeek-R1-Distill templates end with ``<think>\\n``), so the parser starts in thinking mode.
"""

from __future__ import annotations

import datetime
import functools
import logging
import math
import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from edge.deadline import DeadlineExceeded, call_with_deadline
from edge.errors import ChatTemplateError, ConfigError, PromptError
from edge.think import DEFAULT_TAGS, TagPair

log = logging.getLogger(__name__)

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ROLES = ("system", "user", "assistant", "tool")

#: the largest integer one ``*`` or ``**`` may build (bits): big-int arithmetic is one C call
MAX_INT_BITS = 1 << 16


@dataclass(frozen=True)
class TemplateLimits:
    """The budget of one render: wall-clock seconds (compiling included) and characters of output."""

    timeout_s: float = 2.0
    max_chars: int = 4 << 20

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ConfigError(f"the chat template time limit must be > 0 seconds, got {self.timeout_s}")
        if self.max_chars < 1:
            raise ConfigError(f"the chat template output limit must be >= 1 character, got {self.max_chars}")


DEFAULT_LIMITS = TemplateLimits()


class _TemplateError(Exception):
    """``raise_exception(...)`` called by the template: it refuses these messages."""


class _OverBudget(Exception):
    """The template tried to build something larger than its budget allows."""


def _raise(message: str):
    raise _TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


_DIGITS = re.compile(r"\d+")
_NESTED_FIELD = re.compile(r"\{[^{}]*\{")


def _check_ints(values: Iterable[Any], limit: int, what: str) -> None:
    for v in values:
        if isinstance(v, int) and abs(v) > limit:
            raise _OverBudget(f"{what} {v} is over the limit of {limit}")


def _check_format(fmt: str, args: Iterable[Any], limit: int, nested: bool) -> None:
    """Refuse a format string (``%`` or ``str.format``) whose widths could exceed ``limit``."""
    for m in _DIGITS.finditer(fmt):
        if len(m.group()) > 9 or int(m.group()) > limit:
            raise _OverBudget(f"format width {m.group()} is over the limit of {limit}")
    if nested:  # widths taken from the arguments
        _check_ints(args, limit, "format width")


def _binop_check(op: str, left: Any, right: Any, limit: int) -> None:
    if op == "%":
        if isinstance(left, str):
            values = right if isinstance(right, tuple) else right.values() if isinstance(right, Mapping) else (right,)
            _check_format(left, values, limit, "*" in left)
        return
    ints = isinstance(left, int) and isinstance(right, int)
    if op == "**":
        if ints and right > 0 and abs(left) > 1 and right * math.log2(abs(left)) > MAX_INT_BITS:
            raise _OverBudget(f"{left} ** {right} has more than {MAX_INT_BITS} bits")
    elif ints:  # "*"
        if left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise _OverBudget(f"a product of more than {MAX_INT_BITS} bits")
    else:  # "*" repeating a string or a list
        seq, n = (left, right) if isinstance(right, int) else (right, left)
        if isinstance(n, int) and hasattr(seq, "__len__") and len(seq) * n > limit:
            raise _OverBudget(f"{len(seq)} items repeated {n} times are over the limit of {limit}")


_PADDING = frozenset({"ljust", "rjust", "center", "zfill", "expandtabs"})


def _checked_filters(filters: dict, limit: int) -> dict:
    """Jinja's filters that pad or format, refusing sizes over ``limit`` before they run."""

    def guard(name: str, check):
        inner = filters[name]

        @functools.wraps(inner)  # keeps jinja's pass_eval_context marks
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            check(*args, **kwargs)
            return inner(*args, **kwargs)

        return wrapper

    def ints(*args: Any, **kwargs: Any) -> None:
        _check_ints([*args, *kwargs.values()], limit, "size")

    def indent(s: Any, width: Any = 4, *args: Any, **kwargs: Any) -> None:
        width = kwargs.get("width", width)
        per_line = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        if per_line * (str(s).count("\n") + 1) > limit:
            raise _OverBudget(f"indenting by {per_line} is over the limit of {limit}")

    def fmt(value: Any, *args: Any, **kwargs: Any) -> None:
        text = str(value)
        _check_format(text, [*args, *kwargs.values()], limit, "*" in text)

    return {
        "center": guard("center", ints),
        "wordwrap": guard("wordwrap", ints),
        "tojson": guard("tojson", ints),
        "indent": guard("indent", indent),
        "format": guard("format", fmt),
    }


@functools.lru_cache(maxsize=1)
def _environment_class():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BudgetedSandbox(ImmutableSandboxedEnvironment):
        """The sandbox, plus size checks on the operations that would run long in one C call.
        Intercepted operators are also never folded at compile time (``{{ 10 ** 10 ** 9 }}``
        would otherwise be computed while compiling)."""

        intercepted_binops = frozenset({"*", "**", "%"})

        def __init__(self, max_chars: int, **kw: Any) -> None:
            super().__init__(**kw)
            self.max_chars = max_chars
            self.filters.update(_checked_filters(self.filters, max_chars))

        def call_binop(self, context, operator: str, left: Any, right: Any) -> Any:
            _binop_check(operator, left, right, self.max_chars)
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - jinja's signature
            if getattr(__obj, "__name__", None) in _PADDING and isinstance(getattr(__obj, "__self__", None), str):
                _check_ints([*args, *kwargs.values()], __self.max_chars, "size")
            return super().call(__context, __obj, *args, **kwargs)

        def wrap_str_format(self, value: Any):
            wrapper = super().wrap_str_format(value)
            if wrapper is None:
                return None
            fmt, limit = value.__self__, self.max_chars
            nested = bool(_NESTED_FIELD.search(fmt))

            @functools.wraps(wrapper)
            def checked(*args: Any, **kwargs: Any) -> str:
                values = [*args, *kwargs.values()]
                if value.__name__ == "format_map" and args and isinstance(args[0], Mapping):
                    values = list(args[0].values())
                _check_format(fmt, values, limit, nested)
                return wrapper(*args, **kwargs)

            return checked

    return BudgetedSandbox


@functools.lru_cache(maxsize=16)
def _compile(source: str, max_chars: int):
    """The compiled template (raises jinja's TemplateSyntaxError); cached per source and limit."""
    env = _environment_class()(max_chars, trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _generate(source: str, context: dict[str, Any], max_chars: int) -> str:
    """Render ``source``, stopping as soon as the output passes ``max_chars`` characters."""
    parts, n = [], 0
    stream = _compile(source, max_chars).generate(**context)
    try:
        for part in stream:
            n += len(part)
            if n > max_chars:
                raise _OverBudget(f"the output passed {max_chars} characters, the limit")
            parts.append(part)
    finally:
        stream.close()
    return "".join(parts)


def validate_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if not messages:
        raise PromptError("no messages given")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise PromptError(f"message {i} needs 'role' and 'content'")
        if m["role"] not in ROLES:
            raise PromptError(f"message {i} has unknown role {m['role']!r}; use one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise PromptError(f"message {i}: content must be a string")
        out.append(dict(m))
    if not any(m["role"] == "user" and m["content"].strip() for m in out):
        raise PromptError("the prompt is empty: give a user message with some text")
    return out


@dataclass(frozen=True)
class ChatTemplate:
    source: str
    bos_token: str = ""
    eos_token: str = ""
    name: str = "model"  # model | given | fallback:chatml

    @classmethod
    def from_model(cls, template: str | None, *, bos_token: str = "", eos_token: str = "") -> "ChatTemplate":
        if template:
            return cls(template, bos_token, eos_token, "model")
        log.warning("the model has no chat template; falling back to ChatML")
        return cls(CHATML, bos_token, eos_token, "fallback:chatml")

    @property
    def origin(self) -> str:
        return {"model": "the model's template", "given": "the given template"}.get(self.name, "the ChatML fallback")

    def check(self, limits: TemplateLimits = DEFAULT_LIMITS) -> None:
        """Compile now, within the time limit: a template that does not parse is refused when a
        model loads, not at its first request."""
        self._bounded(lambda: _compile(self.source, limits.max_chars), limits)

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        limits: TemplateLimits = DEFAULT_LIMITS,
        **extra: Any,
    ) -> str:
        msgs = validate_messages(messages)
        context = dict(messages=msgs, add_generation_prompt=add_generation_prompt, bos_token=self.bos_token, eos_token=self.eos_token, **extra)
        return self._bounded(lambda: _generate(self.source, context, limits.max_chars), limits)

    def _bounded(self, work, limits: TemplateLimits):
        """``work()`` within the time limit, every failure as one clear error."""
        try:
            return call_with_deadline(work, limits.timeout_s)
        except DeadlineExceeded:
            raise ChatTemplateError(
                f"chat template: {self.origin} was stopped after {limits.timeout_s:g} s, its time limit (it loops too long or forever)"
            ) from None
        except _TemplateError as exc:
            raise PromptError(f"the chat template refused these messages: {exc}") from None
        except _OverBudget as exc:
            raise ChatTemplateError(f"chat template: {self.origin} was stopped: {exc}") from None
        except Exception as exc:  # jinja runtime and sandbox errors come in many types
            from jinja2 import TemplateSyntaxError

            if isinstance(exc, TemplateSyntaxError):
                raise ChatTemplateError(f"chat template: {self.origin} does not parse (line {exc.lineno}: {exc.message})") from None
            raise ChatTemplateError(f"chat template: {self.origin} failed to render: {type(exc).__name__}: {exc}") from None


def thinking_open(prompt: str, tags: TagPair = DEFAULT_TAGS) -> bool:
    """True when ``prompt`` ends inside an unclosed think block."""
    i, j = prompt.rfind(tags.open), prompt.rfind(tags.close)
    return i != -1 and i > j
