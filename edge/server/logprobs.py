"""Per-token log-probabilities, reported through the event stream.

:class:`LogprobRecorder` is a controller that never acts: for every sampled token that is
about to be committed (or that ends the reply as end-of-sequence) it emits a
``ControlEvent("logprobs", {token, text, logprob, top: [{token, text, logprob}, ...]})``.
It must be the *last* controller: the generator stops consulting controllers at the first
one that acts (a budget replacing the token with its message), so reaching this one means the
token is really the model's. The server translates these events into OpenAI's ``logprobs``;
the remote backend (:mod:`edge.backends.remote`) reads the next-token distribution from them.
"""

from __future__ import annotations

from edge.backends.base import token_text
from edge.control.base import Controller


class LogprobRecorder(Controller):
    name = "logprobs"
    needs_logprobs = True

    def on_token(self, gen, sampled) -> None:
        backend = gen.backend

        def text(t: int) -> str:
            return token_text(backend.token_bytes(t))

        gen.emit(
            "logprobs",
            token=sampled.token,
            text=text(sampled.token),
            logprob=sampled.logprob,
            top=[{"token": t, "text": text(t), "logprob": lp} for t, lp in sampled.top],
        )
        return None
