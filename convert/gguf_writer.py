"""Writing a Hugging Face checkpoint as an unquantized GGUF (F32, F16 or BF16).

Built on the ``gguf`` package: :class:`gguf.GGUFWriter` for the file format,
:func:`gguf.get_tensor_name_map` for tensor names and :class:`gguf.SpecialVocab` for merges,
special token ids and the chat template.

The file is written in two passes over the checkpoint, never holding the model in memory: the
first reads only the weight-file headers to declare every tensor (name, shape, type), the second
streams each tensor in row chunks from the memory-mapped weights, converts it and appends it.

Architectures are a small registry (:class:`ArchSpec` per name, :data:`SUPPORTED_ARCHITECTURES`). Two details matter for parity:

* **Llama Q/K rows are permuted.** HF Llama applies RoPE "rotate-half" style: dimension ``i`` of
  a head is rotated together with dimension ``i + head_dim/2``. llama.cpp's ``llama`` graph uses
  the original interleaved style, rotating dimensions ``2i`` and ``2i+1`` together. Reordering
  the output rows of ``q_proj``/``k_proj`` inside each head as ``[0, h, 1, h+1, ...]``
  (``h = head_dim/2``) makes the interleaved rotation see the same pairs at the same
  frequencies; attention scores are unchanged because Q and K get the same order. Qwen2 runs
  with the rotate-half ("NeoX") style in llama.cpp too, so its weights are copied as they are.
* **Tied embeddings.** With ``tie_word_embeddings`` the output projection is the embedding
  matrix; no ``output.weight`` is written and llama.cpp reuses ``token_embd.weight``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edge.convert.hf import Checkpoint, TensorInfo
from edge.errors import ConversionError

logger = logging.getLogger(__name__)

# Rows read per chunk are capped so that one chunk in float32 stays around this size.
CHUNK_BYTES = 64 * 1024 * 1024

# Pre-tokenizer regexes (from tokenizer.json) that llama.cpp implements, by its pre-tokenizer id.
PRE_TOKENIZERS: dict[str, str] = {
    "qwen2": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
    "llama-bpe": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    ),
}


@dataclass(frozen=True)
class ArchSpec:
    """How one HF architecture maps onto a llama.cpp graph."""

    hf_name: str
    gguf_arch: Any  # gguf.MODEL_ARCH member
    permute_qk: bool  # HF rotate-half layout -> llama.cpp interleaved RoPE (see module docstring)
    rope_dims_key: bool  # write rope.dimension_count


def _architectures() -> dict[str, ArchSpec]:
    import gguf

    return {
        "Qwen2ForCausalLM": ArchSpec("Qwen2ForCausalLM", gguf.MODEL_ARCH.QWEN2, permute_qk=False, rope_dims_key=False),
        "LlamaForCausalLM": ArchSpec("LlamaForCausalLM", gguf.MODEL_ARCH.LLAMA, permute_qk=True, rope_dims_key=True),
    }


SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM", "LlamaForCausalLM")


def arch_spec(ckpt: Checkpoint) -> ArchSpec:
    name = ckpt.architecture
    spec = _architectures().get(name)
    if spec is None:
        raise ConversionError(
            f"architecture {name} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return spec


# --------------------------------------------------------------------------------------------
# Hyperparameters


@dataclass(frozen=True)
class HParams:
    n_ctx: int
    n_embd: int
    n_layer: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    rms_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    tied_embeddings: bool

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> HParams:
        def need(key: str) -> Any:
            if config.get(key) is None:
                raise ConversionError(f"config.json has no {key!r}")
            return config[key]

        n_embd, n_head = int(need("hidden_size")), int(need("num_attention_heads"))
        n_head_kv = int(config.get("num_key_value_heads") or n_head)
        head_dim = int(config.get("head_dim") or n_embd // n_head)
        if n_head % n_head_kv:
            raise ConversionError(
                f"config.json: num_attention_heads {n_head} is not a multiple of num_key_value_heads {n_head_kv}"
            )
        theta, scaling = _rope_config(config)
        return cls(
            n_ctx=int(need("max_position_embeddings")),
            n_embd=n_embd,
            n_layer=int(need("num_hidden_layers")),
            n_ff=int(need("intermediate_size")),
            n_head=n_head,
            n_head_kv=n_head_kv,
            head_dim=head_dim,
            n_vocab=int(need("vocab_size")),
            rms_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            tied_embeddings=bool(config.get("tie_word_embeddings", False)),
        )


def _rope_config(config: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope theta, scaling dict or None) from either transformers 5 or transformers 4 keys."""
    params = config.get("rope_parameters")
    if isinstance(params, dict) and "rope_theta" in params:  # transformers >= 5
        theta = float(params["rope_theta"])
        scaling = dict(params)
    else:
        theta = float(config.get("rope_theta", 10000.0))
        scaling = dict(config.get("rope_scaling") or {})
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type == "default":
        return theta, None
    scaling["rope_type"] = rope_type
    return theta, scaling


