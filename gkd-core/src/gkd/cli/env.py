"""``gkd env``: versions, devices and installed plugins, for bug reports.

Plain ``gkd env`` imports neither torch nor any plugin: versions come from the installed
distributions' metadata, and the plugins are listed from their entry points. The two
opt-in flags do the expensive checks: ``--torch`` imports torch in a child process (so a
torch or CUDA driver that crashes or hangs cannot take ``gkd env`` with it) and reports
CUDA and the devices; ``--check-plugins`` loads every plugin and shows whether it works.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import platform
import subprocess
import sys
from typing import Any

import click

DISTRIBUTIONS = ("gkd-core", "gkd-methods-builtin", "gkd-methods-multiteacher", "torch", "megatron-core",
                 "deepspeed")
NOT_CHECKED = "not checked (run `gkd env --torch`)"
TORCH_TIMEOUT_S = 120
TORCH_KEYS = ("cuda_available", "cuda_version", "cpu_threads")
"""Facts only ``--torch`` checks; null in JSON otherwise."""

_TORCH_PROBE = """
import json, torch
info = {"cuda_available": torch.cuda.is_available(), "cuda_version": torch.version.cuda,
        "cpu_threads": torch.get_num_threads()}
if info["cuda_available"]:
    info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
print(json.dumps(info))
"""


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def torch_facts() -> dict[str, Any]:
    """CUDA availability, CUDA version, CPU threads and GPUs, from a child process importing torch."""
    try:
        proc = subprocess.run([sys.executable, "-c", _TORCH_PROBE], capture_output=True, text=True,
                              timeout=TORCH_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return {"torch_error": f"importing torch took more than {TORCH_TIMEOUT_S} s"}
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"torch_error": f"importing torch failed (exit code {proc.returncode}): {last}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plugin_rows(check: bool) -> list[dict[str, Any]]:
    """One row per ``gkd.methods`` entry point; with ``check``, load them all and add the status."""
    from gkd.plugins.discovery import installed_plugins

    rows: list[dict[str, Any]] = [
        {"entry_point": p.entry_point, "distribution": p.distribution, "version": p.version, "module": p.value}
        for p in installed_plugins()
    ]
    if not check:
        return rows
    from gkd.cli import plugin_commands
    from gkd.plugins.manager import get_plugin_manager

    plugin_commands()  # runs every plugin's gkd_register_commands once
    manager = get_plugin_manager()
    for row in rows:
        key = (row["entry_point"], row["distribution"])
        broken = [b for b in manager.registry.broken if (b.name, b.origin.distribution) == key]
        methods = [m.spec.name for m in manager.registry if (m.origin.entry_point, m.origin.distribution) == key]
        commands = [c for c in manager.command_plugins if (c.origin.entry_point, c.origin.distribution) == key]
        failed = broken[0] if broken else next((c for c in commands if c.status != "ok"), None)
        row["status"] = failed.status if failed else "ok"
        row["methods"] = methods
        row["commands"] = [name for c in commands for name in c.commands]
        if failed:
            row["reason"] = failed.reason
    return rows


def collect(*, torch: bool = False, check_plugins: bool = False) -> dict[str, Any]:
    """Everything ``gkd env`` prints, as one mapping."""
    info: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform()}
    info |= {dist: _version(dist) for dist in DISTRIBUTIONS}
    if torch:
        info |= dict.fromkeys(TORCH_KEYS) | torch_facts()
    else:
        info |= dict.fromkeys(TORCH_KEYS)
    info["plugins"] = plugin_rows(check_plugins)
    return info


def _provides(row: dict[str, Any]) -> str:
    parts = [f"methods: {', '.join(row['methods'])}"] if row.get("methods") else []
    parts += [f"commands: {', '.join('gkd ' + c for c in row['commands'])}"] if row.get("commands") else []
    return "; ".join(parts)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON (unchecked facts are null).")
@click.option("--torch", "check_torch", is_flag=True,
              help="Import torch (in a child process) to report CUDA, its version, CPU threads and GPUs.")
@click.option("--check-plugins", is_flag=True,
              help="Load every plugin and report whether it works (may import torch).")
def env(as_json: bool, check_torch: bool, check_plugins: bool) -> None:
    """Print versions of Python, gkd, torch, megatron-core and DeepSpeed, and the installed plugins.

    Imports neither torch nor any plugin unless --torch or --check-plugins asks for it.
    """
    info = collect(torch=check_torch, check_plugins=check_plugins)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        if key != "plugins":
            unchecked = key in TORCH_KEYS and not check_torch
            click.echo(f"{key:26} {NOT_CHECKED if unchecked else value}")
    plugins = info["plugins"]
    click.echo(f"plugins ({len(plugins)} entry point(s) in group 'gkd.methods'"
               f"{'' if check_plugins else '; not loaded, `gkd env --check-plugins` loads them'}):")
    for p in plugins:
        line = f"  {p['entry_point']:24} {p['distribution']} {p['version']} ({p['module']})"
        if "status" in p:
            provides = _provides(p)
            line += f"  {p['status']}{' — ' + provides if provides else ''}"
        click.echo(line)
        if "reason" in p:
            click.echo(f"    ! {p['reason']}")
