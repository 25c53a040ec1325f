"""Is a context size sensible for this model on this machine? Checked before anything is allocated.

- Beyond the model's trained length (``<arch>.context_length``) positions are extrapolated and
  the output degrades; it is refused unless asked for explicitly (``--ctx-beyond-training``,
  ``ctx_beyond_training=True``), and then warned about in one line.
- :func:`estimate_memory` gives the bytes a context needs, from the GGUF header alone:

  - the weights: the file, memory-mapped and read in full at load;
  - the weights llama.cpp's CPU backend copies into an interleaved layout for its matrix
    kernels (``CPU_REPACK``; which types depends on the CPU, see :func:`repacked_bytes`);
  - the KV cache: layers x ctx x KV heads x (key + value head size), in the KV cache type's
    bytes per element including block overhead (f16: 2; q8_0: 34 bytes per 32; q4_0: 18 per 32);
  - the part of llama.cpp's compute buffer a batch of prompt tokens touches (:func:`compute_bytes`);
  - the runtime: Python, numpy, llama.cpp's libraries and its vocabulary.

  Without the optional parts (as for an unknown model or a GPU) it is weights + KV cache, a
  lower bound: a context refused by :func:`check_memory` cannot fit, whereas llama.cpp would
  take a minute and most of the memory before failing.
- :func:`auto_context` is ``--ctx auto``: the largest context whose estimate fits the memory
  available less a margin (:func:`auto_margin`), capped at the trained length.
"""

from __future__ import annotations

import logging
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from edge.backends.gguf_meta import TensorInfo, arch_value, trained_context
from edge.errors import ConfigError

log = logging.getLogger(__name__)

GiB = 1024**3
MiB = 1024**2
RUNTIME_BYTES = 96 * MiB
"""Resident memory of the process besides the model: Python with numpy and edge, llama.cpp's
libraries and its vocabulary (measured 85-90 MiB with Qwen2.5's 152k-token vocabulary)."""


