"""The ``edge-reason`` command: a click group whose subcommands load lazily.

Each command group lives in its own module under :mod:`edge.cli` and is imported only when
invoked, so ``edge-reason --help`` never imports llama_cpp, torch or onnxruntime."""

from __future__ import annotations

import importlib
import logging
import os
import sys

import click

from edge.errors import EdgeError

# command name -> (module, attribute, one-line help shown by --help without importing it)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "run": ("edge.cli.run", "run", "Answer one prompt: answer on stdout, thinking on stderr."),
    "chat": ("edge.cli.chat", "chat", "Multi-turn chat in the terminal."),
    "convert": ("edge.cli.convert", "convert", "Convert Hugging Face checkpoints to GGUF or ONNX, and verify them."),
    "eval": ("edge.cli.eval", "eval_cmd", "Evaluate accuracy and thinking cost of reasoning policies."),
    "bench": ("edge.cli.bench", "bench", "Benchmark throughput, overhead and reasoning cost on this device."),
    "serve": ("edge.cli.serve", "serve", "Serve an OpenAI-compatible API on localhost."),
}


def _debug() -> bool:
    """``EDGE_DEBUG=1``: errors show their traceback."""
    return os.environ.get("EDGE_DEBUG", "") not in ("", "0")


class LazyGroup(click.Group):
    """The command group: subcommands imported when invoked, and the errors a user can cause
    (:class:`EdgeError`, a file the system refuses) turned into one ``error:`` line on stderr
    and a non-zero exit, wherever the group is invoked from (``main``, click's ``CliRunner``)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EdgeError as exc:
            if _debug():
                raise
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)
        except OSError as exc:
            if _debug():
                raise
            click.echo(f"error: {exc.strerror or exc} ({exc.filename})" if getattr(exc, "filename", None) else f"error: {exc}", err=True)
            ctx.exit(1)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name, (mod, _, _) in COMMANDS.items() if importlib.util.find_spec(mod) is not None]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name == module:
                return None
            raise
        return getattr(mod, attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edge-reason")
@click.option("-v", "--verbose", is_flag=True, help="Log diagnostics to stderr.")
def cli(verbose: bool) -> None:
    """edge-reason: run distilled reasoning models on this device, thinking as long as needed."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> None:
    """Entry point: errors a user can cause become one line on stderr and a non-zero exit
    (domain errors in :class:`LazyGroup`; click's own usage errors and Ctrl-C here)."""
    try:
        rv = cli.main(args=argv, prog_name="edge-reason", standalone_mode=False)
        if isinstance(rv, int) and rv:
            sys.exit(rv)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
