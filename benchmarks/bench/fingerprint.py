"""Device fingerprints: which machine a benchmark record came from.

The parsers here are pure functions over text (``/proc/cpuinfo``, ``getprop``, ``sysctl``,
``nvidia-smi`` CSV, ``llama_print_system_info()``), so they are tested on captured files from
devices we do not have. :func:`collect` runs the probes that apply to this machine and feeds
them through the parsers; every probe that fails or does not apply leaves ``None`` rather than
a guess.

Battery state (``/sys/class/power_supply``, ``psutil.sensors_battery``) and energy (Linux RAPL
counters, ``/sys/class/powercap/intel-rapl:N/energy_uj``) live here too: both are properties
of the device that the OS may or may not expose.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

log = logging.getLogger(__name__)

# -- /proc/cpuinfo ---------------------------------------------------------------------------------

# (implementer, part) -> core name, from the ARM and Qualcomm technical reference manuals.
ARM_CORES: dict[tuple[int, int], str] = {
    (0x41, 0xD03): "Cortex-A53", (0x41, 0xD04): "Cortex-A35", (0x41, 0xD05): "Cortex-A55",
    (0x41, 0xD07): "Cortex-A57", (0x41, 0xD08): "Cortex-A72", (0x41, 0xD09): "Cortex-A73",
    (0x41, 0xD0A): "Cortex-A75", (0x41, 0xD0B): "Cortex-A76", (0x41, 0xD0C): "Neoverse-N1",
    (0x41, 0xD0D): "Cortex-A77", (0x41, 0xD0E): "Cortex-A76AE", (0x41, 0xD40): "Neoverse-V1",
    (0x41, 0xD41): "Cortex-A78", (0x41, 0xD42): "Cortex-A78AE", (0x41, 0xD44): "Cortex-X1",
    (0x41, 0xD46): "Cortex-A510", (0x41, 0xD47): "Cortex-A710", (0x41, 0xD48): "Cortex-X2",
    (0x41, 0xD49): "Neoverse-N2", (0x41, 0xD4B): "Cortex-A78C", (0x41, 0xD4D): "Cortex-A715",
    (0x41, 0xD4E): "Cortex-X3", (0x41, 0xD4F): "Neoverse-V2", (0x41, 0xD80): "Cortex-A520",
    (0x41, 0xD81): "Cortex-A720", (0x41, 0xD82): "Cortex-X4", (0x41, 0xD85): "Cortex-X925",
    (0x41, 0xD87): "Cortex-A725",
    (0x51, 0x800): "Kryo 2xx Gold", (0x51, 0x801): "Kryo 2xx Silver", (0x51, 0x802): "Kryo 3xx Gold",
    (0x51, 0x803): "Kryo 3xx Silver", (0x51, 0x804): "Kryo 4xx Gold", (0x51, 0x805): "Kryo 4xx Silver",
}
# Cores designed for efficiency: the LITTLE side of a big.LITTLE SoC.
LITTLE_CORES = frozenset({"Cortex-A53", "Cortex-A35", "Cortex-A55", "Cortex-A510", "Cortex-A520",
                          "Kryo 2xx Silver", "Kryo 3xx Silver", "Kryo 4xx Silver"})


def _kv_lines(text: str, sep: str = ":") -> list[tuple[str, str]]:
    out = []
    for line in text.splitlines():
        if sep not in line:
            continue
        k, _, v = line.partition(sep)
        out.append((k.strip(), v.strip()))
    return out


def _int(text: str | None, base: int = 10) -> int | None:
    if text is None:
        return None
    try:
        return int(str(text).strip(), base)
    except ValueError:
        return None


def parse_cpuinfo(text: str) -> dict[str, Any]:
    """Parse Linux/Android ``/proc/cpuinfo`` (x86 or ARM).

    Returns ``model`` (x86 "model name"; None on most ARM kernels), ``hardware`` (the ARM
    "Hardware" line: the SoC), ``vendor``, ``processors`` (one dict per logical CPU with its
    ARM ``implementer``/``part`` when present), ``flags`` (x86 flags or ARM Features),
    ``logical_cores``, ``physical_cores`` and ``hypervisor`` (x86 "hypervisor" flag)."""
    processors: list[dict[str, Any]] = []
    glob: dict[str, str] = {}
    for block in re.split(r"\n\s*\n", text.strip()):
        fields = dict(_kv_lines(block))
        if "processor" in fields and _int(fields["processor"]) is not None:
            processors.append(fields)
        else:
            glob.update(fields)
    first = processors[0] if processors else {}
    flags = (first.get("flags") or first.get("Features") or glob.get("Features") or "").split()
    procs = []
    for p in processors:
        procs.append({
            "processor": _int(p["processor"]),
            "implementer": _int(p.get("CPU implementer"), 16) if p.get("CPU implementer") else None,
            "part": _int(p.get("CPU part"), 16) if p.get("CPU part") else None,
            "physical_id": _int(p.get("physical id")),
            "core_id": _int(p.get("core id")),
        })
    logical = len(procs) or None
    physical = None
    if procs and all(p["core_id"] is not None for p in procs):
        physical = len({(p["physical_id"], p["core_id"]) for p in procs})
    elif procs:
        physical = logical  # ARM: no SMT, every processor is a core
    model = first.get("model name") or glob.get("model name")
    if model and re.fullmatch(r"(ARMv\d+ Processor.*|AArch64 Processor.*)", model):
        model = None  # the generic ARM line names no chip
    return {
        "model": model,
        "hardware": glob.get("Hardware") or first.get("Hardware"),
        "vendor": first.get("vendor_id") or first.get("CPU implementer"),
        "processors": procs,
        "flags": flags,
        "logical_cores": logical,
        "physical_cores": physical,
        "hypervisor": "hypervisor" in flags,
    }


def arm_core_name(implementer: int | None, part: int | None) -> str | None:
    if implementer is None or part is None:
        return None
    return ARM_CORES.get((implementer, part), f"0x{implementer:02x}:0x{part:03x}")


def core_clusters(processors: Sequence[Mapping[str, Any]], max_khz: Mapping[int, int] | None = None) -> list[dict[str, Any]]:
    """Group ARM cores into clusters by core type (and max frequency when known).

    Each cluster: ``core`` name, ``part``, ``count``, ``cpus``, ``max_mhz`` and ``role``
    (``little`` for efficiency cores; ``big``; ``prime`` for a faster single-core cluster of
    a big type). Sorted fastest first. Empty when the processors carry no ARM part numbers."""
    max_khz = max_khz or {}
    groups: dict[tuple, list[int]] = {}
    for p in processors:
        if p.get("part") is None:
            return []
        key = (p.get("implementer"), p["part"], max_khz.get(p["processor"]))
        groups.setdefault(key, []).append(p["processor"])
    clusters = []
    for (impl, part, khz), cpus in groups.items():
        name = arm_core_name(impl, part)
        clusters.append({
            "core": name,
            "part": f"0x{part:03x}",
            "count": len(cpus),
            "cpus": sorted(cpus),
            "max_mhz": round(khz / 1000) if khz else None,
            "role": "little" if name in LITTLE_CORES else "big",
        })
    clusters.sort(key=lambda c: (c["role"] != "little", c["max_mhz"] or 0, -c["cpus"][0]), reverse=True)
    bigs = [c for c in clusters if c["role"] == "big"]
    if len(bigs) > 1 and bigs[0]["count"] < bigs[1]["count"] and (bigs[0]["max_mhz"] or 0) > (bigs[1]["max_mhz"] or 0):
        bigs[0]["role"] = "prime"
    return clusters


def describe_clusters(clusters: Sequence[Mapping[str, Any]]) -> str:
    """``1x Cortex-X1 + 3x Cortex-A78 + 4x Cortex-A55``."""
    return " + ".join(f"{c['count']}x {c['core']}" for c in clusters)


def parse_meminfo(text: str) -> int | None:
    """Total RAM in bytes from ``/proc/meminfo``."""
    m = re.search(r"^MemTotal:\s+(\d+)\s*kB", text, re.M)
    return int(m[1]) * 1024 if m else None


def parse_os_release(text: str) -> dict[str, str]:
    out = {}
    for k, v in _kv_lines(text, "="):
        out[k] = v.strip().strip('"')
    return out


# -- Android: getprop ------------------------------------------------------------------------------

def parse_getprop(text: str) -> dict[str, str]:
    """``getprop`` output (``[ro.product.model]: [Pixel 7]`` lines) as a dict."""
    return {m[1]: m[2] for m in re.finditer(r"^\[([^\]]+)\]:\s*\[(.*)\]\s*$", text, re.M)}


def android_info(props: Mapping[str, str]) -> dict[str, Any]:
    def get(*keys: str) -> str | None:
        return next((props[k] for k in keys if props.get(k)), None)

    chars = props.get("ro.build.characteristics", "")
    return {
        "product_model": get("ro.product.model", "ro.product.vendor.model"),
        "manufacturer": get("ro.product.manufacturer", "ro.product.vendor.manufacturer", "ro.product.brand"),
        "soc_model": get("ro.soc.model", "ro.board.platform", "ro.hardware.chipname", "ro.hardware"),
        "soc_manufacturer": get("ro.soc.manufacturer"),
        "android_version": get("ro.build.version.release"),
        "sdk": _int(props.get("ro.build.version.sdk")),
        "tablet": "tablet" in chars.split(","),
    }


# -- macOS: sysctl --------------------------------------------------------------------------------

def parse_sysctl(text: str) -> dict[str, str]:
    """``sysctl key key ...`` output (``hw.memsize: 17179869184`` lines) as a dict."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([a-z][\w.]*)\s*[:=]\s*(.*)$", line.strip())
        if m:
            out[m[1]] = m[2].strip()
    return out


