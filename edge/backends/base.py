"""The Backend protocol: the one contract every inference engine implements.

A backend holds one sequence (a KV cache of ``n_past`` tokens). Controllers, the generator
loop and every front end talk only to this protocol, so think parsing, budgets and early exit
work the same on llama.cpp, ONNX Runtime and a remote server.

Contract:
- ``eval(tokens)`` appends tokens after the first ``n_past`` cached ones and returns the logits
  (float32, shape ``(n_vocab,)``) of the token that follows the last one.
- ``rollback(n)`` truncates the cache to its first ``n`` tokens (``0 <= n <= n_past``); it never
  re-evaluates anything. The logits after position ``n - 1`` are not returned: the caller
  keeps the logits it already had (the loop in :mod:`edge.generate`).
- ``tokens`` is the list of token ids currently in the cache (length ``n_past``).
- ``token_bytes(t)`` is the raw byte string of one token (may be a partial UTF-8 character);
  ``detokenize(ids)`` is the text of several (:func:`token_text` of their joined bytes).
- ``add_bos`` says whether the model wants a BOS token in front of a prompt (``tokenize`` adds
  it only when asked with ``add_bos=True``).
- ``close()`` frees native resources deterministically; a closed backend raises on use.

:class:`BackendBase` holds the bookkeeping the backends share (the token list that mirrors the
cache, context and vocabulary sizes, the per-token bytes cache, the context and rollback checks);
a backend subclasses it and supplies the engine: ``_piece``, ``tokenize``, ``eval``, the
model's tokens and template, ``close``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

from edge.errors import BackendError, ContextLengthError


@dataclass
class BackendInfo:
    """What the backend actually uses, reported in every run's stats."""

    name: str
    device: str = "cpu"
    model_path: str = ""
    n_ctx: int = 0
    threads: int | None = None
    gpu_layers: int = 0
    offload_supported: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@runtime_checkable
class Backend(Protocol):
    info: BackendInfo

    @property
    def n_ctx(self) -> int: ...

    @property
    def n_vocab(self) -> int: ...

    @property
    def n_past(self) -> int: ...

    @property
    def tokens(self) -> Sequence[int]: ...

    @property
    def eos_token_ids(self) -> frozenset[int]: ...

    @property
    def bos_token(self) -> str: ...

    @property
    def eos_token(self) -> str: ...

    @property
    def add_bos(self) -> bool: ...

    @property
    def chat_template(self) -> str | None: ...

    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = True) -> list[int]: ...

    def token_bytes(self, token: int) -> bytes: ...

    def detokenize(self, tokens: Sequence[int]) -> str: ...

    def eval(self, tokens: Sequence[int]) -> np.ndarray: ...

    def rollback(self, n_past: int) -> None: ...

    def close(self) -> None: ...


def token_text(raw: bytes) -> str:
    """Token bytes as text: what is not UTF-8 (a partial character) becomes U+FFFD."""
    return raw.decode("utf-8", errors="replace")


class BackendBase:
    """What every backend keeps the same way: ``_tokens`` (the ids in the cache, in order),
    ``_n_ctx`` and ``_n_vocab`` (set by the subclass), and a cache of each token's bytes
    filled through the subclass's ``_piece(token)``."""

    _n_ctx: int
    _n_vocab: int
    _tokens: list[int]
    _pieces: dict[int, bytes]
    #: what a prompt too long for the context should do instead
    _too_long_hint = "use a larger --ctx or a shorter prompt"
    #: a backend whose model wants a BOS token in front of every prompt says so
    add_bos: bool = False
    #: a backend whose ``score`` evaluates a speculative draft in one model step, and whose
    #: rollback drops the rejected rows without copying the cache, says so: only there can
    #: speculation pay, and auto speculation (:mod:`edge.speculative`) is considered
    batch_verify: bool = False

    @property
    def n_ctx(self) -> int:
        return self._n_ctx

    @property
    def n_vocab(self) -> int:
        return self._n_vocab

    @property
    def n_past(self) -> int:
        return len(self._tokens)

    @property
    def tokens(self) -> Sequence[int]:
        return tuple(self._tokens)

    def token_bytes(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self._piece(token)
        return piece

    def _piece(self, token: int) -> bytes:
        raise NotImplementedError

    def detokenize(self, tokens: Sequence[int]) -> str:
        return token_text(b"".join(self.token_bytes(t) for t in tokens))

    def _check_room(self, n: int) -> None:
        """Raise :class:`~edge.errors.ContextLengthError` unless ``n`` more tokens fit the context."""
        if len(self._tokens) + n > self._n_ctx:
            raise ContextLengthError(f"{len(self._tokens) + n} tokens do not fit the context of {self._n_ctx}; {self._too_long_hint}")

    def _check_rollback(self, n_past: int) -> bool:
        """Check a rollback target; False when there is nothing to drop."""
        if not 0 <= n_past <= len(self._tokens):
            raise BackendError(f"cannot roll back to {n_past}: the cache holds {len(self._tokens)} tokens")
        return n_past != len(self._tokens)

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
