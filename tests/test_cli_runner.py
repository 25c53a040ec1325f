"""The command line's own logic, in process through click's ``CliRunner``, on scripted models
registered as backends (``edge.backends.register_backend``): option rules, the defaults that
reach the generation loop, and the stdout/stderr split. The same commands on real models run
as subprocesses in test_cli.py."""

from __future__ import annotations

import json
import string

import numpy as np
import pytest
from click.testing import CliRunner

from edge.backends import register_backend, unregister_backend
from edge.backends.base import BackendInfo
from edge.cli.main import cli
from edge.params import SamplingParams
from edge.runtime import Runtime
from tests.scripted import ScriptedBackend

SCRIPT = ["Step one.", "\n\n", "Step two.", "\n\n", "So x = 7.", "\n", "</think>"]
ANSWER = "\n\n**Final Answer**\n\\boxed{7}"
THINK_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}"
)
PLAIN_TEMPLATE = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"


class Babbler:
    """A model that never ends: at every position it draws from a spread distribution over
    the printable characters (a fixed random pattern, shifted by the position), so every
    sampling setting changes what it writes, and only ``max_tokens`` stops it."""

    def __init__(self, n_ctx: int = 8192) -> None:
        self.chars = list(string.printable)
        self.char_id = {c: i for i, c in enumerate(self.chars)}
        self.eos_id = len(self.chars)
        self._logits = np.random.default_rng(0).normal(0.0, 2.0, self.eos_id + 1).astype(np.float32)
        self._logits[self.eos_id] = -1e9
        self._tokens: list[int] = []
        self.info = BackendInfo(name="babbler", n_ctx=n_ctx)

    n_ctx = property(lambda self: self.info.n_ctx)
    n_vocab = property(lambda self: self.eos_id + 1)
    n_past = property(lambda self: len(self._tokens))
    tokens = property(lambda self: tuple(self._tokens))
    eos_token_ids = property(lambda self: frozenset({self.eos_id}))
    bos_token = ""
    eos_token = "<eos>"
    add_bos = False
    chat_template = PLAIN_TEMPLATE

    def tokenize(self, text: str, *, add_bos: bool = False, special: bool = True) -> list[int]:
        return [self.char_id[c] for c in text]

    def token_bytes(self, token: int) -> bytes:
        return b"" if token == self.eos_id else self.chars[token].encode()

    def detokenize(self, tokens) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode()

    def eval(self, tokens):
        self._tokens.extend(tokens)
        shifted = np.roll(self._logits[:-1], len(self._tokens))
        return np.append(shifted, self._logits[-1])

    def rollback(self, n_past: int) -> None:
        del self._tokens[n_past:]

    def close(self) -> None:
        pass


class Models:
    """The factory registered as a backend: builds the next model and records what it got."""

    def __init__(self) -> None:
        self.make = lambda: ScriptedBackend(SCRIPT, ANSWER, chat_template=THINK_TEMPLATE)
        self.calls: list[tuple[str, dict]] = []

    def __call__(self, model: str, **options):
        self.calls.append((model, options))
        return self.make()


@pytest.fixture
def models():
    factory = Models()
    register_backend("scripted", factory)
    yield factory
    unregister_backend("scripted")


def invoke(*args: str, input: str | None = None):
    return CliRunner().invoke(cli, list(args), input=input)


