"""The remote backend against a real ``llama-server`` (built by ``.ci/build-peers``) on a loopback
port: the same greedy replies and controller behaviour as llama.cpp in process on the same GGUF,
and one clear error, never a hang, when the server is absent, dies, stalls, fails or is too small.

Faults are injected by a loopback proxy (:mod:`tests.faultproxy`) between the backend and the
server. Timeouts are small so the whole file runs in well under a minute.
"""

from __future__ import annotations

import copy
import string
import subprocess
import sys
import time

import pytest

from edge.backends.remote import RemoteBackend
from edge.benchmarks.tasks import load_task
from edge.control.budget import ThinkingBudget
from edge.control.early_exit import EarlyExit
from edge.errors import BackendError, ConfigError, PromptError
from edge.events import BudgetExhausted, Probe, ThinkingDelta, WaitInjected
from edge.model_ref import default_model
from edge.params import SamplingParams
from edge.runtime import Runtime, collect
from tests.conftest import REPO
from tests.faultproxy import FaultProxy
from tests.peers import LlamaServer, free_port, require_peer

GREEDY = SamplingParams(temperature=0, top_p=1.0, max_tokens=400)
TINY = default_model()  # the bundled tiny-r1 (1.8 MB): starts in a blink, really thinks


@pytest.fixture(scope="module")
def llama_server_bin():
    return require_peer("llama-server")


@pytest.fixture(scope="module")
def server(llama_server_bin):
    with LlamaServer(llama_server_bin, TINY, n_ctx=1024) as s:
        yield s


@pytest.fixture(scope="module")
def local():
    rt = Runtime(str(TINY), n_ctx=1024, threads=1, device="cpu")
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def problems():
    items = load_task("tiny-r1")
    return {level: [i for i in items if i.level == level] for level in range(1, 9)}


@pytest.fixture
def proxy(server):
    with FaultProxy(server.port) as p:
        yield p


def ask(rt: Runtime, prompt: str, controllers=(), params: SamplingParams = GREEDY):
    return collect(rt.chat([{"role": "user", "content": prompt}], params, controllers=list(controllers)))


def same_reply(far, near) -> None:
    assert far.reasoning == near.reasoning and far.answer == near.answer
    for k in ("prompt_tokens", "thinking_tokens", "answer_tokens", "probe_tokens", "retracted_tokens", "exit_reason"):
        assert getattr(far.stats, k) == getattr(near.stats, k), k
    assert [type(c) for c in far.controls] == [type(c) for c in near.controls]


# -- (a) no server ---------------------------------------------------------------------------------
def test_no_server_is_one_clear_error_in_python_and_the_cli(cli):
    url = f"http://127.0.0.1:{free_port()}/v1"
    t = time.monotonic()
    with pytest.raises(BackendError, match=r"cannot be reached \(connection refused\); is it running") as e:
        Runtime(url, backend="remote")
    assert url in str(e.value) and time.monotonic() - t < 3  # two quick retries, then the error
    r = cli("run", "-m", url, "--backend", "remote", "What is 2+2?", timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"error: the server at {url} cannot be reached"), r.stderr
    assert "Traceback" not in r.stderr


# -- (b) the server dies in the middle of a reply -----------------------------------------------------
def test_server_killed_mid_stream_fails_at_once(llama_server_bin, problems):
    with LlamaServer(llama_server_bin, TINY, n_ctx=1024) as s, Runtime(s.url, backend="remote") as rt:
        events = rt.chat([{"role": "user", "content": problems[8][0].prompt}], GREEDY)
        seen = 0
        with pytest.raises(BackendError, match="cannot be reached|dropped the connection") as e:
            for ev in events:
                seen += isinstance(ev, ThinkingDelta)
                if seen == 10:
                    s.kill()
                    t = time.monotonic()
        assert seen == 10 and time.monotonic() - t < 3
        assert s.url in str(e.value)


def test_cli_reports_a_killed_server_in_one_line(llama_server_bin, problems):
    with LlamaServer(llama_server_bin, TINY, n_ctx=1024) as s:
        cmd = [sys.executable, "-m", "edge.cli.main", "run", "-m", s.url, "--backend", "remote", "--temperature", "0", problems[8][0].prompt]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
        assert proc.stderr.readline().startswith("Thinking...")
        assert proc.stderr.read(20)  # thinking streams: the reply is under way
        s.kill()
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "\\boxed{" not in out
    last = err.rstrip("\n").splitlines()[-1]
    assert last.startswith("error: the server at ") and "Traceback" not in err, err


