"""The OpenAI-compatible server on a scripted model: wire format, controls, limits, security.

The real server (uvicorn on a free loopback port, in a background thread) is driven with the
official ``openai`` client and, for malformed requests, with raw ``httpx``. The scripted model
thinks through a fixed script and answers, so counts and control outcomes are exact and fast;
tests/test_server_smollm2.py runs the same server on a real GGUF.
"""

from __future__ import annotations

import logging
import threading
import time

import httpx
import openai
import pytest

from edge.runtime import Runtime
from edge.server import ServerConfig, ServerThread, exposure_warning, is_loopback, warn_if_exposed
from tests.scripted import ScriptedBackend

SCRIPT = ["Step one.", "\n\n", "Step two.", "\n\n", "So x = 7.", "\n\n", "Wait", ", let me check.", " Yes, x = 7.", "\n", "</think>"]
ANSWER = "\n\n**Final Answer**\n\\boxed{7}"
# a chat template whose generation prompt opens thinking, as DeepSeek-R1-Distill's does
THINK_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}"
)
MSGS = [{"role": "user", "content": "What is x?"}]
TIMEOUT = 20.0


def confident_after(n0):
    return lambda n: ("7", 0.99) if n >= n0 else ("3", 0.3)


def scripted_runtime(script=SCRIPT, **kw) -> Runtime:
    return Runtime(backend=ScriptedBackend(script, ANSWER, chat_template=THINK_TEMPLATE, **kw))


class SlowBackend(ScriptedBackend):
    """A scripted model that takes ``delay`` seconds per evaluation and thinks for long."""

    def __init__(self, delay: float = 0.02, steps: int = 600) -> None:
        super().__init__(["la "] * steps, ANSWER, chat_template=THINK_TEMPLATE)
        self.delay = delay

    def eval(self, tokens):
        time.sleep(self.delay)
        return super().eval(tokens)


def start(runtime, **cfg) -> ServerThread:
    cfg.setdefault("log_level", "warning")
    return ServerThread(runtime, ServerConfig(port=0, **cfg)).start()


_HTTP: list[httpx.Client] = []


def http() -> httpx.Client:
    """One shared HTTP client (making one costs tens of milliseconds: its TLS context)."""
    if not _HTTP:
        _HTTP.append(httpx.Client(timeout=TIMEOUT))
    return _HTTP[0]


def client(srv: ServerThread, key: str = "unused", timeout: float = TIMEOUT) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url, api_key=key, timeout=timeout, max_retries=0, http_client=http())


def root(srv: ServerThread) -> str:
    return srv.url.removesuffix("/v1")


def extra(obj, name):
    return (obj.model_extra or {}).get(name)


@pytest.fixture(scope="module")
def srv():
    s = start(scripted_runtime(trial=confident_after(5)))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def slow():
    s = start(Runtime(backend=SlowBackend()), max_queue=0)
    yield s
    s.stop()


def chat(srv, **kw):
    kw.setdefault("temperature", 0)
    return client(srv).chat.completions.create(model="scripted", messages=MSGS, **kw)


# -- wire format ---------------------------------------------------------------------------------
def test_health_models_and_props(srv):
    h = http().get(root(srv) + "/health").json()
    assert h["status"] == "ok" and h["running"] == 0
    models = client(srv).models.list()
    card = models.data[0]
    assert card.id == "model" and extra(card, "meta")["n_vocab"] == srv.edge.runtime.backend.n_vocab
    props = http().get(root(srv) + "/props", timeout=TIMEOUT).json()
    assert props["chat_template"] == THINK_TEMPLATE and props["edge"]["eos_token_ids"] == [srv.edge.runtime.backend.eos_id]


def test_chat_separates_reasoning_and_counts_usage(srv):
    r = chat(srv)
    msg = r.choices[0].message
    assert msg.content == ANSWER.strip()
    reasoning = extra(msg, "reasoning_content")
    assert reasoning.startswith("Step one.") and "x = 7" in reasoning and "</think>" not in reasoning
    assert r.choices[0].finish_reason == "stop"
    u = r.usage
    prompt = srv.edge.runtime.render(MSGS)
    assert u.prompt_tokens == len(prompt)  # one token per character on the scripted model
    assert u.completion_tokens_details.reasoning_tokens == len(SCRIPT)
    assert u.completion_tokens == len(SCRIPT) + len(ANSWER) and u.total_tokens == u.prompt_tokens + u.completion_tokens
    edge = extra(u, "edge")
    assert edge["exit_reason"] == "eos" and edge["probe_tokens"] == 0
    assert edge["time_to_first_token"] is not None and edge["time_to_first_answer_token"] >= edge["time_to_first_token"]
    assert edge["decode_tokens_per_second"] > 0


