"""The Python API apps embed: async streaming, cancellation from another thread, several
threads on one Runtime, explicit close. Scripted models for exactness, SmolLM2 for the real
lock and native handles."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from edge.errors import BackendError, EdgeError
from edge.events import AnswerDelta, ControlEvent, Done, ThinkingDelta
from edge.params import SamplingParams
from edge.runtime import Runtime, RuntimeClosedError, collect
from tests.scripted import ScriptedBackend
from tests.test_server import ANSWER, MSGS, SCRIPT, THINK_TEMPLATE, SlowBackend, scripted_runtime

GREEDY = SamplingParams(temperature=0, max_tokens=200)


def untimed(events):
    """Events without their timings (Done's stats, the seconds of thinking_done)."""
    out = []
    for e in events:
        if isinstance(e, ControlEvent):
            out.append((type(e), {k: v for k, v in e.detail.items() if k != "seconds"}))
        elif not isinstance(e, Done):
            out.append(e)
    return out


def test_achat_yields_the_same_events_as_chat():
    rt = scripted_runtime()
    sync = list(rt.chat(MSGS, GREEDY))

    async def go():
        return [ev async for ev in rt.achat(MSGS, GREEDY)]

    got = asyncio.run(go())
    assert untimed(got) == untimed(sync) and isinstance(got[-1], Done)
    assert any(isinstance(e, ThinkingDelta) for e in got) and any(isinstance(e, AnswerDelta) for e in got)
    reply = asyncio.run(rt.aask("What is x?", GREEDY))
    assert reply.answer == ANSWER.strip() and reply.stats.thinking_tokens == len(SCRIPT)


def test_achat_keeps_the_event_loop_free():
    rt = Runtime(backend=SlowBackend(delay=0.01, steps=40))

    async def go():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.005)
                ticks += 1

        t = asyncio.create_task(ticker())
        events = [ev async for ev in rt.achat(MSGS, SamplingParams(temperature=0, max_tokens=30))]
        t.cancel()
        return ticks, events

    ticks, events = asyncio.run(go())
    assert events[-1].stats.completion_tokens == 30
    assert ticks > 20  # the loop kept running while the model worked (>= 0.3 s of evals)


def test_leaving_achat_early_stops_the_generation():
    backend = SlowBackend(delay=0.005, steps=400)
    rt = Runtime(backend=backend)

    async def go():
        n = 0
        async for ev in rt.achat(MSGS, SamplingParams(temperature=0, max_tokens=400)):
            n += 1
            if n == 3:
                break
        return n

    assert asyncio.run(go()) == 3
    # the worker stops at its next token and releases the model
    deadline = time.monotonic() + 5
    while not rt._lock.acquire(blocking=False):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    rt._lock.release()
    assert backend.evals < 50


def test_cancelling_the_async_task_stops_the_generation():
    backend = SlowBackend(delay=0.005, steps=400)
    rt = Runtime(backend=backend)

    async def go():
        async def consume():
            async for _ in rt.achat(MSGS, SamplingParams(temperature=0, max_tokens=400)):
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(go())
    assert collect(rt.chat(MSGS, SamplingParams(temperature=0, max_tokens=3))).stats.completion_tokens == 3
    assert backend.evals < 100


def test_cancel_from_another_thread():
    rt = Runtime(backend=SlowBackend(delay=0.005, steps=400))
    cancel = threading.Event()
    threading.Timer(0.1, cancel.set).start()
    t0 = time.monotonic()
    reply = collect(rt.chat(MSGS, SamplingParams(temperature=0, max_tokens=400), cancel=cancel))
    assert reply.stats.finish_reason == "cancelled" and reply.stats.exit_reason == "cancelled"
    assert 0 < reply.stats.thinking_tokens < 400 and time.monotonic() - t0 < 1.5
    # a cancel already set stops before any work; the caller's event is not reset by the API
    b2 = SlowBackend(delay=0.0, steps=10)
    reply = collect(Runtime(backend=b2).chat(MSGS, GREEDY, cancel=cancel))
    assert reply.stats.finish_reason == "cancelled" and reply.stats.completion_tokens == 0 and b2.evals == 0
    assert cancel.is_set()


@pytest.mark.parametrize("call", ["ask", "chat", "complete"])
def test_cancel_while_waiting_for_the_lock_returns_at_once(call):
    backend = SlowBackend(delay=0.01, steps=600)  # the first call generates for ~6 s
    rt = Runtime(backend=backend)
    stop_first = threading.Event()
    first = threading.Thread(target=lambda: collect(rt.chat(MSGS, SamplingParams(temperature=0, max_tokens=600), cancel=stop_first)))
    cancel, got = threading.Event(), {}

    def second():
        if call == "ask":
            got["reply"] = rt.ask("What is x?", GREEDY, cancel=cancel)
        elif call == "chat":
            got["reply"] = collect(rt.chat(MSGS, GREEDY, cancel=cancel))
        else:
            got["reply"] = collect(rt.complete("What is x?", GREEDY, cancel=cancel))
        got["t"] = time.monotonic()

    waiter = threading.Thread(target=second)
    try:
        first.start()
        deadline = time.monotonic() + 5
        while backend.evals == 0 and time.monotonic() < deadline:  # the first call holds the lock
            time.sleep(0.005)
        waiter.start()
        time.sleep(0.2)  # the second call is waiting for the lock
        assert "reply" not in got
        t_cancel = time.monotonic()
        cancel.set()
        waiter.join(timeout=2)
        assert not waiter.is_alive(), "the cancelled call waited for the running generation"
        assert got["t"] - t_cancel < 0.5
        stats = got["reply"].stats
        assert stats.finish_reason == "cancelled" and stats.completion_tokens == 0
        assert first.is_alive()  # the first generation goes on, untouched
    finally:
        stop_first.set()
        first.join()
        waiter.join()
    assert collect(rt.chat(MSGS, SamplingParams(temperature=0, max_tokens=3))).stats.completion_tokens == 3  # lock free


