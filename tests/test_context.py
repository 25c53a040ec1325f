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
    with pytest.raises(ConfigError, match=r"needs ~21457\.8 GiB \(KV cache 21457\.7 GiB \+ weights 0\.10 GiB\), 16\.0 GiB available; "
                                          r"at most about \d+ tokens fit; use a smaller --ctx \(the model was trained for 8192\)") as info:
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
    with pytest.raises(ConfigError, match=r"a context of 200000 tokens needs ~4\.4 GiB .*, 2\.0 GiB available; at most about 88937 tokens fit"):
        LlamaCppBackend(smollm2, n_ctx=200_000, threads=1, device="cpu", ctx_beyond_training=True)
    with pytest.raises(ConfigError, match=r"beyond the 8192 this model was trained for .* --ctx-beyond-training"):
        LlamaCppBackend(smollm2, n_ctx=8193, threads=1, device="cpu")


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
        _one_line_error(r, "a context of 1000000000 tokens needs ~21457.8 GiB", "GiB available", "use a smaller --ctx")
        assert elapsed < 20  # was 60-80 s and ~20 GB before llama.cpp gave up


def test_cli_ctx_beyond_training_needs_the_flag(cli, smollm2):
    line = _one_line_error(cli("run", "hi", "-m", str(smollm2), "--threads", "1", "--ctx", "100000"), "beyond the 8192", "--ctx-beyond-training")
    assert "--ctx 8192 or less" in line
    assert "--ctx-beyond-training" in cli("run", "--help").stdout