SYSCTL_KEYS = ("machdep.cpu.brand_string", "hw.model", "hw.memsize", "hw.ncpu", "hw.physicalcpu", "hw.logicalcpu",
               "hw.nperflevels", "hw.perflevel0.physicalcpu", "hw.perflevel0.name", "hw.perflevel1.physicalcpu",
               "hw.perflevel1.name", "hw.optional.arm64")


def apple_info(s: Mapping[str, str]) -> dict[str, Any]:
    """CPU model, memory and performance/efficiency core split from macOS sysctl values."""
    perf, eff = _int(s.get("hw.perflevel0.physicalcpu")), _int(s.get("hw.perflevel1.physicalcpu"))
    clusters = []
    if perf:
        clusters.append({"core": s.get("hw.perflevel0.name") or "Performance", "count": perf, "role": "big"})
    if eff:
        clusters.append({"core": s.get("hw.perflevel1.name") or "Efficiency", "count": eff, "role": "little"})
    return {
        "cpu_model": s.get("machdep.cpu.brand_string"),
        "hw_model": s.get("hw.model"),
        "memory_bytes": _int(s.get("hw.memsize")),
        "physical_cores": _int(s.get("hw.physicalcpu")),
        "logical_cores": _int(s.get("hw.logicalcpu")) or _int(s.get("hw.ncpu")),
        "apple_silicon": s.get("hw.optional.arm64") == "1" or (s.get("machdep.cpu.brand_string") or "").startswith("Apple"),
        "clusters": clusters,
    }


