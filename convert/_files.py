"""Output files that appear whole or not at all."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from edge.errors import ConversionError, OutputExistsError


def check_output(out: str | Path, *, force: bool) -> Path:
    """Refuse an existing output (unless ``force``) before any heavy work is done."""
    path = Path(out).expanduser()
    if path.is_dir():
        raise ConversionError(f"{path} is a directory; give a file name such as {path / 'model.gguf'}")
    if path.exists() and not force:
        raise OutputExistsError(f"{path} already exists; pass --force (force=True) to overwrite it")
    if not path.parent.is_dir():
        raise ConversionError(f"{path.parent}: no such directory for the output")
    return path


@contextlib.contextmanager
def temp_path(directory: Path, stem: str, suffix: str = ".part") -> Iterator[Path]:
    """A fresh, hidden path in ``directory``, removed on exit whatever happened."""
    fd, name = tempfile.mkstemp(dir=directory, prefix=f".{stem}.", suffix=suffix)
    os.close(fd)
    path = Path(name)
    try:
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def atomic_output(out: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``out``; move it to ``out`` only if the block succeeds.

    On any error, KeyboardInterrupt included, the temporary file is removed and ``out`` is left
    as it was.
    """
    with temp_path(out.parent, out.name) as tmp:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual mode
        os.replace(tmp, out)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
