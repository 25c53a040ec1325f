"""How many CPU threads to use by default: the machine's performance cores.

Token-by-token decoding is limited by the slowest thread of each step, so it runs best on one
thread per *fast physical* core: SMT siblings share a core's arithmetic units and only add
synchronisation, and a slow efficiency core holds every step back. Prompt processing (batches)
scales with every physical core. llama-cpp-python's own default is ``cpu_count() // 2``, which
halves the speed on machines with one thread per core (most VMs, phones, Apple Silicon).

- x86: physical cores (distinct package/core ids) of the CPUs this process may run on; on hybrid
  Intel parts only the P-cores (``/sys/devices/cpu_core/cpus``).
- Apple Silicon: ``hw.perflevel0.physicalcpu`` (the performance cores).
- big.LITTLE phones and ARM laptops: cores are grouped by ``cpu_capacity`` (else the cpufreq
  maximum); walking down from the fastest group, the fast set ends at the first group slower than
  0.8x the one above it. A Snapdragon 865 (1 x 2.84 GHz + 3 x 2.42 GHz + 4 x 1.80 GHz) gets 4
  threads, the prime and big cores, not the single fastest core; a homogeneous desktop whose turbo
  favours two cores slightly (5.0 vs 4.8 GHz) keeps all of them.
- A cgroup CPU quota (containers) caps both counts.

Everything is read from text (``/proc/cpuinfo``, sysfs, ``sysctl``) by pure functions, so the
detection is tested on captured files from other machines.
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from edge.errors import ConfigError

FAST_RATIO = 0.8  # a core group slower than this fraction of the one above it is "efficiency"


@dataclass(frozen=True)
class CpuThreads:
    """Default thread counts and how they were found (shown in ``--help`` and in stats)."""

    decode: int
    batch: int
    logical: int
    source: str
    groups: tuple[int, ...] = field(default=())  # physical cores per speed group, fastest first

    def describe(self) -> str:
        return f"{self.decode} performance cores ({self.source}); batches use {self.batch}"


def parse_cpu_list(text: str | None) -> set[int]:
    """``"0-3,6,8-9"`` -> {0, 1, 2, 3, 6, 8, 9} (the kernel's cpulist format)."""
    out: set[int] = set()
    for part in (text or "").strip().split(","):
        part = part.strip()
        if not part:
            continue
        a, _, b = part.partition("-")
        try:
            lo, hi = int(a), int(b or a)
        except ValueError:
            continue
        out.update(range(lo, hi + 1))
    return out


def parse_cpuinfo_cores(text: str) -> dict[int, tuple[int, int]]:
    """Logical CPU -> (package, core) from ``/proc/cpuinfo``; ARM lists no core ids (no SMT), so
    each processor is its own core there."""
    cores: dict[int, tuple[int, int]] = {}
    for block in text.split("\n\n"):
        kv: dict[str, str] = {}
        for line in block.splitlines():
            k, sep, v = line.partition(":")
            if sep:
                kv[k.strip()] = v.strip()
        if "processor" not in kv or not kv["processor"].isdigit():
            continue
        cpu = int(kv["processor"])
        try:
            cores[cpu] = (int(kv.get("physical id", 0)), int(kv["core id"]))
        except (KeyError, ValueError):
            cores[cpu] = (0, cpu)
    return cores


def parse_cgroup_quota(text: str | None) -> float | None:
    """CPUs granted by a cgroup v2 ``cpu.max`` ("200000 100000" -> 2.0; "max 100000" -> None)."""
    parts = (text or "").split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = int(parts[0]), int(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def speed_groups(speed: Mapping[int, int]) -> list[set[int]]:
    """Logical CPUs grouped by equal speed value, fastest first."""
    by: dict[int, set[int]] = {}
    for cpu, v in speed.items():
        by.setdefault(v, set()).add(cpu)
    return [by[v] for v in sorted(by, reverse=True)]


def fast_cpus(speed: Mapping[int, int]) -> set[int]:
    """The logical CPUs of the fast groups: from the fastest group down, stop at the first group
    slower than ``FAST_RATIO`` x the group above it."""
    values = sorted(set(speed.values()), reverse=True)
    if not values:
        return set()
    keep = [values[0]]
    for v in values[1:]:
        if v < FAST_RATIO * keep[-1]:
            break
        keep.append(v)
    return {c for c, v in speed.items() if v >= keep[-1]}


def threads_from_linux(
    cpuinfo: str,
    *,
    allowed: set[int] | None = None,
    capacity: Mapping[int, int] | None = None,
    max_khz: Mapping[int, int] | None = None,
    pcores: set[int] | None = None,
    quota: float | None = None,
) -> CpuThreads:
    """Default threads on Linux/Android from what the kernel shows (all arguments are captured
    text or values, so this runs on fixture files)."""
    cores = parse_cpuinfo_cores(cpuinfo)
    if allowed:
        cores = {c: pc for c, pc in cores.items() if c in allowed} or cores
    logical = len(cores) or (len(allowed) if allowed else 1)
    physical = len(set(cores.values())) or logical
    fast = set(cores)
    source = "physical cores"
    groups: tuple[int, ...] = (physical,)
    for label, speed in (("cpu_capacity", capacity), ("cpufreq max", max_khz)):
        speed = {c: v for c, v in (speed or {}).items() if c in cores and v > 0}
        if len(speed) == len(cores) and len(set(speed.values())) > 1:
            fast = fast_cpus(speed)
            groups = tuple(len({cores[c] for c in g}) for g in speed_groups(speed))
            source = f"fast cores by {label}"
            break
    else:
        if pcores and cores and pcores & set(cores) and not set(cores) <= pcores:
            fast = pcores & set(cores)
            source = "P-cores"
            groups = (len({cores[c] for c in fast}), len({cores[c] for c in set(cores) - fast}))
    decode = len({cores[c] for c in fast}) if cores else physical
    batch = physical
    if quota is not None:
        cap = max(1, math.ceil(quota))
        decode, batch = min(decode, cap), min(batch, cap)
        source += f", cgroup quota {quota:g}"
    return CpuThreads(max(1, decode), max(1, batch), logical, source, groups)


def threads_from_sysctl(text: str) -> CpuThreads:
    """Default threads on macOS from ``sysctl`` output (``name: value`` lines)."""
    kv = {}
    for line in text.splitlines():
        k, sep, v = line.partition(":")
        if sep:
            kv[k.strip()] = v.strip()

    def num(key: str) -> int | None:
        try:
            return int(kv[key])
        except (KeyError, ValueError):
            return None

    physical = num("hw.physicalcpu") or num("hw.ncpu") or 1
    logical = num("hw.logicalcpu") or num("hw.ncpu") or physical
    perf = num("hw.perflevel0.physicalcpu")
    if perf and (num("hw.nperflevels") or 1) > 1:
        eff = num("hw.perflevel1.physicalcpu") or max(0, physical - perf)
        return CpuThreads(perf, physical, logical, "performance cores (hw.perflevel0)", (perf, eff))
    return CpuThreads(physical, physical, logical, "physical cores", (physical,))


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _per_cpu(root: Path, rel: str) -> dict[int, int]:
    out: dict[int, int] = {}
    for d in root.glob("cpu[0-9]*"):
        text = _read(d / rel)
        if text is not None and text.strip().isdigit():
            out[int(d.name[3:])] = int(text.strip())
    return out


def read_linux(root: str | os.PathLike = "/") -> CpuThreads:
    """Read the kernel's files under ``root`` (``/`` on a live machine)."""
    root = Path(root)
    cpu_root = root / "sys/devices/system/cpu"
    try:
        allowed = os.sched_getaffinity(0) if str(root) == "/" else None
    except (AttributeError, OSError):
        allowed = None
    return threads_from_linux(
        _read(root / "proc/cpuinfo") or "",
        allowed=allowed,
        capacity=_per_cpu(cpu_root, "cpu_capacity"),
        max_khz=_per_cpu(cpu_root, "cpufreq/cpuinfo_max_freq"),
        pcores=parse_cpu_list(_read(root / "sys/devices/cpu_core/cpus")) or None,
        quota=parse_cgroup_quota(_read(root / "sys/fs/cgroup/cpu.max")),
    )


_DETECTED: CpuThreads | None = None


def default_threads() -> CpuThreads:
    """This machine's default thread counts (detected once per process)."""
    global _DETECTED
    if _DETECTED is None:
        _DETECTED = _detect()
    return _DETECTED


def check_threads(threads: int | None) -> None:
    """Refuse a thread count below 1 or above this machine's logical CPUs (llama.cpp crashes on
    tens of thousands of threads, and more threads than CPUs only slows every step down)."""
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int):
        raise ConfigError(f"threads must be an integer, got {threads!r}", param="threads")
    if threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}", param="threads")
    auto = default_threads()
    if threads > auto.logical:
        raise ConfigError(
            f"{threads} threads is more than the {auto.logical} logical CPUs this process may use; "
            f"give at most {auto.logical} (the default here is {auto.decode})",
            param="threads",
        )


def _detect() -> CpuThreads:
    system = platform.system()
    try:
        if system == "Linux":
            found = read_linux()
            if found.logical > 0:
                return found
        elif system == "Darwin":
            out = subprocess.run(["sysctl", "hw"], capture_output=True, text=True, timeout=5).stdout
            return threads_from_sysctl(out)
    except (OSError, subprocess.SubprocessError, ValueError):
        pass
    n = os.cpu_count() or 1
    return CpuThreads(n, n, n, "os.cpu_count")
