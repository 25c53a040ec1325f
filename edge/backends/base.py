"""The Backend protocol: the one contract every inference engine implements.

A backend holds one sequence (a KV cache of ``n_past`` tokens). Controllers, the generator
loop and every front end talk only to this protocol, so think parsing, budgets and early exit
work the same on llama.cpp, ONNX Runtime and a remote server.

Contract:
- ``eval(tokens)`` appends tokens after the first ``n_past`` cached ones and returns the logits
  (float32, shape ``(n_vocab,)``) of the token that follows the last one.
- ``rollback(n)`` truncates the cache to its first ``n`` tokens (``0 <= n <= n_past``); it never
  re-evaluates anything. The logits after position ``n - 1`` are not returned: the caller
  keeps the logits it already had (see :class:`edge.generate.Generator`).
- ``tokens`` is the list of token ids currently in the cache (length ``n_past``).
- ``token_bytes(t)`` is the raw byte string of one token (may be a partial UTF-8 character).
- ``close()`` frees native resources deterministically; a closed backend raises on use.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np


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
    def chat_template(self) -> str | None: ...

    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = True) -> list[int]: ...

    def token_bytes(self, token: int) -> bytes: ...

    def eval(self, tokens: Sequence[int]) -> np.ndarray: ...

    def rollback(self, n_past: int) -> None: ...

    def close(self) -> None: ...


def detokenize(backend: Backend, tokens: Sequence[int]) -> str:
    return b"".join(backend.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
