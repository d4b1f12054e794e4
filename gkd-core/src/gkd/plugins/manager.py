"""Loading plugins from entry points, one at a time, so that one bad plugin cannot stop the
others.

Every hook is called per plugin (a pluggy subset caller holding just that plugin), so a hook
that raises marks only its own plugin as broken. ``gkd_register_methods`` runs when the
plugin loads; ``gkd_register_commands`` only when the command line needs plugin commands
(:meth:`GkdPluginManager.plugin_commands`).

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
from typing import TYPE_CHECKING, Any

import pluggy

from gkd import hookspecs
from gkd.plugins.discovery import BUILTIN_DISTRIBUTIONS, ENTRY_POINT_GROUP
from gkd.plugins.discovery import entry_points as _entry_points
from gkd.plugins.registry import InvalidMethodSpec, MethodRegistrar, MethodRegistry, Origin, PluginCommands

if TYPE_CHECKING:
    import click

ENV_LOAD = "GKD_LOAD_METHODS"
ENV_DISABLE = "GKD_DISABLE_METHODS"
ENV_TRACE = "GKD_TRACE_HOOKS"
KNOWN_HOOKS: tuple[str, ...] = tuple(name for name in vars(hookspecs) if name.startswith("gkd_"))
"""Every hook a plugin may implement, in the order :mod:`gkd.hookspecs` defines them."""


PLUGIN_FAILURES: tuple[type[BaseException], ...] = (Exception, SystemExit)
"""What a plugin's import or hook may raise and only mark the plugin broken: ``sys.exit()`` in a
plugin must not end the command that loads it. ``KeyboardInterrupt`` still stops gkd."""


def describe_failure(exc: BaseException) -> str:
    """``RuntimeError: boom``, or ``sys.exit(3)`` for a plugin that tried to end the process."""
    if isinstance(exc, SystemExit):
        return f"sys.exit({exc.code!r})" if exc.code is not None else "sys.exit()"
    return f"{type(exc).__name__}: {exc}"


def _env_list(name: str) -> set[str] | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    return {part.strip() for part in raw.split(",") if part.strip()}


class GkdPluginManager:
    """Typed facade over :class:`pluggy.PluginManager` holding the method registry and the
    commands plugins add."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.registry = MethodRegistry()
        self.command_plugins: list[PluginCommands] = []
        """One record per plugin whose ``gkd_register_commands`` was called: its commands or
        why it is broken."""
        self._commands: dict[str, click.Command] = {}
        self._command_origins: dict[str, Origin] = {}
        self._pending_commands: list[tuple[Any, Origin]] = []
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
            except PLUGIN_FAILURES as exc:  # any import-time failure of a third-party plugin, sys.exit() included
                self.registry.mark_broken(ep.name, origin, f"import of {ep.value!r} failed: {describe_failure(exc)}")
                continue
            self.add_plugin(plugin, origin)

    def add_plugin(self, plugin: Any, origin: Origin) -> bool:
        """Register one plugin object (module or instance) and collect its methods.

        A plugin must implement at least one gkd hook; one that only adds commands may
        register no method. Research code can call this directly to use a method without
        packaging it. Returns False when the plugin was recorded as broken.
        """
        name = f"{origin.distribution}:{origin.entry_point}"
        try:
            self.pm.register(plugin, name=name)
            hooks = {hc.name for hc in self.pm.get_hookcallers(plugin) or [] if hc.name.startswith("gkd_")}
            unknown = sorted(hooks - set(KNOWN_HOOKS))
            if unknown:
                raise InvalidMethodSpec(f"implements unknown hook(s) {unknown}; known: {', '.join(KNOWN_HOOKS)}")
            if not hooks:
                raise InvalidMethodSpec(f"implements no gkd hook; known: {', '.join(KNOWN_HOOKS)}")
            registrar = MethodRegistrar(origin)
            if "gkd_register_methods" in hooks:
                self._call_one(plugin, "gkd_register_methods", register=registrar)
                if not registrar.specs and "gkd_register_commands" not in hooks:
                    raise InvalidMethodSpec("the plugin registered no method")
            for spec in registrar.specs:  # all or nothing: check every name before adding any
                self.registry.check_free(spec.name, origin)
            for spec in registrar.specs:
                self.registry.add(spec, origin)
        except PLUGIN_FAILURES as exc:
            if self.pm.is_registered(plugin):
                self.pm.unregister(plugin)
            reason = str(exc) if isinstance(exc, InvalidMethodSpec) else describe_failure(exc)
            self.registry.mark_broken(origin.entry_point, origin, reason)
            return False
        if "gkd_register_commands" in hooks:
            self._pending_commands.append((plugin, origin))
        return True

    # ----------------------------------------------------------------- commands

    def plugin_commands(self, reserved: Iterable[str] = ()) -> dict[str, click.Command]:
        """The commands plugins add, by name, calling each pending plugin's
        ``gkd_register_commands`` once.

        Each plugin gets a fresh staging group; its commands are accepted all or nothing, and
        only if none takes a name in ``reserved`` (the built-in commands) or one another
        plugin already added. A plugin whose hook raises or collides is recorded in
        :attr:`command_plugins` with status ``error``; the other plugins' commands still work.
        """
        import click

        reserved = set(reserved)
        while self._pending_commands:
            plugin, origin = self._pending_commands.pop(0)
            staging = click.Group(name="gkd")
            try:
                self._call_one(plugin, "gkd_register_commands", cli=staging)
                added = dict(staging.commands)
                for cmd_name in sorted(added, key=str):
                    self._check_command_free(cmd_name, added[cmd_name], origin, reserved)
            except PLUGIN_FAILURES as exc:  # third-party code: any failure marks only this plugin
                reason = str(exc) if isinstance(exc, InvalidMethodSpec) else (
                    f"gkd_register_commands {'called' if isinstance(exc, SystemExit) else 'raised'} "
                    f"{describe_failure(exc)}")
                self.command_plugins.append(PluginCommands(origin, (), reason, status="error"))
                continue
            self._commands.update(added)
            self._command_origins.update(dict.fromkeys(added, origin))
            self.command_plugins.append(PluginCommands(origin, tuple(sorted(added))))
        return dict(self._commands)

    def _check_command_free(self, name: Any, command: Any, origin: Origin, reserved: set[str]) -> None:
        import click

        if not isinstance(name, str) or not isinstance(command, click.Command):
            raise InvalidMethodSpec(f"gkd_register_commands added {name!r}, which is not a click command")
        if name in reserved:
            raise InvalidMethodSpec(f"command {name!r} would replace the built-in 'gkd {name}'; plugins cannot do that")
        if name in self._commands:
            other = self._command_origins[name]
            raise InvalidMethodSpec(
                f"command {name!r} is already added by {other.distribution} {other.version}"
                f" (entry point {other.entry_point!r}); {origin.distribution} {origin.version} cannot add it again"
            )

    # ----------------------------------------------------------------- hooks

    def _call_one(self, plugin: Any, hook: str, **kwargs: Any) -> Any:
        # A caller holding only this plugin, so its failure is its own and no other plugin's.
        others = [p for p in self.pm.get_plugins() if p is not plugin]
        return self.pm.subset_hook_caller(hook, remove_plugins=others)(**kwargs)

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


__all__ = ["BUILTIN_DISTRIBUTIONS", "ENTRY_POINT_GROUP", "KNOWN_HOOKS", "GkdPluginManager", "get_plugin_manager",
           "load_plugin_manager", "reset_plugin_manager"]
