"""Chat templates: the model's own Jinja template, rendered in a sandbox.

The template comes from the GGUF (``tokenizer.chat_template``) or a tokenizer_config.json.
Rendering uses jinja2's ImmutableSandboxedEnvironment with the conventions Hugging Face
templates rely on (``trim_blocks``, ``lstrip_blocks``, ``raise_exception``, ``strftime_now``).
A model without a template falls back to ChatML, and the fallback is reported, not hidden.

``thinking_open(prompt)`` tells whether the generation prompt already opened a think block
(DeepSeek-R1-Distill templates end with ``<think>\\n``), so the parser starts in thinking mode.
"""

from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Mapping, Sequence

from edge.errors import ConfigError, PromptError
from edge.think import DEFAULT_TAGS, TagPair

log = logging.getLogger(__name__)

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ROLES = ("system", "user", "assistant", "tool")


class _TemplateError(Exception):
    pass


def _raise(message: str):
    raise _TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(source: str):
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=False)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except TemplateSyntaxError as exc:
        raise ConfigError(f"the chat template does not parse: {exc}") from None


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
    name: str = "model"

    @classmethod
    def from_model(cls, template: str | None, *, bos_token: str = "", eos_token: str = "") -> "ChatTemplate":
        if template:
            return cls(template, bos_token, eos_token, "model")
        log.warning("the model has no chat template; falling back to ChatML")
        return cls(CHATML, bos_token, eos_token, "fallback:chatml")

    def render(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True, **extra: Any) -> str:
        msgs = validate_messages(messages)
        try:
            return _compile(self.source).render(
                messages=msgs,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **extra,
            )
        except _TemplateError as exc:
            raise PromptError(f"the chat template refused these messages: {exc}") from None
        except Exception as exc:  # jinja runtime/sandbox errors come in many types
            raise ConfigError(f"the chat template failed to render: {type(exc).__name__}: {exc}") from None


def thinking_open(prompt: str, tags: TagPair = DEFAULT_TAGS) -> bool:
    """True when ``prompt`` ends inside an unclosed think block."""
    i, j = prompt.rfind(tags.open), prompt.rfind(tags.close)
    return i != -1 and i > j
