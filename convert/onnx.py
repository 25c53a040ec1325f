"""``to_onnx``: a Hugging Face checkpoint to an ONNX Runtime model folder, optionally quantized.

The decoder graph (Qwen2 / Llama, i.e. the R1-Distill families) is written directly from the
checkpoint's weights with :mod:`onnx` (standard opset-17 operators; ONNX Runtime fuses the
RMSNorm pattern itself). The fp32, fp16 and dynamic-int8 graphs use standard operators only;
the MatMulNBits types (int4, blockwise int8) are written with ONNX Runtime's contrib operators
(CPU, CUDA, WebGPU, ...), one weight at a time, as :mod:`convert.onnx_quant` plans them:

* ``fp32``: the weights as they are (float32);
* ``fp16``: MatMul weights and the embedding stored as float16 (half the file), cast to float32
  when the session loads them (ONNX Runtime folds the casts), compute stays float32;
* ``int8`` (``int8_method="blockwise"``, the default): every weight 8-bit, symmetric, blocks of
  32 (``MatMulNBits``, the embedding ``GatherBlockQuantized``). As accurate as GGUF q8_0;
* ``int8`` with ``int8_method="dynamic"``: ``onnxruntime.quantization.quantize_dynamic`` on the
  weight MatMuls (QInt8 per output channel, activations quantized per tensor at run time:
  MatMulInteger, standard ONNX operators, for runtimes without ONNX Runtime's contrib kernels).
  Rounding every activation tensor to 8 bits costs ~40x the KL of blockwise int8, so it is not
  the default; attention MatMuls stay float32 in both; the embedding is float16;
* ``int4``: mixed 4/8-bit (:data:`convert.onnx_quant.INT4`): the MLP weights 4-bit with a zero
  point per block of 32 (round to nearest; GPTQ optional); the attention projections and the
  output projection 8-bit (blocks of 128); the embedding table 4-bit like the MLP (8-bit,
  shared with the lm_head, when they are tied). Within a size budget of 1.1x a Q4_K_M GGUF of
  the same model (computed from the shapes): where even that plan is over it, 4-bit blocks of
  64 (then 128); then whole layers 8-bit from both ends inward (two from the end for one from
  the start) while they fit. On Qwen2.5-0.5B (whose Q4_K_M falls back to 5-bit rows) that is
  most of the first sixth and last third of the layers; on the 1.5B (a true 4.9-bit Q4_K_M),
  blocks of 64 and one layer. Measured choices, below.

How int4 was chosen, on Qwen2.5-Coder-0.5B-Instruct (bf16, rebuilt from its Q4_K_M GGUF);
details and the comparison with GGUF in benchmarks/results/formats.md. Every weight at 4-bit
RTN (blocks of 32) cost mean KL 0.084 symmetric, 0.062 with zero points (verify's texts); the
lm_head 0.017 at 4 bits, 8e-5 at 8. 8 bits cost ~1/250 of the KL of 4, so the plan spends
them where 4 bits hurt most per byte, within 1.1x the GGUF Q4_K_M's size: the KL of each
decoder weight (q/k/v, o, gate/up, down of one layer) quantized alone, measured on a dev set of
texts disjoint from verify's (shipped gsm8k / MATH-500 items, standard-library code, prose, a
chat turn), then a knapsack over bytes. Per MB of 8-bit, o costs most at 4 bits, then the MLP
of the last layers (layer 23's gate/up 9x layer 10's), then the first; q/k/v and the middle
MLPs least. Choosing the 8-bit MLP layers that way cut the dev KL 13% at 1.097x the size
(0.0140 -> 0.0122); on the held-out prompts 7% (0.0143 -> 0.0133); on verify's texts it is
0.0153 (was 0.0146), top-1 0.948 (0.933). Q4_K_M: KL 0.0048 dev, 0.0062 verify (that
source is a dequantized 5-bit-grid model, which GGUF re-encodes almost exactly and 4 bits
cannot). ``method="gptq"`` (calibration: ~14k tokens of built-in text) brings KL to 0.0105
dev, 0.0113 held-out, 0.0110 verify (top-1 0.955 / 0.967 / 0.961), in ~8 minutes on a quiet
machine (69 on a loaded one) and ~5 GB for the 0.5B model; it is opt-in
because it needs torch, transformers and the float32 source model. With the 566 tokens of
the hand-written texts alone GPTQ did worse than RTN (MLP KL 0.050 vs 0.036).

MatMulNBits' ``accuracy_level`` defaults to 4 (int8 compute on CPU): 8-bit weights at level 0
decode ~20x slower (their CPU kernel dequantizes the whole matrix per call); 4-bit ones at
level 0 measured the same KL (0.0153 vs 0.0146), ~10% slower, with 125-165 MB more RSS.

Memory. The MatMulNBits types keep their weights in ``model.onnx.data`` (large tensors
page-aligned), which ONNX Runtime memory-maps: weights it repacks at load time are unmapped
afterwards and the embedding table is paged in row by row, so a session holds about the file
size, not twice it (0.5B int4: 552 MB resident, 682 MB peak at load, vs 765 / 895 MB with the
same weights inside model.onnx). Their KV cache is float16 (``kv_dtype``; attention computes
in float32 on a cast copy; KL +0.0004 on the 0.5B model, decoding speed unchanged).

q/k/v and gate/up projections are exported as one MatMul each (weights concatenated along the
output axis, which per-column and blockwise quantization treat exactly as separate matrices).

Why not optimum's exporter: optimum-onnx 0.1 requires transformers < 4.58 and fails to import
with the transformers 5 this project uses; tracing the PyTorch model would also tie the export
to transformers' internals. A graph written from the weights is small, fast to build and its
numerics are checked against transformers by :func:`verify_onnx` (and the tests).

The graph's interface follows the usual "text-generation-with-past" convention (the runtime
backend, :mod:`edge.backends.onnx`, reads the names from the session, so an optimum export of
the same model is meant to load too; untested, optimum cannot be installed here)::

    inputs   input_ids [batch, seq] int64, attention_mask [batch, past+seq] int64,
             position_ids [batch, seq] int64, logits_to_keep [] int64 (0 = all positions),
             past_key_values.{i}.key / .value [batch, kv_heads, past, head_dim] kv_dtype
    outputs  logits [batch, kept, vocab] float32,
             present.{i}.key / .value [batch, kv_heads, past+seq, head_dim] kv_dtype

``kv_dtype`` is float16 for the MatMulNBits types and float32 otherwise (the manifest's
``kv_dtype``; the backend reads the type from the session).

The output folder holds everything the backend needs, nothing is downloaded later:
``model.onnx`` (+ ``model.onnx.data``: always for int4 / blockwise int8, for the other types
when the weights exceed ~1.5 GiB), ``config.json``, ``generation_config.json``,
``tokenizer.json``, ``tokenizer_config.json`` (with the chat template) and ``edge_onnx.json``
(weights type, quantization plan and per-tensor storage, source, BOS/EOS, chat template, KV
type, graph I/O).

Parity thresholds used by :func:`verify_onnx` (:data:`THRESHOLDS`, top-1 agreement >= and
mean KL(source || onnx) < ; override with ``thresholds=``)::

    type             top-1 >=   mean KL <
    fp32             0.999      1e-4       same weights; only summation order differs
    fp16             0.99       1e-3       one rounding of each weight
    int8 (blockwise) 0.98       5e-3       like GGUF q8_0
    int8 dynamic     0.95       5e-2       activations rounded per tensor at every MatMul
    int4             0.90       8e-2       like GGUF q4_*

Measured (MatMulNBits at the default accuracy level 4) with :func:`verify_onnx`'s default
prompts (general text) and, for tiny-r1, on its own chat-templated traces of 8 held-out problems
("in-domain", 1764 positions; the int8 / int4 rows, re-measured after the MatMulNBits rework,
on 907 / 873 positions)::

    tiny-r1 (Qwen2, hidden 192, 4 layers, vocab 384; final checkpoint), default / in-domain
    type             size      top-1            mean KL          max |dlogit|
    fp32             6.9 MB    1.0000 / 1.0000  1e-12 / 5e-14    4e-5 / 2e-5
    fp16             3.5 MB    1.0000 / 1.0000  2e-7  / 9e-9     1e-2 / 6e-3
    int8 (blockwise) 1.9 MB    0.9934 / 1.0000  7e-4  / 2e-5     0.5 / 0.5
    int8 dynamic     1.9 MB    0.9669 / 0.9943  2e-2  / 4e-3     4 / 4
    int4             1.4 MB    0.9890 / 1.0000  4e-3  / 3e-4     2 / 1
    int4, 4-bit head 1.4 MB    0.9581 / 0.9977  3e-2  / 8e-4     4 / 2
    (int4 on a 4-layer model with a tied 384-row table is mostly 8-bit: attention, layer 3 and
    the shared table; with lm_head_bits=4 the shared table is 4-bit too. The plan before the
    per-layer measurement also kept layer 0 at 8 bits: 1.5 MB, 0.9934 / 1.0000, 1e-3 / 2e-4)
    GGUF on the same model: q8_0 0.9934 / 1.0000 (KL 6e-4 / 2e-5), q4_0 0.9647 / 0.9977
    (2e-2 / 1e-3), q4_k_m 0.9757 / 0.9983 (9e-3 / 6e-4)

    tests' random Qwen2 (hidden 64, 2 layers, tied): top-1 1.0000 for every type; mean KL fp32
    4e-15, fp16 6e-9, int8 7e-6, int8 dynamic 1e-5, int4 2e-5 (random models quantize easily);
    weight files fp32 714 kB, fp16 373 kB, int8 159 kB, int8 dynamic 267 kB, int4 131 kB

    Qwen2.5-Coder-0.5B-Instruct (bf16 from its Q4_K_M GGUF; 330 positions): int8 0.9879, KL
    9e-4; int4 0.9485, 0.0153 (``method="gptq"``: 0.9606, 0.0110); GGUF q8_0 0.9848, 8e-4,
    q4_k_m 0.9727, 0.0062 (benchmarks/results/formats.md)

Like the GGUF defaults (:mod:`convert.verify`), the quantized rows are meant to pass a sound
export and fail a broken one; measure your own model and override them if needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from edge.convert.hf import Checkpoint, resolve_source
from edge.convert.onnx_quant import (
    BLOCK_SIZES, Calibration, Packed, QuantPlan, default_calibration_texts, default_plan, export_bytes, gptq, q4_k_m_bytes,
    quantize_rtn,
)
from edge.convert.verify import Thresholds, VerifyReport
from edge.errors import ConfigError, ConversionError, InvalidModelError, ModelNotFoundError, OutputExistsError
from edge.files import atomic_dir, refuse_existing

logger = logging.getLogger(__name__)

WEIGHT_TYPES = ("fp32", "fp16", "int8", "int4")
SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM", "LlamaForCausalLM")
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 compute

INT8_METHODS = ("blockwise", "dynamic")
KV_DTYPES = ("float32", "float16")
LM_HEAD_BITS = (4, 8)
LM_HEAD_NODE = "/lm_head/MatMul"
EMBED = "model.embed_tokens.weight"

MANIFEST = "edge_onnx.json"
MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
OPSET = 17
IR_VERSION = 8  # opset 17's IR: loads on ONNX Runtime >= 1.13
# Models whose weights exceed this are saved with external data (protobuf caps a file at 2 GiB).
EXTERNAL_DATA_MIN_BYTES = 1536 * 1024 * 1024

THRESHOLDS: dict[str, Thresholds] = {
    "fp32": Thresholds(0.999, 1e-4),
    "fp16": Thresholds(0.99, 1e-3),
    "int8": Thresholds(0.98, 5e-3),  # blockwise
    "int8-dynamic": Thresholds(0.95, 5e-2),
    "int4": Thresholds(0.90, 8e-2),
}

_TOKENIZER_FILES = ("tokenizer.json", "special_tokens_map.json")
_ROPE_TYPES = ("default", "linear", "llama3")


# -- the model's shape, read from config.json ------------------------------------------------


def _rope(config: dict[str, Any]) -> dict[str, Any]:
    """RoPE parameters in either config layout (transformers 5 ``rope_parameters`` or the older
    top-level ``rope_theta`` + ``rope_scaling``)."""
    rope = dict(config.get("rope_parameters") or {})
    if not rope:
        rope = dict(config.get("rope_scaling") or {})
        rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    rope["rope_type"] = rope.get("rope_type") or rope.get("type") or "default"
    return rope


def inv_freq(config: dict[str, Any], head_dim: int) -> np.ndarray:
    """RoPE inverse frequencies (float32, ``head_dim // 2``), with linear or llama3 scaling."""
    rope = _rope(config)
    base = float(rope.get("rope_theta", 10000.0))
    freq = (1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / head_dim)).astype(np.float32)
    kind = rope["rope_type"]
    if kind == "linear":
        freq = freq / float(rope["factor"])
    elif kind == "llama3":
        factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
        old = float(rope["original_max_position_embeddings"])
        wavelen = 2 * math.pi / freq
        scaled = np.where(wavelen > old / low, freq / factor, freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        freq = np.where(medium, smoothed, scaled)
    return freq.astype(np.float32)


class Shape:
    """What the graph builder needs from ``config.json``; refuses what it cannot export."""

    def __init__(self, config: dict[str, Any], where: Path) -> None:
        archs = config.get("architectures") or []
        arch = archs[0] if archs else config.get("model_type", "?")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConversionError(
                f"{where}: architecture {arch} is not supported for ONNX export; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)} (the DeepSeek-R1-Distill families)"
            )
        self.arch = arch
        try:
            self.hidden = int(config["hidden_size"])
            self.layers = int(config["num_hidden_layers"])
            self.heads = int(config["num_attention_heads"])
            self.kv_heads = int(config.get("num_key_value_heads") or self.heads)
            self.ffn = int(config["intermediate_size"])
            self.vocab = int(config["vocab_size"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ConversionError(f"{where}: config.json lacks or mangles {exc}") from None
        self.head_dim = int(config.get("head_dim") or self.hidden // self.heads)
        self.eps = float(config.get("rms_norm_eps", 1e-6))
        self.tied = bool(config.get("tie_word_embeddings", False))
        self.max_positions = int(config.get("max_position_embeddings") or 0)
        self.qkv_bias = arch == "Qwen2ForCausalLM" or bool(config.get("attention_bias", False))
        self.o_bias = arch == "LlamaForCausalLM" and bool(config.get("attention_bias", False))
        self.mlp_bias = bool(config.get("mlp_bias", False))
        problems = []
        if self.heads % self.kv_heads:
            problems.append(f"{self.heads} attention heads are not a multiple of {self.kv_heads} KV heads")
        if config.get("hidden_act", "silu") != "silu":
            problems.append(f"activation {config.get('hidden_act')} (only silu)")
        if config.get("use_sliding_window") or "sliding_attention" in (config.get("layer_types") or []):
            problems.append("sliding-window attention")
        if float(config.get("partial_rotary_factor", 1.0)) != 1.0:
            problems.append("partial rotary embeddings")
        if _rope(config)["rope_type"] not in _ROPE_TYPES:
            problems.append(f"RoPE scaling {_rope(config)['rope_type']!r} (supported: {', '.join(_ROPE_TYPES)})")
        if problems:
            raise ConversionError(f"{where}: cannot export to ONNX: {'; '.join(problems)}")
        self.inv_freq = inv_freq(config, self.head_dim)


# -- graph building ----------------------------------------------------------------------------


class _Builder:
    """Collects nodes and initializers; each ``op`` returns the name of its (first) output."""

    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self._n = 0
        self._consts: dict[tuple, str] = {}

    def init(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(self, value, dtype=np.int64) -> str:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.init(f"const_{len(self._consts)}", arr)
        return self._consts[key]

    def op(self, op_type: str, *inputs: str, name: str | None = None, outputs: int = 1, **attrs: Any) -> Any:
        from onnx import helper

        self._n += 1
        base = name or f"/{op_type}_{self._n}"
        outs = [f"{base}/out{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=base, **attrs))
        return outs[0] if outputs == 1 else outs


class _Weights:
    """Writes the weight MatMuls: float32, float16 + Cast (``fp16``), or, with a
    :class:`~edge.convert.onnx_quant.QuantPlan`, ``MatMulNBits`` with the plan's bits for that
    weight, rounded by RTN or GPTQ (``calibration`` holds GPTQ's input Hessians)."""

    def __init__(self, b: _Builder, weights: str, plan: QuantPlan | None = None, calibration: Any = None) -> None:
        self.b, self.weights, self.plan, self.calibration = b, weights, plan, calibration

    def matmul(self, x: str, name: str, w: np.ndarray, role: str, layer: int | None, node: str) -> str:
        """``x @ w`` for the weight ``w`` ([in, out]) called ``name``, in the node ``node``."""
        b = self.b
        if self.plan is None:
            if self.weights == "fp16":
                from onnx import TensorProto

                weight = b.op("Cast", b.init(name, w.astype(np.float16)), name=f"/{name}/Cast", to=TensorProto.FLOAT)
            else:
                weight = b.init(name, w.astype(np.float32))
            return b.op("MatMul", x, weight, name=node)
        return self.matmul_nbits(x, name, self.pack(w, role, layer, name), node)

    def pack(self, w: np.ndarray, role: str, layer: int | None, name: str) -> Packed:
        quant = self.plan.for_weight(role, layer).fit(w.shape[0])
        if self.plan.method == "gptq" and quant.bits == 4 and layer is not None:
            return gptq(w, self.calibration.hessian(layer, role), quant, search=self.plan.grid_search)
        return quantize_rtn(w, quant, name)

    def add_packed(self, name: str, p: Packed) -> list[str]:
        """Initializers ``name``_Q{bits}, _scales and (asymmetric) _zero_points."""
        inputs = [self.b.init(f"{name}_Q{p.quant.bits}", p.data), self.b.init(f"{name}_scales", p.scales)]
        if p.zero_points is not None:
            inputs.append(self.b.init(f"{name}_zero_points", p.zero_points))
        return inputs

    def matmul_nbits(self, x: str, name: str, p: Packed, node: str, inputs: list[str] | None = None) -> str:
        """``x @ p`` in a MatMulNBits node; ``inputs``: p's initializers when already added."""
        attrs = {"K": p.k, "N": p.n, "bits": p.quant.bits, "block_size": p.quant.block_size}
        if self.plan.accuracy_level:  # 0 = unset: left out, as ONNX Runtime's quantizer does
            attrs["accuracy_level"] = self.plan.accuracy_level
        return self.b.op("MatMulNBits", x, *(inputs or self.add_packed(name, p)), name=f"{node}_Q{p.quant.bits}",
                         domain="com.microsoft", **attrs)


def _linear(b: _Builder, W: _Weights, x: str, prefix: str, parts: list[str], read, bias: bool) -> list[str]:
    """One MatMul for the projections ``parts`` of ``prefix`` (e.g. q/k/v), split afterwards:
    one larger GEMM instead of several small ones. Weights are concatenated along the output
    axis, so per-column and blockwise (along the input axis) quantization are unaffected."""
    names = [f"{prefix}.{part}" for part in parts]
    ws = [read(f"{n}.weight").T for n in names]  # HF stores [out, in]; MatMul wants [in, out]
    short = "_".join(p.removesuffix("_proj") for p in parts)
    merged = names[0] if len(names) == 1 else f"{prefix}.{short}_proj"
    layer = int(prefix.split(".")[2])
    role = {"q_k_v": "qkv", "gate_up": "gate_up"}.get(short, short)
    y = W.matmul(x, f"{merged}.weight", np.concatenate(ws, axis=1), role, layer, f"/{merged}/MatMul")
    if bias:
        bias_init = b.init(f"{merged}.bias", np.concatenate([read(f"{n}.bias") for n in names]))
        y = b.op("Add", y, bias_init, name=f"/{merged}/Add")
    if len(names) == 1:
        return [y]
    return b.op("Split", y, b.const([w.shape[1] for w in ws]), axis=-1, outputs=len(names))


def _embedding(b: _Builder, W: _Weights, emb: np.ndarray, head: Packed | None, head_inputs: list[str] | None, hidden: int) -> str:
    """The token embeddings of ``input_ids``: a Gather on the float table (float16 + Cast for
    the fp16 type), or with a quantization plan a ``GatherBlockQuantized`` that dequantizes only
    the looked-up rows. ``head`` is the packed, tied lm_head (initializers ``head_inputs``):
    its table is read in place."""
    from onnx import TensorProto

    if W.plan is None:
        table = b.init(EMBED, emb.astype(np.float16 if W.weights == "fp16" else np.float32))
        if W.weights == "fp16":
            table = b.op("Cast", table, name=f"/{EMBED}/Cast", to=TensorProto.FLOAT)
        return b.op("Gather", table, "input_ids", axis=0, name="/model/embed_tokens/Gather")
    if head is not None:
        # MatMulNBits' [vocab, blocks, block bytes] table, gathered on axis 0 and dequantized per
        # block (axis 2); scales and zero points reshaped to [vocab, blocks, 1].
        data, scales, *zp = head_inputs
        shape = b.const([head.n, head.scales.shape[1], 1])
        inputs = [data, "input_ids", b.op("Reshape", scales, shape, name="/model/embed_tokens/scales")]
        if zp:
            inputs.append(b.init(f"{EMBED}_zero_points", head.unpacked_zero_points().reshape(head.n, -1, 1)))
        rows = b.op("GatherBlockQuantized", *inputs, name="/model/embed_tokens/GatherBlockQuantized", domain="com.microsoft",
                    bits=head.quant.bits, block_size=head.quant.block_size, gather_axis=0, quantize_axis=2)
        rows = b.op("Reshape", rows, b.const([0, 0, -1]), name="/model/embed_tokens/Reshape")
        packed = head
    else:
        packed = W.pack(emb.T, "embedding", None, EMBED)
        data, *rest = W.add_packed(EMBED, dataclasses.replace(packed, data=packed.data.reshape(packed.n, -1)))
        rows = b.op("GatherBlockQuantized", data, "input_ids", *rest, name="/model/embed_tokens/GatherBlockQuantized",
                    domain="com.microsoft", bits=packed.quant.bits, block_size=packed.quant.block_size, gather_axis=0, quantize_axis=1)
    if packed.scales.shape[1] * packed.quant.block_size != hidden:  # the last block was padded
        rows = b.op("Slice", rows, b.const([0]), b.const([hidden]), b.const([-1]), name="/model/embed_tokens/Slice")
    return rows


def _rms_norm(b: _Builder, x: str, prefix: str, read, eps: float) -> str:
    # Pow -> ReduceMean -> Add -> Sqrt -> Div -> Mul: the pattern ONNX Runtime fuses into one
    # SimplifiedLayerNormalization kernel.
    var = b.op("ReduceMean", b.op("Pow", x, b.const(2.0, np.float32)), axes=[-1], keepdims=1)
    normed = b.op("Div", x, b.op("Sqrt", b.op("Add", var, b.const(eps, np.float32))))
    return b.op("Mul", normed, b.init(f"{prefix}.weight", read(f"{prefix}.weight")), name=f"/{prefix}/Mul")


def _rotate(b: _Builder, x: str, cos: str, signed_sin: str, half: int) -> str:
    """x * cos + rotate_half(x) * sin, with rotate_half(x) = concat(-x2, x1); the sign is folded
    into ``signed_sin`` = concat(-sin, sin), so this is concat(x2, x1) * signed_sin."""
    x1, x2 = b.op("Split", x, b.const([half, half]), axis=-1, outputs=2)
    return b.op("Add", b.op("Mul", x, cos), b.op("Mul", b.op("Concat", x2, x1, axis=-1), signed_sin))


_ST_DTYPES = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8"}


class _Tensors:
    """``read(name)``: a checkpoint tensor as a float32 numpy array.

    safetensors files are read through a memory map at the offsets their JSON header gives
    (bf16 widened by a shift), so an export needs no torch; PyTorch ``.bin`` shards go through
    :meth:`Checkpoint.read_rows`."""

    def __init__(self, ckpt: Checkpoint) -> None:
        self.ckpt = ckpt
        files = ckpt.weight_files()
        self._st: dict[str, tuple[np.memmap, dict[str, Any], Path]] | None = None
        if all(f.suffix == ".safetensors" for f in files):
            self._st = {}
            for f in files:
                data, header = _safetensors(f)
                self._st.update((name, (data, entry, f)) for name, entry in header.items() if name != "__metadata__")
            self.names = set(self._st)
        else:
            self.names = set(ckpt.tensor_infos())

    def __call__(self, name: str) -> np.ndarray:
        if name not in self.names:
            raise ConversionError(f"{self.ckpt.folder}: the checkpoint has no tensor {name}")
        if self._st is None:
            return self.ckpt.read_rows(self.ckpt.tensor_infos()[name])
        data, entry, file = self._st[name]
        dtype = _ST_DTYPES.get(entry.get("dtype"))
        start, end = entry["data_offsets"]
        if dtype is None or end > len(data):
            raise ConversionError(f"{file}: tensor {name} has dtype {entry.get('dtype')} or lies outside the file")
        raw = np.asarray(data[start:end]).view(dtype)
        if entry["dtype"] == "BF16":
            raw = (raw.astype(np.uint32) << 16).view(np.float32)
        return raw.astype(np.float32).reshape(entry["shape"])


def _safetensors(file: Path) -> tuple[np.memmap, dict[str, Any]]:
    try:
        with open(file, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        return np.memmap(file, dtype=np.uint8, mode="r", offset=8 + n), header
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{file}: cannot read the safetensors header ({exc})") from None


def build_model(ckpt: Checkpoint, shape: Shape, weights: str, plan: QuantPlan | None = None, calibration: Any = None,
                kv_dtype: str = "float32"):
    """The decoder graph for ``ckpt`` as an ``onnx.ModelProto``: fp32 or fp16 weights, or with
    ``plan`` quantized weights (MatMulNBits, GatherBlockQuantized) written directly; the KV
    cache inputs/outputs in ``kv_dtype`` (float32 or float16)."""
    import onnx
    from onnx import TensorProto, helper

    read = _Tensors(ckpt)
    infos = read.names

    s, b = shape, _Builder()
    W = _Weights(b, weights, plan, calibration)
    d, half, group = s.head_dim, s.head_dim // 2, s.heads // s.kv_heads

    # Embedding. A tied lm_head in float gets its own transposed copy (MatMul needs [hidden,
    # vocab]); quantized with the embedding's bits, it is stored once and the lookup reads it.
    if not s.tied and "lm_head.weight" not in infos:
        raise ConversionError(f"{ckpt.folder}: no lm_head.weight and tie_word_embeddings is false")
    emb = read(EMBED)
    tied_head = tied_inputs = None
    if plan is not None and s.tied and plan.lm_head_bits == plan.embedding_bits:
        tied_head = W.pack(emb.T, "lm_head", None, "lm_head.weight")
        tied_inputs = W.add_packed("lm_head.weight", tied_head)
    x = _embedding(b, W, emb, tied_head, tied_inputs, s.hidden)
    head = emb if s.tied and tied_head is None else None  # the float table a tied lm_head still needs
    del emb

    # RoPE tables for the new positions: [batch, 1, seq, head_dim].
    pos = b.op("Cast", "position_ids", to=TensorProto.FLOAT)
    freqs = b.op("Mul", b.op("Unsqueeze", pos, b.const([-1])), b.init("rope.inv_freq", s.inv_freq))
    cos_half, sin_half = b.op("Cos", freqs), b.op("Sin", freqs)
    cos = b.op("Unsqueeze", b.op("Concat", cos_half, cos_half, axis=-1), b.const([1]))
    sin = b.op("Unsqueeze", b.op("Concat", b.op("Neg", sin_half), sin_half, axis=-1), b.const([1]))

    # Additive mask [batch, 1, 1, seq, total]: causal (query i sees keys <= past + i) and padding.
    total = b.op("Gather", b.op("Shape", "attention_mask"), b.const(1), axis=0)
    seq = b.op("Gather", b.op("Shape", "input_ids"), b.const(1), axis=0)
    past = b.op("Sub", total, seq)
    keys = b.op("Range", b.const(0), total, b.const(1))
    queries = b.op("Range", past, total, b.const(1))
    causal = b.op("LessOrEqual", b.op("Unsqueeze", keys, b.const([0])), b.op("Unsqueeze", queries, b.const([1])))
    padding = b.op("Unsqueeze", b.op("Cast", "attention_mask", to=TensorProto.BOOL), b.const([1, 2, 3]))
    allowed = b.op("And", causal, padding)
    mask = b.op("Where", allowed, b.const(0.0, np.float32), b.const(np.finfo(np.float32).min, np.float32))
    scale = b.const(d ** -0.5, np.float32)

    graph_inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("logits_to_keep", TensorProto.INT64, []),
    ]
    graph_outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "kept_length", s.vocab])]
    kv_shape = ["batch_size", s.kv_heads, "past_sequence_length", d]
    kv_half = kv_dtype == "float16"
    kv_type = TensorProto.FLOAT16 if kv_half else TensorProto.FLOAT
    present_shape = ["batch_size", s.kv_heads, "total_sequence_length", d]

    for i in range(s.layers):
        p = f"model.layers.{i}"
        h = _rms_norm(b, x, f"{p}.input_layernorm", read, s.eps)

        def heads(y: str, n: int) -> str:  # [batch, seq, n*d] -> [batch, n, seq, d]
            return b.op("Transpose", b.op("Reshape", y, b.const([0, 0, n, d])), perm=[0, 2, 1, 3])

        q, k, v = _linear(b, W, h, f"{p}.self_attn", ["q_proj", "k_proj", "v_proj"], read, s.qkv_bias)
        q, k, v = heads(q, s.heads), heads(k, s.kv_heads), heads(v, s.kv_heads)
        q, k = _rotate(b, q, cos, sin, half), _rotate(b, k, cos, sin, half)

        past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        present_k, present_v = f"present.{i}.key", f"present.{i}.value"
        graph_inputs += [helper.make_tensor_value_info(n, kv_type, kv_shape) for n in (past_k, past_v)]
        graph_outputs += [helper.make_tensor_value_info(n, kv_type, present_shape) for n in (present_k, present_v)]
        if kv_half:  # the cache holds float16; attention computes in float32 on a cast copy
            k, v = (b.op("Cast", t, to=TensorProto.FLOAT16) for t in (k, v))
        b.nodes.append(helper.make_node("Concat", [past_k, k], [present_k], name=f"/{p}/present_key", axis=2))
        b.nodes.append(helper.make_node("Concat", [past_v, v], [present_v], name=f"/{p}/present_value", axis=2))
        keys, values = present_k, present_v
        if kv_half:
            keys, values = (b.op("Cast", t, to=TensorProto.FLOAT) for t in (present_k, present_v))

        # Grouped-query attention without repeating K/V: queries [batch, kv, group, seq, d]
        # against keys [batch, kv, 1, total, d], broadcast over the group axis.
        qg = b.op("Reshape", b.op("Mul", q, scale), b.const([0, s.kv_heads, group, -1, d]))
        kg = b.op("Unsqueeze", keys, b.const([2]))
        vg = b.op("Unsqueeze", values, b.const([2]))
        scores = b.op("Add", b.op("MatMul", qg, b.op("Transpose", kg, perm=[0, 1, 2, 4, 3])), mask)
        attn = b.op("MatMul", b.op("Softmax", scores, axis=-1), vg)
        attn = b.op("Reshape", attn, b.const([0, s.heads, -1, d]))
        attn = b.op("Reshape", b.op("Transpose", attn, perm=[0, 2, 1, 3]), b.const([0, 0, s.heads * d]))
        (o,) = _linear(b, W, attn, f"{p}.self_attn", ["o_proj"], read, s.o_bias)
        x = b.op("Add", x, o)

        h = _rms_norm(b, x, f"{p}.post_attention_layernorm", read, s.eps)
        gate, up = _linear(b, W, h, f"{p}.mlp", ["gate_proj", "up_proj"], read, s.mlp_bias)
        act = b.op("Mul", b.op("Mul", gate, b.op("Sigmoid", gate)), up)
        (down,) = _linear(b, W, act, f"{p}.mlp", ["down_proj"], read, s.mlp_bias)
        x = b.op("Add", x, down)

    x = _rms_norm(b, x, "model.norm", read, s.eps)
    # Only the last ``logits_to_keep`` positions reach lm_head (0 keeps all, as in transformers).
    start = b.op("Neg", b.op("Unsqueeze", "logits_to_keep", b.const([0])))
    x = b.op("Slice", x, start, b.const([np.iinfo(np.int64).max]), b.const([1]))
    if tied_head is not None:
        logits = W.matmul_nbits(x, "lm_head.weight", tied_head, LM_HEAD_NODE, tied_inputs)
    else:
        head = head if head is not None else read("lm_head.weight")
        logits = W.matmul(x, "lm_head.weight", head.T, "lm_head", None, LM_HEAD_NODE)
    b.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="/logits"))

    graph = helper.make_graph(b.nodes, f"{s.arch}-decoder", graph_inputs, graph_outputs)
    opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid("com.microsoft", 1)] if plan is not None else [])
    model = helper.make_model(graph, opset_imports=opsets, producer_name="edge-reason")
    model.ir_version = IR_VERSION
    b.inits.reverse()
    while b.inits:  # moved one at a time (protobuf copies on append): the weights are never held twice
        model.graph.initializer.append(b.inits.pop())
    if plan is not None or _nbytes(model) >= EXTERNAL_DATA_MIN_BYTES:
        return model  # shape inference copies the model twice (and knows no contrib operators)
    return onnx.shape_inference.infer_shapes(model)


