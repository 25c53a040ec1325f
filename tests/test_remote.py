"""The remote backend against ``edge-reason serve`` running in this process: the same greedy
replies as the in-process backend, and budgets / early exit applied client-side."""

from __future__ import annotations

import socket

import pytest

from edge.backends.remote import RemoteBackend, parse_top_logprobs
from edge.control.budget import ThinkingBudget
from edge.control.early_exit import EarlyExit
from edge.errors import BackendError, ConfigError
from edge.events import Probe
from edge.params import SamplingParams
from edge.runtime import Runtime, collect
from tests.scripted import ScriptedBackend
from tests.test_server import ANSWER, SCRIPT, confident_after, scripted_runtime, start

THINK_PROMPT = "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n<think>\n"


@pytest.fixture(scope="module")
def served(smollm2_runtime):
    s = start(smollm2_runtime)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def remote(served):
    rt = Runtime(served.url, backend="remote", n_ctx=1024)
    yield rt
    rt.close()


def test_remote_backend_mirrors_the_served_model(remote, smollm2_runtime):
    far, near = remote.backend, smollm2_runtime.backend
    assert far.info.name == "remote" and far.info.extra["server_model"] == "SmolLM2-135M-Instruct.Q4_1"
    assert far.n_vocab == near.n_vocab and far.eos_token_ids == near.eos_token_ids
    assert far.chat_template == near.chat_template and far.eos_token == near.eos_token and far.add_bos == near.add_bos
    assert far.n_ctx == near.n_ctx - 1  # the server keeps room for the token it generates
    text = "Héllo <|im_end|> wörld"
    ids = far.tokenize(text, special=True)
    assert ids == near.tokenize(text, special=True)
    assert [far.token_bytes(t) for t in ids] == [near.token_bytes(t) for t in ids]
    assert remote.render([{"role": "user", "content": "hi"}]) == smollm2_runtime.render([{"role": "user", "content": "hi"}])


def test_greedy_replies_match_the_in_process_backend(remote, smollm2_runtime):
    params = SamplingParams(temperature=0, max_tokens=5)
    smollm2_runtime.backend.rollback(0)  # same cache history for both runs
    near = smollm2_runtime.ask("Name a colour.", params)
    smollm2_runtime.backend.rollback(0)
    before = remote.backend.requests
    far = remote.ask("Name a colour.", params)
    assert far.answer and far.answer == near.answer
    assert far.stats.answer_tokens == near.stats.answer_tokens and far.stats.prompt_tokens == near.stats.prompt_tokens
    assert remote.backend.requests - before >= far.stats.completion_tokens  # one round trip per token at least


def test_a_thinking_budget_works_through_the_remote_backend(remote, smollm2_runtime):
    params = SamplingParams(temperature=0, max_tokens=5)

    def budget():
        return [ThinkingBudget(max_thinking=2, end_message="\nTime is up.\n")]

    smollm2_runtime.backend.rollback(0)
    near = collect(smollm2_runtime.complete(THINK_PROMPT, params, controllers=budget()))
    smollm2_runtime.backend.rollback(0)
    far = collect(remote.complete(THINK_PROMPT, params, controllers=budget()))
    assert far.stats.thinking_tokens == near.stats.thinking_tokens == 2
    assert far.stats.exit_reason == near.stats.exit_reason == "budget"
    assert far.reasoning == near.reasoning and far.reasoning.endswith("Time is up.")
    assert far.answer == near.answer and far.stats.answer_tokens == near.stats.answer_tokens > 0
    assert [type(c) for c in far.controls] == [type(c) for c in near.controls]


def test_early_exit_works_through_the_remote_backend():
    served = start(scripted_runtime(trial=confident_after(5)))
    try:
        with Runtime(served.url, backend="remote") as rt:
            params = SamplingParams(temperature=0, max_tokens=200)
            ctl = [EarlyExit(threshold=0.9)]
            far = collect(rt.complete("Q?<think>", params, controllers=ctl))
        near_rt = Runtime(backend=ScriptedBackend(SCRIPT, ANSWER, trial=confident_after(5)))
        near = collect(near_rt.complete("Q?<think>", params, controllers=[EarlyExit(threshold=0.9)]))
        probes = lambda r: [c.answer for c in r.controls if isinstance(c, Probe)]  # noqa: E731
        assert probes(far) == probes(near) == ["3", "3", "7"]
        assert far.stats.exit_reason == "early_exit" and far.stats.thinking_tokens == near.stats.thinking_tokens == 6
        assert far.answer == near.answer and far.answer.endswith("\\boxed{7}")
        assert far.stats.probe_tokens == near.stats.probe_tokens > 0
    finally:
        served.stop()


def test_remote_backend_sends_the_api_key():
    served = start(scripted_runtime(), api_key="k3y")
    try:
        with pytest.raises(BackendError, match="401"):
            RemoteBackend(served.url)
        b = RemoteBackend(served.url, api_key="k3y")
        assert int(b.eval(b.tokenize("Q?<think>")).argmax()) == served.edge.runtime.backend.script_base
        b.close()
        with pytest.raises(BackendError, match="closed"):
            b.tokenize("Q?")
    finally:
        served.stop()


def test_rollback_is_client_side(remote):
    b = remote.backend
    b.rollback(0)
    ids = b.tokenize("The sky is", special=True)
    first = b.eval(ids)
    n = b.requests
    b.rollback(len(ids) - 1)
    assert b.n_past == len(ids) - 1 and b.requests == n  # no request for a rollback
    again = b.eval(ids[-1:])
    assert int(again.argmax()) == int(first.argmax())
    finite = first[first > -float("inf")]
    assert len(finite) == 20 and float(finite.max()) <= 0.0  # a sparse top-k distribution
    with pytest.raises(BackendError):
        b.rollback(b.n_past + 1)


def test_bad_urls_and_unreachable_servers():
    with pytest.raises(ConfigError):
        RemoteBackend("ftp://example.com/v1")
    with pytest.raises(ConfigError):
        RemoteBackend("http://127.0.0.1:1/v1", top_logprobs=50)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(BackendError, match="cannot be reached"):
        RemoteBackend(f"http://127.0.0.1:{port}/v1", timeout=2)


def test_logprob_formats_are_understood():
    legacy_ids = {"tokens": ["token_id:5"], "token_logprobs": [-0.1], "top_logprobs": [{"token_id:5": -0.1, "token_id:9": -2.5}]}
    assert sorted(parse_top_logprobs(legacy_ids)) == [(5, -0.1, None), (5, -0.1, None), (9, -2.5, None)]
    legacy_text = {"tokens": [" a"], "token_logprobs": [-0.2], "top_logprobs": [{" a": -0.2, " b": -1.9}]}
    assert (" b", -1.9, None) in parse_top_logprobs(legacy_text)
    llama_server = {
        "content": [
            {"id": 7, "token": "x", "logprob": -0.3, "bytes": [120], "top_logprobs": [{"id": 7, "token": "x", "logprob": -0.3, "bytes": [120]}, {"id": 8, "token": "\ufffd", "logprob": -1.5, "bytes": [0xE6]}]}
        ]
    }
    got = parse_top_logprobs(llama_server)
    assert (8, -1.5, b"\xe6") in got and (7, -0.3, b"x") in got
    assert parse_top_logprobs(None) == [] and parse_top_logprobs({"content": []}) == []
