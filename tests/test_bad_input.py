"""Every bad input gets a clear answer: one warning or error line, a 4xx, never a traceback, a
hang or a broken connection (issue 13)."""

from __future__ import annotations

import pytest

from tests.conftest import run_cli

BAD = b"a = 1. b = a + 1. What is b?\xff\xfe"  # ends in bytes that are not UTF-8
REPLACED = "is not valid UTF-8; its invalid bytes were replaced with U+FFFD"


def _lines(err: bytes) -> list[str]:
    return err.decode("utf-8", "replace").splitlines()


def _warnings(err: bytes) -> list[str]:
    return [line for line in _lines(err) if REPLACED in line]


# -- the command line: invalid UTF-8 becomes U+FFFD, said once, and the run goes on ---------------
@pytest.mark.parametrize("errors", ["", "utf-8:strict"], ids=["locale", "strict-stdin"])
def test_run_reads_invalid_utf8_on_stdin(errors):
    r = run_cli("run", "-", "--temperature", "0", "--max-tokens", "8", input=BAD + b"\n", env={"PYTHONIOENCODING": errors})
    assert r.returncode == 0, r.stderr
    assert [w.split(" is ")[0] for w in _warnings(r.stderr)] == ["warning: stdin"]
    assert b"Traceback" not in r.stderr


def test_run_takes_an_invalid_utf8_argument():
    r = run_cli("run", BAD, "--system", b"Be brief.\xc3", "--temperature", "0", "--max-tokens", "8", input=b"")
    assert r.returncode == 0, r.stderr
    assert [w.split(" is ")[0] for w in _warnings(r.stderr)] == ["warning: --system", "warning: the PROMPT argument"]
    assert b"Traceback" not in r.stderr


def test_chat_session_survives_invalid_utf8():
    lines = [BAD, b"c = 4. d = c + 2. What is d?\xff", b"/stats"]
    r = run_cli("chat", "--temperature", "0", "--max-tokens", "300", input=b"\n".join(lines) + b"\n",
                env={"PYTHONIOENCODING": "utf-8:strict"})
    assert r.returncode == 0, r.stderr
    assert len(_warnings(r.stderr)) == 1  # once per session, not per line
    assert r.stdout.count(b"\\boxed{") == 2  # both questions answered
    assert b"finish_reason: stop" in r.stderr  # /stats after them: the session went on
    assert b"Traceback" not in r.stderr and b"error:" not in r.stderr


def test_runtime_refuses_a_lone_surrogate_with_a_prompt_error():
    from edge.errors import PromptError
    from edge.runtime import Runtime

    with Runtime() as rt, pytest.raises(PromptError, match="lone surrogate"):
        rt.ask("What is b?\ud800")


# -- the server -----------------------------------------------------------------------------------
BODY_TIMEOUT = 2.0
@pytest.fixture(scope="module")
def server():
    from edge.runtime import Runtime
    from edge.server import ServerConfig, ServerThread

    with Runtime(n_ctx=512, threads=1) as rt, ServerThread(rt, ServerConfig(port=0, log_level="warning", body_timeout_s=BODY_TIMEOUT)) as srv:
        yield srv


# lone surrogates are a 400 and the connection stays up
def test_lone_surrogates_are_400_on_one_keep_alive_connection(server):
    import http.client
    import json
    import logging

    class Recorder(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.records = []

        def emit(self, record):
            self.records.append(record)

    recorder = Recorder()
    loggers = [logging.getLogger(n) for n in ("uvicorn.error", "edge.server")]
    for lg in loggers:
        lg.addHandler(recorder)
    good = json.dumps({"model": "tiny-r1", "messages": [{"role": "user", "content": "a = 1. What is a?"}], "max_tokens": 2})
    bad = [  # (path, raw JSON): escapes as clients write them, and CESU-8 bytes
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "What is b?\\ud800"}], "max_tokens": 2}'),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "x"}], "stream": true, "stop": ["\\udfff"]}'),
        ("/v1/completions", '{"prompt": "a = 1.\\udc00", "max_tokens": 2}'),
        ("/v1/completions", b'{"prompt": "a = 1.\xed\xa0\x80", "max_tokens": 2}'),
        ("/tokenize", '{"content": "\\ud83d"}'),
    ]
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    statuses, errors, socks = {"good": [], "bad": []}, [], set()
    try:
        for i in range(50):
            for kind, (path, body) in (("bad", bad[i % len(bad)]), ("good", ("/v1/chat/completions", good))):
                try:
                    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
                    r = conn.getresponse()
                    payload = r.read()
                    socks.add(conn.sock.getsockname())
                    statuses[kind].append(r.status)
                    if kind == "bad" and r.status == 400:
                        errors.append(json.loads(payload)["error"])
                except (OSError, http.client.HTTPException) as exc:  # a reset: count it, go on anew
                    statuses[kind].append(type(exc).__name__)
                    conn.close()
    finally:
        conn.close()
        for lg in loggers:
            lg.removeHandler(recorder)
    assert statuses == {"good": [200] * 50, "bad": [400] * 50}
    assert len(socks) == 1  # one connection served all 100 requests
    assert {e["code"] for e in errors} == {"invalid_unicode"}
    assert {e["param"] for e in errors} == {"messages[0].content", "stop[0]", "prompt", "content"}
    assert "lone UTF-16 surrogate" in errors[0]["message"]
    assert not [r for r in recorder.records if r.exc_info], "a traceback was logged"