# -- (c) a stalled or crawling server -----------------------------------------------------------------
@pytest.mark.parametrize("fault", ["stall", "trickle"])
def test_a_stalled_server_times_out_and_the_backend_recovers(proxy, local, problems, fault):
    prompt = problems[2][0].prompt
    with Runtime(proxy.url, backend="remote", timeout=1.0) as rt:
        proxy.inject(fault, after=20)  # mid-thinking
        t = time.monotonic()
        with pytest.raises(BackendError, match=r"did not answer POST /v1/completions within 1 s"):
            ask(rt, prompt)
        assert 1.0 <= time.monotonic() - t < 4  # the tokens before it, then one timeout: no hang, no retry
        assert proxy.actions(fault) == 1
        same_reply(ask(rt, prompt), ask(local, prompt))  # the next request runs on a fresh connection


def test_cli_timeout_option(proxy, problems, cli):
    proxy.inject("stall", after=5)
    r = cli("run", "-m", proxy.url, "--backend", "remote", "--timeout", "1", "--temperature", "0", problems[1][0].prompt, timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.rstrip("\n").splitlines()[-1].startswith(f"error: the server at {proxy.url} did not answer POST /v1/completions within 1 s")


def test_timeout_options_are_checked(cli):
    r = cli("run", "--timeout", "1", "What is 2+2?")
    assert r.returncode == 2 and r.stderr == "error: --timeout applies to --backend remote only\n"
    for bad in ({"timeout": 0}, {"timeout": float("nan")}, {"connect_timeout": -1}, {"retries": -1}, {"retries": 1.5}):
        with pytest.raises(ConfigError):
            RemoteBackend("http://127.0.0.1:1/v1", **bad)


# -- (d) 5xx and dropped connections -------------------------------------------------------------------
@pytest.mark.parametrize("fault", ["502", "500", "504", "cut", "cut-mid"])
def test_transient_failures_are_retried_without_changing_the_reply(proxy, local, problems, fault):
    prompt = problems[1][0].prompt
    with Runtime(proxy.url, backend="remote") as rt:  # 2 retries by default
        proxy.inject(fault, after=15, times=2)  # twice in a row, mid-thinking: within the 2 retries
        far = ask(rt, prompt)
    assert proxy.actions(fault) == 2 and not proxy.faults
    same_reply(far, ask(local, prompt))


@pytest.mark.parametrize("fault, attempts, message", [
    ("502", 3, "answered 502 to POST /v1/completions after 3 attempts: injected 502"),
    # a dropped kept-alive connection is first taken for one the server closed while idle: one
    # immediate reconnect, then the 2 retries
    ("cut", 4, r"dropped the connection during POST /v1/completions \(closed without an answer\) after 4 attempts"),
])
def test_persistent_failures_give_up_after_the_retries(proxy, problems, fault, attempts, message):
    with Runtime(proxy.url, backend="remote") as rt:
        proxy.inject(fault, after=5, times=100)
        t = time.monotonic()
        with pytest.raises(BackendError, match=message):
            ask(rt, problems[1][0].prompt)
    assert proxy.actions(fault) == attempts and time.monotonic() - t < 3  # 0.25 s, then 0.5 s between retries


def test_client_errors_are_not_retried(proxy, problems):
    with Runtime(proxy.url, backend="remote") as rt:
        proxy.inject("400", times=100)
        with pytest.raises(BackendError, match="answered 400 to POST /v1/completions: injected 400"):
            ask(rt, problems[1][0].prompt)
    assert proxy.actions("400") == 1


# -- (e) a prompt longer than the server's context -----------------------------------------------------------
def test_context_overflow_is_the_same_prompt_error_as_in_process(llama_server_bin, problems):
    prompt = " ".join(i.prompt for i in problems[8][:6])  # about 400 tokens
    with Runtime(str(TINY), n_ctx=256, threads=1, device="cpu") as near:
        with pytest.raises(PromptError, match="context") as in_process:
            ask(near, prompt)
    with LlamaServer(llama_server_bin, TINY, n_ctx=256) as s:  # llama-server's smallest context
        with Runtime(s.url, backend="remote") as far:
            assert far.backend.n_ctx == 255  # read from /props: refused before any request
            with pytest.raises(PromptError, match="context") as remote:
                ask(far, prompt)
        assert type(remote.value) is type(in_process.value)
        assert str(remote.value).split(" but ")[0] == str(in_process.value).split(" but ")[0]  # "the prompt is N tokens"
        # a server that does not say its context size: its own 400 answer becomes the same error
        def unsized(answer: dict) -> dict:
            answer.get("default_generation_settings", {}).pop("n_ctx", None)
            for card in answer.get("data", []):
                for k in ("n_ctx", "n_ctx_train"):
                    card.get("meta", {}).pop(k, None)
            return answer

        with FaultProxy(s.port) as proxy:
            proxy.inject(unsized, path="/props")
            proxy.inject(unsized, path="/v1/models")
            with Runtime(proxy.url, backend="remote") as blind:
                assert blind.backend.n_ctx == 4096  # the backend's guess
                with pytest.raises(PromptError, match=r"does not fit the server's context \(.*context size"):
                    ask(blind, prompt)
            assert proxy.log[-1] == ("POST", "/v1/completions", "pass")  # the server refused it


# -- (f) the same replies as llama.cpp in process --------------------------------------------------------
@pytest.fixture(scope="module")
def remote(server):
    rt = Runtime(server.url, backend="remote", n_ctx=1024)
    yield rt
    rt.close()


def test_llama_server_mirrors_the_model(remote, local):
    far, near = remote.backend, local.backend
    assert far.info.name == "remote" and far.n_vocab == near.n_vocab and far.eos_token_ids == near.eos_token_ids
    assert far.bos_token == near.bos_token and far.eos_token == near.eos_token and far.add_bos == near.add_bos
    assert far.n_ctx == 1023  # the server keeps one position for the token it generates
    msgs = [{"role": "user", "content": "t = 5. u = t + 1. What is u?"}]
    assert remote.render(msgs) == local.render(msgs)
    ids = remote.tokenize_prompt(remote.render(msgs))
    assert ids == local.tokenize_prompt(local.render(msgs))
    assert [far.token_bytes(t) for t in ids] == [near.token_bytes(t) for t in ids]


@pytest.mark.parametrize("level", [1, 4, 7])
def test_greedy_replies_match_in_process(remote, local, problems, level):
    item = problems[level][0]
    before = remote.backend.requests
    far, near = ask(remote, item.prompt), ask(local, item.prompt)
    same_reply(far, near)
    assert far.answer.endswith(f"\\boxed{{{item.gold}}}")
    assert remote.backend.requests - before >= far.stats.completion_tokens  # one round trip per token


@pytest.mark.parametrize("budget", [ThinkingBudget(max_thinking=12), ThinkingBudget(max_thinking=100, cut="step"),
                                    ThinkingBudget(min_thinking=200, max_waits=1)], ids=["hard", "step", "wait"])
def test_thinking_budgets_match_in_process(remote, local, problems, budget):
    item = problems[3][0]
    far, near = ask(remote, item.prompt, [copy.deepcopy(budget)]), ask(local, item.prompt, [copy.deepcopy(budget)])
    same_reply(far, near)
    assert any(isinstance(c, (BudgetExhausted, WaitInjected)) for c in far.controls)


@pytest.mark.parametrize("record_only", [False, True], ids=["exit", "record-only"])
def test_early_exit_matches_in_process(remote, local, problems, record_only):
    # each line of tiny-r1's thinking starts with a variable name: with the letters as step words,
    # it is probed at every step, early ones unsure (confidence down to 0.89) and later ones sure
    def early_exit():
        return [EarlyExit(threshold=0.9, words=tuple(string.ascii_lowercase), record_only=record_only)]

    item = problems[5][0]
    far, near = ask(remote, item.prompt, early_exit()), ask(local, item.prompt, early_exit())
    same_reply(far, near)
    probes = lambda r: [(c.answer, c.confidence) for c in r.controls if isinstance(c, Probe)]  # noqa: E731
    assert [a for a, _ in probes(far)] == [a for a, _ in probes(near)]
    assert len(probes(far)) == far.stats.probes == (25 if record_only else 3)
    assert min(c for _, c in probes(near)) < 0.9
    for (_, cf), (_, cn) in zip(probes(far), probes(near)):
        assert cf == pytest.approx(cn, abs=2e-3)  # the top-20 renormalised vs the whole distribution
    assert far.stats.exit_reason == ("eos" if record_only else "early_exit")


def test_smollm2_greedy_matches_in_process(llama_server_bin, smollm2, smollm2_runtime):
    params = SamplingParams(temperature=0, max_tokens=16)
    with LlamaServer(llama_server_bin, smollm2, n_ctx=1024) as s, Runtime(s.url, backend="remote") as rt:
        far_b, near_b = rt.backend, smollm2_runtime.backend
        assert far_b.chat_template == near_b.chat_template
        # llama-server names only eos_token (<|im_end|>); llama.cpp in process also ends a reply at
        # <|endoftext|> and <reponame>, which llama-server's API does not list
        assert far_b.eos_token_ids == frozenset(near_b.tokenize(near_b.eos_token)) < near_b.eos_token_ids
        text = "Héllo <|im_end|> wörld"
        assert far_b.tokenize(text) == near_b.tokenize(text)
        smollm2_runtime.backend.rollback(0)
        near = collect(smollm2_runtime.chat([{"role": "user", "content": "Name a colour."}], params))
        far = collect(rt.chat([{"role": "user", "content": "Name a colour."}], params))
    assert far.answer and far.answer == near.answer and far.stats.answer_tokens == near.stats.answer_tokens