def _nbytes(model) -> int:
    return sum(len(t.raw_data) for t in model.graph.initializer)


def _save(model, path: Path, *, external: bool | None = None) -> None:
    """Write ``model`` to ``path``; with ``external`` (default: when the weights exceed
    :data:`EXTERNAL_DATA_MIN_BYTES`) the tensors go to :data:`DATA_FILE` next to it."""
    import onnx

    if external is None:
        external = _nbytes(model) >= EXTERNAL_DATA_MIN_BYTES
    if external:
        _write_external_data(model, path.parent / DATA_FILE)
    onnx.save_model(model, str(path))


def _write_external_data(model, data_path: Path, *, min_bytes: int = 1024, align: int = 4096,
                         align_from: int = 65536) -> None:
    """Move the tensors of ``model`` of at least ``min_bytes`` into ``data_path``; tensors of at
    least ``align_from`` bytes start on an ``align`` boundary (a page: no two large tensors share
    one). ONNX Runtime memory-maps the file: a tensor it repacks at load time (MatMulNBits) is
    unmapped afterwards, and the embedding rows are paged in only when looked up."""
    from onnx import TensorProto

    with open(data_path, "wb") as f:
        for t in model.graph.initializer:
            if len(t.raw_data) < min_bytes:
                continue
            if len(t.raw_data) >= align_from:
                f.write(b"\0" * (-f.tell() % align))
            offset = f.tell()
            f.write(t.raw_data)
            t.ClearField("raw_data")
            t.data_location = TensorProto.EXTERNAL
            del t.external_data[:]
            for key, value in (("location", data_path.name), ("offset", str(offset)), ("length", str(f.tell() - offset))):
                entry = t.external_data.add()
                entry.key, entry.value = key, value


