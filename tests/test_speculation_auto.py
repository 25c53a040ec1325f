"""Speculation on by default where it pays: the decision (auto / on / off and why), this
machine's batch-cost curve measured once per model and thread count and cached (reused,
re-measured when corrupt, per-thread keys, never a traceback), the figures in the stats, and
greedy output the same as ``--no-speculate`` through the CLI and the server on real GGUFs.

The session's cache folder is a temporary one (``tests/conftest.py``); tests about the cache
itself point ``EDGE_CACHE_DIR`` at their own folder. Where the curve is not the subject it is
pinned (a record written where the runtime looks for it) so that auto drafts at most steps:
the most chances for the output to differ."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from edge.backends.base import BackendInfo
from edge.params import SamplingParams
from edge.speculative import (
    CACHE_ENV,
    DISABLED,
    SpeculativeConfig,
    batch_cost_curve,
    break_even,
    curve_key,
    curve_path,
    decide,
)

FLAT = (1.0, 1.0, 1.0, 1.0, 1.0, 1.0)  # a batch costs what one token does: drafting always pays
LINEAR = (1.0, 2.0, 3.0, 4.0, 5.0, 6.0)  # a batch of k costs k tokens: no draft ever pays
GREEDY = SamplingParams(temperature=0, max_tokens=160)


def pin_curve(backend, cost, *, settled: bool = True) -> Path:
    """Write ``cost`` as this machine's cached curve for ``backend``'s model and settings."""
    key = curve_key(backend)
    path = curve_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "cost": list(cost), "seconds": {}, "took": 0.0, "when": "pinned", "settled": settled}))
    return path


class Counting:
    """Wraps :func:`edge.speculative.measure_batch_cost` (still measuring for real) to count calls."""

    def __init__(self, monkeypatch):
        import edge.speculative as spec

        self.calls = 0
        real = spec.measure_batch_cost

        def measure(*a, **kw):
            self.calls += 1
            return real(*a, **kw)

        monkeypatch.setattr(spec, "measure_batch_cost", measure)


class Bare:
    """A backend stand-in for the decision alone."""

    def __init__(self, name: str, batch_verify: bool) -> None:
        self.info = BackendInfo(name=name)
        self.batch_verify = batch_verify

    def score(self, tokens):  # pragma: no cover - never called
        raise AssertionError


# -- the decision ------------------------------------------------------------------------------------

def test_decide_says_on_or_off_and_why():
    llama, onnx = Bare("llamacpp", True), Bare("onnx", False)
    measured = SpeculativeConfig(cost=(1.0, 1.38, 1.79, 2.17))  # the 1.5B on 2 cores (issue 15)
    assert decide(False, llama, measured) is DISABLED and str(DISABLED) == "off: disabled"
    on = decide(None, llama, measured, source="measured")
    assert on.on and on.config is measured
    assert str(on) == "on: auto: the measured batch-cost curve pays above acceptance 0.39"
    assert break_even(measured) == 0.39  # 1 + r > 1.38 x 1.001
    never = decide(None, llama, SpeculativeConfig(cost=LINEAR), source="measured")
    assert not never.on and str(never).startswith("off: the measured batch-cost curve never pays")
    assert break_even(SpeculativeConfig(cost=LINEAR)) is None
    # a curve that pays only above the acceptance drafts start from (0.6) is not worth setting
    # up: SmolLM2 at one thread on this project's 2-core machine
    steep = SpeculativeConfig(cost=(1.0, 1.75, 2.51, 2.57, 2.97, 3.38))
    assert break_even(steep) == 0.72
    assert str(decide(None, llama, steep, source="measured")) == (
        "off: the measured batch-cost curve pays only above acceptance 0.72, more than the 0.60 drafts start from "
        "(a batch of 2 tokens costs 1.75x one)")
    assert decide(None, llama, SpeculativeConfig(cost=steep.cost, prior=0.75)).on  # the bar is the prior
    assert str(decide(None, onnx, measured)) == "off: the onnx backend has no cheap batched verification of drafts"
    assert str(decide(None, llama, None)) == "off: no batch-cost curve given"
    # a curve measured while the machine was too busy to tell: auto stays off, asked-for is on
    busy = decide(None, llama, SpeculativeConfig(cost=FLAT), source="measured", settled=False)
    assert not busy.on and str(busy).startswith("off: the measured batch-cost curve is uncertain: the machine was too busy")
    assert decide(True, llama, SpeculativeConfig(cost=FLAT), settled=False).on
    # on: even where it cannot pay (the live rate then keeps drafts rare)
    assert str(decide(True, llama, SpeculativeConfig(cost=LINEAR))) == "on: requested"
    forced = decide(True, onnx, None)
    assert forced.on and str(forced).startswith("on: requested (the onnx backend has no cheap batched verification")


def test_a_curve_settles_once_each_fastest_time_is_seen_twice():
    from edge.speculative import _settled

    assert _settled({1: [0.10, 0.30, 0.105], 2: [0.2, 0.21]}, 0.1)  # a load spike does not matter
    assert not _settled({1: [0.10, 0.13], 2: [0.2, 0.21]}, 0.1)  # the fastest seen once only
    assert not _settled({1: [0.10]}, 0.1) and _settled({1: [0.10]}, None)


class Clock:
    """time.perf_counter for edge.speculative: each reading ``step`` seconds after the last."""

    def __init__(self, step: float) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_measuring_stops_when_settled_or_at_the_hard_limit(monkeypatch):
    import edge.speculative as spec
    from tests.test_speculative import Markov

    b = Markov()
    monkeypatch.setattr(spec.time, "perf_counter", Clock(0.01))  # every step takes as long: settles at once
    times = spec.measure_batch_cost(b, sizes=(1, 2, 4), repeats=40, budget_s=0.5, settle=0.1, max_s=10)
    n = len(times[1])
    assert 3 <= n < 40 and all(len(v) == n for v in times.values()) and spec._settled(times, 0.1)
    assert b.n_past == 0  # the cache as it was found
    monkeypatch.setattr(spec.time, "perf_counter", Clock(4.0))  # a machine so busy that a step takes seconds
    times = spec.measure_batch_cost(b, sizes=(1, 2, 4), repeats=40, budget_s=3, settle=0.0, max_s=10)
    assert all(len(v) == 1 for v in times.values())  # every size timed once, then stopped


def test_speculate_is_true_false_or_auto():
    from edge.errors import ConfigError

    assert SamplingParams().speculate is None
    for bad in (1, "yes", 0.0):
        with pytest.raises(ConfigError, match="true, false or null"):
            SamplingParams(speculate=bad)


# -- the cache of curves (real llama.cpp, SmolLM2) --------------------------------------------------------

def test_the_curve_is_measured_once_then_read_from_the_cache(smollm2_backend, smollm2, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    count = Counting(monkeypatch)
    b = smollm2_backend
    first = batch_cost_curve(b)
    assert first.measured and count.calls == 1
    assert first.path is not None and first.path.parent == tmp_path / "batch-cost" and first.path.is_file()
    assert first.cost[0] == 1.0 and len(first.cost) == 6 and all(y >= x for x, y in zip(first.cost, first.cost[1:]))
    assert first.cost[-1] > 1.0 and set(first.seconds) == {1, 2, 3, 4, 6}
    doc = json.loads(first.path.read_text())
    assert doc["key"]["model"] == str(Path(smollm2).resolve()) and doc["key"]["threads"] == 1
    assert doc["key"]["size"] == Path(smollm2).stat().st_size
    again = batch_cost_curve(b)
    assert not again.measured and again.cost == first.cost and count.calls == 1
    fresh = batch_cost_curve(b, refresh=True)
    assert fresh.measured and count.calls == 2
    assert b.n_past == 0  # measuring leaves no tokens behind


def test_each_thread_count_has_its_own_curve(smollm2, tmp_path, monkeypatch):
    from edge.runtime import Runtime

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    count = Counting(monkeypatch)
    keys = []
    for threads in (1, 2, 2):
        with Runtime(str(smollm2), n_ctx=512, threads=threads) as rt:
            rt.plan_speculation()
            keys.append(curve_key(rt.backend))
    assert count.calls == 2  # the second runtime at 2 threads read the first one's curve
    assert keys[0]["threads"] == 1 and keys[1]["threads"] == 2 and keys[1] == keys[2]
    names = sorted(p.name for p in (tmp_path / "batch-cost").iterdir())
    assert len(names) == 2 and "-t1-" in names[0] and "-t2-" in names[1]


@pytest.mark.parametrize("garbage", [b"{not json", b"\xff\xfe\x00", b"[]", b'{"key": 3}', b"{}"])
def test_a_corrupt_cache_is_measured_again(smollm2_backend, tmp_path, monkeypatch, caplog, garbage):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    count = Counting(monkeypatch)
    path = curve_path(curve_key(smollm2_backend))
    path.parent.mkdir(parents=True)
    path.write_bytes(garbage)
    with caplog.at_level(logging.WARNING, logger="edge.speculative"):
        curve = batch_cost_curve(smollm2_backend)
    assert curve.measured and count.calls == 1
    assert "measuring again" in caplog.text or garbage == b'{"key": 3}'  # another key's record: replaced quietly
    assert json.loads(path.read_text())["cost"] == list(curve.cost)  # replaced by a valid record
    assert not batch_cost_curve(smollm2_backend).measured


def test_a_record_with_a_bad_curve_is_measured_again(smollm2_backend, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    path = pin_curve(smollm2_backend, (1.0, 0.5))  # decreasing: not a cost curve
    with caplog.at_level(logging.WARNING, logger="edge.speculative"):
        curve = batch_cost_curve(smollm2_backend)
    assert curve.measured and "not a valid record" in caplog.text
    assert json.loads(path.read_text())["cost"] == list(curve.cost)


def test_a_cache_that_cannot_be_written_still_gives_the_curve(smollm2_backend, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(CACHE_ENV, str(blocker))
    with caplog.at_level(logging.WARNING, logger="edge.speculative"):
        curve = batch_cost_curve(smollm2_backend)
    assert curve.measured and curve.path is None and "could not cache" in caplog.text


# -- the runtime decides; the stats say what it did ----------------------------------------------------

PROMPT = "Write a Python function that adds two numbers, then write it again with type hints."


def test_runtime_stats_say_whether_it_speculated_and_why(smollm2, tmp_path, monkeypatch):
    from edge.runtime import Runtime

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    count = Counting(monkeypatch)
    with Runtime(str(smollm2), n_ctx=512, threads=1, flash_attn=True) as rt:  # exact batches (see below)
        pin_curve(rt.backend, FLAT)
        s = rt.ask(PROMPT, GREEDY).stats
        assert s.speculation == "on: auto: the measured batch-cost curve pays above acceptance 0.01"
        assert s.draft_tokens > 0 and 0 < s.draft_accepted <= s.draft_tokens
        assert s.acceptance_rate == s.draft_accepted / s.draft_tokens and s.tokens_per_step > 1
        off = rt.ask(PROMPT, GREEDY.with_(speculate=False)).stats
        assert off.speculation == "off: disabled" and off.draft_tokens == off.model_steps == 0
        assert off.tokens_per_step is None and off.acceptance_rate is None
    with Runtime(str(smollm2), n_ctx=512, threads=1) as rt:
        pin_curve(rt.backend, FLAT, settled=False)
        s = rt.ask(PROMPT, GREEDY.with_(max_tokens=8)).stats
        assert s.speculation.startswith("off: the measured batch-cost curve is uncertain") and s.model_steps == 0
    with Runtime(str(smollm2), n_ctx=512, threads=1, flash_attn=True) as rt:
        pin_curve(rt.backend, LINEAR)
        s = rt.ask(PROMPT, GREEDY).stats
        assert s.speculation.startswith("off: the measured batch-cost curve never pays (a batch of 2 tokens costs 2.00x one")
        assert s.draft_tokens == s.model_steps == 0
        on = rt.ask(PROMPT, GREEDY.with_(speculate=True)).stats
        assert on.speculation == "on: requested" and on.model_steps > 0
        d = s.to_dict()
        assert d["speculation"] == s.speculation and d["acceptance_rate"] is None
    assert count.calls == 0  # pinned: nothing was measured


def test_a_given_config_replaces_the_measured_curve(smollm2, monkeypatch):
    from edge.runtime import Runtime

    count = Counting(monkeypatch)
    with Runtime(str(smollm2), n_ctx=512, threads=1, flash_attn=True) as rt:
        rt.speculation = SpeculativeConfig(cost=FLAT)
        assert str(rt.plan_speculation()) == "on: auto: the given batch-cost curve pays above acceptance 0.01"
        rt.speculation = SpeculativeConfig(cost=LINEAR)
        assert not rt.plan_speculation().on and rt.plan_speculation(True).on
        assert rt.plan_speculation(False) is DISABLED
    assert count.calls == 0


# -- token-exact: drafts no longer than the batches llama.cpp computes as one-token steps ------------

def test_exact_batch_is_measured_on_real_models(smollm2, tmp_path, monkeypatch):
    """tiny-r1 (Q8_0) and SmolLM2 with flash attention compute batches of up to 9 rows exactly as
    one-token steps; SmolLM2 without it, in a context of 1,024, does not even for 2 once some
    context is cached (the attention of a batch then sums in another order; in a context of 512
    it happens to be exact): measured, at several depths, on the backend as configured."""
    from edge.backends.llamacpp import LlamaCppBackend
    from edge.model_ref import default_model
    from edge.speculative import EXACT_LIMIT, exact_batch

    for path, fa, want in ((default_model(), False, EXACT_LIMIT), (smollm2, True, EXACT_LIMIT), (smollm2, False, 1)):
        b = LlamaCppBackend(path, n_ctx=1024, threads=1, flash_attn=fa)
        try:
            b.eval(b.tokenize("Some cached text."))
            assert exact_batch(b) == want, (path, fa)
            assert b.n_past == 0  # the measurement leaves the cache empty
            if want == 1:  # after 16 cached tokens alone a batch of 4 still looks exact: depth matters
                assert exact_batch(b, depths=(16,)) >= 2
        finally:
            b.close()
    # no depth fits the context: not known to be exact
    b = LlamaCppBackend(smollm2, n_ctx=256, threads=1, flash_attn=True)
    try:
        assert exact_batch(b, depths=(250,)) == 1 and exact_batch(b, depths=(200,)) == EXACT_LIMIT
    finally:
        b.close()


def test_decide_cuts_drafts_to_the_exact_batch():
    llama = Bare("llama.cpp", True)
    flat = SpeculativeConfig(cost=FLAT)
    full = decide(None, llama, flat, source="measured", exact=9)
    assert full.config.max_draft == 8 and str(full) == "on: auto: the measured batch-cost curve pays above acceptance 0.01"
    cut = decide(None, llama, flat, source="measured", exact=3)
    assert cut.config.max_draft == 2 and str(cut).endswith(
        "; drafts of at most 2 tokens (batches of more than 3 are not computed exactly as one-token steps here)")
    assert decide(True, llama, flat, exact=2).config.max_draft == 1
    inexact = decide(None, llama, flat, source="measured", exact=1)
    assert not inexact.on and "not computed exactly as two one-token steps" in str(inexact)
    forced = decide(True, llama, flat, exact=1)
    assert forced.on and forced.config.max_draft == 8 and str(forced).startswith("on: requested, not token-exact: ")
    assert decide(False, llama, flat, exact=9) is DISABLED
    assert decide(True, llama, None, exact=3).config.max_draft == 2  # requested without a curve: the defaults, cut
    assert not decide(None, llama, SpeculativeConfig(cost=LINEAR), source="measured", exact=9).on  # the curve still decides


def test_runtime_keeps_speculation_exact_and_measures_once(smollm2, tmp_path, monkeypatch):
    """SmolLM2 without flash attention (context 1,024): auto does not speculate (even with a flat curve) because
    drafts could change the output, and says so; --speculate still does, saying it is not exact.
    The exact batch size is measured once per machine and settings, cached beside the curve, and
    only when a call would speculate."""
    import edge.speculative as spec
    from edge.runtime import Runtime

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    calls = []
    real = spec.exact_batch
    monkeypatch.setattr(spec, "exact_batch", lambda b, **kw: calls.append(1) or real(b, **kw))
    with Runtime(str(smollm2), n_ctx=1024, threads=1) as rt:
        pin_curve(rt.backend, LINEAR)
        assert rt.ask(PROMPT, GREEDY.with_(max_tokens=8)).stats.speculation.startswith("off: the measured batch-cost curve never")
        assert calls == []  # auto is off: nothing measured
        pin_curve(rt.backend, FLAT)
        rt._cost_curve = None
        s = rt.ask(PROMPT, GREEDY.with_(max_tokens=16)).stats
        assert s.speculation.startswith("off: a batch of 2 tokens is not computed exactly") and s.model_steps == 0
        forced = rt.ask(PROMPT, GREEDY.with_(max_tokens=16, speculate=True)).stats
        assert forced.speculation.startswith("on: requested, not token-exact") and forced.model_steps > 0
    assert calls == [1]
    cached = [p for p in (tmp_path / "batch-cost").iterdir() if p.name.endswith("-exact.json")]
    assert len(cached) == 1 and json.loads(cached[0].read_text())["exact"] == 1
    with Runtime(str(smollm2), n_ctx=1024, threads=1) as rt:
        assert rt.ask(PROMPT, GREEDY.with_(max_tokens=8)).stats.speculation.startswith("off: a batch of 2 tokens")
    assert calls == [1]  # read from the cache


# -- through the CLI ---------------------------------------------------------------------------------

def _json_run(cli, *args, env):
    r = cli("run", *args, "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    return json.loads(r.stdout), r.stderr


MEASURED = "measured this machine's batch cost"


def test_cli_measures_once_says_so_once_and_reuses_it(cli, tmp_path):
    env = {CACHE_ENV: str(tmp_path)}
    args = ("a = 3. b = a + 4. What is b?", "--threads", "1", "--temperature", "0", "--max-tokens", "40")
    first, err = _json_run(cli, *args, env=env)
    assert err.count(MEASURED) == 1 and "tiny-r1-q8_0.gguf at 1 thread in" in err
    files = list((tmp_path / "batch-cost").iterdir())
    assert len(files) == 1 and "-t1-" in files[0].name
    stamp = files[0].stat().st_mtime_ns
    assert first["stats"]["speculation"].startswith(("on: auto: the measured", "off: the measured batch-cost curve"))
    second, err = _json_run(cli, *args, env=env)
    assert MEASURED not in err and files[0].stat().st_mtime_ns == stamp
    assert second["stats"]["speculation"] == first["stats"]["speculation"]
    # another thread count: another curve
    _, err = _json_run(cli, *args[:2], "2", *args[3:], env=env)
    assert err.count(MEASURED) == 1 and len(list((tmp_path / "batch-cost").iterdir())) == 2
    # a corrupt record: one warning, measured again, no traceback
    files[0].write_text("{garbage")
    _, err = _json_run(cli, *args, env=env)
    assert "unreadable" in err and err.count(MEASURED) == 1
    json.loads(files[0].read_text())


def test_cli_no_speculate_measures_nothing(cli, tmp_path):
    out, err = _json_run(cli, "a = 3. What is a?", "--threads", "1", "--temperature", "0", "--max-tokens", "20", "--no-speculate",
                         env={CACHE_ENV: str(tmp_path)})
    assert out["stats"]["speculation"] == "off: disabled" and out["stats"]["draft_tokens"] == 0
    assert MEASURED not in err and not (tmp_path / "batch-cost").exists()


def test_cli_help_explains_the_switch(cli):
    r = cli("run", "--help")
    text = " ".join(r.stdout.split())
    assert "--speculate / --no-speculate" in text and "Default: auto" in text and "--no-speculate: off" in text


def test_bench_batch_cost_shows_measures_and_remeasures(cli, tmp_path):
    env = {CACHE_ENV: str(tmp_path)}
    r = cli("bench", "batch-cost", "--threads", "1", env=env)
    assert r.returncode == 0, r.stderr
    assert "measured now" in r.stdout and "auto speculation: o" in r.stdout and str(tmp_path / "batch-cost") in r.stdout
    r2 = cli("bench", "batch-cost", "--threads", "1", env=env)
    assert "cached, measured" in r2.stdout
    cost = [line for line in r.stdout.splitlines() if line.startswith("  cost")]
    assert cost and cost == [line for line in r2.stdout.splitlines() if line.startswith("  cost")]
    r3 = cli("bench", "batch-cost", "--threads", "1", "--remeasure", env=env)
    assert "measured now" in r3.stdout
    assert "exact batches: up to 9 rows computed bit for bit as one-token steps (drafts of at most 8 tokens" in r.stdout


def test_bench_batch_cost_says_when_batches_are_not_exact(cli, smollm2, tmp_path):
    r = cli("bench", "batch-cost", "-m", str(smollm2), "--threads", "1", "--ctx", "1024", env={CACHE_ENV: str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert "exact batches: not even 2 rows are computed as one-token steps here, so speculation would not be token-exact " \
           "(--flash-attn may help)" in r.stdout
    assert "auto speculation: off: " in r.stdout


# -- greedy output: auto (drafting at most steps) == --no-speculate ----------------------------------------
# llama.cpp computes a batch's rows exactly as one-token steps would only in some settings: tiny-r1
# always; SmolLM2 (Q4_1) with flash attention (--kv-cache q8_0 turns it on). With flash attention
# off its batched rows differ by up to ~0.7 in the logits, and the runtime then does not speculate
# on auto (test_runtime_keeps_speculation_exact_and_measures_once).

def tiny_prompts(n: int) -> list[str]:
    from edge.benchmarks.tasks import load_task

    return [it.prompt for it in load_task("tiny-r1")[:n]]


SMOL_PROMPTS = [PROMPT, "Name three colours.", "Count from 1 to 30, separated by commas."]


def _pin_for_cli(model: str | None, tmp_path: Path, **backend) -> dict:
    from edge.backends.llamacpp import LlamaCppBackend
    from edge.model_ref import resolve_model

    b = LlamaCppBackend(resolve_model(model), n_ctx=256, **backend)
    try:
        pin_curve(b, FLAT)
    finally:
        b.close()
    return {CACHE_ENV: str(tmp_path)}


@pytest.mark.parametrize("model", ["tiny-r1", "smollm2"])
def test_cli_greedy_output_is_the_same_with_auto_and_without(cli, smollm2, tmp_path, monkeypatch, model):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    if model == "tiny-r1":
        opts, prompts = ("--threads", "1"), tiny_prompts(3)
        env = _pin_for_cli(None, tmp_path, threads=1)
    else:
        opts, prompts = ("-m", str(smollm2), "--threads", "1", "--kv-cache", "q8_0", "--ctx", "1024"), SMOL_PROMPTS
        env = _pin_for_cli(str(smollm2), tmp_path, threads=1, kv_cache="q8_0")
    accepted = 0
    for prompt in prompts:
        auto, err = _json_run(cli, prompt, *opts, "--temperature", "0", "--max-tokens", "160", env=env)
        off, _ = _json_run(cli, prompt, *opts, "--temperature", "0", "--max-tokens", "160", "--no-speculate", env=env)
        assert MEASURED not in err  # the pinned curve was read
        assert (auto["reasoning"], auto["answer"]) == (off["reasoning"], off["answer"])
        s = auto["stats"]
        assert s["speculation"].startswith("on: auto") and s["draft_tokens"] > 0
        assert off["stats"]["speculation"] == "off: disabled"
        for f in ("thinking_tokens", "answer_tokens", "finish_reason"):
            assert s[f] == off["stats"][f]
        accepted += s["draft_accepted"]
    assert accepted > 20  # drafts were taken: the outputs had every chance to differ


# -- through the server --------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["tiny-r1", "smollm2"])
def test_server_greedy_reply_is_the_same_with_auto_and_without(smollm2, tmp_path, monkeypatch, model):
    from edge.runtime import Runtime
    from tests.test_server import client, extra, start

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    if model == "tiny-r1":
        rt, prompts = Runtime(None, n_ctx=1024, threads=1), tiny_prompts(3)
    else:
        rt, prompts = Runtime(str(smollm2), n_ctx=1024, threads=1, kv_cache="q8_0"), SMOL_PROMPTS
    pin_curve(rt.backend, FLAT)
    srv = start(rt)
    try:
        c = client(srv)
        accepted = 0
        for i, prompt in enumerate(prompts):
            replies = {}
            for mode in ("absent", False, None) if i == 0 else ("absent", False):  # null is absent: once
                body = {} if mode == "absent" else {"speculate": mode}
                r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": prompt}], temperature=0,
                                              max_tokens=160, extra_body=body)
                m = r.choices[0].message
                replies[mode] = (getattr(m, "reasoning_content", None), m.content, extra(r.usage, "edge")["speculation"])
            auto, off = replies["absent"], replies[False]
            assert auto[:2] == off[:2] == replies.get(None, auto)[:2]
            assert auto[2]["status"].startswith("on: auto") and auto[2]["draft_tokens"] > 0
            assert auto[2]["tokens_per_step"] > 1 and 0 < auto[2]["acceptance_rate"] <= 1
            assert off[2] == {"status": "off: disabled", "draft_tokens": 0, "draft_accepted": 0, "acceptance_rate": None,
                              "model_steps": 0, "tokens_per_step": None}
            accepted += auto[2]["draft_accepted"]
        assert accepted > 20
    finally:
        srv.stop()
        rt.close()


def test_a_curve_that_cannot_be_measured_turns_auto_off_once_and_says_why(smollm2, tmp_path, monkeypatch):
    import edge.speculative as spec
    from edge.errors import BackendError
    from edge.runtime import Runtime

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    calls = []

    def fails(*a, **kw):
        calls.append(1)
        raise BackendError("the context is too small")

    monkeypatch.setattr(spec, "measure_batch_cost", fails)
    with Runtime(str(smollm2), n_ctx=512, threads=1) as rt:
        for _ in range(2):
            s = rt.ask(PROMPT, GREEDY.with_(max_tokens=8)).stats
            assert s.speculation == "off: the batch cost could not be measured (the context is too small)"
            assert s.model_steps == 0
        assert rt.ask(PROMPT, GREEDY.with_(max_tokens=8, speculate=True)).stats.speculation.startswith("on:")
    assert len(calls) == 1  # tried once per runtime, not before every call
    # requested without a curve on a backend whose batches are not exact: it says so (the exact
    # batch applies whether or not the cost was measured)
    with Runtime(str(smollm2), n_ctx=1024, threads=1) as rt:
        forced = rt.ask(PROMPT, GREEDY.with_(max_tokens=8, speculate=True)).stats.speculation
        assert forced.startswith("on: requested, not token-exact"), forced