def one_line_error(result, needle: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert needle in lines[0], lines[0]
    assert result.stdout == ""
    return lines[0]


# -- the stdout/stderr split -----------------------------------------------------------------------

def test_answer_on_stdout_thinking_on_stderr(models):
    r = invoke("run", "What is x?", "--backend", "scripted", "--temperature", "0")
    assert r.exit_code == 0, r.stderr
    assert r.stdout == "**Final Answer**\n\\boxed{7}\n"
    assert r.stderr.startswith("Thinking...\nStep one.\n\nStep two.\n\nSo x = 7.")
    assert "...done thinking." in r.stderr and "boxed" not in r.stderr


def test_hide_thinking_prints_a_summary_line(models):
    r = invoke("run", "What is x?", "--backend", "scripted", "--temperature", "0", "--hide-thinking")
    assert r.exit_code == 0, r.stderr
    assert r.stdout == "**Final Answer**\n\\boxed{7}\n"
    assert r.stderr.startswith("Thought for ") and "tokens)" in r.stderr and "Step one" not in r.stderr


def test_json_is_one_object_on_stdout(models):
    r = invoke("run", "What is x?", "--backend", "scripted", "--temperature", "0", "--json")
    assert r.exit_code == 0, r.stderr
    obj = json.loads(r.stdout)
    assert obj["answer"] == "**Final Answer**\n\\boxed{7}" and obj["reasoning"].startswith("Step one.")
    assert obj["stats"]["finish_reason"] == "stop" and r.stderr == ""


def test_chat_answers_on_stdout_and_talks_on_stderr(models):
    r = invoke("chat", "--backend", "scripted", "--temperature", "0", "--hide-thinking", input="What is x?\n/stats\n")
    assert r.exit_code == 0, r.stderr
    assert r.stdout == "**Final Answer**\n\\boxed{7}\n"
    assert "edge-reason chat - " in r.stderr and "answer_tokens: " in r.stderr


# -- option rules: one line, non-zero exit, before the model loads ----------------------------------

@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--effort", "low", "--think-budget", "3"], "give either --think-budget or --effort, not both"),
        (["--exit-threshold", "0.8"], "--exit-threshold needs --early-exit"),
        (["--exit-mode", "both"], "--exit-mode needs --early-exit"),
        (["--early-exit", "--exit-threshold", "1.5"], "threshold"),
        (["--early-exit", "--exit-mode", "vibes"], "unknown early-exit mode 'vibes'"),
        (["--effort", "extreme"], "unknown effort 'extreme'"),
        (["--think-budget", "-1"], "max_thinking must be >= 0 tokens, got -1"),
        (["--min-thinking", "9", "--think-budget", "3"], "min_thinking (9) is above max_thinking (3)"),
        (["--budget-cut", "probe"], "--budget-cut needs --think-budget or --effort"),
        (["--signal-budget", "40:0.9"], "a signal budget is FIRST:THRESHOLD:LOW:HIGH"),
        (["--signal-budget", "4:0.9:6:x"], "a signal budget is FIRST:THRESHOLD:LOW:HIGH"),
        (["--signal-budget", "4:0.9:6:3"], "the signal budget's low (6) is above its high (3)"),
        (["--signal-budget", "4:0.9:2:8", "--think-budget", "3"], "--signal-budget sets its own caps"),
        (["--signal-budget", "4:0.9:2:8", "--budget-cut", "step"], "--signal-budget cuts at probe points"),
        (["--top-p", "2"], "top_p must be in (0, 1], got 2.0"),
        (["--temperature", "nan"], "temperature must be a finite number, got nan"),
        (["--seed", "-7"], "or -1 for a random seed"),
        (["--max-tokens", "0"], "max_tokens must be >= 1, got 0"),
        (["--timeout", "3"], "--timeout applies to --backend remote only"),
        (["--device", "tpu"], "unknown device 'tpu'"),
    ],
)
def test_bad_options_are_one_line_before_the_model_loads(models, flags, needle):
    one_line_error(invoke("run", "What is x?", "--backend", "scripted", *flags), needle)
    assert models.calls == []


def test_an_unknown_backend_is_one_line():
    one_line_error(invoke("run", "hi", "--backend", "nope"), "unknown backend 'nope'; choose one of: llamacpp, onnx, remote")


def test_a_usage_error_is_clicks_message():
    r = invoke("run", "hi", "--top-k", "x")
    assert r.exit_code == 2 and "'x' is not a valid integer" in r.stderr


# -- what reaches the loop -----------------------------------------------------------------------

def test_sampling_defaults_reach_the_loop(models):
    """No sampling flags but a seed: the same text as the Python API with SamplingParams()
    defaults, and the default max_tokens ends the endless model."""
    models.make = Babbler
    r = invoke("run", "Go", "--backend", "scripted", "--seed", "7", "--json")
    assert r.exit_code == 0, r.stderr
    obj = json.loads(r.stdout)
    with Runtime(backend=Babbler()) as rt:
        reply = rt.ask("Go", SamplingParams(seed=7))
    assert obj["answer"] == reply.answer and len(obj["answer"]) > 1000
    assert obj["stats"]["answer_tokens"] == SamplingParams().max_tokens == 4096
    assert obj["stats"]["finish_reason"] == "length"
    with Runtime(backend=Babbler()) as rt:  # and a setting off its default shows
        assert rt.ask("Go", SamplingParams(seed=7, top_k=5)).answer != reply.answer


def test_sampling_flags_reach_the_loop(models):
    models.make = Babbler
    r = invoke("run", "Go", "--backend", "scripted", "--seed", "3", "--temp", "1.2", "--top-p", "0.8", "--top-k", "20",
               "--min-p", "0.01", "--repeat-penalty", "1.3", "--max-tokens", "40", "--json")
    assert r.exit_code == 0, r.stderr
    with Runtime(backend=Babbler()) as rt:
        reply = rt.ask("Go", SamplingParams(seed=3, temperature=1.2, top_p=0.8, top_k=20, min_p=0.01, repeat_penalty=1.3, max_tokens=40))
    assert json.loads(r.stdout)["answer"] == reply.answer and reply.stats.answer_tokens == 40


def test_early_exit_flags_reach_the_loop(models):
    trial = lambda n: ("7", 0.7) if n >= 2 else ("3", 0.1)  # noqa: E731
    models.make = lambda: ScriptedBackend(SCRIPT, ANSWER, chat_template=THINK_TEMPLATE, trial=trial)
    base = ("run", "What is x?", "--backend", "scripted", "--temperature", "0", "--json")
    stats = lambda r: json.loads(r.stdout)["stats"]  # noqa: E731
    assert stats(invoke(*base))["exit_reason"] in (None, "eos")
    assert stats(invoke(*base, "--early-exit"))["exit_reason"] in (None, "eos")  # below the default threshold 0.95
    exited = stats(invoke(*base, "--early-exit", "--exit-threshold", "0.6"))
    assert exited["exit_reason"] == "early_exit" and exited["probes"] >= 1


