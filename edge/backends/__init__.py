"""Backends: one module per engine, chosen by name through a small registry.

``load_backend("llamacpp", model_path, ...)`` imports the backend module only when asked, so
importing :mod:`edge` never pulls in llama_cpp or onnxruntime."""

from __future__ import annotations

import importlib
from typing import Any

from edge.backends.base import Backend, BackendInfo
from edge.errors import ConfigError

# backend name -> (module, class)
REGISTRY: dict[str, tuple[str, str]] = {
    "llamacpp": ("edge.backends.llamacpp", "LlamaCppBackend"),
    "onnx": ("edge.backends.onnx", "OnnxBackend"),
    "remote": ("edge.backends.remote", "RemoteBackend"),
}


def register_backend(name: str, module: str, cls: str) -> None:
    REGISTRY[name] = (module, cls)


def backend_class(name: str) -> type:
    if name not in REGISTRY:
        raise ConfigError(f"unknown backend {name!r}; choose one of: {', '.join(sorted(REGISTRY))}")
    module, cls = REGISTRY[name]
    return getattr(importlib.import_module(module), cls)


def load_backend(name: str, model: str, **options: Any) -> Backend:
    return backend_class(name)(model, **options)


__all__ = ["Backend", "BackendInfo", "REGISTRY", "register_backend", "backend_class", "load_backend"]
