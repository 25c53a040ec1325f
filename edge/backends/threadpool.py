"""A persistent ggml thread pool for a llama-cpp-python context, as llama-server and llama-bench use.

Without one, llama.cpp's CPU backend runs each graph on a pool it makes for that call; llama-cpp-python
has no binding to attach one. Measured on Qwen2.5-Coder-1.5B Q4_K_M, 2 threads, greedy, 5 interleaved rounds of 128 tokens
(benchmarks/results/peers/README.md): 1.03-1.06x the decode speed, the same tokens. The pool
does not poll (``poll=0``): idle threads sleep rather than spin (polling, llama-server's default,
measured no faster here and would keep a laptop's cores busy).

The functions are reached with ctypes in the shared libraries the llama_cpp package ships. The
struct ``ggml_threadpool_params`` is checked against ggml's own defaults before use. A library
without these symbols, or with another layout, keeps llama.cpp's default, and says why.
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass

_MAX_THREADS = 512  # GGML_MAX_N_THREADS
_DEFAULT_POLL = 50  # what ggml_threadpool_params_default() sets: the layout check


class _Params(ctypes.Structure):
    _fields_ = [("cpumask", ctypes.c_bool * _MAX_THREADS), ("n_threads", ctypes.c_int), ("prio", ctypes.c_int),
                ("poll", ctypes.c_uint32), ("strict_cpu", ctypes.c_bool), ("paused", ctypes.c_bool)]


@dataclass
class ThreadPools:
    """The pools attached to one context (one when decode and batch threads agree)."""

    pools: list[int]
    free_fn: object

    def free(self) -> None:
        """Free the pools: only after the context that uses them is freed."""
        for p in self.pools:
            self.free_fn(ctypes.c_void_p(p))
        self.pools = []


def _libs(llama_cpp):
    libdir = os.path.join(os.path.dirname(llama_cpp.__file__), "lib")
    names = ("libggml-base", "libggml-cpu", "libllama")
    ext = ".dll" if sys.platform == "win32" else ".dylib" if sys.platform == "darwin" else ".so"
    libs = []
    for name in names:
        path = os.path.join(libdir, name + ext)
        if not os.path.exists(path) and sys.platform == "win32":
            path = os.path.join(libdir, name.removeprefix("lib") + ext)
        libs.append(ctypes.CDLL(path, mode=getattr(ctypes, "RTLD_GLOBAL", 0)))
    return libs


def attach(llama_cpp, ctx, n_threads: int, n_threads_batch: int) -> tuple[ThreadPools | None, str]:
    """Attach persistent pools of ``n_threads`` (decode) and ``n_threads_batch`` (prompt batches)
    to the llama context ``ctx``. Returns the pools (None when it could not) and what was done."""
    try:
        base, cpu, llama = _libs(llama_cpp)
        default = base.ggml_threadpool_params_default
        default.restype, default.argtypes = _Params, [ctypes.c_int]
        new = cpu.ggml_threadpool_new
        new.restype, new.argtypes = ctypes.c_void_p, [ctypes.POINTER(_Params)]
        free = cpu.ggml_threadpool_free
        free.restype, free.argtypes = None, [ctypes.c_void_p]
        attach_fn = llama.llama_attach_threadpool
        attach_fn.restype, attach_fn.argtypes = None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    except (OSError, AttributeError) as exc:
        return None, f"llama.cpp's default (no thread-pool functions in this build: {exc})"
    pools = []
    counts = list(dict.fromkeys((n_threads, n_threads_batch)))  # one pool when the two agree
    for n in counts:
        params = default(int(n))
        if params.n_threads != n or params.poll != _DEFAULT_POLL:
            ThreadPools(pools, free).free()
            return None, "llama.cpp's default (this build's ggml_threadpool_params has another layout)"
        params.poll = 0
        pool = new(ctypes.byref(params))
        if not pool:
            ThreadPools(pools, free).free()
            return None, "llama.cpp's default (ggml_threadpool_new failed)"
        pools.append(pool)
    batch = pools[-1]
    attach_fn(ctx if isinstance(ctx, ctypes.c_void_p) else ctypes.c_void_p(ctx), ctypes.c_void_p(pools[0]), ctypes.c_void_p(batch))
    sizes = " and ".join(map(str, counts)) + (" thread" if counts == [1] else " threads")
    return ThreadPools(pools, free), f"persistent ({sizes}, no polling)"