def test_async_cancel_event_from_another_thread():
    rt = Runtime(backend=SlowBackend(delay=0.005, steps=400))
    cancel = threading.Event()

    async def go():
        threading.Timer(0.1, cancel.set).start()
        return [ev async for ev in rt.achat(MSGS, SamplingParams(temperature=0, max_tokens=400), cancel=cancel)]

    events = asyncio.run(go())
    assert events[-1].stats.finish_reason == "cancelled"


def test_errors_reach_the_async_consumer():
    rt = scripted_runtime()

    async def go():
        return [ev async for ev in rt.achat([{"role": "user", "content": "   "}])]

    with pytest.raises(EdgeError, match="empty"):
        asyncio.run(go())


def test_concurrent_calls_equal_serial_calls_scripted():
    prompts = [[{"role": "user", "content": f"What is x{i}?"}] for i in range(6)]
    rt = scripted_runtime(trial=lambda n: ("7", 0.99) if n >= 4 else ("3", 0.3))
    params = SamplingParams(temperature=0.8, seed=11, max_tokens=60)
    serial = [collect(rt.chat(m, params)) for m in prompts]
    results: dict[int, object] = {}

    def work(i):
        results[i] = collect(rt.chat(prompts[i], params))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for i, s in enumerate(serial):
        r = results[i]
        assert (r.answer, r.reasoning, r.stats.completion_tokens) == (s.answer, s.reasoning, s.stats.completion_tokens)


def test_concurrent_calls_equal_serial_calls_smollm2(smollm2_runtime):
    """Threads share one llama.cpp context; the runtime's lock serialises them. Prompts that
    differ from their first token are prefilled whole in any order, so results must match."""
    rt = smollm2_runtime
    prompts = ["Apples are", "Bees make", "Cats like"]
    params = SamplingParams(temperature=0, max_tokens=3)
    serial = [collect(rt.complete(p, params)).answer for p in prompts]
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def work(i):
        try:
            results[i] = collect(rt.complete(prompts[i], params)).answer
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and [results[i] for i in range(len(prompts))] == serial and all(serial)


def test_use_after_close_raises_a_clear_error():
    rt = scripted_runtime()
    with rt:
        assert rt.ask("What is x?", GREEDY).answer
    assert rt.closed
    for call in (lambda: rt.ask("hi"), lambda: list(rt.chat(MSGS)), lambda: rt.complete("Q?"), lambda: rt.render(MSGS)):
        with pytest.raises(RuntimeClosedError, match="closed") as info:
            call()
        assert isinstance(info.value, BackendError) and isinstance(info.value, EdgeError)
    rt.close()  # idempotent

    async def go():
        return [ev async for ev in rt.achat(MSGS)]

    with pytest.raises(RuntimeClosedError):
        asyncio.run(go())


def test_token_methods_hold_the_runtime_lock_and_check_it_is_open():
    """What the server's /tokenize, /detokenize and prompt preparation call reaches the backend
    only while the runtime lock is held (another thread cannot take it meanwhile), so it never
    runs beside a generation; after close each raises RuntimeClosedError."""
    held: dict[str, list[bool]] = {}

    def lock_held_elsewhere() -> bool:
        free = []

        def probe():
            ok = rt._lock.acquire(blocking=False)
            if ok:
                rt._lock.release()
            free.append(ok)

        t = threading.Thread(target=probe)
        t.start()
        t.join()
        return not free[0]

    class Probe(ScriptedBackend):
        def tokenize(self, text, **kw):
            held.setdefault("tokenize", []).append(lock_held_elsewhere())
            return super().tokenize(text, **kw)

        def token_bytes(self, token):
            held.setdefault("token_bytes", []).append(lock_held_elsewhere())
            return super().token_bytes(token)

    rt = Runtime(backend=Probe(SCRIPT, ANSWER, chat_template=THINK_TEMPLATE))
    calls = {
        "tokenize": lambda: rt.tokenize("Q?", add_special=True),
        "tokenize_prompt": lambda: rt.tokenize_prompt("Q?"),
        "token_pieces": lambda: rt.token_pieces([0, 1]),
        "detokenize": lambda: rt.detokenize([0, 1]),
    }
    out = {name: call() for name, call in calls.items()}
    assert out["tokenize"] == out["tokenize_prompt"] == rt.backend.tokenize("Q?")
    assert b"".join(out["token_pieces"]).decode() == out["detokenize"] == rt.backend.detokenize([0, 1])
    assert held["tokenize"][:2] == [True, True] and held["token_bytes"][:4] == [True] * 4
    rt.close()
    for name, call in calls.items():
        with pytest.raises(RuntimeClosedError):
            call()


def test_a_stream_made_before_close_fails_cleanly():
    rt = Runtime(backend=ScriptedBackend(SCRIPT, ANSWER, chat_template=THINK_TEMPLATE))
    events = rt.chat(MSGS, GREEDY)  # not started yet
    rt.close()
    with pytest.raises(RuntimeClosedError):
        next(events)


def test_close_frees_the_real_model(smollm2):
    rt = Runtime(str(smollm2), n_ctx=256, threads=1)
    with rt:
        pass
    with pytest.raises(RuntimeClosedError):
        rt.ask("hi")
    with pytest.raises(BackendError):
        rt.backend.eval([1])  # the native handles are gone, and say so