# a body shorter than its Content-Length: 408 after the body timeout, and the connection closed
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_body_that_never_ends_is_408_and_closed(server, framing):
    import json
    import socket

    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    if framing == "content-length":
        request = head + "Content-Length: 100\r\n\r\n" + '{"messages": ['  # 86 bytes short
    else:
        request = head + "Transfer-Encoding: chunked\r\n\r\n" + "e\r\n" + '{"messages": [' + "\r\n"  # no last chunk
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:  # 30 s: a hang, not a speed bound
        sock.sendall(request.encode())
        reply = b""
        while chunk := sock.recv(65536):  # until the server closes the connection
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), reply
    assert b"connection: close" in head.lower()
    error = json.loads(body)["error"]
    assert error["code"] == "request_timeout" and f"within {BODY_TIMEOUT:g} s" in error["message"]
    assert httpx_get(server, "/health").status_code == 200  # the server goes on


def httpx_get(server, path):
    import httpx

    return httpx.get(server.url.removesuffix("/v1") + path, timeout=30)


def test_body_timeout_is_validated_and_settable_from_the_cli():
    from edge.errors import ConfigError
    from edge.server import ServerConfig

    assert ServerConfig().body_timeout_s == 30.0
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="body timeout"):
            ServerConfig(body_timeout_s=bad)
    r = run_cli("serve", "--body-timeout", "0", "--port", "0")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["error: the body timeout must be a finite number of seconds > 0, got 0.0"], r.stderr
    assert "--body-timeout" in run_cli("serve", "--help").stdout


def _openai(server):
    import openai

    return openai.OpenAI(base_url=server.url, api_key="unused", timeout=60, max_retries=0)


# role "developer" (current OpenAI clients) is a system message
def test_developer_role_is_a_system_message(server):
    api = _openai(server)
    question = {"role": "user", "content": "a = 1. b = a + 1. What is b?"}

    def prompt_tokens(*messages):
        r = api.chat.completions.create(model="tiny-r1", messages=list(messages), max_tokens=2, temperature=0)
        return r.usage.prompt_tokens

    as_developer = prompt_tokens({"role": "developer", "content": "Think briefly."}, question)
    assert as_developer == prompt_tokens({"role": "system", "content": "Think briefly."}, question)
    assert as_developer > prompt_tokens(question)  # the instruction is in the prompt


# any model name is served by the one loaded model, and the response names the real one
def test_unknown_model_name_is_served_by_the_loaded_model(server):
    api = _openai(server)
    (card,) = api.models.list().data
    msgs = [{"role": "user", "content": "a = 1. b = a + 1. What is b?"}]
    for name in ("gpt-4o", "no-such-model", ""):
        chat = api.chat.completions.create(model=name, messages=msgs, max_tokens=2, temperature=0)
        assert chat.model == card.id and chat.usage.completion_tokens == 2
        stream = api.chat.completions.create(model=name, messages=msgs, max_tokens=2, temperature=0, stream=True)
        assert {chunk.model for chunk in stream} == {card.id}
        completion = api.completions.create(model=name, prompt="a = 1. b = a + 1.", max_tokens=2, temperature=0)
        assert completion.model == card.id
