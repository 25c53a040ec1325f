"""Remote backend: the Backend protocol over an OpenAI-compatible *completions* server.

So that think parsing, budgets and early exit run here while the model runs elsewhere
(``llama-server``, vLLM, SGLang, or ``edge-reason serve``), this backend keeps the sequence on
the client and asks the server only for next-token distributions:

- the token list lives client-side; ``rollback(n)`` just truncates it (no request);
- ``eval(tokens)`` appends the tokens and sends the *whole* list as a token-id prompt to
  ``POST /v1/completions`` with ``max_tokens=1``, ``temperature=0`` and ``logprobs=k``; the
  returned top-``k`` log-probabilities become a sparse logits vector (those ``k`` entries, the
  rest ``-inf``). Servers with prompt caching (llama-server ``cache_prompt``, vLLM prefix
  caching, ``edge-reason serve``'s prefix reuse) evaluate only the new tokens.

Consequences: sampling sees the top ``k`` (default 20) tokens only, renormalised - greedy
decoding is exact, temperature sampling is top-k sampling, and confidences read by early exit
are relative to the top-k mass. Each generated token costs one HTTP round trip.

Server features relied on (``edge-reason serve`` offers all; llama-server has the same shapes):

- ``POST /v1/completions`` accepting ``prompt`` as a list of token ids, with ``logprobs``.
  Token identities are read from, in order: an ``id`` field (llama-server's
  ``logprobs.content[].top_logprobs[]``), ``token_id:N`` strings (``return_tokens_as_token_ids``,
  vLLM and edge-reason), or else the token text mapped back through ``/tokenize`` (lossy).
  If the server returns no logprobs because the first token ended the completion, the
  distribution is taken to be certain end-of-sequence.
- ``POST /tokenize`` ``{content, add_special, parse_special, with_pieces}`` and
  ``POST /detokenize`` ``{tokens}`` (llama-server's shapes; ``with_pieces`` on ``/detokenize``
  is an edge-reason extension giving byte-exact pieces, else pieces are read from ``content``
  and tokens holding part of a UTF-8 character are lost). A server without these endpoints
  (vLLM, SGLang use other shapes) needs a client-side ``tokenizer``: any object with
  ``tokenize(text, *, add_bos, special) -> list[int]`` and ``token_bytes(id) -> bytes``.
- ``GET /v1/models`` ``data[0].meta.n_vocab`` (llama-server, edge-reason) or the ``n_vocab``
  option; ``GET /props`` for ``chat_template``, ``bos_token``, ``eos_token``,
  ``default_generation_settings.n_ctx`` and edge-reason's ``edge.eos_token_ids`` /
  ``edge.add_bos`` (else found by tokenizing ``eos_token`` and comparing ``add_special``).

Faults. Every request is bounded: ``connect_timeout`` seconds to connect, ``timeout`` seconds for
the answer (one token's round trip, or a whole prompt's prefill). Every request this backend
sends is idempotent - reads (``/v1/models``, ``/props``, ``/tokenize``, ``/detokenize``) and
``max_tokens=1`` completions whose distribution is applied client-side only once it arrived, so
no token is consumed twice - hence a request is retried, up to ``retries`` times with a short
backoff, when the connection could not be made or was dropped before the answer arrived, and on
500 / 502 / 504; 429 / 503 (busy, loading) are retried as ``Retry-After`` says. A timeout is
never retried (a stalled server would be given the same work again and the wait would double).
What remains is a :class:`~edge.errors.BackendError` that names the server and the request; a
server's context-overflow answer (400) is a :class:`~edge.errors.ContextLengthError`, as in process.
"""

from __future__ import annotations

import http.client
import json
import logging
import math
import time
from typing import Any, Protocol, Sequence
from urllib.parse import urlsplit

import numpy as np

from edge.backends.base import BackendBase, BackendInfo
from edge.errors import BackendError, ConfigError, ContextLengthError

log = logging.getLogger(__name__)