def llama3_rope_factors(hp: HParams) -> np.ndarray:
    """Per-frequency divisors of llama3-style RoPE scaling, as llama.cpp's ``rope_freqs`` tensor.

    HF scales each inverse frequency by ``1/factor`` (long wavelengths), 1 (short ones) or a
    smooth blend in between; llama.cpp divides each frequency by the matching entry of this
    vector, so the entry is the reciprocal of HF's multiplier.
    """
    sc = hp.rope_scaling or {}
    factor = float(sc.get("factor", 8.0))
    low, high = float(sc.get("low_freq_factor", 1.0)), float(sc.get("high_freq_factor", 4.0))
    old_ctx = float(sc.get("original_max_position_embeddings", 8192))
    inv_freq = 1.0 / hp.rope_theta ** (np.arange(0, hp.head_dim, 2, dtype=np.float64) / hp.head_dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = (old_ctx / wavelen - low) / (high - low)
    multiplier = np.where(
        wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, 1.0 / factor, (1 - smooth) / factor + smooth)
    )
    return (1.0 / multiplier).astype(np.float32)


def _add_hparams(w: Any, spec: ArchSpec, hp: HParams) -> None:
    import gguf

    w.add_context_length(hp.n_ctx)
    w.add_embedding_length(hp.n_embd)
    w.add_block_count(hp.n_layer)
    w.add_feed_forward_length(hp.n_ff)
    w.add_head_count(hp.n_head)
    w.add_head_count_kv(hp.n_head_kv)
    if hp.head_dim != hp.n_embd // hp.n_head:
        w.add_key_length(hp.head_dim)
        w.add_value_length(hp.head_dim)
    if spec.rope_dims_key:
        w.add_rope_dimension_count(hp.head_dim)
    w.add_rope_freq_base(hp.rope_theta)
    w.add_layer_norm_rms_eps(hp.rms_eps)
    w.add_vocab_size(hp.n_vocab)

    sc = hp.rope_scaling
    if sc is None:
        return
    kind = sc["rope_type"]
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(sc["factor"]))
    elif kind == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(sc["factor"]))
        if "original_max_position_embeddings" in sc:
            w.add_rope_scaling_orig_ctx_len(int(sc["original_max_position_embeddings"]))
    elif kind == "llama3" and spec.hf_name == "LlamaForCausalLM":
        pass  # expressed as the rope_freqs tensor, see llama3_rope_factors
    else:
        raise ConversionError(
            f"RoPE scaling type {kind!r} is not supported for {spec.hf_name} (supported: linear, yarn, llama3 for Llama)"
        )


# --------------------------------------------------------------------------------------------
# Tokenizer


def detect_pre_tokenizer(tok: dict[str, Any]) -> str:
    """llama.cpp pre-tokenizer id for a tokenizer.json, from its Split regex."""
    pre = tok.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    regexes = [p.get("pattern", {}).get("Regex") for p in parts if p.get("type") == "Split"]
    byte_level = [p for p in parts if p.get("type") == "ByteLevel"]
    if len(regexes) == 1 and byte_level and not byte_level[0].get("use_regex", True):
        for name, regex in PRE_TOKENIZERS.items():
            if regexes[0] == regex:
                return name
    described = regexes[0] if len(regexes) == 1 and regexes[0] else str(pre.get("type", "none"))
    raise ConversionError(
        f"tokenizer.json pre-tokenizer {described!r} is not one llama.cpp implements here; "
        f"supported: Qwen2 ('qwen2') and Llama-3 ('llama-bpe') byte-level BPE"
    )


@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    pre: str
    add_bos: bool


def build_vocab(tok: dict[str, Any], tok_config: dict[str, Any] | None, n_vocab: int) -> Vocab:
    """Token strings and types, padded to the model's embedding rows."""
    import gguf

    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise ConversionError(f"tokenizer.json model is {model.get('type')!r}; only byte-level BPE tokenizers are supported")
    pre = detect_pre_tokenizer(tok)
    if pre == "llama-bpe" and not model.get("ignore_merges", False):
        logger.warning("Llama-3 style tokenizer without ignore_merges: llama.cpp ignores merges for whole-vocab words")

    by_id: dict[int, tuple[str, int]] = {i: (t, gguf.TokenType.NORMAL) for t, i in model.get("vocab", {}).items()}
    for added in tok.get("added_tokens", []):
        # Special added tokens are control tokens (never produced from plain text by llama.cpp
        # unless parse_special); non-special ones such as <think> are matched verbatim in text.
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        by_id[int(added["id"])] = (added["content"], kind)
    if by_id and max(by_id) >= n_vocab:
        raise ConversionError(f"tokenizer has token id {max(by_id)} but the model has only {n_vocab} embedding rows")

    tokens, types = [], []
    for i in range(n_vocab):
        text, kind = by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED))
        tokens.append(text)
        types.append(int(kind))
    return Vocab(tokens, types, pre, _add_bos(tok, tok_config))


