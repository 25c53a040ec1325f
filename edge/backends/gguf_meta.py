"""A GGUF file's key/value metadata, read from its header in pure Python.

Loading a model (or even its vocabulary) through llama.cpp just to learn its trained context
length or its KV-cache shape costs a tokenizer build; the header alone answers in milliseconds,
and before anything is allocated. Scalars and strings are returned; numeric arrays up to
:data:`MAX_ARRAY` items (per-layer head counts) as tuples; longer arrays (the vocabulary, merges,
scores) are skipped.

Layout (GGUF v2/v3): magic ``GGUF``, u32 version, u64 tensor count, u64 key/value count, then
per pair a string key (u64 length + UTF-8 bytes), a u32 value type and the value.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.errors import InvalidModelError

MAX_ARRAY = 4096

# value type -> struct format of one item
_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _Truncated(Exception):
    pass


class _Cursor:
    def __init__(self, buf: Any, endian: str) -> None:
        self.buf, self.pos, self.e = buf, 0, endian
        self.size = len(buf)

    def take(self, fmt: str) -> Any:
        s = struct.Struct(self.e + fmt)
        if self.pos + s.size > self.size:
            raise _Truncated
        (v,) = s.unpack_from(self.buf, self.pos)
        self.pos += s.size
        return v

    def string(self, decode: bool = True) -> str | None:
        n = self.take("Q")
        if self.pos + n > self.size:
            raise _Truncated
        raw = self.buf[self.pos : self.pos + n] if decode else None
        self.pos += n
        return raw.decode("utf-8", errors="replace") if decode else None

    def value(self, vtype: int) -> Any:
        if vtype in _FORMATS:
            return self.take(_FORMATS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, count = self.take("I"), self.take("Q")
            if itype in _FORMATS:
                size = struct.calcsize(_FORMATS[itype])
                if self.pos + size * count > self.size:
                    raise _Truncated
                if count > MAX_ARRAY:
                    self.pos += size * count
                    return None
                return tuple(self.take(_FORMATS[itype]) for _ in range(count))
            if itype == _STRING:
                for _ in range(count):
                    self.string(decode=False)
                return None
            if itype == _ARRAY:
                for _ in range(count):
                    self.value(_ARRAY)
                return None
        raise ValueError(f"unknown GGUF value type {vtype}")


@dataclass(frozen=True)
class TensorInfo:
    """One entry of a GGUF file's tensor table: name, ggml type id and shape (GGUF order:
    ``shape[0]`` is the row length)."""

    name: str
    ggml_type: int
    shape: tuple[int, ...]

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def n_bytes(self) -> int:
        """Bytes of the tensor's data (0 for a type the gguf package does not know)."""
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        try:
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(self.ggml_type)]
        except (ValueError, KeyError):
            return 0
        return self.n_elements // block * size


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of the GGUF file at ``path`` (an :class:`InvalidModelError` when the header
    is not GGUF, is truncated or is malformed)."""
    return _read(path, tensors=False)[0]


def read_gguf(path: str | os.PathLike) -> tuple[dict[str, Any], list[TensorInfo]]:
    """The metadata and the tensor table (names, types, shapes; no tensor data) of a GGUF file."""
    return _read(path, tensors=True)


def _read(path: str | os.PathLike, *, tensors: bool) -> tuple[dict[str, Any], list[TensorInfo]]:
    p = Path(path)
    with open(p, "rb") as f:
        if os.fstat(f.fileno()).st_size < 24:
            raise InvalidModelError(f"{p} is truncated (shorter than a GGUF header)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            if buf[:4] != b"GGUF":
                raise InvalidModelError(f"{p} is not a GGUF file (bad magic {bytes(buf[:4])!r})")
            endian = "<"
            version = struct.unpack_from("<I", buf, 4)[0]
            if version & 0xFFFF == 0:  # a big-endian file
                endian, version = ">", struct.unpack_from(">I", buf, 4)[0]
            if version < 2:
                raise InvalidModelError(f"{p} is GGUF version {version}, too old for llama.cpp; convert the model again")
            cur = _Cursor(buf, endian)
            cur.pos = 8
            meta: dict[str, Any] = {}
            table: list[TensorInfo] = []
            try:
                n_tensors = cur.take("Q")
                for _ in range(cur.take("Q")):
                    key = cur.string()
                    value = cur.value(cur.take("I"))
                    if value is not None:
                        meta[key] = value
                # the tensor table follows the metadata: name, dimensions, type, data offset
                for _ in range(n_tensors if tensors else 0):
                    name = cur.string()
                    shape = tuple(cur.take("Q") for _ in range(cur.take("I")))
                    table.append(TensorInfo(name, cur.take("I"), shape))
                    cur.take("Q")
            except _Truncated:
                raise InvalidModelError(f"{p} is truncated (its metadata ends early); download or convert it again") from None
            except (ValueError, OverflowError, MemoryError) as exc:
                raise InvalidModelError(f"{p} has malformed GGUF metadata ({exc})") from None
            return meta, table


def arch_value(meta: dict[str, Any], key: str, default: Any = None) -> Any:
    """``<architecture>.<key>`` from ``meta`` (e.g. ``context_length``)."""
    return meta.get(f"{meta.get('general.architecture', '')}.{key}", default)


def trained_context(meta: dict[str, Any]) -> int:
    """The context length the model was trained with (``<arch>.context_length``); 0 when unknown."""
    value = arch_value(meta, "context_length", 0)
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
