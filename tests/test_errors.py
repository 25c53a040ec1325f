"""Errors are typed: a context overflow is a ContextLengthError wherever it happens, and the
server maps types (not message text) to codes."""

from __future__ import annotations

import pytest
from tests.scripted import ScriptedBackend

from edge.errors import (
    BackendError, ChatTemplateError, ConfigError, ContextLengthError, EdgeError, InvalidModelError, PromptError, RuntimeClosedError,
)
from edge.params import SamplingParams
from edge.runtime import Runtime, collect
from edge.server.app import domain_error
from edge.server.errors import ANSWERS


def test_overflow_is_a_context_length_error_and_maps_to_its_code():
    rt = Runtime(backend=ScriptedBackend(["a"], "b", n_ctx=32))
    with pytest.raises(ContextLengthError) as exc:
        collect(rt.complete("x" * 40, SamplingParams(max_tokens=4)))
    assert isinstance(exc.value, PromptError)  # callers catching PromptError still do
    assert domain_error(exc.value).body()["error"]["code"] == "context_length_exceeded"
    # a prompt error that merely mentions a context is not an overflow
    other = domain_error(PromptError("message 0 has unknown role 'context'"))
    assert other.body()["error"]["code"] == "invalid_prompt"


def test_llamacpp_overflow_is_typed(smollm2_backend):
    with pytest.raises(ContextLengthError):
        smollm2_backend.eval(list(range(5, 5 + smollm2_backend.n_ctx + 1)))
    smollm2_backend.rollback(0)


@pytest.mark.parametrize(
    "exc, status, type_, code, param",
    [
        (RuntimeClosedError("closed"), 503, "server_error", "model_closed", None),
        (BackendError("decode failed"), 500, "server_error", "backend_error", None),
        (ChatTemplateError("template too slow"), 500, "server_error", "chat_template_error", None),
        (ContextLengthError("too long"), 400, "invalid_request_error", "context_length_exceeded", "messages"),
        (PromptError("empty"), 400, "invalid_request_error", "invalid_prompt", "messages"),
        (ConfigError("bad value"), 400, "invalid_request_error", "invalid_value", None),
        (ConfigError("seed must be an integer", param="seed"), 400, "invalid_request_error", "invalid_value", "seed"),
        (InvalidModelError("not GGUF"), 400, "invalid_request_error", None, None),
        (KeyError("internal detail"), 500, "server_error", "internal_error", None),
    ],
)
def test_error_table_maps_each_type(exc, status, type_, code, param):
    err = domain_error(exc)
    body = err.body()["error"]
    assert (err.status, body["type"], body["code"], body["param"]) == (status, type_, code, param)
    if isinstance(exc, EdgeError):
        assert str(exc) in body["message"]
    else:  # what failed inside stays in the server log
        assert "internal detail" not in body["message"]


def test_error_table_goes_by_the_most_specific_type_and_a_route_may_name_the_param():
    class Overflow(ContextLengthError):
        pass

    assert domain_error(Overflow("x")).code == "context_length_exceeded"  # a subclass, not listed itself
    assert domain_error(ContextLengthError("x"), param="prompt").param == "prompt"
    assert set(ANSWERS) >= {RuntimeClosedError, BackendError, ChatTemplateError, ContextLengthError, PromptError, ConfigError, EdgeError}


def test_completion_prompt_over_the_context_is_answered_by_type_naming_the_prompt():
    """The server's own length check raises ContextLengthError and answers it through the table."""
    from starlette.testclient import TestClient

    from edge.server.app import EdgeServer

    rt = Runtime(backend=ScriptedBackend(["a"], "b", n_ctx=32))
    client = TestClient(EdgeServer(rt).app)
    r = client.post("/v1/completions", json={"prompt": "x" * 40, "max_tokens": 2})
    assert r.status_code == 400
    assert (r.json()["error"]["code"], r.json()["error"]["param"]) == ("context_length_exceeded", "prompt")
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 40}], "max_tokens": 2})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "messages")
