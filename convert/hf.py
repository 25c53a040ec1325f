"""Resolving and reading a Hugging Face checkpoint without loading it into memory.

A source is either a local folder (``config.json`` + safetensors or PyTorch ``.bin`` shards,
optionally with an index json, + ``tokenizer.json``) or a hub repo id (``owner/name``), which is
downloaded with :func:`huggingface_hub.snapshot_download`, restricted to the files conversion
needs, into the usual hub cache (so a second conversion does not download again).

Tensors are opened lazily: :meth:`Checkpoint.tensor_infos` reads only headers (names, shapes,
dtypes) and :meth:`Checkpoint.read_rows` reads a row range of one tensor from a memory map.
"""

from __future__ import annotations

import json
import logging
import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.errors import ConversionError, ModelNotFoundError

logger = logging.getLogger(__name__)

# Files a conversion reads; weights are added per repo once we know which format it ships.
_META_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.json",
    "chat_template.jinja",
]
_SAFETENSORS_PATTERNS = ["*.safetensors", "model.safetensors.index.json"]
_BIN_PATTERNS = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def resolve_source(src: str | Path, *, revision: str | None = None) -> Path:
    """Return a local folder for ``src``: the folder itself, or a hub snapshot of it."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConversionError(f"{path} is a file; pass the checkpoint folder that holds config.json")
        return path
    text = str(src)
    if not _REPO_ID.match(text) or Path(text.split("/")[0]).is_dir():
        # "models/typo" is a missing local folder, not a repo of the user "models".
        raise ModelNotFoundError(f"{src}: no such folder (and not a hub repo id of the form owner/name)")
    return _download(text, revision=revision)


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exceptions meaning "the hub could not be reached" for this huggingface_hub version."""
    import importlib

    errors: list[type[BaseException]] = [OSError]  # requests-based hubs, OfflineModeIsEnabled
    for name in ("httpx2", "httpx"):  # httpx-based hubs (1.x) raise its transport errors
        try:
            errors.append(importlib.import_module(name).HTTPError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _has_weights(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(
        any(folder.glob(pattern)) for pattern in ("*.safetensors", "pytorch_model*.bin")
    )


def _download(repo_id: str, *, revision: str | None) -> Path:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # A complete snapshot in the hub cache is used as is, without touching the network.
    try:
        cached = Path(snapshot_download(repo_id, revision=revision, local_files_only=True,
                                        allow_patterns=_META_PATTERNS + _SAFETENSORS_PATTERNS + _BIN_PATTERNS))
        if _has_weights(cached):
            return cached
    except LocalEntryNotFoundError:
        pass

    try:
        files = HfApi().list_repo_files(repo_id, revision=revision)
        if any(f.endswith(".safetensors") for f in files):
            weights = _SAFETENSORS_PATTERNS
        elif any(f.endswith(".bin") for f in files):
            weights = _BIN_PATTERNS
        else:
            raise ConversionError(f"{repo_id} has neither .safetensors nor pytorch .bin weights")
        logger.info("downloading %s (%s)", repo_id, ", ".join(weights))
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=_META_PATTERNS + weights))
    except GatedRepoError as exc:
        raise ModelNotFoundError(
            f"{repo_id} is gated: accept its terms on huggingface.co and log in with `hf auth login`"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise ModelNotFoundError(f"{repo_id}: no such repo on the hub (or it is private: log in with `hf auth login`)") from exc
    except RevisionNotFoundError as exc:
        raise ModelNotFoundError(f"{repo_id}: no revision {revision!r}") from exc
    except _network_errors() as exc:
        raise ModelNotFoundError(
            f"{repo_id}: cannot download from the hub ({exc}); check the connection or pass a local folder"
        ) from exc


@dataclass(frozen=True)
class TensorInfo:
    """What the header of a weight file says about one tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "bfloat16"
    file: Path


_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
_ST_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def _safetensors_header(file: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset where its data starts."""
    import json
    import struct

    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ConversionError(f"{file}: cannot read safetensors header (file too short)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 2**20:
            raise ConversionError(f"{file}: cannot read safetensors header (header of {n} bytes)")
        try:
            header = json.loads(f.read(n))
        except ValueError as exc:
            raise ConversionError(f"{file}: cannot read safetensors header ({exc})") from None
    header.pop("__metadata__", None)
    return header, 8 + n


def _read_safetensors_rows(file: Path, entry: dict, data_start: int, dtype: str, shape: tuple[int, ...], start, stop):
    """Rows of one tensor as float32, through a memory map of just those bytes that is closed
    right after: the pages read leave the process's resident set with it, so peak RSS stays
    at about one chunk, not the whole file."""
    import numpy as np

    begin, _ = entry["data_offsets"]
    row = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    nrows = shape[0] if shape else 1
    lo = 0 if start is None else start
    hi = nrows if stop is None else min(stop, nrows)
    count = (hi - lo) * row if shape else 1
    size = _ST_ITEMSIZE[dtype]
    storage = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16, "float64": np.float64}[dtype]
    new_shape = ((hi - lo),) + tuple(shape[1:]) if shape else ()
    if count == 0:
        return np.zeros(new_shape, dtype=np.float32)
    mm = np.memmap(file, dtype=storage, mode="r", offset=data_start + begin + lo * row * size, shape=(count,))
    if dtype == "bfloat16":
        out = (mm.astype(np.uint32) << 16).view(np.float32)
    else:
        out = mm.astype(np.float32)
    del mm  # unmaps: the pages read leave the resident set
    new_shape = ((hi - lo),) + tuple(shape[1:]) if shape else ()
    return out.reshape(new_shape)


class Checkpoint:
    """A local HF checkpoint folder: config, tokenizer files and lazily opened weights.

    Use as a context manager; memory maps of the weight files are closed on exit.
    """

    def __init__(self, folder: Path):
        self.folder = folder
        config_path = folder / "config.json"
        if not config_path.is_file():
            raise ConversionError(f"{folder}: no config.json; is this a Hugging Face checkpoint folder?")
        try:
            self.config: dict[str, Any] = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConversionError(f"{config_path}: not valid JSON ({exc})") from exc
        self._stack = ExitStack()
        self._handles: dict[Path, Any] = {}
        self._infos: dict[str, TensorInfo] | None = None

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._handles.clear()
        self._stack.close()

    # -- metadata ---------------------------------------------------------------------------

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        if not archs:
            raise ConversionError(f"{self.folder / 'config.json'} names no architecture (no 'architectures' list)")
        return archs[0]

    def json_file(self, name: str) -> dict[str, Any] | None:
        path = self.folder / name
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConversionError(f"{path}: not valid JSON ({exc})") from exc

    def tokenizer_json(self) -> dict[str, Any]:
        tok = self.json_file("tokenizer.json")
        if tok is None:
            raise ConversionError(
                f"{self.folder}: no tokenizer.json; conversion needs the fast (tokenizers) tokenizer file "
                "(save one with AutoTokenizer.from_pretrained(...).save_pretrained(folder))"
            )
        return tok

    # -- weights ----------------------------------------------------------------------------

    def weight_files(self) -> list[Path]:
        for index_name, pattern in (
            ("model.safetensors.index.json", "*.safetensors"),
            ("pytorch_model.bin.index.json", "pytorch_model*.bin"),
        ):
            index = self.json_file(index_name)
            if index is not None:
                names = sorted(set(index.get("weight_map", {}).values()))
                missing = [n for n in names if not (self.folder / n).is_file()]
                if missing:
                    raise ConversionError(f"{self.folder}: {index_name} lists missing shard(s): {', '.join(missing)}")
                return [self.folder / n for n in names]
            files = sorted(self.folder.glob(pattern))
            if files:
                return files
        raise ConversionError(f"{self.folder}: no weights (*.safetensors or pytorch_model*.bin)")

    def _open(self, file: Path) -> Any:
        handle = self._handles.get(file)
        if handle is not None:
            return handle
        if file.suffix == ".safetensors":
            handle = _safetensors_header(file)
        else:
            import torch

            try:
                # mmap keeps the shard on disk; weights_only refuses arbitrary pickled code.
                handle = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
            except (RuntimeError, OSError, ValueError) as exc:
                raise ConversionError(f"{file}: cannot read PyTorch weights ({exc})") from exc
        self._handles[file] = handle
        return handle

    def tensor_infos(self) -> dict[str, TensorInfo]:
        """Names, shapes and dtypes of every tensor, read from headers only."""
        if self._infos is not None:
            return self._infos
        infos: dict[str, TensorInfo] = {}
        for file in self.weight_files():
            handle = self._open(file)
            if file.suffix == ".safetensors":
                header, _ = handle
                for name, entry in header.items():
                    dtype = _ST_DTYPES.get(entry["dtype"], entry["dtype"].lower())
                    infos[name] = TensorInfo(name, tuple(entry["shape"]), dtype, file)
            else:
                for name, t in handle.items():
                    infos[name] = TensorInfo(name, tuple(t.shape), str(t.dtype).removeprefix("torch."), file)
        self._infos = infos
        return infos

    def read_rows(self, info: TensorInfo, start: int | None = None, stop: int | None = None):
        """Rows ``start:stop`` of a tensor (all of a 0-d/1-d one) as a float32 numpy array."""
        handle = self._open(info.file)
        if info.file.suffix == ".safetensors":
            header, data_start = handle
            if info.dtype not in _ST_ITEMSIZE:
                raise ConversionError(f"{info.file}: tensor {info.name} has unsupported dtype {info.dtype}")
            if not info.shape or len(info.shape) == 1:
                start = stop = None  # 0-d / 1-d tensors are read whole
            return _read_safetensors_rows(info.file, header[info.name], data_start, info.dtype, info.shape, start, stop)
        import torch

        t = handle[info.name]
        if start is not None or stop is not None:
            t = t[start:stop]
        return t.to(torch.float32).numpy()
