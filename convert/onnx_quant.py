"""Weight quantization for the ONNX export: which tensor gets how many bits, and the rounding.

The graph builder (:mod:`convert.onnx`) asks :class:`QuantPlan` for each weight and writes the
result straight into ONNX Runtime's contrib operators, so no float32 graph is ever built:

* MatMul weights -> ``MatMulNBits`` (4 or 8 bits, blockwise along the input axis, one float32
  scale per block and, when asymmetric, one uint4/uint8 zero point per block);
* the embedding table -> ``GatherBlockQuantized`` (the same blockwise format: one row of the
  table is dequantized per looked-up token, the float table never exists). A tied output
  projection stores its quantized table once: the lookup reads the lm_head ``MatMulNBits``
  weight itself.

Rounding (``method``):

* ``rtn``: round to nearest on the block's [min, max] (asymmetric, zero point) or [-absmax,
  absmax] (symmetric) grid, with ONNX Runtime's own quantizer (``quantize_matmul_4bits`` /
  ``_8bits``, exactly what ``MatMulNBitsQuantizer`` writes);
* ``gptq``: GPTQ (Frantar et al. 2022) on the 4-bit decoder weights: columns are rounded one
  at a time and the rounding error is pushed onto the columns not yet rounded, weighted by the
  inverse of the input Hessian ``X^T X`` measured with the source model (transformers, float32)
  on :func:`default_calibration_texts` (or the caller's texts). Same grid and format as
  ``rtn``; only the integers differ. Needs torch + transformers, ~4 bytes of RAM per parameter
  (like ``verify``) plus the Hessians of the 4-bit weights.

Grid search (``grid_search``, off by default; ``gptq``'s 4-bit weights): instead of the block's
full [min, max] range, each block takes the range shrunk by the ratio in :data:`CLIP_RATIOS` that
minimises its squared rounding error weighted by the Hessian's diagonal (each input's mean
square), with the grids fixed before any column is rounded and the columns rounded largest
input first (act-order). The format is unchanged; only scales, zero points and integers differ.
On Qwen2.5-Coder-0.5B it cut the layer-wise output error by 3-19% but not the model's KL: dev set
-3.5%, verify's texts +8%, held-out prompts +14% (benchmarks/results/formats.md), so it is an
option, not the default. Without calibration (``rtn``) the same search bought nothing (dev KL
0.0122 -> 0.0121).

How the defaults were chosen: the module docstring of :mod:`convert.onnx` and
benchmarks/results/formats.md.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edge.errors import ConfigError, ConversionError

logger = logging.getLogger(__name__)

METHODS = ("rtn", "gptq")
# Range shrink ratios tried by the grid search (1.0: the block's full range, ONNX Runtime's grid).
CLIP_RATIOS = tuple(round(1.0 - 0.025 * i, 3) for i in range(11))  # 1.0 .. 0.75
BITS = (4, 8)
BLOCK_SIZES = (16, 32, 64, 128, 256)
DEFAULT_BLOCK_SIZE = 32  # 4-bit blocks when neither the caller nor the size budget sets one

# Weight roles, as the graph names its MatMuls (q/k/v and gate/up are one MatMul each).
ROLES = ("qkv", "o", "gate_up", "down", "lm_head", "embedding")


@dataclass(frozen=True)
class TensorQuant:
    """How one weight is stored: ``bits`` per value in blocks of ``block_size`` along the input
    axis, with (asymmetric) or without (symmetric) a zero point per block."""

    bits: int
    block_size: int
    symmetric: bool

    def label(self) -> str:
        return f"{self.bits}-bit {'sym' if self.symmetric else 'asym'} b{self.block_size}"

    def fit(self, k: int) -> TensorQuant:
        """This storage for an input size ``k``: when ``k`` is not a multiple of the block, the
        largest allowed block that divides it (a padded last block would store zeros)."""
        if k % self.block_size == 0:
            return self
        fitting = [b for b in BLOCK_SIZES if b < self.block_size and k % b == 0]
        return replace(self, block_size=fitting[-1]) if fitting else self


@dataclass(frozen=True)
class QuantPlan:
    """The per-tensor quantization of an export.

    ``bits`` / ``block_size`` / ``symmetric`` are the bulk (the MLP weights of an int4 export);
    ``attention_bits`` the q/k/v and o projections, ``lm_head_bits`` the output projection,
    ``embedding_bits`` the embedding table (None: the lm_head's bits when they are tied, so the
    table is stored once, else 4); ``int8_layers`` are decoder layers whose every weight gets
    8 bits and ``int8_down_layers`` further layers whose MLP down projection does (both None:
    chosen by the size budget below; without one, the first sixth and the last third of the
    layers, and the down projection of the twelfth before that last third, :meth:`resolve`;
    ``int8_layers`` given alone: no further down layers). 8-bit weights are symmetric with
    blocks of ``int8_block_size`` (at 8 bits a zero point or smaller blocks buy nothing
    measurable). ``method`` rounds the 4-bit weights (``rtn`` / ``gptq``). :meth:`resolve`
    fills in the None fields for a model. ``grid_search``: with ``gptq``, each 4-bit block's
    range chosen by :func:`search_grid` rather than its full [min, max] (module docstring).

    ``size_budget`` (default 1.1; None: the fixed layer shares above): the weights may take at
    most this multiple of a Q4_K_M GGUF of the same model (:func:`q4_k_m_bytes`). When the
    8-bit layers are not given, :meth:`resolve` first doubles the 4-bit block size (from 32,
    unless ``block_size`` is given) while the plan without 8-bit layers is over the budget, then makes layers 8-bit in the order of
    :func:`promotion_order` (from both ends inward) where they fit, or else their down
    projection where that fits."""

    bits: int = 4
    block_size: int | None = None  # None: 32, or larger where the size budget needs it
    symmetric: bool = False
    attention_bits: int = 8
    lm_head_bits: int = 8
    embedding_bits: int | None = None
    int8_layers: tuple[int, ...] | None = None
    int8_down_layers: tuple[int, ...] | None = None
    int8_block_size: int = 128
    method: str = "rtn"
    accuracy_level: int = 4
    grid_search: bool = False
    size_budget: float | None = 1.1

    def __post_init__(self) -> None:
        for name in ("bits", "attention_bits", "lm_head_bits", "embedding_bits"):
            value = getattr(self, name)
            if value is not None and value not in BITS:
                raise ConfigError(f"{name.replace('_', ' ')} must be 4 or 8, got {value}")
        for name in ("block_size", "int8_block_size"):
            if getattr(self, name) not in (*BLOCK_SIZES, *((None,) if name == "block_size" else ())):
                raise ConfigError(f"block size must be one of {', '.join(map(str, BLOCK_SIZES))}, got {getattr(self, name)}")
        if self.method not in METHODS:
            raise ConfigError(f"unknown quantization method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if self.size_budget is not None and not self.size_budget > 0:
            raise ConfigError(f"size budget must be a positive multiple of the Q4_K_M size, got {self.size_budget}")
        if self.grid_search and self.method != "gptq":
            raise ConfigError("--grid-search needs --method gptq (it weighs each block's error by the calibration inputs)")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise ConfigError(f"accuracy level must be one of 0, 1, 2, 3, 4, got {self.accuracy_level}")

    def resolve(self, dims: Any) -> QuantPlan:
        """This plan for a model of ``dims``' shapes (``layers``, ``tied`` and, with a size
        budget, those :func:`q4_k_m_bytes` reads, e.g. :class:`convert.onnx.Shape`), with the None
        fields decided."""
        n_layers, tied = dims.layers, dims.tied
        layers, down = self.int8_layers, self.int8_down_layers
        for name, value in (("int8 layers", layers or ()), ("int8 down layers", down or ())):
            if any(i >= n_layers for i in value):
                raise ConfigError(f"{name} {', '.join(map(str, value))}: the model has layers 0..{n_layers - 1}")
        embedding = self.embedding_bits
        if embedding is None:
            embedding = self.lm_head_bits if tied else 4
        plan = replace(self, embedding_bits=embedding)
        if layers is None and self.size_budget is not None:
            return plan._within_budget(dims)
        plan = replace(plan, block_size=self.block_size or DEFAULT_BLOCK_SIZE)
        if layers is None:
            # Measured per layer on Qwen2.5-Coder-0.5B (KL of each weight alone at 4 bits, per MB
            # that 8 bits would add; benchmarks/results/formats.md): the last layers cost most,
            # then the first; the down projections a little further from the end than gate/up.
            first, last = n_layers // 6, n_layers // 3
            layers = tuple(range(first)) + tuple(range(n_layers - last, n_layers))
            if down is None:
                down = tuple(range(n_layers - last - n_layers // 12, n_layers - last))
        return replace(plan, int8_layers=tuple(sorted(set(layers))), int8_down_layers=tuple(sorted(set(down or ()))))

    def _within_budget(self, dims: Any) -> QuantPlan:
        """:meth:`resolve`'s size-budget rule (class docstring)."""
        budget = self.size_budget * q4_k_m_bytes(dims)
        plan = replace(self, int8_layers=(), int8_down_layers=tuple(sorted(set(self.int8_down_layers or ()))),
                       block_size=self.block_size or DEFAULT_BLOCK_SIZE)
        while self.block_size is None and export_bytes(plan, dims) > budget and plan.block_size < 128:
            plan = replace(plan, block_size=plan.block_size * 2)  # a block size given stays
        if export_bytes(plan, dims) > budget:
            logger.warning("the int4 plan takes %.0f MB even without 8-bit layers, over its budget of %.0f MB "
                           "(%.2fx the Q4_K_M size)", export_bytes(plan, dims) / 1e6, budget / 1e6, self.size_budget)
            return plan
        for kind, i in promotion_order(dims.layers):
            # a layer that does not fit may still fit its down projection (a third of its MLP)
            for field in ("int8_layers", "int8_down_layers") if kind == "layer" else ("int8_down_layers",):
                if i in plan.int8_layers or i in getattr(plan, field):
                    break
                grown = replace(plan, **{field: tuple(sorted({*getattr(plan, field), i}))})
                if export_bytes(grown, dims) <= budget:
                    plan = grown
                    break
        return replace(plan, int8_down_layers=tuple(i for i in plan.int8_down_layers if i not in plan.int8_layers))

    def for_weight(self, role: str, layer: int | None) -> TensorQuant:
        """The storage of the weight ``role`` (one of :data:`ROLES`) of ``layer`` (None for
        the embedding and lm_head)."""
        if role == "lm_head":
            bits = self.lm_head_bits
        elif role == "embedding":
            bits = self.embedding_bits
        elif layer in (self.int8_layers or ()) or (role == "down" and layer in (self.int8_down_layers or ())):
            bits = 8
        elif role in ("qkv", "o"):
            bits = self.attention_bits
        else:
            bits = self.bits
        if bits == 8:
            return TensorQuant(8, self.int8_block_size, True)
        return TensorQuant(4, self.block_size or DEFAULT_BLOCK_SIZE, self.symmetric)

    def describe(self) -> dict[str, Any]:
        """The plan as the manifest records it."""
        return {**asdict(self), **{name: None if getattr(self, name) is None else list(getattr(self, name))
                                   for name in ("int8_layers", "int8_down_layers")}}

    def summary(self, n_layers: int) -> dict[str, str]:
        """Each weight role's storage, e.g. ``{"down": "4-bit asym b32; 8-bit sym b128 in layers 0, 23"}``."""
        out = {}
        for role in ROLES:
            if role in ("lm_head", "embedding"):
                out[role] = self.for_weight(role, None).label()
                continue
            layers: dict[str, list[int]] = {}
            for i in range(n_layers):
                layers.setdefault(self.for_weight(role, i).label(), []).append(i)
            common = max(layers, key=lambda k: len(layers[k]))
            rest = [f"{label} in layers {', '.join(map(str, ls))}" for label, ls in layers.items() if label != common]
            out[role] = "; ".join([common, *rest])
        return out


