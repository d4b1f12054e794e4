from __future__ import annotations

import textwrap
import types

import pytest

from gkd.plugins import (
    GkdPluginManager,
    MethodLoadError,
    MethodNotFound,
    Origin,
    PluginCommands,
    load_plugin_manager,
)

GOOD = """
import gkd

@gkd.hookimpl
def gkd_register_methods(register):
    register(gkd.MethodSpec(name="good-kd", summary="s", citation="c", kind="single-teacher", stages=("task",),
        config_schema={"type": "object", "properties": {"t": {"type": "number", "default": 1}}}))
"""
IMPORT_FAILS = "import gkd\nraise RuntimeError('boom at import')\n"
BAD_SCHEMA = """
import gkd

@gkd.hookimpl
def gkd_register_methods(register):
    register(gkd.MethodSpec(name="bad-schema", summary="s", citation="c", kind="single-teacher", stages=("task",),
        config_schema={"type": "object", "properties": {"t": {"type": 12}}}))
"""
DUPLICATE = """
import gkd

@gkd.hookimpl
def gkd_register_methods(register):
    register(gkd.MethodSpec(name="kd", summary="s", citation="c", kind="single-teacher", stages=("task",)))
"""
UNKNOWN_HOOK = """
import gkd

@gkd.hookimpl
def gkd_register_methodz(register):
    pass
"""


def test_builtin_methods_come_from_real_entry_points():
    manager = load_plugin_manager()
    by_name = {m.spec.name: m for m in manager.registry}
    assert {"kd", "tinybert", "tmkd"} <= set(by_name)
    assert by_name["kd"].origin.distribution == "gkd-methods-builtin"
    assert by_name["tmkd"].origin.distribution == "gkd-methods-multiteacher"
    assert by_name["tinybert"].spec.has_parameters is True
    assert manager.registry.broken == []


def test_broken_plugins_are_isolated_and_reported(make_plugin_dist):
    make_plugin_dist(
        "gkd-test-plugins",
        {"good-kd": "tp_good", "explodes": "tp_explodes", "bad-schema": "tp_bad_schema", "dup": "tp_dup",
         "typo-hook": "tp_typo"},
        {"tp_good": GOOD, "tp_explodes": IMPORT_FAILS, "tp_bad_schema": BAD_SCHEMA, "tp_dup": DUPLICATE,
         "tp_typo": UNKNOWN_HOOK},
        version="9.9.9",
    )
    registry = load_plugin_manager().registry
    assert {"kd", "tinybert", "tmkd", "good-kd"} <= set(registry.names())
    broken = {b.name: b for b in registry.broken}
    assert set(broken) == {"explodes", "bad-schema", "dup", "typo-hook"}
    assert "boom at import" in broken["explodes"].reason
    assert broken["explodes"].origin.distribution == "gkd-test-plugins"
    assert broken["explodes"].origin.version == "9.9.9"
    assert "invalid config schema" in broken["bad-schema"].reason
    assert "already registered by gkd-methods-builtin" in broken["dup"].reason
    assert "gkd_register_methodz" in broken["typo-hook"].reason
    # The built-in kd is untouched by the duplicate.
    assert registry.get("kd").origin.distribution == "gkd-methods-builtin"
    with pytest.raises(MethodLoadError, match=r'Error loading method "explodes" from gkd-test-plugins 9.9.9: .*boom'):
        registry.get("explodes")


def test_unknown_method_suggests_a_name():
    registry = load_plugin_manager().registry
    with pytest.raises(MethodNotFound, match="did you mean 'tinybert'"):
        registry.get("tinybrt")


def test_disable_and_load_only(monkeypatch):
    monkeypatch.setenv("GKD_DISABLE_METHODS", "tinybert")
    registry = load_plugin_manager().registry
    assert "tinybert" not in registry.names()
    assert [(b.name, b.status) for b in registry.broken] == [("tinybert", "disabled")]
    with pytest.raises(MethodLoadError, match="disabled by GKD_DISABLE_METHODS"):
        registry.get("tinybert")
    monkeypatch.delenv("GKD_DISABLE_METHODS")
    monkeypatch.setenv("GKD_LOAD_METHODS", "kd")
    assert load_plugin_manager().registry.names() == ["kd"]
    monkeypatch.setenv("GKD_LOAD_METHODS", "")
    assert load_plugin_manager().registry.names() == []


def test_trace_hooks_prints_calls(monkeypatch, capsys):
    monkeypatch.setenv("GKD_TRACE_HOOKS", "1")
    monkeypatch.setenv("GKD_LOAD_METHODS", "kd")
    load_plugin_manager()
    err = capsys.readouterr().err
    assert "[gkd trace] gkd_register_methods(register)" in err
    assert "returned" in err