# -- GPUs and the llama.cpp build -----------------------------------------------------------------

NVIDIA_SMI_QUERY = ["--query-gpu=name,memory.total,driver_version", "--format=csv,noheader,nounits"]


def parse_nvidia_smi(text: str) -> list[dict[str, Any]]:
    """``nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader,nounits``."""
    gpus = []
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 2 or not parts[0]:
            continue
        mib = _int(parts[1].split()[0]) if parts[1] else None
        gpus.append({"name": parts[0], "memory_bytes": mib * 1024 * 1024 if mib else None,
                     "driver": parts[2] if len(parts) > 2 and parts[2] else None, "vendor": "nvidia"})
    return gpus


def parse_system_info(text: str) -> dict[str, dict[str, str]]:
    """``llama_print_system_info()``: ``CPU : SSE3 = 1 | AVX = 1 | ... | CUDA : ARCHS = 890 | ...``
    as ``{"CPU": {"SSE3": "1", ...}, "CUDA": {...}}``."""
    sections: dict[str, dict[str, str]] = {}
    current = ""
    for seg in text.split("|"):
        seg = seg.strip()
        if not seg:
            continue
        m = re.match(r"^([\w .-]+?)\s*:\s*(.*)$", seg)
        if m and "=" not in m[1]:
            current = m[1].strip()
            sections.setdefault(current, {})
            seg = m[2].strip()
            if not seg:
                continue
        k, eq, v = seg.partition("=")
        sections.setdefault(current, {})[k.strip()] = v.strip() if eq else "1"
    return sections


def build_info(system_info: str, offload: bool | None) -> dict[str, Any]:
    sections = parse_system_info(system_info)
    cpu = sections.get("CPU", {})
    accel = [name for name in sections if name not in ("CPU", "")]
    return {
        "system_info": system_info.strip(),
        "cpu_features": sorted(k for k, v in cpu.items() if v == "1"),
        "accelerators": accel,
        "offload_supported": offload,
    }


