"""The Python API: ``Runtime`` loads a model once and answers chats as a stream of events.

    from edge import Runtime, SamplingParams

    with Runtime() as rt:                       # bundled tiny-r1, or Runtime("model.gguf")
        for ev in rt.chat([{"role": "user", "content": "a = 3. b = a + 4. What is b?"}]):
            print(ev)                           # ThinkingDelta / AnswerDelta / ControlEvent / Done
        reply = rt.ask("a = 3. b = a + 4. What is b?", params=SamplingParams(temperature=0))
        print(reply.answer, reply.reasoning, reply.stats.thinking_tokens)

One runtime owns one backend; calls from several threads are serialised by a lock, and a
``threading.Event`` passed as ``cancel`` stops a generation from another thread.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

from edge.backends import load_backend
from edge.backends.base import Backend
from edge.control.base import Controller
from edge.events import AnswerDelta, ControlEvent, Done, Event, Stats, ThinkingDelta
from edge.params import SamplingParams
from edge.templates import ChatTemplate, thinking_open
from edge.think import DEFAULT_TAGS, TagPair

Messages = Sequence[Mapping[str, Any]]


@dataclass
class Reply:
    """A finished generation: the answer, the reasoning and the figures."""

    answer: str
    reasoning: str
    stats: Stats
    controls: list[ControlEvent] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "answer": self.answer,
            "reasoning": self.reasoning,
            "stats": self.stats.to_dict(),
            "controls": [{"kind": c.kind, **c.detail} for c in self.controls],
        }


def collect(events: Iterator[Event]) -> Reply:
    """Consume an event stream into a :class:`Reply`."""
    answer, reasoning, controls = [], [], []
    stats = None
    for ev in events:
        if isinstance(ev, AnswerDelta):
            answer.append(ev.text)
        elif isinstance(ev, ThinkingDelta):
            reasoning.append(ev.text)
        elif isinstance(ev, ControlEvent):
            controls.append(ev)
        elif isinstance(ev, Done):
            stats = ev.stats
    return Reply("".join(answer).strip(), "".join(reasoning).strip(), stats or Stats(), controls)


class Runtime:
    """A loaded model plus everything needed to chat with it."""

    def __init__(
        self,
        model: str | None = None,
        *,
        backend: str | Backend = "llamacpp",
        n_ctx: int = 4096,
        threads: int | None = None,
        device: str = "auto",
        gpu_layers: int | None = None,
        tags: TagPair = DEFAULT_TAGS,
        chat_template: str | None = None,
        **backend_options: Any,
    ) -> None:
        if isinstance(backend, str):
            if backend == "remote":
                self.backend = load_backend(backend, str(model), n_ctx=n_ctx, **backend_options)
            else:
                from edge.models import resolve_model

                path = resolve_model(model)
                opts = dict(n_ctx=n_ctx, threads=threads, device=device, **backend_options)
                if backend == "llamacpp":
                    opts["gpu_layers"] = gpu_layers
                self.backend = load_backend(backend, str(path), **opts)
        else:
            self.backend = backend
        self.tags = tags
        self.template = ChatTemplate.from_model(
            chat_template or self.backend.chat_template,
            bos_token=self.backend.bos_token,
            eos_token=self.backend.eos_token,
        )
        self._lock = threading.RLock()

    # -- prompts -------------------------------------------------------------------------------
    def render(self, messages: Messages, *, think: bool = True) -> str:
        prompt = self.template.render(messages, add_generation_prompt=True)
        if not think and thinking_open(prompt, self.tags):
            prompt += f"\n{self.tags.close}\n\n"
        return prompt

    def tokenize_prompt(self, prompt: str) -> list[int]:
        bos = self.backend.bos_token
        add_bos = bool(getattr(self.backend, "add_bos", False)) and not (bos and prompt.startswith(bos))
        return self.backend.tokenize(prompt, add_bos=add_bos, special=True)

    # -- streaming -------------------------------------------------------------------------------
    def chat(
        self,
        messages: Messages,
        params: SamplingParams | None = None,
        *,
        controllers: Sequence[Controller] = (),
        think: bool = True,
        cancel: threading.Event | None = None,
    ) -> Iterator[Event]:
        """Stream the reply to ``messages`` as events (the last one is ``Done``)."""
        prompt = self.render(messages, think=think)
        return self.complete(prompt, params, controllers=controllers, cancel=cancel)

    def complete(
        self,
        prompt: str,
        params: SamplingParams | None = None,
        *,
        controllers: Sequence[Controller] = (),
        cancel: threading.Event | None = None,
    ) -> Iterator[Event]:
        """Stream a continuation of a raw (already templated) prompt."""
        from edge.errors import PromptError
        from edge.generate import generate

        if not prompt.strip():
            raise PromptError("the prompt is empty")
        params = params or SamplingParams()
        start_in_thinking = thinking_open(prompt, self.tags)

        def run() -> Iterator[Event]:
            with self._lock:
                tokens = self.tokenize_prompt(prompt)
                yield from generate(
                    self.backend,
                    tokens,
                    params,
                    start_in_thinking=start_in_thinking,
                    tags=self.tags,
                    controllers=controllers,
                    cancel=cancel,
                )

        return run()

    # -- conveniences ------------------------------------------------------------------------------
    def ask(self, prompt: str | Messages, params: SamplingParams | None = None, **kw: Any) -> Reply:
        """Answer one prompt (a string is one user message) and return the whole reply."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return collect(self.chat(messages, params, **kw))

    def close(self) -> None:
        with self._lock:
            self.backend.close()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
