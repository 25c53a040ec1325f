"""Chat templates are untrusted input with a budget: time, output size, and single C operations.

The library part runs templates directly; the CLI and server parts use real copies of the
bundled tiny-r1 GGUF whose ``tokenizer.chat_template`` a test replaced (tests/gguf_edit.py)."""

from __future__ import annotations

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
