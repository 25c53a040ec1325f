"""Which model to load and how: a :class:`ModelSpec`, and resolving its model reference.

A model reference is resolved to a local path:

- ``None`` -> the bundled default model (tiny-r1, shipped inside the package);
- an existing path -> that file;
- ``owner/repo:file.gguf`` -> downloaded once with huggingface-hub (progress bar, resumable,
  cached in the usual Hugging Face cache, reused offline afterwards).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from edge.errors import ConfigError, ModelNotFoundError
from edge.params import offered

BUNDLED_DIR = Path(__file__).resolve().parent / "models"
DEFAULT_MODEL_FILE = "tiny-r1-q8_0.gguf"
# what the bundled model can do: it knows its training task and nothing else
DEFAULT_MODEL_HINT = (
    "tiny-r1 is a 1.65M-parameter demo model that only knows chained arithmetic, e.g. "
    "'a = 12. b = a + 7. c = b - 5. What is c?'; pass --model for a real one"
)
HUB_REF = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+):(?P<file>[^:]+\.(gguf|onnx))$")


def default_model() -> Path:
    path = BUNDLED_DIR / DEFAULT_MODEL_FILE
    if not path.exists():
        raise ModelNotFoundError(
            "no bundled default model in this install; pass one with --model PATH.gguf "
            "or --model owner/repo:file.gguf (a Hugging Face repo file)"
        )
    return path


def resolve_model(ref: str | os.PathLike | None) -> Path:
    """Return a local path for ``ref`` (downloading a hub file if needed)."""
    if ref is None or str(ref) == "":
        return default_model()
    ref = str(ref)
    p = Path(ref).expanduser()
    if p.exists():
        return p
    m = HUB_REF.match(ref)
    if m:
        return _download(m["repo"], m["file"])
    raise ModelNotFoundError(f"model not found: {ref} (give a .gguf path, an ONNX folder, or owner/repo:file.gguf)")


def _download(repo_id: str, filename: str) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(hf_hub_download(repo_id=repo_id, filename=filename))
    except LocalEntryNotFoundError:  # a subclass of EntryNotFoundError: test it first
        raise ModelNotFoundError(
            f"{repo_id}:{filename} is not in the local cache and the hub cannot be reached; "
            "download it on a connected machine or pass a local path"
        ) from None
    except (RepositoryNotFoundError, EntryNotFoundError) as exc:
        raise ModelNotFoundError(f"{repo_id}:{filename} is not on the hub ({type(exc).__name__})") from None
    except OSError as exc:
        raise ModelNotFoundError(f"could not download {repo_id}:{filename}: {exc}") from None


def _threads_help() -> str:
    from edge.backends.cpu import default_threads

    auto = default_threads()
    return (f"CPU threads for decoding and batches (default here: {auto.decode} to decode, one per performance core "
            f"({auto.source}), {auto.batch} for batches).")


LOCAL_OPTIONS = ("n_ctx", "ctx_beyond_training", "threads", "device")
BACKEND_OPTIONS: dict[str, tuple[str, ...]] = {
    "llamacpp": (*LOCAL_OPTIONS, "gpu_layers", "kv_cache", "flash_attn"),
    "onnx": LOCAL_OPTIONS,
    "remote": ("n_ctx", "timeout"),  # the model reference is the server's URL, passed as given
}
"""The options of a :class:`ModelSpec` each backend takes (a registered backend: those of a
local one). The one place that knows; an option a backend does not take is not passed to it."""


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load and how: what the command line's model options, the bench and the
    Python API ask of a :class:`~edge.runtime.Runtime`.

    A field's metadata makes its command-line option (:func:`edge.params.offered`), so a new
    model option is one field here (and its backends in :data:`BACKEND_OPTIONS`). ``options``
    holds further keywords for the backend (``api_key`` of the remote one, ``n_batch`` ...).
    ``reasoning_prompt`` is the Runtime's own (see :mod:`edge.reasoning`), not the backend's.
    """

    model: str | None = field(default=None, metadata=offered(
        "-m", "--model", help="GGUF path, ONNX folder, or owner/repo:file.gguf (default: the bundled tiny-r1)."))
    backend: str = field(default="llamacpp", metadata=offered("--backend", help="llamacpp | onnx | remote"))
    n_ctx: int | str | None = field(default=None, metadata=offered(
        "--ctx", help="Context size in tokens (default: 4096, or the model's trained length if smaller); refused beyond the trained "
                      "length or when the KV cache and weights would not fit in memory. 'auto': the largest that fits the free "
                      "memory, up to the trained length (the estimate is printed before loading)."))
    kv_cache: str = field(default="f16", metadata=offered(
        "--kv-cache", metavar="f16|q8_0|q4_0",
        help="KV cache type (llama.cpp): q8_0 halves its memory (top-1 agreement with f16 ~98% on Qwen2.5-1.5B; "
             "on CPUs it decodes slower at depth: 0.62x f16 at 8k tokens on 2 AVX2 cores), "
             "q4_0 quarters it but breaks Qwen2.5-family models (R1-Distill-Qwen included: 7% agreement); "
             "both turn flash attention on."))
    flash_attn: bool | None = field(default=None, metadata=offered(
        "--flash-attn/--no-flash-attn",
        help="Flash attention (llama.cpp; default: on only with a quantized --kv-cache, which needs it). With it llama.cpp "
             "computes small batches exactly as one-token steps, so speculation can draft and stay token-exact."))
    ctx_beyond_training: bool = field(default=False, metadata=offered(
        "--ctx-beyond-training", help="Allow a --ctx above the model's trained length (its output degrades there)."))
    threads: int | None = field(default=None, metadata=offered("--threads", help=_threads_help))
    device: str = field(default="auto", metadata=offered(
        "--device", help="auto | cpu | cuda | metal; with an ONNX model also xnnpack | qnn | nnapi | coreml | dml | openvino | rocm | tensorrt | webgpu."))
    gpu_layers: int | None = field(default=None, metadata=offered(
        "--gpu-layers", help="Layers to offload (-1 = all; default all when a GPU is used)."))
    reasoning_prompt: str | bool | None = field(default=None, metadata=offered(
        "--reasoning-prompt", metavar="STYLE|TEXT", type=str,
        help="Make an instruct model reason in <think>: a system instruction (style 'step' or 'r1', or your own "
             "text) and an opened think block. Not needed for R1-Distill and other reasoning models."))
    timeout: float | None = field(default=None, metadata=offered(
        "--timeout", help="With --backend remote: seconds to wait for each answer of the server (default 120); a server stalled longer is an error."))
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from edge.backends.devices import KNOWN_DEVICES

        if self.device not in KNOWN_DEVICES:  # the backend checks what its own build has
            raise ConfigError(f"unknown device {self.device!r}; choose one of: {', '.join(KNOWN_DEVICES)}", param="device")
        if self.timeout is not None and self.backend != "remote":
            raise ConfigError("--timeout applies to --backend remote only", param="timeout")
        if self.backend != "llamacpp" and (str(self.kv_cache).lower() != "f16" or self.n_ctx == "auto"):
            raise ConfigError("--kv-cache and --ctx auto apply to --backend llamacpp only", param="kv_cache")
        if self.backend != "llamacpp" and self.flash_attn is not None:
            raise ConfigError("--flash-attn applies to --backend llamacpp only", param="flash_attn")

    @classmethod
    def of(cls, model: Any = None, **kw: Any) -> "ModelSpec":
        """A spec from keywords: those naming a field set it, the rest are backend ``options``."""
        names = {f.name for f in fields(cls)} - {"options"}
        return cls(None if model is None else str(model), **{k: v for k, v in kw.items() if k in names},
                   options={k: v for k, v in kw.items() if k not in names})

    def load_backend(self):
        """Load the backend: the model reference resolved (but the remote one's URL), and the
        options given that this backend takes (for the rest its own defaults hold)."""
        from edge.backends import load_backend

        backend, ref = self.backend, self.model
        if backend != "remote":
            path = resolve_model(ref)
            if backend == "llamacpp" and path.is_dir() and any(path.glob("*.onnx")):
                backend = "onnx"  # an exported ONNX folder: no need to say --backend onnx
            ref = str(path)
        takes = BACKEND_OPTIONS.get(backend, LOCAL_OPTIONS)
        given = {f.name: getattr(self, f.name) for f in fields(self) if f.name in takes and getattr(self, f.name) != f.default}
        return load_backend(backend, str(ref), **given, **self.options)
