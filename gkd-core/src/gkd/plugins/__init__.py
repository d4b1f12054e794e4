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

The built-in methods load exactly the same way. See :mod:`gkd.hookspecs` for every hook and
:mod:`gkd.plugins.manager` for the environment switches.
"""

from gkd.plugins.errors import GkdError, MethodLoadError, MethodNotFound
from gkd.plugins.manager import (
    ENTRY_POINT_GROUP,
    GkdPluginManager,
    get_plugin_manager,
    load_plugin_manager,
    reset_plugin_manager,
)
from gkd.plugins.registry import BrokenMethod, MethodRegistrar, MethodRegistry, Origin, RegisteredMethod

__all__ = [
    "ENTRY_POINT_GROUP",
    "BrokenMethod",
    "GkdError",
    "GkdPluginManager",
    "MethodLoadError",
    "MethodNotFound",
    "MethodRegistrar",
    "MethodRegistry",
    "Origin",
    "RegisteredMethod",
    "get_plugin_manager",
    "load_plugin_manager",
    "reset_plugin_manager",
]
