"""Device fingerprint parsers on text captured from devices we do not have."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.benchmarks.bench import fingerprint as fp

FIX = Path(__file__).resolve().parent / "fixtures" / "bench"


def text(name: str) -> str:
    return (FIX / name).read_text()


def test_x86_laptop_cpuinfo():
    ci = fp.parse_cpuinfo(text("cpuinfo_x86_laptop.txt"))
    assert ci["model"] == "11th Gen Intel(R) Core(TM) i7-1165G7 @ 2.80GHz"
    assert ci["vendor"] == "GenuineIntel"
    assert (ci["physical_cores"], ci["logical_cores"]) == (4, 8)  # SMT: two threads per core
    assert {"avx2", "avx512f", "fma"} <= set(ci["flags"])
    assert ci["hypervisor"] is False
    assert fp.core_clusters(ci["processors"]) == []  # no ARM part numbers


def test_arm_phone_cpuinfo_and_big_little_clusters():
    ci = fp.parse_cpuinfo(text("cpuinfo_arm_snapdragon.txt"))
    assert ci["model"] is None  # ARM kernels name no chip in "model name"
    assert ci["hardware"] == "Qualcomm Technologies, Inc SM8250"
    assert (ci["physical_cores"], ci["logical_cores"]) == (8, 8)
    assert "asimddp" in ci["flags"]
    parts = {p["part"] for p in ci["processors"]}
    assert parts == {0xD05, 0xD0D}

    by_type = fp.core_clusters(ci["processors"])
    assert [(c["core"], c["count"], c["role"]) for c in by_type] == [("Cortex-A77", 4, "big"), ("Cortex-A55", 4, "little")]

    # with cpufreq maxima the prime core of a 1+3+4 layout shows up
    khz = {0: 1804800, 1: 1804800, 2: 1804800, 3: 1804800, 4: 2419200, 5: 2419200, 6: 2419200, 7: 2841600}
    clusters = fp.core_clusters(ci["processors"], khz)
    assert [(c["core"], c["count"], c["role"], c["max_mhz"]) for c in clusters] == [
        ("Cortex-A77", 1, "prime", 2842), ("Cortex-A77", 3, "big", 2419), ("Cortex-A55", 4, "little", 1805)]
    assert fp.describe_clusters(clusters) == "1x Cortex-A77 + 3x Cortex-A77 + 4x Cortex-A55"


def test_unknown_arm_part_is_named_by_its_ids():
    assert fp.arm_core_name(0x41, 0xD05) == "Cortex-A55"
    assert fp.arm_core_name(0x61, 0x023) == "0x61:0x023"  # an Apple core under Asahi Linux, say
    assert fp.arm_core_name(None, 0xD05) is None


def test_getprop_android_phone():
    props = fp.parse_getprop(text("getprop_oneplus8t.txt"))
    assert props["ro.product.model"] == "KB2003"
    info = fp.android_info(props)
    assert info == {"product_model": "KB2003", "manufacturer": "OnePlus", "soc_model": "SM8250", "soc_manufacturer": "QTI",
                    "android_version": "13", "sdk": 33, "tablet": False}
    assert fp.classify_device(system="Linux", android=True, tablet=info["tablet"]) == "phone"


def test_getprop_falls_back_to_board_platform():
    info = fp.android_info(fp.parse_getprop("[ro.board.platform]: [mt6983]\n[ro.build.characteristics]: [tablet,nosdcard]\n"))
    assert info["soc_model"] == "mt6983" and info["tablet"] is True


def test_macos_sysctl_apple_silicon():
    info = fp.apple_info(fp.parse_sysctl(text("sysctl_apple_m2.txt")))
    assert info["cpu_model"] == "Apple M2 Pro"
    assert info["memory_bytes"] == 32 * 2**30
    assert info["apple_silicon"] is True
    assert (info["physical_cores"], info["logical_cores"]) == (12, 12)
    assert [(c["core"], c["count"], c["role"]) for c in info["clusters"]] == [("Performance", 8, "big"), ("Efficiency", 4, "little")]


def test_macos_sysctl_intel_mac_has_no_perf_levels():
    info = fp.apple_info(fp.parse_sysctl("machdep.cpu.brand_string: Intel(R) Core(TM) i9-9880H CPU @ 2.30GHz\nhw.memsize: 17179869184\n"))
    assert info["apple_silicon"] is False and info["clusters"] == []


def test_nvidia_smi_csv():
    gpus = fp.parse_nvidia_smi(text("nvidia_smi.csv"))
    assert gpus == [{"name": "NVIDIA GeForce RTX 4070 Laptop GPU", "memory_bytes": 8188 * 2**20, "driver": "551.86", "vendor": "nvidia"}]
    assert len(fp.parse_nvidia_smi("NVIDIA H100 80GB HBM3, 81559, 550.54\nNVIDIA H100 80GB HBM3, 81559, 550.54\n")) == 2
    assert fp.parse_nvidia_smi("") == []


def test_llama_system_info_with_cuda():
    info = fp.build_info(text("llama_system_info_cuda.txt"), True)
    assert info["accelerators"] == ["CUDA"]
    assert {"AVX2", "AVX512", "FMA"} <= set(info["cpu_features"])
    assert fp.parse_system_info(text("llama_system_info_cuda.txt"))["CUDA"]["ARCHS"] == "890"
    cpu_only = fp.build_info("CPU : NEON = 1 | ARM_FMA = 1 | LLAMAFILE = 1 | ", False)
    assert cpu_only["accelerators"] == [] and cpu_only["cpu_features"] == ["ARM_FMA", "LLAMAFILE", "NEON"]


def test_meminfo_and_os_release():
    assert fp.parse_meminfo("MemTotal:       16080512 kB\nMemFree: 1 kB\n") == 16080512 * 1024
    assert fp.parse_meminfo("nothing") is None
    assert fp.parse_os_release('NAME="Ubuntu"\nPRETTY_NAME="Ubuntu 24.04.1 LTS"\n')["PRETTY_NAME"] == "Ubuntu 24.04.1 LTS"


@pytest.mark.parametrize("kw, expected", [
    ({"system": "Linux", "chassis_type": 10}, "laptop"),
    ({"system": "Linux", "has_battery": True}, "laptop"),
    ({"system": "Linux", "chassis_type": 3, "has_battery": False}, "desktop"),
    ({"system": "Linux", "chassis_type": 23}, "server"),
    ({"system": "Linux", "virtualized": True}, "server"),
    ({"system": "Darwin", "has_battery": True}, "laptop"),
    ({"system": "Darwin", "has_battery": False}, "desktop"),
    ({"system": "Linux", "android": True}, "phone"),
    ({"system": "Windows"}, "unknown"),
])
def test_classify_device(kw, expected):
    assert fp.classify_device(**kw) == expected


def test_battery_from_sysfs():
    bat = fp.read_power_supply(FIX / "power_supply")
    assert bat == {"present": True, "percent": 87, "status": "Discharging", "plugged": False, "source": "sysfs:BAT0"}
    assert fp.parse_power_supply({"AC": {"type": "Mains", "online": "1"}}) is None  # a desktop: no battery
    assert fp.read_power_supply(FIX / "does-not-exist") is None


def test_rapl_energy_delta_and_wraparound(tmp_path):
    def write(uj: int) -> None:
        for name, value in (("intel-rapl:0", uj), ("intel-rapl:0:0", 5)):  # sub-domains are not summed
            d = tmp_path / name
            d.mkdir(exist_ok=True)
            (d / "energy_uj").write_text(f"{value}\n")
            (d / "max_energy_range_uj").write_text("262143328850\n")

    write(1_000_000)
    with fp.EnergyMeter(tmp_path) as m:
        write(3_500_000)
    assert m.joules == pytest.approx(2.5)
    assert fp.energy_joules({"intel-rapl:0": (262143328000, 262143328850)}, {"intel-rapl:0": (150, 262143328850)}) == pytest.approx(1000e-6)
    assert fp.energy_joules(None, {"intel-rapl:0": (1, 2)}) is None
    with fp.EnergyMeter(tmp_path / "missing") as m:
        pass
    assert m.joules is None  # unreadable -> null in the record, never a guess


def test_collect_on_this_machine():
    d = fp.collect(name="ci-box")
    assert d["label"] == "ci-box"
    assert d["cpu"]["logical_cores"] >= 1
    assert d["class"] in fp.CLASSES
    assert d["software"]["python"]
    assert d["backend"]["name"] == "llamacpp" and isinstance(d["backend"]["cpu_features"], list)


def test_slug():
    assert fp.slug("Intel(R) Xeon(R) Processor-2t") == "intel-xeon-2t"
    assert fp.slug("11th Gen Intel(R) Core(TM) i7-1165G7 @ 2.80GHz-8t") == "11th-gen-intel-core-i7-1165g7-8t"
    assert fp.slug("OnePlus KB2003-8t") == "oneplus-kb2003-8t"
