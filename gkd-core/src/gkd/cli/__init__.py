"""The ``gkd`` command line. Bad input exits with code 2 and a message, never a traceback."""

from __future__ import annotations

import sys
from typing import Any

import click

from gkd import __version__
from gkd.errors import GkdError

EXIT_BAD_INPUT = 2


class GkdGroup(click.Group):
    """Turns gkd's user-facing errors into one message on stderr and exit code 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except GkdError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(EXIT_BAD_INPUT)


@click.group(cls=GkdGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="gkd")
def cli() -> None:
    """gkd — general knowledge distillation for large pre-trained language models."""


def _register_commands() -> None:
    from gkd.cli import config_cmd, distill, env, methods, validate

    cli.add_command(distill.distill)
    cli.add_command(methods.methods)
    cli.add_command(validate.validate)
    cli.add_command(env.env)
    cli.add_command(config_cmd.config)
    from gkd.plugins.manager import get_plugin_manager

    get_plugin_manager().register_commands(cli)


_register_commands()


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv if argv is not None else sys.argv[1:], prog_name="gkd")


__all__ = ["EXIT_BAD_INPUT", "cli", "main"]
