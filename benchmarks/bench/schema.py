"""The benchmark record: one JSON file per run, portable between devices.

A record is ``{"schema_version": 1, "kind": "edge-reason-bench", "device": ..., "model": ...,
"config": ..., "results": {"throughput"?, "overhead"?, "reasoning"?}, ...}``. The schema below
is a small JSON-Schema subset (``type``, ``properties``, ``required``, ``items``, ``enum``,
``minimum``, ``minProperties``) checked by :func:`check`, a few lines of plain Python, so
records validate without extra dependencies. Records hold no absolute paths or user names:
the model is named by file name, size and GGUF metadata.

Bump :data:`SCHEMA_VERSION` when a field changes meaning or a required field is added; readers
refuse other versions with a message that says what to do.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from edge.errors import ConfigError
from edge.files import atomic_write, refuse_existing

SCHEMA_VERSION = 1
KIND = "edge-reason-bench"
SUITES = ("throughput", "overhead", "reasoning", "peers")
DEFAULT_SUITES = ("throughput", "overhead", "reasoning")  # "all"; peers needs llama.cpp's programs built
DEVICE_CLASSES = ("phone", "tablet", "laptop", "desktop", "server", "unknown")


class RecordError(ConfigError):
    """A benchmark record is missing, unreadable, of another schema version, or invalid."""


def _t(*types: str, **more: Any) -> dict[str, Any]:
    return {"type": list(types) if len(types) > 1 else types[0], **more}


def _obj(required: dict[str, Any], optional: dict[str, Any] | None = None, **more: Any) -> dict[str, Any]:
    return {"type": "object", "properties": {**required, **(optional or {})}, "required": list(required), **more}


NUM = _t("number")
NUM_OR_NULL = _t("number", "null")
INT = _t("integer")
INT_OR_NULL = _t("integer", "null")
STR = _t("string")
STR_OR_NULL = _t("string", "null")
BOOL_OR_NULL = _t("boolean", "null")

SPREAD = _obj(
    {"median": NUM, "min": NUM, "max": NUM, "n": _t("integer", minimum=1), "values": _t("array", items=NUM)},
    {"q1": NUM, "q3": NUM},
)

DEVICE = _obj(
    {
        "label": _t("string", minLength=1),
        "class": _t("string", enum=list(DEVICE_CLASSES)),
        "os": _obj({"system": STR, "release": STR_OR_NULL}, {"version": STR_OR_NULL, "distro": STR_OR_NULL}),
        "cpu": _obj(
            {"model": STR_OR_NULL, "physical_cores": INT_OR_NULL, "logical_cores": INT_OR_NULL},
            {"arch": STR_OR_NULL, "max_mhz": INT_OR_NULL, "flags": _t("array", items=STR),
             "clusters": _t("array", items=_obj({"core": STR, "count": INT}, {"role": STR, "max_mhz": INT_OR_NULL}))},
        ),
        "memory_bytes": INT_OR_NULL,
        "gpus": _t("array", items=_obj({"name": STR}, {"memory_bytes": INT_OR_NULL, "driver": STR_OR_NULL, "vendor": STR_OR_NULL})),
        "software": _obj({"python": STR}, {"edge_reason": STR_OR_NULL}),
        "backend": _obj(
            {"name": STR, "llama_cpp_python": STR_OR_NULL, "offload_supported": BOOL_OR_NULL},
            {"system_info": STR, "cpu_features": _t("array", items=STR), "accelerators": _t("array", items=STR), "gpu_kind": STR_OR_NULL},
        ),
    },
    {
        "virtualized": BOOL_OR_NULL,
        "product": _t("object", "null"),
        "soc": _t("object", "null"),
        "battery": _t("object", "null", properties={"percent": INT_OR_NULL, "plugged": BOOL_OR_NULL}),
        "energy_source": STR_OR_NULL,
    },
)

MODEL = _obj(
    {"file": STR, "quant": STR_OR_NULL, "size_bytes": INT},
    {"name": STR_OR_NULL, "architecture": STR_OR_NULL, "parameters": INT_OR_NULL, "context_length": INT_OR_NULL, "file_type": INT_OR_NULL},
)

THROUGHPUT_CONFIG = _obj(
    {
        "threads": INT,
        "gpu_layers": INT,
        "load_seconds": NUM,
        "prefill": _t("array", items=_obj({"tokens": _t("integer", minimum=1), "tok_s": SPREAD})),
        "decode": _t("array", items=_obj({"depth": _t("integer", minimum=0), "tokens": _t("integer", minimum=2), "tok_s": SPREAD})),
        "ttft": _obj({"prompt_tokens": INT, "seconds": SPREAD}),
        "peak_rss_bytes": INT_OR_NULL,
        "ru_maxrss_bytes": INT_OR_NULL,
        "energy_joules": NUM_OR_NULL,
    },
    {"device": STR, "n_ctx": INT},
)

THROUGHPUT = _obj({"configs": _t("array", items=THROUGHPUT_CONFIG, minItems=1), "warmup": INT, "repeats": INT})

OVERHEAD = _obj({
    "runs": _t("array", minItems=1, items=_obj(
        {"threads": INT, "tokens": INT, "repeats": INT, "bare": SPREAD, "edge": SPREAD, "ratio": NUM},
        {"prompt_tokens": INT, "energy_joules": NUM_OR_NULL, "same_tokens": BOOL_OR_NULL},
    )),
    "controllers": _t("array", items=STR),
})

REASONING = _obj(
    {
        "task": STR,
        "policies": _t("array", minItems=1, items=_obj(
            {"policy": STR, "n": INT, "accuracy": NUM, "thinking_tokens": NUM},
            {"probe_tokens": NUM, "net_tokens": NUM, "seconds": NUM, "ttfa_median": NUM_OR_NULL,
             "time_to_correct_median": NUM_OR_NULL, "correct": INT},
        )),
        "records": _t("array", items=_obj(
            {"id": STR, "policy": STR, "correct": _t("boolean"), "thinking_tokens": INT, "seconds": NUM},
            {"time_to_first_answer_token": NUM_OR_NULL, "probe_tokens": INT},
        )),
    },
    {"threads": INT, "max_tokens": INT, "energy_joules": NUM_OR_NULL},
)

PEERS = _obj({
    "threads": INT, "tokens": INT, "prompt_tokens": INT, "rounds": INT,
    "contenders": _t("array", minItems=1, items=_obj(
        {"name": STR, "decode_tok_s": SPREAD, "decode_ratio_to_edge": SPREAD},
        {"prefill_tok_s": SPREAD, "prefill_ratio_to_edge": SPREAD, "same_tokens": BOOL_OR_NULL},
    )),
})

RECORD = _obj(
    {
        "schema_version": _t("integer", enum=[SCHEMA_VERSION]),
        "kind": _t("string", enum=[KIND]),
        "created_utc": STR,
        "device": DEVICE,
        "model": MODEL,
        "config": _t("object"),
        "results": _obj({}, {"throughput": THROUGHPUT, "overhead": OVERHEAD, "reasoning": REASONING, "peers": PEERS}, minProperties=1),
    },
    {"duration_seconds": NUM, "power": _t("object"), "argv": _t("array", items=STR), "notes": STR_OR_NULL,
     "conditions": _t("object", properties={"load_average_start": _t("array", "null", items=NUM),
                                            "load_average_end": _t("array", "null", items=NUM)})},
)


# -- the validator -------------------------------------------------------------------------------

_PY_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def _show(v: Any) -> str:
    text = json.dumps(v) if not isinstance(v, (dict, list)) else type(v).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def check(value: Any, schema: dict[str, Any], path: str = "$") -> list[str]:
    """Every way ``value`` breaks ``schema``, as ``path: what is wrong`` messages."""
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else types
        if not any(_PY_TYPES[t](value) for t in types):
            return [f"{path}: expected {' or '.join(types)}, got {_show(value)}"]
    errors: list[str] = []
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {_show(value)} is not one of {', '.join(map(str, schema['enum']))}")
    if "minimum" in schema and isinstance(value, (int, float)) and value < schema["minimum"]:
        errors.append(f"{path}: {value} is below the minimum {schema['minimum']}")
    if "minLength" in schema and isinstance(value, str) and len(value) < schema["minLength"]:
        errors.append(f"{path}: must not be empty")
    if isinstance(value, dict):
        for key in schema.get("required", ()):
            if key not in value:
                errors.append(f"{path}: missing required field {key!r}")
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                errors += check(value[key], sub, f"{path}.{key}")
        if len(value) < schema.get("minProperties", 0):
            names = ", ".join(schema.get("properties", {})) or "fields"
            errors.append(f"{path}: needs at least {schema['minProperties']} of: {names}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{path}: needs at least {schema['minItems']} item(s)")
        if "items" in schema:
            for i, item in enumerate(value):
                errors += check(item, schema["items"], f"{path}[{i}]")
    return errors


def validate(record: Any, *, source: str = "record") -> None:
    """Raise :class:`RecordError` naming the first problem (and how many more) if ``record``
    is not a valid benchmark record of this schema version."""
    if not isinstance(record, dict):
        raise RecordError(f"{source}: a benchmark record is a JSON object, got {type(record).__name__}")
    if "schema_version" not in record:
        raise RecordError(f"{source}: not an edge-reason bench record (no schema_version field)")
    version = record["schema_version"]
    if version != SCHEMA_VERSION:
        hint = "upgrade edge-reason to read it" if isinstance(version, int) and version > SCHEMA_VERSION else "re-run the benchmark to regenerate it"
        raise RecordError(f"{source}: schema_version {version!r} is not supported (this edge-reason reads version {SCHEMA_VERSION}); {hint}")
    errors = check(record, RECORD)
    if errors:
        more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
        raise RecordError(f"{source}: invalid record: {errors[0]}{more}")


# -- files -----------------------------------------------------------------------------------------

def write_record(record: dict[str, Any], path: str | os.PathLike, *, force: bool = False) -> Path:
    """Validate ``record`` and write it to ``path`` atomically (:func:`edge.files.atomic_write`:
    a temporary file in the same folder, flushed, then renamed over the target), so a reader
    never sees half a record; an existing ``path`` is refused unless ``force``."""
    path = Path(path)
    validate(record, source=str(path))
    path = refuse_existing(path, force=force)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, json.dumps(record, indent=1, ensure_ascii=False) + "\n")


def check_output_path(path: str | os.PathLike, *, force: bool = False) -> Path:
    """Refuse an existing output before any measurement runs."""
    path = Path(path)
    if path.is_dir():
        raise RecordError(f"--out {path} is a folder; give a file name such as {path / 'run.json'}")
    return refuse_existing(path, force=force)


def load_record(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise RecordError(f"record not found: {path}")
    if path.is_dir():
        raise RecordError(f"{path} is a folder; pass record files (*.json)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecordError(f"cannot read {path}: {exc}") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RecordError(f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    validate(record, source=str(path))
    return record


def expand_paths(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Record files, with a folder standing for the ``*.json`` files inside it."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.json"))
            if not found:
                raise RecordError(f"no *.json records in folder {p}")
            out += found
        else:
            out.append(p)
    if not out:
        raise RecordError("no records given")
    return out


def load_records(paths: Iterable[str | os.PathLike]) -> list[dict[str, Any]]:
    return [load_record(p) for p in expand_paths(paths)]
