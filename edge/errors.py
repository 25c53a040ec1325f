"""Domain exceptions: errors a user can cause, each with a message that says what to do.

Each also subclasses the closest builtin so callers can catch it the usual way. The CLI maps
any :class:`EdgeError` to one line on stderr and a non-zero exit (``EDGE_DEBUG=1`` shows the
traceback)."""

from __future__ import annotations


class EdgeError(Exception):
    """Base class of every error a user can cause."""

    exit_code = 2


class ModelNotFoundError(EdgeError, FileNotFoundError):
    """A model reference names no file, or no default model is available."""


class InvalidModelError(EdgeError, ValueError):
    """The file exists but is not a usable model (not GGUF, truncated, unsupported)."""


class PromptError(EdgeError, ValueError):
    """The prompt is empty or does not fit the context."""


class ContextLengthError(PromptError):
    """The prompt (or prompt plus generation) does not fit the model's context."""


class ConfigError(EdgeError, ValueError):
    """An option has a bad value (unknown device, negative budget, threshold outside [0, 1], ...).

    ``param`` names the option when one is to blame (the server answers it as the 400's param)."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class ChatTemplateError(ConfigError):
    """The chat template does not parse, fails to render, or runs past its time or size budget."""


class BackendError(EdgeError, RuntimeError):
    """The inference engine failed (decode error, out of memory, server error)."""


class RuntimeClosedError(BackendError):
    """The runtime was closed; its model is freed. Create a new :class:`~edge.runtime.Runtime`."""


class ConversionError(EdgeError, ValueError):
    """A checkpoint cannot be converted (missing files, unsupported architecture, ...)."""


class OutputExistsError(EdgeError, FileExistsError):
    """The output path exists and --force was not given."""


class VerificationError(EdgeError):
    """A converted model failed parity verification against its source."""

    exit_code = 3
