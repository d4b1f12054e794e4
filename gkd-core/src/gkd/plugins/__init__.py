"""gkd's plugin system, in one page.

A method plugin is a module with ``@gkd.hookimpl`` functions, exposed through an entry point
in the group ``gkd.methods`` — one entry point per method module::

    # my_method/__init__.py
    import gkd

    @gkd.hookimpl
    def gkd_register_methods(register):
        register(gkd.MethodSpec(
            name="my-kd", summary="...", citation="...",
            kind="single-teacher", stages=("task",),
            config_schema={"type": "object", "properties": {...}, "additionalProperties": False},
            factory=MyKD,
        ))

    # pyproject.toml
    [project.entry-points."gkd.methods"]
    my-kd = "my_method"

A plugin may also (or only) add commands with ``gkd_register_commands``.
The built-in methods load exactly the same way. See :mod:`gkd.hookspecs` for every hook and
:mod:`gkd.plugins.manager` for the environment switches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gkd._lazy import lazy_exports

# Lazy (PEP 562): ``gkd env`` imports gkd.plugins.discovery without pluggy or jsonschema.
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("GkdError", "MethodLoadError", "MethodNotFound"), "gkd.plugins.errors"),
    **dict.fromkeys(("ENTRY_POINT_GROUP", "InstalledPlugin", "installed_plugins"), "gkd.plugins.discovery"),
    **dict.fromkeys(("GkdPluginManager", "get_plugin_manager", "load_plugin_manager", "reset_plugin_manager"),
                    "gkd.plugins.manager"),
    **dict.fromkeys(("BrokenMethod", "MethodRegistrar", "MethodRegistry", "Origin", "PluginCommands",
                     "RegisteredMethod"), "gkd.plugins.registry"),
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = [
    "ENTRY_POINT_GROUP",
    "BrokenMethod",
    "GkdError",
    "GkdPluginManager",
    "InstalledPlugin",
    "MethodLoadError",
    "MethodNotFound",
    "MethodRegistrar",
    "MethodRegistry",
    "Origin",
    "PluginCommands",
    "RegisteredMethod",
    "get_plugin_manager",
    "installed_plugins",
    "load_plugin_manager",
    "reset_plugin_manager",
]

if TYPE_CHECKING:
    from gkd.plugins.discovery import ENTRY_POINT_GROUP, InstalledPlugin, installed_plugins
    from gkd.plugins.errors import GkdError, MethodLoadError, MethodNotFound
    from gkd.plugins.manager import (
        GkdPluginManager,
        get_plugin_manager,
        load_plugin_manager,
        reset_plugin_manager,
    )
    from gkd.plugins.registry import (
        BrokenMethod,
        MethodRegistrar,
        MethodRegistry,
        Origin,
        PluginCommands,
        RegisteredMethod,
    )
