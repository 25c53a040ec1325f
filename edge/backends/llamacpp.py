"""llama.cpp backend (llama-cpp-python, in process).

The model and context are loaded through ``llama_cpp.Llama`` (which owns those native handles
and frees them on ``close()``); decoding, logits and KV-cache rollback go through llama.cpp's C
API directly so that each step costs one ``llama_decode`` and one logits copy:

- ``eval`` fills a batch this backend owns (``llama_batch_init``, freed in ``close()``) with
  explicit positions after the cache, asks for the last token's logits only, and copies
  ``llama_get_logits_ith(ctx, -1)``;
- ``score`` evaluates a batch asking for every position's logits (a speculative draft is
  verified in one ``llama_decode``);
- ``rollback`` calls ``llama_memory_seq_rm(mem, 0, n, -1)``: the cache is truncated in place,
  nothing is re-evaluated;
- the context computes on a persistent ggml thread pool, as llama-server does
  (:mod:`edge.backends.threadpool`; ``threadpool=False`` leaves llama.cpp's default; the
  backend's ``info.extra["threadpool"]`` says which it got).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np

from edge.backends.base import BackendBase, BackendInfo, token_text
from edge.backends.context import RUNTIME_BYTES, check_context, estimate_memory, kv_cache_type, repack_rules, repacked_bytes
from edge.backends.cpu import check_threads, default_threads
from edge.backends.devices import LLAMACPP_DEVICES
from edge.backends.gguf_meta import read_gguf, trained_context
from edge.errors import BackendError, ConfigError, InvalidModelError, ModelNotFoundError

log = logging.getLogger(__name__)

DEVICES = LLAMACPP_DEVICES
DEFAULT_CTX = 4096


_native_log = logging.getLogger("llama.cpp")
_LOG_LEVELS = {1: logging.INFO, 2: logging.WARNING, 3: logging.ERROR, 4: logging.DEBUG}
_log_callback = None


def _install_log_callback(llama_cpp) -> None:
    """Route llama.cpp's own log lines to the ``llama.cpp`` logger (shown with ``-v``), so
    nothing native is printed on the user's terminal."""
    global _log_callback
    if _log_callback is not None:
        return

    @llama_cpp.llama_log_callback
    def callback(level, text, user_data):
        if _native_log.isEnabledFor(logging.DEBUG):
            msg = text.decode("utf-8", errors="replace").rstrip()
            if msg:
                _native_log.log(_LOG_LEVELS.get(level, logging.DEBUG) if level in _LOG_LEVELS else logging.DEBUG, msg)

    _log_callback = callback  # keep a reference: llama.cpp holds the pointer
    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise BackendError("llama-cpp-python is not installed: pip install llama-cpp-python") from exc
    _install_log_callback(llama_cpp)
    return llama_cpp


