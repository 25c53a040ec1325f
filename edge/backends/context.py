"""Is a context size sensible for this model on this machine? Checked before anything is allocated.

- Beyond the model's trained length (``<arch>.context_length``) positions are extrapolated and
  the output degrades; it is refused unless asked for explicitly (``--ctx-beyond-training``,
  ``ctx_beyond_training=True``), and then warned about in one line.
- :func:`estimate_memory` gives the bytes a context needs: the weights (the file) plus the KV
  cache (layers x ctx x KV heads x (key + value head size) x bytes per element, from the GGUF
  metadata). Compute buffers are left out, so the figure is a lower bound: a context refused by
  :func:`check_memory` cannot fit, whereas llama.cpp would take a minute and most of the memory
  before failing.
"""

from __future__ import annotations

import logging
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from edge.backends.gguf_meta import arch_value, trained_context
from edge.errors import ConfigError

log = logging.getLogger(__name__)

GiB = 1024**3
KV_BYTES_PER_ELEMENT = 2  # llama.cpp's default KV cache type: f16


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


def kv_bytes_per_token(meta: Mapping[str, Any], bytes_per_element: int = KV_BYTES_PER_ELEMENT) -> int:
    """KV-cache bytes one token of context takes, from GGUF metadata (0 when it cannot be told,
    e.g. a recurrent model with no attention heads)."""
    n_layers = int(arch_value(meta, "block_count", 0) or 0)
    n_embd = int(arch_value(meta, "embedding_length", 0) or 0)
    heads = _per_layer(arch_value(meta, "attention.head_count", 0), n_layers)
    kv_heads = _per_layer(arch_value(meta, "attention.head_count_kv", arch_value(meta, "attention.head_count", 0)), n_layers)
    if not n_layers or not any(heads):
        return 0
    lora_rank = arch_value(meta, "attention.kv_lora_rank")
    if lora_rank:  # multi-head latent attention (DeepSeek-V2/V3): a compressed latent plus the RoPE part per layer
        per_layer = [int(lora_rank) + int(arch_value(meta, "rope.dimension_count", 0) or 0)] * n_layers
    else:
        head = n_embd // max(heads) if n_embd else 0
        k = int(arch_value(meta, "attention.key_length", 0) or head)
        v = int(arch_value(meta, "attention.value_length", 0) or head)
        per_layer = [h * (k + v) for h in kv_heads]
    return sum(per_layer) * bytes_per_element


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a model needs at one context size (weights + KV cache; compute buffers not counted)."""

    n_ctx: int
    weights: int
    kv_cache: int
    kv_per_token: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache

    def max_ctx(self, available: int) -> int:
        """The largest context whose KV cache fits next to the weights in ``available`` bytes."""
        if self.kv_per_token <= 0:
            return 0
        return max(0, (available - self.weights) // self.kv_per_token)


def estimate_memory(meta: Mapping[str, Any], n_ctx: int, weights_bytes: int, *,
                    bytes_per_element: int = KV_BYTES_PER_ELEMENT) -> MemoryEstimate:
    """What a context of ``n_ctx`` tokens needs for the model described by ``meta`` (GGUF
    metadata) whose weights take ``weights_bytes`` (the file size)."""
    per_token = kv_bytes_per_token(meta, bytes_per_element)
    return MemoryEstimate(n_ctx=n_ctx, weights=int(weights_bytes), kv_cache=per_token * n_ctx, kv_per_token=per_token)


def _gib(n: int) -> str:
    g = n / GiB
    return f"{g:.1f}" if g >= 0.95 else f"{g:.2f}"


def check_memory(estimate: MemoryEstimate, available: int | None, trained: int = 0) -> None:
    """Refuse a context whose estimate exceeds the ``available`` bytes (None: unknown, no check);
    ``trained`` (the model's trained length, 0 = unknown) is named in the message when exceeded."""
    if available is None or estimate.total <= available:
        return
    fits = estimate.max_ctx(available)
    if fits < 16:
        hint = "the weights alone do not fit; use a smaller model or a smaller quantization"
    else:
        hint = f"at most about {fits} tokens fit; use a smaller --ctx"
        if 0 < trained < estimate.n_ctx:
            hint += f" (the model was trained for {trained})"
    raise ConfigError(
        f"a context of {estimate.n_ctx} tokens needs ~{_gib(estimate.total)} GiB (KV cache {_gib(estimate.kv_cache)} GiB "
        f"+ weights {_gib(estimate.weights)} GiB), {_gib(available)} GiB available; {hint}",
        param="n_ctx",
    )


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


def check_context(meta: Mapping[str, Any], n_ctx: int, weights_bytes: int, *, beyond_training: bool = False,
                  check_host_memory: bool = True) -> MemoryEstimate:
    """Both checks for a GGUF model before it is loaded (memory first: a context that cannot fit
    is refused whatever the flag); returns the estimate."""
    estimate = estimate_memory(meta, n_ctx, weights_bytes)
    trained = trained_context(dict(meta))
    if check_host_memory:
        check_memory(estimate, available_memory(), trained)
    check_trained_length(n_ctx, trained, beyond_training=beyond_training)
    log.debug("context of %d tokens: ~%s GiB (KV cache %s GiB)", n_ctx, _gib(estimate.total), _gib(estimate.kv_cache))
    return estimate
