"""``gkd methods list`` and ``gkd methods show``: installed methods, and the plugins adding commands."""

from __future__ import annotations

import json
from typing import Any

import click

from gkd.config.schema import defaults_of
from gkd.plugins.manager import get_plugin_manager


def _rows() -> list[dict[str, Any]]:
    """Methods and broken method plugins (sorted by name), then the plugins that add commands."""
    from gkd.cli import plugin_commands

    plugin_commands()  # calls each plugin's gkd_register_commands, so a broken one is listed too
    manager = get_plugin_manager()
    registry = manager.registry
    rows: list[dict[str, Any]] = [
        {"name": m.spec.name, "distribution": m.origin.distribution, "version": m.origin.version,
         "kind": m.spec.kind, "stages": list(m.spec.stages), "status": "ok", "summary": m.spec.summary,
         "provides": "method"}
        for m in registry
    ]
    rows += [
        {"name": b.name, "distribution": b.origin.distribution, "version": b.origin.version,
         "kind": None, "stages": [], "status": b.status, "reason": b.reason, "provides": "method"}
        for b in registry.broken
    ]
    rows.sort(key=lambda r: r["name"])
    command_rows = [
        {"name": c.origin.entry_point, "distribution": c.origin.distribution, "version": c.origin.version,
         "kind": None, "stages": [], "status": c.status, "provides": "commands", "commands": list(c.commands)}
        | ({"reason": c.reason} if c.status != "ok" else {})
        for c in manager.command_plugins
    ]
    return rows + sorted(command_rows, key=lambda r: r["name"])


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
    table = [header, *rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for row in table:
        click.echo("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


@click.group()
def methods() -> None:
    """Inspect installed distillation methods and plugin commands."""


@methods.command("list")
@click.option("--json", "as_json", is_flag=True,
              help="Print JSON: one object per method, then one per plugin that adds commands (provides: commands).")
def list_methods(as_json: bool) -> None:
    """List installed methods (name, distribution, version, kind, status), then plugin commands.

    Broken plugins are listed with status error; their reasons go to standard error.
    """
    rows = _rows()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    method_rows = [r for r in rows if r["provides"] == "method"]
    command_rows = [r for r in rows if r["provides"] == "commands"]
    _table(("NAME", "DISTRIBUTION", "VERSION", "KIND", "STATUS"),
           [(r["name"], r["distribution"], r["version"], r["kind"] or "-", r["status"]) for r in method_rows])
    if command_rows:
        click.echo("")
        _table(("PLUGIN", "DISTRIBUTION", "VERSION", "COMMANDS", "STATUS"),
               [(r["name"], r["distribution"], r["version"], ", ".join(f"gkd {c}" for c in r["commands"]) or "-",
                 r["status"]) for r in command_rows])
    for r in rows:
        if r["status"] != "ok":
            what = " (commands)" if r["provides"] == "commands" else ""
            click.echo(f"  ! {r['name']}{what}: {r['reason']}", err=True)


@methods.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Print the full description as JSON.")
def show_method(name: str, as_json: bool) -> None:
    """Show a method: summary, citation, features and its config schema with defaults."""
    registered = get_plugin_manager().registry.get(name)
    spec = registered.spec
    info = spec.describe() | {"distribution": registered.origin.distribution, "version": registered.origin.version,
                              "defaults": defaults_of(spec.config_schema)}
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{spec.name} — {spec.summary}")
    click.echo(f"  from:      {registered.origin.distribution} {registered.origin.version}")
    click.echo(f"  citation:  {spec.citation}")
    click.echo(f"  kind:      {spec.kind}; stages: {', '.join(spec.stages)}")
    click.echo(f"  modifies forward pass: {'yes' if spec.modifies_forward else 'no'}; "
               f"trainable parameters: {'yes' if spec.has_parameters else 'no'}")
    click.echo(f"  teacher features: {', '.join(spec.features.teacher) or '-'}")
    click.echo(f"  student features: {', '.join(spec.features.student) or '-'}")
    if spec.notes:
        click.echo(f"  notes: {spec.notes}")
    click.echo("  config (defaults):")
    for key, prop in spec.config_schema.get("properties", {}).items():
        default = json.dumps(prop["default"]) if "default" in prop else "(required)" if key in spec.config_schema.get("required", []) else "-"
        desc = prop.get("description", "")
        click.echo(f"    {key} = {default}    {desc}".rstrip())