def _add_bos(tok: dict[str, Any], tok_config: dict[str, Any] | None) -> bool:
    """Whether encoding prepends BOS: tokenizer_config's flag, else the post-processor template."""
    flag = (tok_config or {}).get("add_bos_token")
    if isinstance(flag, bool):
        return flag
    post = tok.get("post_processor") or {}
    for proc in post.get("processors", [post]):
        if proc.get("type") == "TemplateProcessing":
            single = proc.get("single") or []
            return bool(single) and "SpecialToken" in single[0]
    return False


def _add_tokenizer(w: Any, ckpt: Checkpoint, hp: HParams) -> None:
    import gguf

    vocab = build_vocab(ckpt.tokenizer_json(), ckpt.json_file("tokenizer_config.json"), hp.n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)

    # SpecialVocab also guesses add_bos/add_eos from the post-processor and warns about R1's
    # "BOS $A BOS $B" pair template; we set those flags ourselves (see _add_bos), so mute it.
    vocab_logger = logging.getLogger("gguf.vocab")
    level = vocab_logger.level
    vocab_logger.setLevel(logging.ERROR)
    try:
        special = gguf.SpecialVocab(
            ckpt.folder, load_merges=True, n_vocab=hp.n_vocab, special_token_types=("bos", "eos", "pad", "unk")
        )
    finally:
        vocab_logger.setLevel(level)
    if not special.merges:
        raise ConversionError(f"{ckpt.folder / 'tokenizer.json'} has no BPE merges")
    if "eos" not in special.special_token_ids:
        gen = ckpt.json_file("generation_config.json") or {}
        eos = gen.get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) and eos else eos
        if isinstance(eos, int):
            special.special_token_ids["eos"] = eos
    special.add_special_token = {"bos": vocab.add_bos, "eos": False}
    special.add_to_gguf(w, quiet=True)


# --------------------------------------------------------------------------------------------
# Tensors


@dataclass
class PlannedTensor:
    """One GGUF tensor: where its data comes from and how it is transformed and stored."""

    name: str
    shape: tuple[int, ...]  # numpy (row-major) order
    qtype: Any  # gguf.GGMLQuantizationType
    source: TensorInfo | None = None
    constant: np.ndarray | None = None  # for computed tensors (rope_freqs)
    row_transform: Callable[[np.ndarray], np.ndarray] | None = None
    row_align: int = 1  # chunks must start at multiples of this many rows
    nbytes: int = field(init=False)

    def __post_init__(self) -> None:
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * _bytes_per_value(self.qtype)


def _bytes_per_value(qtype: Any) -> int:
    import gguf

    return {gguf.GGMLQuantizationType.F32: 4, gguf.GGMLQuantizationType.F16: 2, gguf.GGMLQuantizationType.BF16: 2}[qtype]


