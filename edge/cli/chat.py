"""``edge-reason chat``: a multi-turn conversation in the terminal.

History is kept across turns; each assistant turn is stored without its thinking (as R1's
template drops earlier reasoning), so the KV cache is reused up to the end of the last user
turn. Ctrl-C stops the current generation and keeps the session; Ctrl-D exits."""

from __future__ import annotations

import sys

import click

from edge.cli.options import model_options, open_runtime, plan_speculation, pop_sampling, sampling_options
from edge.cli.text import TEXT, StdinText
from edge.cli.controls import control_options

HELP = """commands:
  /reset   forget the conversation
  /stats   figures of the last reply
  /help    this help
  /exit    leave (or Ctrl-D)
Ctrl-C stops a reply that is being generated."""


def _read(prompt: str, stdin: StdinText) -> str | None:
    sys.stderr.write(prompt)
    sys.stderr.flush()
    line = stdin.readline()
    if not line:
        return None
    return line.rstrip("\n")


@click.command()
@model_options
@sampling_options
@control_options
@click.option("--system", type=TEXT, default=None, help="System message.")
@click.option("--hide-thinking", is_flag=True, help="Print a one-line summary instead of the reasoning.")
@click.option("--no-think", is_flag=True, help="Skip thinking.")
def chat(system: str | None, hide_thinking: bool, no_think: bool, **kw) -> None:
    """Chat with a model (default: the bundled tiny-r1)."""
    from edge.cli.display import StreamPrinter
    from edge.cli.controls import build_controllers, pop_control
    from edge.errors import EdgeError

    params = pop_sampling(kw)
    controllers = build_controllers(pop_control(kw))  # validated before the model loads
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    last = None
    stdin = StdinText()  # invalid UTF-8 in a line becomes U+FFFD (one warning per session)
    bundled = kw.get("model") is None
    with open_runtime(kw) as rt:
        name = rt.backend.info.extra.get("model_name") or rt.backend.info.model_path
        click.echo(f"edge-reason chat - {name} on {rt.backend.info.device}. /help for commands, Ctrl-D to exit.", err=True)
        if bundled:
            from edge.model_ref import DEFAULT_MODEL_HINT

            click.echo(f"({DEFAULT_MODEL_HINT})", err=True)
        plan_speculation(rt, params.speculate)
        while True:
            try:
                line = _read(">>> ", stdin)
            except KeyboardInterrupt:
                click.echo("\n(Ctrl-D or /exit to leave)", err=True)
                continue
            if line is None:
                click.echo("", err=True)
                break
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                cmd = text.split()[0]
                if cmd in ("/exit", "/quit", "/bye"):
                    break
                if cmd == "/reset":
                    history = history[:1] if system else []
                    click.echo("(conversation reset)", err=True)
                elif cmd == "/stats":
                    if last is None:
                        click.echo("(no reply yet)", err=True)
                    else:
                        for k, v in last.stats.to_dict().items():
                            if k != "backend":
                                click.echo(f"  {k}: {v}", err=True)
                        b = last.stats.backend
                        click.echo(f"  backend: {b.get('name')} device={b.get('device')} threads={b.get('threads')} gpu_layers={b.get('gpu_layers')}", err=True)
                elif cmd == "/help":
                    click.echo(HELP, err=True)
                else:
                    click.echo(f"unknown command {cmd}; /help lists them", err=True)
                continue
            history.append({"role": "user", "content": text})
            printer = StreamPrinter(hide_thinking=hide_thinking)
            try:
                reply = printer.consume(rt.chat(history, params, controllers=controllers, think=not no_think))
            except KeyboardInterrupt:
                click.echo("\n(stopped)", err=True)
                history.pop()
                continue
            except EdgeError as exc:
                click.echo(f"error: {exc}", err=True)
                history.pop()
                continue
            history.append({"role": "assistant", "content": reply.answer})
            last = reply
