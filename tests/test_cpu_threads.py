"""Default thread counts: performance cores, detected from captured kernel files of other machines."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.backends import cpu

FIX = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize(
    "machine,decode,batch,logical,source",
    [
        ("x86-laptop-smt", 4, 4, 8, "physical cores"),  # i7-1165G7: SMT siblings are not cores
        ("vm-2vcpu", 2, 2, 2, "physical cores"),  # one thread per core: all of them (llama-cpp-python picks 1)
        ("snapdragon865", 4, 8, 8, "fast cores by cpufreq max"),  # prime + big, not the A55s
        ("intel-hybrid", 4, 12, 16, "P-cores"),  # i7-1260P: 4 P-cores; batches on all 12 cores
        ("desktop-tbm3-quota", 3, 3, 8, "fast cores by cpufreq max, cgroup quota 3"),  # 5.1 vs 4.9 GHz is one class
        ("arm-capacity", 4, 8, 8, "fast cores by cpu_capacity"),
    ],
)
def test_detection_on_captured_machines(machine, decode, batch, logical, source):
    found = cpu.read_linux(FIX / "cpu" / machine)
    assert (found.decode, found.batch, found.logical, found.source) == (decode, batch, logical, source)


def test_apple_silicon_uses_the_performance_cores():
    found = cpu.threads_from_sysctl((FIX / "bench" / "sysctl_apple_m2.txt").read_text())
    assert (found.decode, found.batch, found.groups) == (8, 12, (8, 4))
    intel_mac = cpu.threads_from_sysctl("hw.ncpu: 8\nhw.physicalcpu: 4\nhw.logicalcpu: 8\n")
    assert (intel_mac.decode, intel_mac.batch) == (4, 4)


def test_fast_set_walks_down_to_the_first_large_drop():
    sd8gen2 = {0: 2016000, 1: 2016000, 2: 2016000, 3: 2803200, 4: 2803200, 5: 2803200, 6: 2803200, 7: 3187200}
    assert cpu.fast_cpus(sd8gen2) == {3, 4, 5, 6, 7}
    assert cpu.fast_cpus({0: 100, 1: 100}) == {0, 1}
    assert cpu.fast_cpus({0: 1000, 1: 500, 2: 250}) == {0}


def test_affinity_and_text_parsing():
    text = (FIX / "bench" / "cpuinfo_x86_laptop.txt").read_text()
    # the process may only run on cpus 0 and 4: one physical core (SMT siblings)
    found = cpu.threads_from_linux(text, allowed={0, 4})
    assert (found.decode, found.batch, found.logical) == (1, 1, 2)
    assert cpu.parse_cpu_list("0-3,6,8-9\n") == {0, 1, 2, 3, 6, 8, 9}
    assert cpu.parse_cgroup_quota("max 100000") is None
    assert cpu.parse_cgroup_quota("150000 100000") == 1.5


def test_this_machine_and_the_backend_report_it(smollm2):
    from edge.backends.llamacpp import LlamaCppBackend

    auto = cpu.default_threads()
    assert 1 <= auto.decode <= auto.batch <= auto.logical
    b = LlamaCppBackend(smollm2, n_ctx=64)
    try:
        assert b.info.threads == auto.decode and b.info.extra["threads_batch"] == auto.batch
        assert b.info.extra["threads_source"] == auto.source
    finally:
        b.close()
    b = LlamaCppBackend(smollm2, n_ctx=64, threads=1)
    try:
        assert (b.info.threads, b.info.extra["threads_batch"], b.info.extra["threads_source"]) == (1, 1, "--threads")
    finally:
        b.close()


def test_check_threads_refuses_more_than_the_logical_cpus(monkeypatch):
    from edge.errors import ConfigError

    monkeypatch.setattr(cpu, "_DETECTED", cpu.CpuThreads(4, 8, 16, "test"))
    cpu.check_threads(None)
    cpu.check_threads(16)
    for bad, needle in ((17, "more than the 16 logical CPUs"), (100000, "give at most 16"), (0, ">= 1"), (2.5, "integer")):
        with pytest.raises(ConfigError, match=needle) as info:
            cpu.check_threads(bad)
        assert info.value.param == "threads"
