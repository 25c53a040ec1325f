"""Chat templates are untrusted input with a budget: time, output size, and single C operations.

The library part runs templates directly; the CLI and server parts use real copies of the
bundled tiny-r1 GGUF whose ``tokenizer.chat_template`` a test replaced (tests/gguf_edit.py)."""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter

import pytest

from edge.deadline import DeadlineExceeded, call_with_deadline
from edge.errors import ChatTemplateError, ConfigError, PromptError
from edge.templates import ChatTemplate, TemplateLimits

MSGS = [{"role": "user", "content": "hi"}]
NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
NESTED_OUTPUT = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"
# the same endless output in 4 KiB pieces: it passes the CLI's 4 MiB limit in ~1,000 steps, far
# inside the 2 s render deadline even on a loaded machine (one character a step took ~2 s there)
NESTED_OUTPUT_FAST = "{% for i in range(100000) %}{% for j in range(100000) %}{{ 'x' * 4096 }}{% endfor %}{% endfor %}"
HANG = 60.0  # generous bound: past it, a render counts as hung


def finishes(fn, seconds: float = HANG):
    """``fn()``'s result or exception, failing the test if it runs past ``seconds`` (it then
    keeps running on a daemon thread: the hang itself is the failure)."""
    box: dict = {}

    def work() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the test
            box["error"] = exc

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


def cpu_while_idle(seconds: float = 0.5) -> float:
    """CPU seconds this process spends while the test sleeps: ~0 unless a thread still spins."""
    c0 = time.process_time()
    time.sleep(seconds)
    return time.process_time() - c0


# -- the time limit --------------------------------------------------------------------------------
def test_nested_loop_template_is_stopped_at_its_deadline_and_frees_the_core():
    tpl = ChatTemplate(NESTED_LOOPS)
    with pytest.raises(ChatTemplateError, match=r"^chat template: .* stopped after 0\.3 s, its time limit"):
        finishes(lambda: tpl.render(MSGS, limits=TemplateLimits(timeout_s=0.3)))
    assert cpu_while_idle() < 0.25  # nothing keeps running once the render was stopped


def test_the_deadline_stops_a_render_on_any_thread():
    results: list[BaseException] = []

    def render() -> None:
        try:
            ChatTemplate(NESTED_LOOPS).render(MSGS, limits=TemplateLimits(timeout_s=0.2))
        except ChatTemplateError as exc:
            results.append(exc)

    threads = [threading.Thread(target=render) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG)
    assert not any(t.is_alive() for t in threads) and len(results) == 4


def test_a_deadline_never_surfaces_after_its_call_returned_nor_deadlocks():
    # work that ends around its deadline, many times: the watchdog fires before, during and
    # just after the work; no exception may escape into the code that follows, and no lock may
    # be left held by an exception that arrived inside it
    rng = random.Random(0)
    outcomes: Counter[str] = Counter()

    def trials() -> None:
        for _ in range(2000):
            n = rng.randrange(100, 20000)
            try:
                call_with_deadline(lambda: sum(range(n)), rng.uniform(0.00005, 0.001))
                outcomes["returned"] += 1
            except DeadlineExceeded:
                outcomes["stopped"] += 1
            try:
                for _ in range(20):
                    sum(range(100))
            except DeadlineExceeded:
                outcomes["escaped"] += 1

    finishes(trials)
    assert outcomes["escaped"] == 0 and outcomes["returned"] > 0 and outcomes["stopped"] > 0, outcomes


def test_a_normal_template_renders_as_before():
    tpl = ChatTemplate("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}<|assistant|>", name="given")
    assert tpl.render(MSGS) == "<|user|>hi\n<|assistant|>"


# -- the output limit ---------------------------------------------------------------------------------
def test_output_past_the_size_limit_is_stopped_while_it_is_generated():
    tpl = ChatTemplate(NESTED_OUTPUT)
    with pytest.raises(ChatTemplateError, match=r"output passed 1000 characters, the limit"):
        finishes(lambda: tpl.render(MSGS, limits=TemplateLimits(timeout_s=HANG, max_chars=1000)))