def check_gguf_file(path: str | os.PathLike) -> Path:
    """Cheap checks before handing a file to llama.cpp, so users get a clear message."""
    p = Path(path)
    if not p.exists():
        raise ModelNotFoundError(f"model file not found: {p}")
    if p.is_dir():
        raise InvalidModelError(f"{p} is a directory; pass a .gguf file (convert a Hugging Face folder with `edge-reason convert gguf`)")
    with open(p, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise InvalidModelError(f"{p} is not a GGUF file (bad magic {magic!r})")
    return p


def check_n_ctx(n_ctx: int | str | None) -> int | str | None:
    """A context size as given: None (the default), ``"auto"`` or a number of tokens >= 16
    (an integer, or its digits); anything else is a :class:`ConfigError`."""
    if n_ctx is None or n_ctx == "auto":
        return n_ctx
    if isinstance(n_ctx, str):
        text = n_ctx.strip().lower()
        if text == "auto":
            return "auto"
        if not text.isdigit():
            raise ConfigError(f"--ctx takes a number of tokens or 'auto', got {n_ctx!r}", param="n_ctx")
        n_ctx = int(text)
    if isinstance(n_ctx, bool) or not isinstance(n_ctx, int):
        raise ConfigError(f"--ctx takes a number of tokens or 'auto', got {n_ctx!r}", param="n_ctx")
    if n_ctx < 16:
        raise ConfigError(f"context size must be >= 16 tokens, got {n_ctx}", param="n_ctx")
    return n_ctx


def offload_supported() -> bool:
    return bool(_llama_cpp().llama_supports_gpu_offload())


def gpu_kind() -> str | None:
    """'cuda' / 'metal' / 'vulkan' / ... for a build with GPU offload, else None."""
    llama_cpp = _llama_cpp()
    if not llama_cpp.llama_supports_gpu_offload():
        return None
    info = llama_cpp.llama_print_system_info().decode(errors="replace").upper()
    for name in ("CUDA", "METAL", "VULKAN", "HIP", "SYCL"):
        if name in info:
            return name.lower()
    return "gpu"


def resolve_device(device: str, gpu_layers: int | None) -> tuple[str, int]:
    """Map ``--device`` / ``--gpu-layers`` to (device actually used, layers to offload)."""
    if device not in DEVICES:
        raise ConfigError(f"unknown device {device!r}; choose one of: {', '.join(DEVICES)}")
    if gpu_layers is not None and gpu_layers < -1:
        raise ConfigError(f"--gpu-layers must be -1 (all) or >= 0, got {gpu_layers}")
    kind = gpu_kind()
    if device == "cpu":
        return "cpu", 0
    if device == "auto":
        if kind is None or gpu_layers == 0:
            return "cpu", 0
        return kind, -1 if gpu_layers is None else gpu_layers
    if kind is None:
        raise ConfigError(
            f"--device {device} asked for, but this llama-cpp-python build has no GPU offload; "
            f"reinstall it with CMAKE_ARGS='-DGGML_{device.upper()}=on' pip install --force-reinstall --no-cache-dir llama-cpp-python"
        )
    if kind != device and kind != "gpu":
        raise ConfigError(f"--device {device} asked for, but this llama-cpp-python build offloads to {kind}")
    return device, -1 if gpu_layers is None else gpu_layers


@functools.lru_cache(maxsize=1)
def _llama_class(llama_cpp) -> type:
    """``llama_cpp.Llama`` without its chat formatters.

    ``Llama.__init__`` compiles every ``tokenizer.chat_template*`` of the GGUF with its own Jinja
    environment (``Jinja2ChatFormatter``): a template that does not parse raises there, and
    nothing bounds it. edge renders templates itself, sandboxed and on a budget
    (:mod:`edge.templates`), so the templates are hidden from that step: ``metadata`` as
    ``Llama`` sees it lacks them, ``gguf_metadata`` has every key."""

    class Llama(llama_cpp.Llama):
        @property
        def metadata(self) -> dict[str, str]:
            return self._visible_metadata

        @metadata.setter
        def metadata(self, value: dict[str, str]) -> None:  # set once, in Llama.__init__
            self.gguf_metadata = dict(value)
            self._visible_metadata = {k: v for k, v in value.items() if not k.startswith("tokenizer.chat_template")}

    return Llama


def _logits_address_function(llama_cpp):
    """``f(ctx, i) -> int | None``: the address of the i-th logits row. The same C function as
    ``llama_get_logits_ith``, declared to return the address as an int (no ctypes pointer object
    and cast per token); through the public binding on builds that do not expose the library."""
    lib = getattr(getattr(llama_cpp, "llama_cpp", None), "_lib", None)
    fn = getattr(lib, "llama_get_logits_ith", None)
    if fn is not None:
        return ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32)(ctypes.cast(fn, ctypes.c_void_p).value)
    return lambda ctx, i: ctypes.cast(llama_cpp.llama_get_logits_ith(ctx, i), ctypes.c_void_p).value


