"""Options shared by the commands that load a model, and the builders that turn them into
library objects (a :class:`~edge.runtime.Runtime`, one :class:`~edge.params.SamplingParams`)."""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any, Callable

import click

from edge.backends.devices import KNOWN_DEVICES
from edge.errors import ConfigError

def check_device(device: str) -> None:
    """Refuse a device name no backend knows; the backend checks what its own build has."""
    if device not in KNOWN_DEVICES:
        raise ConfigError(f"unknown device {device!r}; choose one of: {', '.join(KNOWN_DEVICES)}")


def _threads_help() -> str:
    from edge.backends.cpu import default_threads

    auto = default_threads()
    return (f"CPU threads for decoding and batches (default here: {auto.decode} to decode, one per performance core "
            f"({auto.source}), {auto.batch} for batches).")


class CtxType(click.ParamType):
    """``--ctx``: a number of tokens or ``auto``; anything else is one line and exit 2."""

    name = "N|auto"

    def convert(self, value: Any, param: Any, ctx: Any) -> int | str:
        from edge.backends.llamacpp import check_n_ctx

        return check_n_ctx(value)


def model_options(f: Callable) -> Callable:
    opts = [
        click.option("-m", "--model", default=None, help="GGUF path, ONNX folder, or owner/repo:file.gguf (default: the bundled tiny-r1)."),
        click.option("--backend", default="llamacpp", show_default=True, help="llamacpp | onnx | remote"),
        click.option("--ctx", "n_ctx", type=CtxType(), default=None,
                     help="Context size in tokens (default: 4096, or the model's trained length if smaller); refused beyond the trained "
                          "length or when the KV cache and weights would not fit in memory. 'auto': the largest that fits the free "
                          "memory, up to the trained length (the estimate is printed before loading)."),
        click.option("--kv-cache", default="f16", show_default=True, metavar="f16|q8_0|q4_0",
                     help="KV cache type (llama.cpp): q8_0 halves its memory, q4_0 quarters it, with flash attention on."),
        click.option("--ctx-beyond-training", is_flag=True, help="Allow a --ctx above the model's trained length (its output degrades there)."),
        click.option("--threads", type=int, default=None, help=_threads_help()),
        click.option("--device", default="auto", show_default=True,
                     help="auto | cpu | cuda | metal; with an ONNX model also xnnpack | qnn | nnapi | coreml | dml | openvino | rocm | tensorrt | webgpu."),
        click.option("--gpu-layers", type=int, default=None, help="Layers to offload (-1 = all; default all when a GPU is used)."),
        click.option("--reasoning-prompt", default=None, metavar="STYLE|TEXT",
                     help="Make an instruct model reason in <think>: a system instruction (style 'step' or 'r1', or your own "
                          "text) and an opened think block. Not needed for R1-Distill and other reasoning models."),
        click.option("--timeout", type=float, default=None,
                     help="With --backend remote: seconds to wait for each answer of the server (default 120); a server stalled longer is an error."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def sampling_options(f: Callable) -> Callable:
    opts = [
        click.option("--temperature", "--temp", type=float, default=0.6, show_default=True, help="0 = greedy."),
        click.option("--top-p", type=float, default=0.95, show_default=True),
        click.option("--top-k", type=int, default=0, show_default=True, help="0 = off."),
        click.option("--min-p", type=float, default=0.0, show_default=True),
        click.option("--repeat-penalty", type=float, default=1.0, show_default=True),
        click.option("--seed", type=int, default=None, help="Sampling seed (runs are reproducible with one); -1 or none = random, as in llama.cpp."),
        click.option("--max-tokens", type=int, default=4096, show_default=True, help="Cap on generated tokens (thinking + answer)."),
        click.option("--speculate/--no-speculate", default=False, show_default=True,
                     help="Speculative decoding from n-gram lookup over the prompt and the reasoning so far: the same "
                          "output, fewer model steps when the trace repeats itself."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed", "max_tokens", "speculate")
MODEL_KEYS = ("model", "backend", "n_ctx", "ctx_beyond_training", "threads", "device", "gpu_layers", "reasoning_prompt", "timeout",
              "kv_cache")


def pop_sampling(kw: dict[str, Any]):
    from edge.params import SamplingParams

    return SamplingParams(**{k: kw.pop(k) for k in SAMPLING_KEYS})


def pop_model_options(kw: dict[str, Any]) -> tuple[str | None, str, dict[str, Any]]:
    """(model, backend, Runtime keywords) from the model options in ``kw`` (removed from it),
    less those the chosen backend does not take; the device name is checked here."""
    opts = {k: kw.pop(k) for k in MODEL_KEYS}
    check_device(opts["device"])
    model, backend = opts.pop("model"), opts.pop("backend")
    if backend != "llamacpp":
        opts.pop("gpu_layers")
        if opts.pop("kv_cache").lower() != "f16" or opts["n_ctx"] == "auto":
            raise ConfigError("--kv-cache and --ctx auto apply to --backend llamacpp only")
    if backend == "remote" or not opts["ctx_beyond_training"]:
        opts.pop("ctx_beyond_training")  # the remote server has its own context
    timeout = opts.pop("timeout", None)
    if timeout is not None:
        if backend != "remote":
            raise ConfigError("--timeout applies to --backend remote only")
        opts["timeout"] = timeout
    return model, backend, opts


def open_runtime(kw: dict[str, Any]):
    """Build a Runtime from the model options in ``kw`` (removed from it)."""
    model, backend, opts = pop_model_options(kw)
    from edge.runtime import Runtime

    with _estimate_on_stderr(opts.get("n_ctx") == "auto" or opts.get("kv_cache", "f16").lower() != "f16"):
        return Runtime(model, backend=backend, **opts)


class _PlainInfo(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return record.getMessage() if record.levelno == logging.INFO else f"{record.levelname} {record.name}: {record.getMessage()}"


@contextlib.contextmanager
def _estimate_on_stderr(show: bool):
    """The memory estimate the backend logs before loading, as one plain line on stderr."""
    logger = logging.getLogger("edge.backends.context")
    if not show:
        yield
        return
    handler = logging.StreamHandler()  # the line plain; warnings as the root logger shows them
    handler.setFormatter(_PlainInfo())
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def passthrough(f: Callable) -> Callable:
    @functools.wraps(f)
    def wrapper(**kw: Any) -> Any:
        return f(**kw)

    return wrapper