# -- quantization ------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_quantizers() -> Iterator[None]:
    """ONNX Runtime's quantizers configure the root logger at import and log every node at
    INFO (and advise pre-processing at WARNING): keep that out of the user's terminal."""
    root = logging.getLogger()
    handlers, level, disabled = list(root.handlers), root.level, logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(disabled)
        root.handlers[:] = handlers
        root.setLevel(level)


def _quantize_dynamic_int8(src: Path, out: Path, external: bool) -> int:
    """int8 "dynamic": QInt8 weights per output channel, activations quantized per tensor at run
    time (MatMulInteger, standard ONNX operators)."""
    import onnx

    with _quiet_quantizers():
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(
            src, out, op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8, per_channel=True,
            use_external_data_format=external,
            # Only MatMuls with a weight initializer: the attention products stay float32.
            extra_options={"MatMulConstBOnly": True},
        )
    return sum(n.op_type == "MatMulInteger" for n in onnx.load(str(out), load_external_data=False).graph.node)


# -- files -------------------------------------------------------------------------------------


def _check_out_dir(out_dir: str | Path, *, force: bool) -> Path:
    path = Path(out_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise ConversionError(f"{path} is a file; give a folder name for the ONNX model")
    refuse_existing(path, force=force, verb="replace")
    if path.is_dir() and any(path.iterdir()) and not ((path / MANIFEST).is_file() or (path / MODEL_FILE).is_file()):
        # --force replaces a previous export, never an unrelated folder full of files
        raise OutputExistsError(f"{path} is a non-empty folder that holds no ONNX export; give a new folder name")
    if not path.parent.is_dir():
        raise ConversionError(f"{path.parent}: no such directory for the output")
    return path


def _token_meta(ckpt: Checkpoint) -> dict[str, Any]:
    """BOS/EOS, add_bos and the chat template, resolved once for the manifest (the same rules
    the backend applies to a folder without a manifest)."""
    from edge.backends.onnx import token_metadata

    ckpt.tokenizer_json()  # a clear error when tokenizer.json is missing
    return {**token_metadata(ckpt.folder), "tokenizer_config": ckpt.json_file("tokenizer_config.json") or {}}


def _write_metadata(ckpt: Checkpoint, dst: Path, meta: dict[str, Any]) -> None:
    for name in _TOKENIZER_FILES:
        if (ckpt.folder / name).is_file():
            shutil.copyfile(ckpt.folder / name, dst / name)
    tok_config = dict(meta["tokenizer_config"])
    if meta["chat_template"]:
        tok_config["chat_template"] = meta["chat_template"]
    tok_config.setdefault("add_bos_token", meta["add_bos"])
    (dst / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2, ensure_ascii=False), encoding="utf-8")
    (dst / "config.json").write_text(json.dumps(ckpt.config, indent=2, ensure_ascii=False), encoding="utf-8")
    gen = ckpt.json_file("generation_config.json") or {
        "bos_token_id": meta["bos_token_id"], "eos_token_id": meta["eos_token_ids"],
    }
    (dst / "generation_config.json").write_text(json.dumps(gen, indent=2), encoding="utf-8")


