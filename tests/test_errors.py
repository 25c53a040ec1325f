"""Errors are typed: a context overflow is a ContextLengthError wherever it happens, and the
server maps types (not message text) to codes."""

from __future__ import annotations

import pytest
from tests.scripted import ScriptedBackend

from edge.errors import ContextLengthError, PromptError
from edge.params import SamplingParams
from edge.runtime import Runtime, collect
from edge.server.app import domain_error


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
