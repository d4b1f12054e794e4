"""Plugins that add commands, through real installed distributions and the real ``gkd`` script:
one whose ``gkd_register_commands`` raises, one adding ``gkd hello``, one trying to replace
``gkd env``. None of them may break another command."""

from __future__ import annotations

import json

import pytest


def test_methods_list_names_broken_command_plugins(command_plugin_site, run_gkd):
    proc = run_gkd("methods", "list", "--json", pythonpath=command_plugin_site)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    methods = {r["name"]: r for r in rows if r["provides"] == "method"}
    assert {"kd", "tinybert", "tmkd"} <= {n for n, r in methods.items() if r["status"] == "ok"}
    commands = {r["name"]: r for r in rows if r["provides"] == "commands"}
    assert set(commands) == {"broken-cmds", "hello-plugin", "hijack-env"}
    broken = commands["broken-cmds"]
    assert (broken["distribution"], broken["version"], broken["status"]) == ("gkd-broken-commands", "1.2.3", "error")
    assert broken["reason"] == "gkd_register_commands raised RuntimeError: cannot add commands: frobnicate is missing"
    assert commands["hello-plugin"]["status"] == "ok" and commands["hello-plugin"]["commands"] == ["hello"]
    assert commands["hijack-env"]["status"] == "error"
    assert "command 'env' would replace the built-in 'gkd env'" in commands["hijack-env"]["reason"]

    text = run_gkd("methods", "list", pythonpath=command_plugin_site)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].split() == ["NAME", "DISTRIBUTION", "VERSION", "KIND", "STATUS"]
    assert ["PLUGIN", "DISTRIBUTION", "VERSION", "COMMANDS", "STATUS"] in [line.split() for line in lines]
    assert ["broken-cmds", "gkd-broken-commands", "1.2.3", "-", "error"] in [line.split() for line in lines]
    assert ["hello-plugin", "gkd-hello", "0.4.0", "gkd", "hello", "ok"] in [line.split() for line in lines]
    assert ("  ! broken-cmds (commands): gkd_register_commands raised RuntimeError: cannot add commands: "
            "frobnicate is missing") in text.stderr.splitlines()


def test_env_lists_plugins_from_metadata_and_checks_them_on_request(command_plugin_site, run_gkd):
    plain = run_gkd("env", pythonpath=command_plugin_site)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.startswith("python ")  # the real env, not the plugin trying to replace it
    listed = [line.split() for line in plain.stdout.splitlines() if line.startswith("  ")]
    assert ["broken-cmds", "gkd-broken-commands", "1.2.3", "(gkd_broken_cmds)"] in listed
    assert ["hello-plugin", "gkd-hello", "0.4.0", "(gkd_hello_cmd)"] in listed

    checked = run_gkd("env", "--check-plugins", pythonpath=command_plugin_site)
    assert checked.returncode == 0, checked.stderr
    out = checked.stdout.splitlines()
    line = next(i for i, text in enumerate(out) if text.startswith("  broken-cmds "))
    assert out[line].endswith("(gkd_broken_cmds)  error")
    assert out[line + 1] == "    ! gkd_register_commands raised RuntimeError: cannot add commands: frobnicate is missing"
    assert any(text.startswith("  hello-plugin ") and text.endswith("ok — commands: gkd hello") for text in out)
    assert any(text.startswith("  kd ") and text.endswith("ok — methods: kd") for text in out)


def test_command_only_plugin_works_next_to_a_broken_one(command_plugin_site, run_gkd):
    proc = run_gkd("hello", "tester", pythonpath=command_plugin_site)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "hello, tester, from a plugin\n"
    assert proc.stderr == ""
    missing = run_gkd("nope", pythonpath=command_plugin_site)
    assert missing.returncode == 2 and "No such command 'nope'" in missing.stderr


# ------------------------------------------------------------------ plugins that try to end the process

EXITS_AT_IMPORT = "import sys\nsys.exit(3)\n"
EXITS_IN_METHODS = """
import sys
import gkd

@gkd.hookimpl
def gkd_register_methods(register):
    sys.exit()
"""
EXITS_IN_COMMANDS = """
import sys
import gkd

@gkd.hookimpl
def gkd_register_commands(cli):
    sys.exit("bye")
"""
NOT_A_COMMAND = """
import gkd

@gkd.hookimpl
def gkd_register_commands(cli):
    cli.commands["weird"] = object()
"""
MISBEHAVING = {  # entry point -> (module, source, the reason gkd records)
    "exits-at-import": ("gkd_exit_import", EXITS_AT_IMPORT, "import of 'gkd_exit_import' failed: sys.exit(3)"),
    "exits-in-methods": ("gkd_exit_methods", EXITS_IN_METHODS, "sys.exit()"),
    "exits-in-commands": ("gkd_exit_commands", EXITS_IN_COMMANDS, "gkd_register_commands called sys.exit('bye')"),
    "not-a-command": ("gkd_not_a_command", NOT_A_COMMAND,
                      "gkd_register_commands added 'weird', which is not a click command"),
}


@pytest.fixture
def misbehaving_site(command_plugin_site, make_plugin_dist):
    """The command plugins of :func:`command_plugin_site` plus four that call ``sys.exit()`` (at import,
    in each hook) or add something that is not a command."""
    modules = {module: source for module, source, _ in MISBEHAVING.values()}
    return make_plugin_dist("gkd-misbehaving", {ep: module for ep, (module, _, _) in MISBEHAVING.items()}, modules,
                            version="6.6.6")


def test_plugins_calling_sys_exit_are_isolated_and_listed(misbehaving_site, run_gkd):
    proc = run_gkd("methods", "list", "--json", pythonpath=misbehaving_site)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    status = {r["name"]: (r["status"], r["reason"]) for r in rows if r["distribution"] == "gkd-misbehaving"}
    assert status == {ep: ("error", reason) for ep, (_, _, reason) in MISBEHAVING.items()}
    assert {"kd", "tinybert", "tmkd"} <= {r["name"] for r in rows if r["status"] == "ok"}
    # Every other command still runs: a plugin command, a built-in that loads every plugin, and env.
    hello = run_gkd("hello", "you", pythonpath=misbehaving_site)
    assert (hello.returncode, hello.stdout) == (0, "hello, you, from a plugin\n"), hello.stderr
    env = run_gkd("env", "--check-plugins", pythonpath=misbehaving_site)
    assert env.returncode == 0 and env.stdout.startswith("python "), env.stderr
    assert "    ! import of 'gkd_exit_import' failed: sys.exit(3)" in env.stdout.splitlines()
    assert "Traceback" not in proc.stderr + hello.stderr + env.stderr


def test_a_plugin_exiting_at_import_does_not_end_validate(misbehaving_site, run_gkd, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: {type: sequence_classification}\n")
    proc = run_gkd("validate", str(bad), pythonpath=misbehaving_site)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert proc.stderr.splitlines()[0] == f"Error: {bad}: 3 error(s)"
    assert f"{bad}: stages: required, but missing" in proc.stderr.splitlines()
    assert "Traceback" not in proc.stderr
