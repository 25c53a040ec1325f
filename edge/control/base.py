"""The controller contract.

A controller is a small object the generator consults while a reply is produced. It sees the
run through a read-only view (:class:`edge.generate.Generation`) and answers with an
:class:`Action` or ``None``:

- ``start(gen)``: once, after the prompt was prefilled.
- ``on_token(gen, sampled)``: a token was sampled but not yet committed. Returning an action
  *replaces* that token with the action's text (budget cap: the end-of-thinking message;
  minimum thinking: "Wait" instead of ``</think>``).
- ``on_commit(gen, piece)``: a token was committed (``piece`` is its text). Returning an
  action *appends* its text (early exit: close thinking). Probing the model from here with
  ``gen.probe(...)`` is allowed: the probe is rolled back before the generator goes on.
- ``wants(hook, thinking)``: whether a hook is worth calling per token of this run while the
  model is thinking (``thinking=True``) or answering. The hooks run at every token, so one
  that cannot act in a phase, or under the current settings, is skipped there.

Controllers never touch the backend directly except through ``gen.probe``; so they work on
every backend. They must be deterministic given the run (and the sampler's seed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from edge.generate import Generation
    from edge.sampling import Sampled


@dataclass(frozen=True)
class Action:
    """What a controller wants: inject ``text`` into the stream (tokenized and evaluated as if
    the model had written it) and/or stop. ``retract`` first takes back that many committed
    tokens (used to drop the bytes of an unfinished UTF-8 character before an injection).
    ``kind`` names the event reported to front ends."""

    kind: str
    text: str = ""
    stop: bool = False
    retract: int = 0
    exit_reason: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)


class Controller:
    """Base class with no-op hooks; subclasses override what they need."""

    name = "controller"
    #: set True when the controller reads ``gen.logprobs`` / ``gen.thinking_logprobs``
    needs_logprobs = False

    def start(self, gen: "Generation") -> None:
        return None

    def on_token(self, gen: "Generation", sampled: "Sampled") -> Action | None:
        return None

    def on_commit(self, gen: "Generation", piece: str) -> Action | None:
        return None

    def wants(self, hook: str, thinking: bool) -> bool:
        """Whether the generator should call ``hook`` ("on_token" / "on_commit") at every
        token of this run while thinking (``thinking=True``) or answering; asked after
        :meth:`start`. By default: whether the subclass overrides the hook. A controller
        whose settings make a hook a no-op in a phase says False, and the generator saves
        the call per token. (``on_commit`` is asked with the phase the token ended in.)"""
        return getattr(type(self), hook) is not getattr(Controller, hook)