def test_output_at_the_size_limit_is_kept():
    tpl = ChatTemplate("{% for i in range(1000) %}x{% endfor %}")
    assert tpl.render(MSGS, limits=TemplateLimits(max_chars=1000)) == "x" * 1000


# -- single C operations that no deadline can interrupt ------------------------------------------------
@pytest.mark.parametrize(
    "source",
    [
        "{{ 10 ** (10 ** 9) }}",  # folded at compile time unless intercepted
        "{% set n = 9 %}{{ 10 ** (10 ** n) }}",
        "{% set ns = namespace(x=3) %}{% for i in range(64) %}{% set ns.x = ns.x * ns.x %}{% endfor %}",
        "{{ 'x' * 10000000000 }}",
        "{{ [1] * 10000000000 }}",
        "{{ 'x'.ljust(10000000000) }}",
        "{{ 'x'.zfill(10000000000) }}",
        "{{ '%010000000000d' % 1 }}",
        "{{ '%*d' % (10000000000, 1) }}",
        "{{ '{:>10000000000}'.format(1) }}",
        "{{ '{:>{}}'.format(1, 10000000000) }}",
        "{{ 'x'|center(10000000000) }}",
        "{{ '%10000000000d'|format(1) }}",
        "{{ ('x\n' * 1000)|indent(100000) }}",
    ],
    ids=["pow-const", "pow", "square-loop", "str-repeat", "list-repeat", "ljust", "zfill", "percent-width", "percent-star",
         "format-width", "format-nested", "center", "format-filter", "indent"],
)
def test_operations_over_the_budget_are_refused_before_they_run(source):
    with pytest.raises(ChatTemplateError, match=r"^chat template: .* was stopped: .*(over the limit|bits)"):
        finishes(lambda: ChatTemplate(source).render(MSGS, limits=TemplateLimits(timeout_s=HANG, max_chars=1 << 20)), 20.0)


def test_the_same_operations_within_the_budget_work():
    source = (
        "{{ loop_free }}{{ 2 ** 10 }} {{ 7 % 3 }} {{ '%s:%03d' % ('a', 5) }} {{ '{}!'.format('b') }} {{ 'ab' * 3 }} "
        "{{ [1, 2] * 2 }} {{ 'x'|center(5) }}|{{ 'x'.ljust(3) }}|{{ '%2s'|format('y') }} {{ 2 ** 0.5 }}"
    )
    out = ChatTemplate(source).render(MSGS, loop_free="")
    assert out == "1024 1 a:005 b! ababab [1, 2, 1, 2]   x  |x  | y 1.4142135623730951"


# -- parse and render errors ---------------------------------------------------------------------------
def test_a_template_that_does_not_parse_is_one_clear_error_at_check():
    with pytest.raises(ChatTemplateError, match=r"^chat template: the given template does not parse \(line 1: Expected an expression"):
        ChatTemplate("{% for %}", name="given").check()


def test_a_failing_render_is_a_chat_template_error():
    with pytest.raises(ChatTemplateError, match=r"^chat template: the model's template failed to render: UndefinedError"):
        ChatTemplate("{{ foo.bar }}").render(MSGS)
    with pytest.raises(ChatTemplateError, match="RecursionError"):
        ChatTemplate("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}").render(MSGS)


def test_raise_exception_still_refuses_the_messages():
    with pytest.raises(PromptError, match="refused these messages: no system role"):
        ChatTemplate("{{ raise_exception('no system role') }}").render(MSGS)


@pytest.mark.parametrize("kw", [{"timeout_s": 0}, {"timeout_s": -1}, {"max_chars": 0}])
def test_limits_are_validated(kw):
    with pytest.raises(ConfigError):
        TemplateLimits(**kw)


