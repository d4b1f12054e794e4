"""The ``gkd`` command line. Bad input exits with code 2 and a message, never a traceback.

The group is lazy, so that ``gkd --help``, ``gkd --version`` and ``gkd env`` start in a
fraction of a second: a built-in command's module is imported only when that command runs,
and method plugins are loaded only for a command that is not built in (a plugin command)
or by the commands that list plugins.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, NamedTuple

import click
from click.utils import make_default_short_help

from gkd import __version__
from gkd.errors import GkdError

EXIT_BAD_INPUT = 2


class Builtin(NamedTuple):
    """Where a built-in command lives, and its one-line help for ``gkd --help``."""

    target: str
    """``"module:attribute"``, imported on first use."""
    summary: str
    """The first line of the command's docstring (a test keeps the two equal)."""


BUILTIN_COMMANDS: dict[str, Builtin] = {
    "analyze": Builtin("gkd.cli.analyze:analyze",
                       "Correlate recorded feature distances with the loss and the task metric; with RUN_B, compare what each run moved."),
    "cache": Builtin("gkd.cli.cache:cache", "Inspect and prune the teacher-output cache (run config `cache`)."),
    "config": Builtin("gkd.cli.config_cmd:config", "Run-config reference."),
    "distill": Builtin("gkd.cli.distill:distill",
                       "Distil as described by CONFIG (YAML or JSON), resuming from the latest checkpoint."),
    "env": Builtin("gkd.cli.env:env",
                   "Print versions of Python, gkd, torch, megatron-core and DeepSpeed, and the installed plugins."),
    "eval": Builtin("gkd.cli.eval:eval_cmd",
                    "Evaluate an exported model under PyTorch and onnxruntime: metric, examples/s, batch-1 latency."),
    "export": Builtin("gkd.cli.export:export",
                      "Export a run's student (final or --stage) to Hugging Face or ONNX, checked against the gkd model."),
    "methods": Builtin("gkd.cli.methods:methods", "Inspect installed distillation methods and plugin commands."),
    "plan": Builtin("gkd.cli.plan:plan_cmd",
                    "Predict per-GPU memory of every parallel layout and recommend one (CONFIG, or --teacher/--student sizes)."),
    "validate": Builtin("gkd.cli.validate:validate",
                        "Check a run config without running it; every error is printed as 'FILE: path: message'."),
}
"""Reserved names: a plugin cannot add a command under any of them."""

EPILOG = "Plugins may add further commands; `gkd methods list` shows them and any plugin that failed to load."


def load_builtin(name: str) -> click.Command:
    """Import and return the built-in command ``name``."""
    module, _, attr = BUILTIN_COMMANDS[name].target.partition(":")
    return getattr(importlib.import_module(module), attr)


def plugin_commands() -> dict[str, click.Command]:
    """Commands added by installed plugins (loads every plugin)."""
    from gkd.plugins.manager import get_plugin_manager

    return get_plugin_manager().plugin_commands(reserved=BUILTIN_COMMANDS)


class GkdGroup(click.Group):
    """The lazy top-level group.

    Built-in commands come from :data:`BUILTIN_COMMANDS`, imported when invoked; any other
    name loads the plugins and looks among their commands. gkd's user-facing errors become
    one message on stderr and exit code 2.
    """

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in BUILTIN_COMMANDS:
            return load_builtin(cmd_name)
        if cmd_name in self.commands:
            return self.commands[cmd_name]
        return plugin_commands().get(cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        # Plugin commands are not listed (that would load every plugin); the epilog says so.
        return sorted({*BUILTIN_COMMANDS, *self.commands})

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # The built-ins' help comes from the table, so `gkd --help` imports none of them.
        names = self.list_commands(ctx)
        limit = formatter.width - 6 - max(len(n) for n in names)
        rows = []
        for name in names:
            if name in BUILTIN_COMMANDS:
                rows.append((name, make_default_short_help(BUILTIN_COMMANDS[name].summary, limit)))
            elif not self.commands[name].hidden:
                rows.append((name, self.commands[name].get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        # Before the sub-command is resolved: resolving may load plugins, which may import
        # megatron-core, whose import-time warnings the filters must already catch.
        from gkd.quiet import quiet_dependencies

        quiet_dependencies(verbose=bool(ctx.params.get("verbose")))
        try:
            return super().invoke(ctx)
        except GkdError as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(EXIT_BAD_INPUT)


@click.group(cls=GkdGroup, context_settings={"help_option_names": ["-h", "--help"]}, epilog=EPILOG)
@click.version_option(__version__, prog_name="gkd")
@click.option("-v", "--verbose", is_flag=True,
              help="Show the start-up warnings of megatron-core and DeepSpeed (hidden by default).")
# The deepspeed launcher puts --local_rank=N before the sub-command unless given --no_local_rank;
# the process reads LOCAL_RANK from its environment anyway.
@click.option("--local_rank", "--local-rank", "local_rank", type=int, default=None, hidden=True, expose_value=False)
def cli(verbose: bool) -> None:
    """gkd — general knowledge distillation for large pre-trained language models."""


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    cli.main(args=argv if argv is not None else sys.argv[1:], prog_name="gkd")


__all__ = ["BUILTIN_COMMANDS", "EPILOG", "EXIT_BAD_INPUT", "GkdGroup", "cli", "load_builtin", "main",
           "plugin_commands"]
