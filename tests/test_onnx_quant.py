"""The ONNX export's quantization plan and packing (convert.onnx_quant), on small arrays."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnxruntime")


def rtn_reference(w: np.ndarray, bits: int, block: int, symmetric: bool) -> np.ndarray:
    """ONNX Runtime's RTN rule in numpy: blocks along the input axis of ``w`` [K, N]."""
    k, n = w.shape
    blocks = w.T.reshape(n, -1, block).astype(np.float64)
    if symmetric:
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        big = np.where(np.abs(blocks.max(-1)) > np.abs(blocks.min(-1)), blocks.max(-1), blocks.min(-1))[..., None]
        scale = (big / lo).astype(np.float32)
        q = np.clip(np.round(blocks / scale), lo, hi)
        return (q * scale).reshape(n, k).T
    hi = (1 << bits) - 1
    low, high = np.minimum(blocks.min(-1, keepdims=True), 0), np.maximum(blocks.max(-1, keepdims=True), 0)
    scale = ((high - low) / hi).astype(np.float32)
    zp = np.clip(np.round(-low / scale), 0, hi)
    q = np.clip(np.round(blocks / scale + zp), 0, hi)
    return ((q - zp) * scale).reshape(n, k).T


def searched_rtn(w: np.ndarray, quant, importance: np.ndarray | None = None):
    """Round to nearest on the grids search_grid chooses for ``w`` [K, N] (the reference GPTQ's
    grid search reduces to when no error is fed back)."""
    from edge.convert.onnx_quant import pack, search_grid

    k, n = w.shape
    scales, zeros = search_grid(np.ascontiguousarray(w.T), quant, importance)
    steps, offsets = (np.repeat(a, quant.block_size, axis=1) for a in (scales, zeros))
    q = np.clip(np.round(w.T / steps + offsets), 0, 15)
    return pack(q, scales, None if quant.symmetric else zeros, quant)