@dataclass(frozen=True)
class KVCacheType:
    """A llama.cpp KV cache element type: its ggml type id (``type_k`` / ``type_v`` of the
    context parameters) and its storage, ``block_bytes`` per ``block_size`` elements."""

    name: str
    ggml_type: int
    block_size: int
    block_bytes: int

    @property
    def quantized(self) -> bool:
        return self.block_size > 1

    def row_bytes(self, n: int) -> int:
        """Bytes of ``n`` elements (a row of the cache is stored in whole blocks)."""
        return -(-n // self.block_size) * self.block_bytes


KV_CACHE_TYPES = {
    "f16": KVCacheType("f16", 1, 1, 2),  # llama.cpp's default
    "q8_0": KVCacheType("q8_0", 8, 32, 34),  # 32 int8 + one f16 scale
    "q4_0": KVCacheType("q4_0", 2, 32, 18),  # 32 4-bit + one f16 scale
}


def kv_cache_type(kind: str | KVCacheType) -> KVCacheType:
    """The :class:`KVCacheType` named ``kind`` (a :class:`~edge.errors.ConfigError` otherwise)."""
    if isinstance(kind, KVCacheType):
        return kind
    found = KV_CACHE_TYPES.get(str(kind).strip().lower())
    if found is None:
        raise ConfigError(f"unknown KV cache type {kind!r}; choose one of: {', '.join(KV_CACHE_TYPES)}", param="kv_cache")
    return found


def check_trained_length(n_ctx: int, trained: int, *, beyond_training: bool = False) -> None:
    """Refuse ``n_ctx`` above ``trained`` (0 = unknown) unless ``beyond_training``; warn then."""
    if trained <= 0 or n_ctx <= trained:
        return
    if not beyond_training:
        raise ConfigError(
            f"a context of {n_ctx} tokens is beyond the {trained} this model was trained for (its output degrades past it); "
            f"use --ctx {trained} or less, or pass --ctx-beyond-training (ctx_beyond_training=True) to use it anyway",
            param="n_ctx",
        )
    log.warning("context of %d tokens is beyond the %d this model was trained for; expect degraded output past %d", n_ctx, trained, trained)


def _per_layer(value: Any, n_layers: int) -> list[int]:
    if isinstance(value, (tuple, list)):
        return [int(v) for v in value[:n_layers]]
    return [int(value or 0)] * n_layers


def kv_bytes_per_token(meta: Mapping[str, Any], kv_cache: str | KVCacheType = "f16") -> int:
    """KV-cache bytes one token of context takes, from GGUF metadata (0 when it cannot be told,
    e.g. a recurrent model with no attention heads)."""
    kind = kv_cache_type(kv_cache)
    n_layers = int(arch_value(meta, "block_count", 0) or 0)
    n_embd = int(arch_value(meta, "embedding_length", 0) or 0)
    heads = _per_layer(arch_value(meta, "attention.head_count", 0), n_layers)
    kv_heads = _per_layer(arch_value(meta, "attention.head_count_kv", arch_value(meta, "attention.head_count", 0)), n_layers)
    if not n_layers or not any(heads):
        return 0
    lora_rank = arch_value(meta, "attention.kv_lora_rank")
    if lora_rank:  # multi-head latent attention (DeepSeek-V2/V3): a compressed latent plus the RoPE part per layer
        rows = [(int(lora_rank) + int(arch_value(meta, "rope.dimension_count", 0) or 0), 0)] * n_layers
    else:
        head = n_embd // max(heads) if n_embd else 0
        k = int(arch_value(meta, "attention.key_length", 0) or head)
        v = int(arch_value(meta, "attention.value_length", 0) or head)
        rows = [(h * k, h * v) for h in kv_heads]
    # one K row and one V row per layer and cell, each stored in whole blocks
    return sum(kind.row_bytes(k) + (kind.row_bytes(v) if v else 0) for k, v in rows if k)


# ggml types llama.cpp's CPU backend repacks for its matrix kernels (ggml-cpu/repack.cpp of the
# pinned llama.cpp), by CPU feature; a matrix qualifies when its row count is a multiple of the
# interleave (8 on x86 and for the K-quants, 4 otherwise)
_REPACK_X86 = {"Q4_0": 8, "Q4_K": 8, "IQ4_NL": 8, "MXFP4": 8}
_REPACK_X86_AVX512 = {"Q2_K": 8}
_REPACK_ARM = {"Q4_0": 4, "Q4_K": 8, "Q5_K": 8, "Q6_K": 8, "IQ4_NL": 4, "MXFP4": 4, "Q8_0": 4}


def repack_rules(system_info: str) -> dict[str, int]:
    """{ggml type name: row multiple} of the weights the CPU backend repacks, from llama.cpp's
    ``llama_print_system_info()`` (``"AVX2 = 1 | ... | REPACK = 1"``)."""
    flags = {part.split("=")[0].strip() for part in system_info.replace("\n", "|").split("|") if part.strip().endswith("= 1")}
    flags = {f.split(":")[-1].strip() for f in flags}
    if "REPACK" not in flags:
        return {}
    if "AVX2" in flags:
        return {**_REPACK_X86, **(_REPACK_X86_AVX512 if "AVX512" in flags else {})}
    if "NEON" in flags and ("DOTPROD" in flags or "MATMUL_INT8" in flags):
        return dict(_REPACK_ARM)
    return {}


def repacked_bytes(tensors: Sequence[TensorInfo], rules: Mapping[str, int]) -> int:
    """Bytes of the weight matrices the CPU backend copies into its repacked layout (the file
    stays mapped too). The token embedding is read by row lookup, never repacked."""
    if not rules:
        return 0
    from gguf import GGMLQuantizationType

    total = 0
    for t in tensors:
        try:
            name = GGMLQuantizationType(t.ggml_type).name
        except ValueError:
            continue
        multiple = rules.get(name)
        if multiple and len(t.shape) == 2 and t.shape[1] % multiple == 0 and not t.name.startswith("token_embd"):
            total += t.n_bytes
    return total


def compute_bytes(meta: Mapping[str, Any], n_ctx: int, *, n_ubatch: int, flash_attn: bool) -> int:
    """The part of llama.cpp's compute buffer a batch of ``n_ubatch`` prompt tokens touches when
    it asks for one row of logits, as generation does: the feed-forward and attention activations
    of the batch and, without flash attention, the attention scores of the batch against the whole
    context (f32, every head, and their mask), reached when the context is full.

    llama.cpp reserves more: room for the logits of every token of a batch (4 x n_vocab bytes per
    token, 297 MiB for Qwen2.5 at 512), touched only by a caller that asks for all of them
    (``score`` of a whole batch, which the generation loop never does)."""
    n_embd = int(arch_value(meta, "embedding_length", 0) or 0)
    heads = arch_value(meta, "attention.head_count", 0)
    n_head = max(heads) if isinstance(heads, (tuple, list)) else int(heads or 0)
    n_ff = arch_value(meta, "feed_forward_length", 0)
    n_ff = max(n_ff) if isinstance(n_ff, (tuple, list)) else int(n_ff or 0)
    activations = 4 * n_ubatch * (3 * n_ff + 4 * n_embd)
    if flash_attn:  # the scores are never materialised
        return activations
    return activations + 4 * n_ubatch * n_ctx * (n_head + 1)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a model needs at one context size: weights, their repacked copy, KV cache, compute
    buffer and runtime (the last three 0 when not estimated)."""

    n_ctx: int
    weights: int
    kv_cache: int
    kv_per_token: int
    kv_type: str = "f16"
    repacked: int = 0
    compute: int = 0
    runtime: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.repacked + self.kv_cache + self.compute + self.runtime

    def max_ctx(self, available: int) -> int:
        """The largest context whose KV cache fits next to the rest in ``available`` bytes (the
        compute buffer taken as it is at this estimate's context)."""
        if self.kv_per_token <= 0:
            return 0
        return max(0, (available - (self.total - self.kv_cache)) // self.kv_per_token)

    def describe(self) -> str:
        """``~3.1 GiB (weights 1.0 + repacked 0.58 + KV cache q8_0 0.46 + compute 0.30 + runtime 0.09 GiB)``"""
        parts = [f"weights {_gib(self.weights)}"]
        if self.repacked:
            parts.append(f"repacked {_gib(self.repacked)}")
        parts.append(f"KV cache {self.kv_type} {_gib(self.kv_cache)}")
        if self.compute:
            parts.append(f"compute {_gib(self.compute)}")
        if self.runtime:
            parts.append(f"runtime {_gib(self.runtime)}")
        return f"~{_gib(self.total)} GiB ({' + '.join(parts)} GiB)"


def estimate_memory(meta: Mapping[str, Any], n_ctx: int, weights_bytes: int, *, kv_cache: str | KVCacheType = "f16",
                    repacked: int = 0, n_ubatch: int = 0, flash_attn: bool = False, runtime: int = 0) -> MemoryEstimate:
    """What a context of ``n_ctx`` tokens needs for the model described by ``meta`` (GGUF
    metadata) whose weights take ``weights_bytes`` (the file size). The compute buffer is
    estimated when ``n_ubatch`` (the batch size) is given."""
    kind = kv_cache_type(kv_cache)
    per_token = kv_bytes_per_token(meta, kind)
    compute = compute_bytes(meta, n_ctx, n_ubatch=n_ubatch, flash_attn=flash_attn) if n_ubatch else 0
    return MemoryEstimate(n_ctx=n_ctx, weights=int(weights_bytes), kv_cache=per_token * n_ctx, kv_per_token=per_token,
                          kv_type=kind.name, repacked=int(repacked), compute=compute, runtime=int(runtime))


def _gib(n: int) -> str:
    g = n / GiB
    return f"{g:.1f}" if g >= 0.95 else f"{g:.2f}"


def check_memory(estimate: MemoryEstimate, available: int | None, trained: int = 0,
                 estimate_at: Callable[[int], MemoryEstimate] | None = None) -> None:
    """Refuse a context whose estimate exceeds the ``available`` bytes (None: unknown, no check);
    ``trained`` (the model's trained length, 0 = unknown) is named in the message when exceeded.
    With ``estimate_at`` (the estimate at any context) the context that fits is searched for."""
    if available is None or estimate.total <= available:
        return
    if estimate_at is None:
        fits = estimate.max_ctx(available)
    else:
        fits = largest_fitting(estimate_at, available, estimate.n_ctx)
    if fits < 16:
        hint = "the weights alone do not fit; use a smaller model or a smaller quantization"
    else:
        hint = f"at most about {fits} tokens fit; use a smaller --ctx"
        if 0 < trained < estimate.n_ctx:
            hint += f" (the model was trained for {trained})"
        if estimate.kv_type == "f16" and estimate.kv_per_token:
            hint += " or --kv-cache q8_0"
    raise ConfigError(
        f"a context of {estimate.n_ctx} tokens needs {estimate.describe()}, {_gib(available)} GiB available; {hint}",
        param="n_ctx",
    )


CTX_STEP = 256  # llama.cpp rounds its KV cache up to 256 cells


def auto_margin(available: int) -> int:
    """Memory ``--ctx auto`` leaves unused: 10% of what is available, at least 256 MiB. The
    estimate itself is close (within 0.5% of the peak RSS of generation on Qwen2.5-1.5B for every
    KV type, benchmarks/results/kv-cache.md); the margin is for what it leaves out (a caller
    asking for the logits of a whole batch: +0.6 GiB there; other programs growing meanwhile), so
    that the kernel need not evict the memory-mapped weights, which are read at every token."""
    return max(256 * MiB, available // 10)


def auto_context(estimate_at: Callable[[int], MemoryEstimate], available: int | None, trained: int) -> MemoryEstimate:
    """``--ctx auto``: the estimate of the largest context (a multiple of 256, at most the
    trained length; 4096 when that is unknown) that fits ``available`` bytes less
    :func:`auto_margin`; with ``available`` unknown, the trained length. Refused when not even
    256 tokens fit."""
    cap = trained if trained > 0 else 4096
    if available is None:
        return estimate_at(cap)
    fits = largest_fitting(estimate_at, available - auto_margin(available), cap)
    if fits < CTX_STEP:
        smallest = estimate_at(CTX_STEP)
        raise ConfigError(
            f"--ctx auto: not even {CTX_STEP} tokens fit: they need {smallest.describe()}, {_gib(available)} GiB available "
            f"less a {_gib(auto_margin(available))} GiB margin; use a smaller model or a smaller quantization",
            param="n_ctx",
        )
    return estimate_at(fits)


def largest_fitting(estimate_at: Callable[[int], MemoryEstimate], budget: int, cap: int) -> int:
    """The largest context up to ``cap`` (``cap`` itself, or a multiple of 256) whose estimate is
    within ``budget`` bytes; 0 when none is. A search, since the compute buffer without flash
    attention grows with the context too."""
    if estimate_at(cap).total <= budget:
        return cap
    lo, hi = 0, cap // CTX_STEP
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimate_at(mid * CTX_STEP).total <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo * CTX_STEP


# -- available memory -------------------------------------------------------------------------
def parse_meminfo(text: str) -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes."""
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1]) * 1024
    return None


def parse_cgroup_memory(limit: str | None, current: str | None) -> int | None:
    """What a cgroup v2 memory limit leaves (``memory.max`` minus ``memory.current``)."""
    if not limit or not current or limit.strip() == "max":
        return None
    try:
        return max(0, int(limit) - int(current))
    except ValueError:
        return None


def parse_vm_stat(text: str) -> int | None:
    """Free + inactive + speculative + purgeable pages of macOS ``vm_stat``, in bytes."""
    page = 4096
    pages = 0
    found = False
    for line in text.splitlines():
        if "page size of" in line:
            words = line.split()
            for i, w in enumerate(words):
                if w == "of" and i + 1 < len(words) and words[i + 1].isdigit():
                    page = int(words[i + 1])
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("Pages free", "Pages inactive", "Pages speculative", "Pages purgeable"):
            value = value.strip().rstrip(".")
            if value.isdigit():
                pages += int(value)
                found = True
    return pages * page if found else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def available_memory() -> int | None:
    """Bytes of memory this process may still use: ``MemAvailable`` (capped by a cgroup limit)
    on Linux, psutil where installed, ``vm_stat`` on macOS; None when unknown."""
    if platform.system() == "Linux":
        avail = parse_meminfo(_read(Path("/proc/meminfo")) or "")
        cgroup = Path("/sys/fs/cgroup")
        left = parse_cgroup_memory(_read(cgroup / "memory.max"), _read(cgroup / "memory.current"))
        if avail is not None:
            return min(avail, left) if left is not None else avail
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        return int(psutil.virtual_memory().available)
    if platform.system() == "Darwin":
        try:
            return parse_vm_stat(subprocess.run(["vm_stat"], capture_output=True, text=True, timeout=5).stdout)
        except (OSError, subprocess.SubprocessError):
            return None
    return None


def check_context(meta: Mapping[str, Any], n_ctx: int | str, weights_bytes: int, *, beyond_training: bool = False,
                  check_host_memory: bool = True, estimate_at: Callable[[int], MemoryEstimate] | None = None,
                  note: str = "") -> MemoryEstimate:
    """Both checks for a GGUF model before it is loaded (memory first: a context that cannot fit
    is refused whatever the flag); returns the estimate. ``n_ctx="auto"`` picks the context
    (:func:`auto_context`) and logs the estimate at INFO in one line, as does a ``note`` (said
    of the KV cache). ``estimate_at(n_ctx)`` gives the full estimate (default: weights + f16 KV
    cache)."""
    estimate_at = estimate_at or (lambda n: estimate_memory(meta, n, weights_bytes))
    trained = trained_context(dict(meta))
    available = available_memory() if check_host_memory else None
    if n_ctx == "auto":
        estimate = auto_context(estimate_at, available, trained)
        if available is None:
            why = "the model's trained length; free memory not checked" if trained else "free memory and trained length unknown"
        elif estimate.n_ctx == trained:
            why = f"the model's trained length; {_gib(available)} GiB available"
        else:
            why = f"the most that fits {_gib(available)} GiB available less a {_gib(auto_margin(available))} GiB margin"
        log.info("--ctx auto: %d tokens (%s)%s; needs %s", estimate.n_ctx, why, note and f", {note}", estimate.describe())
        return estimate
    estimate = estimate_at(int(n_ctx))
    check_memory(estimate, available, trained, estimate_at)
    check_trained_length(int(n_ctx), trained, beyond_training=beyond_training)
    log.log(logging.INFO if note else logging.DEBUG, "context of %d tokens%s; needs %s", estimate.n_ctx, note and f", {note}", estimate.describe())
    return estimate
