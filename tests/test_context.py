"""Context sizes: the trained length, the memory a context needs (from GGUF metadata) against the
memory available, all checked before llama.cpp allocates anything."""

from __future__ import annotations

import logging
import re
import time

import pytest

from edge.backends import context
from edge.backends.context import (
    GiB,
    check_memory,
    estimate_memory,
    kv_bytes_per_token,
    parse_cgroup_memory,
    parse_meminfo,
    parse_vm_stat,
)
from edge.backends.gguf_meta import read_metadata, trained_context
from edge.errors import ConfigError, InvalidModelError
from edge.model_ref import resolve_model

SMOLLM2_KV_PER_TOKEN = 30 * 3 * (64 + 64) * 2  # layers x KV heads x (K + V head size) x f16


def _one_line_error(r, *needles):
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# -- GGUF header -------------------------------------------------------------------------------
def test_header_reader_gives_the_metadata_without_the_vocabulary(smollm2):
    meta = read_metadata(smollm2)
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 30
    assert trained_context(meta) == 8192 and meta["llama.attention.head_count_kv"] == 3
    assert meta["tokenizer.chat_template"].startswith("{%")
    assert "tokenizer.ggml.tokens" not in meta and "tokenizer.ggml.merges" not in meta  # long arrays skipped
    assert trained_context(read_metadata(resolve_model(None))) == 1024  # the bundled tiny-r1 (qwen2)


def test_header_reader_refuses_truncated_and_foreign_files(tmp_path, smollm2):
    cut = tmp_path / "cut.gguf"
    with open(smollm2, "rb") as f:
        cut.write_bytes(f.read(200_000))  # inside the vocabulary
    with pytest.raises(InvalidModelError, match="truncated"):
        read_metadata(cut)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model at all, not at all" * 4)
    with pytest.raises(InvalidModelError, match="not a GGUF file"):
        read_metadata(junk)


# -- the estimate ------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["smollm2", "tiny-r1"])
def test_kv_estimate_is_llama_cpps_own_kv_size(which, smollm2, caplog):
    from edge.backends.llamacpp import LlamaCppBackend

    path = smollm2 if which == "smollm2" else resolve_model(None)
    caplog.set_level(logging.DEBUG, logger="llama.cpp")
    with LlamaCppBackend(path, n_ctx=512, threads=1, device="cpu"):
        pass
    sizes = [float(m.group(1)) for r in caplog.records if (m := re.search(r"llama_kv_cache: size =\s*([\d.]+) MiB", r.getMessage()))]
    assert sizes, "llama.cpp did not report its KV cache size"
    est = estimate_memory(read_metadata(path), 512, path.stat().st_size)
    assert est.kv_cache / 2**20 == pytest.approx(sizes[0], abs=0.01)
    if which == "smollm2":
        assert est.kv_per_token == SMOLLM2_KV_PER_TOKEN


@pytest.mark.parametrize("kv", ["q8_0", "q4_0"])
def test_quantized_kv_estimate_is_llama_cpps_own_kv_size(kv, smollm2, caplog):
    from edge.backends.llamacpp import LlamaCppBackend

    caplog.set_level(logging.DEBUG, logger="llama.cpp")
    with LlamaCppBackend(smollm2, n_ctx=512, threads=1, device="cpu", kv_cache=kv) as b:
        assert b.info.extra["kv_cache"] == kv and b.info.extra["flash_attn"] is True
    text = "\n".join(r.getMessage() for r in caplog.records)
    kv_mib = float(re.search(r"llama_kv_cache: size =\s*([\d.]+) MiB", text).group(1))
    assert f"K ({kv})" in text and f"V ({kv})" in text  # llama.cpp got the type asked for
    meta = read_metadata(smollm2)
    est = estimate_memory(meta, 512, smollm2.stat().st_size, kv_cache=kv)
    assert est.kv_cache / 2**20 == pytest.approx(kv_mib, abs=0.01)
    assert est.kv_per_token == {"q8_0": 30 * 2 * 6 * 34, "q4_0": 30 * 2 * 6 * 18}[kv]  # 192-element rows: 6 blocks