# -- device class --------------------------------------------------------------------------------

LAPTOP_CHASSIS = {8, 9, 10, 14, 30, 31, 32}  # portable, laptop, notebook, sub notebook, tablet, convertible, detachable
DESKTOP_CHASSIS = {3, 4, 5, 6, 7, 13, 15, 16, 35, 36}
SERVER_CHASSIS = {17, 23, 25, 28, 29}
CLASSES = ("phone", "tablet", "laptop", "desktop", "server", "unknown")


def classify_device(*, system: str, android: bool = False, tablet: bool = False, has_battery: bool | None = None,
                    chassis_type: int | None = None, virtualized: bool = False) -> str:
    """phone / tablet / laptop / desktop / server / unknown, from what the OS tells."""
    if android:
        return "tablet" if tablet else "phone"
    if chassis_type in LAPTOP_CHASSIS:
        return "laptop"
    if chassis_type in SERVER_CHASSIS:
        return "server"
    if has_battery:
        return "laptop"
    if chassis_type in DESKTOP_CHASSIS:
        return "desktop"
    if virtualized:
        return "server"  # a cloud or CI virtual machine
    if system == "Darwin" and has_battery is False:
        return "desktop"
    return "unknown"


def slug(text: str) -> str:
    s = re.sub(r"\((r|tm|c)\)", "", text.lower())
    s = re.sub(r"@[^-]*", " ", s)  # "@ 2.80GHz"
    s = re.sub(r"\b(cpu|processor|with radeon graphics)\b", " ", s)
    s = re.sub(r"[^a-z0-9]+", "-", s).strip("-")
    return re.sub(r"-{2,}", "-", s)[:48] or "device"


# -- battery and energy -------------------------------------------------------------------------

def parse_power_supply(entries: Mapping[str, Mapping[str, str]]) -> dict[str, Any] | None:
    """Battery state from ``/sys/class/power_supply/<name>/<file>`` contents
    (``{"BAT0": {"type": "Battery", "capacity": "87", "status": "Discharging"}, "AC": {...}}``)."""
    bats = {n: e for n, e in entries.items() if e.get("type", "").strip() == "Battery"}
    if not bats:
        return None
    name, bat = sorted(bats.items())[0]
    status = (bat.get("status") or "").strip() or None
    online = [e.get("online", "").strip() == "1" for e in entries.values() if e.get("type", "").strip() in ("Mains", "USB", "USB_PD", "Wireless")]
    plugged = any(online) if online else (status in ("Charging", "Full", "Not charging") if status else None)
    return {"present": True, "percent": _int(bat.get("capacity")), "status": status, "plugged": plugged, "source": f"sysfs:{name}"}


def read_power_supply(root: str | os.PathLike = "/sys/class/power_supply") -> dict[str, Any] | None:
    entries: dict[str, dict[str, str]] = {}
    try:
        for d in Path(root).iterdir():
            entries[d.name] = {f: _read(d / f) or "" for f in ("type", "capacity", "status", "online")}
    except OSError:
        return None
    return parse_power_supply(entries)


def battery() -> dict[str, Any] | None:
    """Battery state now, or None when there is no battery (or the OS does not say)."""
    try:
        import psutil

        b = psutil.sensors_battery()
    except (ImportError, AttributeError, NotImplementedError, OSError):
        b = None
    if b is not None:
        return {"present": True, "percent": round(b.percent), "status": None, "plugged": b.power_plugged, "source": "psutil"}
    if sys.platform.startswith("linux"):
        return read_power_supply()
    return None


RAPL_ROOT = "/sys/class/powercap"


def read_rapl(root: str | os.PathLike = RAPL_ROOT) -> dict[str, tuple[int, int]] | None:
    """Package-level RAPL counters: ``{"intel-rapl:0": (energy_uj, max_energy_range_uj)}``.
    None when there are none or they are unreadable (non-root on Linux >= 5.10)."""
    out = {}
    try:
        dirs = sorted(p for p in Path(root).iterdir() if re.fullmatch(r"intel-rapl:\d+", p.name))
    except OSError:
        return None
    for d in dirs:
        e, r = _int(_read(d / "energy_uj")), _int(_read(d / "max_energy_range_uj"))
        if e is None:
            return None
        out[d.name] = (e, r or 0)
    return out or None