def _permute_rows(n_head: int, head_dim: int) -> Callable[[np.ndarray], np.ndarray]:
    """Rotate-half -> interleaved row order inside each head (works on any whole-head chunk)."""

    def permute(x: np.ndarray) -> np.ndarray:
        heads = x.shape[0] // head_dim
        return x.reshape(heads, 2, head_dim // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    return permute


def plan_tensors(ckpt: Checkpoint, spec: ArchSpec, hp: HParams, qtype: Any) -> list[PlannedTensor]:
    import gguf

    name_map = gguf.get_tensor_name_map(spec.gguf_arch, hp.n_layer)
    f32 = gguf.GGMLQuantizationType.F32
    plan: list[PlannedTensor] = []
    if hp.rope_scaling and hp.rope_scaling["rope_type"] == "llama3":
        factors = llama3_rope_factors(hp)
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        plan.append(PlannedTensor(name, factors.shape, f32, constant=factors))

    for info in ckpt.tensor_infos().values():
        if info.name.endswith(".rotary_emb.inv_freq"):
            continue  # recomputed by llama.cpp
        if hp.tied_embeddings and info.name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd.weight
        if info.dtype not in ("float32", "float16", "bfloat16"):
            raise ConversionError(
                f"tensor {info.name} has dtype {info.dtype}; only float32/float16/bfloat16 checkpoints convert"
            )
        name = name_map.get_name(info.name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ConversionError(f"tensor {info.name} has no llama.cpp counterpart for {spec.hf_name}")
        transform, align = None, 1
        if spec.permute_qk and (".attn_q." in name or ".attn_k." in name):
            heads = hp.n_head if ".attn_q." in name else hp.n_head_kv
            if info.shape[0] != heads * hp.head_dim:
                raise ConversionError(f"{info.name}: {info.shape[0]} rows, expected {heads} heads x {hp.head_dim}")
            transform, align = _permute_rows(heads, hp.head_dim), hp.head_dim
        # Norms, biases and other vectors stay F32: they are tiny and precision-sensitive.
        tq = qtype if len(info.shape) >= 2 else f32
        plan.append(PlannedTensor(name, info.shape, tq, source=info, row_transform=transform, row_align=align))

    names = {p.name for p in plan}
    if "token_embd.weight" not in names:
        raise ConversionError(f"{ckpt.folder}: no embedding tensor (model.embed_tokens.weight)")
    if plan_rows := [p for p in plan if p.name == "token_embd.weight" and p.shape[0] != hp.n_vocab]:
        raise ConversionError(f"embedding has {plan_rows[0].shape[0]} rows but config.json vocab_size is {hp.n_vocab}")
    if not hp.tied_embeddings and "output.weight" not in names:
        raise ConversionError(f"{ckpt.folder}: no lm_head.weight and tie_word_embeddings is false")
    return plan


def _encode(x: np.ndarray, qtype: Any) -> np.ndarray:
    import gguf
    from gguf.quants import quantize

    if qtype == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(x, dtype=np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return np.ascontiguousarray(x, dtype=np.float16)
    return quantize(np.ascontiguousarray(x, dtype=np.float32), qtype)  # BF16, round to nearest even


class _StreamedTensor:
    """Quacks like the ndarray :meth:`GGUFWriter.write_tensor_data` expects (``nbytes``,
    ``tofile``), but produces its bytes chunk by chunk from the memory-mapped source."""

    def __init__(self, ckpt: Checkpoint, pt: PlannedTensor):
        self.ckpt, self.pt, self.nbytes = ckpt, pt, pt.nbytes

    def _chunks(self):
        pt = self.pt
        if pt.constant is not None:
            yield _encode(pt.constant, pt.qtype)
            return
        assert pt.source is not None
        if len(pt.shape) < 2:
            rows = self.ckpt.read_rows(pt.source)
            yield _encode(pt.row_transform(rows) if pt.row_transform else rows, pt.qtype)
            return
        row_bytes = int(np.prod(pt.shape[1:], dtype=np.int64)) * 4
        step = max(pt.row_align, (CHUNK_BYTES // row_bytes) // pt.row_align * pt.row_align)
        for start in range(0, pt.shape[0], step):
            rows = self.ckpt.read_rows(pt.source, start, min(start + step, pt.shape[0]))
            yield _encode(pt.row_transform(rows) if pt.row_transform else rows, pt.qtype)

    def tofile(self, fp: Any) -> None:
        written = 0
        for chunk in self._chunks():
            chunk.tofile(fp)
            written += chunk.nbytes
        if written != self.nbytes:
            raise ConversionError(f"{self.pt.name}: wrote {written} bytes, expected {self.nbytes}")


def write_gguf(
    ckpt: Checkpoint, path: Path, qtype: Any, file_type: int, *, name: str | None = None, progress: bool = True
) -> None:
    """Write ``ckpt`` to ``path`` with 2-d weights stored as ``qtype`` (F32, F16 or BF16)."""
    import gguf
    from tqdm.auto import tqdm

    spec = arch_spec(ckpt)
    if ckpt.config.get("use_sliding_window"):
        raise ConversionError(f"{spec.hf_name} with use_sliding_window=true is not supported by llama.cpp's graph")
    hp = HParams.from_config(ckpt.config)
    plan = plan_tensors(ckpt, spec, hp, qtype)

    w = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[spec.gguf_arch])
    try:
        w.add_name(name or ckpt.folder.name)
        w.add_type("model")
        _add_hparams(w, spec, hp)
        w.add_file_type(file_type)
        _add_tokenizer(w, ckpt, hp)
        for pt in plan:
            w.add_tensor_info(pt.name, pt.shape, np.dtype(np.float32), pt.nbytes, raw_dtype=pt.qtype)

        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for pt in tqdm(plan, desc="Converting", unit="tensor", disable=not progress):
            logger.debug("%s %s %s", pt.name, pt.shape, pt.qtype.name)
            w.write_tensor_data(_StreamedTensor(ckpt, pt))  # type: ignore[arg-type]
    finally:
        w.close()
