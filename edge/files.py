"""Output files that appear whole or not at all, and outputs that are not overwritten by accident.

Every file edge-reason writes for the user (converted models, benchmark records and reports,
evaluation results) goes through :func:`atomic_output` / :func:`atomic_write` (a folder through
:func:`atomic_dir`), and an output given on the command line is checked with
:func:`refuse_existing` before any heavy work.

Work in progress is written to a hidden part file next to the output, ``.NAME.PID-XXXX.part``
(a part folder for a folder), flushed to disk and renamed to NAME only when complete. The part
file goes away whatever happens to the writer:

- an exception, Ctrl-C (SIGINT) or SIGTERM / SIGHUP (turned into :class:`Terminated` while a
  part file exists, when the process had no handler of its own): removed on the way out;
- ``kill -9``, a crash, a power cut: nothing can run then, so the next write to the same
  output removes the part files whose writer (the PID in the name) is no longer alive.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from edge.errors import OutputExistsError

logger = logging.getLogger(__name__)


class Terminated(SystemExit):
    """SIGTERM or SIGHUP arrived while an output was written: unwinds like Ctrl-C (part files removed),
    then exits with 128 + the signal number, as the default action would."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


def refuse_existing(out: str | os.PathLike, *, force: bool, verb: str = "overwrite") -> Path:
    """``out`` as a path; raises :class:`~edge.errors.OutputExistsError` if it exists and
    ``force`` (``--force``) was not given. Called before any heavy work is done."""
    path = Path(out).expanduser()
    if path.exists() and not force:
        raise OutputExistsError(f"{path} already exists; pass --force (force=True) to {verb} it, or choose another output")
    return path


# -- signals -----------------------------------------------------------------------------------
_TERMINATING = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated(signum)


@contextlib.contextmanager
def signals_unwind() -> Iterator[None]:
    """While inside: SIGTERM/SIGHUP raise :class:`Terminated` (so ``finally`` blocks run) instead
    of killing the process on the spot. Only in the main thread, and only for signals still at
    their default action: an application's own handlers are left alone."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {}
    for sig in _TERMINATING:
        if signal.getsignal(sig) is signal.SIG_DFL:
            saved[sig] = signal.signal(sig, _raise_terminated)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


# -- part files ----------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if os.name == "nt":  # os.kill(pid, 0) would terminate the process there
        try:
            import psutil
        except ImportError:
            return True  # cannot tell: keep the file
        return psutil.pid_exists(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True


def part_prefix(stem: str) -> str:
    """Part files for output ``stem`` written by this process start with this."""
    return f".{stem}.{os.getpid()}-"


def remove_stale_parts(directory: Path, stem: str) -> list[Path]:
    """Remove part files (or folders) for output ``stem`` in ``directory`` left by writers that
    are gone (their PID is not alive); returns what was removed."""
    pattern = re.compile(rf"\.{re.escape(stem)}\.(\d+)-[^/]*\.part$")
    removed = []
    try:
        entries = list(directory.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        except FileNotFoundError:
            continue
        except OSError as exc:
            logger.warning("could not remove the stale part file %s: %s", entry, exc)
            continue
        logger.info("removed %s, left by an interrupted conversion (process %s)", entry.name, m.group(1))
        removed.append(entry)
    return removed


@contextlib.contextmanager
def temp_path(directory: Path, stem: str, suffix: str = ".part") -> Iterator[Path]:
    """A fresh, hidden part file in ``directory``, removed on exit whatever happened (SIGTERM
    included); stale ones for the same ``stem`` are removed first."""
    remove_stale_parts(directory, stem)
    with signals_unwind():
        fd, name = tempfile.mkstemp(dir=directory, prefix=part_prefix(stem), suffix=suffix)
        os.close(fd)
        path = Path(name)
        try:
            yield path
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


@contextlib.contextmanager
def temp_dir(directory: Path, stem: str, suffix: str = ".part") -> Iterator[Path]:
    """Like :func:`temp_path`, for a part folder."""
    remove_stale_parts(directory, stem)
    with signals_unwind():
        path = Path(tempfile.mkdtemp(dir=directory, prefix=part_prefix(stem), suffix=suffix))
        try:
            yield path
        finally:
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def atomic_output(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``out`` to write; once the block succeeds the file is
    flushed to disk (fsync) and renamed to ``out``.

    On any error, KeyboardInterrupt and SIGTERM included, the temporary file is removed and
    ``out`` is left as it was.
    """
    out = Path(out)
    with temp_path(out.parent, out.name) as tmp:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual mode
        os.replace(tmp, out)


def atomic_write(out: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` (text as UTF-8) to ``out`` through :func:`atomic_output`."""
    out = Path(out)
    with atomic_output(out) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)
    return out


@contextlib.contextmanager
def atomic_dir(out: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder next to ``out``, renamed to ``out`` only if the block succeeds (an
    existing ``out`` is replaced then); removed otherwise, SIGTERM included."""
    out = Path(out)
    with temp_dir(out.parent, out.name) as tmp:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
            old.rmdir()
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
