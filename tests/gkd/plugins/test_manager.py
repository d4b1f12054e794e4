from __future__ import annotations

import pytest

from gkd.plugins import MethodLoadError, MethodNotFound, load_plugin_manager

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