def test_stream_sends_reasoning_then_content_then_usage(srv):
    stream = chat(srv, stream=True, stream_options={"include_usage": True})
    kinds, reasoning, content, usage, finish = [], "", "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if not chunk.choices:
            continue
        d = chunk.choices[0].delta
        finish = chunk.choices[0].finish_reason or finish
        if extra(d, "reasoning_content"):
            kinds.append("r")
            reasoning += extra(d, "reasoning_content")
        if d.content:
            kinds.append("c")
            content += d.content
    assert kinds.index("c") > kinds.index("r") and "r" not in kinds[kinds.index("c"):]
    assert len(kinds) > 10  # really streamed piece by piece
    whole = chat(srv)
    assert content == whole.choices[0].message.content and reasoning == extra(whole.choices[0].message, "reasoning_content")
    assert finish == "stop"
    assert usage.completion_tokens == whole.usage.completion_tokens and usage.completion_tokens_details.reasoning_tokens == len(SCRIPT)


def test_reasoning_format_inline_and_none(srv):
    inline = chat(srv, extra_body={"reasoning_format": "inline"}).choices[0].message
    assert inline.content.startswith("<think>\nStep one.") and "\n</think>\n\n**Final Answer**" in inline.content
    assert extra(inline, "reasoning_content") is None
    hidden = chat(srv, extra_body={"reasoning_format": "none"}).choices[0].message
    assert hidden.content == ANSWER.strip() and extra(hidden, "reasoning_content") is None
    deltas = [c.choices[0].delta.content or "" for c in chat(srv, stream=True, extra_body={"reasoning_format": "inline"}) if c.choices]
    assert "".join(deltas) == inline.content


def test_server_wide_reasoning_format():
    s = start(scripted_runtime(), reasoning_format="none")
    try:
        msg = chat(s).choices[0].message
        assert msg.content == ANSWER.strip() and extra(msg, "reasoning_content") is None
        assert extra(chat(s, extra_body={"reasoning_format": "deepseek"}).choices[0].message, "reasoning_content")
    finally:
        s.stop()


# -- reasoning control through request fields --------------------------------------------------------
def test_thinking_budget_field_caps_thinking(srv):
    r = chat(srv, extra_body={"thinking_budget": 3})
    edge = extra(r.usage, "edge")
    assert r.usage.completion_tokens_details.reasoning_tokens == 3
    assert edge["exit_reason"] == "budget" and edge["injected_tokens"] > 0
    assert [c["kind"] for c in edge["controls"]][0] == "budget_exhausted"
    assert "\\boxed{" in r.choices[0].message.content  # an answer always follows
    same = chat(srv, extra_body={"max_thinking_tokens": 3})
    assert same.choices[0].message.content == r.choices[0].message.content


def test_reasoning_effort_field(srv):
    off = chat(srv, reasoning_effort="none")  # OpenAI's name for "off"
    assert off.usage.completion_tokens_details.reasoning_tokens == 0 and "\\boxed{" in off.choices[0].message.content
    low = chat(srv, reasoning_effort="low")  # 512 tokens: more than the script needs
    assert low.usage.completion_tokens_details.reasoning_tokens == len(SCRIPT)


def test_min_thinking_field_extends_with_wait(srv):
    r = chat(srv, extra_body={"min_thinking_tokens": 100})
    kinds = [c["kind"] for c in extra(r.usage, "edge")["controls"]]
    assert kinds.count("wait_injected") == 3  # ThinkingBudget's default max_waits