def parse_layers(text: str) -> tuple[int, ...]:
    """``"0,1,23"`` (or ``"none"``, ``""``) -> (0, 1, 23)."""
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        layers = tuple(sorted({int(part) for part in text.split(",")}))
    except ValueError:
        raise ConfigError(f"layers must be comma-separated indices like 0,1,23, got {text!r}") from None
    if layers[0] < 0:
        raise ConfigError(f"layer indices must be >= 0, got {text!r}")
    return layers


def promotion_order(n_layers: int) -> list[tuple[str, int]]:
    """The order in which a size budget makes weights 8-bit: whole layers from both ends inward,
    two from the end for one from the start, until the first sixth and the last third are in;
    then the down projection of the twelfth of the layers before that third; then the other
    layers in the same inward order. ``("layer", i)`` / ``("down", i)``. From the per-layer
    measurement on Qwen2.5-Coder-0.5B (benchmarks/results/formats.md): per byte, 4 bits cost
    most in the last layers, then the first, and least in the middle."""
    ends, lo, hi = [], 0, n_layers - 1
    while lo <= hi:
        for _ in range(2):
            if lo <= hi:
                ends.append(hi)
                hi -= 1
        if lo <= hi:
            ends.append(lo)
            lo += 1
    rule = n_layers // 6 + n_layers // 3
    last = n_layers // 3
    downs = range(n_layers - last - n_layers // 12, n_layers - last)
    return [("layer", i) for i in ends[:rule]] + [("down", i) for i in downs] + [("layer", i) for i in ends[rule:]]


def default_plan(weights: str, quant: QuantPlan | None = None, *, block_size: int | None = None,
                 accuracy_level: int | None = None, lm_head_bits: int | None = None) -> QuantPlan:
    """The plan of a MatMulNBits export (``int4`` or blockwise ``int8``): ``quant`` or the
    default (:data:`INT4` / :data:`INT8`), with the given fields replaced."""
    if weights not in ("int4", "int8"):
        raise ConfigError(f"{weights} weights are not quantized with MatMulNBits")
    plan = quant or (INT4 if weights == "int4" else INT8)
    changes: dict[str, Any] = {}
    if block_size is not None:
        changes["block_size" if weights == "int4" else "int8_block_size"] = block_size
    if accuracy_level is not None:
        changes["accuracy_level"] = accuracy_level
    if lm_head_bits is not None and weights == "int4":
        changes["lm_head_bits"] = lm_head_bits
    return replace(plan, **changes)


# The defaults (measurements: the module docstring of convert.onnx and benchmarks/results/formats.md).
INT4 = QuantPlan()
# Blockwise int8: every weight at 8 bits, symmetric, blocks of 32 (as GGUF q8_0).
INT8 = QuantPlan(bits=8, symmetric=True, attention_bits=8, lm_head_bits=8, embedding_bits=8, int8_layers=(),
                 int8_block_size=32)


# -- sizes --------------------------------------------------------------------------------------

# llama.cpp's block formats: values per block, bytes per block.
GGML_BLOCKS = {"Q4_K": (256, 144), "Q6_K": (256, 210), "Q5_0": (32, 22), "Q8_0": (32, 34)}
# What llama.cpp writes instead of a k-quant when a row is not a multiple of its 256 values.
_K_FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}