DEFAULT_VOCAB = 1 << 18  # when the server does not say; grown if a larger id shows up
MAX_RETRIES_BUSY = 30
RETRY_STATUSES = frozenset({500, 502, 504})  # a failing or restarting server, a gateway in between
BUSY_STATUSES = frozenset({429, 503})
BACKOFF = 0.25  # seconds before the first retry, doubled each time


class _ConnectFailed(Exception):
    """The TCP (or TLS) connection could not be made; ``retry`` is False after a timeout."""

    def __init__(self, reason: str, *, retry: bool) -> None:
        super().__init__(reason)
        self.retry = retry


class Tokenizer(Protocol):
    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = True) -> list[int]: ...

    def token_bytes(self, token: int) -> bytes: ...


def _piece_bytes(piece: Any) -> bytes | None:
    if isinstance(piece, str):
        return piece.encode("utf-8")
    if isinstance(piece, list) and all(isinstance(b, int) for b in piece):
        return bytes(piece)
    return None


def parse_top_logprobs(logprobs: Any) -> list[tuple[int | str, float, bytes | None]]:
    """The first position's alternatives from a completions ``logprobs`` object, as
    ``(id or token text, logprob, bytes or None)``. Understands OpenAI's legacy completions
    shape (``top_logprobs: [{token: logprob}]``, tokens possibly ``token_id:N``) and the
    chat-style shape llama-server uses (``content: [{id, token, logprob, bytes, top_logprobs}]``)."""
    if not isinstance(logprobs, dict):
        return []

    def ident(entry: dict) -> int | str:
        if isinstance(entry.get("id"), int):
            return entry["id"]
        return _token_key(str(entry.get("token", "")))

    out: list[tuple[int | str, float, bytes | None]] = []
    content = logprobs.get("content")
    if isinstance(content, list) and content:
        first = content[0]
        for e in [first, *(first.get("top_logprobs") or [])]:
            if isinstance(e, dict) and e.get("logprob") is not None:
                out.append((ident(e), float(e["logprob"]), _piece_bytes(e.get("bytes"))))
        return out
    tops = logprobs.get("top_logprobs")
    if isinstance(tops, list) and tops and isinstance(tops[0], dict):
        out = [(_token_key(tok), float(lp), None) for tok, lp in tops[0].items() if lp is not None]
    tokens, lps = logprobs.get("tokens"), logprobs.get("token_logprobs")
    if isinstance(tokens, list) and tokens and isinstance(lps, list) and lps and lps[0] is not None:
        out.append((_token_key(str(tokens[0])), float(lps[0]), None))
    return out


def _token_key(token: str) -> int | str:
    if token.startswith("token_id:"):
        try:
            return int(token[len("token_id:"):])
        except ValueError:
            pass
    return token