def test_early_exit_field(srv):
    r = chat(srv, extra_body={"early_exit": {"threshold": 0.9}})
    edge = extra(r.usage, "edge")
    assert edge["exit_reason"] == "early_exit" and edge["probes"] == 3 and edge["probe_tokens"] > 0
    assert r.usage.completion_tokens_details.reasoning_tokens == 6 < len(SCRIPT)
    assert r.choices[0].message.content.endswith("\\boxed{7}")
    probes = [c for c in edge["controls"] if c["kind"] == "probe"]
    assert [p["answer"] for p in probes] == ["3", "3", "7"]
    assert extra(chat(srv, extra_body={"early_exit": True}).usage, "edge")["exit_reason"] == "early_exit"
    assert extra(chat(srv, extra_body={"early_exit": False}).usage, "edge")["exit_reason"] == "eos"


def test_budget_cut_and_signal_budget_fields(srv):
    """The scripted model's probe points are at 2, 4 and 6 thinking tokens; its trial answer is
    sure from 5 on (the srv fixture)."""
    r = chat(srv, extra_body={"thinking_budget": 7, "thinking_budget_cut": "probe"})
    edge = extra(r.usage, "edge")
    assert r.usage.completion_tokens_details.reasoning_tokens == 6 and edge["probes"] == 1
    assert edge["controls"][:2] == [{"kind": "budget_exhausted", "thinking_tokens": 6, "budget": 7, "cut": "probe"},
                                    {"kind": "thinking", "tokens": 1, "text": "Wait"}]  # the step since, taken back
    assert r.choices[0].message.content.endswith("\\boxed{7}")
    for signal in ({"first": 1, "threshold": 0.9, "low": 1, "high": 5}, "1:0.9:1:5"):
        s = extra(chat(srv, extra_body={"signal_budget": signal}).usage, "edge")  # not sure at 2: cut at 4 (cap 5)
        assert s["thinking_tokens"] == 4 and [c for c in s["controls"] if c["kind"] == "signal_budget"][0]["sure"] is False


def test_sampling_fields_map_to_params(srv):
    r = chat(srv, max_tokens=5)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    stopped = chat(srv, stop=["Answer"], reasoning_effort="off")
    assert stopped.choices[0].message.content == "**Final " and stopped.choices[0].finish_reason == "stop"
    a = chat(srv, temperature=1.0, seed=3, max_tokens=8)
    b = chat(srv, temperature=1.0, seed=3, max_tokens=8)
    assert extra(a.choices[0].message, "reasoning_content") == extra(b.choices[0].message, "reasoning_content")


def test_completions_raw_prompt_and_logprobs(srv):
    c = client(srv)
    r = c.completions.create(model="m", prompt="Q?<think>", max_tokens=3, temperature=0, logprobs=2, extra_body={"return_tokens_as_token_ids": True})
    ch = r.choices[0]
    assert extra(ch, "reasoning_content") == "Step one.\n\nStep two."
    lp = ch.logprobs
    b = srv.edge.runtime.backend
    assert lp.tokens == [f"token_id:{b.script_base + i}" for i in range(3)]
    assert all(len(t) == 2 for t in lp.top_logprobs) and lp.token_logprobs[0] == pytest.approx(-0.10536, abs=1e-3)
    stream = c.completions.create(model="m", prompt="Q?<think>", max_tokens=3, temperature=0, logprobs=1, stream=True)
    toks = [t for chunk in stream if chunk.choices and chunk.choices[0].logprobs for t in chunk.choices[0].logprobs.tokens]
    assert toks == ["Step one.", "\n\n", "Step two."]
    # a token-id prompt, one token: the scoring request the remote backend sends
    ids = b.tokenize("Q?<think>")
    one = c.completions.create(model="m", prompt=ids, max_tokens=1, temperature=0, logprobs=5, extra_body={"return_tokens_as_token_ids": True})
    assert one.choices[0].text == "Step one." and one.choices[0].finish_reason == "length"
    assert list(one.choices[0].logprobs.top_logprobs[0])[0] == f"token_id:{b.script_base}"


def test_tokenize_and_detokenize(srv):
    r = http().post(root(srv) + "/tokenize", json={"content": "Q?", "with_pieces": True}, timeout=TIMEOUT).json()
    b = srv.edge.runtime.backend
    assert r["tokens"] == [{"id": b.char_id["Q"], "piece": "Q"}, {"id": b.char_id["?"], "piece": "?"}]
    d = http().post(root(srv) + "/detokenize", json={"tokens": [b.script_base, b.script_base + 1], "with_pieces": True}, timeout=TIMEOUT).json()
    assert d["content"] == "Step one.\n\n" and d["pieces"][1] == {"id": b.script_base + 1, "piece": "\n\n"}