def _more_bits(i: int, n: int) -> bool:
    """The layers whose attn_v and ffn_down a Q4_K_M GGUF stores as Q6_K: the first and last
    eighth, and every third layer between (checked against R1-Distill-Qwen-7B's file)."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def q4_k_m_bytes(dims: Any) -> int:
    """Bytes of the tensors of a llama.cpp Q4_K_M GGUF of a model with ``dims``' shapes (an
    object with ``layers``, ``hidden``, ``heads``, ``kv_heads``, ``head_dim``, ``ffn``, ``vocab``,
    ``tied`` and ``qkv_bias``, e.g. :class:`convert.onnx.Shape`): Q4_K everywhere but Q6_K for
    the output projection (the embedding when tied) and for attn_v and ffn_down in half the
    layers (:func:`_more_bits`), Q5_0 / Q8_0 where a row is not a multiple of 256 values; norms
    and biases float32. The reference the int4 plan's size budget is a multiple of."""

    def ggml(kind: str, k: int, n: int) -> int:
        if k % GGML_BLOCKS[kind][0]:
            kind = _K_FALLBACK[kind]
        values, nbytes = GGML_BLOCKS[kind]
        return n * -(-k // values) * nbytes

    h, hd, L = dims.hidden, dims.head_dim, dims.layers
    total = ggml("Q6_K" if dims.tied else "Q4_K", h, dims.vocab) + (0 if dims.tied else ggml("Q6_K", h, dims.vocab))
    for i in range(L):
        more = "Q6_K" if _more_bits(i, L) else "Q4_K"
        total += ggml("Q4_K", h, dims.heads * hd) + ggml("Q4_K", h, dims.kv_heads * hd) + ggml(more, h, dims.kv_heads * hd)
        total += ggml("Q4_K", dims.heads * hd, h) + 2 * ggml("Q4_K", h, dims.ffn) + ggml(more, dims.ffn, h)
    return total + 4 * _float_values(dims)


def _float_values(dims: Any) -> int:
    """Values of the tensors every format keeps in float32: the norms and the q/k/v biases."""
    bias = (dims.heads + 2 * dims.kv_heads) * dims.head_dim if getattr(dims, "qkv_bias", False) else 0
    return dims.layers * (2 * dims.hidden + bias) + dims.hidden


def weight_shapes(dims: Any) -> list[tuple[str, int | None, int, int]]:
    """``(role, layer, k, n)`` of every weight matrix the graph stores ([K, N] MatMul layout,
    q/k/v and gate/up one matrix each; the embedding [hidden, vocab] like the lm_head)."""
    h, hd = dims.hidden, dims.head_dim
    out: list[tuple[str, int | None, int, int]] = [("embedding", None, h, dims.vocab), ("lm_head", None, h, dims.vocab)]
    for i in range(dims.layers):
        out += [("qkv", i, h, (dims.heads + 2 * dims.kv_heads) * hd), ("o", i, dims.heads * hd, h),
                ("gate_up", i, h, 2 * dims.ffn), ("down", i, dims.ffn, h)]
    return out


def packed_bytes(quant: TensorQuant, k: int, n: int) -> int:
    """Bytes of a [K, N] weight in MatMulNBits' format: the packed values, a float32 scale per
    block and, asymmetric, the zero points (two 4-bit ones per byte)."""
    quant = quant.fit(k)
    blocks = -(-k // quant.block_size)
    zero_points = 0 if quant.symmetric else n * -(-blocks // (8 // quant.bits))
    return n * blocks * (quant.block_size * quant.bits // 8 + 4) + zero_points


def export_bytes(plan: QuantPlan, dims: Any) -> int:
    """Bytes of the weights of an export of ``dims``' model under the resolved ``plan`` (the
    data file of the folder, less alignment padding): every weight in its planned format, a
    tied table stored once when the lm_head and embedding share their bits, norms and biases
    float32."""
    shared = dims.tied and plan.lm_head_bits == plan.embedding_bits
    total = 4 * _float_values(dims)
    for role, layer, k, n in weight_shapes(dims):
        if role == "embedding" and shared:
            continue
        total += packed_bytes(plan.for_weight(role, layer), k, n)
    return total


# -- the packed MatMulNBits / GatherBlockQuantized format -------------------------------------


@dataclass
class Packed:
    """A weight [K, N] (MatMul layout) in MatMulNBits' format: ``data`` uint8 [N, K/block,
    block*bits/8], ``scales`` float32 [N, K/block], ``zero_points`` uint8 [N, ceil(K/block /
    (8/bits))] (two 4-bit points per byte, low nibble first) or None when symmetric."""

    data: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    quant: TensorQuant
    k: int
    n: int

    def unpacked_zero_points(self) -> np.ndarray | None:
        """One uint8 zero point per block, [N, K/block] (GatherBlockQuantized on the 3-D table)."""
        if self.zero_points is None:
            return None
        if self.quant.bits == 8:
            return self.zero_points
        blocks = self.scales.shape[1]
        pairs = np.stack([self.zero_points & 0x0F, self.zero_points >> 4], axis=-1)
        return np.ascontiguousarray(pairs.reshape(self.n, -1)[:, :blocks])


def quantize_rtn(w: np.ndarray, quant: TensorQuant, name: str = "weight") -> Packed:
    """Round-to-nearest blockwise quantization of ``w`` [K, N] with ONNX Runtime's kernels."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    if w.ndim != 2:
        raise ConversionError(f"{name}: cannot quantize a {w.ndim}-D weight")
    k, n = w.shape
    bits, block = quant.bits, quant.block_size
    blocks = -(-k // block)
    data = np.zeros((n, blocks, block * bits // 8), dtype=np.uint8)
    scales = np.zeros((n, blocks), dtype=np.float32)
    zero_points = np.zeros((n, -(-blocks // (8 // bits))), dtype=np.uint8)
    kernel = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    kernel(data, np.ascontiguousarray(w, dtype=np.float32), scales, zero_points, block, n, k, quant.symmetric)
    return Packed(data, scales, None if quant.symmetric else zero_points, quant, k, n)


def pack(q: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, quant: TensorQuant) -> Packed:
    """Pack integer weights ``q`` [N, K] (values in [0, 2^bits)), ``scales`` / ``zero_points``
    [N, K/block] into :class:`Packed` (the layout ``quantize_rtn`` returns)."""
    n, k = q.shape
    block, bits = quant.block_size, quant.bits
    blocks = -(-k // block)
    q = np.pad(q.astype(np.uint8), ((0, 0), (0, blocks * block - k)), constant_values=1 << (bits - 1))
    if bits == 4:
        q = q[:, 0::2] | (q[:, 1::2] << 4)
    data = np.ascontiguousarray(q.reshape(n, blocks, -1))
    zp = None
    if zero_points is not None:
        zp = zero_points.astype(np.uint8)
        if bits == 4:
            if blocks % 2:
                zp = np.pad(zp, ((0, 0), (0, 1)), constant_values=8)
            zp = zp[:, 0::2] | (zp[:, 1::2] << 4)
        zp = np.ascontiguousarray(zp)
    return Packed(data, np.ascontiguousarray(scales, dtype=np.float32), zp, quant, k, n)


def dequantize(p: Packed) -> np.ndarray:
    """The float32 weight [K, N] that ``p`` stands for (tests and diagnostics)."""
    bits = p.quant.bits
    data = p.data
    if bits == 4:
        data = np.stack([data & 0x0F, data >> 4], axis=-1).reshape(p.n, data.shape[1], -1)
    zp = p.unpacked_zero_points()
    zp = np.full(p.scales.shape, 1 << (bits - 1), dtype=np.float32) if zp is None else zp.astype(np.float32)
    w = (data.astype(np.float32) - zp[..., None]) * p.scales[..., None]
    return np.ascontiguousarray(w.reshape(p.n, -1)[:, : p.k].T)


def search_grid(w: np.ndarray, quant: TensorQuant, importance: np.ndarray | None = None,
                ratios: tuple[float, ...] = CLIP_RATIOS) -> tuple[np.ndarray, np.ndarray]:
    """Scales and zero points [N, K/block] of ``w`` [N, K] (one row per output): per block, the
    grid of the block's range shrunk by the ratio in ``ratios`` with the least squared rounding
    error (``importance`` [K] weighs each input's error; None: all alike). Ratio 1.0 is ONNX
    Runtime's grid, so the result is never worse than it on the measure searched."""
    bits, block = quant.bits, quant.block_size
    hi = (1 << bits) - 1
    n, k = w.shape
    blocks = w.reshape(n, k // block, block).astype(np.float32)
    imp = np.ones(block, np.float32) if importance is None else np.asarray(importance, np.float32).reshape(k // block, block)
    if quant.symmetric:
        big = np.where(np.abs(blocks.max(-1)) > np.abs(blocks.min(-1)), blocks.max(-1), blocks.min(-1))
    else:
        low0, high0 = np.minimum(blocks.min(-1), 0), np.maximum(blocks.max(-1), 0)
    best = best_scale = best_zero = None
    for r in ratios:
        if quant.symmetric:
            scale = (big * np.float32(r)) / np.float32(-(1 << (bits - 1)))
            scale = np.where(scale == 0, np.float32(1), scale).astype(np.float32)
            zero = np.full_like(scale, 1 << (bits - 1))
        else:
            low, high = low0 * np.float32(r), high0 * np.float32(r)
            scale = ((high - low) / np.float32(hi)).astype(np.float32)
            scale = np.where(scale == 0, np.float32(1), scale).astype(np.float32)
            zero = np.clip(np.round(-low / scale), 0, hi).astype(np.float32)
        q = np.clip(np.round(blocks / scale[..., None] + zero[..., None]), 0, hi)
        err = (((q - zero[..., None]) * scale[..., None] - blocks) ** 2 * imp).sum(-1)
        if best is None:
            best, best_scale, best_zero = err, scale, zero
        else:
            better = err < best
            best = np.where(better, err, best)
            best_scale = np.where(better, scale, best_scale)
            best_zero = np.where(better, zero, best_zero)
    return best_scale, best_zero


# -- GPTQ ----------------------------------------------------------------------------------------

# Calibration text for ``method="gptq"``: prose, arithmetic reasoning, several programming
# languages, SQL and Chinese, written for this purpose (none of verify's prompts).
CALIBRATION_TEXTS: tuple[str, ...] = (
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk. He wound the clockwork, "
    "trimmed the wick and polished the great lens until it threw a clean white beam across the harbour. "
    "Ships that had never seen him trusted him with their lives, and he liked it that way.",
    "Question: A rectangle has a perimeter of 46 cm and its length is 5 cm more than its width. What is its area?\n"
    "Answer: Let the width be w. Then 2(w + w + 5) = 46, so 4w + 10 = 46 and w = 9. The length is 14, "
    "so the area is 9 * 14 = 126 square centimetres.",
    "import json\nfrom pathlib import Path\n\n\ndef load_config(path: str) -> dict:\n    \"\"\"Read a JSON config, "
    "falling back to defaults for missing keys.\"\"\"\n    defaults = {\"threads\": 4, \"verbose\": False}\n"
    "    data = json.loads(Path(path).read_text())\n    return {**defaults, **data}\n\n\nclass Counter:\n"
    "    def __init__(self):\n        self.counts = {}\n\n    def add(self, key):\n        self.counts[key] = self.counts.get(key, 0) + 1\n",
    "SELECT c.name, COUNT(o.id) AS orders, SUM(o.total) AS revenue\nFROM customers c\nJOIN orders o ON o.customer_id = c.id\n"
    "WHERE o.created_at >= '2023-01-01'\nGROUP BY c.name\nHAVING COUNT(o.id) > 3\nORDER BY revenue DESC;",
    "机器学习是人工智能的一个分支，它使计算机能够从数据中学习规律，而无需显式编程。常见的方法包括监督学习、"
    "无监督学习和强化学习。",
    "function debounce(fn, wait) {\n  let timer = null;\n  return (...args) => {\n    clearTimeout(timer);\n"
    "    timer = setTimeout(() => fn.apply(this, args), wait);\n  };\n}\n\nconst log = debounce((msg) => console.log(msg), 200);\n",
    "In 1858 the first transatlantic telegraph cable carried a message from Queen Victoria to President Buchanan; "
    "it took sixteen hours to transmit ninety-eight words, and the cable failed within a month. A durable link "
    "came only in 1866, laid by the steamship Great Eastern.",
    "#include <stdio.h>\n\nint gcd(int a, int b) {\n    while (b != 0) {\n        int t = a % b;\n        a = b;\n"
    "        b = t;\n    }\n    return a;\n}\n\nint main(void) {\n    printf(\"%d\\n\", gcd(84, 36));\n    return 0;\n}\n",
)


def gptq(w: np.ndarray, hessian: np.ndarray, quant: TensorQuant, *, damp: float = 0.1, group: int = 128,
         search: bool = False) -> Packed:
    """GPTQ of ``w`` [K, N] given the input Hessian [K, K] (``damp`` x its mean diagonal added:
    0.1 rather than the paper's 0.01 measured better with a few thousand calibration tokens).
    Columns go in input order and each block's grid is set from the (error-corrected) weights
    when its first column is reached; with ``search``, the grids are fixed first by
    :func:`search_grid` weighted by the Hessian's diagonal and the columns with the largest
    inputs are rounded first (act-order)."""
    import torch

    bits, block = quant.bits, quant.block_size
    hi = (1 << bits) - 1
    k, n = w.shape
    if k % block:
        raise ConversionError(f"GPTQ needs the input size {k} to be a multiple of the block size {block}")
    group = max(group, block)  # a block's grid is set within one group
    W = torch.from_numpy(np.ascontiguousarray(w.T, dtype=np.float32)).clone()  # [N, K]: one column per input
    H = torch.from_numpy(np.asarray(hessian, dtype=np.float32)).clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.arange(k)
    scales = torch.zeros((n, k // block))
    zeros = torch.zeros((n, k // block))
    if search:
        diag = torch.diag(H).clone()
        s_np, z_np = search_grid(W.numpy(), quant, diag.numpy())
        scales, zeros = torch.from_numpy(s_np), torch.from_numpy(z_np)
        perm = torch.argsort(diag, descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(k)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    q = torch.zeros((n, k), dtype=torch.uint8)
    for c1 in range(0, k, group):
        c2 = min(c1 + group, k)
        W1 = W[:, c1:c2].clone()
        err = torch.zeros_like(W1)
        Hinv1 = Hinv[c1:c2, c1:c2]
        for i in range(c2 - c1):
            col = int(perm[c1 + i])  # the input this column is
            if not search and col % block == 0:
                s_np, z_np = search_grid(W1[:, i : i + block].numpy(), quant, ratios=(1.0,))
                scales[:, col // block], zeros[:, col // block] = torch.from_numpy(s_np[:, 0]), torch.from_numpy(z_np[:, 0])
            scale, zero = scales[:, col // block], zeros[:, col // block]
            x = W1[:, i]
            qi = torch.clamp(torch.round(x / scale + zero), 0, hi)
            q[:, col] = qi.to(torch.uint8)
            e = (x - (qi - zero) * scale) / Hinv1[i, i]
            W1[:, i:] -= e.unsqueeze(1) * Hinv1[i, i:].unsqueeze(0)
            err[:, i] = e
        W[:, c2:] -= err @ Hinv[c1:c2, c2:]
    return pack(q.numpy(), scales.numpy(), None if quant.symmetric else zeros.numpy(), quant)


class Calibration:
    """Input Hessians ``X^T X / tokens`` of the weight MatMuls of the source model on
    calibration texts: one float32 forward pass with transformers, hooks on the inputs (q/k/v
    and gate/up share theirs). Only the weights ``wanted(layer, role)`` are measured (GPTQ
    rounds only the 4-bit ones): each holds a [K, K] float32 sum, e.g. 98 MB per layer for the
    MLP of a 0.5B model (hidden 896, ffn 4864)."""

    # role -> the HF module whose input is that role's input
    _MODULES = {"qkv": "self_attn.q_proj", "o": "self_attn.o_proj", "gate_up": "mlp.gate_proj", "down": "mlp.down_proj"}

    def __init__(self, folder: Path, texts: tuple[str, ...] | list[str], wanted: Callable[[int, str], bool],
                 *, max_tokens: int = 1024) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from transformers.utils import logging as hf_logging

        tok = AutoTokenizer.from_pretrained(folder)
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # the CLI prints one line per conversion
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        self._sums: dict[tuple[int, str], Any] = {}
        self.tokens = 0
        hooks = []
        for i, layer in enumerate(model.model.layers):
            for role, path in self._MODULES.items():
                if wanted(i, role):
                    hooks.append(layer.get_submodule(path).register_forward_hook(self._hook(i, role)))
        try:
            with torch.no_grad():
                for text in texts:
                    ids = tok.encode(text)[:max_tokens]
                    self.tokens += len(ids)
                    model(torch.tensor([ids]))
        finally:
            for h in hooks:
                h.remove()
        del model
        logger.info("GPTQ calibration: %d texts, %d tokens", len(texts), self.tokens)

    def _hook(self, layer: int, role: str):
        def hook(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            prev = self._sums.get((layer, role))
            self._sums[layer, role] = x.T @ x if prev is None else prev.addmm_(x.T, x)
        return hook

    def hessian(self, layer: int, role: str) -> np.ndarray:
        return (self._sums.pop((layer, role)) / max(self.tokens, 1)).numpy()


def default_calibration_texts() -> list[str]:
    """GPTQ's default calibration set, ~13k tokens with a Qwen2 tokenizer: the hand-written
    :data:`CALIBRATION_TEXTS`, 40 arithmetic word problems with worked answers (generated from
    a fixed seed, so no evaluation set leaks in) and Python code (chunks of standard-library
    modules). On the 0.5B model GPTQ needed this many tokens to beat round-to-nearest (with
    the 566 tokens of the hand-written texts alone it did worse)."""
    import inspect
    import random

    texts = list(CALIBRATION_TEXTS)
    rng = random.Random(0)
    names = ("Ana", "Ben", "Chen", "Dara", "Eli", "Farah", "Gus", "Hana")
    things = (("apples", "basket", "baskets"), ("stamps", "album", "albums"), ("marbles", "jar", "jars"),
              ("books", "shelf", "shelves"), ("coins", "box", "boxes"))
    for i in range(40):
        who, (item, place, places) = rng.choice(names), rng.choice(things)
        if i % 2:
            speed, hours, extra = rng.randint(30, 95), rng.randint(2, 6), rng.randint(10, 60)
            texts.append(
                f"Question: {who} drives at {speed} km/h for {hours} hours, then {extra} km more. How far is that?\n"
                f"Answer: At {speed} km/h for {hours} hours {who} covers {speed} * {hours} = {speed * hours} km. "
                f"Adding {extra} km gives {speed * hours} + {extra} = {speed * hours + extra} km.\n#### {speed * hours + extra}"
            )
            continue
        n, k, price = rng.randint(12, 90), rng.randint(2, 9), rng.randint(2, 15)
        per, rest = divmod(n, k)
        texts.append(
            f"Question: {who} has {n} {item} and puts the same number into each of {k} {places}, keeping the rest. "
            f"Every {item[:-1]} in a {place} sells for ${price}. How much money do the {places} bring?\n"
            f"Answer: {n} / {k} = {per} remainder {rest}, so each {place} holds {per} {item} and {rest} are kept. "
            f"The {places} hold {per} * {k} = {per * k} {item}, which sell for {per * k} * ${price} = ${per * k * price}.\n"
            f"#### {per * k * price}"
        )
    import bisect, fractions, heapq, json.decoder, statistics, textwrap  # noqa: E401

    for module in (textwrap, heapq, bisect, json.decoder, fractions, statistics):
        try:
            source = inspect.getsource(module)
        except (OSError, TypeError):  # a Python without its .py sources
            continue
        texts += [source[i : i + 2500] for i in range(0, min(len(source), 7500), 2500)]
    return texts
