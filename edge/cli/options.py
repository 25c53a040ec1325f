"""Options shared by the commands that load a model, and the builders that turn them into
library objects (a :class:`~edge.model_ref.ModelSpec` and its Runtime, one
:class:`~edge.params.SamplingParams`).

The options are made from the fields of those dataclasses (:func:`options_from`): a field's
metadata (:func:`edge.params.offered`) gives its flags and help, the field its name, type and
default, so an option is declared once, with the value it sets."""

from __future__ import annotations

import contextlib
import logging
import types
import typing
from dataclasses import MISSING, fields
from typing import Any, Callable, Mapping

import click

from edge.model_ref import ModelSpec
from edge.params import SamplingParams


def _click_type(hint: Any) -> Any:
    """``int | None`` -> int: the type click converts the text to."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1 else hint


def offered_fields(cls: type) -> list:
    """The fields of a dataclass that have a command-line option, in declaration order."""
    return [f for f in fields(cls) if f.metadata.get("flags")]


def options_from(cls: type, overrides: Mapping[str, Mapping[str, Any]] | None = None) -> Callable[[Callable], Callable]:
    """A decorator adding one click option per offered field of ``cls`` (see
    :func:`edge.params.offered`); ``overrides`` changes click keywords of some (another
    command's default, say: ``{"temperature": {"default": 0.0}}``)."""
    hints = typing.get_type_hints(cls)

    def option(f) -> Callable:
        meta = f.metadata
        kw: dict[str, Any] = {"default": f.default if f.default is not MISSING else None}
        hint = _click_type(hints[f.name])
        if hint is bool:
            kw["is_flag"] = True
        else:
            kw["type"] = hint
        help = meta["help"]
        kw["help"] = help() if callable(help) else help
        kw.update(meta["cli"])
        kw.update((overrides or {}).get(f.name, {}))
        kw.setdefault("show_default", kw["default"] is not None and not (kw.get("is_flag") and "/" not in meta["flags"][0]))
        return click.option(*meta["flags"], f.name, **kw)

    def decorate(fn: Callable) -> Callable:
        for f in reversed(offered_fields(cls)):
            fn = option(f)(fn)
        return fn

    return decorate


class CtxType(click.ParamType):
    """``--ctx``: a number of tokens or ``auto``; anything else is one line and exit 2."""

    name = "N|auto"

    def convert(self, value: Any, param: Any, ctx: Any) -> int | str:
        from edge.backends.llamacpp import check_n_ctx

        return check_n_ctx(value)


def model_options(f: Callable) -> Callable:
    return options_from(ModelSpec, {"n_ctx": {"type": CtxType()}})(f)


sampling_options = options_from(SamplingParams)

SAMPLING_KEYS = tuple(f.name for f in offered_fields(SamplingParams))
MODEL_KEYS = tuple(f.name for f in offered_fields(ModelSpec))


def pop_sampling(kw: dict[str, Any]) -> SamplingParams:
    """One SamplingParams from the sampling options in ``kw`` (removed from it); it checks the values."""
    return SamplingParams(**{k: kw.pop(k) for k in SAMPLING_KEYS if k in kw})


def pop_model_spec(kw: dict[str, Any]) -> ModelSpec:
    """The model options in ``kw`` (removed from it) as a ModelSpec; it checks the values."""
    return ModelSpec(**{k: kw.pop(k) for k in MODEL_KEYS})


def open_runtime(kw: dict[str, Any], **runtime: Any):
    """Build a Runtime from the model options in ``kw`` (removed from it)."""
    spec = pop_model_spec(kw)
    from edge.runtime import Runtime

    with _info_on_stderr("edge.backends.context", spec.n_ctx == "auto" or str(spec.kv_cache).lower() != "f16"):
        return Runtime(spec, **runtime)


def plan_speculation(rt, speculate: bool | None):
    """Decide speculation before the first reply (see :meth:`edge.runtime.Runtime.plan_speculation`):
    the one line saying that this machine's batch cost was measured goes to stderr then, the
    first time only (later runs read it from the cache and say nothing)."""
    if speculate is False:
        return None
    with _info_on_stderr("edge.speculative", True):
        return rt.plan_speculation(speculate)


class _PlainInfo(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return record.getMessage() if record.levelno == logging.INFO else f"{record.levelname} {record.name}: {record.getMessage()}"


@contextlib.contextmanager
def _info_on_stderr(name: str, show: bool):
    """What logger ``name`` logs at INFO meanwhile (the memory estimate the backend logs before
    loading; the batch-cost measurement), as plain lines on stderr."""
    logger = logging.getLogger(name)
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

