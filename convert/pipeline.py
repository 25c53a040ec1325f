"""``to_gguf``: a Hugging Face checkpoint (folder or hub id) to one GGUF file."""

from __future__ import annotations

import logging
from pathlib import Path

from edge.convert.hf import Checkpoint, resolve_source
from edge.convert.quantize import DIRECT_TYPES, _llama_cpp, check_output, normalize_quant, quantize_file
from edge.files import atomic_output, temp_path

logger = logging.getLogger(__name__)


def _intermediate_type(ckpt: Checkpoint) -> str:
    """Lossless unquantized type for the file llama.cpp quantizes from: the source's own dtype."""
    dtypes = {info.dtype for info in ckpt.tensor_infos().values()}
    if dtypes <= {"bfloat16"}:
        return "bf16"
    if dtypes <= {"float16"}:
        return "f16"
    return "f32"


def to_gguf(
    src: str | Path,
    out: str | Path,
    *,
    quant: str = "f16",
    force: bool = False,
    progress: bool = True,
    revision: str | None = None,
) -> Path:
    """Convert ``src`` (HF folder or hub repo id) to the GGUF file ``out``; returns its path.

    ``quant`` is one of :data:`convert.quantize.QUANT_TYPES`. f32/f16/bf16 are written directly
    (norms and biases always f32); other types are written unquantized to a temporary file in
    the output folder first, in the source's own precision, then quantized by llama.cpp. The
    output appears only when everything succeeded; an existing ``out`` is refused unless
    ``force``.
    """
    import gguf

    from edge.convert.gguf_writer import write_gguf

    out_path = check_output(out, force=force)
    qname = normalize_quant(quant)
    if qname not in DIRECT_TYPES:
        _llama_cpp()  # fail now, not after writing gigabytes
    folder = resolve_source(src, revision=revision)
    model_name = Path(str(src)).name  # repo or folder name (a hub snapshot folder is a commit hash)

    with Checkpoint(folder) as ckpt, atomic_output(out_path) as tmp:
        if qname in DIRECT_TYPES:
            qtype, ftype = DIRECT_TYPES[qname]
            write_gguf(ckpt, tmp, gguf.GGMLQuantizationType[qtype], gguf.LlamaFileType[ftype],
                       name=model_name, progress=progress)
        else:
            base = _intermediate_type(ckpt)
            qtype, ftype = DIRECT_TYPES[base]
            with temp_path(out_path.parent, out_path.name, suffix=f".{base}.part") as unquantized:
                write_gguf(ckpt, unquantized, gguf.GGMLQuantizationType[qtype], gguf.LlamaFileType[ftype],
                           name=model_name, progress=progress)
                logger.info("quantizing to %s", qname)
                quantize_file(unquantized, tmp, qname)
    logger.info("wrote %s (%s)", out_path, qname)
    return out_path
