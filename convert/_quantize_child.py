"""``python -m edge.convert._quantize_child SRC DST FTYPE NTHREAD``: one ``llama_model_quantize`` call.

:func:`edge.convert.quantize.quantize_file` runs the quantizer here, in a child process, because
the call is one long C function that no signal interrupts: the parent stays responsive (Ctrl-C,
SIGTERM) and kills this process when the user stops the conversion. This process ignores SIGINT
(the parent decides) and exits at once when the parent goes away (its stdin, a pipe from the
parent, reaches end of file), so a ``kill -9`` of the parent leaves no quantizer running.

Everything llama.cpp logs goes to stdout/stderr, which the parent captures and sorts.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
import threading


def _exit_with_parent() -> None:
    # the raw fd, not sys.stdin: a daemon thread blocked in a buffered read aborts the
    # interpreter's shutdown
    while os.read(0, 4096):  # b"" only at end of file: the parent closed the pipe or died
        pass
    os._exit(70)


def main(argv: list[str]) -> int:
    src, dst, ftype, nthread = argv
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, daemon=True).start()

    import llama_cpp
    from llama_cpp import _logger

    _logger.logger.setLevel(logging.DEBUG)  # every llama.cpp line through (the parent sorts them)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(ftype)
    params.nthread = int(nthread)
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    sys.stdout.flush()
    sys.stderr.flush()
    return 0 if rc == 0 else 1


if __name__ == "__main__":
    os._exit(main(sys.argv[1:]))  # no interpreter shutdown while the watcher thread reads