@pytest.mark.parametrize("bits,block,symmetric", [(4, 32, False), (4, 32, True), (4, 16, False), (8, 128, True), (8, 32, True)])
def test_rtn_packs_what_onnxruntime_dequantizes(bits, block, symmetric):
    from edge.convert.onnx_quant import TensorQuant, dequantize, pack, quantize_rtn

    rng = np.random.default_rng(0)
    w = (rng.standard_normal((256, 24)) * 0.02 + 0.004).astype(np.float32)  # [K, N], off-centre
    p = quantize_rtn(w, TensorQuant(bits, block, symmetric))
    assert p.data.shape == (24, 256 // block, block * bits // 8) and p.scales.shape == (24, 256 // block)
    assert (p.zero_points is None) == symmetric
    np.testing.assert_allclose(dequantize(p), rtn_reference(w, bits, block, symmetric), rtol=0, atol=1e-7)
    # pack() of the same integers gives the same bytes (the GPTQ path writes through pack)
    data = p.data if bits == 8 else np.stack([p.data & 15, p.data >> 4], -1).reshape(24, -1)
    zp = p.unpacked_zero_points()
    again = pack(data.reshape(24, -1), p.scales, zp, p.quant)
    np.testing.assert_array_equal(again.data, p.data)
    if zp is not None:
        np.testing.assert_array_equal(again.zero_points, p.zero_points)


def test_gptq_with_an_identity_hessian_is_rtn_and_with_a_real_one_does_better():
    from edge.convert.onnx_quant import TensorQuant, dequantize, gptq, quantize_rtn

    rng = np.random.default_rng(1)
    w = (rng.standard_normal((128, 16)) * 0.02).astype(np.float32)
    quant = TensorQuant(4, 32, False)
    rtn = dequantize(quantize_rtn(w, quant))
    # no error to feed back: GPTQ rounds to nearest on the same grids
    np.testing.assert_allclose(dequantize(gptq(w, np.eye(128), quant)), rtn, rtol=0, atol=1e-6)
    np.testing.assert_allclose(dequantize(gptq(w, np.eye(128), quant, search=True)),
                               dequantize(searched_rtn(w, quant)), rtol=0, atol=1e-6)
    # a diagonal Hessian neither feeds errors back nor lets act-order change anything but the
    # order: the integers land in their own columns
    d = rng.uniform(0.1, 10.0, 128)
    np.testing.assert_allclose(dequantize(gptq(w, np.diag(d), quant, search=True)),
                               dequantize(searched_rtn(w, quant, d)), rtol=0, atol=1e-6)
    x = rng.standard_normal((512, 128)) @ (np.eye(128) + 0.3 * rng.standard_normal((128, 128)))  # correlated inputs
    x *= rng.uniform(0.2, 3.0, 128)  # of unequal size (what act-order sorts by)
    hessian = x.T @ x / len(x)

    def output_error(deq):
        return float(np.trace((w - deq).T @ hessian @ (w - deq)))

    assert output_error(dequantize(gptq(w, hessian, quant))) < 0.8 * output_error(rtn)
    assert output_error(dequantize(gptq(w, hessian, quant, search=True))) < 0.8 * output_error(rtn)
    big = TensorQuant(4, 64, False)  # a block wider than half a group: its grid still sees the whole block
    np.testing.assert_allclose(dequantize(gptq(w, np.eye(128), big, group=32)), dequantize(quantize_rtn(w, big)),
                               rtol=0, atol=1e-6)


@pytest.mark.parametrize("symmetric", [False, True])
def test_grid_search_never_loses_to_the_full_range_and_wins_on_heavy_tails(symmetric):
    from edge.convert.onnx_quant import TensorQuant, dequantize, quantize_rtn, search_grid

    rng = np.random.default_rng(2)
    w = (rng.standard_t(4, (256, 64)) * 0.01).astype(np.float32)  # [K, N], heavy tails like real weights
    quant = TensorQuant(4, 32, symmetric)
    importance = rng.uniform(0.5, 2.0, 256).astype(np.float32)

    def block_errors(deq, imp):
        return (((deq - w) ** 2) * imp[:, None]).T.reshape(64, 8, 32).sum(-1)  # [N, blocks]

    ort = block_errors(dequantize(quantize_rtn(w, quant)), importance)
    searched = block_errors(dequantize(searched_rtn(w, quant, importance)), importance)
    assert (searched <= ort * (1 + 1e-5)).all()  # the full range is one of the candidates
    assert searched.sum() < 0.97 * ort.sum()  # a block's largest value no longer sets every step
    scales, zeros = search_grid(np.ascontiguousarray(w.T), quant, importance)
    assert scales.shape == zeros.shape == (64, 8) and (scales != 0).all()
    assert ((zeros >= 0) & (zeros <= 15)).all() and np.array_equal(zeros, np.round(zeros))
    plain = block_errors(dequantize(searched_rtn(w, quant)), np.ones(256, np.float32))
    assert plain.sum() <= block_errors(dequantize(quantize_rtn(w, quant)), np.ones(256, np.float32)).sum()


def dims(layers: int, tied: bool = False, hidden: int = 896, ffn: int = 4864, heads: int = 14, kv_heads: int = 2,
         vocab: int = 151936):
    """A model's shapes as QuantPlan.resolve reads them (default: Qwen2.5-0.5B's)."""
    from types import SimpleNamespace

    return SimpleNamespace(layers=layers, tied=tied, hidden=hidden, ffn=ffn, heads=heads, kv_heads=kv_heads,
                           head_dim=hidden // heads, vocab=vocab, qkv_bias=True)


def test_plan_resolves_layers_embedding_and_block_sizes():
    from dataclasses import replace

    from edge.convert.onnx_quant import INT4, INT8, QuantPlan, TensorQuant, default_plan, parse_layers
    from edge.errors import ConfigError

    fixed = replace(INT4, size_budget=None)  # the fixed layer shares (no size budget)
    plan = fixed.resolve(dims(24))
    # measured per layer: every weight 8-bit in the first sixth and the last third of the layers,
    # the down projection also in the twelfth before that
    assert plan.int8_layers == (0, 1, 2, 3, 16, 17, 18, 19, 20, 21, 22, 23)
    assert plan.int8_down_layers == (14, 15)
    assert plan.for_weight("gate_up", 3) == plan.for_weight("down", 15) == TensorQuant(8, 128, True)
    assert plan.for_weight("gate_up", 4) == plan.for_weight("gate_up", 15) == TensorQuant(4, 32, False)
    assert plan.for_weight("down", 4) == plan.for_weight("down", 13) == TensorQuant(4, 32, False)
    assert fixed.resolve(dims(28)).int8_down_layers == (17, 18)
    explicit = replace(INT4, int8_layers=(0, 23)).resolve(dims(24))  # an explicit list: those layers only
    assert explicit.int8_down_layers == () and explicit.for_weight("down", 15) == TensorQuant(4, 32, False)
    assert plan.for_weight("qkv", 6).bits == plan.for_weight("lm_head", None).bits == 8
    assert plan.for_weight("embedding", None) == TensorQuant(4, 32, False)
    assert INT4.resolve(dims(24, tied=True)).embedding_bits == 8  # one table, shared with the lm_head
    assert fixed.resolve(dims(2, tied=True)).int8_layers == ()
    assert all(INT8.resolve(dims(24)).for_weight(role, 3) == TensorQuant(8, 32, True)
               for role in ("qkv", "o", "gate_up", "down", "lm_head", "embedding"))
    assert default_plan("int8", block_size=64).int8_block_size == 64
    assert default_plan("int4", block_size=64, lm_head_bits=4).for_weight("lm_head", None) == TensorQuant(4, 64, False)
    assert TensorQuant(8, 128, True).fit(64) == TensorQuant(8, 64, True)  # no padded blocks
    assert TensorQuant(4, 32, False).fit(4864) == TensorQuant(4, 32, False)
    assert parse_layers("23,0, 1") == (0, 1, 23) and parse_layers("none") == ()
    summary = plan.summary(24)
    assert summary["gate_up"] == "8-bit sym b128; 4-bit asym b32 in layers 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15"
    assert summary["down"] == "8-bit sym b128; 4-bit asym b32 in layers 4, 5, 6, 7, 8, 9, 10, 11, 12, 13"
    assert plan.describe()["int8_down_layers"] == [14, 15]
    for bad in (lambda: QuantPlan(bits=3), lambda: QuantPlan(block_size=48), lambda: QuantPlan(method="awq"),
                lambda: QuantPlan(int8_layers=(9,)).resolve(dims(4)),
                lambda: QuantPlan(int8_down_layers=(4,)).resolve(dims(4)),
                lambda: QuantPlan(size_budget=0), lambda: QuantPlan(grid_search=True),
                lambda: parse_layers("first")):
        with pytest.raises(ConfigError):
            bad()


def test_q4_k_m_size_is_exact_on_the_real_r1_distill_qwen_7b_file():
    """The size budget's reference: the bytes of a Q4_K_M GGUF, computed from the shapes alone,
    equal the tensors of the real DeepSeek-R1-Distill-Qwen-7B Q4_K_M file (its header lists all
    339 with their types; which layers get Q6_K is checked too)."""
    import gguf
    from r1_vocab import header_tensors

    from edge.convert.onnx_quant import _more_bits, q4_k_m_bytes

    meta, tensors = header_tensors()
    arch = meta["general.architecture"]
    n_layers, hidden, heads = meta[f"{arch}.block_count"], meta[f"{arch}.embedding_length"], meta[f"{arch}.attention.head_count"]
    vocab = next(shape for name, shape, _ in tensors if name == "token_embd.weight")[1]
    shapes = dims(n_layers, hidden=hidden, ffn=meta[f"{arch}.feed_forward_length"], heads=heads,
                  kv_heads=meta[f"{arch}.attention.head_count_kv"], vocab=vocab)
    actual = 0
    for name, shape, type_id in tensors:
        block, nbytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(type_id)]
        actual += int(np.prod(shape)) // block * nbytes
    assert len(tensors) == 339 and actual > 4.6e9
    assert q4_k_m_bytes(shapes) == actual
    q6 = {int(name.split(".")[1]) for name, _, t in tensors if name.endswith("ffn_down.weight") and t == gguf.GGMLQuantizationType.Q6_K}
    assert q6 == {i for i in range(n_layers) if _more_bits(i, n_layers)} and len(q6) == n_layers // 2


def test_size_budget_fits_the_plan_to_the_model(caplog):
    """With the default budget (1.1x the Q4_K_M size) the plan spends 8-bit where it fits: on
    Qwen2.5-0.5B's shapes (a Q4_K_M that falls back to 5-bit rows) most of the first and last
    layers; on the 1.5B's (a true 4.9-bit Q4_K_M) larger 4-bit blocks and one layer. The fixed
    shares overshoot there; a budget below the smallest plan keeps the largest block and says so."""
    import logging
    from dataclasses import replace

    from edge.convert.onnx_quant import INT4, default_plan, export_bytes, promotion_order, q4_k_m_bytes

    small, large = dims(24), dims(28, hidden=1536, ffn=8960, heads=12)
    for shapes in (small, large, dims(28, hidden=3584, ffn=18944, heads=28, kv_heads=4, vocab=152064)):
        plan = INT4.resolve(shapes)
        assert export_bytes(plan, shapes) <= 1.1 * q4_k_m_bytes(shapes)
        # nothing left out would still have fitted
        for kind, i in promotion_order(shapes.layers):
            if i not in plan.int8_layers and (kind == "layer" or i not in plan.int8_down_layers):
                field = "int8_layers" if kind == "layer" else "int8_down_layers"
                grown = replace(plan, **{field: (*getattr(plan, field), i)})
                assert export_bytes(grown, shapes) > 1.1 * q4_k_m_bytes(shapes), (kind, i)
    plan = INT4.resolve(small)
    assert plan.block_size == 32 and {0, 1, 2, 21, 22, 23} <= set(plan.int8_layers) and len(plan.int8_layers) >= 10
    plan = INT4.resolve(large)
    assert plan.block_size == 64 and plan.int8_layers == (27,)
    assert export_bytes(replace(INT4, size_budget=None).resolve(large), large) > 1.3 * q4_k_m_bytes(large)
    roomy = replace(INT4, size_budget=3.0).resolve(large)
    assert roomy.block_size == 32 and roomy.int8_layers == tuple(range(28))
    with caplog.at_level(logging.WARNING, logger="edge.convert.onnx_quant"):
        tight = replace(INT4, size_budget=0.5).resolve(large)
    assert tight.block_size == 128 and tight.int8_layers == () and "over its budget" in caplog.text
    given = replace(INT4, int8_layers=(5,)).resolve(large)  # layers given: no budget, no block change
    assert given.int8_layers == (5,) and given.block_size == 32
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="edge.convert.onnx_quant"):
        fixed_block = replace(INT4, block_size=16).resolve(large)  # a block size given stays; layers fit around it
    assert fixed_block.block_size == 16 and fixed_block.int8_layers == () and "over its budget" in caplog.text
    assert default_plan("int4", block_size=32).resolve(large).block_size == 32