def test_think_budget_reaches_the_loop(models):
    r = invoke("run", "What is x?", "--backend", "scripted", "--temperature", "0", "--think-budget", "2", "--json")
    stats = json.loads(r.stdout)["stats"]
    assert stats["exit_reason"] == "budget" and stats["thinking_tokens"] == 2


def test_model_options_reach_the_backend(models):
    r = invoke("run", "hi", "--backend", "scripted", "--ctx", "512", "--threads", "2", "--device", "cpu", "--gpu-layers", "4", "--json")
    assert r.exit_code == 0, r.stderr
    ((path, options),) = models.calls
    assert path.endswith("tiny-r1-q8_0.gguf")  # no --model: the bundled one, resolved by the Runtime
    assert options == {"n_ctx": 512, "threads": 2, "device": "cpu"}  # gpu layers are llama.cpp's only
    models.calls.clear()
    assert invoke("run", "hi", "--backend", "scripted", "--ctx-beyond-training", "--json").exit_code == 0
    assert models.calls[0][1] == {"ctx_beyond_training": True}  # options left at their defaults: the backend's own


# -- options declared once, with their fields ------------------------------------------------------

@pytest.mark.parametrize("command", ["run", "chat", "eval"])
def test_every_offered_sampling_field_is_an_option(command):
    from edge.cli.options import offered_fields

    text = invoke(command, "--help").stdout
    for f in offered_fields(SamplingParams):
        assert f.metadata["flags"][0].split("/")[0] in text, (command, f.name)


def test_a_new_field_becomes_an_option_and_a_request_field():
    """What adding a field to SamplingParams gives: a flag with its default and help, a
    request field of the server, and values checked by the dataclass."""
    import click
    from dataclasses import dataclass, field

    from edge.cli.options import options_from, pop_sampling
    from edge.params import offered, request_fields

    @dataclass(frozen=True)
    class More(SamplingParams):
        typical_p: float = field(default=1.0, metadata=offered("--typical-p", help="Locally typical sampling.", request=True))

    @click.command()
    @options_from(More, {"temperature": {"default": 0.0}})
    def cmd(**kw):
        click.echo(repr(More(**kw)))

    r = CliRunner().invoke(cmd, ["--typical-p", "0.5"])
    assert r.exit_code == 0 and "typical_p=0.5" in r.stdout and "temperature=0.0" in r.stdout
    assert "--typical-p FLOAT" in CliRunner().invoke(cmd, ["--help"]).stdout and "Locally typical sampling.  [default: 1.0]" in CliRunner().invoke(cmd, ["--help"]).stdout
    assert "typical_p" in request_fields(More) and "max_tokens" not in request_fields(More)
    assert set(request_fields(SamplingParams)) == {"temperature", "top_p", "top_k", "min_p", "repeat_penalty", "seed", "speculate"}
    kw = {"temperature": 0.3, "top_p": 0.9, "top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0, "seed": None, "max_tokens": 8, "speculate": None, "rest": 1}
    assert pop_sampling(kw) == SamplingParams(temperature=0.3, top_p=0.9, max_tokens=8) and kw == {"rest": 1}


def test_serve_options_take_the_server_defaults():
    from edge.server.config import ServerConfig

    text = " ".join(invoke("serve", "--help").stdout.split())
    c = ServerConfig()
    for flag, value in (("--max-tokens-limit", c.max_tokens_limit), ("--default-max-tokens", c.default_max_tokens),
                        ("--max-queue", c.max_queue), ("--port", c.port)):
        assert f"{flag} INTEGER" in text and f"[default: {value}]" in text


def test_budget_cut_and_signal_budget_reach_the_loop(models):
    """SCRIPT's probe points are at 2, 4 and 6 thinking tokens; the scripted model's trial answer
    is sure from 4 on."""
    trial = lambda n: ("7", 0.99) if n >= 4 else ("3", 0.1)  # noqa: E731
    models.make = lambda: ScriptedBackend(SCRIPT, ANSWER, chat_template=THINK_TEMPLATE, trial=trial)
    base = ("run", "What is x?", "--backend", "scripted", "--temperature", "0", "--json")
    probe = json.loads(invoke(*base, "--think-budget", "5", "--budget-cut", "probe").stdout)
    assert (probe["stats"]["thinking_tokens"], probe["stats"]["retracted_tokens"], probe["stats"]["probes"]) == (4, 1, 1)
    assert probe["answer"].endswith("\\boxed{7}")
    step = json.loads(invoke(*base, "--think-budget", "5", "--budget-cut", "step").stdout)["stats"]
    assert (step["thinking_tokens"], step["probes"]) == (4, 0)
    signal = json.loads(invoke(*base, "--signal-budget", "3:0.9:3:9").stdout)
    assert (signal["stats"]["thinking_tokens"], signal["stats"]["probes"], signal["stats"]["exit_reason"]) == (4, 1, "budget")
    assert [c["kind"] for c in signal["controls"]][:2] == ["probe", "signal_budget"]
