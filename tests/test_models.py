"""Model references: local paths, the bundled default, and hub files downloaded with
huggingface-hub from a loopback server that speaks the hub's file protocol."""

from __future__ import annotations

import hashlib
import http.server
import os
import threading
from pathlib import Path

import pytest

from edge.errors import ModelNotFoundError
from edge.model_ref import HUB_REF, resolve_model


class HubHandler(http.server.BaseHTTPRequestHandler):
    files: dict[str, Path] = {}
    requests: list[str] = []

    def log_message(self, *args):  # keep test output quiet
        pass

    def _target(self):
        # /{owner}/{repo}/resolve/{revision}/{filename}
        parts = self.path.split("?")[0].strip("/").split("/")
        if len(parts) >= 5 and parts[2] == "resolve":
            return self.files.get(f"{parts[0]}/{parts[1]}:{'/'.join(parts[4:])}")
        return None

    def _not_found(self):
        self.send_response(404)
        self.send_header("X-Error-Code", "EntryNotFound")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _headers(self, path: Path):
        etag = hashlib.sha256(path.name.encode()).hexdigest()
        self.send_response(200)
        self.send_header("Content-Length", str(path.stat().st_size))
        self.send_header("ETag", f'"{etag}"')
        self.send_header("X-Repo-Commit", "0123456789abcdef0123456789abcdef01234567")
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()

    def do_HEAD(self):
        self.requests.append("HEAD " + self.path)
        p = self._target()
        if p is None:
            return self._not_found()
        self._headers(p)

    def do_GET(self):
        self.requests.append("GET " + self.path)
        p = self._target()
        if p is None:
            return self._not_found()
        self._headers(p)
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                self.wfile.write(chunk)


@pytest.fixture
def hub(smollm2):
    HubHandler.files = {"test-org/tiny-gguf:smol.gguf": smollm2}
    HubHandler.requests = []
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HubHandler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_hub_reference_downloads_once_then_runs_from_cache(cli, hub, tmp_path):
    env = {"HF_ENDPOINT": hub, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1"}
    args = ("run", "Say hi.", "-m", "test-org/tiny-gguf:smol.gguf", "--temperature", "0", "--max-tokens", "4")
    r = cli(*args, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    assert any(x.startswith("GET") for x in HubHandler.requests)
    cached = list((tmp_path / "hf").rglob("smol.gguf"))
    assert cached and cached[0].stat().st_size == os.path.getsize(HubHandler.files["test-org/tiny-gguf:smol.gguf"])
    # offline afterwards: the cached file is used, nothing is requested
    HubHandler.requests.clear()
    r = cli(*args, env={**env, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 0, r.stderr
    assert HubHandler.requests == []


def test_missing_hub_file_is_a_clear_error(cli, hub, tmp_path):
    env = {"HF_ENDPOINT": hub, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"}
    r = cli("run", "hi", "-m", "test-org/tiny-gguf:missing.gguf", env=env)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error:") and "missing.gguf" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_offline_without_cache_is_a_clear_error(cli, tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    r = cli("run", "hi", "-m", "test-org/tiny-gguf:smol.gguf", env=env)
    assert r.returncode != 0 and "not in the local cache" in r.stderr and "Traceback" not in r.stderr


def test_reference_forms(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF")
    assert resolve_model(str(f)) == f
    assert HUB_REF.match("owner/repo:file-Q4_K_M.gguf") and not HUB_REF.match("just-a-name.gguf")
    with pytest.raises(ModelNotFoundError):
        resolve_model(str(tmp_path / "absent.gguf"))


def test_an_onnx_folder_selects_the_onnx_backend(tmp_path):
    from edge.convert.onnx import to_onnx
    from edge.params import SamplingParams
    from edge.runtime import Runtime
    from tests.conftest import REPO

    out = to_onnx(REPO / "benchmarks" / "tiny_r1" / "checkpoint", tmp_path / "onnx", weights="fp32")
    with Runtime(str(out), threads=1) as rt:  # no backend named: the folder says ONNX
        assert rt.backend.info.name == "onnx"
        assert rt.ask("a = 3. b = a + 4. What is b?", SamplingParams(temperature=0)).answer.endswith("\\boxed{7}")