# -- through the CLI, on GGUFs carrying these templates ----------------------------------------------
@pytest.fixture(scope="module")
def gguf_with(tmp_path_factory):
    """``gguf_with(template)``: a copy of the bundled tiny-r1 whose chat template is ``template``."""
    from tests.gguf_edit import with_chat_template

    made: dict[str, object] = {}

    def make(template: str):
        if template not in made:
            made[template] = with_chat_template(tmp_path_factory.mktemp("gguf") / "model.gguf", template)
        return made[template]

    return make


def one_line_error(r, *needles: str) -> str:
    assert r.returncode != 0
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: chat template: "), lines[0]
    for n in needles:
        assert n in lines[0], lines[0]
    assert "Traceback" not in r.stderr
    return lines[0]


def test_cli_run_stops_a_nested_loop_template_from_the_gguf(cli, gguf_with):
    r = cli("run", "hi", "-m", str(gguf_with(NESTED_LOOPS)), "--max-tokens", "4", timeout=HANG)
    one_line_error(r, "the model's template was stopped after 2 s, its time limit")
    assert r.stdout == ""


def test_cli_run_stops_a_gguf_template_whose_output_never_ends(cli, gguf_with):
    r = cli("run", "hi", "-m", str(gguf_with(NESTED_OUTPUT_FAST)), "--max-tokens", "4", timeout=HANG)
    one_line_error(r, f"the output passed {4 << 20} characters, the limit")


def test_cli_run_refuses_a_gguf_template_that_does_not_parse(cli, gguf_with):
    r = cli("run", "hi", "-m", str(gguf_with("{% for %}")), "--max-tokens", "4", timeout=HANG)
    one_line_error(r, "the model's template does not parse (line 1: Expected an expression")
    assert r.returncode == ConfigError.exit_code


def test_cli_serve_refuses_a_gguf_template_that_does_not_parse_at_startup(cli, gguf_with):
    r = cli("serve", "-m", str(gguf_with("{% for %}")), "--port", "0", timeout=HANG)  # a server that started would outlive the timeout
    one_line_error(r, "the model's template does not parse")


def test_cli_serve_refuses_a_template_file_that_does_not_parse_at_startup(cli, tmp_path):
    bad = tmp_path / "template.jinja"
    bad.write_text("{% for %}")
    r = cli("serve", "--chat-template", str(bad), "--port", "0", timeout=HANG)
    one_line_error(r, "the given template does not parse")


def test_cli_run_on_a_gguf_copy_with_the_same_template_answers_as_the_original(cli, gguf_with):
    from tests.gguf_edit import BUNDLED, chat_template_of

    args = ("run", "a = 3. b = a + 4. What is b?", "--temperature", "0", "--max-tokens", "24", "--json")
    copy, original = cli(*args, "-m", str(gguf_with(chat_template_of(BUNDLED)))), cli(*args)
    assert copy.returncode == 0 and original.returncode == 0, copy.stderr + original.stderr
    assert json.loads(copy.stdout)["reasoning"] == json.loads(original.stdout)["reasoning"]


def test_llama_cpp_python_never_compiles_the_gguf_template(gguf_with):
    from edge.backends.llamacpp import LlamaCppBackend

    with LlamaCppBackend(gguf_with("{% for %}"), n_ctx=64, threads=1) as b:  # its formatter would raise here
        assert b.chat_template == "{% for %}"
        assert "tokenizer.chat_template" not in b.llama.metadata and b.llama.gguf_metadata["tokenizer.chat_template"] == "{% for %}"


# -- the Python API ---------------------------------------------------------------------------------
def scripted_runtime(template: str, **limits):
    from edge.runtime import Runtime
    from tests.scripted import ScriptedBackend

    return Runtime(backend=ScriptedBackend(["ok"], " done", chat_template=template), template_limits=TemplateLimits(**limits))