def test_attention_scores_estimate_is_near_llama_cpps_compute_buffer(smollm2, caplog):
    from edge.backends.context import compute_bytes
    from edge.backends.llamacpp import LlamaCppBackend

    # without flash attention, at 8192 the scores of a 512-token batch (160 MiB) outgrow
    # everything else llama.cpp reserves (the logits of a whole batch: 96 MiB)
    caplog.set_level(logging.DEBUG, logger="llama.cpp")
    with LlamaCppBackend(smollm2, n_ctx=8192, threads=1, device="cpu", flash_attn=False):
        pass
    text = "\n".join(r.getMessage() for r in caplog.records)
    reserved = float(re.search(r"CPU compute buffer size =\s*([\d.]+) MiB", text).group(1))
    meta = read_metadata(smollm2)
    assert compute_bytes(meta, 8192, n_ubatch=512, flash_attn=False) / 2**20 == pytest.approx(reserved, rel=0.1)
    assert compute_bytes(meta, 8192, n_ubatch=512, flash_attn=True) < reserved * 2**20 / 5  # no scores with flash attention


def test_quantized_kv_bytes_count_whole_blocks():
    base = {"general.architecture": "x", "x.block_count": 4, "x.embedding_length": 256, "x.attention.head_count": 8}
    assert kv_bytes_per_token(base, "f16") == kv_bytes_per_token(base) == 4 * 2 * 256 * 2
    assert kv_bytes_per_token(base, "q8_0") == 4 * 2 * (256 // 32) * 34  # 8.5 bits per element
    assert kv_bytes_per_token(base, "q4_0") == 4 * 2 * (256 // 32) * 18  # 4.5 bits per element
    odd = {**base, "x.attention.head_count_kv": 1, "x.attention.key_length": 40, "x.attention.value_length": 40}
    assert kv_bytes_per_token(odd, "q8_0") == 4 * 2 * 2 * 34  # a 40-element row takes two blocks
    with pytest.raises(ConfigError, match="unknown KV cache type 'q5_1'; choose one of: f16, q8_0, q4_0"):
        kv_bytes_per_token(base, "q5_1")


def test_repacked_weights_follow_the_cpu_and_the_tensor_types():
    from edge.backends.context import repack_rules, repacked_bytes
    from edge.backends.gguf_meta import TensorInfo

    x86 = "CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | OPENMP = 1 | REPACK = 1 | "
    assert set(repack_rules(x86)) == {"Q4_0", "Q4_K", "IQ4_NL", "MXFP4"}
    assert repack_rules(x86.replace("REPACK = 1", "REPACK = 0")) == {} and repack_rules("CPU : SSE3 = 1 | REPACK = 1") == {}
    assert "Q6_K" in repack_rules("CPU : NEON = 1 | ARM_FMA = 1 | DOTPROD = 1 | REPACK = 1 |")
    q4k, q6k = 12, 14  # ggml type ids
    tensors = [TensorInfo("token_embd.weight", q4k, (256, 1000)),  # read by row lookup: not repacked
               TensorInfo("blk.0.attn_q.weight", q4k, (256, 256)),
               TensorInfo("blk.0.ffn_down.weight", q6k, (256, 256)),  # Q6_K: repacked on ARM only
               TensorInfo("blk.0.attn_k.weight", q4k, (256, 12)),  # 12 rows: not a multiple of 8
               TensorInfo("blk.0.attn_norm.weight", 0, (256,))]
    q4k_bytes = 256 * 256 // 256 * 144
    assert tensors[1].n_bytes == q4k_bytes
    assert repacked_bytes(tensors, repack_rules(x86)) == q4k_bytes
    assert repacked_bytes(tensors, {}) == 0


def test_auto_context_is_the_largest_that_fits_less_the_margin():
    from edge.backends.context import MemoryEstimate, auto_context, auto_margin

    def at(n):  # 1 GiB of weights, 1 MiB per token, compute growing with the context
        return MemoryEstimate(n_ctx=n, weights=GiB, kv_cache=n * 2**20, kv_per_token=2**20, compute=n * 2**10)

    assert auto_margin(100 * GiB) == 10 * GiB and auto_margin(GiB) == 256 * 2**20
    assert auto_context(at, None, 8192).n_ctx == 8192  # memory unknown: the trained length
    assert auto_context(at, 100 * GiB, 8192).n_ctx == 8192  # room to spare: capped at the trained length
    assert auto_context(at, 100 * GiB, 0).n_ctx == 4096  # trained length unknown: 4096 at most
    est = auto_context(at, 4 * GiB, 32768)
    budget = 4 * GiB - auto_margin(4 * GiB)
    assert est.n_ctx % 256 == 0 and est.total <= budget < at(est.n_ctx + 256).total
    with pytest.raises(ConfigError, match=r"--ctx auto: not even 256 tokens fit: they need ~1\.3 GiB .*, 1\.2 GiB available less a 0\.25 GiB margin"):
        auto_context(at, int(1.2 * GiB), 32768)


def test_kv_per_token_from_other_shapes():
    base = {"general.architecture": "x", "x.block_count": 4, "x.embedding_length": 256, "x.attention.head_count": 8}
    assert kv_bytes_per_token(base) == 4 * 8 * (32 + 32) * 2  # no head_count_kv: multi-head attention
    assert kv_bytes_per_token({**base, "x.attention.head_count_kv": (2, 2, 4, 0)}) == (2 + 2 + 4 + 0) * 64 * 2  # per layer
    assert kv_bytes_per_token({**base, "x.attention.head_count_kv": 2, "x.attention.key_length": 128,
                               "x.attention.value_length": 64}) == 4 * 2 * (128 + 64) * 2
    assert kv_bytes_per_token({**base, "x.attention.kv_lora_rank": 512, "x.rope.dimension_count": 64}) == 4 * 576 * 2  # MLA
    assert kv_bytes_per_token({"general.architecture": "mamba", "mamba.block_count": 4}) == 0  # no attention: unknown


def test_memory_refusal_says_what_is_needed_and_what_fits():
    meta = {"general.architecture": "llama", "llama.block_count": 30, "llama.embedding_length": 576,
            "llama.attention.head_count": 9, "llama.attention.head_count_kv": 3}
    est = estimate_memory(meta, 1_000_000_000, 100 * 2**20)
    assert est.kv_cache == 1_000_000_000 * SMOLLM2_KV_PER_TOKEN and est.total == est.kv_cache + est.weights
    with pytest.raises(ConfigError, match=r"needs ~21457\.8 GiB \(weights 0\.10 \+ KV cache f16 21457\.7 GiB\), 16\.0 GiB available; "
                                          r"at most about \d+ tokens fit; use a smaller --ctx \(the model was trained for 8192\) or --kv-cache q8_0") as info:
        check_memory(est, 16 * GiB, 8192)
    assert info.value.param == "n_ctx"
    fits = est.max_ctx(16 * GiB)
    check_memory(estimate_memory(meta, fits, 100 * 2**20), 16 * GiB)  # the figure it gives does fit
    check_memory(est, None)  # unknown: no refusal
    with pytest.raises(ConfigError, match="weights alone do not fit"):
        check_memory(estimate_memory(meta, 4096, 8 * GiB), 4 * GiB)


def test_available_memory_parsers():
    assert parse_meminfo("MemTotal:       24000000 kB\nMemFree:  1000 kB\nMemAvailable:   20000000 kB\n") == 20000000 * 1024
    assert parse_meminfo("MemTotal: 1 kB\n") is None
    assert parse_cgroup_memory("8589934592\n", "1073741824\n") == 7 * GiB
    assert parse_cgroup_memory("max\n", "1073741824\n") is None
    vm = ("Mach Virtual Memory Statistics: (page size of 16384 bytes)\nPages free:  100000.\nPages active: 5.\n"
          "Pages inactive:  50000.\nPages speculative:  2000.\nPages purgeable:  1000.\n")
    assert parse_vm_stat(vm) == (100000 + 50000 + 2000 + 1000) * 16384
    avail = context.available_memory()
    assert avail is None or 0 < avail < 2**50


# -- the backend refuses before allocating -------------------------------------------------------
def test_backend_refuses_before_allocating(smollm2, monkeypatch):
    import llama_cpp

    from edge.backends.llamacpp import LlamaCppBackend

    monkeypatch.setattr(llama_cpp, "Llama", lambda *a, **k: pytest.fail("llama.cpp was asked to allocate"))
    monkeypatch.setattr(context, "available_memory", lambda: 2 * GiB)
    with pytest.raises(ConfigError, match=r"a context of 200000 tokens needs ~8\.3 GiB \(weights 0\.09 \+ KV cache f16 4\.3 \+ compute 3\.8 \+ runtime 0\.09 GiB\), "
                                          r"2\.0 GiB available; at most about 44288 tokens fit; .* or --kv-cache q8_0"):
        LlamaCppBackend(smollm2, n_ctx=200_000, threads=1, device="cpu", ctx_beyond_training=True)
    with pytest.raises(ConfigError, match=r"beyond the 8192 this model was trained for .* --ctx-beyond-training"):
        LlamaCppBackend(smollm2, n_ctx=8193, threads=1, device="cpu")


def test_ctx_auto_loads_the_largest_context_that_fits(smollm2, monkeypatch, caplog):
    from edge.backends.context import auto_margin
    from edge.params import SamplingParams
    from edge.runtime import Runtime

    caplog.set_level(logging.INFO, logger="edge.backends.context")
    with Runtime(str(smollm2), n_ctx="auto", threads=1, device="cpu") as rt:  # plenty of memory here: the trained length
        assert rt.backend.n_ctx == 8192 and rt.backend.info.extra["ctx_source"] == "auto"
    caplog.clear()
    # SmolLM2 at 8192 needs ~0.52 GiB with an f16 cache, ~0.29 GiB with q8_0
    for kv, available in (("f16", 700 * 2**20), ("q8_0", 500 * 2**20)):
        monkeypatch.setattr(context, "available_memory", lambda: available)
        with Runtime(str(smollm2), n_ctx="auto", threads=1, device="cpu", kv_cache=kv) as rt:
            b = rt.backend
            assert b.n_ctx % 256 == 0 and b.info.extra["memory_estimate_bytes"] <= available - auto_margin(available)
            assert rt.ask("Say hi.", SamplingParams(temperature=0, max_tokens=4)).stats.completion_tokens >= 1
            n_ctx = b.n_ctx
        lines = [r.getMessage() for r in caplog.records if r.name == "edge.backends.context"]
        assert len(lines) == 1 and n_ctx < 8192
        assert lines[0].startswith(f"--ctx auto: {n_ctx} tokens (the most that fits {available / GiB:.2f} GiB available less a 0.25 GiB margin)")
        assert f"KV cache {kv}" in lines[0] and ("with flash attention" in lines[0]) == (kv != "f16")
        caplog.clear()


def test_quantized_kv_cache_decodes_like_f16(smollm2):
    from edge.backends.llamacpp import LlamaCppBackend

    text = ("The harbour town woke slowly. Fishing boats came in with the tide, gulls circled the market, and the baker "
            "on the corner opened his shutters to the smell of warm bread. Children ran along the sea wall counting ships.")
    top1 = {}
    for kv in ("f16", "q8_0", "q4_0"):
        with LlamaCppBackend(smollm2, n_ctx=512, threads=1, device="cpu", kv_cache=kv, flash_attn=True) as b:
            ids = b.tokenize(text, add_bos=True)
            top1[kv] = b.score(ids).argmax(axis=1)
    for kv in ("q8_0", "q4_0"):
        agree = float((top1[kv] == top1["f16"]).mean())
        assert agree >= 0.9, (kv, agree)  # a wrong type id or layout would give noise


def test_quantized_kv_cache_without_flash_attention_is_refused(smollm2, monkeypatch):
    import llama_cpp

    from edge.backends.llamacpp import LlamaCppBackend

    monkeypatch.setattr(llama_cpp, "Llama", lambda *a, **k: pytest.fail("llama.cpp was asked to allocate"))
    with pytest.raises(ConfigError, match=r"a q4_0 KV cache needs flash attention .*use --kv-cache f16"):
        LlamaCppBackend(smollm2, n_ctx=512, threads=1, device="cpu", kv_cache="q4_0", flash_attn=False)
    with pytest.raises(ConfigError, match=r"unknown KV cache type 'q5'"):
        LlamaCppBackend(smollm2, n_ctx=512, threads=1, device="cpu", kv_cache="q5")
    for bad in ("big", "-3", 3.5, True):
        with pytest.raises(ConfigError, match=r"--ctx takes a number of tokens or 'auto'"):
            LlamaCppBackend(smollm2, n_ctx=bad, threads=1, device="cpu")


def test_beyond_training_when_asked_for_is_one_warning(smollm2, caplog):
    from edge.runtime import Runtime

    caplog.set_level(logging.WARNING)
    with Runtime(str(smollm2), n_ctx=8448, threads=1, device="cpu", ctx_beyond_training=True) as rt:
        assert rt.backend.n_ctx == 8448
    warnings = [r.getMessage() for r in caplog.records if r.name == "edge.backends.context"]
    assert len(warnings) == 1 and "beyond the 8192" in warnings[0]


# -- the command line ----------------------------------------------------------------------------
def test_cli_huge_ctx_is_refused_at_once_with_the_estimate(cli, smollm2):
    for extra in ((), ("--ctx-beyond-training",)):
        t0 = time.monotonic()
        r = cli("run", "hi", "-m", str(smollm2), "--threads", "1", "--ctx", "1000000000", *extra)
        elapsed = time.monotonic() - t0
        _one_line_error(r, "a context of 1000000000 tokens needs ~", "KV cache f16 21457.7 + compute", "GiB available", "use a smaller --ctx")
        assert elapsed < 20  # was 60-80 s and ~20 GB before llama.cpp gave up


def test_cli_ctx_beyond_training_needs_the_flag(cli, smollm2):
    line = _one_line_error(cli("run", "hi", "-m", str(smollm2), "--threads", "1", "--ctx", "100000"), "beyond the 8192", "--ctx-beyond-training")
    assert "--ctx 8192 or less" in line
    assert "--ctx-beyond-training" in cli("run", "--help").stdout


def test_cli_ctx_auto_and_kv_cache_print_the_estimate_once_and_report_them(cli, smollm2):
    import json

    r = cli("run", "Say hi.", "-m", str(smollm2), "--threads", "1", "--max-tokens", "4", "--temp", "0", "--json",
            "--ctx", "auto", "--kv-cache", "q8_0")
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("--ctx auto: 8192 tokens (the model's trained length; "), r.stderr
    assert "KV cache q8_0 with flash attention" in lines[0] and "needs ~" in lines[0]
    backend = json.loads(r.stdout)["stats"]["backend"]
    assert backend["n_ctx"] == 8192
    assert {k: backend["extra"][k] for k in ("kv_cache", "flash_attn", "ctx_source")} == {"kv_cache": "q8_0", "flash_attn": True, "ctx_source": "auto"}
    plain = cli("run", "Say hi.", "-m", str(smollm2), "--threads", "1", "--max-tokens", "2", "--temp", "0", "--ctx", "512")
    assert plain.returncode == 0 and "needs ~" not in plain.stderr  # no estimate line unless asked for


def test_cli_flash_attn_reaches_the_backend(cli, smollm2):
    import json

    for flag, want in (("--flash-attn", True), ("--no-flash-attn", False), (None, False)):
        r = cli("run", "Say hi.", "-m", str(smollm2), "--threads", "1", "--max-tokens", "2", "--temp", "0", "--json",
                "--ctx", "512", *([flag] if flag else []))
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["stats"]["backend"]["extra"]["flash_attn"] is want, flag


@pytest.mark.parametrize("args,needle", [
    (("--kv-cache", "q5"), "unknown KV cache type 'q5'; choose one of: f16, q8_0, q4_0"),
    (("--ctx", "big"), "--ctx takes a number of tokens or 'auto', got 'big'"),
    (("--ctx", "auto", "--backend", "onnx"), "--kv-cache and --ctx auto apply to --backend llamacpp only"),
    (("--kv-cache", "q4_0", "--backend", "onnx"), "--kv-cache and --ctx auto apply to --backend llamacpp only"),
    (("--flash-attn", "--backend", "onnx"), "--flash-attn applies to --backend llamacpp only"),
    (("--no-flash-attn", "--kv-cache", "q8_0"), "a q8_0 KV cache needs flash attention"),
])
def test_cli_bad_kv_cache_or_ctx_is_one_line(cli, smollm2, args, needle):
    _one_line_error(cli("run", "hi", "-m", str(smollm2), "--threads", "1", *args), needle)
