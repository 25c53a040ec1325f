"""Copies of a GGUF with other metadata: models whose chat template is whatever a test needs."""

from __future__ import annotations

from pathlib import Path

BUNDLED = Path(__file__).resolve().parent.parent / "edge" / "models" / "tiny-r1-q8_0.gguf"


def with_chat_template(dst: Path, template: str | None, src: Path = BUNDLED) -> Path:
    """Write ``src`` to ``dst`` with ``tokenizer.chat_template`` replaced by ``template``
    (removed when None); every other key and every tensor is copied unchanged."""
    import gguf

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, arch=reader.get_field(gguf.Keys.General.ARCHITECTURE).contents(), endianess=reader.endianess)
    alignment = reader.get_field(gguf.Keys.General.ALIGNMENT)
    if alignment is not None:
        writer.data_alignment = alignment.contents()
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith(("GGUF.", gguf.Keys.Tokenizer.CHAT_TEMPLATE)):
            continue  # written by GGUFWriter itself, or replaced below
        kind = field.types[0]
        writer.add_key_value(field.name, field.contents(), kind, sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    if template is not None:
        writer.add_chat_template(template)
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    writer.close()
    return dst


def chat_template_of(path: Path) -> str | None:
    import gguf

    field = gguf.GGUFReader(path).get_field(gguf.Keys.Tokenizer.CHAT_TEMPLATE)
    return field.contents() if field is not None else None
