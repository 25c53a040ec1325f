"""The Python API: ``Runtime`` loads a model once and answers chats as a stream of events.

    from edge import Runtime, SamplingParams

    with Runtime() as rt:                       # bundled tiny-r1, or Runtime("model.gguf")
        for ev in rt.chat([{"role": "user", "content": "a = 3. b = a + 4. What is b?"}]):
            print(ev)                           # ThinkingDelta / AnswerDelta / ControlEvent ... / Done
        reply = rt.ask("a = 3. b = a + 4. What is b?", params=SamplingParams(temperature=0))
        print(reply.answer, reply.reasoning, reply.stats.thinking_tokens)

One runtime owns one backend; calls from several threads are serialised by a lock (token-level
calls too: :meth:`Runtime.tokenize`, :meth:`Runtime.token_pieces`, :meth:`Runtime.detokenize`
wait for a running generation rather than touch the backend beside it), and a
``threading.Event`` passed as ``cancel`` stops a generation from another thread (checked
before every token, and every few milliseconds while the call waits for the lock; the stream
then ends with ``Done`` whose ``finish_reason`` is ``"cancelled"``).

The chat template (the model's, or ``chat_template=``) is untrusted input: it is compiled when
the runtime is built (one that does not parse raises :class:`~edge.errors.ChatTemplateError`
then) and every render runs within ``template_limits`` (:class:`edge.templates.TemplateLimits`,
2 s and 4 Mi characters by default).

Async apps use :meth:`Runtime.achat` / :meth:`Runtime.acomplete`: the same events, produced by
a worker thread and handed over through an asyncio queue, so the event loop never blocks on
the model; leaving the ``async for`` early (or cancelling the task) stops the generation.

    async for ev in rt.achat(messages, params):
        ...

``close()`` (or leaving the ``with`` block) frees the model; any later call raises
:class:`RuntimeClosedError`.
"""

from __future__ import annotations

import asyncio
import os
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterator, Mapping, Sequence

from edge.backends.base import Backend
from edge.control.base import Controller
from edge.errors import RuntimeClosedError
from edge.events import AnswerDelta, ControlEvent, Done, Event, Retracted, Stats, ThinkingDelta
from edge.generate import PromptCache
from edge.model_ref import ModelSpec
from edge.params import SamplingParams
from edge.templates import ChatTemplate, TemplateLimits, thinking_open
from edge.think import DEFAULT_TAGS, THINKING, TagPair

if TYPE_CHECKING:
    from edge.speculative import CostCurve, Speculation

Messages = Sequence[Mapping[str, Any]]


class _LinkedCancel(threading.Event):
    """A cancel flag that is also set while ``parent`` (the caller's own event) is set, so a
    stream can be stopped internally without touching the caller's event."""

    def __init__(self, parent: threading.Event | None) -> None:
        super().__init__()
        self.parent = parent

    def is_set(self) -> bool:
        return super().is_set() or (self.parent is not None and self.parent.is_set())


_END = object()

LOCK_POLL_S = 0.02
"""How often a call waiting for the runtime lock looks at its ``cancel`` event."""


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


