"""Stopping a real `edge-reason convert quantize` with real signals: Ctrl-C and SIGTERM stop it
within about a second and leave nothing; after a kill -9 the next run removes what was left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from convert_fixtures import write_random_llama_gguf
from tests.conftest import REPO

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.skipif(os.name != "posix", reason="POSIX signals and /proc")


@pytest.fixture(scope="module")
def big_f32(tmp_path_factory) -> Path:
    # ~135 MB of f32 weights: q4_k_m takes several seconds on two cores
    return write_random_llama_gguf(tmp_path_factory.mktemp("big") / "big-f32.gguf")


def start_quantize(src: Path, out: Path, quant: str = "q4_k_m") -> subprocess.Popen:
    """The CLI in its own process group, as a shell runs a foreground job."""
    env = {k: v for k, v in os.environ.items() if k != "EDGE_DEBUG"}
    return subprocess.Popen([sys.executable, "-m", "edge.cli.main", "convert", "quantize", str(src), str(out), "-q", quant],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env, start_new_session=True,
                            preexec_fn=_terminal_signals)


def _terminal_signals() -> None:
    # As at a terminal: Ctrl-C is not ignored. A test run started in the background by a
    # non-interactive shell inherits SIGINT ignored, and Python then keeps ignoring it (as
    # nohup intends), which made the Ctrl-C case quantize to the end.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for_quantizing(folder: Path, proc: subprocess.Popen, timeout: float = 60) -> Path:
    """The part file, once llama.cpp has started writing it (the quantizer is inside its C call)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        parts = [p for p in folder.iterdir() if p.name.endswith(".part")]
        if parts and parts[0].stat().st_size > 0:
            return parts[0]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("the quantizer never started writing")


def quantizers_running(marker: str) -> list[int]:
    """PIDs of quantizer child processes whose command line mentions ``marker``."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                cmd = (d / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "_quantize_child" in cmd and marker in cmd:
                pids.append(int(d.name))
    return pids


def gone_within(marker: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while quantizers_running(marker):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 128 + signal.SIGTERM)])
def test_ctrl_c_and_sigterm_stop_a_quantize_at_once_and_leave_nothing(big_f32, tmp_path, sig, code):
    for attempt in range(3):
        out_dir = tmp_path / f"out{attempt}"
        out_dir.mkdir()
        proc = start_quantize(big_f32, out_dir / "m.gguf")
        try:
            wait_for_quantizing(out_dir, proc)
            time.sleep(0.1)
            assert proc.poll() is None, "quantized before the signal: make the test model larger"
            t0 = time.monotonic()
            os.killpg(proc.pid, sig)  # what Ctrl-C does: the signal to the foreground process group
            _, err = proc.communicate(timeout=30)
            stopped = time.monotonic() - t0
        finally:
            if proc.poll() is None:
                proc.kill()
        if proc.returncode == 0 and "wrote" in err:
            continue  # the quantizer finished between the last check and the signal (a loaded machine): again
        break
    assert proc.returncode == code, err
    assert stopped < 1.5, f"took {stopped:.2f} s to stop"
    assert "Traceback" not in err and len([ln for ln in err.splitlines() if ln.strip()]) <= 1, err
    assert list(out_dir.iterdir()) == []  # neither the output nor a part file
    assert gone_within(str(out_dir), 2.0), "the quantizer child outlived the command"


def test_part_files_of_killed_runs_are_removed_by_the_next_run(big_f32, tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = start_quantize(big_f32, out_dir / "m.gguf")
    try:
        part = wait_for_quantizing(out_dir, proc)
        proc.kill()  # kill -9 of the command: nothing of it can clean up
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert part.exists() and f".m.gguf.{proc.pid}-" in part.name  # left behind, with the dead writer's PID
    assert gone_within(str(out_dir), 2.0), "the quantizer child outlived its parent"
    # part files the next run must keep: a live writer's (this test's PID), another output's,
    # and one without a PID (older versions wrote those; whose it is cannot be told)
    keep = [out_dir / f".m.gguf.{os.getpid()}-live.part", out_dir / f".other.gguf.{proc.pid}-x.part", out_dir / ".m.gguf.abc123.part"]
    for p in keep:
        p.write_bytes(b"x")
    r = subprocess.run([sys.executable, "-m", "edge.cli.main", "convert", "quantize", str(big_f32), str(out_dir / "m.gguf"), "-q", "q8_0"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    assert not part.exists()
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(["m.gguf", *(p.name for p in keep)])


def test_stale_part_folders_of_onnx_exports_are_removed_too(tmp_path):
    from edge.files import remove_stale_parts, temp_dir

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".model-onnx.{dead}-abc.part"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "model.onnx.data").write_bytes(b"x" * 10)
    mine = tmp_path / f".model-onnx.{os.getpid()}-def.part"
    mine.mkdir()
    assert remove_stale_parts(tmp_path, "model-onnx") == [stale]
    assert mine.is_dir() and not stale.exists()
    with temp_dir(tmp_path, "model-onnx") as d:
        assert d.name.startswith(f".model-onnx.{os.getpid()}-") and d.name.endswith(".part")
    assert not d.exists()
