"""A scripted backend for unit tests of the generator and the controllers.

The "model" follows a script of thinking pieces with chosen probabilities, closes thinking,
writes a fixed answer and ends. Text injected by controllers is tokenized one character per
token into a separate id range, so the script position is the number of script tokens in the
cache. Once thinking is closed (by the script, a budget, a probe or an early exit) the model
answers: the scripted answer after the whole script, otherwise the trial answer for how far
it got, with the probability the test chose for it. Rollback truncates the
token list exactly like a KV cache.
"""

from __future__ import annotations

import math
import string
from typing import Callable, Sequence

import numpy as np

from edge.backends.base import BackendBase, BackendInfo

EOS = "<eos>"


class ScriptedBackend(BackendBase):
    def __init__(
        self,
        script: Sequence[str],
        answer: str,
        *,
        probs: Sequence[float] | None = None,
        trial: Callable[[int], tuple[str, float]] | None = None,
        n_ctx: int = 4096,
        chat_template: str | None = None,
        extra_chars: str = "",
    ) -> None:
        self.script = list(script)
        self.answer = answer
        self.probs = list(probs) if probs is not None else [0.9] * len(self.script)
        self.trial = trial or (lambda n: ("?", 0.1))
        texts = [x for x in self.script if isinstance(x, str)]
        chars = sorted({c for s in [*texts, answer, extra_chars, string.printable, "Q</think><think>\n Wait0123456789}?Considering the limited time by the user, I have to give the solution based on the thinking directly now."] for c in s})
        self.chars = chars
        self.char_id = {c: i for i, c in enumerate(chars)}
        self.script_base = len(chars)
        self.eos_id = self.script_base + len(self.script)
        self._n_vocab = self.eos_id + 1
        self._tokens: list[int] = []
        self.info = BackendInfo(name="scripted", n_ctx=n_ctx)
        self._template = chat_template
        self.evals = 0

    # protocol
    n_ctx = property(lambda self: self.info.n_ctx)
    n_vocab = property(lambda self: self._n_vocab)
    n_past = property(lambda self: len(self._tokens))
    tokens = property(lambda self: tuple(self._tokens))
    eos_token_ids = property(lambda self: frozenset({self.eos_id}))
    bos_token = ""
    eos_token = EOS
    chat_template = property(lambda self: self._template)

    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = True) -> list[int]:
        return [self.char_id[c] for c in text]

    def token_bytes(self, token: int) -> bytes:
        if token < self.script_base:
            return self.chars[token].encode()
        if token == self.eos_id:
            return b""
        piece = self.script[token - self.script_base]
        return piece if isinstance(piece, bytes) else piece.encode()

    def text(self) -> str:
        return self.detokenize(self._tokens)

    def _next(self) -> tuple[int, float]:
        n = sum(1 for t in self._tokens if self.script_base <= t < self.eos_id)
        g = self.text()
        j = g.rfind("</think>")
        if j != -1 or n >= len(self.script):
            # answering: after full thinking the model knows the answer; cut short (budget,
            # probe, early exit) it writes the trial answer for how far it got
            written = g[j + len("</think>"):] if j != -1 else ""
            cut = self.answer.rfind("{") + 1
            if n >= len(self.script):
                target, p = self.answer, 0.99
            else:
                ans, p = self.trial(n)
                target = self.answer[:cut] + ans + "}"
            if len(written) < len(target) and target.startswith(written):
                return self.char_id[target[len(written)]], (p if len(written) >= cut else 0.99)
            return self.eos_id, 0.99
        return self.script_base + n, self.probs[n]

    def eval(self, tokens: Sequence[int]) -> np.ndarray:
        if len(self._tokens) + len(tokens) > self.n_ctx:
            from edge.errors import PromptError

            raise PromptError("context full")
        self.evals += 1
        self._tokens.extend(tokens)
        tok, p = self._next()
        logits = np.full(self._n_vocab, math.log((1 - p) / (self._n_vocab - 1) + 1e-12), dtype=np.float32)
        logits[tok] = math.log(p)
        return logits

    def rollback(self, n_past: int) -> None:
        assert 0 <= n_past <= len(self._tokens)
        del self._tokens[n_past:]

    def close(self) -> None:
        pass