# ------------------------------------------------------------------ plugins that add commands

HELLO = """
import click
import gkd

@gkd.hookimpl
def gkd_register_commands(cli):
    @cli.command()
    def hello():
        click.echo("hello")
"""
RAISES = """
import gkd

@gkd.hookimpl
def gkd_register_commands(cli):
    @cli.command()
    def half_done():
        pass
    raise RuntimeError("no commands today")
"""
METHOD_AND_BAD_COMMANDS = GOOD + """

@gkd.hookimpl
def gkd_register_commands(cli):
    raise KeyError("config")
"""
TAKES_ENV = """
import click
import gkd

@gkd.hookimpl
def gkd_register_commands(cli):
    cli.add_command(click.Command("env", callback=lambda: None))
"""
NO_HOOK = "import gkd\n"
NO_METHOD = """
import gkd

@gkd.hookimpl
def gkd_register_methods(register):
    pass
"""


def _module(name: str, source: str) -> types.ModuleType:
    module = types.ModuleType(name)
    exec(textwrap.dedent(source), module.__dict__)
    return module


def _manager(**sources: str) -> GkdPluginManager:
    manager = GkdPluginManager()
    for name, source in sources.items():
        manager.add_plugin(_module(name, source), Origin(name, f"dist-{name}", "1.0"))
    return manager


def test_command_only_plugin_is_accepted_and_its_hook_runs_on_demand():
    manager = _manager(hello=HELLO)
    assert manager.registry.broken == [] and len(manager.registry) == 0
    assert manager.command_plugins == []  # not called before the CLI asks
    commands = manager.plugin_commands(reserved={"env"})
    assert list(commands) == ["hello"]
    assert manager.command_plugins == [PluginCommands(Origin("hello", "dist-hello", "1.0"), ("hello",))]
    assert manager.plugin_commands(reserved={"env"}) == commands  # once per plugin
    assert len(manager.command_plugins) == 1


def test_plugin_must_implement_a_hook_and_methods_hook_must_register():
    registry = _manager(nothing=NO_HOOK, empty=NO_METHOD).registry
    reasons = {b.name: b.reason for b in registry.broken}
    assert reasons == {"nothing": "implements no gkd hook; known: gkd_register_methods, gkd_register_commands",
                       "empty": "the plugin registered no method"}


def test_failing_command_hooks_are_isolated():
    manager = _manager(raises=RAISES, mixed=METHOD_AND_BAD_COMMANDS, takes_env=TAKES_ENV, hello=HELLO,
                       hello_again=HELLO)
    commands = manager.plugin_commands(reserved={"env", "distill"})
    assert list(commands) == ["hello"]  # nothing half-added by the plugin that raised
    status = {c.origin.entry_point: (c.status, c.reason) for c in manager.command_plugins}
    assert status["raises"] == ("error", "gkd_register_commands raised RuntimeError: no commands today")
    assert status["mixed"] == ("error", "gkd_register_commands raised KeyError: 'config'")
    assert status["takes_env"][0] == "error"
    assert "command 'env' would replace the built-in 'gkd env'" in status["takes_env"][1]
    assert status["hello"] == ("ok", "")
    assert status["hello_again"] == ("error", "command 'hello' is already added by dist-hello 1.0 (entry point "
                                              "'hello'); dist-hello_again 1.0 cannot add it again")
    # The plugin whose commands failed keeps its method.
    assert manager.registry.get("good-kd").origin.entry_point == "mixed"
    assert manager.registry.broken == []


def test_trace_shows_one_command_hook_call_per_plugin(monkeypatch, capsys):
    monkeypatch.setenv("GKD_TRACE_HOOKS", "1")
    _manager(hello=HELLO, raises=RAISES).plugin_commands()
    err = capsys.readouterr().err
    assert "[gkd trace] gkd_register_commands(cli) -> [dist-hello:hello]" in err
    assert "[gkd trace] gkd_register_commands(cli) -> [dist-raises:raises]" in err
    assert "raised RuntimeError('no commands today')" in err


BAD_FEATURES = """
import gkd

@gkd.hookimpl
def gkd_register_methods(register):
    register(gkd.MethodSpec(name="bad-features", summary="s", citation="c", kind="single-teacher", stages=("task",),
        features=gkd.FeatureUse(teacher=("layers.{i}.atention.scores",), student=("logits",))))
"""


def test_a_spec_with_an_unknown_feature_pattern_is_broken():
    (broken,) = _manager(bad=BAD_FEATURES).registry.broken
    assert broken.reason.startswith("method 'bad-features': teacher feature ")
    assert "atention.scores" in broken.reason
