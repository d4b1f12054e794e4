"""Plugins that add commands, through real installed distributions and the real ``gkd`` script:
one whose ``gkd_register_commands`` raises, one adding ``gkd hello``, one trying to replace
``gkd env``. None of them may break another command."""

from __future__ import annotations

import json


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
