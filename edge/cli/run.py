"""``edge-reason run``: answer one prompt."""

from __future__ import annotations

import json
import sys

import click

from edge.cli.options import model_options, open_runtime, plan_speculation, pop_sampling, sampling_options
from edge.cli.text import TEXT, StdinText
from edge.cli.controls import control_options
from edge.errors import PromptError


@click.command()
@click.argument("prompt", required=False, type=TEXT)
@model_options
@sampling_options
@control_options
@click.option("--system", type=TEXT, default=None, help="System message.")
@click.option("--hide-thinking", is_flag=True, help="Print a one-line summary instead of the reasoning.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with answer, reasoning and stats.")
@click.option("--no-think", is_flag=True, help="Skip thinking (close the think block in the prompt).")
def run(prompt: str | None, system: str | None, hide_thinking: bool, as_json: bool, no_think: bool, **kw) -> None:
    """Answer PROMPT (or stdin when PROMPT is '-' or absent): answer on stdout, thinking on stderr."""
    from edge.cli.controls import build_controllers, pop_control

    if prompt is None or prompt == "-":
        prompt = "" if sys.stdin.isatty() else StdinText().read()
    if not prompt.strip():
        raise PromptError("the prompt is empty: pass some text, e.g. edge-reason run \"What is 2+2?\"")
    params = pop_sampling(kw)
    controllers = build_controllers(pop_control(kw))  # validated before the model loads
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    with open_runtime(kw) as rt:
        events = rt.chat(messages, params, controllers=controllers, think=not no_think)  # renders: a bad template stops here
        plan_speculation(rt, params.speculate)
        if as_json:
            from edge.runtime import collect

            click.echo(json.dumps(collect(events).to_dict(), ensure_ascii=False))
        else:
            from edge.cli.display import StreamPrinter

            StreamPrinter(hide_thinking=hide_thinking).consume(events)