class LlamaCppBackend(BackendBase):
    """One llama.cpp model + context holding one sequence."""

    batch_verify = True  # score(): one llama_decode; rollback: llama_memory_seq_rm

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        n_ctx: int | str | None = None,
        threads: int | None = None,
        device: str = "auto",
        gpu_layers: int | None = None,
        n_batch: int = 512,
        seed: int = 0,
        flash_attn: bool | None = None,
        kv_cache: str = "f16",
        ctx_beyond_training: bool = False,
        threadpool: bool = True,
    ) -> None:
        n_ctx = check_n_ctx(n_ctx)
        kv = kv_cache_type(kv_cache)
        if kv.quantized and flash_attn is False:
            raise ConfigError(f"a {kv.name} KV cache needs flash attention (llama.cpp stores a quantized V cache only with it); "
                              "leave flash attention on or use --kv-cache f16", param="kv_cache")
        # llama.cpp's default is off here: its rounding differs, and greedy replies with it
        flash_attn = kv.quantized if flash_attn is None else flash_attn
        check_threads(threads)
        path = check_gguf_file(model)
        meta, tensors = read_gguf(path)
        ctx_source = "auto" if n_ctx == "auto" else "given" if n_ctx is not None else "default"
        if n_ctx is None:
            # default: 4096, or less when the model was trained for less
            trained = trained_context(meta)
            n_ctx = min(DEFAULT_CTX, trained) if trained > 0 else DEFAULT_CTX
        used_device, layers = resolve_device(device, gpu_layers)
        llama_cpp = _llama_cpp()
        # on a CPU the weights are mapped and some also copied into a repacked layout
        repacked = repacked_bytes(tensors, repack_rules(llama_cpp.llama_print_system_info().decode(errors="replace"))) if layers == 0 else 0

        def estimate_at(n: int):
            return estimate_memory(meta, n, path.stat().st_size, kv_cache=kv, repacked=repacked, n_ubatch=min(n_batch, n),
                                   flash_attn=flash_attn, runtime=RUNTIME_BYTES)

        # before anything is allocated: beyond the trained length only when asked for, and never
        # more than memory holds (weights and KV cache live in host memory on CPU and Apple GPUs;
        # a discrete GPU's memory is not known here)
        note = f"KV cache {kv.name} with flash attention (llama.cpp needs it for a quantized V cache)" if kv.quantized else ""
        estimate = check_context(meta, n_ctx, path.stat().st_size, beyond_training=ctx_beyond_training,
                                 check_host_memory=used_device in ("cpu", "metal"), estimate_at=estimate_at, note=note)
        n_ctx = estimate.n_ctx
        # default: one thread per performance core to decode, every physical core for batches
        # (llama-cpp-python's own default, cpu_count() // 2, idles half of a 1-thread-per-core machine)
        auto = default_threads()
        n_threads = threads if threads is not None else auto.decode
        n_threads_batch = threads if threads is not None else auto.batch
        self._lib = llama_cpp
        try:
            self._llm = _llama_class(llama_cpp)(
                model_path=str(path),
                n_ctx=n_ctx,
                n_batch=min(n_batch, n_ctx),
                n_threads=n_threads,
                n_threads_batch=n_threads_batch,  # as llama.cpp: --threads sets both
                n_gpu_layers=layers,
                seed=seed,
                flash_attn=flash_attn,
                type_k=kv.ggml_type,
                type_v=kv.ggml_type,
                logits_all=False,
                verbose=False,
            )
        except ValueError as exc:
            if "context" in str(exc):  # the weights loaded; the KV cache or compute buffers did not fit
                raise BackendError(f"llama.cpp could not create a context of {n_ctx} tokens (out of memory?); use a smaller --ctx") from None
            raise InvalidModelError(f"llama.cpp could not load {path}: the file is truncated, corrupt or of an unsupported architecture ({exc})") from None
        self._ctx = self._llm.ctx
        self._pools, pool_note = None, "llama.cpp's default (threadpool=False)"
        if threadpool:
            from edge.backends.threadpool import attach

            self._pools, pool_note = attach(llama_cpp, self._ctx, n_threads, n_threads_batch)
        self._vocab = llama_cpp.llama_model_get_vocab(self._llm.model)
        self._mem = llama_cpp.llama_get_memory(self._ctx)
        if not self._vocab or not self._mem:
            self.close()
            raise BackendError("llama.cpp returned a null vocabulary or memory handle")
        self._n_vocab = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        self._n_batch = min(n_batch, n_ctx)
        self._batch = llama_cpp.llama_batch_init(self._n_batch, 0, 1)
        if self._batch is None or not self._batch.token:
            self.close()
            raise BackendError("llama.cpp could not allocate a batch")
        # every slot always belongs to sequence 0: set once, not per token
        for j in range(self._n_batch):
            self._batch.n_seq_id[j] = 1
            self._batch.seq_id[j][0] = 0
        self._logits_addr_of = _logits_address_function(llama_cpp)
        self._n_ctx = int(llama_cpp.llama_n_ctx(self._ctx))
        self._tokens: list[int] = []
        self._pieces: dict[int, bytes] = {}
        self._logits_addr = -1  # address of the logits row the view below maps (never NULL)
        self._logits_view: np.ndarray | None = None
        self._eog: frozenset[int] | None = None
        meta = self._llm.gguf_metadata
        self._meta = meta
        n_layers = int(meta.get(f"{meta.get('general.architecture', '')}.block_count", 0) or 0)
        offloaded = 0 if layers == 0 else (n_layers + 1 if layers < 0 else min(layers, n_layers + 1))
        self.info = BackendInfo(
            name="llamacpp",
            device=used_device,
            model_path=str(path),
            n_ctx=self._n_ctx,
            threads=int(self._llm.context_params.n_threads),
            gpu_layers=offloaded,
            offload_supported=bool(llama_cpp.llama_supports_gpu_offload()),
            extra={
                "llama_cpp_python": getattr(llama_cpp, "__version__", "?"),
                "architecture": meta.get("general.architecture"),
                "model_name": meta.get("general.name"),
                "n_layers": n_layers,
                "threads_batch": int(self._llm.context_params.n_threads_batch),
                "threads_source": "--threads" if threads is not None else auto.source,
                "threadpool": pool_note,
                "kv_cache": kv.name,
                "flash_attn": bool(flash_attn),
                "ctx_source": ctx_source,
                "memory_estimate_bytes": estimate.total,
            },
        )

    # -- properties --------------------------------------------------------------------------
    @property
    def eos_token_ids(self) -> frozenset[int]:
        if self._eog is None:
            is_eog = self._lib.llama_vocab_is_eog
            self._eog = frozenset(t for t in range(self._n_vocab) if is_eog(self._vocab, t))
        return self._eog

    def _token_text(self, key: str) -> str:
        tid = self._meta.get(f"tokenizer.ggml.{key}_token_id")
        return token_text(self.token_bytes(int(tid))) if tid is not None else ""

    @property
    def bos_token(self) -> str:
        return self._token_text("bos")

    @property
    def eos_token(self) -> str:
        return self._token_text("eos")

    @property
    def add_bos(self) -> bool:
        return bool(self._lib.llama_vocab_get_add_bos(self._vocab))

    @property
    def chat_template(self) -> str | None:
        return self._meta.get("tokenizer.chat_template")

    # -- tokens --------------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = True) -> list[int]:
        self._check_open()
        if not text:
            return []
        return self._llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def _piece(self, token: int) -> bytes:
        self._check_open()
        buf = ctypes.create_string_buffer(64)
        n = self._lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
        return buf.raw[:n]

    # -- decoding ------------------------------------------------------------------------------
    def eval(self, tokens: Sequence[int]) -> np.ndarray:
        n_past = len(self._tokens)
        if len(tokens) == 1 and n_past < self._n_ctx and self._llm is not None:
            # the decode step, once per generated token: kept to the few calls it needs
            batch = self._batch
            batch.n_tokens = 1
            batch.token[0] = token = tokens[0]
            batch.pos[0] = n_past
            batch.logits[0] = 1
            rc = self._lib.llama_decode(self._ctx, batch)
            if rc != 0:
                self._decode_failed(n_past, rc)
            self._tokens.append(token)
            addr = self._logits_addr_of(self._ctx, -1)
            if addr == self._logits_addr:
                return self._logits_view.copy()
            return self._logits()
        self._check_open()
        tokens = list(tokens)
        if not tokens:
            raise BackendError("eval needs at least one token")
        self._check_room(len(tokens))
        batch = self._batch
        for i in range(0, len(tokens), self._n_batch):
            chunk = tokens[i : i + self._n_batch]
            n_past, n = len(self._tokens), len(chunk)
            batch.n_tokens = n
            for j, tok in enumerate(chunk):
                batch.token[j] = tok
                batch.pos[j] = n_past + j
                batch.logits[j] = 0
            batch.logits[n - 1] = 1
            self._decode(n_past)
            self._tokens.extend(chunk)
        return self._logits()

    def score(self, tokens: Sequence[int]) -> np.ndarray:
        """Evaluate ``tokens`` after the cache in one batch and return the logits after every
        one of them (float32, ``[len(tokens), n_vocab]``): every batch position asks for its
        logits. What a speculative draft is verified with: one model step for all rows."""
        self._check_open()
        tokens = list(tokens)
        n = len(tokens)
        if not tokens:
            raise BackendError("score needs at least one token")
        self._check_room(n)
        if n > self._n_batch:  # longer than one batch: chunk by chunk (not a speculative draft)
            return np.concatenate([self.score(tokens[i : i + self._n_batch]) for i in range(0, n, self._n_batch)])
        batch, n_past = self._batch, len(self._tokens)
        batch.n_tokens = n
        for j, tok in enumerate(tokens):
            batch.token[j] = tok
            batch.pos[j] = n_past + j
            batch.logits[j] = 1
        self._decode(n_past)
        self._tokens.extend(tokens)
        # the rows of every output, in batch order, are contiguous from the first one
        addr = self._logits_addr_of(self._ctx, 0)
        if not addr:
            raise BackendError("llama.cpp returned no logits")
        rows = np.ctypeslib.as_array(ctypes.cast(addr, ctypes.POINTER(ctypes.c_float)), shape=(n, self._n_vocab))
        return rows.copy()

    def _decode(self, n_past: int) -> None:
        rc = self._lib.llama_decode(self._ctx, self._batch)
        if rc != 0:
            self._decode_failed(n_past, rc)

    def _decode_failed(self, n_past: int, rc: int) -> None:
        # a failed decode leaves nothing of this batch in the cache
        self._lib.llama_memory_seq_rm(self._mem, 0, n_past, -1)
        raise BackendError(f"llama_decode failed with code {rc} at position {n_past}")

    def _logits(self) -> np.ndarray:
        addr = self._logits_addr_of(self._ctx, -1)
        if not addr:
            raise BackendError("llama.cpp returned no logits")
        # the output buffer rarely moves: reuse the numpy view of it (building one costs ~10 us)
        if addr != self._logits_addr:
            ptr = ctypes.cast(addr, ctypes.POINTER(ctypes.c_float))
            self._logits_view = np.ctypeslib.as_array(ptr, shape=(self._n_vocab,))
            self._logits_addr = addr
        return self._logits_view.copy()

    def rollback(self, n_past: int) -> None:
        self._check_open()
        if not self._check_rollback(n_past):
            return
        if not self._lib.llama_memory_seq_rm(self._mem, 0, n_past, -1):
            raise BackendError("llama.cpp refused to truncate the KV cache (recurrent model?)")
        del self._tokens[n_past:]

    @property
    def llama(self):
        """The ``llama_cpp.Llama`` this backend decodes through (shared by the overhead
        benchmark's bare loop, so both loops run on the very same weights and buffers)."""
        self._check_open()
        return self._llm

    def reset(self) -> None:
        """Empty the KV cache entirely, including cells written through :attr:`llama` by
        someone else; the next eval starts at position 0."""
        self._check_open()
        self._lib.llama_memory_seq_rm(self._mem, -1, 0, -1)
        self._tokens.clear()

    def close(self) -> None:
        batch = getattr(self, "_batch", None)
        if batch is not None:
            self._lib.llama_batch_free(batch)
            self._batch = None
        llm = getattr(self, "_llm", None)
        if llm is not None:
            llm.close()
            self._llm = None
            self._ctx = self._vocab = self._mem = None
        pools = getattr(self, "_pools", None)
        if pools is not None:  # after the context that used them
            pools.free()
            self._pools = None

    def _check_open(self) -> None:
        if self._llm is None:
            raise BackendError("the backend is closed")
