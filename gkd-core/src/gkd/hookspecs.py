"""Hook specifications of gkd, for plugin authors.

Every hook is named ``gkd_*``; implement it in a module decorated with
``@gkd.hookimpl`` and expose that module through an entry point in the group
``gkd.methods`` (see :mod:`gkd.plugins`). Hooks are grouped by the phase in which gkd
calls them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import click

    from gkd.plugins.registry import MethodRegistrar

PROJECT_NAME = "gkd"

_spec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


# --------------------------------------------------------------------------- registration


@_spec
def gkd_register_methods(register: MethodRegistrar) -> None:
    """Register the distillation methods this plugin provides.

    Called once per plugin when gkd loads its entry points, before any config is read.
    Call ``register(spec)`` once per method with a :class:`gkd.MethodSpec`; the method's
    JSON Schema is checked on the spot (Draft 2020-12). A plugin whose call raises, whose
    schema is invalid, or which registers a name that another distribution already owns is
    recorded as *broken*: it is listed by ``gkd methods list`` with the reason, and a run
    that selects it fails with that reason. Other plugins keep loading.

    Args:
        register: Callable taking a :class:`gkd.MethodSpec`.

    Returns:
        Nothing; results are collected through ``register``.
    """


@_spec
def gkd_register_commands(cli: click.Group) -> None:
    """Add sub-commands to the ``gkd`` command line.

    Called once when the CLI starts, after methods are loaded. Use ``@cli.command()``
    to attach commands; a plugin must not replace built-in commands.

    Args:
        cli: The top-level ``gkd`` click group.
    """


__all__ = ["PROJECT_NAME", "gkd_register_commands", "gkd_register_methods", "hookimpl"]