def _smoke_test(folder: Path, shape: Shape, kv_dtype: str) -> dict[str, list[str]]:
    """Load the written model and run two tokens, so a broken export never reaches OUT_DIR."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(folder / MODEL_FILE), opts, providers=["CPUExecutionProvider"])
    feeds: dict[str, np.ndarray] = {
        "input_ids": np.zeros((1, 2), np.int64),
        "attention_mask": np.ones((1, 2), np.int64),
        "position_ids": np.arange(2, dtype=np.int64)[None],
        "logits_to_keep": np.array(1, np.int64),
    }
    for i in range(shape.layers):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((1, shape.kv_heads, 0, shape.head_dim), kv_dtype)
    logits = sess.run(["logits"], feeds)[0]
    if logits.shape != (1, 1, shape.vocab) or not np.isfinite(logits).all():
        raise ConversionError(f"the exported model produced bad logits (shape {logits.shape}); please report this")
    return {"inputs": [i.name for i in sess.get_inputs()], "outputs": [o.name for o in sess.get_outputs()]}


def to_onnx(
    src: str | Path,
    out_dir: str | Path,
    *,
    weights: str = "fp32",
    force: bool = False,
    block_size: int | None = None,
    accuracy_level: int | None = None,
    int8_method: str = "blockwise",
    lm_head_bits: int | None = None,
    quant: QuantPlan | None = None,
    calibration_texts: list[str] | tuple[str, ...] | None = None,
    kv_dtype: str | None = None,
    revision: str | None = None,
) -> Path:
    """Export ``src`` (HF folder or hub repo id) to the ONNX model folder ``out_dir``.

    ``weights`` is one of :data:`WEIGHT_TYPES`. ``int8_method`` picks ``blockwise`` (8-bit
    MatMulNBits) or ``dynamic`` (quantize_dynamic) int8. The MatMulNBits types (int4, blockwise
    int8) follow ``quant`` (a :class:`~edge.convert.onnx_quant.QuantPlan`; default
    :func:`~edge.convert.onnx_quant.default_plan`), whose ``block_size``, ``accuracy_level``
    and ``lm_head_bits`` these shortcuts override. ``calibration_texts`` feed the ``gptq``
    method (default :func:`~edge.convert.onnx_quant.default_calibration_texts`). The folder appears
    only when everything succeeded; an existing ``out_dir`` is refused unless ``force``.
    Returns the folder's path.
    """
    weights = str(weights).lower()
    if weights not in WEIGHT_TYPES:
        raise ConfigError(f"unknown weights type {weights!r}; choose one of: {', '.join(WEIGHT_TYPES)}")
    if block_size is not None and block_size not in BLOCK_SIZES:
        raise ConfigError(f"block size must be one of {', '.join(map(str, BLOCK_SIZES))}, got {block_size}")
    if accuracy_level is not None and accuracy_level not in ACCURACY_LEVELS:
        raise ConfigError(f"accuracy level must be one of {', '.join(map(str, ACCURACY_LEVELS))}, got {accuracy_level}")
    if int8_method not in INT8_METHODS:
        raise ConfigError(f"unknown int8 method {int8_method!r}; choose one of: {', '.join(INT8_METHODS)}")
    if lm_head_bits is not None and lm_head_bits not in LM_HEAD_BITS:
        raise ConfigError(f"lm_head bits must be 4 or 8, got {lm_head_bits}")
    if kv_dtype is not None and kv_dtype not in KV_DTYPES:
        raise ConfigError(f"KV cache type must be one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")
    if kv_dtype == "float16" and weights == "int8" and int8_method == "dynamic":
        raise ConfigError("int8 --int8-method dynamic keeps a float32 KV cache (its graph is quantized afterwards)")
    nbits = weights == "int4" or (weights == "int8" and int8_method == "blockwise")
    if quant is not None and not nbits:
        raise ConfigError("a quantization plan applies to int4 and blockwise int8 exports only")
    plan = default_plan(weights, quant, block_size=block_size, accuracy_level=accuracy_level,
                        lm_head_bits=lm_head_bits) if nbits else None
    kv_dtype = kv_dtype or ("float16" if nbits else "float32")
    out = _check_out_dir(out_dir, force=force)
    try:
        import onnx  # noqa: F401
        import onnxruntime
    except ImportError as exc:
        raise ConversionError(f"ONNX export needs onnx and onnxruntime ({exc.name} is missing): pip install 'edge-reason[onnx,convert]'") from None
    folder = resolve_source(src, revision=revision)

    with Checkpoint(folder) as ckpt:
        shape = Shape(ckpt.config, folder / "config.json")
        if plan is not None:
            plan = plan.resolve(shape)
        meta = _token_meta(ckpt)
        calibration = None
        if plan is not None and plan.method == "gptq":
            logger.info("measuring GPTQ's input Hessians on the calibration texts")
            calibration = Calibration(folder, calibration_texts or default_calibration_texts(),
                                      lambda layer, role: plan.for_weight(role, layer).bits == 4)
        with atomic_dir(out) as tmp:
            logger.info("building the %s graph (%s weights)", shape.arch, weights)
            quantized = 0
            if weights == "int8" and int8_method == "dynamic":
                # Quantized from an fp32 graph whose embedding is float16 (see the module docstring).
                model = _fp16_embedding(build_model(ckpt, shape, "fp32"))
                external = _nbytes(model) >= EXTERNAL_DATA_MIN_BYTES
                with tempfile.TemporaryDirectory(dir=tmp) as work:
                    fp32 = Path(work) / MODEL_FILE
                    _save(model, fp32)
                    del model
                    logger.info("quantizing to %s", weights)
                    quantized = _quantize_dynamic_int8(fp32, tmp / MODEL_FILE, external)
            else:
                model = build_model(ckpt, shape, "fp16" if weights == "fp16" else "fp32", plan, calibration, kv_dtype)
                quantized = sum(n.op_type == "MatMulNBits" for n in model.graph.node)
                _save(model, tmp / MODEL_FILE, external=True if plan is not None else None)
                del model
            del calibration
            io = _smoke_test(tmp, shape, kv_dtype)
            _write_metadata(ckpt, tmp, meta)
            manifest = {
                "format": "edge-onnx",
                "version": 1,
                "architecture": shape.arch,
                "weights": weights,
                "int8_method": int8_method if weights == "int8" else None,
                "block_size": (plan.block_size if weights == "int4" else plan.int8_block_size) if plan else None,
                "accuracy_level": plan.accuracy_level if plan else None,
                "symmetric": (plan.symmetric if weights == "int4" else True) if plan else None,
                "lm_head_bits": plan.lm_head_bits if weights == "int4" else None,
                "quantization": plan.describe() if plan else None,
                "tensors": plan.summary(shape.layers) if plan else None,
                # the size budget's reference and what the plan weighs (convert.onnx_quant)
                "q4_k_m_bytes": q4_k_m_bytes(shape),
                "planned_weight_bytes": export_bytes(plan, shape) if plan else None,
                "embedding": _embedding_kind(weights, plan, shape.tied),
                "quantized_matmuls": quantized,
                "source": str(src),
                "model_file": MODEL_FILE,
                "external_data": sorted(p.name for p in tmp.iterdir() if p.name.startswith(MODEL_FILE + ".")),
                "n_layers": shape.layers,
                "n_heads": shape.heads,
                "n_kv_heads": shape.kv_heads,
                "head_dim": shape.head_dim,
                "vocab_size": shape.vocab,
                "max_position_embeddings": shape.max_positions,
                "kv_dtype": kv_dtype,
                "opset": OPSET,
                "onnxruntime": onnxruntime.__version__,
                **{k: v for k, v in meta.items() if k != "tokenizer_config"},
                **io,
            }
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
    logger.info("wrote %s (%s)", out, weights)
    return out


def _embedding_kind(weights: str, plan: QuantPlan | None, tied: bool) -> str:
    """How the manifest describes the embedding table's storage."""
    if plan is None:
        return "float32" if weights == "fp32" else "float16"
    quant = plan.for_weight("embedding", None)
    shared = tied and plan.lm_head_bits == plan.embedding_bits
    return f"GatherBlockQuantized {quant.label()}" + (", shared with lm_head" if shared else "")