def energy_joules(before: Mapping[str, tuple[int, int]] | None, after: Mapping[str, tuple[int, int]] | None) -> float | None:
    """Energy between two RAPL readings, summed over packages; a counter that wrapped
    around adds its range back."""
    if not before or not after or set(before) != set(after):
        return None
    total = 0
    for k, (e0, rng) in before.items():
        e1 = after[k][0]
        d = e1 - e0
        if d < 0:
            if not rng:
                return None
            d += rng
        total += d
    return total / 1e6


class EnergyMeter:
    """``with EnergyMeter() as m: ...`` then ``m.joules`` (None when the OS does not expose it)."""

    def __init__(self, root: str | os.PathLike = RAPL_ROOT) -> None:
        self.root = root
        self.joules: float | None = None
        self._before = None

    def __enter__(self) -> "EnergyMeter":
        self._before = read_rapl(self.root)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.joules = energy_joules(self._before, read_rapl(self.root)) if self._before else None


def energy_source(root: str | os.PathLike = RAPL_ROOT) -> str | None:
    return "rapl" if read_rapl(root) else None


# -- probes of this machine -----------------------------------------------------------------------

def _read(path: str | os.PathLike) -> str | None:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return None


def _run(cmd: Sequence[str], timeout: float = 5.0) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        r = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout if r.stdout.strip() else None  # sysctl exits 1 on an unknown key but prints the rest


def is_android() -> bool:
    return "ANDROID_ROOT" in os.environ or "com.termux" in os.environ.get("PREFIX", "") or os.path.exists("/system/build.prop")


def _cpufreq_max_khz() -> dict[int, int]:
    out = {}
    for d in Path("/sys/devices/system/cpu").glob("cpu[0-9]*"):
        khz = _int(_read(d / "cpufreq" / "cpuinfo_max_freq"))
        if khz:
            out[int(d.name[3:])] = khz
    return out


def llama_build() -> dict[str, Any]:
    try:
        import llama_cpp
    except ImportError:
        return {"llama_cpp_python": None, **build_info("", None)}
    info = build_info(llama_cpp.llama_print_system_info().decode(errors="replace"), bool(llama_cpp.llama_supports_gpu_offload()))
    from edge.backends.llamacpp import gpu_kind

    info["gpu_kind"] = gpu_kind()
    info["llama_cpp_python"] = getattr(llama_cpp, "__version__", None)
    return info


def _blank(system: str) -> dict[str, Any]:
    return {
        "cpu": {"model": None, "arch": platform.machine(), "physical_cores": None, "logical_cores": None,
                "max_mhz": None, "clusters": [], "flags": []},
        "memory": None, "distro": None, "product": None, "soc": None, "virtualized": False, "chassis": None,
        "android": None, "apple": None,
    }


def _probe_linux(found: dict[str, Any]) -> None:
    """Linux and Android: /proc, /sys, /etc/os-release and (Android) getprop."""
    cpu = found["cpu"]
    text = _read("/proc/cpuinfo")
    if text:
        ci = parse_cpuinfo(text)
        freqs = _cpufreq_max_khz()
        cpu.update(model=ci["model"], physical_cores=ci["physical_cores"], logical_cores=ci["logical_cores"],
                   clusters=core_clusters(ci["processors"], freqs), flags=sorted(f for f in ci["flags"] if f in INTERESTING_FLAGS))
        if freqs:
            cpu["max_mhz"] = round(max(freqs.values()) / 1000)
        found["virtualized"] = ci["hypervisor"]
        if ci["hardware"]:
            found["soc"] = {"model": ci["hardware"], "manufacturer": None}
        if not cpu["model"] and cpu["clusters"]:
            cpu["model"] = describe_clusters(cpu["clusters"])
    found["memory"] = parse_meminfo(_read("/proc/meminfo") or "")
    found["distro"] = parse_os_release(_read("/etc/os-release") or "").get("PRETTY_NAME")
    found["chassis"] = _int(_read("/sys/class/dmi/id/chassis_type"))
    product_name = (_read("/sys/class/dmi/id/product_name") or "").strip()
    if product_name:
        found["product"] = {"model": product_name, "manufacturer": (_read("/sys/class/dmi/id/sys_vendor") or "").strip() or None}
    if is_android():
        a = found["android"] = android_info(parse_getprop(_run(["getprop"]) or ""))
        found["distro"] = f"Android {a['android_version']}" if a["android_version"] else "Android"
        found["product"] = {"model": a["product_model"], "manufacturer": a["manufacturer"]}
        if a["soc_model"]:
            found["soc"] = {"model": a["soc_model"], "manufacturer": a["soc_manufacturer"]}


