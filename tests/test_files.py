"""edge.files: outputs appear whole or not at all, and an existing output is refused unless forced."""

from __future__ import annotations

import os

import pytest

from edge.errors import OutputExistsError
from edge.files import atomic_dir, atomic_output, atomic_write, refuse_existing


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_a_writer_that_raises_leaves_the_old_file_and_no_part_file(tmp_path):
    out = tmp_path / "records.jsonl"
    out.write_text("old\n")
    with pytest.raises(RuntimeError, match="disk on fire"):
        with atomic_output(out) as tmp:
            with open(tmp, "w") as f:
                f.write("half a rec")
                f.flush()
            raise RuntimeError("disk on fire")
    assert out.read_text() == "old\n"
    assert leftovers(tmp_path) == []


def test_a_writer_that_raises_leaves_no_file_at_all_when_there_was_none(tmp_path):
    out = tmp_path / "new.json"
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(out) as tmp:
            tmp.write_text("{")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_writes_whole_file_flushed_before_the_rename(tmp_path, monkeypatch):
    synced, replaced = [], []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append((str(a), str(b))), real_replace(a, b))[1])
    out = tmp_path / "summary.md"
    assert atomic_write(out, "| a |\n") == out
    assert out.read_text() == "| a |\n" and leftovers(tmp_path) == []
    assert synced and synced[0] == replaced[0][0] and replaced[0][1] == str(out)  # the part file was synced, then renamed
    atomic_write(out, b"\x00\x01")
    assert out.read_bytes() == b"\x00\x01"
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask  # the usual mode, not mkstemp's 0600


def test_atomic_dir_replaces_a_folder_only_when_complete(tmp_path):
    out = tmp_path / "model-onnx"
    out.mkdir()
    (out / "model.onnx").write_text("old")
    with pytest.raises(ValueError):
        with atomic_dir(out) as tmp:
            (tmp / "model.onnx").write_text("new, half")
            raise ValueError
    assert (out / "model.onnx").read_text() == "old" and leftovers(tmp_path) == []
    with atomic_dir(out) as tmp:
        (tmp / "model.onnx").write_text("new")
    assert [p.name for p in out.iterdir()] == ["model.onnx"] and (out / "model.onnx").read_text() == "new"
    assert leftovers(tmp_path) == []


def test_refuse_existing_unless_forced(tmp_path):
    out = tmp_path / "run.json"
    assert refuse_existing(out, force=False) == out  # nothing there: fine
    out.write_text("{}")
    with pytest.raises(OutputExistsError, match="already exists; pass --force") as exc:
        refuse_existing(out, force=False)
    assert isinstance(exc.value, FileExistsError)
    assert refuse_existing(out, force=True) == out
    assert out.read_text() == "{}"  # refusing or allowing never touches the file
    home = refuse_existing("~/surely-not-here-edge-reason.json", force=False)
    assert "~" not in str(home)