# -- bad input ---------------------------------------------------------------------------------------
def post(srv, path, body=None, *, raw: bytes | None = None, headers=None):
    if raw is not None:
        return http().post(root(srv) + path, content=raw, headers={"content-type": "application/json", **(headers or {})}, timeout=TIMEOUT)
    return http().post(root(srv) + path, json=body, headers=headers, timeout=TIMEOUT)


def assert_error(r, status, param=None, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == ("invalid_request_error" if status < 500 else "server_error")
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


def test_malformed_json_is_400(srv):
    assert_error(post(srv, "/v1/chat/completions", raw=b'{"messages": [{"role": "user", '), 400, code="invalid_json")
    assert_error(post(srv, "/v1/chat/completions", raw=b""), 400, code="invalid_json")
    assert_error(post(srv, "/v1/chat/completions", raw=b"[" * 50_000 + b"]" * 50_000), 400, code="invalid_json")
    assert_error(post(srv, "/v1/chat/completions", raw=b'["not", "an", "object"]'), 400, code="invalid_type")


def test_missing_messages_is_400(srv):
    assert_error(post(srv, "/v1/chat/completions", {"model": "m"}), 400, "messages", "missing_required_parameter")
    assert_error(post(srv, "/v1/chat/completions", {"messages": []}), 400, "messages")
    assert_error(post(srv, "/v1/completions", {"max_tokens": 3}), 400, "prompt", "missing_required_parameter")
    assert_error(post(srv, "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}), 400, "messages")


@pytest.mark.parametrize(
    "field, value, param",
    [
        ("temperature", "hot", "temperature"),
        ("temperature", 5, "temperature"),
        ("top_p", 0, "top_p"),
        ("max_tokens", "ten", "max_tokens"),
        ("max_tokens", 0, "max_tokens"),
        ("seed", 1.5, "seed"),
        ("stop", 7, "stop"),
        ("stop", ["a", "b", "c", "d", "e"], "stop"),
        ("stream", "yes", "stream"),
        ("n", 2, "n"),
        ("messages", "hi", "messages"),
        ("messages", [{"role": "user", "content": 5}], "messages[0].content"),
        ("reasoning_format", "loud", "reasoning_format"),
        ("reasoning_effort", "extreme", "reasoning_effort"),
        ("thinking_budget", -1, "thinking_budget"),
        ("thinking_budget", 10**9, "thinking_budget"),
        ("early_exit", {"threshold": 2}, "early_exit"),
        ("early_exit", {"mode": "vibes"}, "early_exit"),
        ("early_exit", {"treshold": 0.5}, "early_exit"),
        ("early_exit", "sometimes", "early_exit"),
        ("thinking_budget_cut", "sideways", "thinking_budget_cut"),
        ("thinking_budget_cut", "probe", "thinking_budget_cut"),  # with no budget to cut
        ("signal_budget", "40:0.9", "signal_budget"),
        ("signal_budget", {"first": 4, "threshold": 2, "low": 4}, "signal_budget"),
        ("signal_budget", {"frist": 4}, "signal_budget"),
        ("signal_budget", 7, "signal_budget"),
        ("logprobs", True, "logprobs"),
    ],
)
def test_wrong_types_and_values_are_400(srv, field, value, param):
    body = {"messages": MSGS, "max_tokens": 4, field: value}
    assert_error(post(srv, "/v1/chat/completions", body), 400, param)


@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p", "repeat_penalty"])
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinite_sampling_fields_are_400(srv, field, literal):
    # Python's json (the server's parser) reads these non-standard literals as floats
    raw = f'{{"messages": [{{"role": "user", "content": "hi"}}], "max_tokens": 4, "{field}": {literal}}}'.encode()
    for path in ("/v1/chat/completions", "/v1/completions"):
        body = raw if "chat" in path else raw.replace(b'"messages": [{"role": "user", "content": "hi"}]', b'"prompt": "hi"')
        err = assert_error(post(srv, path, raw=body), 400, field)
        assert "finite" in err["message"]


def test_seed_minus_one_is_random_and_other_negative_seeds_are_400(srv):
    assert chat(srv, temperature=1.0, seed=-1, max_tokens=4).choices[0].message is not None
    err = assert_error(post(srv, "/v1/chat/completions", {"messages": MSGS, "max_tokens": 4, "seed": -2}), 400, "seed")
    assert "-1 for a random seed" in err["message"]


def test_effort_and_budget_together_is_400(srv):
    assert_error(post(srv, "/v1/chat/completions", {"messages": MSGS, "reasoning_effort": "low", "thinking_budget": 3}), 400, "reasoning_effort")


def test_huge_max_tokens_is_400(srv):
    err = assert_error(post(srv, "/v1/chat/completions", {"messages": MSGS, "max_tokens": 10**9}), 400, "max_tokens", "max_tokens_too_large")
    assert "8192" in err["message"]
    with pytest.raises(openai.BadRequestError):
        chat(srv, max_tokens=10**6)


def test_bad_completion_prompts_are_400(srv):
    assert_error(post(srv, "/v1/completions", {"prompt": ["a", "b"]}), 400, "prompt")
    assert_error(post(srv, "/v1/completions", {"prompt": [1, -2]}), 400, "prompt")
    assert_error(post(srv, "/v1/completions", {"prompt": [10**9]}), 400, "prompt")
    assert_error(post(srv, "/v1/completions", {"prompt": "x", "echo": True}), 400, "echo")
    assert_error(post(srv, "/v1/completions", {"prompt": "x", "logprobs": 50}), 400, "logprobs")
    assert_error(post(srv, "/v1/completions", {"prompt": "x" * 5000}), 400, "prompt", "context_length_exceeded")


def test_unknown_fields_are_ignored(srv):
    r = post(srv, "/v1/chat/completions", {"messages": MSGS, "max_tokens": 2, "frobnicate": {"x": 1}, "user": "me", "logit_bias": None})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2


def test_body_size_limit_is_413():
    s = start(scripted_runtime(), max_body_bytes=2048)
    try:
        big = {"messages": [{"role": "user", "content": "x" * 4096}]}
        assert_error(post(s, "/v1/chat/completions", big), 413, code="request_too_large")
        chunks = (b'{"messages": [{"role": "user", "content": "' + b"x" * 1000, b"x" * 2000, b'"}]}')
        r = http().post(root(s) + "/v1/chat/completions", content=iter(chunks), timeout=TIMEOUT)  # chunked: no length
        assert_error(r, 413, code="request_too_large")
    finally:
        s.stop()


def test_not_found_and_wrong_method(srv):
    assert_error(http().get(root(srv) + "/v1/nothing", timeout=TIMEOUT), 404)
    assert_error(http().get(root(srv) + "/v1/chat/completions", timeout=TIMEOUT), 405)


# -- security ----------------------------------------------------------------------------------------
def test_api_key_is_required_when_set():
    s = start(scripted_runtime(), api_key="s3cret", reasoning_format="inline")
    try:
        with pytest.raises(openai.AuthenticationError):
            client(s, key="wrong").chat.completions.create(model="m", messages=MSGS, max_tokens=2)
        assert_error(post(s, "/v1/chat/completions", {"messages": MSGS}), 401, code="invalid_api_key")
        assert_error(http().get(root(s) + "/v1/models", headers={"Authorization": "Basic s3cret"}, timeout=TIMEOUT), 401)
        assert http().get(root(s) + "/health", timeout=TIMEOUT).status_code == 200  # liveness stays open
        ok = client(s, key="s3cret").chat.completions.create(model="m", messages=MSGS, max_tokens=2, temperature=0)
        assert ok.choices[0].message.content.startswith("<think>")  # the server's reasoning format
    finally:
        s.stop()


def test_loopback_detection():
    for host in ("127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "192.168.1.4", "10.0.0.1", "example.com", ""):
        assert not is_loopback(host), host


def test_non_loopback_bind_without_key_warns_loudly(caplog):
    assert exposure_warning("127.0.0.1", None) is None
    assert exposure_warning("0.0.0.0", "key") is None
    msg = exposure_warning("0.0.0.0", None)
    assert "WARNING" in msg and "API key" in msg and "0.0.0.0" in msg
    with caplog.at_level(logging.WARNING, logger="edge.server"):
        assert warn_if_exposed("0.0.0.0", None) is True
        assert warn_if_exposed("127.0.0.1", None) is False
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "WITHOUT an API key" in warnings[0].getMessage() and "!!!!" in warnings[0].getMessage()


def test_api_key_compare_is_constant_time(monkeypatch):
    import hmac

    from edge.server import config

    seen = []
    real = hmac.compare_digest
    monkeypatch.setattr(config.hmac, "compare_digest", lambda a, b: seen.append((a, b)) or real(a, b))
    assert config.key_matches("Bearer k1", "k1") and not config.key_matches("Bearer k2", "k1") and not config.key_matches(None, "k1")
    assert len(seen) == 3


# -- queue, cancellation, responsiveness --------------------------------------------------------------
def long_stream(srv, started: threading.Event, stop: threading.Event, out: dict):
    """Stream a long reply until ``stop`` is set, then drop the connection."""
    try:
        with httpx.Client(timeout=TIMEOUT) as c:
            body = {"messages": MSGS, "max_tokens": 500, "stream": True}
            with c.stream("POST", srv.url + "/chat/completions", json=body) as r:
                out["status"] = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data: ") and "reasoning_content" in line:
                        out["chunks"] = out.get("chunks", 0) + 1
                        started.set()
                    if stop.is_set():
                        break
    finally:
        started.set()


def wait_until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return False


def test_queue_full_is_503_with_retry_after_and_disconnect_cancels(slow):
    started, stop, out = threading.Event(), threading.Event(), {}
    before = slow.edge.counters["cancelled"]
    t = threading.Thread(target=long_stream, args=(slow, started, stop, out), daemon=True)
    t.start()
    assert started.wait(TIMEOUT) and out["status"] == 200
    # the event loop stays responsive while the model works in its thread
    t0 = time.monotonic()
    h = http().get(root(slow) + "/health", timeout=TIMEOUT).json()
    assert time.monotonic() - t0 < 1.0 and h["running"] == 1
    # max_queue=0: a second request is refused at once
    r = post(slow, "/v1/chat/completions", {"messages": MSGS, "max_tokens": 2})
    assert_error(r, 503, code="queue_full")
    assert r.headers["retry-after"] == "1"
    with pytest.raises(openai.InternalServerError):
        client(slow).chat.completions.create(model="m", messages=MSGS, max_tokens=2)
    # the client goes away: the generation stops at its next token and frees the model
    stop.set()
    t.join(TIMEOUT)
    assert wait_until(lambda: slow.edge.counters["cancelled"] > before and slow.edge.admitted == 0)
    assert wait_until(lambda: slow.edge.runtime._lock.acquire(blocking=False))
    slow.edge.runtime._lock.release()
    assert out["chunks"] < 500
    r = post(slow, "/v1/chat/completions", {"messages": MSGS, "max_tokens": 2})
    assert r.status_code == 200


def test_non_stream_disconnect_cancels(slow):
    before = slow.edge.counters["cancelled"]
    with pytest.raises(openai.APITimeoutError):
        client(slow, timeout=0.5).chat.completions.create(model="m", messages=MSGS, max_tokens=500)
    assert wait_until(lambda: slow.edge.counters["cancelled"] > before and slow.edge.admitted == 0)


def test_serve_cli_validates_options_before_loading_the_model():
    from click.testing import CliRunner

    from edge.cli.main import cli

    runner = CliRunner()
    r = runner.invoke(cli, ["serve", "--model", "no-such.gguf", "--max-queue", "-1"])
    assert r.exit_code == 2 and r.stderr == "error: the queue size must be >= 0, got -1\n"  # the ConfigError, not "model not found"
    r = runner.invoke(cli, ["serve", "--model", "no-such.gguf", "--reasoning-format", "loud"])
    assert r.exit_code == 2 and "loud" in r.output
    r = runner.invoke(cli, ["serve", "--help"])
    assert r.exit_code == 0 and "--api-key" in r.output and "--reasoning-format" in r.output
