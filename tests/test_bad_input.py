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