def test_runtime_refuses_a_template_that_does_not_parse_when_built():
    with pytest.raises(ChatTemplateError, match="the model's template does not parse"):
        scripted_runtime("{% for %}")


def test_achat_renders_off_the_event_loop():
    import asyncio

    rt = scripted_runtime(NESTED_LOOPS, timeout_s=0.5)

    async def main() -> int:
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticker = asyncio.create_task(tick())
        with pytest.raises(ChatTemplateError, match="stopped after 0.5 s"):
            async for _ in rt.achat(MSGS):
                pass
        ticker.cancel()
        return ticks

    assert finishes(lambda: asyncio.run(main())) > 5  # the loop kept running while the template did


# -- through a real server --------------------------------------------------------------------------
def serve_model(path, **cfg):
    from edge.runtime import Runtime
    from edge.server import ServerConfig, ServerThread

    rt = Runtime(str(path), n_ctx=256, threads=1)
    return rt, ServerThread(rt, ServerConfig(port=0, log_level="warning", **cfg)).start()


def chat(base: str, stream: bool = False, timeout: float = HANG):
    import httpx

    body = {"messages": MSGS, "max_tokens": 2, "stream": stream}
    return httpx.post(f"{base}/chat/completions", json=body, timeout=timeout)


def health(srv) -> tuple[dict, float]:
    import httpx

    t0 = time.perf_counter()
    r = httpx.get(srv.url.removesuffix("/v1") + "/health", timeout=HANG)
    return r.json(), time.perf_counter() - t0


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_server_answers_a_template_past_its_deadline_with_a_json_error(gguf_with, stream):
    rt, srv = serve_model(gguf_with(NESTED_LOOPS), template_timeout_s=0.3)
    with rt, srv:
        r = chat(srv.url, stream=stream)
        assert r.status_code == 500 and r.headers["content-type"] == "application/json"
        err = r.json()["error"]
        assert err["code"] == "chat_template_error" and err["type"] == "server_error"
        assert err["message"] == "chat template: the model's template was stopped after 0.3 s, its time limit (it loops too long or forever)"


def test_server_answers_a_template_that_fails_to_render_with_a_json_error(gguf_with):
    rt, srv = serve_model(gguf_with("{{ foo.bar }}"))
    with rt, srv:
        r = chat(srv.url)
        assert r.status_code == 500 and r.json()["error"]["code"] == "chat_template_error"
        assert r.json()["error"]["message"].startswith("chat template: the model's template failed to render: UndefinedError")


def test_41_slow_template_requests_are_bounded_by_the_queue_and_health_stays_fast(gguf_with):
    # 41 > the 40 worker threads starlette lends: before, each render held one forever and
    # /health timed out; now renders happen one at a time inside the admission queue
    rt, srv = serve_model(gguf_with(NESTED_LOOPS), template_timeout_s=0.3, max_queue=2)
    with rt, srv:
        statuses: list[int] = []
        flood = [threading.Thread(target=lambda: statuses.append(chat(srv.url).status_code)) for _ in range(41)]
        for t in flood:
            t.start()
        time.sleep(0.2)
        during, seconds_during = health(srv)
        for t in flood:
            t.join(HANG)
        after, seconds_after = health(srv)
        assert seconds_during < 1.0 and seconds_after < 1.0
        assert during["queued"] >= 1  # renders are visible as queued work
        assert len(statuses) == 41 and set(statuses) == {500, 503}  # each answered: stopped, or refused at once
        assert after["queued"] == 0 and after["running"] == 0
        assert cpu_while_idle() < 0.25  # the stopped renders freed their cores


@pytest.mark.parametrize("kw", [{"template_timeout_s": 0}, {"template_max_chars": 0}])
def test_server_template_limits_are_validated(kw):
    from edge.server import ServerConfig

    with pytest.raises(ConfigError, match="chat template"):
        ServerConfig(**kw)
