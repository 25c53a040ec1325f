"""ONNX Runtime backend (in process): the same contract as llama.cpp, on an exported folder.

The folder is what ``edge-reason convert onnx`` writes (``model.onnx`` + tokenizer and config
files + ``edge_onnx.json``); a "text-generation-with-past" export by optimum loads too. At run
time only onnxruntime, numpy and tokenizers are imported (no torch, no transformers).

- ``eval`` runs the graph on the new tokens with the cached keys/values as ``past_key_values.*``
  inputs and keeps the ``present.*`` outputs as the new cache: several tokens at once for a
  prefill (in chunks of ``n_batch``), one at a time for decoding. When the graph has a
  ``logits_to_keep`` input only the last position's logits are computed.
- The KV cache is the list of ``present.*`` OrtValues ``[1, kv_heads, n_past, head_dim]`` of
  the last run (in the graph's type: float16 in the int4 / int8 exports), fed back as they are
  (no copy into numpy between steps); ``rollback(n)`` slices them to their first ``n``
  positions. Nothing is re-evaluated.
- Tokenization uses the model's ``tokenizer.json`` (special tokens parsed, BOS per
  ``tokenizer_config.json``); ``token_bytes`` maps byte-level BPE symbols back to raw bytes, so a
  token may be part of a UTF-8 character, exactly as llama.cpp reports it.
- ``device`` picks the execution provider: ``auto`` takes CUDA, DirectML or CoreML when this
  onnxruntime build has one and falls back to CPU; ``cpu``, ``cuda``, ``coreml`` (``metal``),
  ``xnnpack``, ``qnn``, ``nnapi``, ``dml``, ``openvino``, ``tensorrt``, ``rocm``, ``webgpu``
  ask for one explicitly. The providers really used are reported in ``info``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edge.backends.base import BackendBase, BackendInfo
from edge.backends.context import check_trained_length
from edge.backends.cpu import check_threads, default_threads
from edge.backends.devices import ONNX_DEVICES, ONNX_PROVIDERS
from edge.errors import BackendError, ConfigError, InvalidModelError, ModelNotFoundError

log = logging.getLogger(__name__)

MANIFEST = "edge_onnx.json"
MODEL_FILE = "model.onnx"
DEFAULT_CTX = 4096

PROVIDERS = ONNX_PROVIDERS  # device name -> ONNX Runtime execution provider
DEVICES = ONNX_DEVICES
# Accelerators ``auto`` may pick without being asked (the others need per-model tuning).
AUTO_ORDER = ("cuda", "dml", "coreml")
INSTALL_HINTS = {
    "cuda": "pip install onnxruntime-gpu (instead of onnxruntime)",
    "tensorrt": "pip install onnxruntime-gpu with TensorRT installed",
    "rocm": "install the ROCm build of onnxruntime",
    "dml": "pip install onnxruntime-directml (Windows)",
    "coreml": "use the macOS onnxruntime wheel",
    "metal": "use the macOS onnxruntime wheel (CoreML)",
    "qnn": "pip install onnxruntime-qnn (Snapdragon)",
    "openvino": "pip install onnxruntime-openvino",
    "xnnpack": "use an onnxruntime build with XNNPACK (Android / iOS packages)",
    "nnapi": "use the Android onnxruntime package",
    "webgpu": "use an onnxruntime build with WebGPU",
}
_NP_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise BackendError("onnxruntime is not installed: pip install 'edge-reason[onnx]'") from exc
    return onnxruntime


def resolve_providers(device: str, available: Sequence[str]) -> tuple[str, list[str]]:
    """Map ``device`` to (device name, providers in priority order, CPU last as fallback)."""
    if device not in DEVICES:
        raise ConfigError(f"unknown device {device!r} for the onnx backend; choose one of: {', '.join(DEVICES)}")
    if device == "auto":
        device = next((d for d in AUTO_ORDER if PROVIDERS[d] in available), "cpu")
    provider = PROVIDERS[device]
    if provider not in available:
        raise ConfigError(
            f"--device {device} asked for, but this onnxruntime build has no {provider} "
            f"(it has: {', '.join(available)}); {INSTALL_HINTS.get(device, 'install a build that has it')}"
        )
    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    return device, providers


# -- model folder and metadata -------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidModelError(f"{path}: not valid JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


def _content(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _chat_template(folder: Path, tok_config: dict[str, Any]) -> str | None:
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # named templates: take "default"
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    if template:
        return template
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    return _read_json(folder / "chat_template.json").get("chat_template")


def token_metadata(folder: Path, tokenizer: Any = None) -> dict[str, Any]:
    """BOS / EOS tokens and ids, whether to add BOS, and the chat template of a model folder,
    from its tokenizer.json, tokenizer_config.json, generation_config.json and config.json."""
    from tokenizers import Tokenizer

    tok = tokenizer or Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok_config = _read_json(folder / "tokenizer_config.json")
    gen = _read_json(folder / "generation_config.json")
    config = _read_json(folder / "config.json")
    bos, eos = _content(tok_config.get("bos_token")), _content(tok_config.get("eos_token"))
    bos_id = tok.token_to_id(bos) if bos else None
    if bos_id is None:
        bos_id = gen.get("bos_token_id", config.get("bos_token_id"))
        bos = tok.id_to_token(bos_id) if isinstance(bos_id, int) else None
    eos_ids: set[int] = set()
    for source in (gen.get("eos_token_id"), config.get("eos_token_id")):
        if isinstance(source, int):
            eos_ids.add(source)
        elif isinstance(source, list):
            eos_ids.update(int(t) for t in source)
    if eos and tok.token_to_id(eos) is not None:
        eos_ids.add(tok.token_to_id(eos))
    if not eos and eos_ids:
        eos = tok.id_to_token(min(eos_ids))
    if "add_bos_token" in tok_config:
        add_bos = bool(tok_config["add_bos_token"]) and bos_id is not None
    else:  # transformers 5 records it only in the tokenizer's post-processor
        add_bos = bos_id is not None and tok.encode("a", add_special_tokens=True).ids[:1] == [bos_id]
    return {
        "bos_token": bos or "",
        "bos_token_id": bos_id,
        "eos_token": eos or "",
        "eos_token_ids": sorted(eos_ids),
        "add_bos": add_bos,
        "chat_template": _chat_template(folder, tok_config),
    }


def _byte_decoder() -> dict[str, int]:
    """Inverse of byte-level BPE's byte -> printable character table: printable Latin-1 bytes
    stand for themselves, the other bytes for the characters from U+0100 upwards, in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def _is_byte_level(tokenizer_json: dict[str, Any]) -> bool:
    def has(node: Any) -> bool:
        if isinstance(node, dict):
            if node.get("type") == "ByteLevel":
                return True
            return any(has(v) for k, v in node.items() if k in ("pretokenizers", "decoders", "decoder", "pre_tokenizer"))
        if isinstance(node, list):
            return any(has(v) for v in node)
        return False

    return has(tokenizer_json.get("decoder")) or has(tokenizer_json.get("pre_tokenizer"))


