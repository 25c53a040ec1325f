"""Stop Python work running in the calling thread once a deadline passes.

    from edge.deadline import DeadlineExceeded, call_with_deadline

    try:
        text = call_with_deadline(lambda: template.render(...), 2.0)
    except DeadlineExceeded:
        ...                                  # the render was stopped; this thread is free again

The work runs in the calling thread (no hand-off, so the normal path costs one lock and a dict
entry). One watchdog thread, started on first use, raises :class:`DeadlineExceeded` inside that
thread when the deadline passes (``PyThreadState_SetAsyncExc``): the exception arrives at the
next Python bytecode, so interpreted work such as a Jinja template (compiled to Python bytecode)
stops at once. A single long call into C (one huge ``**``, say) is only interrupted when it
returns: callers bound such operations themselves (see :mod:`edge.templates`).

The watchdog sleeps until the earliest deadline and is woken only when a new deadline is earlier
than that one, so it costs nothing while idle and nearly nothing under a steady load.
"""

from __future__ import annotations

import ctypes
import itertools
import math
import queue
import threading
import time
from typing import Callable, TypeVar

T = TypeVar("T")


class DeadlineExceeded(BaseException):
    """Raised in a thread whose work ran past its deadline.

    A ``BaseException`` so that ``except Exception`` inside the stopped work cannot swallow it."""


def _set_async_exc(thread_id: int, exc: type[BaseException] | None) -> int:
    """Schedule ``exc`` in thread ``thread_id``; ``None`` clears one still pending there."""
    return ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), ctypes.py_object(exc) if exc is not None else None)


class _Watchdog:
    """Fires deadlines. The paths that run in a watched thread use only primitives implemented
    in C (``threading.Lock``, ``queue.SimpleQueue``): an exception arriving inside a Python-level
    primitive (``threading.Condition.__enter__``, say) could leave its lock held forever."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._armed: dict[int, tuple[float, int]] = {}  # token -> (deadline, thread id)
        self._tokens = itertools.count()
        self._wake_at = math.inf  # when the watchdog thread wakes next (inf: not waiting for any)
        self._wake = queue.SimpleQueue()
        self._start_lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def arm(self, seconds: float) -> int:
        if self._thread is None:
            with self._start_lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="edge-deadline", daemon=True)
                    self._thread.start()
        deadline = time.monotonic() + seconds
        with self._lock:
            token = next(self._tokens)
            self._armed[token] = (deadline, threading.get_ident())
            wake = deadline < self._wake_at
            if wake:
                self._wake_at = deadline
        if wake:
            self._wake.put(None)
        return token

    def disarm(self, token: int) -> bool:
        """Forget ``token``; True when its deadline fired (an exception still pending in this
        thread is then cleared, so none can surface after this returns)."""
        with self._lock:
            if self._armed.pop(token, None) is not None:
                return False
            _set_async_exc(threading.get_ident(), None)
            return True

    def _run(self) -> None:
        while True:
            with self._lock:
                now = time.monotonic()
                for token, (deadline, thread_id) in list(self._armed.items()):
                    if deadline <= now:
                        del self._armed[token]  # fired: disarm() sees the token gone
                        _set_async_exc(thread_id, DeadlineExceeded)
                self._wake_at = min((d for d, _ in self._armed.values()), default=math.inf)
                wait = None if self._wake_at == math.inf else self._wake_at - now
            try:
                self._wake.get(timeout=wait)
            except queue.Empty:
                pass


_watchdog = _Watchdog()


def call_with_deadline(fn: Callable[[], T], seconds: float) -> T:
    """``fn()`` in this thread, stopped with :class:`DeadlineExceeded` after ``seconds``."""
    if not seconds > 0:
        raise ValueError(f"the deadline must be > 0 seconds, got {seconds}")
    token = _watchdog.arm(seconds)
    try:
        return fn()
    except DeadlineExceeded:
        pass
    finally:
        # the watchdog may fire until disarm() has run: retry until it has (it is idempotent);
        # a result computed just before a late firing is still returned
        while True:
            try:
                _watchdog.disarm(token)
                break
            except DeadlineExceeded:
                pass
    raise DeadlineExceeded(f"still running after {seconds} s")