class RemoteBackend(BackendBase):
    """One sequence held client-side, scored by a remote OpenAI-compatible server."""

    _too_long_hint = "use a shorter prompt or a server with a larger context"

    def __init__(
        self,
        model: str,
        *,
        n_ctx: int | None = None,
        api_key: str | None = None,
        top_logprobs: int = 20,
        timeout: float = 120.0,
        connect_timeout: float = 10.0,
        retries: int = 2,
        model_name: str | None = None,
        n_vocab: int | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        url = urlsplit(model if "://" in model else f"http://{model}")
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ConfigError(f"the remote backend needs a server URL such as http://127.0.0.1:8080/v1, got {model!r}")
        if not 1 <= top_logprobs <= 20:
            raise ConfigError(f"top_logprobs must be in [1, 20], got {top_logprobs}")
        if n_ctx is not None and n_ctx < 16:
            raise ConfigError(f"context size must be >= 16 tokens, got {n_ctx}")
        for name, value in (("timeout", timeout), ("connect_timeout", connect_timeout)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ConfigError(f"{name} must be a positive number of seconds, got {value!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ConfigError(f"retries must be a whole number >= 0, got {retries!r}")
        self._scheme, self._host, self._port = url.scheme, url.hostname, url.port
        self._root = url.path.rstrip("/").removesuffix("/v1")
        self._url = f"{self._scheme}://{self._host}{':' + str(self._port) if self._port else ''}{self._root}/v1"
        self._api_key = api_key
        self._timeout = float(timeout)
        self._connect_timeout = float(connect_timeout)
        self._retries = retries
        self._conn: http.client.HTTPConnection | None = None
        self._closed = False
        self._k = top_logprobs
        self._tokenizer = tokenizer
        self._tokens: list[int] = []
        self._pieces: dict[int, bytes] = {}
        self._ids_of_text: dict[str, int | None] = {}
        self.requests = 0

        models = self._get("/v1/models")
        card = (models.get("data") or [{}])[0] if isinstance(models, dict) else {}
        meta = card.get("meta") or {}
        props = self._get("/props", missing_ok=True) or {}
        edge = props.get("edge") or {}
        self.model_name = model_name or card.get("id") or ""
        self._n_vocab = int(n_vocab or meta.get("n_vocab") or edge.get("n_vocab") or 0) or None
        if self._n_vocab is None:
            log.warning("the server does not report its vocabulary size; assuming %d (pass n_vocab=...)", DEFAULT_VOCAB)
            self._n_vocab = DEFAULT_VOCAB
        server_ctx = int((props.get("default_generation_settings") or {}).get("n_ctx") or meta.get("n_ctx") or meta.get("n_ctx_train") or 0)
        # the server needs room for the one token it generates per request
        limits = [n for n in (n_ctx, server_ctx - 1 if server_ctx else None) if n]
        self._n_ctx = min(limits) if limits else 4096
        self._template = props.get("chat_template") or None
        self._bos = props.get("bos_token") or ""
        self._eos = props.get("eos_token") or ""
        if "add_bos" in edge:
            self._add_bos = bool(edge["add_bos"])
        else:
            self._add_bos = len(self.tokenize("a", add_bos=True)) > len(self.tokenize("a", add_bos=False))
        if edge.get("eos_token_ids"):
            self._eog = frozenset(int(t) for t in edge["eos_token_ids"])
        else:
            ids = self.tokenize(self._eos, special=True) if self._eos else []
            self._eog = frozenset(ids) if len(ids) == 1 else frozenset()
            if not self._eog:
                log.warning("the server does not say which token ends a reply; generation stops at max_tokens")
        self.info = BackendInfo(
            name="remote",
            device="remote",
            model_path=self._url,
            n_ctx=self._n_ctx,
            extra={"server_model": self.model_name, "top_logprobs": self._k, "server_backend": meta.get("backend"), "server_device": meta.get("device")},
        )

    # -- HTTP ------------------------------------------------------------------------------------
    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            cls = http.client.HTTPSConnection if self._scheme == "https" else http.client.HTTPConnection
            conn = cls(self._host, self._port, timeout=self._connect_timeout)
            try:
                conn.connect()
            except TimeoutError:
                conn.close()
                raise _ConnectFailed(f"no connection within {self._connect_timeout:g} s", retry=False) from None
            except OSError as exc:
                conn.close()
                raise _ConnectFailed(_reason(exc), retry=True) from None
            self._conn = conn
        return self._conn

    def _drop_connection(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _exchange(self, method: str, path: str, data: bytes | None, headers: dict[str, str]) -> tuple[http.client.HTTPResponse, bytes]:
        """One request and its whole answer, within ``timeout`` seconds of sending it."""
        conn = self._connection()
        sock = conn.sock
        deadline = time.monotonic() + self._timeout

        def arm() -> None:  # the socket waits at most until the deadline
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            sock.settimeout(left)

        arm()
        conn.request(method, self._root + path, body=data, headers=headers)
        arm()
        resp = conn.getresponse()
        body = bytearray()
        while not resp.isclosed():
            arm()
            chunk = resp.read1(1 << 16)
            if not chunk:
                break
            body += chunk
        if resp.length:  # the connection closed before the announced length
            raise http.client.IncompleteRead(bytes(body), resp.length)
        resp.close()  # done with this answer: the connection may carry the next request
        if resp.will_close:
            self._drop_connection()
        return resp, bytes(body)

    def _request(self, method: str, path: str, body: Any = None, *, missing_ok: bool = False) -> Any:
        if self._closed:
            raise BackendError("the backend is closed")
        data = None if body is None else json.dumps(body).encode("utf-8")
        headers = {"Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        what = f"{method} {path}"
        busy = retried = attempts = 0
        reconnected = False

        def retry() -> bool:  # bounded, with backoff; every request here is idempotent
            nonlocal retried
            if retried >= self._retries:
                return False
            time.sleep(BACKOFF * 2**retried)
            retried += 1
            return True

        while True:
            reused = self._conn is not None
            attempts += 1
            try:
                resp, raw = self._exchange(method, path, data, headers)
            except _ConnectFailed as exc:
                if exc.retry and retry():
                    continue
                raise BackendError(f"the server at {self._url} cannot be reached ({exc}); is it running at that address?") from None
            except TimeoutError:
                self._drop_connection()
                raise BackendError(
                    f"the server at {self._url} did not answer {what} within {self._timeout:g} s; "
                    "it may be stalled or overloaded (if it is only slow, raise the timeout)"
                ) from None
            except (OSError, http.client.HTTPException) as exc:
                self._drop_connection()
                if reused and not reconnected:
                    reconnected = True  # a kept-alive connection the server had closed: reconnect at once
                    continue
                if retry():
                    continue
                raise BackendError(f"the server at {self._url} dropped the connection during {what} ({_reason(exc)}){_attempts(attempts)}") from None
            self.requests += 1
            if resp.status in BUSY_STATUSES and busy < MAX_RETRIES_BUSY:
                busy += 1
                time.sleep(min(_seconds(resp.getheader("Retry-After")), 10.0))
                continue
            if resp.status in RETRY_STATUSES and retry():
                continue
            if resp.status == 404 and missing_ok:
                return None
            if resp.status == 400 and _is_context_overflow(raw):
                raise ContextLengthError(
                    f"the prompt does not fit the server's context ({_error_message(raw)}); "
                    "use a shorter prompt or a server with a larger context"
                )
            if resp.status >= 400:
                raise BackendError(f"the server at {self._url} answered {resp.status} to {what}{_attempts(attempts)}: {_error_message(raw)}")
            try:
                return json.loads(raw)
            except ValueError:
                raise BackendError(f"the server at {self._url} sent invalid JSON for {what}") from None

    def _get(self, path: str, *, missing_ok: bool = False) -> Any:
        return self._request("GET", path, missing_ok=missing_ok)

    def _post(self, path: str, body: Any) -> Any:
        return self._request("POST", path, body)

    # -- properties --------------------------------------------------------------------------
    @property
    def eos_token_ids(self) -> frozenset[int]:
        return self._eog

    @property
    def bos_token(self) -> str:
        return self._bos

    @property
    def eos_token(self) -> str:
        return self._eos

    @property
    def add_bos(self) -> bool:
        return self._add_bos

    @property
    def chat_template(self) -> str | None:
        return self._template

    # -- tokens --------------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = True) -> list[int]:
        if not text:
            return []
        if self._tokenizer is not None:
            return list(self._tokenizer.tokenize(text, add_bos=add_bos, special=special))
        out = self._post("/tokenize", {"content": text, "add_special": add_bos, "parse_special": special, "with_pieces": True})
        ids: list[int] = []
        for t in out.get("tokens", []):
            if isinstance(t, dict):  # with pieces: learn each token's bytes for free
                tid = int(t["id"])
                piece = _piece_bytes(t.get("piece"))
                if piece is not None:
                    self._pieces.setdefault(tid, piece)
                ids.append(tid)
            else:
                ids.append(int(t))
        return ids

    def _piece(self, token: int) -> bytes:
        if self._tokenizer is not None:
            return self._tokenizer.token_bytes(token)
        out = self._post("/detokenize", {"tokens": [int(token)], "with_pieces": True})
        pieces = out.get("pieces")
        piece = _piece_bytes(pieces[0].get("piece")) if isinstance(pieces, list) and pieces else None
        return piece if piece is not None else str(out.get("content", "")).encode("utf-8")

    def _id_of(self, key: int | str) -> int | None:
        """A token id from a logprobs entry: the id itself, or its text tokenized (one token)."""
        if isinstance(key, int):
            return key
        if key not in self._ids_of_text:
            ids = self.tokenize(key, special=True) if key else []
            self._ids_of_text[key] = ids[0] if len(ids) == 1 else None
        return self._ids_of_text[key]

    # -- decoding ------------------------------------------------------------------------------
    def eval(self, tokens: Sequence[int]) -> np.ndarray:
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise BackendError("eval needs at least one token")
        self._check_room(len(tokens))
        seq = self._tokens + tokens
        body = {
            "prompt": seq,
            "max_tokens": 1,
            "temperature": 0.0,
            "top_p": 1.0,
            "logprobs": self._k,
            "echo": False,
            "stream": False,
            "return_tokens_as_token_ids": True,  # vLLM, edge-reason: tokens as token_id:N
            "n_probs": self._k,  # llama-server's name for the same
            "cache_prompt": True,  # llama-server: reuse the cached prefix
            "reasoning_format": "none",
        }
        if self.model_name:
            body["model"] = self.model_name
        out = self._post("/v1/completions", body)
        logits = self._distribution(out)
        self._tokens = seq  # only once the server answered
        return logits

    def _distribution(self, out: Any) -> np.ndarray:
        choice = (out.get("choices") or [{}])[0] if isinstance(out, dict) else {}
        entries = parse_top_logprobs(choice.get("logprobs"))
        logits = np.full(self._n_vocab, -np.inf, dtype=np.float32)
        for key, lp, raw in entries:
            tid = self._id_of(key)
            if tid is None or tid < 0 or math.isnan(lp):
                continue
            if tid >= logits.shape[0]:  # a larger vocabulary than assumed
                self._n_vocab = tid + 1
                logits = np.concatenate([logits, np.full(tid + 1 - logits.shape[0], -np.inf, dtype=np.float32)])
            logits[tid] = max(float(logits[tid]), lp)
            if raw is not None:
                self._pieces.setdefault(tid, raw)
        if not np.isfinite(logits).any():
            if choice.get("finish_reason") == "stop" and self._eog and not choice.get("text"):
                logits[min(self._eog)] = 0.0  # the reply ended at once: end-of-sequence for sure
            else:
                raise BackendError("the server returned no log-probabilities; it must support 'logprobs' on /v1/completions")
        return logits

    def rollback(self, n_past: int) -> None:
        if self._check_rollback(n_past):
            del self._tokens[n_past:]

    def close(self) -> None:
        self._drop_connection()
        self._closed = True


def _reason(exc: BaseException) -> str:
    """A short human reason for a socket or HTTP failure."""
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, http.client.RemoteDisconnected):
        return "closed without an answer"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, http.client.IncompleteRead):
        return f"answer cut off after {len(exc.partial)} bytes"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _attempts(n: int) -> str:
    return f" after {n} attempts" if n > 1 else ""


def _seconds(header: str | None) -> float:
    try:
        return max(float(header), 0.0) if header else 1.0
    except ValueError:
        return 1.0  # an HTTP date: wait the default


def _is_context_overflow(raw: bytes) -> bool:
    """A 400 answer saying the prompt exceeds the context (llama-server, vLLM, OpenAI, edge-reason)."""
    try:
        err = json.loads(raw).get("error")
    except (ValueError, AttributeError):
        return False
    if not isinstance(err, dict):
        return False
    if err.get("type") == "exceed_context_size_error" or err.get("code") == "context_length_exceeded":
        return True
    msg = str(err.get("message", "")).lower()
    return "context" in msg and any(w in msg for w in ("exceed", "maximum", "too long", "too large"))


def _error_message(raw: bytes) -> str:
    try:
        body = json.loads(raw)
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            return str(err.get("message"))
        if isinstance(err, str):
            return err
    except ValueError:
        pass
    return raw[:200].decode("utf-8", errors="replace")
