"""``edge-reason serve``: an OpenAI-compatible API for one model, on localhost by default."""

from __future__ import annotations

from pathlib import Path

import click

from edge.cli.options import model_options, plan_speculation
from edge.server.config import ServerConfig  # the defaults, written once
from edge.server.protocol import REASONING_FORMATS


@click.command()
@model_options
@click.option("--host", default=ServerConfig.host, show_default=True, help="Address to bind; anything but loopback needs --api-key (else a loud warning).")
@click.option("--port", type=int, default=ServerConfig.port, show_default=True, help="Port (0 = a free one, printed at start).")
@click.option("--api-key", envvar="EDGE_API_KEY", default=None, help="Require 'Authorization: Bearer KEY' (or set EDGE_API_KEY).")
@click.option("--model-id", default=None, help="Model name reported by /v1/models (default: the file name).")
@click.option("--reasoning-format", type=click.Choice(REASONING_FORMATS), default=ServerConfig.reasoning_format, show_default=True,
              help="deepseek: reasoning_content apart from content; inline: <think>...</think> in content; none: hidden.")
@click.option("--chat-template", "chat_template_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="A Jinja chat template file overriding the model's.")
@click.option("--max-tokens-limit", type=int, default=ServerConfig.max_tokens_limit, show_default=True, help="Largest max_tokens a request may ask for (400 beyond).")
@click.option("--default-max-tokens", type=int, default=ServerConfig.default_max_tokens, show_default=True, help="max_tokens when a request gives none.")
@click.option("--max-queue", type=int, default=ServerConfig.max_queue, show_default=True, help="Requests that may wait for the model (503 + Retry-After beyond).")
@click.option("--max-body", "max_body_bytes", type=int, default=ServerConfig.max_body_bytes, show_default=True, help="Largest request body in bytes (413 beyond).")
@click.option("--body-timeout", "body_timeout_s", type=float, default=ServerConfig.body_timeout_s, show_default=True,
              help="Seconds a request body may take to arrive (408 and the connection closed beyond).")
@click.option("--log-level", default=ServerConfig.log_level, show_default=True, type=click.Choice(["critical", "error", "warning", "info", "debug"]))
def serve(chat_template_file: str | None, **kw) -> None:
    """Serve /v1/chat/completions, /v1/completions, /v1/models and /health for one model."""
    from edge.cli.options import pop_model_spec

    spec = pop_model_spec(kw)
    config = ServerConfig(**kw)  # validated before the model loads
    template = Path(chat_template_file).read_text(encoding="utf-8") if chat_template_file else None

    from edge.runtime import Runtime
    from edge.server.run import serve as run_server

    with Runtime(spec, chat_template=template) as rt:
        plan_speculation(rt, None)  # requests leave speculation on auto unless they say "speculate": false

        def started(port: int) -> None:
            host = config.host if ":" not in config.host else f"[{config.host}]"
            click.echo(f"edge-reason: serving {rt.backend.info.model_path or spec.model} at http://{host}:{port}/v1", err=True)

        run_server(rt, config, on_started=started)