def _probe_darwin(found: dict[str, Any]) -> None:
    """macOS: sysctl (Apple Silicon performance levels included)."""
    a = found["apple"] = apple_info(parse_sysctl(_run(["sysctl", *SYSCTL_KEYS]) or ""))
    found["cpu"].update(model=a["cpu_model"], physical_cores=a["physical_cores"], logical_cores=a["logical_cores"], clusters=a["clusters"])
    found["memory"] = a["memory_bytes"]
    found["distro"] = f"macOS {platform.mac_ver()[0]}" if platform.mac_ver()[0] else None
    found["product"] = {"model": a["hw_model"], "manufacturer": "Apple"}
    if a["apple_silicon"]:
        found["soc"] = {"model": a["cpu_model"], "manufacturer": "Apple"}


def _probe_psutil(found: dict[str, Any]) -> None:
    """Fill what the OS-specific probes left open (and everything on Windows)."""
    cpu = found["cpu"]
    try:
        import psutil

        cpu["physical_cores"] = cpu["physical_cores"] or psutil.cpu_count(logical=False)
        cpu["logical_cores"] = cpu["logical_cores"] or psutil.cpu_count(logical=True)
        found["memory"] = found["memory"] or int(psutil.virtual_memory().total)
        if cpu["max_mhz"] is None:
            f = psutil.cpu_freq()
            cpu["max_mhz"] = round(f.max) if f and f.max else None
    except (ImportError, AttributeError, NotImplementedError, OSError):
        pass
    cpu["logical_cores"] = cpu["logical_cores"] or os.cpu_count()


def collect(*, name: str | None = None) -> dict[str, Any]:
    """The fingerprint of this machine (see :data:`benchmarks.bench.schema.DEVICE`)."""
    system = platform.system()  # "Android" on Python >= 3.13 under Termux, "Linux" before
    found = _blank(system)
    if system in ("Linux", "Android"):
        _probe_linux(found)
    elif system == "Darwin":
        _probe_darwin(found)
    else:
        found["cpu"]["model"] = platform.processor() or None
        found["distro"] = f"{system} {platform.release()}"
    _probe_psutil(found)
    cpu, android, apple = found["cpu"], found["android"], found["apple"]

    gpus = parse_nvidia_smi(_run(["nvidia-smi", *NVIDIA_SMI_QUERY]) or "")
    if not gpus and apple and apple["apple_silicon"]:
        gpus = [{"name": f"{apple['cpu_model']} GPU", "memory_bytes": None, "driver": None, "vendor": "apple", "unified_memory": True}]
    bat = battery()
    device_class = classify_device(system=system, android=android is not None, tablet=bool(android and android["tablet"]),
                                   has_battery=bat is not None if system in ("Darwin", "Linux", "Windows") else None,
                                   chassis_type=found["chassis"], virtualized=found["virtualized"])
    product = found["product"] or {}
    if android:
        label_src = " ".join(filter(None, (product.get("manufacturer"), product.get("model"))))
    else:
        label_src = (found["soc"] or {}).get("model") if apple else cpu["model"]
    import edge

    return {
        "label": name or slug(f"{label_src or platform.machine()}-{cpu['logical_cores'] or 0}t"),
        "class": device_class,
        "virtualized": found["virtualized"],
        "os": {"system": "Android" if android else system, "release": platform.release(), "version": platform.version(),
               "distro": found["distro"]},
        "cpu": cpu,
        "memory_bytes": found["memory"],
        "product": found["product"],
        "soc": found["soc"],
        "gpus": gpus,
        "battery": bat,
        "energy_source": energy_source(),
        "software": {
            "python": platform.python_version(),
            "implementation": platform.python_implementation(),
            "edge_reason": getattr(edge, "__version__", None),
            # settings that change llama.cpp's speed (thread pools, visible GPUs)
            "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)},
        },
        "backend": {"name": "llamacpp", **llama_build()},
    }


ENV_PREFIXES = ("OMP_", "GOMP_", "KMP_", "GGML_", "LLAMA_", "CUDA_VISIBLE_DEVICES", "EDGE_LLAMA_")

# x86 flags and ARM features that matter for llama.cpp kernels
INTERESTING_FLAGS = frozenset({
    "sse3", "ssse3", "avx", "avx2", "fma", "f16c", "bmi2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
    "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "hypervisor",
    "neon", "asimd", "asimddp", "asimdhp", "sve", "sve2", "i8mm", "bf16", "fphp", "dotprod",
})
