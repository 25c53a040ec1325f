"""Output types, and quantization with llama.cpp's own quantizer.

Unquantized types (f32, f16, bf16) are written directly by :mod:`convert.gguf_writer`. Every
other type is produced by ``llama_model_quantize`` from an unquantized GGUF, exactly as the
``llama-quantize`` tool does (mixed K-quant recipes such as q4_k_m included; tensors whose row
length is not a multiple of the block size fall back to a type llama.cpp picks).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from edge.errors import ConversionError, ModelNotFoundError
from edge.files import atomic_output, refuse_existing

logger = logging.getLogger(__name__)

# Types written directly, by name: (gguf.GGMLQuantizationType name, gguf.LlamaFileType name).
DIRECT_TYPES: dict[str, tuple[str, str]] = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
}

# Types made by llama.cpp's quantizer, by name: suffix of llama_cpp.LLAMA_FTYPE_*.
QUANTIZED_TYPES: dict[str, str] = {
    "q8_0": "MOSTLY_Q8_0",
    "q6_k": "MOSTLY_Q6_K",
    "q5_k_m": "MOSTLY_Q5_K_M",
    "q5_k_s": "MOSTLY_Q5_K_S",
    "q5_0": "MOSTLY_Q5_0",
    "q5_1": "MOSTLY_Q5_1",
    "q4_k_m": "MOSTLY_Q4_K_M",
    "q4_k_s": "MOSTLY_Q4_K_S",
    "q4_0": "MOSTLY_Q4_0",
    "q4_1": "MOSTLY_Q4_1",
    "q3_k_l": "MOSTLY_Q3_K_L",
    "q3_k_m": "MOSTLY_Q3_K_M",
    "q3_k_s": "MOSTLY_Q3_K_S",
    "q2_k": "MOSTLY_Q2_K",
}

QUANT_TYPES: tuple[str, ...] = tuple(DIRECT_TYPES) + tuple(QUANTIZED_TYPES)


def normalize_quant(quant: str) -> str:
    name = quant.strip().lower().replace("-", "_")
    if name not in QUANT_TYPES:
        raise ConversionError(f"unknown output type {quant!r}; choose one of: {', '.join(QUANT_TYPES)}")
    return name


def quant_name_of_file_type(file_type: int) -> str | None:
    """Our name for a GGUF ``general.file_type`` value (None when we have no name for it)."""
    import gguf

    by_ftype = {gguf.LlamaFileType[f].value: n for n, (_, f) in DIRECT_TYPES.items()}
    by_ftype.update({gguf.LlamaFileType[f].value: n for n, f in QUANTIZED_TYPES.items()})
    return by_ftype.get(int(file_type))


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as exc:
        raise ConversionError(
            "quantized output needs llama-cpp-python (pip install llama-cpp-python); "
            "f32/f16/bf16 output does not"
        ) from exc
    return llama_cpp


def quantize_file(src: Path, dst: Path, quant: str, *, nthread: int | None = None) -> None:
    """Run llama.cpp's quantizer: ``src`` (an unquantized GGUF) -> ``dst``. No path checks.

    ``llama_model_quantize`` is one C call that no signal interrupts, so it runs in a child
    process (:mod:`edge.convert._quantize_child`): Ctrl-C or SIGTERM here kills the child at
    once and the exception goes on (the caller's part file is then removed).
    """
    llama_cpp = _llama_cpp()
    name = normalize_quant(quant)
    suffix = QUANTIZED_TYPES.get(name) or DIRECT_TYPES[name][1]
    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{suffix}", None)
    if ftype is None:
        raise ConversionError(f"this llama-cpp-python build has no LLAMA_FTYPE_{suffix}; upgrade it for {name}")
    cmd = [sys.executable, "-m", "edge.convert._quantize_child", str(src), str(dst), str(int(ftype)), str(nthread or os.cpu_count() or 1)]
    with tempfile.TemporaryFile() as sink:
        # its own session: a Ctrl-C at the terminal reaches this process only, which decides
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=os.name == "posix")
        try:
            rc = proc.wait()
        finally:
            if proc.returncode is None:  # interrupted: stop the quantizer now, then go on unwinding
                proc.kill()
                proc.wait()
            proc.stdin.close()
        sink.seek(0)
        log = sink.read().decode("utf-8", "replace").splitlines()
    for line in log:
        logger.debug("llama.cpp: %s", line)
    if rc != 0:
        detail = next((ln.strip() for ln in reversed(log) if ln.strip()), "no message")
        if rc < 0:
            detail = f"the quantizer was killed by signal {-rc}"
        raise ConversionError(f"llama.cpp failed to quantize {src.name} to {name}: {detail}")
    # Rows that do not fit a type's block size get another type; say so once.
    for line in log:
        if "required fallback quantization" in line:
            logger.warning("llama.cpp: %s", line.split("WARNING:")[-1].strip())


def check_output(out: str | Path, *, force: bool) -> Path:
    """A GGUF output path, checked before any heavy work: a file name in a folder that exists,
    and not an existing file unless ``force``."""
    path = Path(out).expanduser()
    if path.is_dir():
        raise ConversionError(f"{path} is a directory; give a file name such as {path / 'model.gguf'}")
    refuse_existing(path, force=force)
    if not path.parent.is_dir():
        raise ConversionError(f"{path.parent}: no such directory for the output")
    return path


def quantize(src_gguf: str | Path, out_gguf: str | Path, quant: str, *, force: bool = False) -> Path:
    """Quantize an existing GGUF (F32/F16/BF16) to ``quant`` with llama.cpp; returns the output path."""
    out = check_output(out_gguf, force=force)
    name = normalize_quant(quant)
    src = Path(src_gguf).expanduser()
    if not src.is_file():
        raise ModelNotFoundError(f"{src}: no such GGUF file")
    if src.resolve() == out.resolve():
        raise ConversionError("input and output are the same file; choose another output name")
    _llama_cpp()
    with atomic_output(out) as tmp:
        quantize_file(src, tmp, name)
    logger.info("wrote %s (%s)", out, name)
    return out
