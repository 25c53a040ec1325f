"""Backends: one module per engine, chosen by name through a small registry.

``load_backend("llamacpp", model_path, ...)`` imports the backend module only when asked, so
importing :mod:`edge` never pulls in llama_cpp or onnxruntime.

Another engine joins with :func:`register_backend`; from then on its name works everywhere a
backend name does (``Runtime(backend=name)``, ``--backend name``)::

    register_backend("mine", "my_package.backend", "MyBackend")   # imported when first used
    register_backend("mine", lambda model, **options: MyBackend(model, **options))

A backend is called as ``factory(model, **options)`` (a class is such a factory) and returns an
object of the :class:`~edge.backends.base.Backend` protocol; ``model`` is the resolved path of
the model reference, and ``options`` are the options of :class:`~edge.model_ref.ModelSpec` a
local backend takes (``n_ctx``, ``threads``, ``device``, ``ctx_beyond_training``) that were given
(an option left at its default is not passed), plus any backend keywords given to the Runtime."""

from __future__ import annotations

import importlib
from typing import Any, Callable

from edge.backends.base import Backend, BackendInfo
from edge.errors import ConfigError

# backend name -> (module, class) imported when first used, or a factory
REGISTRY: dict[str, tuple[str, str] | Callable[..., Backend]] = {
    "llamacpp": ("edge.backends.llamacpp", "LlamaCppBackend"),
    "onnx": ("edge.backends.onnx", "OnnxBackend"),
    "remote": ("edge.backends.remote", "RemoteBackend"),
}


def register_backend(name: str, target: str | Callable[..., Backend], cls: str | None = None) -> None:
    """Make ``name`` a backend: ``target`` is a module and ``cls`` the class in it (imported
    when the backend is first used), or ``target`` is a factory ``(model, **options) -> Backend``.
    A name registered again is replaced."""
    if isinstance(target, str):
        if cls is None:
            raise TypeError("register_backend(name, module, cls): give the class name with a module")
        REGISTRY[name] = (target, cls)
    else:
        REGISTRY[name] = target


def unregister_backend(name: str) -> None:
    """Forget a backend registered with :func:`register_backend` (no error if unknown)."""
    REGISTRY.pop(name, None)


def backend_class(name: str) -> Callable[..., Backend]:
    """The class (or factory) registered as ``name``."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown backend {name!r}; choose one of: {', '.join(sorted(REGISTRY))}")
    entry = REGISTRY[name]
    if callable(entry):
        return entry
    module, cls = entry
    return getattr(importlib.import_module(module), cls)


def load_backend(name: str, model: str, **options: Any) -> Backend:
    return backend_class(name)(model, **options)


__all__ = ["Backend", "BackendInfo", "REGISTRY", "register_backend", "unregister_backend", "backend_class", "load_backend"]
