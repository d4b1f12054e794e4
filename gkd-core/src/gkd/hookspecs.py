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

    Called once per plugin, after methods are loaded, and only when gkd needs plugin
    commands: a command name that is not built in, ``gkd methods list`` or
    ``gkd env --check-plugins``. ``gkd --help``, ``gkd env`` and the other built-in commands
    never call it. Use ``@cli.command()`` (or
    ``cli.add_command``) to attach commands. A plugin may implement only this hook.

    ``cli`` is a staging group of its own: its commands join ``gkd`` only if the call
    returns and none of them takes the name of a built-in command or of a command another
    plugin already added. Otherwise the plugin is recorded as broken (``gkd methods list``
    shows why) and every other command keeps working.

    Args:
        cli: A click group standing in for the top-level ``gkd`` group.
    """


__all__ = ["PROJECT_NAME", "gkd_register_commands", "gkd_register_methods", "hookimpl"]