async def _aiterate(events: Iterator[Event], stop: threading.Event) -> AsyncIterator[Event]:
    """Run a (blocking) event generator in a worker thread and yield its events here.

    The worker hands each event to the loop with ``call_soon_threadsafe``; the generator is
    iterated and closed in the worker thread only (it holds the runtime lock there). When the
    consumer stops early, ``stop`` is set and the generator ends at its next token."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def put(item: Any) -> bool:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
            return True
        except RuntimeError:  # the loop is closed: nobody is listening any more
            stop.set()
            return False

    def work() -> None:
        try:
            for ev in events:
                if not put(ev):
                    break
        except BaseException as exc:  # handed to the consumer, raised there
            put(_Failure(exc))
        else:
            put(_END)
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()

    worker = threading.Thread(target=work, name="edge-generate", daemon=True)
    worker.start()
    try:
        while True:
            item = await queue.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()


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
            "controls": [c.summary() for c in self.controls],
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
            if isinstance(ev, Retracted):  # a controller took back text already streamed
                target = reasoning if ev.block == THINKING else answer
                joined = "".join(target)
                if joined.endswith(ev.text):
                    target[:] = [joined[: len(joined) - len(ev.text)]]
        elif isinstance(ev, Done):
            stats = ev.stats
    return Reply("".join(answer).strip(), "".join(reasoning).strip(), stats or Stats(), controls)


_DEFAULT: Any = object()  # "the runtime's setting" for per-call options


class Runtime:
    """A loaded model plus everything needed to chat with it.

    ``model`` is a model reference (see :mod:`edge.model_ref`), or a whole
    :class:`~edge.model_ref.ModelSpec`: then the backend, its options and the reasoning prompt
    come from the spec. ``backend`` is a backend name, or a loaded backend object."""

    def __init__(
        self,
        model: str | os.PathLike | ModelSpec | None = None,
        *,
        backend: str | Backend = "llamacpp",
        n_ctx: int | None = None,
        threads: int | None = None,
        device: str = "auto",
        gpu_layers: int | None = None,
        tags: TagPair = DEFAULT_TAGS,
        chat_template: str | None = None,
        reasoning_prompt: str | bool | None = None,
        template_limits: TemplateLimits | None = None,
        **backend_options: Any,
    ) -> None:
        from edge.reasoning import reasoning_instruction

        if isinstance(model, ModelSpec):
            reasoning_prompt = model.reasoning_prompt
        # checked before the model loads; the default for every call (a call may override it)
        self.reasoning_prompt = reasoning_instruction(reasoning_prompt)
        self.template_limits = template_limits or TemplateLimits()
        if chat_template:  # a given template is checked before the model loads
            ChatTemplate(chat_template, name="given").check(self.template_limits)
        if isinstance(backend, str):
            spec = model if isinstance(model, ModelSpec) else ModelSpec.of(
                model, backend=backend, n_ctx=n_ctx, threads=threads, device=device, gpu_layers=gpu_layers, **backend_options)
            self.backend = spec.load_backend()
        else:
            self.backend = backend
        self.tags = tags
        try:
            if chat_template:
                self.template = ChatTemplate(chat_template, self.backend.bos_token, self.backend.eos_token, "given")
            else:
                self.template = ChatTemplate.from_model(
                    self.backend.chat_template, bos_token=self.backend.bos_token, eos_token=self.backend.eos_token
                )
            self.template.check(self.template_limits)  # one that does not parse fails the load
        except BaseException:
            if isinstance(backend, str):  # loaded here: freed here
                self.backend.close()
            raise
        self._lock = threading.RLock()
        self._prompt_cache = PromptCache()
        #: settings of speculative decoding (a :class:`~edge.speculative.SpeculativeConfig`);
        #: None: its defaults with this machine's batch-cost curve, measured once and cached
        #: (:func:`edge.speculative.batch_cost_curve`) when a call first needs it
        self.speculation = None
        self._cost_curve = None  # the measured curve, once known
        self._no_cost_curve = None  # or why it could not be measured
        self._exact_batch = None  # the largest batch computed exactly as one-token steps, once measured
        self._closed = False

    # -- prompts -------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def check_open(self) -> None:
        """Raise :class:`RuntimeClosedError` if the runtime was closed."""
        if self._closed:
            raise RuntimeClosedError("this Runtime is closed (its model was freed); create a new Runtime to go on")

    def render(self, messages: Messages, *, think: bool = True, reasoning_prompt: str | bool | None = _DEFAULT,
               limits: TemplateLimits | None = None) -> str:
        """The prompt text for ``messages``: the chat template rendered within ``limits``
        (default: :attr:`template_limits`) in this thread; a template over its budget raises
        :class:`~edge.errors.ChatTemplateError`. ``think=False`` skips thinking (Qwen3-style
        templates get ``enable_thinking=False``; an open think block is closed). A reasoning
        prompt (a style of :mod:`edge.reasoning`, an instruction text; default: the runtime's)
        adds the instruction as system text and opens the think block in the assistant turn."""
        from edge.reasoning import reasoning_instruction, with_instruction

        self.check_open()
        instruction = self.reasoning_prompt if reasoning_prompt is _DEFAULT else reasoning_instruction(reasoning_prompt)
        if instruction and think:
            messages = with_instruction(messages, instruction)
        prompt = self.template.render(messages, add_generation_prompt=True, limits=limits or self.template_limits, enable_thinking=think)
        if instruction and think and not thinking_open(prompt, self.tags):
            prompt += f"{self.tags.open}\n"
        if not think and thinking_open(prompt, self.tags):
            prompt += f"\n{self.tags.close}\n\n"
        return prompt

    def tokenize_prompt(self, prompt: str) -> list[int]:
        """The token ids of a prompt text, special tokens parsed, with the model's BOS token
        when it wants one (and the text does not already start with it)."""
        with self._lock:
            self.check_open()
            bos = self.backend.bos_token
            add_bos = self.backend.add_bos and not (bos and prompt.startswith(bos))
            try:
                return self.backend.tokenize(prompt, add_bos=add_bos, special=True)
            except UnicodeEncodeError:
                at = next((i for i, c in enumerate(prompt) if "\ud800" <= c <= "\udfff"), None)
                if at is None:
                    raise
                from edge.errors import PromptError

                raise PromptError(
                    f"the prompt is not valid Unicode: it holds a lone surrogate ({prompt[at]!r}); "
                    "pass text, not half of a UTF-16 pair or undecoded bytes"
                ) from None

    def tokenize(self, text: str, *, add_special: bool = False, special: bool = True) -> list[int]:
        """The token ids of ``text`` as the backend tokenizes it (llama-server's ``/tokenize``):
        ``add_special`` adds BOS when the model wants one, ``special`` parses special tokens."""
        with self._lock:
            self.check_open()
            return self.backend.tokenize(text, add_bos=add_special and self.backend.add_bos, special=special)

    def token_pieces(self, tokens: Sequence[int]) -> list[bytes]:
        """The raw bytes of each token (a piece may hold part of a UTF-8 character)."""
        with self._lock:
            self.check_open()
            return [self.backend.token_bytes(int(t)) for t in tokens]

    def detokenize(self, tokens: Sequence[int]) -> str:
        """The text of ``tokens`` (bytes that are not UTF-8 become U+FFFD)."""
        with self._lock:
            self.check_open()
            return self.backend.detokenize(tokens)

    # -- streaming -------------------------------------------------------------------------------
    def chat(
        self,
        messages: Messages,
        params: SamplingParams | None = None,
        *,
        controllers: Sequence[Controller] = (),
        think: bool = True,
        reasoning_prompt: str | bool | None = _DEFAULT,
        cancel: threading.Event | None = None,
    ) -> Iterator[Event]:
        """Stream the reply to ``messages`` as events (the last one is ``Done``)."""
        prompt = self.render(messages, think=think, reasoning_prompt=reasoning_prompt)
        return self.complete(prompt, params, controllers=controllers, cancel=cancel)

    def complete(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        controllers: Sequence[Controller] = (),
        cancel: threading.Event | None = None,
    ) -> Iterator[Event]:
        """Stream a continuation of a raw (already templated) prompt, given as text or as
        token ids (used as they are: no BOS is added)."""
        from edge.errors import PromptError
        from edge.generate import generate

        self.check_open()
        if isinstance(prompt, str):
            if not prompt.strip():
                raise PromptError("the prompt is empty")
            text, ids = prompt, None
        else:
            ids = [int(t) for t in prompt]
            if not ids:
                raise PromptError("the prompt is empty")
            text = None
        params = params or SamplingParams()

        def run() -> Iterator[Event]:
            if not self._acquire(cancel):  # cancelled while another call was generating
                yield Done(Stats(finish_reason="cancelled", exit_reason="cancelled"))
                return
            try:
                self.check_open()
                if cancel is not None and cancel.is_set():  # cancelled before it started
                    yield Done(Stats(finish_reason="cancelled", exit_reason="cancelled"))
                    return
                tokens = self.tokenize_prompt(text) if ids is None else ids
                shown = text if ids is None else self.backend.detokenize(ids)
                speculation = self._plan_speculation(params.speculate)
                yield from generate(
                    self.backend,
                    tokens,
                    params,
                    start_in_thinking=thinking_open(shown, self.tags),
                    tags=self.tags,
                    controllers=controllers,
                    cancel=cancel,
                    cache=self._prompt_cache,
                    speculation=speculation,
                )
            finally:
                self._lock.release()

        return run()

    # -- speculative decoding ----------------------------------------------------------------------
    def plan_speculation(self, speculate: bool | None = None) -> "Speculation":
        """Whether a call whose params say ``speculate`` (None: auto) speculates here, and why
        (:func:`edge.speculative.decide`). The first call that needs this machine's batch-cost
        curve reads it from the cache or measures it (a few seconds, once per model file and
        threads; logged at INFO on ``edge.speculative``), so calling this before the first
        generation keeps that out of the reply's time."""
        with self._lock:
            self.check_open()
            return self._plan_speculation(speculate)

    def batch_cost(self, *, refresh: bool = False) -> "CostCurve":
        """This machine's batch-cost curve for the loaded model (cached; ``refresh`` measures it
        again and replaces the cached one). Raises :class:`~edge.errors.BackendError` where
        the backend cannot verify a draft in one batch."""
        from edge.errors import BackendError
        from edge.speculative import batch_cost_curve, batch_verify

        with self._lock:
            self.check_open()
            if not batch_verify(self.backend):
                raise BackendError(f"the {self.backend.info.name} backend has no batched verification of drafts: it has no batch-cost curve")
            self._cost_curve, self._no_cost_curve = batch_cost_curve(self.backend, refresh=refresh), None
            return self._cost_curve

    def _plan_speculation(self, mode: bool | None) -> "Speculation":
        from edge.errors import BackendError
        from edge.speculative import DISABLED, Speculation, SpeculativeConfig, batch_cost_curve, batch_verify, decide, exact_batch_cached

        if mode is False:
            return DISABLED
        if self.speculation is not None:
            config, how = self.speculation, {"source": "given"}
        elif not batch_verify(self.backend):
            return decide(mode, self.backend, None)
        else:
            if self._cost_curve is None and self._no_cost_curve is None:
                try:
                    self._cost_curve = batch_cost_curve(self.backend)
                except BackendError as exc:  # e.g. a context too small to measure in
                    self._no_cost_curve = f"the batch cost could not be measured ({exc})"
            if self._cost_curve is None and not mode:
                return Speculation(None, self._no_cost_curve)
            # requested without a curve: the defaults (cut to the exact batch below, like the rest)
            config, how = (None, {}) if self._cost_curve is None else (
                SpeculativeConfig(cost=self._cost_curve.cost), {"source": "measured", "settled": self._cost_curve.settled})
        plan = decide(mode, self.backend, config, **how)
        if not plan.on or not batch_verify(self.backend):
            return plan
        # speculating: keep it token-exact (measured once per machine and settings, and only when
        # speculating: a few dozen model steps that empty the cache)
        if self._exact_batch is None:
            try:
                self._exact_batch = exact_batch_cached(self.backend)
            except BackendError:
                self._exact_batch = 1  # not known to be exact
        return decide(mode, self.backend, config, exact=self._exact_batch, **how)

    def _acquire(self, cancel: threading.Event | None) -> bool:
        """Take the runtime lock, or give up (False) as soon as ``cancel`` is set while waiting:
        a cancelled call must not sit behind another call's whole generation."""
        if cancel is None:
            return self._lock.acquire()
        while not self._lock.acquire(timeout=LOCK_POLL_S):
            if cancel.is_set():
                return False
        return True

    def next_token_logprobs(self, prompt: Sequence[int], top: int = 20) -> list[tuple[int, float]]:
        """The ``top`` most likely next tokens after ``prompt`` (token ids) with their
        log-probabilities, most likely first. The cached prefix is reused and nothing is
        generated or committed (what a remote backend asks a server for, per token)."""
        from edge.errors import PromptError
        from edge.generate import prefill
        from edge.sampling import top_logprobs

        ids = [int(t) for t in prompt]
        if not ids:
            raise PromptError("the prompt is empty")
        with self._lock:
            self.check_open()
            logits, _ = prefill(self.backend, ids, self._prompt_cache)
            return list(top_logprobs(logits, max(1, top)))

    # -- async -------------------------------------------------------------------------------------
    async def achat(
        self,
        messages: Messages,
        params: SamplingParams | None = None,
        *,
        controllers: Sequence[Controller] = (),
        think: bool = True,
        reasoning_prompt: str | bool | None = _DEFAULT,
        cancel: threading.Event | None = None,
    ) -> AsyncIterator[Event]:
        """Like :meth:`chat`, as an async iterator: the template renders and the generation runs
        in worker threads, never on the event loop."""
        prompt = await asyncio.to_thread(self.render, messages, think=think, reasoning_prompt=reasoning_prompt)
        stop = _LinkedCancel(cancel)
        events = self.complete(prompt, params, controllers=controllers, cancel=stop)
        async for ev in _aiterate(events, stop):
            yield ev

    async def acomplete(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        controllers: Sequence[Controller] = (),
        cancel: threading.Event | None = None,
    ) -> AsyncIterator[Event]:
        """Like :meth:`complete`, as an async iterator: generation runs in a worker thread."""
        stop = _LinkedCancel(cancel)
        events = self.complete(prompt, params, controllers=controllers, cancel=stop)
        async for ev in _aiterate(events, stop):
            yield ev

    async def aask(self, prompt: str | Messages, params: SamplingParams | None = None, **kw: Any) -> Reply:
        """Async :meth:`ask`: the whole reply, computed in a worker thread."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return collect(iter([ev async for ev in self.achat(messages, params, **kw)]))

    # -- conveniences ------------------------------------------------------------------------------
    def ask(self, prompt: str | Messages, params: SamplingParams | None = None, **kw: Any) -> Reply:
        """Answer one prompt (a string is one user message) and return the whole reply."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return collect(self.chat(messages, params, **kw))

    def close(self) -> None:
        """Free the model (waits for a running generation to finish). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self.backend.close()

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
