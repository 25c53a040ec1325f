"""One table from library exceptions to HTTP answers, used by every route.

An exception raised while serving a request becomes an :class:`ApiError` through
:data:`ANSWERS`: HTTP status, OpenAI error ``type``, ``code`` and the ``param`` to blame (the
table's, or the :class:`~edge.errors.ConfigError`'s own ``param``); anything not a domain error
is an internal error whose details go to the log only. The exception's own class decides, looked up along its MRO, so the most specific entry
wins (a :class:`~edge.errors.ContextLengthError` is also a ``PromptError``, a
``ChatTemplateError`` also a ``ConfigError``) and the message text is never searched.
"""

from __future__ import annotations

from dataclasses import dataclass

from starlette.responses import JSONResponse

from edge.errors import BackendError, ChatTemplateError, ConfigError, ContextLengthError, EdgeError, PromptError, RuntimeClosedError
from edge.server.protocol import ApiError


@dataclass(frozen=True)
class Answer:
    """How one exception type is answered."""

    status: int
    code: str | None
    type: str = "invalid_request_error"
    param: str | None = None
    #: the message, ``{}`` standing for the exception's own
    message: str = "{}"


ANSWERS: dict[type[BaseException], Answer] = {
    RuntimeClosedError: Answer(503, "model_closed", type="server_error"),
    BackendError: Answer(500, "backend_error", type="server_error", message="the inference engine failed: {}"),
    ChatTemplateError: Answer(500, "chat_template_error", type="server_error"),  # the server's template failed on this request
    ContextLengthError: Answer(400, "context_length_exceeded", param="messages"),
    PromptError: Answer(400, "invalid_prompt", param="messages"),
    ConfigError: Answer(400, "invalid_value"),
    EdgeError: Answer(400, None),
    Exception: Answer(500, "internal_error", type="server_error", message="internal server error (see the server log)"),
}


def answer_for(exc: BaseException) -> Answer:
    """The table's entry for the most specific class of ``exc`` that has one."""
    return next(ANSWERS[cls] for cls in type(exc).__mro__ if cls in ANSWERS)


def domain_error(exc: BaseException, *, param: str | None = None) -> ApiError:
    """An error raised while serving a request, as the HTTP error to answer. ``param`` names
    the request field to blame where the route knows better than the table (a completion's
    ``prompt`` rather than ``messages``)."""
    a = answer_for(exc)
    blame = param or getattr(exc, "param", None) or a.param
    return ApiError(a.status, a.message.format(exc), type=a.type, param=blame, code=a.code)


def error_response(exc: ApiError) -> JSONResponse:
    """The JSON answer to an :class:`ApiError` (OpenAI's ``{"error": {...}}`` body)."""
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)
