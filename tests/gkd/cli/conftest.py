"""Helpers of the CLI tests: the real ``gkd`` console script in a subprocess, and throw-away
plugin distributions that add commands (built with the suite's ``make_plugin_dist``)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

BROKEN_COMMANDS = """
import gkd

@gkd.hookimpl
def gkd_register_commands(cli):
    raise RuntimeError("cannot add commands: frobnicate is missing")
"""

HELLO = """
import click
import gkd

@gkd.hookimpl
def gkd_register_commands(cli):
    @cli.command()
    @click.argument("who", default="world")
    def hello(who):
        \"\"\"Say hello (a command-only plugin).\"\"\"
        click.echo(f"hello, {who}, from a plugin")
"""

HIJACK_ENV = """
import click
import gkd

@gkd.hookimpl
def gkd_register_commands(cli):
    @cli.command("env")
    def env():
        click.echo("hijacked")
"""

NOISY = """
import click
import gkd

@gkd.hookimpl
def gkd_register_commands(cli):
    @cli.command("noisy")
    def noisy():
        \"\"\"Import megatron-core and DeepSpeed and build a TransformerConfig, as a first distill does.\"\"\"
        import deepspeed  # noqa: F401
        import megatron.core  # noqa: F401
        import megatron.core.optimizer  # noqa: F401
        from gkd.models import ModelConfig

        ModelConfig(family="encoder", vocab_size=10, hidden_size=8, num_layers=2, num_attention_heads=2,
                    ffn_hidden_size=16).to_transformer_config(1)
        click.echo("noisy done")
"""

RunGkd = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def run_gkd() -> RunGkd:
    """Run the installed ``gkd`` console script; ``pythonpath`` is prepended to PYTHONPATH."""

    def run(*args: str, pythonpath: Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 180) -> subprocess.CompletedProcess[str]:
        full_env = {**os.environ, **(env or {})}
        if pythonpath is not None:
            full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), full_env.get("PYTHONPATH")]))
        gkd = Path(sys.executable).parent / "gkd"
        return subprocess.run([str(gkd), *args], capture_output=True, text=True, env=full_env, timeout=timeout,
                              check=False)

    return run


@pytest.fixture
def command_plugin_site(make_plugin_dist: Callable[..., Path]) -> Path:
    """A site directory with three command-only plugin distributions: one whose
    ``gkd_register_commands`` raises, one adding ``gkd hello``, one trying to replace ``gkd env``."""
    make_plugin_dist("gkd-broken-commands", {"broken-cmds": "gkd_broken_cmds"}, {"gkd_broken_cmds": BROKEN_COMMANDS},
                     version="1.2.3")
    make_plugin_dist("gkd-hello", {"hello-plugin": "gkd_hello_cmd"}, {"gkd_hello_cmd": HELLO}, version="0.4.0")
    return make_plugin_dist("gkd-hijack", {"hijack-env": "gkd_hijack_env"}, {"gkd_hijack_env": HIJACK_ENV})


@pytest.fixture
def noisy_plugin_site(make_plugin_dist: Callable[..., Path]) -> Path:
    """A site directory with a plugin adding ``gkd noisy``, which imports megatron-core and DeepSpeed."""
    return make_plugin_dist("gkd-noisy", {"noisy": "gkd_noisy_cmd"}, {"gkd_noisy_cmd": NOISY})
