"""Loading method plugins from entry points, one at a time, so that one bad plugin cannot
stop the others.

Environment switches:

``GKD_LOAD_METHODS=a,b``
    Load only these entry points (an empty value loads none).
``GKD_DISABLE_METHODS=a,b``
    Skip these entry points; they are listed with status ``disabled``.
``GKD_TRACE_HOOKS=1``
    Print every hook call (name, arguments, results) to standard error.
"""

from __future__ import annotations

import importlib.metadata as md
import os
import sys
from collections.abc import Iterable
from typing import Any

import pluggy

from gkd import hookspecs
from gkd.plugins.registry import InvalidMethodSpec, MethodRegistrar, MethodRegistry, Origin

ENTRY_POINT_GROUP = "gkd.methods"
ENV_LOAD = "GKD_LOAD_METHODS"
ENV_DISABLE = "GKD_DISABLE_METHODS"
ENV_TRACE = "GKD_TRACE_HOOKS"
BUILTIN_DISTRIBUTIONS = ("gkd-methods-builtin", "gkd-methods-multiteacher")
"""Loaded first, so a third-party plugin can never take a built-in method's name."""


def _env_list(name: str) -> set[str] | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


def _entry_points() -> list[md.EntryPoint]:
    seen: set[tuple[str, str]] = set()
    result = []
    for ep in md.entry_points(group=ENTRY_POINT_GROUP):
        # An editable install can expose the same distribution twice on sys.path.
        key = (ep.name, ep.value)
        if key not in seen:
            seen.add(key)
            result.append(ep)
    def order(ep: md.EntryPoint) -> tuple[int, str, str]:
        dist = ep.dist.name if ep.dist else ""
        return (0 if dist in BUILTIN_DISTRIBUTIONS else 1, dist, ep.name)

    return sorted(result, key=order)


class GkdPluginManager:
    """Typed facade over :class:`pluggy.PluginManager` holding the method registry."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.registry = MethodRegistry()
        self._undo_trace = None
        if os.environ.get(ENV_TRACE, "") not in ("", "0"):
            self.enable_tracing()

    # ----------------------------------------------------------------- loading

    def load_entry_points(self, entry_points: Iterable[md.EntryPoint] | None = None) -> None:
        """Load every ``gkd.methods`` entry point, honouring the environment switches."""
        only, disabled = _env_list(ENV_LOAD), _env_list(ENV_DISABLE) or set()
        for ep in entry_points if entry_points is not None else _entry_points():
            dist = ep.dist
            origin = Origin(ep.name, dist.name if dist else "(unknown)", dist.version if dist else "?")
            if (only is not None and ep.name not in only) or ep.name in disabled:
                var = ENV_DISABLE if ep.name in disabled else ENV_LOAD
                self.registry.mark_broken(ep.name, origin, f"disabled by {var}", status="disabled")
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # any import-time failure of a third-party plugin
                self.registry.mark_broken(ep.name, origin, f"import of {ep.value!r} failed: {type(exc).__name__}: {exc}")
                continue
            self.add_plugin(plugin, origin)

    def add_plugin(self, plugin: Any, origin: Origin) -> bool:
        """Register one plugin object (module or instance) and collect its methods.

        Research code can call this directly to use a method without packaging it.
        Returns False when the plugin was recorded as broken.
        """
        name = f"{origin.distribution}:{origin.entry_point}"
        try:
            self.pm.register(plugin, name=name)
            unknown = [
                hc.name for hc in self.pm.get_hookcallers(plugin) or [] if hc.spec is None and hc.name.startswith("gkd_")
            ]
            if unknown:
                raise InvalidMethodSpec(f"implements unknown hook(s) {unknown}; known: gkd_register_methods, gkd_register_commands")
            registrar = MethodRegistrar(origin)
            others = [p for p in self.pm.get_plugins() if p is not plugin]
            self.pm.subset_hook_caller("gkd_register_methods", remove_plugins=others)(register=registrar)
            if not registrar.specs:
                raise InvalidMethodSpec("the plugin registered no method")
            for spec in registrar.specs:  # all or nothing: check every name before adding any
                self.registry.check_free(spec.name, origin)
            for spec in registrar.specs:
                self.registry.add(spec, origin)
        except Exception as exc:
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            reason = str(exc) if isinstance(exc, InvalidMethodSpec) else f"{type(exc).__name__}: {exc}"
            self.registry.mark_broken(origin.entry_point, origin, reason)
            return False
        return True

    # ----------------------------------------------------------------- hooks

    def register_commands(self, cli: Any) -> None:
        self.pm.hook.gkd_register_commands(cli=cli)

    def enable_tracing(self) -> None:
        def before(hook_name: str, impls: list[Any], kwargs: dict[str, Any]) -> None:
            who = ", ".join(getattr(i, "plugin_name", "?") for i in impls)
            print(f"[gkd trace] {hook_name}({', '.join(kwargs)}) -> [{who}]", file=sys.stderr)

        def after(outcome: Any, hook_name: str, impls: list[Any], kwargs: dict[str, Any]) -> None:
            exc = outcome.exception
            print(f"[gkd trace] {hook_name} {'raised ' + repr(exc) if exc else 'returned ' + repr(outcome.get_result())}",
                  file=sys.stderr)

        self._undo_trace = self.pm.add_hookcall_monitoring(before, after)


def load_plugin_manager() -> GkdPluginManager:
    """A fresh manager with every installed method plugin loaded."""
    manager = GkdPluginManager()
    manager.load_entry_points()
    return manager


_CACHED: GkdPluginManager | None = None


def get_plugin_manager() -> GkdPluginManager:
    """The process-wide manager, loaded on first use (the CLI and ``gkd.run`` use this)."""
    global _CACHED
    if _CACHED is None:
        _CACHED = load_plugin_manager()
    return _CACHED


def reset_plugin_manager() -> None:
    """Forget the cached manager (tests, or after installing a plugin in-process)."""
    global _CACHED
    _CACHED = None


__all__ = ["ENTRY_POINT_GROUP", "GkdPluginManager", "get_plugin_manager", "load_plugin_manager",
           "reset_plugin_manager"]
