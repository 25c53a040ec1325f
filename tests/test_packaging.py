"""The built wheel: one import package, the eval data inside it, repository material left out."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    (path,) = out.glob("edge_reason-*.whl")
    return zipfile.ZipFile(path)


def test_wheel_has_one_top_level_package(wheel):
    names = wheel.namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"edge"}
    assert "edge/convert/pipeline.py" in names and "edge/benchmarks/harness.py" in names
    assert "edge/benchmarks/bench/suites.py" in names
    for n in names:
        if n.endswith(".dist-info/top_level.txt"):
            assert wheel.read(n).decode().split() == ["edge"]


def test_wheel_ships_the_eval_data_and_leaves_repository_material_out(wheel):
    names = set(wheel.namelist())
    for f in ("gsm8k", "math500", "aime24", "amc23", "tiny-r1-test", "tiny-r1-val", "tiny-r1-stress"):
        assert f"edge/benchmarks/data/{f}.jsonl" in names
    assert "edge/benchmarks/data/README.md" in names  # sources and licences
    assert "edge/models/tiny-r1-q8_0.gguf" in names
    assert not [n for n in names if "tiny_r1" in n or "/records/" in n or "/results/" in n]


def test_package_list_covers_every_library_folder():
    """Every folder with an __init__.py under edge/, convert/ and benchmarks/ is installed, except
    repository material (tiny-r1 training), so a new subpackage is not silently left out."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    where = {"edge": ROOT / "edge", **{k: ROOT / v for k, v in cfg["package-dir"].items()}}
    found = set()
    for name, folder in where.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder)
            found.add(".".join([name, *rel.parts]))
    assert found - listed == {"edge.benchmarks.tiny_r1"}
    assert listed <= found