def _fp16_embedding(model):
    """Store the embedding table as float16 followed by a Cast (quantized exports only)."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    for i, t in enumerate(graph.initializer):
        if t.name == "model.embed_tokens.weight" and t.data_type == TensorProto.FLOAT:
            half = numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name)
            graph.initializer[i].CopyFrom(half)
            cast_out = f"{t.name}/float32"
            for node in graph.node:
                for j, name in enumerate(node.input):
                    if name == t.name:
                        node.input[j] = cast_out
            graph.node.insert(0, helper.make_node("Cast", [t.name], [cast_out], name=f"/{t.name}/Cast", to=TensorProto.FLOAT))
            break
    return model


# -- verification ------------------------------------------------------------------------------


def read_manifest(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidModelError(f"{path}: not valid JSON ({exc})") from None


def weights_key(manifest: dict[str, Any]) -> str:
    """"fp32" / "fp16" / "int8" / "int8-dynamic" / "int4" for a manifest, "unknown" without."""
    weights = manifest.get("weights", "unknown")
    return "int8-dynamic" if weights == "int8" and manifest.get("int8_method") == "dynamic" else weights


def onnx_thresholds(folder: str | Path) -> Thresholds:
    """Default parity thresholds for the export in ``folder`` (by its manifest's weights type)."""
    weights = weights_key(read_manifest(folder))
    if weights not in THRESHOLDS:
        raise InvalidModelError(f"{folder}: no {MANIFEST} naming the weights type; pass thresholds explicitly")
    return THRESHOLDS[weights]


def verify_onnx(
    src: str | Path,
    onnx_dir: str | Path,
    *,
    prompts: list[str] | tuple[str, ...] | None = None,
    heldout: str | None = None,
    chat: bool = True,
    thresholds: Thresholds | None = None,
    max_tokens: int = 256,
    n_threads: int = 2,
    revision: str | None = None,
) -> VerifyReport:
    """Compare the ONNX folder ``onnx_dir`` with its source ``src``, as :func:`convert.verify`
    does for a GGUF: tokenizer, top-1 agreement, KL(source || onnx), max |logit diff|,
    perplexity. The ONNX side runs through :class:`edge.backends.onnx.OnnxBackend` (its
    tokenizer, BOS rule and KV-cache code path); ``report.converted`` holds the folder's path."""
    from edge.convert.verify import check_tokenizer, compare_logits, load_reference
    from edge.backends.onnx import OnnxBackend

    path = Path(onnx_dir).expanduser()
    if not (path / MODEL_FILE).is_file():
        raise ModelNotFoundError(f"{path}: no {MODEL_FILE}; export one with `edge-reason convert onnx`")
    weights = weights_key(read_manifest(path))
    if thresholds is None:
        thresholds = onnx_thresholds(path)
    report = VerifyReport(str(src), str(path), f"onnx-{weights}", thresholds)
    ref = load_reference(report, src, revision=revision, prompts=prompts, heldout=heldout, chat=chat, max_tokens=max_tokens)
    tok, model, plain, rendered, sequences = ref.tok, ref.model, ref.plain, ref.rendered, ref.sequences
    with contextlib.closing(OnnxBackend(path, n_ctx=max(len(s) for s in sequences) + 8, threads=n_threads, device="cpu")) as backend:
        check_tokenizer(report, tok, lambda text, bos: backend.tokenize(text, add_bos=bos and backend.add_bos, special=True), plain, rendered)

        def onnx_logits(ids: list[int]) -> np.ndarray:
            backend.rollback(0)
            return backend.score(ids)

        compare_logits(report, model, sequences, onnx_logits, "onnx")
    return report