def find_model(model: str | os.PathLike) -> tuple[Path, Path]:
    """(folder with the tokenizer and config files, .onnx file) for a folder or a .onnx path."""
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"ONNX model not found: {path} (give a folder written by `edge-reason convert onnx`)")
    if path.is_file():
        if path.suffix != ".onnx":
            raise InvalidModelError(f"{path} is not an ONNX model; pass the folder written by `edge-reason convert onnx` (a .gguf needs --backend llamacpp)")
        return path.parent, path
    manifest = _read_json(path / MANIFEST)
    for candidate in (path / manifest.get("model_file", MODEL_FILE), path / "onnx" / MODEL_FILE):
        if candidate.is_file():
            return path, candidate
    raise ModelNotFoundError(f"{path} holds no {MODEL_FILE}; export one with `edge-reason convert onnx SRC {path}`")


def _one_line(exc: BaseException, limit: int = 240) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class OnnxBackend(BackendBase):
    """One ONNX Runtime session holding one sequence (its KV cache as OrtValues)."""

    def __init__(
        self,
        model: str | os.PathLike,
        *,
        n_ctx: int | None = None,
        threads: int | None = None,
        device: str = "auto",
        n_batch: int = 512,
        ctx_beyond_training: bool = False,
        **_: Any,
    ) -> None:
        if n_ctx is not None and n_ctx < 16:
            raise ConfigError(f"context size must be >= 16 tokens, got {n_ctx}")
        check_threads(threads)
        if n_batch < 1:
            raise ConfigError(f"n_batch must be >= 1, got {n_batch}")
        self._sess = None
        folder, model_file = find_model(model)
        ort = _onnxruntime()
        self._ort = ort
        used_device, providers = resolve_providers(device, ort.get_available_providers())
        self._load_tokenizer(folder)
        self._manifest = _read_json(folder / MANIFEST)
        self._config = _read_json(folder / "config.json")
        trained = int(self._manifest.get("max_position_embeddings") or self._config.get("max_position_embeddings") or 0)
        if n_ctx is None:  # as llama.cpp: 4096, or the model's trained length if smaller
            n_ctx = min(DEFAULT_CTX, trained) if trained > 0 else DEFAULT_CTX
        check_trained_length(n_ctx, trained, beyond_training=ctx_beyond_training)

        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.inter_op_num_threads = 1
        auto = default_threads()
        intra = threads if threads is not None else auto.decode  # one thread per performance core
        opts.intra_op_num_threads = intra
        # Idle worker threads sleep instead of spinning between tokens (battery, shared cores).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

        self._ort_errors = (ort_errors.InvalidProtobuf, ort_errors.InvalidGraph, ort_errors.Fail, ort_errors.NoSuchFile,
                            ort_errors.InvalidArgument, ort_errors.NotImplemented, ort_errors.RuntimeException)
        try:
            self._sess = ort.InferenceSession(str(model_file), opts, providers=providers)
        except self._ort_errors as exc:
            raise InvalidModelError(f"{model_file} is not a loadable ONNX model (truncated, corrupt or unsupported): {_one_line(exc)}") from None
        self._bind_io(model_file)
        active = self._sess.get_providers()
        log.debug("onnxruntime %s: %s on %s", ort.__version__, model_file, ", ".join(active))
        if providers[0] not in active:
            self.close()
            raise ConfigError(f"{providers[0]} could not be started for this model (active: {', '.join(active)}); try --device cpu")
        self._n_ctx = int(n_ctx)
        self._n_batch = int(n_batch)
        self._tokens: list[int] = []
        self._kv: list[Any] = self._empty_cache()
        n_accel = [p for p in ort.get_available_providers() if p not in ("CPUExecutionProvider", "AzureExecutionProvider")]
        self.info = BackendInfo(
            name="onnx",
            device=used_device,
            model_path=str(model_file),
            n_ctx=self._n_ctx,
            threads=intra,
            gpu_layers=0,
            offload_supported=bool(n_accel),
            extra={
                "onnxruntime": ort.__version__,
                "threads_source": "--threads" if threads is not None else auto.source,
                "providers": active,
                "weights": self._manifest.get("weights", "unknown"),
                "architecture": self._manifest.get("architecture") or (self._config.get("architectures") or [None])[0],
                "n_layers": len(self._past_names) // 2,
                "kv_dtype": np.dtype(self._kv_dtype).name,
                "logits_to_keep": self._keep_name is not None,
            },
        )

    # -- loading ---------------------------------------------------------------------------------
    def _load_tokenizer(self, folder: Path) -> None:
        from tokenizers import Tokenizer

        path = folder / "tokenizer.json"
        if not path.is_file():
            raise InvalidModelError(f"{folder} has no tokenizer.json; re-export the model with `edge-reason convert onnx`")
        try:
            self._tok = Tokenizer.from_file(str(path))
            tok_json = json.loads(path.read_text(encoding="utf-8"))
        except Exception as exc:  # tokenizers raises plain Exception on malformed files
            raise InvalidModelError(f"{path} is not a valid tokenizer file: {_one_line(exc)}") from None
        meta = token_metadata(folder, self._tok)
        self._meta = meta
        self._byte_level = _is_byte_level(tok_json)
        self._byte_fallback = bool((tok_json.get("model") or {}).get("byte_fallback"))
        self._bytes_of = _byte_decoder()
        self._added = {i: t.content for i, t in self._tok.get_added_tokens_decoder().items()}
        self._pieces: dict[int, bytes] = {}

    def _bind_io(self, model_file: Path) -> None:
        inputs = {i.name: i for i in self._sess.get_inputs()}
        outputs = [o.name for o in self._sess.get_outputs()]
        if "input_ids" not in inputs or "logits" not in outputs:
            raise InvalidModelError(f"{model_file} is not a text-generation model (needs an input_ids input and a logits output)")
        self._past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self._present_names = [n.replace("past_key_values.", "present.", 1) for n in self._past_names]
        missing = [n for n in self._present_names if n not in outputs]
        if not self._past_names or missing:
            raise InvalidModelError(f"{model_file} has no KV-cache inputs/outputs (export it with past key values)")
        self._out_names = ["logits", *self._present_names]
        self._mask_name = "attention_mask" if "attention_mask" in inputs else None
        self._pos_name = "position_ids" if "position_ids" in inputs else None
        self._keep_name = "logits_to_keep" if "logits_to_keep" in inputs else None
        first = inputs[self._past_names[0]]
        self._kv_dtype = _NP_TYPES.get(first.type, np.float32)
        shape = first.shape
        kv_heads = shape[1] if isinstance(shape[1], int) else self._manifest.get("n_kv_heads") or self._config.get("num_key_value_heads")
        head_dim = shape[3] if isinstance(shape[3], int) else self._manifest.get("head_dim") or self._config.get("head_dim")
        if head_dim is None and self._config.get("hidden_size") and self._config.get("num_attention_heads"):
            head_dim = self._config["hidden_size"] // self._config["num_attention_heads"]
        if not kv_heads or not head_dim:
            raise InvalidModelError(f"{model_file}: cannot tell the KV-cache shape (no config.json with num_key_value_heads)")
        self._kv_shape = (int(kv_heads), int(head_dim))
        logits_shape = self._sess.get_outputs()[0].shape
        vocab = logits_shape[-1] if isinstance(logits_shape[-1], int) else self._config.get("vocab_size")
        self._n_vocab = int(vocab or self._tok.get_vocab_size(with_added_tokens=True))

    def _empty_cache(self) -> list[Any]:
        empty = np.zeros((1, self._kv_shape[0], 0, self._kv_shape[1]), self._kv_dtype)
        return [self._ortvalue(empty) for _ in self._past_names]

    def _ortvalue(self, array: np.ndarray) -> Any:
        return self._ort.OrtValue.ortvalue_from_numpy(np.require(array, requirements="C"))  # keeps 0-d arrays 0-d

    # -- properties --------------------------------------------------------------------------
    @property
    def eos_token_ids(self) -> frozenset[int]:
        return frozenset(self._meta["eos_token_ids"])

    @property
    def bos_token(self) -> str:
        return self._meta["bos_token"]

    @property
    def eos_token(self) -> str:
        return self._meta["eos_token"]

    @property
    def add_bos(self) -> bool:
        return bool(self._meta["add_bos"])

    @property
    def chat_template(self) -> str | None:
        return self._meta["chat_template"]

    # -- tokens --------------------------------------------------------------------------------
    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = True) -> list[int]:
        self._check_open()
        if not text:
            return []
        self._tok.encode_special_tokens = not special
        try:
            ids = self._tok.encode(text, add_special_tokens=False).ids
        finally:
            self._tok.encode_special_tokens = False
        bos = self._meta["bos_token_id"]
        return [bos, *ids] if add_bos and bos is not None else ids

    def _piece(self, token: int) -> bytes:
        token = int(token)
        if token in self._added:
            return self._added[token].encode("utf-8")
        text = self._tok.id_to_token(token)
        if text is None:  # padding rows of the embedding have no token
            return b""
        if self._byte_level:
            table = self._bytes_of
            return bytes(table[c] for c in text) if all(c in table for c in text) else text.encode("utf-8")
        if self._byte_fallback and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            return bytes([int(text[3:5], 16)])
        return text.replace("\u2581", " ").encode("utf-8")  # SentencePiece's word marker

    # -- decoding ------------------------------------------------------------------------------
    def _forward(self, chunk: list[int], keep: int) -> np.ndarray:
        """Run the graph on ``chunk`` after the cache; returns logits [kept, vocab] and
        commits the chunk and its keys/values only if the run succeeded."""
        n_past = len(self._tokens)
        total = n_past + len(chunk)
        arrays = {"input_ids": np.asarray([chunk], dtype=np.int64)}
        if self._mask_name:
            arrays[self._mask_name] = np.ones((1, total), dtype=np.int64)
        if self._pos_name:
            arrays[self._pos_name] = np.arange(n_past, total, dtype=np.int64)[None]
        if self._keep_name:
            arrays[self._keep_name] = np.array(keep, dtype=np.int64)
        feeds = {name: self._ortvalue(a) for name, a in arrays.items()}
        feeds.update(zip(self._past_names, self._kv))
        try:
            outs = self._sess.run_with_ort_values(self._out_names, feeds)
        except self._ort_errors as exc:
            raise BackendError(f"onnxruntime failed at position {n_past}: {_one_line(exc)}") from None
        self._kv = list(outs[1:])
        self._tokens.extend(chunk)
        logits = outs[0].numpy()[0]
        return logits[-keep:] if keep else logits

    def eval(self, tokens: Sequence[int]) -> np.ndarray:
        self._check_open()
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise BackendError("eval needs at least one token")
        self._check_room(len(tokens))
        for i in range(0, len(tokens), self._n_batch):
            logits = self._forward(tokens[i : i + self._n_batch], keep=1)
        return np.asarray(logits[-1], dtype=np.float32).copy()

    def score(self, tokens: Sequence[int]) -> np.ndarray:
        """Evaluate ``tokens`` after the cache and return the logits at every one of them
        (float32, ``[len(tokens), n_vocab]``): what parity verification compares."""
        self._check_open()
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise BackendError("score needs at least one token")
        self._check_room(len(tokens))
        rows = [self._forward(tokens[i : i + self._n_batch], keep=0) for i in range(0, len(tokens), self._n_batch)]
        return np.concatenate(rows).astype(np.float32)

    def rollback(self, n_past: int) -> None:
        self._check_open()
        if not self._check_rollback(n_past):
            return
        # [1, kv_heads, n, head_dim] slices are strided; one contiguous copy per rollback.
        self._kv = [self._ortvalue(v.numpy()[:, :, :n_past]) for v in self._kv]
        del self._tokens[n_past:]

    def close(self) -> None:
        if self._sess is not None:
            self._sess = None
            self._kv = []
            self._tokens = []

    def _check_open(self) -> None:
        if self._sess is None:
            raise BackendError("the backend is closed")
